//! One `podtrace follow` run: discover, attach, collect events until the deadline or a
//! signal, detach, and build the report.

use std::{
    collections::HashMap,
    io::Write as _,
    net::IpAddr,
    path::{Path as FsPath, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{Signal, SignalKind, signal},
};
use tracer_common::FilterConfig;

use crate::{
    attach::{self, AttachMode, LoadOptions, Probes, Tracepoints},
    correlate::{Correlator, Limits, Sighting},
    decode::{self, Packet},
    discovery::{self, LinkDrops, Path, PathOverrides, with_rtnetlink},
    findings::{Diagnosis, Finish, Settings},
    kernel_btf::KernelBtf,
    layout::{self, TRACEFS, TracepointFormat},
    netns, preflight,
    report::{self, Report, RunFacts},
    symbols::KernelSymbols,
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
    pub verbose: bool,
    /// Live lines go to stderr when stdout carries JSON.
    pub live_to_stderr: bool,
    pub node: String,
    pub node_ip: Option<IpAddr>,
    pub reply_timeout: Duration,
    pub btf: PathBuf,
}

pub async fn follow(options: &FollowOptions) -> Result<Report> {
    let kernel_btf = KernelBtf::from_file(&options.btf)?;
    let aya_btf = aya::Btf::parse_file(&options.btf, aya::Endianness::default())
        .map_err(|err| anyhow!("unreadable BTF at {}: {err}", options.btf.display()))?;
    let (tracepoints, formats) = read_tracepoint_formats()?;
    let kernel_layout = layout::build(&kernel_btf, formats[0].as_ref(), formats[1].as_ref(), formats[2].as_ref())?;
    let drop_reasons = kernel_btf.enum_values("skb_drop_reason", "SKB_DROP_REASON_")?;

    let path = discover_all(&options.pod_ips, &options.overrides).await?;
    for warning in &path.warnings {
        eprintln!("podtrace: warning: {warning}");
    }
    eprint!("{}", describe_path(&path));
    let namespaces = netns::node_namespaces(&path.pod_netnsids).await?;
    let own_netns = netns::own_inode()?;

    let swept = attach::sweep().await.context("sweeping leftovers of earlier runs")?;
    if !swept.filters.is_empty() || !swept.qdiscs.is_empty() {
        eprintln!(
            "podtrace: removed leftovers of an earlier run: filters [{}], clsact qdiscs [{}]",
            swept.filters.join(", "),
            swept.qdiscs.join(", ")
        );
    }

    // Registered before attaching, so a signal during attach still ends in a clean detach.
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;

    let filter = FilterConfig {
        peer: options.peer.map(attach::mapped).unwrap_or_default(),
        has_peer: u8::from(options.peer.is_some()),
        proto: options.proto.unwrap_or(0),
        port: options.port.unwrap_or(0),
        vxlan_ports: [8472, 4789],
    };
    let load = LoadOptions { filter, layout: kernel_layout, ring_bytes: options.ring_bytes };
    let mut probes = Probes::load(&load, options.attach_mode)?;
    let attached = attach_all(&mut probes, options, &path).await.and_then(|()| {
        let sources = probes.attach_kernel_events(&aya_btf, &namespaces, &tracepoints)?;
        Ok((probes.take_events()?, probes.take_kernel_events()?, sources))
    });
    let (events, kernel_events, sources) = match attached {
        Ok(attached) => attached,
        Err(err) => {
            probes.detach().await.ok();
            return Err(err);
        }
    };
    let mode = match probes.mode() {
        AttachMode::Clsact => "clsact",
        _ => "tcx",
    };
    eprintln!(
        "podtrace: tracing {} hops ({} programs, {mode}) and kernel drops, retransmits and ICMP errors in {} namespaces{}; Ctrl-C to stop",
        path.hops.len(),
        path.hops.len() * 2,
        namespaces.len(),
        options.duration.map(|d| format!(" for {} s", d.as_secs_f64())).unwrap_or_default()
    );

    let started = Instant::now();
    let settings = Settings { node_ip: options.node_ip, reply_timeout_ns: options.reply_timeout.as_nanos() as u64, own_netns };
    let mut collector = Collector::new(options, &path, settings);
    let collected = collector.run(events, kernel_events, options.duration, &mut sigint, &mut sigterm).await;
    let duration_s = started.elapsed().as_secs_f64();
    let end_ns = monotonic_ns();
    let counters = probes.counters();
    let detached = probes.detach().await;
    collected?;
    detached.context("detaching")?;
    let counters = counters?;

    let Collector { correlator, diagnosis, vanished, link_drops, .. } = collector;
    // Bonds can fail over mid-trace: findings and the report use their state at the end.
    let final_path = discovery::refresh_bond_state(&path).await?;
    let symbols = if diagnosis.has_drops() { KernelSymbols::load().ok() } else { None };
    let outcome = diagnosis.finish(Finish {
        end_ns,
        counters,
        ring_bytes: options.ring_bytes,
        link_drops: &link_drops,
        final_path: &final_path,
        drop_reasons: &drop_reasons,
        symbols: symbols.as_ref(),
    });
    let facts = RunFacts {
        node: options.node.clone(),
        attach_mode: mode.to_string(),
        kernel_sources: sources,
        duration_s,
        counters,
        vanished: &vanished,
    };
    Ok(report::build(&final_path, &correlator, facts, outcome))
}

/// Reads the tracefs formats of the tracepoints podtrace uses; a missing one disables its
/// source instead of failing the trace.
fn read_tracepoint_formats() -> Result<(Tracepoints, [Option<TracepointFormat>; 3])> {
    preflight::ensure_tracefs()?;
    let tracefs = FsPath::new(TRACEFS);
    let read = |category: &str, name: &str| match TracepointFormat::read(tracefs, category, name) {
        Ok(format) => Some(format),
        Err(err) => {
            log::info!("{category}:{name} unavailable: {err:#}");
            None
        }
    };
    let formats = [read("skb", "kfree_skb"), read("tcp", "tcp_retransmit_skb"), read("icmp", "icmp_send")];
    let tracepoints =
        Tracepoints { kfree_skb: formats[0].is_some(), tcp_retransmit_skb: formats[1].is_some(), icmp_send: formats[2].is_some() };
    Ok((tracepoints, formats))
}

/// CLOCK_MONOTONIC, the clock of `bpf_ktime_get_ns`.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: valid pointer to a timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// The path of the first IP, extended by the hops of any further followed IPs.
async fn discover_all(ips: &[IpAddr], overrides: &PathOverrides) -> Result<Path> {
    let (first, rest) = ips.split_first().context("no pod IP given")?;
    let mut path = discovery::discover(*first, overrides).await?;
    for ip in rest {
        let more = discovery::discover(*ip, overrides).await?;
        for hop in more.hops {
            if !path.hops.iter().any(|known| known.ifindex == hop.ifindex) {
                path.hops.push(hop);
            }
        }
        path.warnings.extend(more.warnings);
        path.pod_netnsids.extend(more.pod_netnsids);
    }
    Ok(path)
}

async fn attach_all(probes: &mut Probes, options: &FollowOptions, path: &Path) -> Result<()> {
    for ip in &options.pod_ips {
        probes.follow(*ip)?;
    }
    for hop in &path.hops {
        probes.attach(hop).await?;
    }
    Ok(())
}

fn describe_path(path: &Path) -> String {
    let mut text = format!("podtrace: path of {} ({:?} pod):\n", path.pod_ip, path.locality);
    for hop in &path.hops {
        text.push_str(&format!(
            "  {:<16} {:<10} ifindex {:<4} mtu {:<5} from-pod {}\n",
            hop.ifname,
            hop.kind.to_string(),
            hop.ifindex,
            hop.mtu,
            hop.from_pod
        ));
    }
    text
}

/// Reads events and feeds the correlator and the diagnosis until the trace ends.
struct Collector<'a> {
    correlator: Correlator,
    diagnosis: Diagnosis<'a>,
    path: &'a Path,
    names: HashMap<u32, String>,
    verbose: bool,
    live_to_stderr: bool,
    vanished: Vec<u32>,
    /// Each hop's drop counters when the trace started, then how much they grew.
    link_drops: HashMap<u32, LinkDrops>,
    decode_errors: u64,
}

