//! Turns raw ring-buffer records into typed packets.

use std::net::{IpAddr, Ipv6Addr};

use anyhow::{Result, bail};
use tracer_common::{
    DIR_EGRESS, DIR_INGRESS, IP_DF, IP_FRAGMENT, IP_LATER_FRAGMENT, IP_OPTIONS, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP,
    IpLayer, KEV_DROP, KEV_ICMP_SEND, KEV_RECEIVED, KEV_RETRANSMIT, KernelEvent, PKT_INNER_TRUNCATED, PKT_VLAN, PKT_VXLAN, PacketEvent,
};

use crate::Direction;

/// One IP header and its L4 header, as userspace works with them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layer {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub proto: u8,
    pub ttl: u8,
    pub ip_id: u16,
    pub flow_label: u32,
    pub total_len: u16,
    pub header_len: u16,
    pub dont_fragment: bool,
    pub fragment: bool,
    pub later_fragment: bool,
    pub options: bool,
    pub sport: u16,
    pub dport: u16,
    pub tcp_seq: u32,
    pub tcp_ack: u32,
    pub tcp_flags: u8,
    pub tcp_header_len: u8,
    /// TCP timestamp value and first SACK block's right edge; zero when absent.
    pub tcp_tsval: u32,
    pub tcp_sack_right: u32,
    /// UDP: the first 4 payload bytes (a DNS query's id and flags); zero when shorter.
    pub payload_head: [u8; 4],
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub icmp_id: u16,
    pub icmp_seq: u16,
    /// The flow an ICMP error answers: the quoted packet's protocol and ports.
    pub quoted_proto: u8,
    pub quoted_sport: u16,
    pub quoted_dport: u16,
}

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

impl Layer {
    fn from_wire(layer: &IpLayer) -> Self {
        Self {
            src: unmap(layer.src),
            dst: unmap(layer.dst),
            proto: layer.proto,
            ttl: layer.ttl,
            ip_id: layer.ip_id,
            flow_label: layer.flow_label,
            total_len: layer.total_len,
            header_len: layer.header_len,
            dont_fragment: layer.flags & IP_DF != 0,
            fragment: layer.flags & IP_FRAGMENT != 0,
            later_fragment: layer.flags & IP_LATER_FRAGMENT != 0,
            options: layer.flags & IP_OPTIONS != 0,
            sport: layer.sport,
            dport: layer.dport,
            tcp_seq: layer.tcp_seq,
            tcp_ack: layer.tcp_ack,
            tcp_flags: layer.tcp_flags,
            tcp_header_len: layer.tcp_header_len,
            tcp_tsval: layer.tcp_tsval,
            tcp_sack_right: layer.tcp_sack_right,
            payload_head: layer.payload_head,
            icmp_type: layer.icmp_type,
            icmp_code: layer.icmp_code,
            icmp_id: layer.icmp_id,
            icmp_seq: layer.icmp_seq,
            quoted_proto: layer.quoted_proto,
            quoted_sport: layer.quoted_sport,
            quoted_dport: layer.quoted_dport,
        }
    }

    /// Bytes after the IP and (for TCP) transport headers.
    pub fn payload_len(&self) -> u16 {
        let l4_header = match self.proto {
            IPPROTO_TCP => u16::from(self.tcp_header_len),
            IPPROTO_UDP => 8,
            _ => 0,
        };
        let l4_header = if self.later_fragment { 0 } else { l4_header };
        self.total_len.saturating_sub(self.header_len).saturating_sub(l4_header)
    }

    pub fn proto_name(&self) -> String {
        proto_name(self.proto)
    }

    /// `src:port > dst:port` (or ICMP type/id/seq), for live lines.
    pub fn describe(&self) -> String {
        match self.proto {
            IPPROTO_TCP | IPPROTO_UDP => {
                let mut text = format!("{} {}:{} > {}:{}", self.proto_name(), self.src, self.sport, self.dst, self.dport);
                if self.proto == IPPROTO_TCP {
                    text.push_str(&format!(" [{}] seq {} ack {}", tcp_flags(self.tcp_flags), self.tcp_seq, self.tcp_ack));
                }
                text
            }
            IPPROTO_ICMP | IPPROTO_ICMPV6 if self.quoted_proto != 0 => format!(
                "{} {} > {} type {} code {} about {} :{} > :{}",
                self.proto_name(),
                self.src,
                self.dst,
                self.icmp_type,
                self.icmp_code,
                proto_name(self.quoted_proto),
                self.quoted_sport,
                self.quoted_dport
            ),
            IPPROTO_ICMP | IPPROTO_ICMPV6 => format!(
                "{} {} > {} type {} code {} id {} seq {}",
                self.proto_name(),
                self.src,
                self.dst,
                self.icmp_type,
                self.icmp_code,
                self.icmp_id,
                self.icmp_seq
            ),
            _ => format!("{} {} > {}", self.proto_name(), self.src, self.dst),
        }
    }
}

