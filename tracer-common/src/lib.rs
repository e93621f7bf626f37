//! Wire types shared by the kernel programs (`tracer-ebpf`) and userspace (`tracer`).
//!
//! Every type here crosses the kernel/user boundary byte for byte, so each is `#[repr(C)]`,
//! `Copy`, free of padding holes that the kernel side would leave uninitialised, and defined
//! only here; so does `parse`, the header parser both sides run.
#![no_std]

pub mod parse;

/// TC hook the event was seen on.
pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

/// `parse::Frame::flags`: the frame carried an 802.1Q/802.1ad tag.
pub const PKT_VLAN: u8 = 1 << 0;
/// The outer packet is VXLAN and `inner` holds the encapsulated packet.
pub const PKT_VXLAN: u8 = 1 << 1;
/// The encapsulated payload (VXLAN or IPIP) was cut short, so `inner` is incomplete.
pub const PKT_INNER_TRUNCATED: u8 = 1 << 2;
/// The outer packet is IPIP (IP protocol 4, as Calico's `tunl0` sends) and `inner` holds the
/// encapsulated IPv4 packet.
pub const PKT_IPIP: u8 = 1 << 3;
/// Either encapsulation: `inner` holds the pod's own packet.
pub const PKT_ENCAPSULATED: u8 = PKT_VXLAN | PKT_IPIP;
/// `NatTuple::flags`: the packet crossed a NAT (conntrack translated it); the record carries
/// the tuple the pod's side of the NAT has (`TranslatedRecord`).
pub const PKT_TRANSLATED: u8 = 1 << 4;

/// `IpLayer::flags`: the IP header had the Don't Fragment bit.
pub const IP_DF: u8 = 1 << 0;
/// The packet is a fragment (MF set or non-zero offset).
pub const IP_FRAGMENT: u8 = 1 << 1;
/// A non-first fragment: it carries no L4 header, so the L4 fields are zero.
pub const IP_LATER_FRAGMENT: u8 = 1 << 2;
/// The IPv4 header had options (IHL > 5) or the IPv6 header had extension headers.
pub const IP_OPTIONS: u8 = 1 << 3;

pub const IPPROTO_ICMP: u8 = 1;
/// IPv4 in IP (IPIP).
pub const IPPROTO_IPIP: u8 = 4;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;

/// One IP header with the L4 header that follows it.
///
/// Addresses are 16 bytes; an IPv4 address is stored IPv4-mapped (`::ffff:a.b.c.d`) so one
/// map key type serves both families.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpLayer {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    /// TCP sequence and acknowledgement numbers, host order.
    pub tcp_seq: u32,
    pub tcp_ack: u32,
    /// IPv6 flow label (20 bits); zero for IPv4.
    pub flow_label: u32,
    /// TCP timestamp value (TSval) from the options; zero when the segment carries none.
    /// Differs between a retransmit and an original sent a millisecond or more earlier.
    pub tcp_tsval: u32,
    /// Right edge of the first TCP SACK block: the newest out-of-order segment the receiver
    /// holds (RFC 2018), so it grows from one duplicate ACK to the next; zero without SACK.
    pub tcp_sack_right: u32,
    /// UDP: the first 4 payload bytes (for DNS, the query id and flags); zero when the
    /// payload is shorter. Tells apart same-size datagrams that IPv4 sends with IP ID 0.
    pub payload_head: [u8; 4],
    /// 4 or 6; 0 when the layer is absent.
    pub version: u8,
    pub proto: u8,
    pub ttl: u8,
    /// `IP_*` flags.
    pub flags: u8,
    /// IPv4 identification; zero for IPv6 (unless a fragment header gave one).
    pub ip_id: u16,
    /// IPv4 total length, or IPv6 payload length plus the 40-byte fixed header.
    pub total_len: u16,
    /// Byte length of the IP header including options or extension headers.
    pub header_len: u16,
    pub sport: u16,
    pub dport: u16,
    /// TCP header length in bytes, used to derive the payload length.
    pub tcp_header_len: u8,
    pub tcp_flags: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub icmp_id: u16,
    pub icmp_seq: u16,
    /// For an ICMP error (destination unreachable, time exceeded, parameter problem, packet
    /// too big): the protocol and ports of the packet it quotes, i.e. the flow it refuses.
    pub quoted_sport: u16,
    pub quoted_dport: u16,
    pub quoted_proto: u8,
    /// Zero; keeps the struct free of trailing padding.
    pub reserved: u8,
}

