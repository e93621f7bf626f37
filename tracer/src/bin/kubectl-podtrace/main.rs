//! `kubectl podtrace <pod>`: runs `podtrace follow <pod-ip>` in a debug pod on the pod's node
//! and streams its report. kubectl runs it as a plugin (`kubectl-podtrace` on PATH). It runs on
//! an operator's workstation, so it uses no part of the tracer library: it shells out to
//! `kubectl`, with the caller's kubeconfig, context and credentials.

mod debug_pod;
mod kubectl;
mod target;

use std::{process::ExitCode, time::Duration};

use anyhow::{Context as _, Result};
use clap::Parser;
use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::debug_pod::DebugPod;

/// The image `cargo xtask image` builds for this version.
const DEFAULT_IMAGE: &str = concat!("podtrace:", env!("CARGO_PKG_VERSION"));

/// How long the report stream may end before the container's exit status shows in the pod.
const EXIT_STATUS_TIMEOUT: Duration = Duration::from_secs(30);

/// Follow a pod's packets hop by hop on its node: runs `podtrace follow <pod-ip>` in a debug pod
/// there (hostNetwork, hostPID, the eBPF capabilities) and streams the report.
#[derive(Parser)]
#[command(
    name = "kubectl-podtrace",
    version,
    after_help = "The pod's IP is its status.podIP; a dual-stack pod's other IPs (status.podIPs) are followed too.\n\
                  The report carries podtrace's stdout and stderr as one stream (the container's log).\n\n\
                  Example: kubectl podtrace web-0 -n shop -- --duration 30 --port 8080 --output json"
)]
struct Cli {
    /// The pod to follow.
    pod: String,
    /// The pod's namespace (default: the current context's).
    #[arg(short, long)]
    namespace: Option<String>,
    /// The namespace to create the debug pod in (default: the pod's).
    #[arg(long)]
    debug_namespace: Option<String>,
    /// The podtrace image.
    #[arg(long, default_value = DEFAULT_IMAGE)]
    image: String,
    /// Keep the debug pod after the report (by default it is deleted, also on Ctrl-C).
    #[arg(long)]
    keep: bool,
    /// How long the debug pod may take to start (image pull included), in seconds.
    #[arg(long, default_value_t = 120, value_name = "SECS")]
    start_timeout: u64,
    /// Options for `podtrace follow`, after `--` (e.g. `-- --duration 30 --port 8080`).
    #[arg(last = true, value_name = "FOLLOW_OPTIONS")]
    follow_options: Vec<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("kubectl-podtrace: starting the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(status) => status,
        Err(err) => {
            // One line: what failed and why, through every context layer.
            eprintln!("kubectl-podtrace: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<ExitCode> {
    // Listening from the start: a Ctrl-C must never kill the plugin before it has deleted the
    // debug pod. kubectl runs in its own process group, so the plugin alone receives it.
    let mut interrupts = Interrupts::listen()?;
    let target = match interrupts.or(target::inspect(&cli.pod, cli.namespace.as_deref())).await {
        Ok(target) => target?,
        Err(signal) => return Ok(interrupted_status(signal)),
    };
    let debug = DebugPod::new(&target, cli.debug_namespace.as_deref());
    eprintln!(
        "kubectl-podtrace: following pod {}/{} ({}) on node {} from debug pod {}",
        target.namespace,
        target.name,
        target.ips.join(", "),
        target.node,
        debug.id()
    );
    // Not interruptible: once kubectl has been asked to create the pod, the plugin has to know
    // whether it exists in order to delete it. A Ctrl-C meanwhile is handled right after.
    debug.create(&target, &cli.image, &cli.follow_options).await?;
    let outcome = interrupts.or(follow(&debug, Duration::from_secs(cli.start_timeout))).await;
    if cli.keep {
        eprintln!("kubectl-podtrace: kept debug pod {} (kubectl delete pod -n {} {})", debug.id(), debug.namespace, debug.name);
    } else if let Err(err) = debug.delete().await {
        eprintln!("kubectl-podtrace: {err:#}");
    }
    match outcome {
        Ok(status) => status,
        Err(signal) => Ok(interrupted_status(signal)),
    }
}

/// Starts the debug pod's trace, streams its report to stdout and returns podtrace's exit status.
async fn follow(debug: &DebugPod, start_timeout: Duration) -> Result<ExitCode> {
    debug.wait_until_started(start_timeout).await?;
    debug.stream_logs().await?;
    let status = debug.wait_for_exit(EXIT_STATUS_TIMEOUT).await?;
    // A container's exit code is a byte (128 + n after signal n); anything else is a failure.
    Ok(ExitCode::from(u8::try_from(status).unwrap_or(1)))
}

fn interrupted_status(signal: SignalKind) -> ExitCode {
    eprintln!("kubectl-podtrace: interrupted");
    // The shell's convention: 128 + the signal's number (130 for SIGINT).
    ExitCode::from(128 + u8::try_from(signal.as_raw_value()).unwrap_or(0))
}

/// SIGINT and SIGTERM, caught so that the debug pod is deleted before the plugin exits.
struct Interrupts {
    interrupt: Signal,
    terminate: Signal,
}

impl Interrupts {
    fn listen() -> Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt()).context("listening for SIGINT")?,
            terminate: signal(SignalKind::terminate()).context("listening for SIGTERM")?,
        })
    }

    /// Runs `work` to completion, unless SIGINT or SIGTERM arrives first (also before this call):
    /// then `work` is dropped, which kills the kubectl it runs, and the signal is returned.
    async fn or<T>(&mut self, work: impl Future<Output = T>) -> Result<T, SignalKind> {
        tokio::select! {
            value = work => Ok(value),
            _ = self.interrupt.recv() => Err(SignalKind::interrupt()),
            _ = self.terminate.recv() => Err(SignalKind::terminate()),
        }
    }
}
