//! One `podtrace follow` run, as a pipeline: read the kernel's layouts, discover the path,
//! attach the probes, collect events until the deadline or a signal, detach, diagnose, and
//! build the report. The event loop itself is `collect`.

mod collect;
mod live;
mod signals;

use std::{
    collections::{BTreeSet, HashMap},
    net::IpAddr,
    path::{Path as FsPath, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};
use tracer_common::FilterConfig;

use self::{
    collect::{Collected, Collector},
    live::{Destination, LiveLines},
    signals::Signals,
};
use crate::{
    diagnosis::{Diagnosis, Settings, TraceEnd},
    kernel::{btf::KernelBtf, layout, symbols::KernelSymbols, tracefs::TracepointFormats},
    node::{self, Path, PathOverrides, bond, netns},
    probes::{self, AttachMode, EventRing, KernelSources, LoadOptions, Owner, Probes, StateLock},
    report::{self, Report, RunFacts},
};

pub struct FollowOptions {
    pub pod_ips: Vec<IpAddr>,
    pub duration: Option<Duration>,
    pub peer: Option<IpAddr>,
    pub port: Option<u16>,
    pub proto: Option<u8>,
    pub overrides: PathOverrides,
    pub attach_mode: AttachMode,
    pub ring_bytes: u32,
    pub kernel_ring_bytes: u32,
    pub verbose: bool,
    /// Live lines go to stderr when stdout carries JSON.
    pub live_to_stderr: bool,
    pub node: String,
    pub node_ip: Option<IpAddr>,
    pub reply_timeout: Duration,
    pub btf: PathBuf,
}

/// The report, and whether detaching failed (the report stands either way).
pub struct Followed {
    pub report: Report,
    pub detach_error: Option<anyhow::Error>,
}

pub async fn follow(options: &FollowOptions) -> Result<Followed> {
    let (kernel, btf) = KernelFacts::read(&options.btf)?;
    let node = discover(options).await?;
    let mut signals = Signals::install()?;
    let attached = attach(options, &kernel, &btf, &node).await?;
    // Only attaching needs the BTF: freed before the trace, whose allocations then reuse its
    // memory rather than add to podtrace's peak.
    drop(btf);
    let run = collect(options, &node, attached, &mut signals).await?;
    diagnose_and_report(options, &kernel, &node.path, run).await
}

/// Turns what a run collected into findings and the report, both about the path as it is at
/// the end: bonds can fail over mid-trace.
async fn diagnose_and_report(options: &FollowOptions, kernel: &KernelFacts, path: &Path, run: Run<'_>) -> Result<Followed> {
    let final_path = bond::refresh_bond_state(path).await?;
    let Collected { correlator, diagnosis, vanished, link_drops, decode_errors, .. } = run.collected;
    // Only drops need function names, and reading kallsyms takes a while.
    let symbols = if diagnosis.has_drops() { KernelSymbols::load().ok() } else { None };
    let outcome = diagnosis.finish(TraceEnd {
        end_ns: run.end_ns,
        counters: run.counters,
        ring_bytes: options.ring_bytes,
        kernel_ring_bytes: options.kernel_ring_bytes,
        decode_errors: &decode_errors,
        recursion_misses: run.recursion_misses,
        icmp_send_observed: run.sources.icmp_send_attached,
        link_drops: &link_drops,
        final_path: &final_path,
        drop_reasons: &kernel.drop_reasons,
        symbols: symbols.as_ref(),
        evicted_in_transit: correlator.evicted_in_transit,
    });
    let facts = RunFacts {
        node: options.node.clone(),
        attach_mode: run.attach_mode.to_string(),
        kernel_sources: run.sources,
        duration_s: run.duration_s,
        counters: run.counters,
        recursion_misses: run.recursion_misses,
        decode_errors,
        vanished: &vanished,
    };
    Ok(Followed { report: report::build(&final_path, &correlator, facts, outcome), detach_error: run.detach_error })
}

/// What the running kernel says about itself: the layout the kernel programs read memory
/// with, and its drop reason names.
struct KernelFacts {
    formats: TracepointFormats,
    layout: tracer_common::KernelLayout,
    drop_reasons: HashMap<i64, String>,
}

impl KernelFacts {
    /// The facts, and the BTF as aya reads it, for attaching the tp_btf programs.
    fn read(btf_file: &FsPath) -> Result<(Self, aya::Btf)> {
        let formats = TracepointFormats::read()?;
        // Our own reading of the BTF is dropped before aya parses it again for the loader:
        // both at once would set podtrace's peak memory.
        let (layout, drop_reasons) = {
            let mut kernel_btf = KernelBtf::from_file(btf_file)?;
            // Conntrack's structs are in its module's BTF where it is a module (Debian's); the
            // module is loaded wherever the node NATs.
            let conntrack = btf_file.with_file_name("nf_conntrack");
            if conntrack.exists() {
                kernel_btf.add_module(&conntrack)?;
            }
            // Kernels before 5.17 have no drop reasons: their drops are named "unknown".
            let drop_reasons = kernel_btf.enum_values("skb_drop_reason", "SKB_DROP_REASON_").unwrap_or_default();
            (layout::build(&kernel_btf, &formats, &drop_reasons)?, drop_reasons)
        };
        let btf = aya::Btf::parse_file(btf_file, aya::Endianness::default())
            .map_err(|err| anyhow!("unreadable BTF at {}: {err}", btf_file.display()))?;
        Ok((Self { formats, layout, drop_reasons }, btf))
    }
}

/// The pod's path and the network namespaces whose kernel events count.
struct NodeFacts {
    path: Path,
    namespaces: BTreeSet<u32>,
    own_netns: u32,
}

async fn discover(options: &FollowOptions) -> Result<NodeFacts> {
    let mut path = node::discover(&options.pod_ips, &options.overrides).await?;
    // A --peer that is a local pod behind the same bridge: its veth is where the followed
    // pod's packets to it leave the path.
    if let Some(peer) = options.peer {
        node::discovery::add_local_peer(&mut path, peer).await;
    }
    for warning in &path.warnings {
        crate::note!("podtrace: warning: {warning}");
    }
    crate::note!("{}", path.describe().trim_end());
    let namespaces = netns::node_namespaces(&path.pod_netnsids).await?;
    Ok(NodeFacts { path, namespaces, own_netns: netns::own_inode()? })
}

struct Attached {
    probes: Probes,
    events: EventRing,
    kernel_events: EventRing,
    sources: KernelSources,
}

/// Sweeps what killed runs left, loads the programs and attaches them to every hop and
/// tracepoint; on failure, detaches whatever was attached. Holds the state lock throughout,
/// so another run's sweep never meets a half-attached, not yet recorded filter of ours.
async fn attach(options: &FollowOptions, kernel: &KernelFacts, btf: &aya::Btf, node: &NodeFacts) -> Result<Attached> {
    let lock = StateLock::acquire()?;
    let owner = Owner::register()?;
    let swept = probes::sweep(Some(&owner)).await.context("sweeping leftovers of earlier runs")?;
    if !swept.filters.is_empty() || !swept.qdiscs.is_empty() {
        crate::note!(
            "podtrace: removed leftovers of an earlier run: filters [{}], clsact qdiscs [{}]",
            swept.filters.join(", "),
            swept.qdiscs.join(", ")
        );
    }
    let filter = FilterConfig {
        peer: options.peer.map(probes::mapped).unwrap_or_default(),
        has_peer: u8::from(options.peer.is_some()),
        proto: options.proto.unwrap_or(0),
        port: options.port.unwrap_or(0),
        // The kernel programs and the userspace parse treat the same ports as VXLAN.
        vxlan_ports: node.path.vxlan_ports(),
        ..Default::default()
    };
    let load = LoadOptions { filter, layout: kernel.layout, ring_bytes: options.ring_bytes, kernel_ring_bytes: options.kernel_ring_bytes };
    let mut probes = Probes::load(&load, options.attach_mode)?;
    probes.set_owner(owner);
    let attached = async {
        for ip in &options.pod_ips {
            probes.follow(*ip)?;
        }
        for hop in node.path.hops() {
            probes.attach(hop).await?;
        }
        let sources = probes.attach_kernel_events(btf, &node.namespaces, &kernel.formats)?;
        Ok::<_, anyhow::Error>((probes.take_events()?, probes.take_kernel_events()?, sources))
    }
    .await;
    drop(lock);
    match attached {
        Ok((events, kernel_events, sources)) => Ok(Attached { probes, events, kernel_events, sources }),
        Err(err) => {
            probes.detach().await.ok();
            Err(err)
        }
    }
}

/// What the event loop and the kernel's counters gave.
struct Run<'a> {
    collected: Collected<'a>,
    counters: probes::Counters,
    /// Tracepoint runs the kernel skipped (None: this kernel does not say).
    recursion_misses: Option<u64>,
    sources: KernelSources,
    attach_mode: &'static str,
    duration_s: f64,
    /// CLOCK_MONOTONIC when the trace ended, on the same clock as the events.
    end_ns: u64,
    /// Detaching failed: the report still stands, but something may be left behind.
    detach_error: Option<anyhow::Error>,
}

