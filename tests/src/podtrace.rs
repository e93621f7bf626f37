//! Runs the podtrace binary as a user would: `ip netns exec <node> podtrace …`.

use std::{
    io::{BufRead as _, BufReader, Read as _},
    path::PathBuf,
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, Ordering},
        mpsc,
    },
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

/// How podtrace is run, always inside a node's network namespace.
#[derive(Clone, Copy)]
pub enum Launcher<'a> {
    /// The binary, with `ip netns exec <node>`: as on the node itself.
    Binary,
    /// The OCI image, with podman in the node's namespace and the mounts a privileged debug pod
    /// has (see deploy/podtrace-debug.yaml).
    Image(&'a str),
}

impl Launcher<'_> {
    /// The command, and the container's name when there is one (to remove it however the
    /// run ends).
    fn command(self, netns: &str, args: &[&str]) -> (Command, Option<String>) {
        match self {
            Self::Binary => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns]).arg(binary()).args(args);
                (command, None)
            }
            Self::Image(image) => {
                static CONTAINERS: AtomicU32 = AtomicU32::new(0);
                let name = format!("podtrace-test-{}-{}", std::process::id(), CONTAINERS.fetch_add(1, Ordering::Relaxed));
                let mut command = Command::new("podman");
                // runc, not crun (which fails on this machine's cgroups); without the ulimits
                // runc fails on setrlimit.
                command.args(["--runtime", "runc", "run", "--rm", "--name", &name, "--privileged", "--pid", "host"]);
                command.args(["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]);
                command.arg(format!("--network=ns:/run/netns/{netns}"));
                for (host, container) in [
                    ("/sys/kernel/btf", "/sys/kernel/btf:ro"),
                    ("/sys/fs/bpf", "/sys/fs/bpf"),
                    ("/sys/kernel/tracing", "/sys/kernel/tracing"),
                    // Pod namespaces pinned by the CNI runtime (containerd's cni-…); the lab's
                    // pods have no processes, so /proc alone would not show them.
                    ("/run/netns", "/run/netns:ro"),
                ] {
                    command.arg("--volume").arg(format!("{host}:{container}"));
                }
                command.arg(image).args(args);
                (command, Some(name))
            }
        }
    }
}

/// The image to test: `PODTRACE_IMAGE`, else `podtrace:<version>` as `cargo xtask image` tags
/// it. `None` where podman is not installed (the VM suite), so the container tests skip.
pub fn image() -> Result<Option<String>> {
    if Command::new("podman").arg("--version").output().is_err() {
        return Ok(None);
    }
    let image = std::env::var("PODTRACE_IMAGE").unwrap_or_else(|_| format!("podtrace:{}", env!("CARGO_PKG_VERSION")));
    let exists = Command::new("podman").args(["image", "exists", &image]).status().context("running podman image exists")?;
    if !exists.success() {
        bail!("image {image} is not built: run `cargo xtask image` (or set PODTRACE_IMAGE)");
    }
    Ok(Some(image))
}

pub struct Podtrace {
    child: Option<Child>,
    container: Option<String>,
    stderr: Arc<Mutex<String>>,
    stderr_done: mpsc::Receiver<()>,
    stdout: Option<std::thread::JoinHandle<String>>,
}

impl Podtrace {
    /// Starts podtrace in `netns` and waits until it has attached everything (its
    /// "podtrace: tracing" line).
    pub fn start(netns: &str, args: &[&str]) -> Result<Self> {
        Self::launch(Launcher::Binary, netns, args)
    }

    pub fn launch(launcher: Launcher, netns: &str, args: &[&str]) -> Result<Self> {
        let (mut command, container) = launcher.command(netns, args);
        let mut child = command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().context("starting podtrace")?;
        let mut stdout = child.stdout.take().context("podtrace stdout")?;
        let stdout = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stdout.read_to_string(&mut text);
            text
        });
        let stderr_pipe = child.stderr.take().context("podtrace stderr")?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let (done_tx, stderr_done) = mpsc::channel();
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
            let _ = done_tx.send(());
        });
        let podtrace = Self { child: Some(child), container, stderr, stderr_done, stdout: Some(stdout) };
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
    /// podtrace's own; or to the podman client, which passes it on to the container).
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
        // The stderr reader finishes when the pipe closes, just after exit (bounded, in case
        // something podtrace started still holds the pipe).
        if self.stderr_done.recv_timeout(Duration::from_secs(10)).is_err() {
            bail!("podtrace's stderr stayed open 10 s after it exited");
        }
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
        // Killing the podman client does not stop its container.
        if let Some(name) = self.container.take() {
            let _ = Command::new("podman").args(["rm", "--force", "--ignore", &name]).output();
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
