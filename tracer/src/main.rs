use std::{io::Write as _, net::IpAddr, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use tracer::{
    follow::{self, FollowOptions},
    node::PathOverrides,
    preflight,
    probes::{self, AttachMode},
    report,
};
use tracer_common::{IPPROTO_TCP, IPPROTO_UDP};

/// Follow a pod's packets hop by hop through this Kubernetes node.
#[derive(Parser)]
#[command(name = "podtrace", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Discover the pod's path on this node, attach to every hop and report per hop.
    Follow(FollowArgs),
    /// Remove TC filters and clsact qdiscs left by a podtrace that was killed.
    Cleanup,
}

#[derive(clap::Args)]
struct FollowArgs {
    /// The pod IP(s) to follow; the path is discovered from the first.
    #[arg(required = true, value_name = "POD_IP")]
    pod_ips: Vec<String>,
    /// How long to trace, in seconds (default: until Ctrl-C).
    #[arg(long, short)]
    duration: Option<f64>,
    /// Only packets to or from this address.
    #[arg(long)]
    peer: Option<IpAddr>,
    /// Only packets with this source or destination port.
    #[arg(long)]
    port: Option<u16>,
    /// Only this protocol.
    #[arg(long, value_enum)]
    proto: Option<Proto>,
    /// Also trace this interface (repeatable).
    #[arg(long = "iface", value_name = "IFNAME")]
    add: Vec<String>,
    /// Do not trace this interface (repeatable).
    #[arg(long = "exclude-iface", value_name = "IFNAME")]
    exclude: Vec<String>,
    /// Report format.
    #[arg(long, short, value_enum, default_value_t = Output::Text)]
    output: Output,
    /// Print a line per packet per hop as it is seen.
    #[arg(long, short)]
    verbose: bool,
    /// How TC programs are attached.
    #[arg(long, value_enum, default_value_t = AttachMode::Auto)]
    attach: AttachMode,
    /// Packet-event ring buffer size in bytes (a power of two, at least one page).
    #[arg(long, default_value_t = 1 << 22)]
    ring_size: u32,
    /// Kernel-event (drops, retransmits, ICMP errors) ring buffer size in bytes (a power of
    /// two, at least one page).
    #[arg(long, default_value_t = probes::KERNEL_RING_BYTES)]
    kernel_ring_size: u32,
    /// Kernel BTF to read struct layouts and names from.
    #[arg(long, default_value = "/sys/kernel/btf/vmlinux")]
    btf: PathBuf,
    /// This node's tunnel endpoint address (default: where peers' VXLAN packets are sent).
    #[arg(long)]
    node_ip: Option<IpAddr>,
    /// How long a request may wait for its reply before it counts as unanswered, in ms.
    #[arg(long, default_value_t = 1000)]
    reply_timeout_ms: u64,
    /// The node name the report shows (in a debug pod, the Kubernetes node's name from the
    /// downward API; default: the host name).
    #[arg(long, env = "NODE_NAME")]
    node_name: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum Proto {
    Tcp,
    Udp,
    Icmp,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("podtrace: starting the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line: what failed and why, through every context layer.
            tracer::note!("podtrace: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Follow(args) => follow(args).await,
        Command::Cleanup => {
            preflight::check_privileges()?;
            let _lock = probes::StateLock::acquire()?;
            let swept = probes::sweep(None).await?;
            println!(
                "removed {} filter(s) and {} clsact qdisc(s){}",
                swept.filters.len(),
                swept.qdiscs.len(),
                if swept.filters.is_empty() && swept.qdiscs.is_empty() {
                    String::new()
                } else {
                    format!(": {}", swept.filters.iter().chain(&swept.qdiscs).cloned().collect::<Vec<_>>().join(", "))
                }
            );
            Ok(())
        }
    }
}

async fn follow(args: FollowArgs) -> Result<()> {
    let pod_ips = args.pod_ips.iter().map(|ip| preflight::parse_pod_ip(ip)).collect::<Result<Vec<_>>>()?;
    let duration = match args.duration {
        Some(secs) if !(secs > 0.0 && secs.is_finite()) => bail!("invalid --duration {secs}: must be a positive number of seconds"),
        Some(secs) => Some(Duration::from_secs_f64(secs)),
        None => None,
    };
    for (option, bytes) in [("--ring-size", args.ring_size), ("--kernel-ring-size", args.kernel_ring_size)] {
        if !bytes.is_power_of_two() || bytes < 4096 {
            bail!("invalid {option} {bytes}: must be a power of two of at least 4096");
        }
    }
    let proto = match args.proto {
        None => None,
        Some(Proto::Tcp) => Some(IPPROTO_TCP),
        Some(Proto::Udp) => Some(IPPROTO_UDP),
        Some(Proto::Icmp) => Some(preflight::icmp_protocol(&pod_ips)?),
    };
    preflight::check_privileges()?;
    preflight::check_btf(&args.btf)?;

    let options = FollowOptions {
        pod_ips,
        duration,
        peer: args.peer,
        port: args.port,
        proto,
        overrides: PathOverrides { add: args.add, exclude: args.exclude },
        attach_mode: args.attach,
        ring_bytes: args.ring_size,
        kernel_ring_bytes: args.kernel_ring_size,
        verbose: args.verbose,
        live_to_stderr: args.output == Output::Json,
        node_ip: args.node_ip,
        reply_timeout: Duration::from_millis(args.reply_timeout_ms),
        btf: args.btf,
        node: match args.node_name {
            Some(node_name) => node_name,
            None => std::fs::read_to_string("/proc/sys/kernel/hostname").context("reading the hostname")?.trim().to_string(),
        },
    };
    let followed = follow::follow(&options).await?;
    let text = match args.output {
        Output::Text => report::render_text(&followed.report),
        Output::Json => serde_json::to_string_pretty(&followed.report).context("serialising the report")? + "\n",
    };
    // Everything is detached by now; after SIGHUP stdout may be gone, which is no reason to
    // panic.
    let written = std::io::stdout().lock().write_all(text.as_bytes());
    if let Some(err) = followed.detach_error {
        return Err(err.context("detaching (the report above is complete)"));
    }
    written.context("writing the report")
}