/// One packet seen by a TC program on a traced hop: what the skb says of it, and the frame's
/// headers (its first bytes up to `parse::l4_headers_end`, never payload), which userspace
/// parses (`parse::parse_frame`). The kernel copies them with one helper call straight into
/// the ring record, rather than parse every header of a followed packet itself and copy the
/// result.
///
/// Three sizes, the smallest that holds the headers taken (`head_size`): every byte of a ring
/// record is memory the kernel writes and the reader reads on the hot path. The ring record's
/// length tells them apart.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PacketRecord<const HEAD: usize> {
    pub meta: PacketMeta,
    /// The frame's first `meta.head_len` bytes; the rest is whatever the ring held before.
    pub head: [u8; HEAD],
}

/// `PacketRecord::meta`: the skb's side of a packet event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PacketMeta {
    /// `bpf_ktime_get_ns()`, CLOCK_MONOTONIC.
    pub ktime_ns: u64,
    pub ifindex: u32,
    /// `skb->len`: the whole frame as the stack holds it (a GSO super-packet is large).
    pub skb_len: u32,
    /// `skb->gso_size` and `skb->gso_segs`: 16-bit fields in the kernel's
    /// `skb_shared_info`, which `__sk_buff` widens.
    pub gso_size: u16,
    pub gso_segs: u16,
    /// How many bytes of `head` hold the frame: its length, at most the record's head size.
    pub head_len: u16,
    /// `DIR_*`.
    pub direction: u8,
    /// The hop's `HOP_*` flags that say how to read the frame (`HOP_NO_MAC_HEADER`); with
    /// `skb_len`, they tell where its IP header starts (`parse::parse_frame`).
    pub hop_flags: u8,
}

/// A followed pod's packet seen translated by the node's NAT (masqueraded on its way out, or
/// a reply on its way in before conntrack undoes the NAT): the record of a plain packet with
/// the tuple the pod's side of the NAT has, so userspace recognises it as the pod's packet and
/// names what it was translated to. A NATed packet the fast test read is plain IPv4, whose
/// headers fit a `HEAD_SHORT` head. Its length tells it from a `PacketRecord`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TranslatedRecord {
    pub meta: PacketMeta,
    pub pod: NatTuple,
    pub head: [u8; HEAD_SHORT],
}

/// An IPv4 flow's tuple as one side of a NAT has it: the addresses as the packet's bytes
/// (read as native `u32`s), the ports (TCP, UDP) or the echo id (ICMP, in `sport`; `dport` 0)
/// in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NatTuple {
    pub src: u32,
    pub dst: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    /// `PKT_TRANSLATED` in a `TranslatedRecord`; zero in a `NAT_FLOWS` key.
    pub flags: u8,
    /// Zero; keeps the struct free of padding holes (it is a map key too).
    pub reserved: u16,
}

/// How many translated flows the TC programs remember (`NAT_FLOWS`, least recently used
/// forgotten first), so that their replies are recognised on ingress.
pub const MAX_NAT_FLOWS: u32 = 16_384;

