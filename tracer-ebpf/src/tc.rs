//! TC classifiers attached to ingress and egress of every hop on the pod's path.

use aya_ebpf::{
    bindings::{__sk_buff, BPF_RB_NO_WAKEUP, TC_ACT_UNSPEC},
    helpers::{bpf_ktime_get_ns, bpf_skb_load_bytes},
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use tracer_common::{
    COUNTER_LOST_EVENTS, COUNTER_MATCHED, COUNTER_NOT_IP, COUNTER_UNPARSED, DIR_EGRESS, DIR_INGRESS, HEAD_LONG, HEAD_MEDIUM, HEAD_SHORT,
    HOP_NAT, HOP_NO_MAC_HEADER, HOP_SLOTS, HopConfig, HopSlot, IPPROTO_ICMP, IPPROTO_IPIP, IPPROTO_TCP, IPPROTO_UDP, MAX_HOPS,
    PKT_INNER_TRUNCATED, PacketMeta, PacketRecord, head_size,
    parse::{ETH_P_IP, Frame, Headers, Skip, could_be_followed, l4_headers_end, parse_frame},
};

use crate::maps::{FastFollowed, count, fast_followed, filter, is_followed, matches};

/// How many of a packet's first bytes one `bpf_skb_load_bytes` copies for the parse (from
/// the paged part of a non-linear skb too), as many as a `HEAD_LONG` record carries, so that
/// userspace parses what the kernel parsed. Every header podtrace reads ends well before:
/// a VXLAN packet carrying IPv6 with two extension headers and TCP with 40 bytes of options
/// ends at 222. A header past it would count as unparsed, never be skipped silently.
const SNAPSHOT_LEN: usize = HEAD_LONG;

/// A packet's first bytes, copied with one helper call instead of one per header (which is
/// where the parse's time went), in per-CPU memory: too large for the stack beside the parse.
#[repr(C)]
pub struct Snapshot {
    /// How many bytes of `bytes` hold the packet (fewer for a shorter packet). Kept in map
    /// memory and read afresh by every header read: a value the verifier tracked in a
    /// register would be narrowed differently on every path through the parse, and no two
    /// paths' states would ever match again.
    len: u64,
    bytes: [u8; SNAPSHOT_BUFFER],
}

/// The largest header type the parse reads at once (an IPv6 header).
const MAX_READ: usize = 40;
/// The snapshot and room after it for a read that starts inside it, which the verifier
/// must see fit whatever `len` is.
const SNAPSHOT_BUFFER: usize = SNAPSHOT_LEN + MAX_READ;

#[map]
static SNAPSHOT: PerCpuArray<Snapshot> = PerCpuArray::with_max_entries(1, 0);

/// A read past the snapshot fails like a read past the packet's end.
impl Headers for Snapshot {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Result<T, Skip> {
        // SAFETY: a plain read of our own per-CPU memory; volatile, so it is read here.
        let len = unsafe { core::ptr::read_volatile(&self.len) } as usize;
        if offset + size_of::<T>() > len {
            return Err(Skip::Unparsed);
        }
        // `len` is at most SNAPSHOT_LEN, so the mask changes nothing; it shows the verifier a
        // bound on the register the read is made with. `black_box` keeps LLVM from dropping
        // the mask as redundant and reading through an unbounded copy of the offset.
        let offset = core::hint::black_box(offset) & (SNAPSHOT_LEN - 1);
        // SAFETY: offset < SNAPSHOT_LEN and size_of::<T>() <= MAX_READ, inside the buffer;
        // T is a plain header type, read unaligned.
        Ok(unsafe { core::ptr::read_unaligned(self.bytes.as_ptr().add(offset).cast()) })
    }
}

/// The packet as the parse reads it: fixed headers from the snapshot, the TCP options walk
/// from the packet itself.
struct Packet<'a> {
    ctx: &'a TcContext,
    snapshot: &'a Snapshot,
}