pub fn proto_name(proto: u8) -> String {
    match proto {
        IPPROTO_TCP => "tcp".into(),
        IPPROTO_UDP => "udp".into(),
        IPPROTO_ICMP => "icmp".into(),
        IPPROTO_ICMPV6 => "icmp6".into(),
        other => format!("proto-{other}"),
    }
}

fn tcp_flags(flags: u8) -> String {
    const NAMES: [(u8, char); 6] = [(0x02, 'S'), (0x10, '.'), (0x08, 'P'), (0x01, 'F'), (0x04, 'R'), (0x20, 'U')];
    NAMES.iter().filter(|(bit, _)| flags & bit != 0).map(|(_, c)| *c).collect()
}

/// One packet seen at one hop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    pub ktime_ns: u64,
    pub ifindex: u32,
    pub direction: Direction,
    pub skb_len: u32,
    pub gso_size: u32,
    pub gso_segs: u32,
    pub vlan_id: Option<u16>,
    pub outer: Layer,
    /// The encapsulated packet, for VXLAN.
    pub inner: Option<Layer>,
    pub vni: Option<u32>,
    pub inner_truncated: bool,
}

impl Packet {
    /// The header the pod itself wrote: the inner one under VXLAN.
    pub fn pod_layer(&self) -> &Layer {
        self.inner.as_ref().unwrap_or(&self.outer)
    }

    pub fn is_gso(&self) -> bool {
        self.gso_size != 0
    }
}

/// Ring records that could not be decoded: how many, and the first one's error, for the
/// report (a record podtrace's own programs wrote should always decode).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DecodeErrors {
    pub count: u64,
    pub first: Option<String>,
}

impl DecodeErrors {
    pub fn record(&mut self, err: &anyhow::Error) {
        self.count += 1;
        self.first.get_or_insert_with(|| format!("{err:#}"));
    }
}

pub fn decode(bytes: &[u8]) -> Result<Packet> {
    if bytes.len() < size_of::<PacketEvent>() {
        bail!("ring record of {} bytes is shorter than a PacketEvent ({})", bytes.len(), size_of::<PacketEvent>());
    }
    let pointer = bytes.as_ptr().cast::<PacketEvent>();
    let copy;
    let event: &PacketEvent = if pointer.is_aligned() {
        // SAFETY: length checked and aligned (ring records are 8-byte aligned); PacketEvent is
        // plain old data, read in place in the ring's memory.
        unsafe { &*pointer }
    } else {
        // SAFETY: length checked; read unaligned.
        copy = unsafe { std::ptr::read_unaligned(pointer) };
        &copy
    };
    if !matches!(event.direction, DIR_INGRESS | DIR_EGRESS) {
        bail!("ring record with unknown direction {} (not written by this podtrace's programs)", event.direction);
    }
    Ok(from_event(event))
}

/// A packet from an event our own programs wrote (`decode` checks records from the ring).
pub fn from_event(event: &PacketEvent) -> Packet {
    let vxlan = event.flags & PKT_VXLAN != 0;
    let inner_truncated = event.flags & PKT_INNER_TRUNCATED != 0;
    Packet {
        ktime_ns: event.ktime_ns,
        ifindex: event.ifindex,
        direction: match event.direction {
            DIR_INGRESS => Direction::Ingress,
            DIR_EGRESS => Direction::Egress,
            // Written only by our own programs; anything else is a build mismatch.
            other => unreachable!("unknown direction {other} in event"),
        },
        skb_len: event.skb_len,
        gso_size: event.gso_size,
        gso_segs: event.gso_segs,
        vlan_id: (event.flags & PKT_VLAN != 0).then_some(event.vlan_id),
        outer: Layer::from_wire(&event.outer),
        inner: (vxlan && !inner_truncated).then(|| Layer::from_wire(&event.inner)),
        vni: vxlan.then_some(event.vni),
        inner_truncated,
    }
}

/// A kernel-wide event about a followed flow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KernelRecord {
    pub ktime_ns: u64,
    pub netns: u32,
    /// The skb's device in `netns`; 0 when it had none.
    pub ifindex: u32,
    /// The skb had been received on `ifindex` (rather than being sent out of it).
    pub received: bool,
    pub skb_len: u32,
    pub outer: Layer,
    pub inner: Option<Layer>,
    pub kind: KernelRecordKind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KernelRecordKind {
    Drop { reason: u32, location: u64 },
    Retransmit { seq: u32, tcp_state: u32 },
    IcmpSent { icmp_type: u8, icmp_code: u8 },
}