/// Where a conntrack entry's tuples sit relative to its original tuple, and the tuple's
/// fields: the layout of `struct nf_conn` since 2.6 (`tuplehash[2]` then `status`), checked
/// against the running kernel's BTF by userspace, which leaves NAT following off where it
/// differs. `KernelLayout::ct_tuples` says where the original tuple is.
pub const CT_REPLY_TUPLE: usize = 56;
pub const CT_STATUS: usize = 96;
/// How many bytes one read of a conntrack entry takes: both tuples and `status`.
pub const CT_READ: usize = CT_STATUS + 8;
/// `struct nf_conntrack_tuple`: `src.u3`, `src.u` (port or echo id), `src.l3num`, `dst.u3`,
/// `dst.u`, `dst.protonum`.
pub const CT_SRC_ADDR: usize = 0;
pub const CT_SRC_PORT: usize = 16;
pub const CT_L3NUM: usize = 18;
pub const CT_DST_ADDR: usize = 20;
pub const CT_DST_PORT: usize = 36;
pub const CT_PROTONUM: usize = 38;
/// `enum ip_conntrack_status`: `IPS_SRC_NAT`, `IPS_DST_NAT`.
pub const IPS_NAT_MASK: u64 = (1 << 4) | (1 << 5);
/// `enum ip_conntrack_info`: values from here on are of the reply direction; the low 3 bits of
/// `skb->_nfct` hold it, the rest is the `struct nf_conn` pointer.
pub const IP_CT_IS_REPLY: u64 = 3;
/// `IP_CT_RELATED` and `IP_CT_RELATED_REPLY`: an ICMP error about the entry's flow.
pub const IP_CT_RELATED: u64 = 1;
pub const IP_CT_RELATED_REPLY: u64 = IP_CT_RELATED + IP_CT_IS_REPLY;
pub const NFCT_INFO_MASK: u64 = 7;

/// Head sizes of `PacketRecord`. `HEAD_SHORT` holds a plain IPv4 packet's headers (they end
/// by byte 94: Ethernet, IPv4 without options and TCP with 40 bytes of options), and with the
/// ring's 8-byte record header and the meta makes a record of two cache lines.
pub const HEAD_SHORT: usize = 96;
/// Holds VXLAN or IPIP around plain IPv4 (VXLAN's headers end by byte 144: TCP with 40
/// bytes of options inside).
pub const HEAD_MEDIUM: usize = 144;
/// The whole region the kernel's own parse reads (`parse::parse_frame`).
pub const HEAD_LONG: usize = 256;

/// The head size of the record of a packet whose headers end at `headers_end`: the smallest
/// that holds them.
#[inline(always)]
pub const fn head_size(headers_end: usize) -> usize {
    if headers_end <= HEAD_SHORT {
        HEAD_SHORT
    } else if headers_end <= HEAD_MEDIUM {
        HEAD_MEDIUM
    } else {
        HEAD_LONG
    }
}

/// Indexes into the per-CPU `COUNTERS` array.
pub const COUNTER_MATCHED: u32 = 0;
/// Matching packets whose event did not fit in the ring buffer.
pub const COUNTER_LOST_EVENTS: u32 = 1;
/// Packets whose headers could not be read (truncated, bad version or length).
pub const COUNTER_UNPARSED: u32 = 2;
/// Frames that are not IP (ARP, LLDP, …): expected, counted so totals add up.
pub const COUNTER_NOT_IP: u32 = 3;
/// Kernel events (drops, retransmits, ICMP errors) that did not fit in their ring buffer, or
/// nested deeper than the programs keep records for.
pub const COUNTER_LOST_KERNEL_EVENTS: u32 = 4;
/// Translated flows of the followed pods learned into `NAT_FLOWS`: beyond `MAX_NAT_FLOWS`,
/// the oldest were forgotten and their replies may have gone unrecognised.
pub const COUNTER_NAT_FLOWS: u32 = 5;
/// Of those, flows begun elsewhere and DNATed to a followed pod (NodePort), learned from their
/// first reply: their packets before it are not matched on the hops before the NAT.
pub const COUNTER_DNAT_FLOWS: u32 = 6;
pub const COUNTER_COUNT: u32 = 7;

/// `HopConfig::flags` (and `PacketMeta::hop_flags`): the device has no MAC header (IP
/// starts at offset 0).
pub const HOP_NO_MAC_HEADER: u32 = 1 << 0;

/// The hop is where the node's NAT shows (a NIC, a bond or its slave): packets the fast test
/// turns away are looked up as translated flows of the followed pods (conntrack's entry on
/// egress, the learned reply tuples on ingress).
pub const HOP_NAT: u32 = 1 << 1;

