//! Synthetic packets, kernel events and trace ends for the detectors' unit tests.

use std::{collections::HashMap, net::IpAddr};

use tracer_common::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

use super::{Detector, Finding, TraceEnd};
use crate::{
    Direction,
    events::{
        correlate::{Correlator, Limits},
        decode::{KernelRecord, KernelRecordKind, Layer, Packet},
    },
    kernel::symbols::KernelSymbols,
    node::{LinkDrops, Path},
    probes::Counters,
};

pub const POD: &str = "10.244.0.2";
pub const PEER: &str = "10.244.1.2";

pub fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

pub fn layer(src: &str, dst: &str, proto: u8) -> Layer {
    Layer {
        src: ip(src),
        dst: ip(dst),
        proto,
        ttl: 64,
        ip_id: 1,
        flow_label: 0,
        total_len: 84,
        header_len: 20,
        dont_fragment: true,
        fragment: false,
        later_fragment: false,
        options: false,
        sport: 0,
        dport: 0,
        tcp_seq: 0,
        tcp_ack: 0,
        tcp_flags: 0,
        tcp_header_len: 0,
        icmp_type: 0,
        icmp_code: 0,
        icmp_id: 0,
        icmp_seq: 0,
        quoted_proto: 0,
        quoted_sport: 0,
        quoted_dport: 0,
    }
}

pub fn echo(src: &str, dst: &str, icmp_type: u8, seq: u16) -> Layer {
    Layer { icmp_type, icmp_id: 7, icmp_seq: seq, ip_id: seq, ..layer(src, dst, IPPROTO_ICMP) }
}

pub fn tcp(src: &str, sport: u16, dst: &str, dport: u16, flags: u8, payload: u16) -> Layer {
    Layer { sport, dport, tcp_flags: flags, tcp_header_len: 32, total_len: 20 + 32 + payload, ..layer(src, dst, IPPROTO_TCP) }
}

pub fn udp(src: &str, sport: u16, dst: &str, dport: u16) -> Layer {
    Layer { sport, dport, total_len: 60, ..layer(src, dst, IPPROTO_UDP) }
}

/// A plain (not encapsulated, not GSO) packet seen at one hop.
pub fn packet(layer: Layer, ifindex: u32, direction: Direction, ktime_ns: u64) -> Packet {
    Packet {
        ktime_ns,
        ifindex,
        direction,
        skb_len: u32::from(layer.total_len) + 14,
        gso_size: 0,
        gso_segs: 0,
        vlan_id: None,
        outer: layer,
        inner: None,
        vni: None,
        inner_truncated: false,
    }
}

/// `inner` in VXLAN between two node addresses.
pub fn vxlan(inner: Layer, outer_src: &str, outer_dst: &str, ifindex: u32, direction: Direction) -> Packet {
    let outer = Layer { total_len: inner.total_len + 50, sport: 51000, dport: 8472, ..layer(outer_src, outer_dst, IPPROTO_UDP) };
    Packet { inner: Some(inner), vni: Some(1), ..packet(outer, ifindex, direction, 0) }
}

pub fn kernel(kind: KernelRecordKind, layer: Layer, ifindex: u32, received: bool, netns: u32) -> KernelRecord {
    KernelRecord { ktime_ns: 0, netns, ifindex, received, skb_len: u32::from(layer.total_len), outer: layer, inner: None, kind }
}

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
        let sighting = self.correlator.observe(packet);
        detector.observe_packet(packet, sighting.as_ref());
    }

    /// The same packet crossing each hop in turn, 1 µs apart from `start_ns`.
    pub fn journey(&mut self, detector: &mut dyn Detector, layer: &Layer, hops: &[(u32, Direction)], start_ns: u64) {
        for (step, (ifindex, direction)) in hops.iter().enumerate() {
            self.packet(detector, &packet(layer.clone(), *ifindex, *direction, start_ns + step as u64 * 1000));
        }
    }
}

/// What a trace end refers to, owned by the test.
#[derive(Default)]
pub struct End {
    pub end_ns: u64,
    pub counters: Counters,
    pub link_drops: HashMap<u32, LinkDrops>,
    pub drop_reasons: HashMap<i64, String>,
    pub symbols: Option<KernelSymbols>,
}

impl End {
    pub fn trace_end<'a>(&'a self, path: &'a Path) -> TraceEnd<'a> {
        TraceEnd {
            end_ns: self.end_ns,
            counters: self.counters,
            ring_bytes: 4096,
            link_drops: &self.link_drops,
            final_path: path,
            drop_reasons: &self.drop_reasons,
            symbols: self.symbols.as_ref(),
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
