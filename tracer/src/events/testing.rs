//! Synthetic layers, packets and kernel events for unit tests across the crate.

use std::net::IpAddr;

use tracer_common::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP};

use super::decode::{KernelRecord, KernelRecordKind, Layer, Packet};
use crate::Direction;

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
        tcp_tsval: 0,
        tcp_sack_right: 0,
        payload_head: [0; 4],
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
        translated: None,
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