/// Per-ifindex settings, written by userspace for each traced hop.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HopConfig {
    pub flags: u32,
}

/// Narrowing filter applied in the kernel after the followed-IP match.
///
/// Loaded as the global `FILTER`; zero fields mean "any".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FilterConfig {
    /// Peer address (IPv4-mapped for IPv4); only compared when `has_peer` is 1.
    pub peer: [u8; 16],
    pub has_peer: u8,
    /// `IPPROTO_*`; 0 = any.
    pub proto: u8,
    /// Source or destination port; 0 = any.
    pub port: u16,
    /// UDP destination ports treated as VXLAN (flannel uses 8472, IANA 4789).
    pub vxlan_ports: [u16; 2],
    /// 1: the TC programs skip their fast "not ours" test and parse every packet in full (the
    /// kernel-parser tests compare both ways; the bench measures both). 0 in a trace.
    pub full_parse_only: u8,
    /// Zero; keeps the struct free of trailing padding.
    pub reserved: u8,
}

/// How many followed IPv4 addresses the TC programs' fast test compares directly
/// (`FollowedV4`); with more, every IPv4 packet goes to the full parse, which uses `FOLLOWED`.
pub const MAX_FAST_FOLLOWED: usize = 8;

/// The followed IPv4 addresses as the TC programs' "not ours" test compares them: a handful
/// of register compares on the addresses read straight from the packet, before any parsing.
/// Written by userspace with the `FOLLOWED` map (the single entry of `FOLLOWED_V4`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FollowedV4 {
    /// Network byte order, as the bytes sit in the packet (read as a native `u32`).
    pub addrs: [u32; MAX_FAST_FOLLOWED],
    /// How many of `addrs` are set.
    pub count: u32,
    /// Non-zero when more IPv4 addresses are followed than `addrs` holds: the rest are only in
    /// the `FOLLOWED` map, and the fast test turns nothing away.
    pub overflow: u32,
}

/// Slots of the `HOP_SLOTS` array: a hop's settings at `ifindex % HOP_SLOTS`, found without a
/// hash lookup (a slot another hop holds falls back to the `HOPS` map).
pub const HOP_SLOTS: u32 = 256;

/// One `HOP_SLOTS` entry: the hop's ifindex (0: free) and its `HopConfig::flags`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HopSlot {
    pub ifindex: u32,
    pub flags: u32,
}

/// Maximum number of IPs that can be followed at once (`FOLLOWED` map size).
pub const MAX_FOLLOWED: u32 = 64;
/// Maximum number of hops (`HOPS` map size).
pub const MAX_HOPS: u32 = 256;

/// `KernelEvent::kind`: `skb:kfree_skb` for a followed flow.
pub const KEV_DROP: u8 = 1;
/// `tcp:tcp_retransmit_skb` for a followed flow.
pub const KEV_RETRANSMIT: u8 = 2;
/// `icmp:icmp_send`: the kernel answered a followed flow's packet with an ICMP error.
pub const KEV_ICMP_SEND: u8 = 3;

/// `KernelEvent::reason` of a drop on a kernel whose `skb:kfree_skb` has no reason field
/// (before 5.17). `KernelLayout::kfree_reason` is 0 there: no record field sits at offset 0,
/// which holds the common header.
pub const DROP_REASON_UNKNOWN: u32 = u32::MAX;

/// `KernelEvent::flags`: the skb had been received on `ifindex` (skb_iif), not sent out of it.
pub const KEV_RECEIVED: u8 = 1 << 0;

const _: () = assert!(size_of::<PacketMeta>() == 24 && size_of::<parse::Frame>() == 2 * size_of::<IpLayer>() + 12);
const _: () = assert!(size_of::<NatTuple>() == 16 && size_of::<TranslatedRecord>() == 24 + 16 + HEAD_SHORT);
/// The ring's record header (`BPF_RINGBUF_HDR_SZ`) and a short record: two cache lines.
const _: () = assert!(8 + size_of::<PacketRecord<HEAD_SHORT>>() == 128);

