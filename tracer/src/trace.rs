//! One `podtrace follow` run: discover, attach, collect events until the deadline or a
//! signal, detach, and build the report.

use std::{
    collections::HashMap,
    io::Write as _,
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use tokio::{
    io::unix::AsyncFd,
    signal::unix::{SignalKind, signal},
};
use tracer_common::FilterConfig;

use crate::{
    attach::{self, AttachMode, LoadOptions, Probes},
    correlate::{Correlator, Limits, Sighting},
    decode::{self, Packet},
    discovery::{self, Path, PathOverrides},
    findings,
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
    pub verbose: bool,
    /// Live lines go to stderr when stdout carries JSON.
    pub live_to_stderr: bool,
    pub node: String,
}

pub async fn follow(options: &FollowOptions) -> Result<Report> {
    let path = discover_all(&options.pod_ips, &options.overrides).await?;
    for warning in &path.warnings {
        eprintln!("podtrace: warning: {warning}");
    }
    eprint!("{}", describe_path(&path));

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
        peer: options.peer.map(mapped).unwrap_or_default(),
        has_peer: u8::from(options.peer.is_some()),
        proto: options.proto.unwrap_or(0),
        port: options.port.unwrap_or(0),
        vxlan_ports: [8472, 4789],
    };
    let mut probes = Probes::load(&LoadOptions { filter, ring_bytes: options.ring_bytes }, options.attach_mode)?;
    let attached = attach_all(&mut probes, options, &path);
    let events = match attached.and_then(|()| probes.take_events()) {
        Ok(events) => events,
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
        "podtrace: tracing {} hops ({} programs, {mode}){}; Ctrl-C to stop",
        path.hops.len(),
        path.hops.len() * 2,
        options.duration.map(|d| format!(" for {} s", d.as_secs_f64())).unwrap_or_default()
    );

    let started = Instant::now();
    let mut collector = Collector::new(options, &path);
    let collected = collector.run(events, options.duration, &mut sigint, &mut sigterm).await;
    let duration_s = started.elapsed().as_secs_f64();
    let counters = probes.counters();
    let detached = probes.detach().await;
    collected?;
    detached.context("detaching")?;
    let counters = counters?;

    let findings = findings::lost_events(&counters, options.ring_bytes).into_iter().collect();
    let facts = RunFacts {
        node: options.node.clone(),
        attach_mode: mode.to_string(),
        duration_s,
        counters,
        vanished: &collector.vanished,
    };
    Ok(report::build(&path, &collector.correlator, facts, findings))
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
    }
    Ok(path)
}

fn attach_all(probes: &mut Probes, options: &FollowOptions, path: &Path) -> Result<()> {
    for ip in &options.pod_ips {
        probes.follow(*ip)?;
    }
    for hop in &path.hops {
        probes.attach(hop)?;
    }
    Ok(())
}

fn describe_path(path: &Path) -> String {
    let mut text = format!("podtrace: path of {} ({:?} pod):\n", path.pod_ip, path.locality);
    for hop in &path.hops {
        text.push_str(&format!(
            "  {:<16} {:<10} ifindex {:<4} mtu {:<5} from-pod {}\n",
            hop.ifname, hop.kind.to_string(), hop.ifindex, hop.mtu, hop.from_pod
        ));
    }
    text
}

fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// Reads events and feeds the correlator until the trace ends.
struct Collector<'a> {
    correlator: Correlator,
    path: &'a Path,
    names: HashMap<u32, String>,
    verbose: bool,
    live_to_stderr: bool,
    vanished: Vec<u32>,
    decode_errors: u64,
}

impl<'a> Collector<'a> {
    fn new(options: &FollowOptions, path: &'a Path) -> Self {
        Self {
            correlator: Correlator::new(options.pod_ips.clone(), Limits::default()),
            path,
            names: path.hops.iter().map(|hop| (hop.ifindex, hop.ifname.clone())).collect(),
            verbose: options.verbose,
            live_to_stderr: options.live_to_stderr,
            vanished: Vec::new(),
            decode_errors: 0,
        }
    }

    async fn run(
        &mut self,
        events: RingBuf<MapData>,
        duration: Option<Duration>,
        sigint: &mut tokio::signal::unix::Signal,
        sigterm: &mut tokio::signal::unix::Signal,
    ) -> Result<()> {
        // SAFETY: the ring buffer owns its map fd, which stays open as long as the AsyncFd.
        let mut events = unsafe { AsyncFd::register(events) }
            .map_err(|err| anyhow::anyhow!("polling the ring buffer: {err}"))?;
        let deadline = async {
            match duration {
                Some(duration) => tokio::time::sleep(duration).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(deadline);
        let (connection, handle, _) = rtnetlink::new_connection().context("opening rtnetlink socket")?;
        let connection = tokio::spawn(connection);
        let mut link_check = tokio::time::interval(Duration::from_millis(500));
        let result = loop {
            tokio::select! {
                guard = events.readable_mut() => {
                    let mut guard = match guard {
                        Ok(guard) => guard,
                        Err(err) => break Err(err).context("waiting for events"),
                    };
                    self.drain(guard.get_inner_mut());
                    guard.clear_ready();
                }
                _ = &mut deadline => break Ok(()),
                _ = sigint.recv() => break Ok(()),
                _ = sigterm.recv() => break Ok(()),
                _ = link_check.tick() => {
                    if let Err(err) = self.check_links(&handle).await {
                        break Err(err);
                    }
                    if self.vanished.len() == self.path.hops.len() {
                        eprintln!("podtrace: every traced interface is gone; ending the trace");
                        break Ok(());
                    }
                }
            }
        };
        connection.abort();
        // Whatever the kernel wrote before we stopped still belongs in the report.
        self.drain(events.get_mut());
        if self.decode_errors > 0 {
            eprintln!("podtrace: warning: {} ring records could not be decoded", self.decode_errors);
        }
        result
    }

    fn drain(&mut self, ring: &mut RingBuf<MapData>) {
        while let Some(item) = ring.next() {
            match decode::decode(&item) {
                Ok(packet) => {
                    let sighting = self.correlator.observe(&packet);
                    if self.verbose {
                        self.print_live(&packet, sighting.as_ref());
                    }
                }
                Err(_) => self.decode_errors += 1,
            }
        }
    }

    async fn check_links(&mut self, handle: &rtnetlink::Handle) -> Result<()> {
        for hop in &self.path.hops {
            if self.vanished.contains(&hop.ifindex) {
                continue;
            }
            if !discovery::link_exists(handle, hop.ifindex).await? {
                eprintln!(
                    "podtrace: warning: interface {} (ifindex {}) disappeared; tracing continues on the other hops",
                    hop.ifname, hop.ifindex
                );
                self.vanished.push(hop.ifindex);
            }
        }
        Ok(())
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
