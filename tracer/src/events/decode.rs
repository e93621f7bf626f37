//! Turns raw ring-buffer records into typed packets: the TC programs' packet records are
//! parsed here, from the ring's memory, by the parser the kernel programs run
//! (`tracer_common::parse`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{Result, bail};
use tracer_common::{
    DIR_EGRESS, DIR_INGRESS, HEAD_LONG, HEAD_MEDIUM, HEAD_SHORT, HOP_NO_MAC_HEADER, IP_DF, IP_FRAGMENT, IP_LATER_FRAGMENT, IP_OPTIONS,
    IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, IpLayer, KEV_DROP, KEV_ICMP_SEND, KEV_RECEIVED, KEV_RETRANSMIT, KernelEvent,
    NatTuple, PKT_ENCAPSULATED, PKT_INNER_TRUNCATED, PKT_TRANSLATED, PKT_VLAN, PKT_VXLAN, PacketMeta, PacketRecord, TranslatedRecord,
    parse::{Bytes, Frame, parse_frame},
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
    /// The encapsulated packet, for VXLAN and IPIP.
    pub inner: Option<Layer>,
    /// For VXLAN: its network identifier (`None` for IPIP, which has none).
    pub vni: Option<u32>,
    pub inner_truncated: bool,
    /// What the node's NAT made of the packet, where it was seen translated: `outer` then
    /// holds the pod's side of the NAT, so that the packet is recognised as the pod's.
    pub translated: Option<Translation>,
}

/// A translated packet's header as it was on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    pub src: IpAddr,
    pub dst: IpAddr,
    /// The ports, or for ICMP the echo id in `sport` (`dport` 0).
    pub sport: u16,
    pub dport: u16,
}

impl Packet {
    /// The header the pod itself wrote: the inner one under VXLAN or IPIP.
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

/// What parsing the packet records found wanting, for the report's `unparsed` (the kernel
/// counts what it turned away; these are what it reported).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecodeCounts {
    /// Records whose headers did not parse: no packet, only a count.
    pub unparsed_records: u64,
    /// Packets whose VXLAN payload was cut short of the inner headers.
    pub truncated_inner: u64,
}

/// Parses the TC programs' packet records, counting those whose headers fall short.
pub struct PacketDecoder {
    /// The ports the kernel programs were loaded with (`FilterConfig::vxlan_ports`).
    vxlan_ports: [u16; 2],
    counts: DecodeCounts,
}

impl PacketDecoder {
    pub fn new(vxlan_ports: [u16; 2]) -> Self {
        Self { vxlan_ports, counts: DecodeCounts::default() }
    }

    pub fn counts(&self) -> DecodeCounts {
        self.counts
    }

    /// The packet a ring record holds, parsed where it lies; `None` when its headers do not
    /// parse (counted in `counts`). An error for a record our programs cannot have written.
    pub fn decode(&mut self, bytes: &[u8]) -> Result<Option<Packet>> {
        let (meta, pod, head) = split_record(bytes)?;
        let mut frame = Frame::default();
        let no_mac_header = u32::from(meta.hop_flags) & HOP_NO_MAC_HEADER != 0;
        if parse_frame(&Bytes(head), no_mac_header, meta.skb_len, &self.vxlan_ports, &mut frame).is_err() {
            self.counts.unparsed_records += 1;
            return Ok(None);
        }
        if frame.flags & PKT_INNER_TRUNCATED != 0 {
            self.counts.truncated_inner += 1;
        }
        let mut packet = packet(&meta, &frame);
        if let Some(pod) = pod {
            translate(&mut packet, &pod)?;
        }
        Ok(Some(packet))
    }
}

/// Puts the pod's side of the NAT into a translated packet's header, keeping the wire's.
fn translate(packet: &mut Packet, pod: &NatTuple) -> Result<()> {
    let wire = &mut packet.outer;
    if packet.inner.is_some() || pod.flags & PKT_TRANSLATED == 0 || pod.proto != wire.proto {
        bail!("translated record of protocol {} for a {} packet (not written by this podtrace's programs)", pod.proto, wire.describe());
    }
    let address = |addr: u32| IpAddr::V4(Ipv4Addr::from(addr.to_ne_bytes()));
    let port = u16::from_be;
    let icmp = wire.proto == IPPROTO_ICMP;
    let (sport, dport) = if icmp { (wire.icmp_id, 0) } else { (wire.sport, wire.dport) };
    packet.translated = Some(Translation { src: wire.src, dst: wire.dst, sport, dport });
    (wire.src, wire.dst) = (address(pod.src), address(pod.dst));
    if icmp {
        wire.icmp_id = port(pod.sport);
    } else {
        (wire.sport, wire.dport) = (port(pod.sport), port(pod.dport));
    }
    Ok(())
}