impl Headers for Packet<'_> {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Result<T, Skip> {
        self.snapshot.read(offset)
    }

    #[inline(always)]
    fn read_walked<T: Copy>(&self, offset: usize) -> Result<T, Skip> {
        self.ctx.load(offset).map_err(|_| Skip::Unparsed)
    }
}

/// Traced hops by ifindex; packets on other devices are ignored.
#[map]
static HOPS: HashMap<u32, HopConfig> = HashMap::with_max_entries(MAX_HOPS, 0);

/// The hops' settings by `ifindex % HOP_SLOTS`, so that a hop is found with an array lookup
/// (which the verifier inlines) rather than a hash lookup; a slot held by another hop falls
/// back to `HOPS`.
#[map]
static HOP_SLOT: Array<HopSlot> = Array::with_max_entries(HOP_SLOTS, 0);

/// Userspace resizes this at load time (`--ring-size`).
#[map]
pub(crate) static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Per-CPU room for the parse of a packet the fast test could not decide: two layers are
/// too large for the 512-byte BPF stack alongside the header reads.
#[map]
static FRAME: PerCpuArray<Frame> = PerCpuArray::with_max_entries(1, 0);

#[classifier]
pub fn podtrace_ingress(ctx: TcContext) -> i32 {
    trace(&ctx, DIR_INGRESS);
    TC_ACT_UNSPEC
}

#[classifier]
pub fn podtrace_egress(ctx: TcContext) -> i32 {
    trace(&ctx, DIR_EGRESS);
    TC_ACT_UNSPEC
}

/// A followed packet's event is its frame's head, copied straight into a ring record that
/// userspace parses: the fast test decides most packets without a parse, and where it cannot
/// (IPv6, VLAN tags, IP options, more followed IPs than it compares, `--peer`/`--port`/
/// `--proto`), the full parse decides, and the head is copied all the same.
#[inline(always)]
fn trace(ctx: &TcContext, direction: u8) {
    // SAFETY: ctx.skb.skb is the program's context pointer, valid for the whole run.
    let skb = unsafe { &*ctx.skb.skb };
    let Some(hop) = hop_config(skb.ifindex) else { return };
    let verdict = fast_verdict(ctx, hop);
    let headers_end = match verdict & VERDICT_MASK {
        // Only where the node's NAT shows can a packet without a followed address be ours.
        VERDICT_NOT_OURS if hop.flags & HOP_NAT != 0 => {
            crate::nat::trace_translated(ctx.skb.skb, u32::from(direction), hop.flags);
            return;
        }
        VERDICT_NOT_OURS | VERDICT_NOT_OURS_TUNNELLED => return,
        VERDICT_OURS => verdict >> VERDICT_BITS,
        _ => match parse_and_match(ctx, skb, hop) {
            Ok(headers_end) => headers_end,
            Err(NoEvent::Parse(Skip::NotIp)) => return count(COUNTER_NOT_IP),
            Err(NoEvent::Parse(Skip::Unparsed)) => return count(COUNTER_UNPARSED),
            Err(NoEvent::NotFollowed) => return,
        },
    };
    // The smallest record that holds the headers; each size its own `emit`, since a record's
    // type is fixed when it is reserved.
    match head_size(headers_end as usize) {
        HEAD_SHORT => emit::<HEAD_SHORT>(ctx, skb, hop, direction, headers_end),
        HEAD_MEDIUM => emit::<HEAD_MEDIUM>(ctx, skb, hop, direction, headers_end),
        _ => emit::<HEAD_LONG>(ctx, skb, hop, direction, headers_end),
    }
}

