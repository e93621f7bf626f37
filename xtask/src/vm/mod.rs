//! `cargo xtask vm`: the privileged test suite inside QEMU on Debian's kernels, 5.10 to 7.2.
//!
//! Each kernel is the newest Debian cloud package of its line (`kernel`), extracted into a
//! cache outside the repository. The initramfs is built on the fly (`initramfs`): busybox, the
//! statically linked (musl) podtrace and test binaries, the tools the tests call, and the
//! kernel's own modules. The VM runs the suite and reports each test binary's exit status on
//! the serial console (`boot`). Kernels boot side by side, one per CPU.

mod boot;
mod initramfs;
mod kernel;

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    sync::Mutex,
};

use anyhow::{Context as _, Result, bail};

use crate::{setup::step, workspace};
use kernel::Kernel;

/// A kernel line of the matrix.
struct KernelLine {
    name: &'static str,
    /// Package-name prefix of the line's cloud images; the newest match is tested.
    package_prefix: &'static str,
    /// What runs there in `--kernel all`: the whole suite, or a subset.
    tests: Selection,
    /// What runs there when the line is asked for by name.
    alone: Selection,
    /// Part of `--kernel all` (what `cargo xtask test` runs).
    in_all: bool,
}

#[derive(Clone, Copy)]
enum Selection {
    Whole,
    /// Test binaries, each with the name filters of the tests that run (none: all of it).
    Subset(&'static [(&'static str, &'static [&'static str])]),
}

/// The kernel-parser tests, the tracer's unit tests (which read the running kernel's BTF and
/// tracefs), one follow-vs-tcpdump test, detaching, the healthy lab, and one finding per
/// kernel source: drops (kfree_skb), retransmits, ICMP errors (icmp_send); the kernel-event
/// ring's batched wakeups (`bpf_ringbuf_query` and its flags, which each kernel checks); a
/// bond; the masqueraded and NodePort flows (the TC programs' conntrack reads, in either
/// direction); and Calico's IPIP mode, which only the VMs' kernels have (tunl0's ingress
/// differs on 5.10).
const SUBSET: Selection = Selection::Subset(&[
    ("kernel_parser", &[]),
    ("tracer-unit", &[]),
    ("follow", &["ping_counts_match_tcpdump", "nothing_stays_attached"]),
    (
        "findings",
        &[
            "healthy_lab_has_no_warning_or_error",
            "firewall_drop_on_node_b",
            "underlay_mtu_mismatch_between_nodes",
            "pod_mtu_above_the_tunnel_with_icmp_blocked",
            "drops_outnumbering_a_one_page_kernel_ring_all_arrive",
        ],
    ),
    ("bond", &["active_backup_bond_is_traced_with_its_slaves"]),
    ("nat", &["masqueraded_ping_and_tcp_counts_match_tcpdump", "a_node_port_flow_is_followed_from_the_nic_through_its_dnat"]),
    ("calico", &["calico_ipip_counts_match_tcpdump", "a_node_port_client_above_tunl0_1440"]),
]);

const KERNELS: &[KernelLine] = &[
    KernelLine { name: "5.10", package_prefix: "linux-image-5.10.0-", tests: SUBSET, alone: SUBSET, in_all: true },
    // The whole suite no longer fits two VMs' 40 minutes under TCG on a 2-core runner beside
    // the others (`--kernel 6.1` or `6.12` alone still runs it, with `--`-filters as wanted).
    KernelLine { name: "6.1", package_prefix: "linux-image-6.1.0-", tests: SUBSET, alone: Selection::Whole, in_all: true },
    KernelLine { name: "6.12", package_prefix: "linux-image-6.12.", tests: SUBSET, alone: Selection::Whole, in_all: true },
    KernelLine { name: "7.2", package_prefix: "linux-image-7.2.", tests: SUBSET, alone: SUBSET, in_all: true },
];

/// Test binaries that never touch the kernel (the kubectl plugin and the manifest against
/// stand-ins and files of the repository; property tests of the decoders), and the soak-lite
/// kill cycles, whose clsact sweeping `coexistence` already covers on every kernel and which
/// would add minutes under TCG: host only.
const HOST_ONLY: &[&str] = &["kubectl_plugin", "manifest", "decode_properties", "soak"];

/// Serial-console markers the init script prints.
const RESULT_MARK: &str = "PODTRACE-VM-EXIT";
const DONE_MARK: &str = "PODTRACE-VM-DONE";

/// One test binary to run in the VM, with its name filters.
pub struct TestRun {
    binary: String,
    filters: Vec<String>,
}