impl<'a> Collector<'a> {
    fn new(options: &FollowOptions, path: &'a Path, settings: Settings) -> Self {
        Self {
            correlator: Correlator::new(options.pod_ips.clone(), Limits::default()),
            diagnosis: Diagnosis::new(path, settings),
            path,
            names: path.hops.iter().map(|hop| (hop.ifindex, hop.ifname.clone())).collect(),
            verbose: options.verbose,
            live_to_stderr: options.live_to_stderr,
            vanished: Vec::new(),
            link_drops: HashMap::new(),
            decode_errors: 0,
        }
    }

    async fn run(
        &mut self,
        events: RingBuf<MapData>,
        kernel_events: RingBuf<MapData>,
        duration: Option<Duration>,
        sigint: &mut Signal,
        sigterm: &mut Signal,
    ) -> Result<()> {
        // SAFETY: each ring buffer owns its map fd, which stays open as long as its AsyncFd.
        let mut events = unsafe { AsyncFd::register(events) }.map_err(|err| anyhow!("polling the ring buffer: {err}"))?;
        let mut kernel_events =
            unsafe { AsyncFd::register(kernel_events) }.map_err(|err| anyhow!("polling the kernel ring buffer: {err}"))?;
        let result =
            with_rtnetlink(async |handle| self.watch(handle, &mut events, &mut kernel_events, duration, sigint, sigterm).await).await;
        // Whatever the kernel wrote before we stopped still belongs in the report.
        self.drain_packets(events.get_mut());
        self.drain_kernel(kernel_events.get_mut());
        if self.decode_errors > 0 {
            eprintln!("podtrace: warning: {} ring records could not be decoded", self.decode_errors);
        }
        result
    }

