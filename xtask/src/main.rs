//! Project tasks: `cargo xtask setup | demo | test | lab | vm | bench | image | soak`.
//!
//! xtask depends only on tooling crates: it must build on a fresh machine, before `setup` has
//! installed what the kernel programs need (nightly rust-src, bpf-linker). Everything that needs
//! `tracer` runs as a `cargo` subprocess after setup; `deps` checks that this stays true.

mod demo;
mod deps;
mod image;
mod setup;
mod soak;
mod vm;

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};
use podtrace_tests::lab::{self, Lab, LabSpec};

#[derive(Parser)]
#[command(name = "xtask")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing (Debian packages, nightly rust-src, bpf-linker) and mount
    /// tracefs and bpffs.
    Setup,
    /// Set up, bring up the built-in lab, trace a pod while it talks, print the report, tear down.
    Demo {
        /// Inject a fault into the lab first, to show its finding.
        #[arg(long, value_enum, default_value_t = demo::Fault::None)]
        fault: demo::Fault,
    },
    /// Set up and run every test.
    Test {
        /// Skip the kernel tests in VMs (Debian's 5.10, 6.1, 6.12 and 7.2).
        #[arg(long)]
        skip_vm: bool,
    },
    /// Speed and memory figures: kernel cost per packet, userspace throughput, memory.
    Bench,
    /// Run the privileged test suite in QEMU on Debian's kernels, 5.10 to 7.2.
    Vm {
        /// 5.10, 6.1, 6.12, 7.2 or all (repeatable).
        #[arg(long, default_value = "all")]
        kernel: Vec<String>,
        /// Test name filter passed to every test binary.
        #[arg(last = true)]
        filter: Vec<String>,
    },
    /// Build the OCI image `podtrace:<version>` (FROM scratch, the static binary) and write
    /// it as an OCI archive under target/.
    Image,
    /// Not in CI: kill cycles on clsact and TCX (nothing may remain; fds and RSS flat), then a
    /// long follow under steady traffic (RSS flat).
    Soak {
        /// Start, traffic, kill -9 cycles per attach mode.
        #[arg(long, default_value_t = 100)]
        cycles: usize,
        /// Length of the follow under steady traffic.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
        minutes: u64,
    },
    /// Bring the built-in lab up (and leave it) or tear it down.
    Lab {
        #[command(subcommand)]
        action: LabAction,
    },
}

#[derive(Subcommand)]
enum LabAction {
    Up {
        #[arg(long, default_value = "lab")]
        prefix: String,
    },
    Down {
        #[arg(long, default_value = "lab")]
        prefix: String,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(err) = run(cli.command) {
        eprintln!("xtask: {err:#}");
        std::process::exit(1);
    }
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::Setup => {
            setup::require_root()?;
            setup::run()
        }
        Task::Demo { fault } => {
            setup::require_root()?;
            setup::run()?;
            let binary = build_podtrace()?;
            demo::run(&binary, fault)
        }
        Task::Test { skip_vm } => {
            setup::require_root()?;
            setup::run()?;
            test(skip_vm)
        }
        Task::Bench => {
            setup::require_root()?;
            setup::run()?;
            // `cargo bench` measures the optimised build.
            setup::step("cargo", &["bench", "--package", "tracer", "--bench", "podtrace"])
        }
        Task::Image => {
            setup::require_root()?;
            setup::run()?;
            image::build().map(drop)
        }
        Task::Soak { cycles, minutes } => {
            setup::require_root()?;
            setup::run()?;
            let binary = build_podtrace()?;
            soak::run(&binary, cycles, minutes)
        }
        Task::Vm { kernel, filter } => {
            setup::require_root()?;
            setup::run()?;
            vm::run(&kernel, &filter)
        }
        Task::Lab { action: LabAction::Up { prefix } } => {
            setup::require_root()?;
            let lab = Lab::up(LabSpec { prefix: prefix.clone(), ..Default::default() })?;
            println!("lab {prefix} is up:");
            for node in &lab.nodes {
                println!("  node {} ({}): eth0 {}, pods {}", node.netns, node.pod_cidr, node.ip, pod_list(node));
            }
            let dns = lab.dns_pod();
            println!("  cluster DNS: dnsmasq in {} ({}) behind the Service {}", dns.netns, dns.ip, lab::DNS_SERVICE_IP);
            println!("try: ip netns exec {} target/debug/podtrace follow {}", lab.node_a().netns, lab.pod_a().ip);
            println!("     ip netns exec {} ping {}", lab.pod_a().netns, lab.pod_b().ip);
            println!("tear down with: cargo xtask lab down --prefix {prefix}");
            lab.keep();
            Ok(())
        }
        Task::Lab { action: LabAction::Down { prefix } } => {
            setup::require_root()?;
            let deleted = lab::delete_prefix(&prefix)?;
            println!("deleted {} namespaces", deleted.len());
            Ok(())
        }
    }
}

fn namespaces() -> Result<Vec<String>> {
    let output = Command::new("ip").args(["netns", "list"]).output().context("listing namespaces")?;
    Ok(String::from_utf8_lossy(&output.stdout).lines().filter_map(|l| l.split_whitespace().next()).map(str::to_string).collect())
}

fn pod_list(node: &lab::Node) -> String {
    node.pods.iter().map(|pod| format!("{} ({})", pod.ip, pod.netns)).collect::<Vec<_>>().join(", ")
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace").to_path_buf()
}

/// Builds the userspace binary (and, through its build script, the kernel programs).
fn build_podtrace() -> Result<PathBuf> {
    setup::step("cargo", &["build", "--package", "tracer"])?;
    Ok(workspace().join("target/debug/podtrace"))
}

fn test(skip_vm: bool) -> Result<()> {
    deps::check_tooling_only()?;
    println!("xtask: xtask's dependency tree holds none of {}", deps::FORBIDDEN.join(", "));
    setup::step("cargo", &["fmt", "--all", "--check"])?;
    setup::step("cargo", &["clippy", "--workspace", "--all-targets", "--quiet", "--", "-D", "warnings"])?;
    let binary = build_podtrace()?;
    let image = image::build()?;
    let namespaces_before = namespaces()?;
    println!("xtask: cargo test --workspace (unit, kernel-parser and lab integration tests)");
    let status = Command::new("cargo")
        .args(["test", "--workspace", "--", "--test-threads=2"])
        .env("PODTRACE_BIN", &binary)
        .env("PODTRACE_IMAGE", &image)
        .status()
        .context("running cargo test")?;
    if !status.success() {
        bail!("tests failed ({status})");
    }
    let leaked: Vec<String> = namespaces()?.into_iter().filter(|ns| !namespaces_before.contains(ns)).collect();
    if !leaked.is_empty() {
        bail!("tests left network namespaces behind: {}", leaked.join(", "));
    }
    if skip_vm {
        println!("xtask: skipping the VM kernel tests (--skip-vm)");
        return Ok(());
    }
    vm::run(&["all".to_string()], &[])
}