/// Writes a followed packet's event in place: reserves its ring record, copies the frame's
/// headers (its first `headers_end` bytes, `parse::l4_headers_end`: never payload) into it
/// with one `bpf_skb_load_bytes` (paged data too), and commits it. No scratch record, no
/// zeroing, no second copy; the bytes of the head past them are an earlier record's headers.
#[inline(always)]
fn emit<const HEAD: usize>(ctx: &TcContext, skb: &__sk_buff, hop: HopConfig, direction: u8, headers_end: u32) {
    let Some(len) = copy_len::<HEAD>(skb.len.min(headers_end)) else {
        count(COUNTER_UNPARSED);
        return;
    };
    let Some(mut record) = EVENTS.reserve::<PacketRecord<HEAD>>(0) else {
        count(COUNTER_MATCHED);
        count(COUNTER_LOST_EVENTS);
        return;
    };
    let record_ptr = record.as_mut_ptr();
    // SAFETY: the program's context, and `len` (1..=HEAD) bytes of the reserved record's head.
    let copied = unsafe { bpf_skb_load_bytes(ctx.skb.skb.cast(), 0, (*record_ptr).head.as_mut_ptr().cast(), len as u32) };
    if copied != 0 {
        record.discard(0);
        count(COUNTER_UNPARSED);
        return;
    }
    count(COUNTER_MATCHED);
    // SAFETY: the reserved record is ours until submitted.
    unsafe { (*record_ptr).meta = packet_meta(skb, len, u32::from(direction), hop.flags) };
    // The reader drains the ring on a short timer and is never woken: a wakeup costs more
    // than writing the event (on a virtual machine, an interrupt the hypervisor delivers),
    // and the ring holds far more than a timer period of events.
    record.submit(u64::from(BPF_RB_NO_WAKEUP));
}

/// The skb's side of an event whose head holds the frame's first `head_len` bytes.
#[inline(always)]
pub(crate) fn packet_meta(skb: &__sk_buff, head_len: usize, direction: u32, hop_flags: u32) -> PacketMeta {
    PacketMeta {
        // SAFETY: the clock helper has no preconditions.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        ifindex: skb.ifindex,
        skb_len: skb.len,
        // 16-bit fields in the kernel, widened by `__sk_buff`.
        gso_size: skb.gso_size as u16,
        gso_segs: skb.gso_segs as u16,
        head_len: head_len as u16,
        direction: direction as u8,
        hop_flags: hop_flags as u8,
    }
}

/// Why a packet on a hop produced no event.
enum NoEvent {
    Parse(Skip),
    /// Not a followed flow.
    NotFollowed,
}

impl From<Skip> for NoEvent {
    #[inline(always)]
    fn from(skip: Skip) -> Self {
        Self::Parse(skip)
    }
}

/// The full parse, for a packet the fast test could not decide: whether it is reported, and
/// if so where its headers end.
#[inline(always)]
fn parse_and_match(ctx: &TcContext, skb: &__sk_buff, hop: HopConfig) -> Result<u32, NoEvent> {
    let frame = match FRAME.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot, exclusively ours until this program run ends.
        Some(frame) => unsafe { &mut *frame },
        None => return Err(NoEvent::NotFollowed),
    };
    crate::zero::zero(frame);
    let snapshot = match SNAPSHOT.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot, exclusively ours until this program run ends.
        Some(snapshot) => unsafe { &mut *snapshot },
        None => return Err(NoEvent::NotFollowed),
    };
    take_snapshot(ctx, skb.len, snapshot)?;
    let packet = &Packet { ctx, snapshot };
    let filter = filter();
    match parse_frame(packet, hop.flags & HOP_NO_MAC_HEADER != 0, skb.len, &filter.vxlan_ports, frame) {
        Ok(()) => {}
        Err(Skip::Unparsed) if !could_be_followed(&frame.outer, &frame.inner, 0, is_followed) => return Err(NoEvent::NotFollowed),
        Err(skip) => return Err(skip.into()),
    }
    if matches(&filter, &frame.outer, &frame.inner, frame.flags) {
        return Ok(u32::from(frame.headers_end));
    }
    // A reported packet's cut-short inner header is counted by userspace, which parses the
    // same bytes; one that is not reported is counted here.
    if frame.flags & PKT_INNER_TRUNCATED != 0 && could_be_followed(&frame.outer, &frame.inner, frame.flags, is_followed) {
        count(COUNTER_UNPARSED);
    }
    Err(NoEvent::NotFollowed)
}