impl KernelRecord {
    pub fn pod_layer(&self) -> &Layer {
        self.inner.as_ref().unwrap_or(&self.outer)
    }
}

pub fn decode_kernel(bytes: &[u8]) -> Result<KernelRecord> {
    if bytes.len() < size_of::<KernelEvent>() {
        bail!("ring record of {} bytes is shorter than a KernelEvent ({})", bytes.len(), size_of::<KernelEvent>());
    }
    // SAFETY: length checked; KernelEvent is plain old data.
    let event: KernelEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    from_kernel_event(&event)
}

pub fn from_kernel_event(event: &KernelEvent) -> Result<KernelRecord> {
    let kind = match event.kind {
        KEV_DROP => KernelRecordKind::Drop { reason: event.reason, location: event.location },
        KEV_RETRANSMIT => KernelRecordKind::Retransmit { seq: event.tcp_seq, tcp_state: event.reason },
        KEV_ICMP_SEND => KernelRecordKind::IcmpSent { icmp_type: event.icmp_type, icmp_code: event.icmp_code },
        other => bail!("unknown kernel event kind {other}"),
    };
    let vxlan = event.flags & PKT_VXLAN != 0 && event.flags & PKT_INNER_TRUNCATED == 0;
    Ok(KernelRecord {
        ktime_ns: event.ktime_ns,
        netns: event.netns,
        ifindex: event.ifindex,
        received: event.flags & KEV_RECEIVED != 0,
        skb_len: event.skb_len,
        outer: Layer::from_wire(&event.outer),
        inner: vxlan.then(|| Layer::from_wire(&event.inner)),
        kind,
    })
}

fn unmap(bytes: [u8; 16]) -> IpAddr {
    let v6 = Ipv6Addr::from(bytes);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_records_are_rejected() {
        assert!(decode(&[0u8; 10]).is_err());
        assert!(decode_kernel(&[0u8; 10]).is_err());
    }

    #[test]
    fn kernel_events_decode_by_kind() {
        let mut event =
            KernelEvent { kind: KEV_DROP, reason: 12, location: 0xffff_ffff_8100_0000, flags: KEV_RECEIVED, ..Default::default() };
        let record = from_kernel_event(&event).unwrap();
        assert_eq!(record.kind, KernelRecordKind::Drop { reason: 12, location: 0xffff_ffff_8100_0000 });
        assert!(record.received);
        event.kind = KEV_RETRANSMIT;
        event.tcp_seq = 77;
        assert_eq!(from_kernel_event(&event).unwrap().kind, KernelRecordKind::Retransmit { seq: 77, tcp_state: 12 });
        event.kind = 99;
        assert!(from_kernel_event(&event).is_err());
    }

    #[test]
    fn vxlan_event_exposes_the_inner_packet() {
        let mut event = PacketEvent { flags: PKT_VXLAN, vni: 1, direction: DIR_EGRESS, ..Default::default() };
        event.outer.src = std::net::Ipv4Addr::new(10, 99, 0, 1).to_ipv6_mapped().octets();
        event.inner.src = std::net::Ipv4Addr::new(10, 244, 0, 2).to_ipv6_mapped().octets();
        event.inner.proto = IPPROTO_TCP;
        event.inner.total_len = 1450;
        event.inner.header_len = 20;
        event.inner.tcp_header_len = 32;
        // SAFETY: PacketEvent is repr(C) plain old data without padding, and `event` outlives `bytes`.
        let bytes = unsafe { std::slice::from_raw_parts((&event as *const PacketEvent).cast::<u8>(), size_of::<PacketEvent>()) };
        let packet = decode(bytes).unwrap();
        assert_eq!(packet.direction, Direction::Egress);
        assert_eq!(packet.outer.src, "10.99.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(packet.pod_layer().src, "10.244.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(packet.pod_layer().payload_len(), 1450 - 20 - 32);
        assert_eq!(packet.vni, Some(1));
    }

    #[test]
    fn truncated_inner_falls_back_to_outer() {
        let event = PacketEvent { flags: PKT_VXLAN | PKT_INNER_TRUNCATED, ..Default::default() };
        let packet = from_event(&event);
        assert!(packet.inner.is_none());
        assert!(packet.inner_truncated);
    }

    #[test]
    fn later_fragments_have_no_l4_header() {
        let layer = Layer::from_wire(&IpLayer {
            proto: IPPROTO_UDP,
            total_len: 1000,
            header_len: 20,
            flags: IP_FRAGMENT | IP_LATER_FRAGMENT,
            ..Default::default()
        });
        assert_eq!(layer.payload_len(), 980);
    }
}
