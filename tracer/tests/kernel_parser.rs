//! The TC programs' parser, run in the kernel with BPF_PROG_TEST_RUN on crafted frames.
//!
//! Needs root (or CAP_BPF + CAP_NET_ADMIN). Each test loads its own copy of the programs, so
//! tests run in parallel without sharing maps.

use std::net::IpAddr;

use aya::programs::{TestRun, TestRunOptions};
use tracer::{
    Direction,
    events::decode::{Packet, PacketDecoder},
    kernel::{btf::KernelBtf, layout},
    probes::{AttachMode, Counters, EventRing, KERNEL_RING_BYTES, LoadOptions, Probes},
};
use tracer_common::{
    FilterConfig, HEAD_LONG, HEAD_MEDIUM, HEAD_SHORT, HOP_NAT, HOP_NO_MAC_HEADER, KernelLayout, NatTuple, PKT_TRANSLATED, PacketMeta,
    PacketRecord,
};

const POD: &str = "10.244.0.2";
const PEER: &str = "10.244.1.2";
/// BPF_PROG_TEST_RUN runs sched_cls programs on the loopback device.
const LOOPBACK: u32 = 1;
/// TC_ACT_UNSPEC as the kernel returns it: "continue".
const CONTINUE: u32 = u32::MAX;

struct Harness {
    probes: Probes,
    events: EventRing,
    /// Parses the records as `podtrace follow` does; what it counts joins the kernel's.
    decoder: PacketDecoder,
}

impl Harness {
    fn new(filter: FilterConfig, no_mac_header: bool) -> Self {
        let mut probes = Probes::load(
            &LoadOptions { filter, layout: Default::default(), ring_bytes: 1 << 16, kernel_ring_bytes: KERNEL_RING_BYTES },
            AttachMode::Auto,
        )
        .expect("loading the programs (are you root?)");
        probes.follow(POD.parse().unwrap()).unwrap();
        probes.register_hop(LOOPBACK, if no_mac_header { HOP_NO_MAC_HEADER } else { 0 }).unwrap();
        let events = probes.take_events().unwrap();
        Self { probes, events, decoder: PacketDecoder::new(filter.vxlan_ports) }
    }

    fn default() -> Self {
        Self::new(default_filter(), false)
    }

    /// Runs the program on `frame` and returns the events it emitted.
    fn run(&mut self, direction: Direction, frame: &[u8], ctx: Option<&[u8]>) -> Vec<Packet> {
        let program = self.probes.program(direction).unwrap();
        let mut opts = TestRunOptions { data_in: Some(frame), ..Default::default() };
        opts.ctx_in = ctx;
        let result = program.test_run(opts).expect("BPF_PROG_TEST_RUN");
        assert_eq!(result.return_value, CONTINUE, "the program must always let the packet continue");
        let mut packets = Vec::new();
        for item in records(&mut self.events) {
            packets.extend(self.decoder.decode(&item).unwrap());
        }
        packets
    }

    fn one(&mut self, frame: &[u8]) -> Packet {
        let mut packets = self.run(Direction::Ingress, frame, None);
        assert_eq!(packets.len(), 1, "expected exactly one event");
        packets.remove(0)
    }

    fn counters(&self) -> Counters {
        self.probes.counters().unwrap().with_decoded(self.decoder.counts())
    }
}

/// Every record the ring holds, copied out.
fn records(ring: &mut EventRing) -> Vec<Vec<u8>> {
    let mut records = Vec::new();
    ring.drain(|record| records.push(record.to_vec()));
    records
}