/// Copies the packet's first bytes (up to `SNAPSHOT_LEN`) into `snapshot`.
#[inline(always)]
fn take_snapshot(ctx: &TcContext, skb_len: u32, snapshot: &mut Snapshot) -> Result<(), Skip> {
    let len = copy_len::<SNAPSHOT_LEN>(skb_len).ok_or(Skip::Unparsed)?;
    // SAFETY: the program's context and `len` (1..=SNAPSHOT_LEN) bytes of our own buffer.
    let ret = unsafe { bpf_skb_load_bytes(ctx.skb.skb.cast(), 0, snapshot.bytes.as_mut_ptr().cast(), len as u32) };
    if ret != 0 {
        return Err(Skip::Unparsed);
    }
    snapshot.len = len as u64;
    Ok(())
}

/// How many of a packet's `skb_len` bytes a copy into an `N`-byte buffer takes: 1..=N, none
/// of an empty packet. Written so that older verifiers (5.10's) see both bounds on the length
/// register passed to the helper: `black_box` keeps LLVM from folding the bound's test into
/// one on another register than the one passed, which those verifiers cannot relate.
#[inline(always)]
pub(crate) fn copy_len<const N: usize>(skb_len: u32) -> Option<usize> {
    if skb_len == 0 {
        return None;
    }
    let last = core::hint::black_box((skb_len as usize).min(N) - 1);
    if last >= N {
        return None;
    }
    Some(last + 1)
}

/// The settings of the hop on `ifindex`, if it is one.
#[inline(always)]
fn hop_config(ifindex: u32) -> Option<HopConfig> {
    if let Some(slot) = HOP_SLOT.get(ifindex % HOP_SLOTS) {
        if slot.ifindex == ifindex {
            return Some(HopConfig { flags: slot.flags });
        }
    }
    // SAFETY: the entry is copied out at once, and userspace only adds hops.
    unsafe { HOPS.get(&ifindex) }.copied()
}

const ETH_HLEN: usize = 14;
const IPV4_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
const VXLAN_HLEN: usize = 8;

// The fast test's answers (`fast_verdict`), in the low `VERDICT_BITS` bits; above them, for
// a reported packet, where its headers end (`parse::l4_headers_end`).
/// Undecided: the full parse decides.
const VERDICT_UNDECIDED: u32 = 0;
/// Certainly not reported: the full parse would report nothing and count nothing.
const VERDICT_NOT_OURS: u32 = 1;
/// Reported.
const VERDICT_OURS: u32 = 3;
/// IPIP, its outer addresses followed when the bit above `VERDICT_BITS` is set: the inner
/// header decides (`fast_verdict_ipip`). Never `fast_verdict`'s answer.
const VERDICT_IPIP: u32 = 4;
/// Certainly not reported, and VXLAN or IPIP with no followed address inside: tunnel traffic
/// between nodes, which carries no translated flow of a followed pod (the node's NAT never
/// hides a pod's address inside a tunnel), so it skips the NAT lookup.
const VERDICT_NOT_OURS_TUNNELLED: u32 = 5;
const VERDICT_BITS: u32 = 8;
const VERDICT_MASK: u32 = (1 << VERDICT_BITS) - 1;

/// A reported packet's verdict with where its headers end.
#[inline(always)]
fn reported(verdict: u32, headers_end: usize) -> u32 {
    verdict | (headers_end as u32) << VERDICT_BITS
}