    /// Reads events until the deadline, a signal, or every hop gone. The hops' drop counters
    /// are sampled at the start, every 500 ms (which notices vanished hops) and at the end.
    async fn watch(
        &mut self,
        handle: &rtnetlink::Handle,
        events: &mut AsyncFd<RingBuf<MapData>>,
        kernel_events: &mut AsyncFd<RingBuf<MapData>>,
        duration: Option<Duration>,
        sigint: &mut Signal,
        sigterm: &mut Signal,
    ) -> Result<()> {
        let deadline = async {
            match duration {
                Some(duration) => tokio::time::sleep(duration).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        let baseline = self.sample_links(handle).await?;
        let mut link_check = tokio::time::interval(Duration::from_millis(500));
        let result = loop {
            tokio::select! {
                guard = events.readable_mut() => match guard {
                    Ok(mut guard) => {
                        self.drain_packets(guard.get_inner_mut());
                        guard.clear_ready();
                    }
                    Err(err) => break Err(err).context("waiting for events"),
                },
                guard = kernel_events.readable_mut() => match guard {
                    Ok(mut guard) => {
                        self.drain_kernel(guard.get_inner_mut());
                        guard.clear_ready();
                    }
                    Err(err) => break Err(err).context("waiting for kernel events"),
                },
                _ = &mut deadline => break Ok(()),
                _ = sigint.recv() => break Ok(()),
                _ = sigterm.recv() => break Ok(()),
                _ = link_check.tick() => {
                    if let Err(err) = self.sample_links(handle).await {
                        break Err(err);
                    }
                    if self.vanished.len() == self.path.hops.len() {
                        eprintln!("podtrace: every traced interface is gone; ending the trace");
                        break Ok(());
                    }
                }
            }
        };
        let last = match self.sample_links(handle).await {
            Ok(last) => last,
            Err(err) => return result.and(Err(err)),
        };
        self.link_drops = last
            .into_iter()
            .filter_map(|(index, now)| {
                let before = baseline.get(&index)?;
                Some((
                    index,
                    LinkDrops {
                        rx_dropped: now.rx_dropped.saturating_sub(before.rx_dropped),
                        rx_length_errors: now.rx_length_errors.saturating_sub(before.rx_length_errors),
                        tx_dropped: now.tx_dropped.saturating_sub(before.tx_dropped),
                    },
                ))
            })
            .collect();
        result
    }

    fn drain_packets(&mut self, ring: &mut RingBuf<MapData>) {
        while let Some(item) = ring.next() {
            match decode::decode(&item) {
                Ok(packet) => {
                    let sighting = self.correlator.observe(&packet);
                    self.diagnosis.observe_packet(&packet, sighting.as_ref());
                    if self.verbose {
                        self.print_live(&packet, sighting.as_ref());
                    }
                }
                Err(_) => self.decode_errors += 1,
            }
        }
    }

    fn drain_kernel(&mut self, ring: &mut RingBuf<MapData>) {
        while let Some(item) = ring.next() {
            match decode::decode_kernel(&item) {
                Ok(record) => self.diagnosis.observe_kernel(&record),
                Err(_) => self.decode_errors += 1,
            }
        }
    }

    /// Reads every hop's drop counters, noticing hops that disappeared.
    async fn sample_links(&mut self, handle: &rtnetlink::Handle) -> Result<HashMap<u32, LinkDrops>> {
        let mut sample = HashMap::new();
        for hop in &self.path.hops {
            if self.vanished.contains(&hop.ifindex) {
                continue;
            }
            match discovery::link_drops(handle, hop.ifindex).await? {
                Some(drops) => {
                    sample.insert(hop.ifindex, drops);
                }
                None => {
                    eprintln!(
                        "podtrace: warning: interface {} (ifindex {}) disappeared; tracing continues on the other hops",
                        hop.ifname, hop.ifindex
                    );
                    self.vanished.push(hop.ifindex);
                }
            }
        }
        Ok(sample)
    }

    fn print_live(&self, packet: &Packet, sighting: Option<&Sighting>) {
        let name = self.names.get(&packet.ifindex).map_or("?", String::as_str);
        let mut line = format!(
            "{:>15.6} {:<12} {:<7} len {:<5} {}",
            packet.ktime_ns as f64 / 1e9,
            name,
            packet.direction.to_string(),
            packet.skb_len,
            packet.pod_layer().describe()
        );
        if let Some(vni) = packet.vni {
            line.push_str(&format!(" (vxlan vni {vni} {} > {})", packet.outer.src, packet.outer.dst));
        }
        if packet.is_gso() {
            line.push_str(&format!(" gso {}x{}", packet.gso_segs, packet.gso_size));
        }
        if let Some((previous, latency_ns)) = sighting.and_then(|s| s.previous) {
            let from = self.names.get(&previous.ifindex).map_or("?", String::as_str);
            line.push_str(&format!(" +{:.1}µs from {from} {}", latency_ns as f64 / 1000.0, previous.direction));
        }
        if self.live_to_stderr {
            eprintln!("{line}");
        } else {
            let mut stdout = std::io::stdout().lock();
            // A closed stdout (e.g. `| head`) must not abort the trace before detaching.
            let _ = writeln!(stdout, "{line}");
        }
    }
}
