//! Running `kubectl` (the first on PATH, as kubectl itself finds its plugins).

use std::process::{ExitStatus, Stdio};

use anyhow::{Context as _, Result, bail};
use tokio::{io::AsyncWriteExt as _, process::Command};

/// What one kubectl command printed.
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// kubectl's own message for a failure, on one line, without the log lines (`E1129
    /// 12:29:51.941652 …`) its client libraries print on the way.
    pub fn error(&self) -> String {
        let is_log_line = |line: &str| {
            let mut chars = line.chars();
            chars.next().is_some_and(|level| "IWEF".contains(level)) && chars.take(4).filter(char::is_ascii_digit).count() == 4
        };
        let message = self.stderr.lines().filter(|line| !is_log_line(line)).flat_map(str::split_whitespace).collect::<Vec<_>>().join(" ");
        if message.is_empty() { format!("kubectl exited with {}", self.status) } else { message }
    }
}

fn command(args: &[&str]) -> Command {
    let mut command = Command::new("kubectl");
    command
        .args(args)
        // Its own process group, so that a Ctrl-C in the terminal reaches the plugin alone and
        // the plugin decides what to stop (and deletes the debug pod first).
        .process_group(0)
        // Dropping a command's future (on Ctrl-C) stops it.
        .kill_on_drop(true);
    command
}

/// Runs `kubectl <args>` to completion with `stdin` as its input; the caller judges its status.
pub async fn run(args: &[&str], stdin: Option<&str>) -> Result<Output> {
    let mut child = command(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running kubectl (is it on PATH?)")?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).await.context("writing to kubectl's stdin")?;
        // Closing stdin ends kubectl's input.
        drop(pipe);
    }
    let output = child.wait_with_output().await.context("waiting for kubectl")?;
    Ok(Output {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}

/// Runs `kubectl <args>` with its stdout going straight to ours (a stream, as it arrives).
pub async fn stream(args: &[&str]) -> Result<()> {
    let child = command(args)
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::piped())
        .spawn()
        .context("running kubectl (is it on PATH?)")?;
    let output = child.wait_with_output().await.context("waiting for kubectl")?;
    if !output.status.success() {
        let output = Output { status: output.status, stdout: String::new(), stderr: String::from_utf8_lossy(&output.stderr).into_owned() };
        bail!("{}", output.error());
    }
    Ok(())
}
