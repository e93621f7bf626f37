//! Feeding detectors in unit tests: the synthetic packets and events of `events::testing`,
//! through a correlator as in a trace, and trace ends.

use std::{collections::HashMap, net::IpAddr, sync::OnceLock};

use super::{
    Detector, Finding, TraceEnd,
    services::{ClientFlow, Endpoint, ServiceFlows},
};
pub use crate::events::testing::*;
use crate::{
    Direction,
    events::{
        correlate::{Correlator, Limits, Sighting},
        decode::{DecodeErrors, Layer, Packet, Translation},
    },
    kernel::symbols::KernelSymbols,
    node::{LinkDrops, Path},
    probes::Counters,
};

/// Feeds packets to a detector the way the trace does: through the correlator, so each comes
/// with its sighting.
pub struct Feed {
    correlator: Correlator,
}

impl Feed {
    pub fn new(path: &Path) -> Self {
        Self { correlator: Correlator::new(path.entries.iter().map(|entry| entry.pod_ip).collect(), Limits::default()) }
    }

    pub fn packet(&mut self, detector: &mut dyn Detector, packet: &Packet) {
        let sighting = self.observe(packet);
        detector.observe_packet(packet, sighting.as_ref());
    }

    /// The journeys of the packets fed so far, for what judges drops.
    pub fn sightings(&self) -> &Correlator {
        &self.correlator
    }

    /// The packet's sighting, for what is fed packets outside a detector.
    pub fn observe(&mut self, packet: &Packet) -> Option<Sighting> {
        self.correlator.observe(packet)
    }

    /// The same packet crossing each hop in turn, 1 µs apart from `start_ns`.
    pub fn journey(&mut self, detector: &mut dyn Detector, layer: &Layer, hops: &[(u32, Direction)], start_ns: u64) {
        self.journey_translated(detector, layer, hops, start_ns, &[]);
    }

    /// `journey`, the packet's source translated by the node's NAT to the given address at
    /// the given hops (by ifindex), as the kernel reports a masqueraded packet there.
    pub fn journey_translated(
        &mut self,
        detector: &mut dyn Detector,
        layer: &Layer,
        hops: &[(u32, Direction)],
        start_ns: u64,
        translated: &[(u32, IpAddr)],
    ) {
        for (step, (ifindex, direction)) in hops.iter().enumerate() {
            let mut packet = packet(layer.clone(), *ifindex, *direction, start_ns + step as u64 * 1000);
            packet.translated = translated.iter().find(|(at, _)| at == ifindex).map(|(_, src)| Translation {
                src: *src,
                dst: layer.dst,
                sport: layer.sport,
                dport: layer.dport,
            });
            self.packet(detector, &packet);
        }
    }
}

/// Feeds packets through the correlator and then the Service flows, as `Diagnosis` does, for
/// the detectors that read those.
pub struct ServiceFeed<'a> {
    feed: Feed,
    pub services: ServiceFlows<'a>,
}

impl<'a> ServiceFeed<'a> {
    pub fn new(path: &'a Path) -> Self {
        Self { feed: Feed::new(path), services: ServiceFlows::new(path) }
    }

    /// The packet's sighting, and the flow it opened where its pod's packets enter the path.
    pub fn observe(&mut self, packet: &Packet) -> (Option<Sighting>, Option<(ClientFlow, Endpoint)>) {
        let sighting = self.feed.observe(packet);
        let opened = self.services.observe(packet, sighting.as_ref());
        (sighting, opened)
    }
}

/// What a trace end refers to, owned by the test.
#[derive(Default)]
pub struct End {
    pub end_ns: u64,
    pub counters: Counters,
    /// Counter growth of the hops that have some; every other hop of the path grew by none.
    pub link_drops: HashMap<u32, LinkDrops>,
    /// Hops that disappeared during the trace: they have no counters at the end.
    pub vanished: Vec<u32>,
    pub drop_reasons: HashMap<i64, String>,
    pub symbols: Option<KernelSymbols>,
    pub decode_errors: DecodeErrors,
    pub recursion_misses: Option<u64>,
    /// The kernel has no `icmp:icmp_send` (5.10).
    pub icmp_send_missing: bool,
    pub evicted_in_transit: u64,
    /// `link_drops` with every other hop of the path that did not vanish, as a trace reads them;
    /// filled by `trace_end` (public only so that tests can build an `End` with `..Default::default()`).
    pub all_link_drops: OnceLock<HashMap<u32, LinkDrops>>,
}

impl End {
    pub fn trace_end<'a>(&'a self, path: &'a Path) -> TraceEnd<'a> {
        let link_drops = self.all_link_drops.get_or_init(|| {
            let mut all = self.link_drops.clone();
            for hop in path.hops().filter(|hop| !self.vanished.contains(&hop.ifindex)) {
                all.entry(hop.ifindex).or_default();
            }
            all
        });
        TraceEnd {
            end_ns: self.end_ns,
            counters: self.counters,
            ring_bytes: 4096,
            kernel_ring_bytes: 4096,
            decode_errors: &self.decode_errors,
            recursion_misses: self.recursion_misses,
            icmp_send_observed: !self.icmp_send_missing,
            link_drops,
            final_path: path,
            drop_reasons: &self.drop_reasons,
            symbols: self.symbols.as_ref(),
            evicted_in_transit: self.evicted_in_transit,
        }
    }

    pub fn findings(&self, detector: &dyn Detector, path: &Path) -> Vec<Finding> {
        detector.findings(&self.trace_end(path))
    }
}

/// The local path's hops a request from the pod crosses (veth1, cni0, flannel.1, eth0) and
/// those its reply crosses.
pub const OUT: [(u32, Direction); 4] = [(5, Direction::Ingress), (4, Direction::Ingress), (3, Direction::Egress), (2, Direction::Egress)];
pub const BACK: [(u32, Direction); 4] = [(2, Direction::Ingress), (3, Direction::Ingress), (4, Direction::Egress), (5, Direction::Egress)];