/// The fast test, before any parse: with direct packet access, the outer IPv4 addresses
/// and, for UDP to a VXLAN port or for IPIP, the inner IPv4 addresses at their fixed offset,
/// compared with the followed IPs. "Not ours" only when the full parse would certainly report
/// nothing and count nothing (both headers plain IPv4, their addresses read, none followed);
/// "ours" only when it would certainly report the packet (an address followed, no
/// `--peer`/`--port`/`--proto` to apply). Anything else (VLAN tags, IPv6, IP options, non-IP
/// frames, headers beyond the linear area, more followed IPs than `FollowedV4` holds) is left
/// to the full parse, whose results it never changes.
#[inline(always)]
fn fast_verdict(ctx: &TcContext, hop: HopConfig) -> u32 {
    let skb = ctx.skb.skb;
    // Each part a call of its own, one after the other: 5.10 refuses more than 512 bytes for
    // the program's frame and those of the calls it is in at once, so no part may grow one.
    let ip_at_zero = hop.flags & HOP_NO_MAC_HEADER != 0 && {
        match no_mac_layout(skb) {
            NoMacLayout::IpAtZero => true,
            NoMacLayout::EthernetIpip => false,
            NoMacLayout::Undecided => return VERDICT_UNDECIDED,
        }
    };
    let verdict = if ip_at_zero { fast_verdict_at::<0>(skb) } else { fast_verdict_at::<ETH_HLEN>(skb) };
    if verdict & VERDICT_MASK != VERDICT_IPIP {
        return verdict;
    }
    let outer_followed = verdict >> VERDICT_BITS != 0;
    if ip_at_zero { fast_verdict_ipip::<0>(skb, outer_followed) } else { fast_verdict_ipip::<ETH_HLEN>(skb, outer_followed) }
}