/// Runs the event loop, then detaches (also when the loop failed).
async fn collect<'a>(options: &FollowOptions, node: &'a NodeFacts, attached: Attached, signals: &mut Signals) -> Result<Run<'a>> {
    let Attached { probes, events, kernel_events, sources } = attached;
    let attach_mode = match probes.mode() {
        AttachMode::Clsact => "clsact",
        _ => "tcx",
    };
    let hops = node.path.hops().count();
    crate::note!(
        "podtrace: tracing {hops} hops ({} programs, {attach_mode}) and kernel drops, retransmits and ICMP errors in {} namespaces{}; Ctrl-C to stop",
        hops * 2,
        node.namespaces.len(),
        options.duration.map(|d| format!(" for {} s", d.as_secs_f64())).unwrap_or_default()
    );
    let started = Instant::now();
    let settings =
        Settings { node_ip: options.node_ip, reply_timeout_ns: options.reply_timeout.as_nanos() as u64, own_netns: node.own_netns };
    let destination = match (options.verbose, options.live_to_stderr) {
        (false, _) => None,
        (true, false) => Some(Destination::Stdout),
        (true, true) => Some(Destination::Stderr),
    };
    let live = LiveLines::new(&node.path, destination);
    let mut collector = Collector::new(&node.path, Diagnosis::new(&node.path, settings), live, node.path.vxlan_ports());
    let counted = collector.run(events, kernel_events, options.duration, signals, || probes.counters()).await;
    let duration_s = started.elapsed().as_secs_f64();
    let end_ns = monotonic_ns();
    let recursion_misses = probes.recursion_misses();
    let detached = probes.detach().await;
    let collected = collector.finish();
    Ok(Run {
        counters: counted?.with_decoded(collected.decoded),
        collected,
        recursion_misses: recursion_misses?,
        sources,
        attach_mode,
        duration_s,
        end_ns,
        detach_error: detached.err(),
    })
}

/// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `now` is a valid, writable timespec for the duration of the call.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}