/// A packet record's metadata, the pod's tuple of a translated one, and the bytes of its
/// head that hold the frame.
fn split_record(bytes: &[u8]) -> Result<(PacketMeta, Option<NatTuple>, &[u8])> {
    let translated = bytes.len() == size_of::<TranslatedRecord>();
    let head_start = if translated { size_of::<PacketMeta>() + size_of::<NatTuple>() } else { size_of::<PacketMeta>() };
    let head_size = match bytes.len().checked_sub(head_start) {
        Some(head) if matches!(head, HEAD_SHORT | HEAD_MEDIUM | HEAD_LONG) => head,
        _ => bail!(
            "ring record of {} bytes is no packet record ({}, {}, {} or {})",
            bytes.len(),
            size_of::<PacketRecord<HEAD_SHORT>>(),
            size_of::<PacketRecord<HEAD_MEDIUM>>(),
            size_of::<PacketRecord<HEAD_LONG>>(),
            size_of::<TranslatedRecord>()
        ),
    };
    // SAFETY: at least size_of::<PacketMeta>() bytes; PacketMeta is plain old data, read
    // unaligned.
    let meta: PacketMeta = unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast()) };
    if !matches!(meta.direction, DIR_INGRESS | DIR_EGRESS) {
        bail!("ring record with unknown direction {} (not written by this podtrace's programs)", meta.direction);
    }
    let head_len = usize::from(meta.head_len);
    if head_len > head_size {
        bail!("ring record claims {head_len} bytes of a {head_size}-byte head");
    }
    // SAFETY: a translated record holds a NatTuple after the meta; plain old data, read
    // unaligned.
    let pod = translated.then(|| unsafe { std::ptr::read_unaligned(bytes[size_of::<PacketMeta>()..].as_ptr().cast::<NatTuple>()) });
    let head = &bytes[head_start..];
    Ok((meta, pod, &head[..head_len]))
}

