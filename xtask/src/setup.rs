//! Installs what a fresh Debian 12 machine lacks to build and test podtrace. Idempotent: each
//! step checks first and skips what is present. Each step says what it installs; a failure
//! names the step and the command to retry.

use std::{process::Command, time::Instant};

use anyhow::{Context as _, Result, bail};

/// Debian packages: LLVM 22 for bpf-linker, the lab's tools, real CNI plugins and dnsmasq for
/// the lab's pods, podman for the image, kubectl for the manifest check, QEMU for the VM tests.
const PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
    "tcpdump",
    "iproute2",
    "ethtool",
    "iperf3",
    "iptables",
    "iputils-ping",
    "bpftool",
    "util-linux",
    "python3",
    "qemu-system-x86",
    "busybox-static",
    "cpio",
    "kmod",
    "podman",
    "runc",
    "containernetworking-plugins",
    "dnsmasq-base",
];

/// Commands that may come from another package already on the machine (kubectl from Google's
/// or Kubernetes' own repository conflicts with Debian's `kubernetes-client`), each with the
/// Debian package that provides it otherwise.
const COMMANDS: &[(&str, &str)] = &[("kubectl", "kubernetes-client")];

const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

pub fn run() -> Result<()> {
    apt_packages()?;
    rust_toolchain()?;
    bpf_linker()?;
    mounts()?;
    Ok(())
}

fn succeeds(program: &str, args: &[&str]) -> bool {
    Command::new(program).args(args).output().is_ok_and(|output| output.status.success())
}

fn output(program: &str, args: &[&str]) -> String {
    Command::new(program).args(args).output().map(|output| String::from_utf8_lossy(&output.stdout).into_owned()).unwrap_or_default()
}

/// Runs a command, echoing it; a failure names the command.
pub fn step(program: &str, args: &[&str]) -> Result<()> {
    println!("xtask: {program} {}", args.join(" "));
    let status = Command::new(program).args(args).status().with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} {} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// One setup step that installs something: says what, runs it, says how long it took, and on
/// failure names the step and the command that retries it.
fn install(what: &str, command: &mut Command) -> Result<()> {
    let shown = shown(command);
    println!("xtask setup: installing {what}: {shown}");
    let started = Instant::now();
    let status = command.status().with_context(|| format!("setup step '{what}': could not start {shown}"))?;
    let took = started.elapsed();
    if !status.success() {
        bail!("setup step '{what}' failed ({status}) after {:.0} s; retry with: {shown}", took.as_secs_f64());
    }
    println!("xtask setup: installed {what} in {:.0} s", took.as_secs_f64());
    Ok(())
}

/// The command as a user would type it, environment included.
fn shown(command: &Command) -> String {
    let env = command.get_envs().filter_map(|(key, value)| Some(format!("{}={}", key.to_string_lossy(), value?.to_string_lossy())));
    let words = std::iter::once(command.get_program().to_string_lossy().into_owned())
        .chain(command.get_args().map(|arg| arg.to_string_lossy().into_owned()));
    env.chain(words).collect::<Vec<_>>().join(" ")
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|package| !output("dpkg-query", &["-W", "-f=${Status}", package]).contains("install ok installed"))
        .chain(
            COMMANDS.iter().filter(|(command, _)| !succeeds("sh", &["-c", &format!("command -v {command}")])).map(|(_, package)| *package),
        )
        .collect();
    if missing.is_empty() {
        println!("xtask setup: Debian packages present");
        return Ok(());
    }
    install("the Debian package lists", Command::new("apt-get").args(["update", "-qq"]))?;
    install(
        &format!("Debian packages ({})", missing.join(" ")),
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )?;
    Ok(())
}

fn rust_toolchain() -> Result<()> {
    if !output("rustup", &["toolchain", "list"]).lines().any(|line| line.starts_with("nightly")) {
        install("the nightly toolchain", Command::new("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    let nightly_components = output("rustup", &["component", "list", "--installed", "--toolchain", "nightly"]);
    if !nightly_components.lines().any(|line| line.starts_with("rust-src")) {
        install(
            "nightly rust-src (the kernel programs build core from source)",
            Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]),
        )?;
    }
    let targets = output("rustup", &["target", "list", "--installed"]);
    if !targets.lines().any(|line| line.trim() == MUSL_TARGET) {
        install("the musl target (static binaries)", Command::new("rustup").args(["target", "add", MUSL_TARGET]))?;
    }
    println!("xtask setup: Rust toolchains present (nightly rust-src, {MUSL_TARGET})");
    Ok(())
}

fn bpf_linker() -> Result<()> {
    if output("bpf-linker", &["--version"]).contains("0.13") {
        println!("xtask setup: bpf-linker 0.13 present");
        return Ok(());
    }
    install(
        "bpf-linker 0.13, built against LLVM 22 (the slow step)",
        Command::new("cargo")
            .args(["install", "bpf-linker", "--version", "^0.13", "--locked", "--no-default-features", "--features", "llvm-22"])
            .env("LLVM_PREFIX", "/usr/lib/llvm-22"),
    )?;
    Ok(())
}

/// tracefs and bpffs are not mounted at boot everywhere.
pub fn mounts() -> Result<()> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    for (target, fstype) in [("/sys/kernel/tracing", "tracefs"), ("/sys/fs/bpf", "bpf")] {
        if !mounts.lines().any(|line| line.split_whitespace().nth(1) == Some(target)) {
            step("mount", &["-t", fstype, fstype, target])?;
        }
    }
    Ok(())
}

/// Whether this process may do what the privileged tests and the lab need.
pub fn require_root() -> Result<()> {
    if !succeeds("id", &["-u"]) || output("id", &["-u"]).trim() != "0" {
        bail!("this needs root (network namespaces, eBPF, apt-get)");
    }
    Ok(())
}
