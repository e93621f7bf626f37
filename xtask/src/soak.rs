//! `cargo xtask soak`: kill cycles on clsact and on TCX, then a long follow under steady
//! traffic, on the built-in lab. Not in CI (about 15 minutes); prints its figures and a summary
//! for the README, and fails when anything remained or a figure is not flat.

use std::{path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result, bail};
use podtrace_tests::{
    lab::{Lab, LabSpec, unique_prefix},
    soak::{self, FollowSample},
};

use crate::workspace;

/// How often the long follow samples podtrace's RSS.
const SAMPLE_EVERY: Duration = Duration::from_secs(10);

pub fn run(binary: &Path, cycles: usize, minutes: u64) -> Result<()> {
    // The soak runs for a quarter of an hour: a rebuild in this workspace meanwhile must not
    // swap the binary under its later cycles.
    // Named podtrace still: the soak samples only a process of that name.
    let measured = workspace().join("target/soak/podtrace");
    let dir = measured.parent().context("target/soak")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::copy(binary, &measured).with_context(|| format!("copying {} to {}", binary.display(), measured.display()))?;
    // SAFETY: set before any thread is spawned; the podtrace runner reads it.
    unsafe { std::env::set_var("PODTRACE_BIN", &measured) };
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").context("reading the kernel release")?;
    let build = build_description()?;
    let lab = Lab::up(LabSpec { prefix: unique_prefix("soak"), ..Default::default() })?;
    let mut summary = Vec::new();
    let mut problems = Vec::new();
    for attach in ["clsact", "tcx"] {
        println!("xtask: soak: {cycles} cycles of podtrace follow --attach {attach}, pings, kill -9");
        let figures = soak::kill_cycles(&lab, attach, cycles)?;
        println!("{}\n{}", figures.summary(), figures.series());
        summary.push(figures.summary());
        problems.extend(figures.problems());
    }
    println!("xtask: soak: following pod A for {minutes} min under ping -i 0.01, RSS every {} s", SAMPLE_EVERY.as_secs());
    let mut progress = |sample: &FollowSample| {
        println!("  {:>4.0} s: {} fds, RSS {:.1} MiB", sample.at.as_secs_f64(), sample.process.fds, sample.process.rss_kib as f64 / 1024.0)
    };
    let follow = soak::steady_follow(&lab, Duration::from_secs(minutes * 60), SAMPLE_EVERY, &mut progress)?;
    summary.push(follow.summary());
    summary.push(follow.series());
    problems.extend(follow.problems());
    drop(lab);

    println!("\nxtask: soak summary (kernel {}, {build}):\n", kernel.trim());
    for line in &summary {
        println!("{line}");
    }
    if !problems.is_empty() {
        bail!("the soak found problems:\n{}", problems.join("\n"));
    }
    println!("verdict: fds identical and RSS flat in every series; nothing remained");
    Ok(())
}

/// The commit podtrace was built from, and whether its sources had uncommitted changes.
fn build_description() -> Result<String> {
    let git = |args: &[&str]| -> Result<String> {
        let output =
            Command::new("git").args(args).current_dir(workspace()).output().with_context(|| format!("running git {}", args.join(" ")))?;
        if !output.status.success() {
            bail!("git {} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    };
    let commit = git(&["rev-parse", "--short", "HEAD"])?;
    let changed = git(&["status", "--porcelain", "--", "tracer", "tracer-ebpf", "tracer-common"])?;
    let changes = if changed.is_empty() { "" } else { " with uncommitted changes" };
    Ok(format!("debug build of {commit}{changes}"))
}