/// `fast_verdict` for an IPv4 header at `L3` (0 on a device without a MAC header, else after
/// an untagged Ethernet header): every offset a constant, every read inside one bounds check.
/// A function of its own (a BPF-to-BPF call) that answers with a number: the verifier's paths
/// through it end at its return, so the full parse after it is verified once, not once per
/// path (which older kernels' verifiers, 5.10's, do not prune well enough).
#[inline(never)]
fn fast_verdict_at<const L3: usize>(skb: *mut __sk_buff) -> u32 {
    // SAFETY: the program's context, valid for the whole run.
    let (data, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    let Some(followed) = fast_followed() else { return VERDICT_UNDECIDED };
    fast_verdict_inline::<L3>(data, end, &followed)
}

/// Where the fast test reads a frame on a device without a MAC header.
#[repr(u32)]
enum NoMacLayout {
    /// A plain IPv4 header (IHL 5) at offset 0 spanning the frame.
    IpAtZero,
    /// Untagged Ethernet, then a plain outer IPv4 header of protocol IPIP, and no IP header
    /// spanning the frame at offset 0 (an IPIP device's ingress on 5.10).
    EthernetIpip,
    /// Anything else: the full parse decides.
    Undecided,
}

/// `parse_frame`'s choice of layout on a device without a MAC header (`parse::no_mac_l3`),
/// where the fast test can follow it: IP at offset 0 only when a sound IP header spanning the
/// frame (`skb->len`) starts there, else Ethernet carrying IPIP.
#[inline(never)]
fn no_mac_layout(skb: *mut __sk_buff) -> NoMacLayout {
    // SAFETY: the program's context, valid for the whole run.
    let (data, end, len) = unsafe { ((*skb).data as usize, (*skb).data_end as usize, (*skb).len) };
    if data + ETH_HLEN + IPV4_HLEN > end {
        return NoMacLayout::Undecided;
    }
    // SAFETY (all reads below): within [data, data + ETH_HLEN + IPV4_HLEN), checked above.
    let read_u8 = |offset: usize| unsafe { core::ptr::read((data + offset) as *const u8) };
    let read_be16 = |offset: usize| u32::from(u16::from_be_bytes([read_u8(offset), read_u8(offset + 1)]));
    let first = read_u8(0);
    let ip_at_zero = match first >> 4 {
        4 => first & 0x0f >= 5 && read_be16(2) == len,
        6 => read_be16(4) + 40 == len,
        _ => false,
    };
    if ip_at_zero {
        return if first == 0x45 { NoMacLayout::IpAtZero } else { NoMacLayout::Undecided };
    }
    if read_be16(12) == u32::from(ETH_P_IP) && read_u8(ETH_HLEN) == 0x45 && read_u8(ETH_HLEN + 9) == IPPROTO_IPIP {
        return NoMacLayout::EthernetIpip;
    }
    NoMacLayout::Undecided
}

/// Kept small on the stack: the subprogram's frame adds to the program's, and 5.10 refuses
/// more than 512 bytes for both.
#[inline(always)]
fn fast_verdict_inline<const L3: usize>(data: usize, end: usize, followed: &FastFollowed) -> u32 {
    if data + L3 + IPV4_HLEN + UDP_HLEN > end {
        // Short frames, and headers beyond the linear area: the full parse reads them.
        return VERDICT_UNDECIDED;
    }
    // SAFETY (all reads below): within [data, data + L3 + IPV4_HLEN + UDP_HLEN), checked above.
    let read_u8 = |offset: usize| unsafe { core::ptr::read((data + offset) as *const u8) };
    let read_u32 = |offset: usize| unsafe { core::ptr::read_unaligned((data + offset) as *const u32) };
    let read_be16 = |offset: usize| u16::from_be_bytes([read_u8(offset), read_u8(offset + 1)]);
    if L3 == ETH_HLEN && read_be16(12) != ETH_P_IP {
        return VERDICT_UNDECIDED;
    }
    if read_u8(L3) != 0x45 {
        return VERDICT_UNDECIDED;
    }
    let proto = read_u8(L3 + 9);
    let dport = read_be16(L3 + IPV4_HLEN + 2);
    // Only a first fragment (UDP to a VXLAN port, or IPIP) carries an inner packet to look at.
    let vxlan =
        proto == IPPROTO_UDP && read_be16(L3 + 6) & 0x1fff == 0 && (dport == followed.vxlan_ports[0] || dport == followed.vxlan_ports[1]);
    let outer_followed = followed.holds(read_u32(L3 + 12)) || followed.holds(read_u32(L3 + 16));
    if outer_followed && followed.narrowed {
        return VERDICT_UNDECIDED;
    }
    if proto == IPPROTO_IPIP && read_be16(L3 + 6) & 0x1fff == 0 {
        // Its inner header is `fast_verdict_ipip`'s to read, in a call of its own.
        return VERDICT_IPIP | u32::from(outer_followed) << VERDICT_BITS;
    }
    if !vxlan {
        if !outer_followed {
            return VERDICT_NOT_OURS;
        }
        return match ipv4_headers_end(data, end, L3) {
            Some(headers_end) => reported(VERDICT_OURS, headers_end),
            None => VERDICT_UNDECIDED,
        };
    }
    // VXLAN: where the copy ends is the inner headers' business, even for a packet between
    // followed addresses (a node's own).
    let inner = L3 + IPV4_HLEN + UDP_HLEN + VXLAN_HLEN;
    if data + inner + ETH_HLEN + IPV4_HLEN > end {
        return VERDICT_UNDECIDED;
    }
    // SAFETY (all reads below): within [data, data + inner + ETH_HLEN + IPV4_HLEN), checked above.
    if read_u8(L3 + IPV4_HLEN + UDP_HLEN) & 0x08 == 0 {
        // No VNI flag: the full parse does not look inside either.
        return if outer_followed { reported(VERDICT_OURS, l4_headers_end(IPPROTO_UDP, L3 + IPV4_HLEN, 0)) } else { VERDICT_NOT_OURS };
    }
    let vihl = read_u8(inner + ETH_HLEN);
    if read_be16(inner + 12) != ETH_P_IP || vihl >> 4 != 4 || vihl & 0x0f < 5 {
        return VERDICT_UNDECIDED;
    }
    if outer_followed || followed.holds(read_u32(inner + ETH_HLEN + 12)) || followed.holds(read_u32(inner + ETH_HLEN + 16)) {
        if followed.narrowed {
            return VERDICT_UNDECIDED;
        }
        return match ipv4_headers_end(data, end, inner + ETH_HLEN) {
            Some(headers_end) => reported(VERDICT_OURS, headers_end),
            None => VERDICT_UNDECIDED,
        };
    }
    VERDICT_NOT_OURS_TUNNELLED
}

/// Where the headers of the option-less IPv4 packet at `l3` end, as `parse::l4_headers_end`
/// has it, read with direct packet access; `None` where the fast test leaves it to the full
/// parse: IP options, an ICMP error (whose quote the parse reads), a TCP header beyond the
/// linear area.
#[inline(always)]
pub(crate) fn ipv4_headers_end(data: usize, end: usize, l3: usize) -> Option<usize> {
    let l4 = l3 + IPV4_HLEN;
    // The TCP data offset is the furthest byte read.
    if data + l4 + TCP_DOFF + 1 > end {
        return None;
    }
    // SAFETY (all reads below): within [data, data + l4 + TCP_DOFF + 1), checked above.
    let read_u8 = |offset: usize| unsafe { core::ptr::read((data + offset) as *const u8) };
    if read_u8(l3) != 0x45 {
        return None;
    }
    let proto = read_u8(l3 + 9);
    if u16::from_be_bytes([read_u8(l3 + 6), read_u8(l3 + 7)]) & 0x1fff != 0 {
        // A later fragment carries no L4 header.
        return Some(l4);
    }
    let tcp_header_len = match proto {
        IPPROTO_TCP => (read_u8(l4 + TCP_DOFF) >> 4) * 4,
        IPPROTO_ICMP if matches!(read_u8(l4), ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM) => return None,
        _ => 0,
    };
    Some(l4_headers_end(proto, l4, tcp_header_len))
}

/// The TCP header's data offset byte.
const TCP_DOFF: usize = 12;
const ICMP_DEST_UNREACH: u8 = 3;
const ICMP_TIME_EXCEEDED: u8 = 11;
const ICMP_PARAMETER_PROBLEM: u8 = 12;

/// The fast test of an IPIP packet whose plain outer IPv4 header is at `L3` (`outer_followed`:
/// its addresses are followed): the inner IPv4 addresses, right behind the outer header. As
/// for VXLAN, where the copy ends is the inner headers' business, also for a packet whose
/// outer addresses are followed.
#[inline(never)]
fn fast_verdict_ipip<const L3: usize>(skb: *mut __sk_buff, outer_followed: bool) -> u32 {
    // SAFETY: the program's context, valid for the whole run.
    let (data, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    let Some(followed) = fast_followed() else { return VERDICT_UNDECIDED };
    let inner = L3 + IPV4_HLEN;
    if data + inner + IPV4_HLEN > end {
        return VERDICT_UNDECIDED;
    }
    // SAFETY (all reads below): within [data, data + inner + IPV4_HLEN), checked above.
    let read_u8 = |offset: usize| unsafe { core::ptr::read((data + offset) as *const u8) };
    let read_u32 = |offset: usize| unsafe { core::ptr::read_unaligned((data + offset) as *const u32) };
    let vihl = read_u8(inner);
    if vihl >> 4 != 4 || vihl & 0x0f < 5 {
        return VERDICT_UNDECIDED;
    }
    if outer_followed || followed.holds(read_u32(inner + 12)) || followed.holds(read_u32(inner + 16)) {
        if followed.narrowed {
            return VERDICT_UNDECIDED;
        }
        return match ipv4_headers_end(data, end, inner) {
            Some(headers_end) => reported(VERDICT_OURS, headers_end),
            None => VERDICT_UNDECIDED,
        };
    }
    VERDICT_NOT_OURS_TUNNELLED
}
