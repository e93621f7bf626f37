//! Boots a kernel and its initramfs in QEMU and reads the suite's results off the console.

use std::{
    io::{BufRead as _, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use super::{DONE_MARK, RESULT_MARK, kernel::Kernel};

/// Boots the kernel under TCG (KVM hangs on these hosts) and checks every test binary's
/// exit status from the console.
///
/// One vCPU: the kernel patches its own text whenever a static key or static call flips
/// (attaching TC programs and tracepoints, ping enabling timestamps), and under multi-vCPU TCG
/// another vCPU can still run the transient int3 after the patch completed, which oopses
/// the kernel ("Oops: int3" in netif_rx_internal, seen once in a dozen suite runs).
pub fn boot(kernel: &Kernel, initramfs: &Path) -> Result<()> {
    const TIMEOUT: Duration = Duration::from_secs(40 * 60);
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "2048", "-smp", "1", "-nographic", "-no-reboot", "-kernel"])
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 panic=-1 rdinit=/init quiet loglevel=3"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    let mut results = Vec::new();
    let mut done = false;
    let mut booted_kernel = None;
    loop {
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(line) => {
                println!("[vm {}] {line}", kernel.release);
                if let Some(rest) = line.trim().strip_prefix(RESULT_MARK) {
                    let mut parts = rest.split_whitespace();
                    if let (Some(name), Some(code)) = (parts.next(), parts.next()) {
                        results.push((name.to_string(), code.to_string()));
                    }
                } else if line.trim() == DONE_MARK {
                    done = true;
                } else if let Some((_, release)) = line.split_once("PODTRACE-VM kernel ") {
                    // The console may prefix the first line with terminal escapes.
                    booted_kernel = Some(release.trim().to_string());
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if started.elapsed() > TIMEOUT {
            let _ = child.kill();
            bail!("timed out after {} s", TIMEOUT.as_secs());
        }
    }
    let _ = child.wait();
    if booted_kernel.as_deref() != Some(kernel.release.as_str()) {
        bail!("the VM did not report running {}", kernel.release);
    }
    if !done {
        bail!("the VM stopped before the suite finished");
    }
    let failed: Vec<String> = results.iter().filter(|(_, code)| code != "0").map(|(name, code)| format!("{name} (exit {code})")).collect();
    println!("xtask: VM {}: {} test binaries, {} failed", kernel.release, results.len(), failed.len());
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}
