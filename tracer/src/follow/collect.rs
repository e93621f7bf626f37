//! The event loop: reads both ring buffers until the deadline, a signal or every hop gone,
//! feeding the correlator, the diagnosis and the live lines, and samples the hops' drop
//! counters.

use std::{collections::HashMap, time::Duration};

use anyhow::{Context as _, Result, anyhow};
use tokio::io::unix::AsyncFd;

use super::{live::LiveLines, signals::Signals};
use crate::{
    diagnosis::Diagnosis,
    events::{
        correlate::{Correlator, Limits},
        decode::{self, DecodeCounts, DecodeErrors, PacketDecoder},
    },
    node::{self, LinkDrops, Path, with_rtnetlink},
    probes::EventRing,
};

/// Reads events and feeds the correlator and the diagnosis until the trace ends.
pub struct Collector<'a> {
    correlator: Correlator,
    diagnosis: Diagnosis<'a>,
    path: &'a Path,
    live: LiveLines,
    vanished: Vec<u32>,
    /// Each hop's drop counters when the trace started, then how much they grew.
    link_drops: HashMap<u32, LinkDrops>,
    packets: PacketDecoder,
    decode_errors: DecodeErrors,
}

/// What a trace collected.
pub struct Collected<'a> {
    pub correlator: Correlator,
    pub diagnosis: Diagnosis<'a>,
    /// Hops (ifindexes) that disappeared during the trace.
    pub vanished: Vec<u32>,
    /// How much each hop's drop counters grew during the trace.
    pub link_drops: HashMap<u32, LinkDrops>,
    /// What parsing the packet records found wanting.
    pub decoded: DecodeCounts,
    pub decode_errors: DecodeErrors,
}

/// How often both rings are drained. The TC programs never wake the reader (a wakeup costs
/// them more than the event: see `emit` on the kernel side), and the tracepoint programs
/// only once their ring is half full (`wakeup` there), so this is how long an event can
/// wait; the default 4 MiB packet ring holds over 20,000 events, 2 million a second.
const DRAIN_INTERVAL: Duration = Duration::from_millis(10);

impl<'a> Collector<'a> {
    /// `vxlan_ports`: the ports the kernel programs were loaded with.
    pub fn new(path: &'a Path, diagnosis: Diagnosis<'a>, live: LiveLines, vxlan_ports: [u16; 2]) -> Self {
        let followed = path.entries.iter().map(|entry| entry.pod_ip).collect();
        Self {
            correlator: Correlator::new(followed, Limits::default()),
            diagnosis,
            path,
            live,
            vanished: Vec::new(),
            link_drops: HashMap::new(),
            packets: PacketDecoder::new(vxlan_ports),
            decode_errors: DecodeErrors::default(),
        }
    }

    pub fn finish(self) -> Collected<'a> {
        let Self { correlator, diagnosis, vanished, link_drops, packets, decode_errors, .. } = self;
        Collected { correlator, diagnosis, vanished, link_drops, decoded: packets.counts(), decode_errors }
    }

    /// Runs the event loop, then reads the kernel's counters with `read_counters` and only
    /// then drains both rings: every event the counters include has been decoded.
    pub async fn run<C>(
        &mut self,
        mut events: EventRing,
        kernel_events: EventRing,
        duration: Option<Duration>,
        signals: &mut Signals,
        read_counters: impl FnOnce() -> Result<C>,
    ) -> Result<C> {
        // SAFETY: the ring buffer owns its map fd, which stays open and unchanged for as long
        // as the AsyncFd that owns the ring buffer.
        let mut kernel_events =
            unsafe { AsyncFd::register(kernel_events) }.map_err(|err| anyhow!("polling the kernel ring buffer: {err}"))?;
        let result = with_rtnetlink(async |handle| self.watch(handle, &mut events, &mut kernel_events, duration, signals).await).await;
        let counters = read_counters();
        // Whatever the kernel wrote before we stopped still belongs in the report.
        self.drain_packets(&mut events);
        self.drain_kernel(kernel_events.get_mut());
        if self.decode_errors.count > 0 {
            crate::note!("podtrace: warning: {} ring records could not be decoded", self.decode_errors.count);
        }
        result.and(counters)
    }

    /// Reads events until the deadline, a signal, or every hop gone. The hops' drop counters
    /// are sampled at the start, every 500 ms (which notices vanished hops) and at the end.
    async fn watch(
        &mut self,
        handle: &rtnetlink::Handle,
        events: &mut EventRing,
        kernel_events: &mut AsyncFd<EventRing>,
        duration: Option<Duration>,
        signals: &mut Signals,
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
        let mut drain_tick = tokio::time::interval(DRAIN_INTERVAL);
        // A tick missed while draining is not made up in a burst: the next drain reads it all.
        drain_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let result = loop {
            tokio::select! {
                guard = kernel_events.readable_mut() => match guard {
                    Ok(mut guard) => {
                        self.drain_kernel(guard.get_inner_mut());
                        guard.clear_ready();
                    }
                    Err(err) => break Err(err).context("waiting for kernel events"),
                },
                // Kernel events first, ahead of the packets written in the same interval: a
                // drop reaches the detectors no later than the packets around it.
                _ = drain_tick.tick() => {
                    self.drain_kernel(kernel_events.get_mut());
                    self.drain_packets(events);
                }
                _ = &mut deadline => break Ok(()),
                _ = signals.recv() => break Ok(()),
                _ = link_check.tick() => {
                    if let Err(err) = self.sample_links(handle).await {
                        break Err(err);
                    }
                    if self.vanished.len() == self.path.hops().count() {
                        crate::note!("podtrace: every traced interface is gone; ending the trace");
                        break Ok(());
                    }
                }
            }
        };
        let last = match self.sample_links(handle).await {
            Ok(last) => last,
            Err(err) => return result.and(Err(err)),
        };
        self.link_drops = last.into_iter().filter_map(|(index, now)| Some((index, now.since(*baseline.get(&index)?)))).collect();
        result
    }

    fn drain_packets(&mut self, ring: &mut EventRing) {
        ring.drain(|item| match self.packets.decode(item) {
            Ok(Some(packet)) => {
                let sighting = self.correlator.observe(&packet);
                self.diagnosis.observe_packet(&packet, sighting.as_ref());
                self.live.print(&packet, sighting.as_ref());
            }
            Ok(None) => {}
            Err(err) => self.decode_errors.record(&err),
        });
    }

    fn drain_kernel(&mut self, ring: &mut EventRing) {
        ring.drain(|item| match decode::decode_kernel(item) {
            Ok(record) => self.diagnosis.observe_kernel(&record, &self.correlator),
            Err(err) => self.decode_errors.record(&err),
        });
    }

    /// Reads every hop's drop counters, noticing hops that disappeared.
    async fn sample_links(&mut self, handle: &rtnetlink::Handle) -> Result<HashMap<u32, LinkDrops>> {
        let mut sample = HashMap::new();
        for hop in self.path.hops() {
            if self.vanished.contains(&hop.ifindex) {
                continue;
            }
            match node::link_drops(handle, hop.ifindex).await? {
                Some(drops) => {
                    sample.insert(hop.ifindex, drops);
                }
                None => {
                    crate::note!(
                        "podtrace: warning: interface {} (ifindex {}) disappeared; tracing continues on the other hops",
                        hop.ifname,
                        hop.ifindex
                    );
                    self.vanished.push(hop.ifindex);
                }
            }
        }
        Ok(sample)
    }
}