/// A packet from a record's metadata (`split_record` checked its direction) and its parse.
fn packet(meta: &PacketMeta, frame: &Frame) -> Packet {
    let vxlan = frame.flags & PKT_VXLAN != 0;
    let encapsulated = frame.flags & PKT_ENCAPSULATED != 0;
    let inner_truncated = frame.flags & PKT_INNER_TRUNCATED != 0;
    Packet {
        ktime_ns: meta.ktime_ns,
        ifindex: meta.ifindex,
        direction: if meta.direction == DIR_EGRESS { Direction::Egress } else { Direction::Ingress },
        skb_len: meta.skb_len,
        gso_size: u32::from(meta.gso_size),
        gso_segs: u32::from(meta.gso_segs),
        vlan_id: (frame.flags & PKT_VLAN != 0).then_some(frame.vlan_id),
        outer: Layer::from_wire(&frame.outer),
        inner: (encapsulated && !inner_truncated).then(|| Layer::from_wire(&frame.inner)),
        vni: vxlan.then_some(frame.vni),
        inner_truncated,
        translated: None,
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
    let encapsulated = event.flags & PKT_ENCAPSULATED != 0 && event.flags & PKT_INNER_TRUNCATED == 0;
    Ok(KernelRecord {
        ktime_ns: event.ktime_ns,
        netns: event.netns,
        ifindex: event.ifindex,
        received: event.flags & KEV_RECEIVED != 0,
        skb_len: event.skb_len,
        outer: Layer::from_wire(&event.outer),
        inner: encapsulated.then(|| Layer::from_wire(&event.inner)),
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

/// The bytes of a ring record as the TC programs write it, for tests and benchmarks that feed
/// `PacketDecoder` without the kernel: `frame`'s first bytes in a head of `head_size`
/// (`HEAD_SHORT`, `HEAD_MEDIUM` or `HEAD_LONG`), as the kernel picks it for the frame's
/// headers (`tracer_common::head_size`).
pub fn packet_record(meta: PacketMeta, frame: &[u8], head_size: usize) -> Vec<u8> {
    let head_len = frame.len().min(head_size);
    let meta = PacketMeta { head_len: head_len as u16, ..meta };
    // SAFETY: PacketMeta is repr(C) plain old data without padding.
    let meta_bytes = unsafe { std::slice::from_raw_parts((&meta as *const PacketMeta).cast::<u8>(), size_of::<PacketMeta>()) };
    let mut record = meta_bytes.to_vec();
    record.extend_from_slice(&frame[..head_len]);
    record.resize(size_of::<PacketMeta>() + head_size, 0);
    record
}

/// `packet_record` of a packet the node translated, with `pod`, the pod's side of the NAT.
pub fn translated_record(meta: PacketMeta, pod: NatTuple, frame: &[u8]) -> Vec<u8> {
    let mut record = packet_record(meta, frame, HEAD_SHORT);
    // SAFETY: NatTuple is repr(C) plain old data without padding.
    let pod = unsafe { std::slice::from_raw_parts((&pod as *const NatTuple).cast::<u8>(), size_of::<NatTuple>()) };
    record.splice(size_of::<PacketMeta>()..size_of::<PacketMeta>(), pod.iter().copied());
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut packet = vec![0x45, 0];
        packet.extend_from_slice(&((20 + l4.len()) as u16).to_be_bytes());
        packet.extend_from_slice(&[0, 1, 0x40, 0, 64, proto, 0, 0]);
        packet.extend_from_slice(&src);
        packet.extend_from_slice(&dst);
        packet.extend_from_slice(l4);
        packet
    }

    fn ethernet(payload: Vec<u8>) -> Vec<u8> {
        [vec![2, 0, 0, 0, 0, 1, 2, 0, 0, 0, 0, 2, 0x08, 0x00], payload].concat()
    }

    /// A pod's TCP segment (a 32-byte header, 100 bytes of payload) in VXLAN between nodes.
    fn vxlan_frame() -> Vec<u8> {
        let mut tcp = vec![0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 2, 8 << 4, 0x10, 0, 0, 0, 0, 0, 0];
        tcp.extend_from_slice(&[1; 12]);
        tcp.extend_from_slice(&[0; 100]);
        let inner = ethernet(ipv4([10, 244, 0, 2], [10, 244, 1, 2], IPPROTO_TCP, &tcp));
        let udp = [vec![0xc7, 0x38, 0x21, 0x18, 0, 0, 0, 0, 0x08, 0, 0, 0, 0, 0, 1, 0], inner].concat();
        ethernet(ipv4([10, 99, 0, 1], [10, 99, 0, 2], IPPROTO_UDP, &udp))
    }

    fn decoder() -> PacketDecoder {
        PacketDecoder::new([8472, 4789])
    }

    fn egress() -> PacketMeta {
        PacketMeta { direction: DIR_EGRESS, ..Default::default() }
    }

    #[test]
    fn records_our_programs_cannot_have_written_are_errors() {
        assert!(decoder().decode(&[0u8; 10]).is_err(), "short");
        assert!(decoder().decode(&packet_record(egress(), &vxlan_frame(), HEAD_LONG)[..200]).is_err(), "no head size of ours");
        let unknown_direction = packet_record(PacketMeta { direction: 7, ..egress() }, &vxlan_frame(), HEAD_MEDIUM);
        assert!(decoder().decode(&unknown_direction).is_err());
        let mut overlong = packet_record(egress(), &vxlan_frame(), HEAD_SHORT);
        overlong[std::mem::offset_of!(PacketMeta, head_len)] = 200;
        assert!(decoder().decode(&overlong).is_err(), "a head longer than the record's");
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
    fn a_vxlan_record_exposes_the_inner_packet() {
        let mut decoder = decoder();
        let packet = decoder.decode(&packet_record(egress(), &vxlan_frame(), HEAD_MEDIUM)).unwrap().unwrap();
        assert_eq!(packet.direction, Direction::Egress);
        assert_eq!(packet.outer.src, "10.99.0.1".parse::<IpAddr>().unwrap());
        assert_eq!(packet.pod_layer().src, "10.244.0.2".parse::<IpAddr>().unwrap());
        assert_eq!(packet.pod_layer().payload_len(), 100);
        assert_eq!(packet.vni, Some(1));
        assert_eq!(decoder.counts(), DecodeCounts::default());
    }

    #[test]
    fn a_truncated_inner_packet_falls_back_to_the_outer_and_is_counted() {
        let mut decoder = decoder();
        let cut = &vxlan_frame()[..14 + 20 + 8 + 8 + 14 + 10];
        let packet = decoder.decode(&packet_record(egress(), cut, HEAD_MEDIUM)).unwrap().unwrap();
        assert!(packet.inner.is_none());
        assert!(packet.inner_truncated);
        assert_eq!(decoder.counts(), DecodeCounts { unparsed_records: 0, truncated_inner: 1 });
    }

    #[test]
    fn a_record_whose_headers_do_not_parse_is_counted_not_reported() {
        let mut decoder = decoder();
        assert_eq!(decoder.decode(&packet_record(egress(), &vxlan_frame()[..14 + 12], HEAD_SHORT)).unwrap(), None);
        assert_eq!(decoder.counts(), DecodeCounts { unparsed_records: 1, truncated_inner: 0 });
    }

    #[test]
    fn a_device_without_a_mac_header_starts_at_the_ip_header() {
        let meta = PacketMeta { hop_flags: HOP_NO_MAC_HEADER as u8, ..egress() };
        let packet = decoder().decode(&packet_record(meta, &vxlan_frame()[14..], HEAD_MEDIUM)).unwrap().unwrap();
        assert_eq!(packet.pod_layer().src, "10.244.0.2".parse::<IpAddr>().unwrap());
    }

    /// Pod 10.244.0.2:40000 masqueraded to the node's 10.99.0.1:61000 on its way to
    /// 203.0.113.10:8080: the packet keeps the pod's side, the wire's is kept beside it.
    #[test]
    fn a_translated_record_carries_the_pods_side_of_the_nat() {
        let tcp = [vec![0xee, 0x48, 0x1f, 0x90, 0, 0, 0, 1, 0, 0, 0, 0, 5 << 4, 0x02, 0, 0], vec![0; 4]].concat();
        let frame = ethernet(ipv4([10, 99, 0, 1], [203, 0, 113, 10], IPPROTO_TCP, &tcp));
        let pod = NatTuple {
            src: u32::from_ne_bytes([10, 244, 0, 2]),
            dst: u32::from_ne_bytes([203, 0, 113, 10]),
            sport: 40000u16.to_be(),
            dport: 8080u16.to_be(),
            proto: IPPROTO_TCP,
            flags: PKT_TRANSLATED,
            reserved: 0,
        };
        let packet = decoder().decode(&translated_record(egress(), pod, &frame)).unwrap().unwrap();
        let layer = packet.pod_layer();
        assert_eq!((layer.src, layer.sport, layer.dst, layer.dport), (ip("10.244.0.2"), 40000, ip("203.0.113.10"), 8080));
        assert_eq!(packet.translated, Some(Translation { src: ip("10.99.0.1"), dst: ip("203.0.113.10"), sport: 61000, dport: 8080 }));
        // An echo's id is its port.
        let echo = ethernet(ipv4([10, 99, 0, 1], [203, 0, 113, 10], IPPROTO_ICMP, &[8, 0, 0, 0, 0xee, 0x48, 0, 1]));
        let pod = NatTuple { sport: 7u16.to_be(), dport: 0, proto: IPPROTO_ICMP, ..pod };
        let packet = decoder().decode(&translated_record(egress(), pod, &echo)).unwrap().unwrap();
        assert_eq!((packet.outer.src, packet.outer.icmp_id), (ip("10.244.0.2"), 7));
        assert_eq!(packet.translated.unwrap().sport, 61000);
        // A tuple of another protocol than the packet's is no record of ours.
        assert!(decoder().decode(&translated_record(egress(), NatTuple { proto: IPPROTO_UDP, ..pod }, &echo)).is_err());
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    /// Pod A's ICMP echo request inside IPIP between nodes, as tunl0's ingress shows it on
    /// 5.10: the underlay's Ethernet header still in front.
    #[test]
    fn an_ipip_record_exposes_the_inner_packet_whichever_layout_the_hop_shows() {
        let pod_packet = ipv4([10, 244, 0, 2], [10, 244, 1, 2], IPPROTO_ICMP, &[8, 0, 0, 0, 0, 7, 0, 1]);
        let ipip = ipv4([10, 99, 0, 1], [10, 99, 0, 2], tracer_common::IPPROTO_IPIP, &pod_packet);
        // On the underlay NIC; on tunl0 with the IP header first; on tunl0 on 5.10.
        for (frame, hop_flags) in
            [(ethernet(ipip.clone()), 0), (ipip.clone(), HOP_NO_MAC_HEADER as u8), (ethernet(ipip), HOP_NO_MAC_HEADER as u8)]
        {
            let meta = PacketMeta { hop_flags, skb_len: frame.len() as u32, ..egress() };
            let packet = decoder().decode(&packet_record(meta, &frame, HEAD_SHORT)).unwrap().unwrap();
            assert_eq!(packet.pod_layer().src, "10.244.0.2".parse::<IpAddr>().unwrap(), "{frame:?}");
            assert_eq!((packet.outer.proto, packet.vni), (tracer_common::IPPROTO_IPIP, None), "{frame:?}");
        }
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
