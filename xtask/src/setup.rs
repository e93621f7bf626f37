//! Installs what a fresh Debian 12 machine lacks to build and test podtrace. Idempotent: each
//! step checks first and skips what is present.

use std::process::Command;

use anyhow::{Context as _, Result, bail};

/// Debian packages: LLVM 22 for bpf-linker, the lab's tools, and QEMU for the VM tests.
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
];

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
    Command::new(program)
        .args(args)
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
        .unwrap_or_default()
}

pub fn step(program: &str, args: &[&str]) -> Result<()> {
    println!("xtask: {program} {}", args.join(" "));
    let status = Command::new(program).args(args).status().with_context(|| format!("running {program}"))?;
    if !status.success() {
        bail!("{program} {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn apt_packages() -> Result<()> {
    let missing: Vec<&str> = PACKAGES
        .iter()
        .copied()
        .filter(|package| !output("dpkg-query", &["-W", "-f=${Status}", package]).contains("install ok installed"))
        .collect();
    if missing.is_empty() {
        println!("xtask: Debian packages present");
        return Ok(());
    }
    step("apt-get", &["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    step("apt-get", &args)
}

fn rust_toolchain() -> Result<()> {
    if !output("rustup", &["toolchain", "list"]).lines().any(|line| line.starts_with("nightly")) {
        step("rustup", &["toolchain", "install", "nightly", "--profile", "minimal"])?;
    }
    let nightly_components = output("rustup", &["component", "list", "--installed", "--toolchain", "nightly"]);
    if !nightly_components.lines().any(|line| line.starts_with("rust-src")) {
        step("rustup", &["component", "add", "rust-src", "--toolchain", "nightly"])?;
    }
    let targets = output("rustup", &["target", "list", "--installed"]);
    if !targets.lines().any(|line| line.trim() == "x86_64-unknown-linux-musl") {
        step("rustup", &["target", "add", "x86_64-unknown-linux-musl"])?;
    }
    println!("xtask: Rust toolchains present");
    Ok(())
}

fn bpf_linker() -> Result<()> {
    if output("bpf-linker", &["--version"]).contains("0.13") {
        println!("xtask: bpf-linker present");
        return Ok(());
    }
    println!("xtask: building bpf-linker against LLVM 22 (a few minutes)");
    let status = Command::new("cargo")
        .args(["install", "bpf-linker", "--version", "^0.13", "--locked", "--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", "/usr/lib/llvm-22")
        .status()
        .context("running cargo install bpf-linker")?;
    if !status.success() {
        bail!("cargo install bpf-linker failed ({status})");
    }
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