fn default_filter() -> FilterConfig {
    FilterConfig { vxlan_ports: [8472, 4789], ..Default::default() }
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

// ---- frame builders -------------------------------------------------------------------

fn ethernet(ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    frame.extend_from_slice(&ether_type.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

fn vlan(tpid: u16, vid: u16, inner_type: u16) -> Vec<u8> {
    let mut tag = tpid.to_be_bytes().to_vec();
    tag.extend_from_slice(&vid.to_be_bytes());
    tag.extend_from_slice(&inner_type.to_be_bytes());
    tag
}

struct V4 {
    src: [u8; 4],
    dst: [u8; 4],
    proto: u8,
    id: u16,
    ttl: u8,
    frag: u16,
    options: Vec<u8>,
}

impl V4 {
    fn new(src: &str, dst: &str, proto: u8) -> Self {
        let parse = |s: &str| s.parse::<std::net::Ipv4Addr>().unwrap().octets();
        Self { src: parse(src), dst: parse(dst), proto, id: 0x1234, ttl: 64, frag: 0x4000, options: vec![] }
    }

    fn packet(&self, l4: &[u8]) -> Vec<u8> {
        let ihl = 5 + self.options.len() / 4;
        let total = (ihl * 4 + l4.len()) as u16;
        let mut header = vec![0x40 | ihl as u8, 0];
        header.extend_from_slice(&total.to_be_bytes());
        header.extend_from_slice(&self.id.to_be_bytes());
        header.extend_from_slice(&self.frag.to_be_bytes());
        header.extend_from_slice(&[self.ttl, self.proto, 0, 0]);
        header.extend_from_slice(&self.src);
        header.extend_from_slice(&self.dst);
        header.extend_from_slice(&self.options);
        header.extend_from_slice(l4);
        header
    }
}

fn v6(src: &str, dst: &str, next: u8, flow_label: u32, payload: &[u8]) -> Vec<u8> {
    let mut header = (0x6000_0000u32 | flow_label).to_be_bytes().to_vec();
    header.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    header.extend_from_slice(&[next, 64]);
    header.extend_from_slice(&src.parse::<std::net::Ipv6Addr>().unwrap().octets());
    header.extend_from_slice(&dst.parse::<std::net::Ipv6Addr>().unwrap().octets());
    header.extend_from_slice(payload);
    header
}

fn tcp(sport: u16, dport: u16, seq: u32, ack: u32, flags: u8, payload: usize) -> Vec<u8> {
    let mut header = sport.to_be_bytes().to_vec();
    header.extend_from_slice(&dport.to_be_bytes());
    header.extend_from_slice(&seq.to_be_bytes());
    header.extend_from_slice(&ack.to_be_bytes());
    header.extend_from_slice(&[5 << 4, flags, 0xff, 0xff, 0, 0, 0, 0]);
    header.extend(std::iter::repeat_n(0xab, payload));
    header
}

fn udp(sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut header = sport.to_be_bytes().to_vec();
    header.extend_from_slice(&dport.to_be_bytes());
    header.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    header.extend_from_slice(&[0, 0]);
    header.extend_from_slice(payload);
    header
}

fn icmp_echo(kind: u8, id: u16, seq: u16) -> Vec<u8> {
    let mut header = vec![kind, 0, 0, 0];
    header.extend_from_slice(&id.to_be_bytes());
    header.extend_from_slice(&seq.to_be_bytes());
    header.extend_from_slice(&[0x55; 16]);
    header
}

fn vxlan(vni: u32, inner_frame: &[u8]) -> Vec<u8> {
    let mut header = vec![0x08, 0, 0, 0];
    header.extend_from_slice(&(vni << 8).to_be_bytes());
    header.extend_from_slice(inner_frame);
    header
}

/// IPIP between nodes, as Calico's tunl0 sends it: the pod's IPv4 packet right behind an
/// outer IPv4 header of protocol 4.
fn ipip(inner_packet: &[u8]) -> Vec<u8> {
    V4::new("10.99.0.1", "10.99.0.2", 4).packet(inner_packet)
}

fn pod_tcp_frame() -> Vec<u8> {
    ethernet(0x0800, &V4::new(POD, PEER, 6).packet(&tcp(40000, 80, 1000, 2000, 0x18, 100)))
}

// ---- tests ----------------------------------------------------------------------------

#[test]
fn plain_ipv4_tcp() {
    let mut harness = Harness::default();
    let packet = harness.one(&pod_tcp_frame());
    let layer = &packet.outer;
    assert_eq!((layer.src, layer.dst), (ip(POD), ip(PEER)));
    assert_eq!((layer.proto, layer.sport, layer.dport), (6, 40000, 80));
    assert_eq!((layer.tcp_seq, layer.tcp_ack, layer.tcp_flags), (1000, 2000, 0x18));
    assert_eq!((layer.ip_id, layer.ttl, layer.total_len, layer.header_len), (0x1234, 64, 140, 20));
    assert!(layer.dont_fragment && !layer.fragment && !layer.options);
    assert_eq!(layer.payload_len(), 100);
    assert_eq!((packet.ifindex, packet.direction, packet.skb_len), (LOOPBACK, Direction::Ingress, 154));
    assert!(packet.inner.is_none() && packet.vlan_id.is_none());
    assert_eq!(harness.counters(), Counters { matched: 1, ..Default::default() });
}

#[test]
fn egress_program_reports_egress() {
    let mut harness = Harness::default();
    let packets = harness.run(Direction::Egress, &pod_tcp_frame(), None);
    assert_eq!(packets[0].direction, Direction::Egress);
}

#[test]
fn gso_fields_come_from_the_skb() {
    let mut harness = Harness::default();
    // struct __sk_buff (UAPI): gso_segs at byte 164, gso_size at byte 176, 192 bytes long.
    let mut ctx = [0u8; 192];
    ctx[164..168].copy_from_slice(&3u32.to_ne_bytes());
    ctx[176..180].copy_from_slice(&1398u32.to_ne_bytes());
    let packets = harness.run(Direction::Egress, &pod_tcp_frame(), Some(&ctx));
    assert_eq!((packets[0].gso_segs, packets[0].gso_size), (3, 1398));
    assert!(packets[0].is_gso());
}

#[test]
fn vlan_tagged_and_qinq() {
    let mut harness = Harness::default();
    let l3 = V4::new(PEER, POD, 17).packet(&udp(53, 33000, b"answer"));
    let mut tagged = vlan(0x8100, 100, 0x0800);
    tagged.extend_from_slice(&l3);
    let mut frame = ethernet(0x8100, &[]);
    frame.truncate(12);
    frame.extend_from_slice(&tagged);
    let packet = harness.one(&frame);
    assert_eq!(packet.vlan_id, Some(100));
    assert_eq!((packet.outer.sport, packet.outer.dport, packet.outer.payload_len()), (53, 33000, 6));

    let mut qinq = vec![0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02];
    qinq.extend_from_slice(&vlan(0x88a8, 7, 0x8100));
    qinq.extend_from_slice(&vlan(0, 200, 0x0800)[2..]);
    qinq.extend_from_slice(&l3);
    let packet = harness.one(&qinq);
    assert_eq!(packet.vlan_id, Some(7), "the outer tag is reported");
    assert_eq!(packet.outer.dst, ip(POD));
}

#[test]
fn vxlan_on_both_ports_exposes_the_inner_packet() {
    for port in [8472, 4789] {
        let mut harness = Harness::default();
        let inner = ethernet(0x0800, &V4::new(POD, PEER, 1).packet(&icmp_echo(8, 77, 5)));
        let outer = V4::new("10.99.0.1", "10.99.0.2", 17).packet(&udp(51000, port, &vxlan(1, &inner)));
        let packet = harness.one(&ethernet(0x0800, &outer));
        assert_eq!(packet.vni, Some(1));
        assert_eq!((packet.outer.src, packet.outer.dport), (ip("10.99.0.1"), port));
        let inner = packet.inner.as_ref().expect("inner packet");
        assert_eq!((inner.src, inner.dst, inner.proto), (ip(POD), ip(PEER), 1));
        assert_eq!((inner.icmp_type, inner.icmp_id, inner.icmp_seq), (8, 77, 5));
        assert_eq!(packet.skb_len as usize, 14 + 20 + 8 + 8 + 14 + 20 + 24);
    }
}

#[test]
fn vxlan_with_other_endpoints_is_filtered_on_the_inner_ips() {
    let mut harness = Harness::default();
    let inner = ethernet(0x0800, &V4::new("10.244.5.5", "10.244.6.6", 1).packet(&icmp_echo(8, 1, 1)));
    let outer = V4::new("10.99.0.1", "10.99.0.2", 17).packet(&udp(51000, 8472, &vxlan(1, &inner)));
    assert!(harness.run(Direction::Ingress, &ethernet(0x0800, &outer), None).is_empty());
    assert_eq!(harness.counters(), Counters::default());
}

/// flannel-v6.1 over an IPv6 underlay: outer IPv6 to UDP 8472, VXLAN, the pod's IPv6 packet
/// inside. The inner packet is the followed one; the same tunnel's other pods are not.
#[test]
fn ipv6_vxlan_carrying_ipv6_exposes_the_inner_packet() {
    const PEER6: &str = "fd00:10:244:1::2";
    let mut harness = Harness::default();
    harness.probes.follow(ip(POD6)).unwrap();
    let vxlan6 = |src: &str| {
        let inner = ethernet(0x86dd, &v6(src, PEER6, 6, 0x54321, &tcp(40000, 5201, 7, 9, 0x18, 100)));
        ethernet(0x86dd, &v6("fd00:99::1", "fd00:99::2", 17, 0xabcde, &udp(51000, 8472, &vxlan(1, &inner))))
    };
    let packet = harness.one(&vxlan6(POD6));
    assert_eq!(packet.vni, Some(1));
    assert_eq!((packet.outer.src, packet.outer.dst, packet.outer.dport), (ip("fd00:99::1"), ip("fd00:99::2"), 8472));
    let inner = packet.inner.as_ref().expect("inner packet");
    assert_eq!((inner.src, inner.dst, inner.proto, inner.flow_label), (ip(POD6), ip(PEER6), 6, 0x54321));
    assert_eq!((inner.sport, inner.dport, inner.tcp_seq, inner.tcp_ack, inner.payload_len()), (40000, 5201, 7, 9, 100));
    assert_eq!(packet.skb_len as usize, 14 + 40 + 8 + 8 + 14 + 40 + 20 + 100);
    assert!(harness.run(Direction::Ingress, &vxlan6("fd00:10:244::9"), None).is_empty(), "another pod in the tunnel");
    assert_eq!(harness.counters(), Counters { matched: 1, ..Default::default() });
}

#[test]
fn ipv6_tcp_icmpv6_and_fragment_header() {
    let mut harness = Harness::default();
    harness.probes.follow(ip("fd00::2")).unwrap();
    let packet = harness.one(&ethernet(0x86dd, &v6("fd00::2", "fd00::9", 6, 0xabcde, &tcp(1, 2, 3, 4, 0x02, 0))));
    assert_eq!((packet.outer.src, packet.outer.proto, packet.outer.flow_label), (ip("fd00::2"), 6, 0xabcde));
    assert_eq!((packet.outer.sport, packet.outer.tcp_seq, packet.outer.total_len), (1, 3, 60));

    let packet = harness.one(&ethernet(0x86dd, &v6("fd00::9", "fd00::2", 58, 0, &icmp_echo(129, 9, 10))));
    assert_eq!((packet.outer.icmp_type, packet.outer.icmp_id, packet.outer.icmp_seq), (129, 9, 10));

    // Fragment header (first fragment, MF set) in front of UDP.
    let mut ext = vec![17, 0, 0x00, 0x01, 0, 0, 0xbe, 0xef];
    ext.extend_from_slice(&udp(5353, 53, b"q"));
    let packet = harness.one(&ethernet(0x86dd, &v6("fd00::2", "fd00::9", 44, 0, &ext)));
    let layer = &packet.outer;
    assert!(layer.fragment && !layer.later_fragment && layer.options);
    assert_eq!((layer.proto, layer.sport, layer.ip_id, layer.header_len), (17, 5353, 0xbeef, 48));
}

/// An ICMP error: type, code, checksum, 4 unused bytes, then the quote.
fn icmp_error(kind: u8, code: u8, quote: &[u8]) -> Vec<u8> {
    let mut header = vec![kind, code, 0, 0, 0, 0, 0, 0];
    header.extend_from_slice(quote);
    header
}

#[test]
fn icmp_errors_name_the_flow_they_quote() {
    let mut harness = Harness::default();
    // Port unreachable from the peer, quoting the pod's UDP datagram (header + 8 bytes).
    let quoted = V4::new(POD, PEER, 17).packet(&udp(40000, 9999, b"payload!"));
    let packet = harness.one(&ethernet(0x0800, &V4::new(PEER, POD, 1).packet(&icmp_error(3, 3, &quoted[..28]))));
    let layer = &packet.outer;
    assert_eq!((layer.icmp_type, layer.icmp_code), (3, 3));
    assert_eq!((layer.quoted_proto, layer.quoted_sport, layer.quoted_dport), (17, 40000, 9999));
    assert!(layer.describe().contains("udp :40000 > :9999"), "{}", layer.describe());

    // The quote's IP header with options: the ports sit after them.
    let mut with_options = V4::new(POD, PEER, 6);
    with_options.options = vec![0x01, 0x01, 0x01, 0x00];
    let quoted = with_options.packet(&tcp(40001, 8080, 1, 0, 0x02, 0));
    let packet = harness.one(&ethernet(0x0800, &V4::new(PEER, POD, 1).packet(&icmp_error(3, 3, &quoted[..32]))));
    assert_eq!((packet.outer.quoted_proto, packet.outer.quoted_sport, packet.outer.quoted_dport), (6, 40001, 8080));

    // A quote cut short inside the ports: the ICMP header still makes an event, unparsed
    // fields stay zero, and nothing counts as unparsed.
    let quoted = V4::new(POD, PEER, 17).packet(&udp(40000, 9999, b""));
    let packet = harness.one(&ethernet(0x0800, &V4::new(PEER, POD, 1).packet(&icmp_error(3, 3, &quoted[..22]))));
    assert_eq!((packet.outer.quoted_proto, packet.outer.quoted_sport, packet.outer.quoted_dport), (17, 0, 0));

    // Echo replies quote nothing.
    let packet = harness.one(&ethernet(0x0800, &V4::new(PEER, POD, 1).packet(&icmp_echo(0, 7, 8))));
    assert_eq!((packet.outer.quoted_proto, packet.outer.quoted_dport), (0, 0));

    // ICMPv6 port unreachable (1/4) quoting a UDP datagram.
    harness.probes.follow(ip("fd00::2")).unwrap();
    let quoted = v6("fd00::2", "fd00::9", 17, 0, &udp(5000, 53, b"q"));
    let packet = harness.one(&ethernet(0x86dd, &v6("fd00::9", "fd00::2", 58, 0, &icmp_error(1, 4, &quoted))));
    assert_eq!((packet.outer.icmp_type, packet.outer.icmp_code), (1, 4));
    assert_eq!((packet.outer.quoted_proto, packet.outer.quoted_sport, packet.outer.quoted_dport), (17, 5000, 53));
    assert_eq!(harness.counters(), Counters { matched: 5, ..Default::default() });
}

/// The fast path reports a plain IPv4 packet with the frame's first 128 bytes: enough for
/// the deepest headers such a packet has, a TCP header with 40 bytes of options (the
/// timestamp last) and an ICMP error quoting an IPv4 header with 40 bytes of options. Each
/// comes out as the full parse reads it.
#[test]
fn the_short_head_holds_a_plain_packets_deepest_headers() {
    let mut fast = Harness::default();
    let mut full = Harness::new(FilterConfig { full_parse_only: 1, ..default_filter() }, false);
    let mut segment = tcp(40000, 80, 1, 2, 0x10, 1400);
    segment[12] = 15 << 4;
    // MSS, window scale, NOP, SACK permitted, a 20-byte experimental option, timestamp.
    let options =
        [[2u8, 4, 5, 0xb4, 3, 3, 7, 1, 4, 2, 254, 20].as_slice(), &[0; 18], &[8, 10, 0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 1]].concat();
    segment.splice(20..20, options);
    let mut quoting = V4::new(POD, PEER, 17);
    quoting.options = vec![1; 40];
    let quoted = quoting.packet(&udp(40001, 9999, b"payload!"));
    let frames = [
        ethernet(0x0800, &V4::new(POD, PEER, 6).packet(&segment)),
        ethernet(0x0800, &V4::new(PEER, POD, 1).packet(&icmp_error(3, 3, &quoted[..68]))),
    ];
    let mut packets = Vec::new();
    for frame in &frames {
        let (mut a, mut b) = (fast.one(frame), full.one(frame));
        (a.ktime_ns, b.ktime_ns) = (0, 0);
        assert_eq!(a, b);
        packets.push(a);
    }
    assert_eq!(packets[0].outer.tcp_tsval, 0xdead_beef);
    assert_eq!((packets[1].outer.quoted_proto, packets[1].outer.quoted_sport, packets[1].outer.quoted_dport), (17, 40001, 9999));
    let events = [fast.counters(), full.counters()];
    assert_eq!(events, [Counters { matched: 2, ..Default::default() }; 2]);
}

/// A packet event carries the frame's headers, never its payload: the head stops where the
/// last header the parse reads ends (a UDP payload's first 4 bytes, an ICMP error's quoted
/// IP header and the 8 bytes after it, a VXLAN packet's inner headers), on the fast path and
/// the full parse alike.
#[test]
fn events_carry_headers_never_payload() {
    const POD6: &str = "fd00:10:244::2";
    const PEER6: &str = "fd00:10:244:1::2";
    let mut fast = Harness::default();
    let mut full = Harness::new(FilterConfig { full_parse_only: 1, ..default_filter() }, false);
    for harness in [&mut fast, &mut full] {
        harness.probes.follow(ip(POD6)).unwrap();
    }
    let mut timestamped = tcp(40000, 80, 1, 2, 0x10, 1000);
    timestamped[12] = 8 << 4;
    timestamped.splice(20..20, [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
    let quoted = V4::new(POD, PEER, 17).packet(&udp(40001, 53, &[0xab; 200]));
    let mut later_fragment = V4::new(POD, PEER, 6);
    later_fragment.frag = 185;
    let cases: [(&str, Vec<u8>, usize); 9] = [
        ("TCP", pod_tcp_frame(), 14 + 20 + 20),
        ("TCP with options", ethernet(0x0800, &V4::new(POD, PEER, 6).packet(&timestamped)), 14 + 20 + 32),
        ("UDP", ethernet(0x0800, &V4::new(POD, PEER, 17).packet(&udp(40000, 53, &[0xab; 300]))), 14 + 20 + 8 + 4),
        ("ICMP echo", ethernet(0x0800, &V4::new(POD, PEER, 1).packet(&icmp_echo(8, 7, 1))), 14 + 20 + 8),
        ("ICMP error", ethernet(0x0800, &V4::new(PEER, POD, 1).packet(&icmp_error(3, 3, &quoted))), 14 + 20 + 8 + 20 + 8),
        ("later fragment", ethernet(0x0800, &later_fragment.packet(&[0xab; 500])), 14 + 20),
        ("other protocol", ethernet(0x0800, &V4::new(POD, PEER, 47).packet(&[0xab; 500])), 14 + 20),
        (
            "VXLAN",
            ethernet(0x0800, &V4::new("192.168.0.1", "192.168.0.2", 17).packet(&udp(50000, 8472, &vxlan(1, &pod_tcp_frame())))),
            50 + 54,
        ),
        ("IPv6 TCP", ethernet(0x86dd, &v6(POD6, PEER6, 6, 0, &tcp(40000, 80, 1, 2, 0x10, 1000))), 14 + 40 + 20),
    ];
    for (what, frame, headers_end) in &cases {
        for (path, harness) in [("fast", &mut fast), ("full", &mut full)] {
            let program = harness.probes.program(Direction::Ingress).unwrap();
            program.test_run(TestRunOptions { data_in: Some(frame), ..Default::default() }).unwrap();
            let mut heads = Vec::new();
            for item in records(&mut harness.events) {
                assert!(item.len() >= size_of::<PacketMeta>());
                // SAFETY: the record starts with a PacketMeta (checked long enough), read unaligned.
                let meta: PacketMeta = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
                heads.push(usize::from(meta.head_len));
            }
            assert_eq!(heads, [*headers_end], "{what} ({path} path): the head copied");
        }
    }
}

#[test]
fn ipv4_fragments_and_options() {
    let mut harness = Harness::default();
    let mut first = V4::new(POD, PEER, 17);
    first.frag = 0x2000;
    let packet = harness.one(&ethernet(0x0800, &first.packet(&udp(4000, 5000, &[0; 64]))));
    assert!(packet.outer.fragment && !packet.outer.later_fragment);
    assert_eq!(packet.outer.sport, 4000);

    let mut later = V4::new(POD, PEER, 17);
    later.frag = 0x0010;
    // A later fragment's payload is not a UDP header; its bytes must not be read as ports.
    let packet = harness.one(&ethernet(0x0800, &later.packet(&[0x11; 32])));
    assert!(packet.outer.later_fragment);
    assert_eq!((packet.outer.sport, packet.outer.dport, packet.outer.payload_len()), (0, 0, 32));

    let mut with_options = V4::new(POD, PEER, 6);
    with_options.options = vec![0x01, 0x01, 0x01, 0x00];
    let packet = harness.one(&ethernet(0x0800, &with_options.packet(&tcp(1111, 2222, 9, 0, 0x02, 0))));
    assert!(packet.outer.options);
    assert_eq!((packet.outer.header_len, packet.outer.sport, packet.outer.tcp_seq), (24, 1111, 9));
}

#[test]
fn truncated_at_every_header_boundary_counts_unparsed() {
    let assert_unparsed = |frame: &[u8], what: &str| {
        let mut harness = Harness::default();
        assert!(harness.run(Direction::Ingress, frame, None).is_empty(), "{what}");
        assert_eq!(harness.counters(), Counters { unparsed: 1, ..Default::default() }, "{what}");
    };
    // IPv4 header present, cut after it and inside TCP.
    let frame = pod_tcp_frame();
    assert_unparsed(&frame[..34], "IPv4 header only");
    assert_unparsed(&frame[..44], "mid TCP header");
    // The kernel refuses to test-run an IPv4 frame shorter than its IP header, so the cuts
    // before it are made behind a VLAN tag, which the kernel does not look into.
    let mut tagged = frame[..12].to_vec();
    tagged.extend_from_slice(&vlan(0x8100, 5, 0x0800));
    tagged.extend_from_slice(&frame[14..]);
    let mut whole = Harness::default();
    assert_eq!(whole.run(Direction::Ingress, &tagged, None).len(), 1, "whole tagged frame parses");
    assert_eq!(whole.counters(), Counters { matched: 1, ..Default::default() }, "whole tagged frame");
    for (cut, what) in
        [(15, "mid VLAN tag"), (18, "VLAN tag only"), (28, "mid IPv4 header"), (38, "IPv4 header only"), (48, "mid TCP header")]
    {
        assert_unparsed(&tagged[..cut], what);
    }
    // IPv6: cut inside the fixed header and inside the fragment extension header.
    let mut ext = vec![17, 0, 0, 1, 0, 0, 0, 1];
    ext.extend_from_slice(&udp(1, 2, b""));
    let v6_frame = ethernet(0x86dd, &v6("fd00::2", "fd00::9", 44, 0, &ext));
    let mut harness = Harness::default();
    harness.probes.follow(ip("fd00::2")).unwrap();
    assert_eq!(harness.run(Direction::Ingress, &v6_frame, None).len(), 1, "whole IPv6 frame parses");
    assert_eq!(harness.counters(), Counters { matched: 1, ..Default::default() }, "whole IPv6 frame");
    for (cut, what) in [(14 + 54, "mid fragment header"), (14 + 40 + 8 + 4, "mid UDP header")] {
        let mut harness = Harness::default();
        harness.probes.follow(ip("fd00::2")).unwrap();
        assert!(harness.run(Direction::Ingress, &v6_frame[..cut], None).is_empty(), "{what}");
        assert_eq!(harness.counters(), Counters { unparsed: 1, ..Default::default() }, "{what}");
    }
}

/// Only packets that could be the followed pod's make the report incomplete: another flow's
/// header cut after its addresses is not counted, a header cut before any address is.
/// The TC programs parse a copy of the packet's first 256 bytes (one helper call instead of
/// one per header). A followed packet whose L4 header starts past them is counted as
/// unparsed, never reported with made-up ports or dropped silently; one just inside them is
/// parsed whole.
#[test]
fn headers_past_the_parsed_bytes_count_as_unparsed() {
    let with_hop_by_hop = |units: u8| {
        // Hop-by-hop options header: next header TCP, length in 8-byte units beyond the first 8.
        let mut ext = vec![6, units];
        ext.resize(8 * (usize::from(units) + 1), 0);
        // PadN covering the rest, so the options are well formed.
        ext[2] = 1;
        ext[3] = (ext.len() - 4) as u8;
        ext.extend_from_slice(&tcp(40000, 80, 1, 0, 0x10, 0));
        ethernet(0x86dd, &v6("fd00::2", "fd00::9", 0, 0, &ext))
    };
    // 22 units: TCP at 14 + 40 + 8 * 23 = 238, its first 14 bytes inside the 256.
    // 30 units: TCP at 14 + 40 + 8 * 31 = 302, past them.
    let mut inside = Harness::default();
    inside.probes.follow(ip("fd00::2")).unwrap();
    let events = inside.run(Direction::Ingress, &with_hop_by_hop(22), None);
    assert_eq!(events.len(), 1, "TCP header inside the parsed bytes");
    assert_eq!((events[0].outer.sport, events[0].outer.dport), (40000, 80));
    let mut past = Harness::default();
    past.probes.follow(ip("fd00::2")).unwrap();
    assert!(past.run(Direction::Ingress, &with_hop_by_hop(30), None).is_empty(), "TCP header past the parsed bytes");
    assert_eq!(past.counters(), Counters { unparsed: 1, ..Default::default() });
}

#[test]
fn unparsed_counts_only_what_could_be_followed() {
    let other = ethernet(0x0800, &V4::new("10.244.0.9", "10.244.1.9", 6).packet(&tcp(1, 2, 3, 4, 0x10, 0)));
    let vxlan_of = |inner: &[u8]| ethernet(0x0800, &V4::new("10.99.0.1", "10.99.0.2", 17).packet(&udp(51000, 8472, &vxlan(1, inner))));
    let other_inner = ethernet(0x0800, &V4::new("10.244.0.9", PEER, 1).packet(&icmp_echo(8, 1, 1)));
    let pod_inner = ethernet(0x0800, &V4::new(POD, PEER, 1).packet(&icmp_echo(8, 1, 1)));
    let mut tagged_other = other[..12].to_vec();
    tagged_other.extend_from_slice(&vlan(0x8100, 5, 0x0800));
    tagged_other.extend_from_slice(&other[14..]);
    let cases: [(&str, Vec<u8>, Counters); 5] = [
        ("another flow cut inside TCP", other[..44].to_vec(), Counters::default()),
        ("another flow cut inside its IPv4 header", tagged_other[..28].to_vec(), Counters { unparsed: 1, ..Default::default() }),
        ("another pod's VXLAN payload cut inside ICMP", vxlan_of(&other_inner[..14 + 20 + 2]), Counters::default()),
        (
            "a VXLAN payload cut inside the inner IPv4 header",
            vxlan_of(&other_inner[..14 + 10]),
            Counters { unparsed: 1, ..Default::default() },
        ),
        (
            "the followed pod's VXLAN payload cut inside ICMP",
            vxlan_of(&pod_inner[..14 + 20 + 2]),
            Counters { matched: 1, unparsed: 1, ..Default::default() },
        ),
    ];
    for (what, frame, counters) in cases {
        let mut harness = Harness::default();
        let events = harness.run(Direction::Ingress, &frame, None);
        assert_eq!(events.len() as u64, counters.matched, "{what}");
        assert_eq!(harness.counters(), counters, "{what}");
    }
}

/// The fields that tell apart packets with equal IP IDs: a DNS query's id, and the TCP
/// timestamp and newest SACK edge behind the usual NOPs.
#[test]
fn payload_head_timestamp_and_sack_edge_come_from_the_kernel() {
    let mut harness = Harness::default();
    let mut dns_query = V4::new(POD, "10.96.0.10", 17);
    dns_query.id = 0;
    let packet = harness.one(&ethernet(0x0800, &dns_query.packet(&udp(40000, 53, b"\xbe\xef\x01\x00\x00\x01"))));
    assert_eq!((packet.outer.ip_id, packet.outer.payload_head), (0, [0xbe, 0xef, 0x01, 0x00]));

    let mut segment = tcp(40000, 80, 1000, 2000, 0x10, 0);
    segment[12] = 13 << 4;
    segment.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0x30, 0x39, 0, 0, 0, 7, 1, 1, 5, 18]);
    segment.extend_from_slice(&[0, 0, 0x10, 0, 0, 0, 0x20, 0, 0, 0, 0, 1, 0, 0, 0, 2]);
    harness.probes.follow(ip(POD6)).unwrap();
    let packet = harness.one(&ethernet(0x86dd, &v6(POD6, "fd00::9", 6, 0x12345, &segment)));
    assert_eq!((packet.outer.tcp_tsval, packet.outer.tcp_sack_right), (12345, 0x2000));
}

#[test]
fn truncated_vxlan_payload_keeps_the_outer_event() {
    let inner = ethernet(0x0800, &V4::new(POD, PEER, 1).packet(&icmp_echo(8, 1, 1)));
    let outer_ip = V4::new("10.99.0.1", "10.99.0.2", 17);
    // The full frame routes on the outer IPs only if they are followed, so follow the node.
    for cut in [4, 14 + 10, 14 + 20 + 2] {
        let mut harness = Harness::default();
        harness.probes.follow(ip("10.99.0.1")).unwrap();
        let payload = vxlan(1, &inner[..cut]);
        let frame = ethernet(0x0800, &outer_ip.packet(&udp(51000, 8472, &payload)));
        let packet = harness.one(&frame);
        assert!(packet.inner_truncated && packet.inner.is_none(), "cut at {cut}");
        assert_eq!(harness.counters(), Counters { matched: 1, unparsed: 1, ..Default::default() });
    }
}

#[test]
fn non_ip_frames_are_counted_not_reported() {
    let mut harness = Harness::default();
    let arp = ethernet(0x0806, &[0u8; 28]);
    assert!(harness.run(Direction::Ingress, &arp, None).is_empty());
    assert_eq!(harness.counters(), Counters { not_ip: 1, ..Default::default() });
}

#[test]
fn unfollowed_traffic_and_unregistered_devices_are_ignored() {
    let mut harness = Harness::default();
    let other = ethernet(0x0800, &V4::new("10.1.1.1", "10.1.1.2", 6).packet(&tcp(1, 2, 3, 4, 0x10, 0)));
    assert!(harness.run(Direction::Ingress, &other, None).is_empty());

    let mut probes = Probes::load(
        &LoadOptions { filter: default_filter(), layout: Default::default(), ring_bytes: 1 << 16, kernel_ring_bytes: KERNEL_RING_BYTES },
        AttachMode::Auto,
    )
    .unwrap();
    probes.follow(ip(POD)).unwrap();
    let mut events = probes.take_events().unwrap();
    let program = probes.program(Direction::Ingress).unwrap();
    let frame = pod_tcp_frame();
    program.test_run(TestRunOptions { data_in: Some(&frame), ..Default::default() }).unwrap();
    assert!(records(&mut events).is_empty(), "loopback is not a registered hop");
    assert_eq!(probes.counters().unwrap(), Counters::default());
}

#[test]
fn peer_port_and_protocol_narrow_the_filter() {
    let peer = ip(PEER);
    let IpAddr::V4(peer_v4) = peer else { unreachable!() };
    let frames = [
        pod_tcp_frame(),
        ethernet(0x0800, &V4::new(POD, "10.244.9.9", 6).packet(&tcp(40000, 80, 1, 0, 0x10, 0))),
        ethernet(0x0800, &V4::new(POD, PEER, 6).packet(&tcp(40000, 443, 1, 0, 0x10, 0))),
        ethernet(0x0800, &V4::new(POD, PEER, 17).packet(&udp(40000, 80, b"x"))),
    ];
    let filter = FilterConfig { peer: peer_v4.to_ipv6_mapped().octets(), has_peer: 1, proto: 6, port: 80, ..default_filter() };
    let mut harness = Harness::new(filter, false);
    let matched: Vec<usize> =
        frames.iter().enumerate().filter(|(_, frame)| !harness.run(Direction::Ingress, frame, None).is_empty()).map(|(i, _)| i).collect();
    assert_eq!(matched, [0]);
}

#[test]
fn devices_without_a_mac_header() {
    let mut harness = Harness::new(default_filter(), true);
    let packet = harness.one(&V4::new(POD, PEER, 17).packet(&udp(1000, 2000, &[0; 20])));
    assert_eq!((packet.outer.src, packet.outer.sport, packet.outer.dport), (ip(POD), 1000, 2000));
}

/// IPIP (Calico's tunl0) as the underlay NIC shows it (after Ethernet), as tunl0 shows it (IP
/// first), and as tunl0's ingress shows it on 5.10 (the underlay's Ethernet header still in
/// front, on a hop without a MAC header): the pod's packet is followed by its inner
/// addresses, reported with the short head, by the fast test and the full parse alike; another
/// pod's IPIP packet is turned away by both, counting nothing.
#[test]
fn ipip_is_followed_to_the_inner_packet_in_every_layout() {
    let pod = ipip(&V4::new(POD, PEER, 6).packet(&tcp(40000, 80, 1000, 2000, 0x18, 100)));
    let other = ipip(&V4::new("10.244.0.9", PEER, 6).packet(&tcp(40000, 80, 1000, 2000, 0x18, 100)));
    for (no_mac_header, layout) in [(false, "after Ethernet"), (true, "IP first"), (true, "Ethernet on a hop without a MAC header")] {
        let framed = |packet: &[u8]| if layout == "IP first" { packet.to_vec() } else { ethernet(0x0800, packet) };
        for full_parse_only in [0, 1] {
            let what = format!("{layout}, full_parse_only {full_parse_only}");
            let mut harness = Harness::new(FilterConfig { full_parse_only, ..default_filter() }, no_mac_header);
            let program = harness.probes.program(Direction::Ingress).unwrap();
            program.test_run(TestRunOptions { data_in: Some(&framed(&pod)), ..Default::default() }).unwrap();
            let items = records(&mut harness.events);
            assert_eq!(items.len(), 1, "{what}: one event");
            let item = &items[0];
            assert_eq!(item.len(), size_of::<PacketRecord<HEAD_SHORT>>(), "{what}: the smallest head that holds its 74 bytes of headers");
            let packet = harness.decoder.decode(item).unwrap().unwrap();
            assert_eq!((packet.outer.src, packet.outer.proto), (ip("10.99.0.1"), 4), "{what}");
            let inner = packet.inner.as_ref().unwrap_or_else(|| panic!("{what}: no inner packet"));
            assert_eq!((inner.src, inner.dst, inner.sport, inner.tcp_seq), (ip(POD), ip(PEER), 40000, 1000), "{what}");
            assert_eq!(inner.payload_len(), 100, "{what}");
            assert!(harness.run(Direction::Ingress, &framed(&other), None).is_empty(), "{what}");
            assert_eq!(harness.counters(), Counters { matched: 1, ..Default::default() }, "{what}");
        }
    }
}

/// TCP with `options` bytes of options (NOPs, then an end-of-options byte) and a payload.
fn tcp_with_options(options: usize) -> Vec<u8> {
    let mut segment = tcp(40000, 80, 1000, 2000, 0x18, 1000);
    segment[12] = (((20 + options) / 4) << 4) as u8;
    let mut padding = vec![1u8; options];
    if let Some(last) = padding.last_mut() {
        *last = 0;
    }
    segment.splice(20..20, padding);
    segment
}

/// Every event's record is the smallest of the three heads that holds the packet's headers
/// (`tracer_common::head_size`), whether the fast test or the full parse reported it, and
/// decodes to the same packet either way: the kernel writes, and the reader reads, no more
/// of the ring than the headers need.
#[test]
fn each_event_takes_the_smallest_head_that_holds_its_headers() {
    const POD6: &str = "fd00:10:244::2";
    const PEER6: &str = "fd00:10:244:1::2";
    let plain = |options| ethernet(0x0800, &V4::new(POD, PEER, 6).packet(&tcp_with_options(options)));
    let in_vxlan = |inner: Vec<u8>| {
        ethernet(0x0800, &V4::new("10.99.0.1", "10.99.0.2", 17).packet(&udp(51000, 8472, &vxlan(1, &ethernet(0x0800, &inner)))))
    };
    let vxlan_tcp = |options| in_vxlan(V4::new(POD, PEER, 6).packet(&tcp_with_options(options)));
    let vxlan6 = |options| {
        let inner = ethernet(0x86dd, &v6(POD6, PEER6, 6, 0, &tcp_with_options(options)));
        ethernet(0x0800, &V4::new("10.99.0.1", "10.99.0.2", 17).packet(&udp(51000, 8472, &vxlan(1, &inner))))
    };
    // The VLAN tag's TPID is `ethernet`'s EtherType.
    let tagged = ethernet(0x8100, &[&vlan(0x8100, 7, 0x0800)[2..], &V4::new(POD, PEER, 6).packet(&tcp_with_options(40))].concat());
    // (frame, where its headers end, the head that holds them); the tagged and the IPv6
    // frames are the full parse's to report on both programs, the rest the fast test's on one.
    let cases = [
        ("plain TCP", plain(0), 54, HEAD_SHORT),
        ("plain TCP, 40 bytes of options", plain(40), 94, HEAD_SHORT),
        ("VLAN-tagged TCP, 40 bytes of options", tagged, 98, HEAD_MEDIUM),
        ("IPIP", ethernet(0x0800, &ipip(&V4::new(POD, PEER, 6).packet(&tcp_with_options(0)))), 74, HEAD_SHORT),
        ("VXLAN TCP", vxlan_tcp(0), 104, HEAD_MEDIUM),
        ("VXLAN TCP, 40 bytes of options", vxlan_tcp(40), 144, HEAD_MEDIUM),
        ("VXLAN IPv6 TCP", vxlan6(0), 124, HEAD_MEDIUM),
        ("VXLAN IPv6 TCP, 40 bytes of options", vxlan6(40), 164, HEAD_LONG),
    ];
    let mut fast = Harness::default();
    let mut full = Harness::new(FilterConfig { full_parse_only: 1, ..default_filter() }, false);
    for harness in [&mut fast, &mut full] {
        harness.probes.follow(ip(POD6)).unwrap();
    }
    for (what, frame, headers_end, head) in cases {
        assert_eq!(tracer_common::head_size(headers_end), head, "{what}");
        let mut packets = Vec::new();
        for harness in [&mut fast, &mut full] {
            let program = harness.probes.program(Direction::Ingress).unwrap();
            program.test_run(TestRunOptions { data_in: Some(&frame), ..Default::default() }).unwrap();
            let items = records(&mut harness.events);
            let item = items.first().unwrap_or_else(|| panic!("{what}: no event"));
            assert_eq!(item.len(), size_of::<PacketMeta>() + head, "{what}");
            // SAFETY: at least a PacketMeta's bytes, checked above; plain old data, read unaligned.
            let meta: PacketMeta = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            assert_eq!(usize::from(meta.head_len), headers_end, "{what}: the headers, never payload");
            let mut packet = harness.decoder.decode(item).unwrap().unwrap_or_else(|| panic!("{what}: unparsed"));
            packet.ktime_ns = 0;
            packets.push(packet);
        }
        assert_eq!(packets[0], packets[1], "{what}: the fast test and the full parse");
    }
    assert_eq!(fast.counters(), full.counters());
}

// ---- fuzzing: random and mutated frames ------------------------------------------------

/// xorshift64*: a small deterministic generator, so a failing frame can be reproduced from the
/// seed and the index printed with it.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, bound: usize) -> usize {
        (self.next() % bound as u64) as usize
    }
}

/// Well-formed frames of every shape the parser knows, each to or from a followed address.
fn seed_frames() -> Vec<Vec<u8>> {
    let pod_udp = V4::new(POD, PEER, 17).packet(&udp(40000, 53, b"\x12\x34query"));
    let pod_icmp = V4::new(POD, PEER, 1).packet(&icmp_echo(8, 3, 4));
    let mut with_options = V4::new(PEER, POD, 6);
    with_options.options = vec![0x01; 8];
    let inner = ethernet(0x0800, &pod_icmp);
    let vxlan_frame = |inner: &[u8]| V4::new("10.99.0.1", "10.99.0.2", 17).packet(&udp(51000, 8472, &vxlan(1, inner)));
    let vxlan_in_vxlan = ethernet(0x0800, &vxlan_frame(&ethernet(0x0800, &vxlan_frame(&inner))));
    let mut vlan_stack = ethernet(0x8100, &[]);
    vlan_stack.truncate(12);
    for _ in 0..4 {
        vlan_stack.extend_from_slice(&vlan(0x8100, 9, 0x8100)[..4]);
    }
    vlan_stack.extend_from_slice(&0x0800u16.to_be_bytes());
    vlan_stack.extend_from_slice(&pod_udp);
    let mut fragment_ext = vec![17, 0, 0, 1, 0, 0, 0, 7];
    fragment_ext.extend_from_slice(&udp(5353, 53, b"q"));
    vec![
        pod_tcp_frame(),
        ethernet(0x0800, &pod_udp),
        ethernet(0x0800, &pod_icmp),
        ethernet(0x0800, &with_options.packet(&tcp(80, 40000, 5, 6, 0x12, 40))),
        ethernet(0x0800, &V4::new(PEER, POD, 1).packet(&icmp_error(3, 4, &pod_udp[..28]))),
        ethernet(0x0800, &vxlan_frame(&inner)),
        ethernet(0x0800, &ipip(&pod_icmp)),
        vxlan_in_vxlan,
        vlan_stack,
        ethernet(0x86dd, &v6(POD6, "fd00::9", 6, 0x12345, &tcp(1, 2, 3, 4, 0x02, 10))),
        ethernet(0x86dd, &v6("fd00::9", POD6, 44, 0, &fragment_ext)),
        ethernet(
            0x86dd,
            &v6(
                "fd00:99::1",
                "fd00:99::2",
                17,
                0,
                &udp(51000, 8472, &vxlan(1, &ethernet(0x86dd, &v6(POD6, "fd00::9", 58, 0, &icmp_echo(128, 3, 4))))),
            ),
        ),
    ]
}

const POD6: &str = "fd00::2";

/// One mutation of `frame`: truncation, byte flips, a header length or total length that
/// lies, another EtherType, an extra VLAN tag or another VXLAN wrapping.
fn mutate(rng: &mut Rng, frame: &[u8]) -> Vec<u8> {
    let mut frame = frame.to_vec();
    for _ in 0..1 + rng.below(3) {
        match rng.below(7) {
            0 => frame.truncate(14 + rng.below(frame.len().saturating_sub(13).max(1))),
            1 => {
                let at = rng.below(frame.len());
                frame[at] ^= 1 << rng.below(8);
            }
            // IHL anywhere from 0 to 15 (the first byte after the Ethernet header).
            2 if frame.len() > 14 => frame[14] = (frame[14] & 0xf0) | rng.below(16) as u8,
            // A total length or payload length that disagrees with the frame.
            3 if frame.len() > 18 => {
                let length = rng.next() as u16;
                frame[16..18].copy_from_slice(&length.to_be_bytes());
            }
            4 => {
                let ether_type = [0x0800u16, 0x86dd, 0x8100, 0x88a8, 0x0806, 0x1234][rng.below(6)];
                frame[12..14].copy_from_slice(&ether_type.to_be_bytes());
            }
            5 => {
                let mut tagged = frame[..12].to_vec();
                tagged.extend_from_slice(&vlan(0x8100, rng.below(4096) as u16, u16::from_be_bytes([frame[12], frame[13]])));
                tagged.extend_from_slice(&frame[14..]);
                frame = tagged;
            }
            _ => {
                let outer = V4::new(POD, "10.99.0.2", 17).packet(&udp(51000, [8472, 4789][rng.below(2)], &vxlan(1, &frame)));
                frame = ethernet(0x0800, &outer);
            }
        }
    }
    frame
}

fn contains(frame: &[u8], needle: &[u8]) -> bool {
    frame.windows(needle.len()).any(|window| window == needle)
}

/// 10,000 frames, half fully random, half mutated from every shape the parser knows, through
/// both programs. The verdict is always "continue"; each frame yields at most one event, every
/// event decodes and names a followed address, a frame without a followed address yields
/// none, and the kernel's counters account for every event.
#[test]
fn random_and_mutated_frames_never_break_the_parser() {
    let mut harness = Harness::default();
    harness.probes.follow(ip(POD6)).unwrap();
    let followed = [ip(POD), ip(POD6)];
    let needles: Vec<Vec<u8>> = followed
        .iter()
        .map(|address| match address {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        })
        .collect();
    let seeds = seed_frames();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let (mut events, mut rejected) = (0u64, 0u64);
    for index in 0..10_000 {
        let frame = if index % 2 == 0 {
            let len = 14 + rng.below(200);
            (0..len).map(|_| rng.next() as u8).collect::<Vec<u8>>()
        } else {
            let seed = &seeds[rng.below(seeds.len())];
            mutate(&mut rng, seed)
        };
        let direction = if index % 3 == 0 { Direction::Egress } else { Direction::Ingress };
        let program = harness.probes.program(direction).unwrap();
        // The kernel itself refuses to test-run some frames (an IP EtherType with less than
        // an IP header); those never reach the program.
        let Ok(result) = program.test_run(TestRunOptions { data_in: Some(&frame), ..Default::default() }) else {
            rejected += 1;
            continue;
        };
        assert_eq!(result.return_value, CONTINUE, "frame {index}: {frame:02x?}");
        let mut emitted = Vec::new();
        for item in records(&mut harness.events) {
            emitted.extend(harness.decoder.decode(&item).unwrap_or_else(|err| panic!("frame {index}: undecodable event: {err:#}")));
        }
        assert!(emitted.len() <= 1, "frame {index}: {} events", emitted.len());
        let frame_has_followed = needles.iter().any(|needle| contains(&frame, needle));
        if let Some(packet) = emitted.first() {
            let layers = std::iter::once(&packet.outer).chain(packet.inner.as_ref());
            let names_followed = layers.flat_map(|layer| [layer.src, layer.dst]).any(|address| followed.contains(&address));
            // A VXLAN packet matched on its inner addresses whose inner headers are then cut
            // short is reported with its outer header only (and counted unparsed).
            let matched_on_cut_inner = packet.inner_truncated && frame_has_followed;
            assert!(names_followed || matched_on_cut_inner, "frame {index}: event for no followed address: {frame:02x?}");
        } else {
            continue;
        }
        assert!(frame_has_followed, "frame {index}: an event without a followed address in the frame");
        events += emitted.len() as u64;
    }
    let counters = harness.counters();
    eprintln!("fuzz: {events} events, {rejected} frames rejected by the kernel, {counters:?}");
    assert_eq!(counters.matched, events, "{counters:?}");
    assert_eq!(counters.lost_events, 0);
    // The corpus reaches every outcome: events, unparsed headers and non-IP frames.
    assert!(events > 1_000 && counters.unparsed > 100 && counters.not_ip > 1_000, "{counters:?}, {events} events");
    assert!(rejected < 2_000, "{rejected} frames rejected by the kernel");
}

// ---- the fast "not ours" test: it never changes what the full parse reports ---------------

/// Each frame through a program with the fast test and one without: the same events (bar the
/// timestamp) frame by frame and the same counters at the end. The corpus is the fuzz's, once
/// as it is and once with the followed addresses replaced by others, so that the fast test
/// both passes frames on and turns them away; frames cut short stand for headers beyond the
/// linear area, which the fast test leaves to the full parse (BPF_PROG_TEST_RUN hands the
/// program a linear skb only, so a paged one cannot be made here).
#[test]
fn the_fast_path_yields_what_the_full_parse_yields() {
    fast_path_matches_full_parse(false, seed_frames(), 6_000);
}

/// The same on a device without a MAC header (tunl0), over what such a hop shows: IP first,
/// and on 5.10's tunl0 ingress an IPIP packet behind the underlay's Ethernet header.
#[test]
fn the_fast_path_yields_what_the_full_parse_yields_without_a_mac_header() {
    let pod_tcp = V4::new(POD, PEER, 6).packet(&tcp(40000, 80, 1000, 2000, 0x18, 100));
    let pod_udp = V4::new(PEER, POD, 17).packet(&udp(53, 40000, b"\x12\x34answer"));
    let seeds = vec![
        pod_tcp.clone(),
        pod_udp.clone(),
        ipip(&pod_tcp),
        ipip(&pod_udp),
        ethernet(0x0800, &ipip(&pod_tcp)),
        ethernet(0x0800, &ipip(&pod_udp)),
    ];
    fast_path_matches_full_parse(true, seeds, 2_000);
}

/// Each of `frames` frames through a program with the fast test and one without, on a hop
/// with or without a MAC header: the corpus is `seeds`, once as they are and once with the
/// followed addresses replaced by others, as they are or mutated.
fn fast_path_matches_full_parse(no_mac_header: bool, seeds: Vec<Vec<u8>>, frames: usize) {
    let mut fast = Harness::new(default_filter(), no_mac_header);
    let mut full = Harness::new(FilterConfig { full_parse_only: 1, ..default_filter() }, no_mac_header);
    for harness in [&mut fast, &mut full] {
        harness.probes.follow(ip(POD6)).unwrap();
    }
    let unfollowed: Vec<Vec<u8>> = seeds
        .iter()
        .map(|frame| {
            let mut frame = frame.clone();
            for at in 0..frame.len().saturating_sub(3) {
                if frame[at..at + 4] == [10, 244, 0, 2] {
                    frame[at + 3] = 77;
                }
            }
            frame
        })
        .collect();
    let mut rng = Rng(0x2545_f491_4f6c_dd1d);
    let (mut events, mut turned_away) = (0u64, 0u64);
    for index in 0..frames {
        let seed = if index % 2 == 0 { &seeds[rng.below(seeds.len())] } else { &unfollowed[rng.below(unfollowed.len())] };
        let frame = if index % 3 == 0 { seed.clone() } else { mutate(&mut rng, seed) };
        let direction = if index % 5 == 0 { Direction::Egress } else { Direction::Ingress };
        let run = |harness: &mut Harness| -> Option<Vec<Packet>> {
            let program = harness.probes.program(direction).unwrap();
            let result = program.test_run(TestRunOptions { data_in: Some(&frame), ..Default::default() }).ok()?;
            assert_eq!(result.return_value, CONTINUE);
            let mut packets = Vec::new();
            for item in records(&mut harness.events) {
                if let Some(mut packet) = harness.decoder.decode(&item).unwrap() {
                    packet.ktime_ns = 0;
                    packets.push(packet);
                }
            }
            Some(packets)
        };
        let (a, b) = (run(&mut fast), run(&mut full));
        assert_eq!(a, b, "frame {index}: {frame:02x?}");
        events += a.as_ref().map_or(0, |a| a.len() as u64);
        turned_away += u64::from(a.is_some_and(|a| a.is_empty()));
    }
    assert_eq!(fast.counters(), full.counters());
    let enough = frames as u64 / 6;
    assert!(events > enough && turned_away > enough, "{events} events, {turned_away} frames without one");
}

/// More followed IPv4 addresses than the fast test compares directly: the rest are still
/// found (in the map), and so is a hop whose array slot another hop took first.
#[test]
fn many_followed_ips_and_a_shared_hop_slot() {
    let mut probes = Probes::load(
        &LoadOptions { filter: default_filter(), layout: Default::default(), ring_bytes: 1 << 16, kernel_ring_bytes: KERNEL_RING_BYTES },
        AttachMode::Auto,
    )
    .unwrap();
    for last in 100..112 {
        probes.follow(ip(&format!("10.244.3.{last}"))).unwrap();
    }
    probes.follow(ip(POD)).unwrap();
    // Slot 1 of 256 goes to ifindex 257, registered first; loopback (1) is found in the map.
    probes.register_hop(257, 0).unwrap();
    probes.register_hop(LOOPBACK, 0).unwrap();
    let mut events = probes.take_events().unwrap();
    let program = probes.program(Direction::Ingress).unwrap();
    for (src, expected) in [(POD, 1), ("10.244.3.111", 1), ("10.244.3.100", 1), ("10.244.3.99", 0)] {
        let frame = ethernet(0x0800, &V4::new(src, "10.1.1.1", 6).packet(&tcp(1, 2, 3, 4, 0x10, 0)));
        program.test_run(TestRunOptions { data_in: Some(&frame), ..Default::default() }).unwrap();
        assert_eq!(records(&mut events).len(), expected, "{src}");
    }
}

// ---- translated flows (the node's NAT) -------------------------------------------------

/// The node's address the pod is masqueraded to, and a host outside the cluster.
const NODE: &str = "10.99.0.1";
const EXTERNAL: &str = "203.0.113.10";

fn v4_word(text: &str) -> u32 {
    u32::from_ne_bytes(text.parse::<std::net::Ipv4Addr>().unwrap().octets())
}

fn nat_tuple(src: &str, dst: &str, sport: u16, dport: u16, proto: u8, flags: u8) -> NatTuple {
    NatTuple { src: v4_word(src), dst: v4_word(dst), sport: sport.to_be(), dport: dport.to_be(), proto, flags, reserved: 0 }
}

/// The programs loaded with this kernel's conntrack layout, the loopback hop registered with
/// `HOP_NAT` (as a NIC is) or without it, and pod A's TCP flow to the external host (from port
/// 40000, masqueraded to 61000) and its ping (id 7, masqueraded to id 9) learned.
fn nat_harness(nat_hop: bool) -> Harness {
    let mut btf = KernelBtf::from_file(std::path::Path::new("/sys/kernel/btf/vmlinux")).unwrap();
    let module = std::path::Path::new("/sys/kernel/btf/nf_conntrack");
    if module.exists() {
        btf.add_module(module).unwrap();
    }
    let (skb_nfct, ct_tuples) = layout::conntrack(&btf).expect("this kernel's conntrack, as the TC programs read it");
    let layout = KernelLayout { skb_nfct, ct_tuples, ..Default::default() };
    let filter = default_filter();
    let mut probes =
        Probes::load(&LoadOptions { filter, layout, ring_bytes: 1 << 16, kernel_ring_bytes: KERNEL_RING_BYTES }, AttachMode::Auto)
            .expect("loading the programs (are you root?)");
    probes.follow(ip(POD)).unwrap();
    probes.register_hop(LOOPBACK, if nat_hop { HOP_NAT } else { 0 }).unwrap();
    probes
        .learn_translated_flow(nat_tuple(EXTERNAL, NODE, 8080, 61000, 6, 0), nat_tuple(EXTERNAL, POD, 8080, 40000, 6, PKT_TRANSLATED))
        .unwrap();
    probes.learn_translated_flow(nat_tuple(EXTERNAL, NODE, 9, 0, 1, 0), nat_tuple(EXTERNAL, POD, 7, 0, 1, PKT_TRANSLATED)).unwrap();
    let events = probes.take_events().unwrap();
    Harness { probes, events, decoder: PacketDecoder::new(filter.vxlan_ports) }
}

/// Tunnel traffic between nodes with no followed address inside is never looked up as a
/// translated flow, even when its outer tuple is one learned (here on purpose): a pod's
/// translated flows never cross a tunnel with its address hidden. The same outer tuple
/// carrying a plain datagram is looked up, and matched.
#[test]
fn tunnel_traffic_skips_the_nat_lookup() {
    let mut harness = nat_harness(true);
    harness
        .probes
        .learn_translated_flow(nat_tuple(EXTERNAL, NODE, 51000, 8472, 17, 0), nat_tuple(EXTERNAL, POD, 51000, 8472, 17, PKT_TRANSLATED))
        .unwrap();
    let other_pods = ethernet(0x0800, &V4::new("10.244.1.5", "10.244.0.5", 6).packet(&tcp(40000, 80, 1000, 2000, 0x18, 100)));
    let vxlan_frame = ethernet(0x0800, &V4::new(EXTERNAL, NODE, 17).packet(&udp(51000, 8472, &vxlan(1, &other_pods))));
    assert!(harness.run(Direction::Ingress, &vxlan_frame, None).is_empty(), "VXLAN between other pods");
    let ipip_frame = ethernet(
        0x0800,
        &V4::new(EXTERNAL, NODE, 4).packet(&V4::new("10.244.1.5", "10.244.0.5", 6).packet(&tcp(40000, 80, 1, 2, 0x18, 0))),
    );
    assert!(harness.run(Direction::Ingress, &ipip_frame, None).is_empty(), "IPIP between other pods");
    assert_eq!(harness.counters(), Counters::default());
    // No VNI flag: not VXLAN to the parse, so a plain datagram of that tuple.
    let mut not_vxlan = vxlan(1, &other_pods);
    not_vxlan[0] = 0;
    let datagram = ethernet(0x0800, &V4::new(EXTERNAL, NODE, 17).packet(&udp(51000, 8472, &not_vxlan)));
    let packet = harness.one(&datagram);
    assert_eq!((packet.outer.dst, packet.translated.map(|t| t.dst)), (ip(POD), Some(ip(NODE))));
}

/// Replies of a learned translated flow arriving on a NIC, before conntrack undoes the NAT,
/// are the pod's, reported with its side of the NAT; other flows to the node's address, and
/// the same replies on a hop where the NAT does not show, are not.
#[test]
fn replies_of_a_translated_flow_are_the_pods() {
    let mut harness = nat_harness(true);
    let reply = ethernet(0x0800, &V4::new(EXTERNAL, NODE, 6).packet(&tcp(8080, 61000, 5000, 1001, 0x12, 0)));
    let packet = harness.one(&reply);
    let layer = packet.pod_layer();
    assert_eq!((layer.src, layer.sport, layer.dst, layer.dport), (ip(EXTERNAL), 8080, ip(POD), 40000));
    assert_eq!((layer.tcp_seq, layer.tcp_flags), (5000, 0x12));
    let translated = packet.translated.expect("the wire's header");
    assert_eq!((translated.src, translated.dst, translated.sport, translated.dport), (ip(EXTERNAL), ip(NODE), 8080, 61000));
    let echo_reply = ethernet(0x0800, &V4::new(EXTERNAL, NODE, 1).packet(&icmp_echo(0, 9, 3)));
    let packet = harness.one(&echo_reply);
    assert_eq!((packet.outer.dst, packet.outer.icmp_id, packet.outer.icmp_seq), (ip(POD), 7, 3));
    assert_eq!(packet.translated.unwrap().sport, 9);
    // The node's own flows to the same host: another port, another id, an echo request.
    for frame in [
        ethernet(0x0800, &V4::new(EXTERNAL, NODE, 6).packet(&tcp(8080, 61001, 5000, 1001, 0x12, 0))),
        ethernet(0x0800, &V4::new(EXTERNAL, NODE, 1).packet(&icmp_echo(0, 10, 3))),
        ethernet(0x0800, &V4::new(EXTERNAL, NODE, 1).packet(&icmp_echo(8, 9, 3))),
        ethernet(0x0800, &V4::new(EXTERNAL, NODE, 17).packet(&udp(8080, 61000, &[1, 2, 3, 4]))),
    ] {
        assert!(harness.run(Direction::Ingress, &frame, None).is_empty());
    }
    // On egress the packet's own conntrack entry decides: a test run's skb has none.
    let out = ethernet(0x0800, &V4::new(NODE, EXTERNAL, 6).packet(&tcp(61000, 8080, 1000, 5001, 0x10, 0)));
    assert!(harness.run(Direction::Egress, &out, None).is_empty());
    assert_eq!(harness.counters(), Counters { matched: 2, ..Default::default() });

    let mut plain_hop = nat_harness(false);
    assert!(plain_hop.run(Direction::Ingress, &reply, None).is_empty());
    assert_eq!(plain_hop.counters(), Counters::default());
}