/// A kernel-wide event (tracepoint) about one of the followed flows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelEvent {
    pub ktime_ns: u64,
    /// Drops: the kernel address that freed the skb (`location`).
    pub location: u64,
    /// Inode number of the network namespace of the skb's device or socket.
    pub netns: u32,
    /// `skb->dev->ifindex`, 0 when the skb has no device.
    pub ifindex: u32,
    /// Drops: `enum skb_drop_reason` value. Retransmits: TCP state.
    pub reason: u32,
    pub skb_len: u32,
    /// Retransmits: the segment's first sequence number.
    pub tcp_seq: u32,
    /// `KEV_*`.
    pub kind: u8,
    /// `KEV_RECEIVED` and `PKT_*` flags.
    pub flags: u8,
    pub icmp_type: u8,
    pub icmp_code: u8,
    pub outer: IpLayer,
    pub inner: IpLayer,
}

/// Where to find things in kernel memory and in tracepoint records, read from the running
/// kernel's BTF and tracefs at load time (loaded as the global `LAYOUT`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelLayout {
    pub skb_head: u32,
    pub skb_len: u32,
    pub skb_network_header: u32,
    pub skb_dev: u32,
    pub skb_sk: u32,
    pub skb_iif: u32,
    pub skb_cb: u32,
    pub dev_ifindex: u32,
    pub dev_nd_net: u32,
    pub net_ns_inum: u32,
    pub sock_net: u32,
    /// `skb:kfree_skb` record offsets (classic tracepoint fallback).
    pub kfree_skbaddr: u32,
    pub kfree_location: u32,
    pub kfree_reason: u32,
    /// `tcp:tcp_retransmit_skb` record offsets.
    pub retrans_skbaddr: u32,
    pub retrans_skaddr: u32,
    pub retrans_state: u32,
    pub retrans_family: u32,
    pub retrans_sport: u32,
    pub retrans_dport: u32,
    pub retrans_saddr: u32,
    pub retrans_daddr: u32,
    pub retrans_saddr_v6: u32,
    pub retrans_daddr_v6: u32,
    /// `icmp:icmp_send` record offsets.
    pub icmp_skbaddr: u32,
    pub icmp_type: u32,
    pub icmp_code: u32,
    /// The drop reasons that say "not a drop" (`SKB_NOT_DROPPED_YET`, `SKB_CONSUMED`), which the
    /// `skb:kfree_skb` programs turn away before reading the skb; `NO_SUCH_REASON` where the
    /// kernel has no such reason.
    pub kfree_not_drops: [u32; 2],
    /// `sk_buff._nfct` and where the original tuple of a `struct nf_conn` is
    /// (`tuplehash[IP_CT_DIR_ORIGINAL].tuple`), for the TC programs' NAT following; both 0
    /// where the kernel has no conntrack or its layout is not the one `CT_*` describe.
    pub skb_nfct: u32,
    pub ct_tuples: u32,
}

/// `KernelLayout::kfree_not_drops` for a reason the kernel does not have: a value no
/// `enum skb_drop_reason` reaches, and not `DROP_REASON_UNKNOWN`.
pub const NO_SUCH_REASON: u32 = u32::MAX - 1;

/// Maximum number of network namespaces that count as "this node" (`NETNS` map size).
pub const MAX_NETNS: u32 = 1024;

#[cfg(feature = "user")]
mod user {
    // SAFETY: all are repr(C) plain-old-data with no invalid bit patterns.
    unsafe impl aya::Pod for super::KernelEvent {}
    unsafe impl aya::Pod for super::KernelLayout {}
    unsafe impl aya::Pod for super::HopConfig {}
    unsafe impl aya::Pod for super::FilterConfig {}
    unsafe impl aya::Pod for super::FollowedV4 {}
    unsafe impl aya::Pod for super::HopSlot {}
    unsafe impl aya::Pod for super::NatTuple {}
}