pub fn run(kernels: &[String], filter: &[String]) -> Result<()> {
    let names = || KERNELS.iter().map(|line| line.name).collect::<Vec<_>>().join(", ");
    let all = kernels.iter().any(|k| k == "all");
    let selected: Vec<&KernelLine> = if all {
        KERNELS.iter().filter(|line| line.in_all).collect()
    } else {
        kernels
            .iter()
            .map(|k| KERNELS.iter().find(|line| line.name == k).with_context(|| format!("unknown kernel {k}: use {} or all", names())))
            .collect::<Result<_>>()?
    };
    let binaries = build_static()?;
    let mut prepared = Vec::new();
    for line in selected {
        let kernel = kernel::fetch(line.package_prefix)?;
        println!("xtask: VM kernel {}: package {} version {}", line.name, kernel.package, kernel.version);
        let runs = test_runs(if all { line.tests } else { line.alone }, &binaries.tests, filter);
        let initramfs = initramfs::build(&kernel, &binaries.podtrace, &binaries.tests, &runs)?;
        prepared.push((line.name, kernel, initramfs));
    }
    let failures = boot_all(prepared);
    if !failures.is_empty() {
        bail!("VM tests failed: {}", failures.join("; "));
    }
    Ok(())
}

/// Boots each kernel with its initramfs, as many at once as the machine has CPUs (each VM
/// has one vCPU, and TCG keeps it busy), and returns the failures. Every console line is
/// prefixed with its kernel, so interleaved output stays readable.
fn boot_all(prepared: Vec<(&'static str, Kernel, PathBuf)>) -> Vec<String> {
    let parallel = std::thread::available_parallelism().map_or(1, usize::from).min(prepared.len()).max(1);
    let queue = Mutex::new(prepared.into_iter());
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..parallel {
            scope.spawn(|| {
                // A call of its own, so the queue's lock is released before the VM boots.
                let next = || queue.lock().expect("no VM thread panics holding the queue").next();
                while let Some((name, kernel, initramfs)) = next() {
                    match boot::boot(&kernel, &initramfs) {
                        Ok(()) => println!("xtask: VM kernel {name} ({}): all test binaries passed", kernel.release),
                        Err(err) => {
                            println!("xtask: VM kernel {name} ({}): {err:#}", kernel.release);
                            failures.lock().expect("no VM thread panics holding the failures").push(format!("{name}: {err:#}"));
                        }
                    }
                }
            });
        }
    });
    failures.into_inner().expect("no VM thread panicked")
}

/// The binaries to run and their filters: the selection's, narrowed by the user's filter.
fn test_runs(selection: Selection, binaries: &[(String, PathBuf)], user_filter: &[String]) -> Vec<TestRun> {
    let user = || user_filter.to_vec();
    match selection {
        Selection::Whole => binaries
            .iter()
            .filter(|(name, _)| !HOST_ONLY.contains(&name.as_str()))
            .map(|(name, _)| TestRun { binary: name.clone(), filters: user() })
            .collect(),
        Selection::Subset(subset) => subset
            .iter()
            .filter(|(binary, _)| binaries.iter().any(|(name, _)| name == binary))
            .map(|(binary, filters)| TestRun {
                binary: binary.to_string(),
                // libtest runs a test that matches any filter; the user's filter replaces
                // the subset's.
                filters: if user_filter.is_empty() { filters.iter().map(|f| f.to_string()).collect() } else { user() },
            })
            .collect(),
    }
}

struct StaticBinaries {
    podtrace: PathBuf,
    tests: Vec<(String, PathBuf)>,
}

/// podtrace and the test binaries, linked statically against musl so the VM needs no libc
/// of theirs.
fn build_static() -> Result<StaticBinaries> {
    const TARGET: &str = "x86_64-unknown-linux-musl";
    step("cargo", &["build", "--package", "tracer", "--target", TARGET])?;
    println!("xtask: cargo test --no-run --target {TARGET} (tracer, podtrace-tests)");
    let output = Command::new("cargo")
        .args(["test", "--no-run", "--target", TARGET, "--package", "tracer", "--package", "podtrace-tests", "--message-format=json"])
        .stderr(Stdio::inherit())
        .output()
        .context("building the test binaries")?;
    if !output.status.success() {
        bail!("building the static test binaries failed");
    }
    let mut tests = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let (Some(executable), Some(name)) = (message["executable"].as_str(), message["target"]["name"].as_str()) else {
            continue;
        };
        let kinds = message["target"]["kind"].as_array().cloned().unwrap_or_default();
        // Integration tests, and the tracer library's unit tests (they read the running
        // kernel's BTF and tracefs); the empty unit-test harnesses of the others are skipped.
        if kinds.iter().any(|k| k == "test") || name == "tracer" && kinds.iter().any(|k| k == "lib") {
            tests.push((
                if kinds.iter().any(|k| k == "lib") { "tracer-unit".to_string() } else { name.to_string() },
                PathBuf::from(executable),
            ));
        }
    }
    tests.sort();
    tests.dedup_by(|a, b| a.0 == b.0);
    Ok(StaticBinaries { podtrace: workspace().join("target").join(TARGET).join("debug/podtrace"), tests })
}
