//! Runs the podtrace binary as a user would: `ip netns exec <node> podtrace …`.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

/// `PODTRACE_BIN`, else the workspace's debug build.
pub fn binary() -> PathBuf {
    std::env::var_os("PODTRACE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("target").join("debug").join("podtrace"))
}

pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_str(&self.stdout).with_context(|| format!("podtrace printed no JSON report; stderr:\n{}", self.stderr))
    }
}

pub struct Podtrace {
    child: Option<Child>,
    stderr: Arc<Mutex<String>>,
    stdout: Option<std::thread::JoinHandle<String>>,
}

impl Podtrace {
    /// Starts podtrace in `netns` and waits until it has attached everything (its
    /// "podtrace: tracing" line).
    pub fn start(netns: &str, args: &[&str]) -> Result<Self> {
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns])
            .arg(binary())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting podtrace")?;
        let mut stdout = child.stdout.take().context("podtrace stdout")?;
        let stdout = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            text
        });
        let stderr_pipe = child.stderr.take().context("podtrace stderr")?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let collected = Arc::clone(&stderr);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
                if line.starts_with("podtrace: tracing") {
                    let _ = ready_tx.send(());
                }
                let mut text = collected.lock().expect("stderr lock");
                text.push_str(&line);
                text.push('\n');
            }
        });
        let podtrace = Self { child: Some(child), stderr, stdout: Some(stdout) };
        match ready_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(()) => Ok(podtrace),
            Err(_) => {
                let finished = podtrace.wait()?;
                bail!("podtrace never started tracing ({}):\n{}", finished.status, finished.stderr)
            }
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Sends `signal` to podtrace (through `ip netns exec`, which execs it, so the pid is
    /// podtrace's own).
    pub fn signal(&self, signal: i32) {
        // SAFETY: plain syscall on our child.
        unsafe { libc::kill(self.pid() as i32, signal) };
    }

    /// Ctrl-C, then the report.
    pub fn finish(self) -> Result<Finished> {
        self.signal(libc::SIGINT);
        self.wait()
    }

    /// Waits for podtrace to exit by itself (e.g. after `--duration`), at most 60 s.
    pub fn wait(mut self) -> Result<Finished> {
        let mut child = self.child.take().context("podtrace already finished")?;
        let mut waited = Duration::ZERO;
        let status = loop {
            if let Some(status) = child.try_wait().context("waiting for podtrace")? {
                break status;
            }
            if waited > Duration::from_secs(60) {
                let _ = child.kill();
                bail!("podtrace did not exit within 60 s");
            }
            std::thread::sleep(Duration::from_millis(50));
            waited += Duration::from_millis(50);
        };
        let stdout = self.stdout.take().context("stdout reader")?.join().unwrap_or_default();
        // The stderr reader finishes when the pipe closes, just after exit.
        std::thread::sleep(Duration::from_millis(100));
        let stderr = self.stderr.lock().expect("stderr lock").clone();
        Ok(Finished { status, stdout, stderr })
    }
}

impl Drop for Podtrace {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs podtrace to completion (for commands that fail fast or end by `--duration`).
pub fn run_podtrace(netns: &str, args: &[&str]) -> Result<Finished> {
    let output = Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running podtrace")?;
    Ok(Finished {
        status: output.status,
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    })
}
