//! TC classifiers attached to ingress and egress of every hop on the pod's path.

use aya_ebpf::{
    bindings::{__sk_buff, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, TC_ACT_UNSPEC},
    helpers::{bpf_ktime_get_ns, bpf_skb_load_bytes},
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use tracer_common::{
    COUNTER_LOST_EVENTS, COUNTER_MATCHED, COUNTER_NOT_IP, COUNTER_UNPARSED, DIR_EGRESS, DIR_INGRESS, HOP_NO_MAC_HEADER, HOP_SLOTS,
    HopConfig, HopSlot, IPPROTO_UDP, MAX_HOPS, PKT_VLAN, PacketEvent,
};

use crate::{
    maps::{count, fast_path_config, filter, matches, v4_may_be_followed},
    parse::{ETH_P_IP, ETH_P_IPV6, Headers, Skip, parse_ethernet, parse_packet, unparsed_could_be_followed},
};

/// How many of a packet's first bytes one `bpf_skb_load_bytes` copies for the parse (from
/// the paged part of a non-linear skb too). Every header podtrace reads ends well before:
/// a VXLAN packet carrying IPv6 with two extension headers and TCP with 40 bytes of options
/// ends at 222. A header past it would count as unparsed, never be skipped silently.
const SNAPSHOT_LEN: usize = 256;

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
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Per-CPU scratch space: the event is too large for the 512-byte BPF stack alongside
/// the header copies.
#[map]
static SCRATCH: PerCpuArray<PacketEvent> = PerCpuArray::with_max_entries(1, 0);

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

/// The event is built in per-CPU scratch memory and copied into the ring only for a
/// followed packet. (Reserving the ring record first and parsing into it saves the copy,
/// but a packet the fast test cannot turn away, e.g. IPv6, then pays a reserve and a
/// discard, which the bench measured at about 90 ns: more than the copy of a followed one.)
#[inline(always)]
fn trace(ctx: &TcContext, direction: u8) {
    match build_event(ctx, direction) {
        Ok(event) => {
            count(COUNTER_MATCHED);
            if EVENTS.output::<PacketEvent>(event, wakeup_flags()).is_err() {
                count(COUNTER_LOST_EVENTS);
            }
        }
        Err(NoEvent::Parse(Skip::NotIp)) => count(COUNTER_NOT_IP),
        Err(NoEvent::Parse(Skip::Unparsed)) => count(COUNTER_UNPARSED),
        Err(NoEvent::NotFollowed) => {}
    }
}

/// Wake the reader once per batch of events, when the waiting data crosses `WAKEUP_BYTES`,
/// rather than for each event its reader has caught up with (the kernel's default): a
/// wakeup costs more than writing the event. The reader drains the ring on a short timer
/// too, so a quiet moment's last events are not held back for long.
#[inline(always)]
fn wakeup_flags() -> u64 {
    let waiting = EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) + EVENT_RECORD_BYTES;
    let crosses = waiting >= WAKEUP_BYTES && waiting < WAKEUP_BYTES + EVENT_RECORD_BYTES;
    u64::from(if crosses { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP })
}

/// A ring record: the event and the ring's 8-byte header.
const EVENT_RECORD_BYTES: u64 = (size_of::<PacketEvent>() + 8) as u64;
/// About 150 events.
const WAKEUP_BYTES: u64 = 32 * 1024;

/// Why a packet on a hop produced no event.
enum NoEvent {
    Parse(Skip),
    /// Not a traced hop, or not a followed flow.
    NotFollowed,
}

impl From<Skip> for NoEvent {
    #[inline(always)]
    fn from(skip: Skip) -> Self {
        Self::Parse(skip)
    }
}

#[inline(always)]
fn build_event(ctx: &TcContext, direction: u8) -> Result<&PacketEvent, NoEvent> {
    // SAFETY: ctx.skb.skb is the program's context pointer, valid for the whole run.
    let skb = unsafe { &*ctx.skb.skb };
    let ifindex = skb.ifindex;
    let hop = hop_config(ifindex).ok_or(NoEvent::NotFollowed)?;
    if not_ours(ctx, hop) {
        return Err(NoEvent::NotFollowed);
    }
    let event = match SCRATCH.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot, exclusively ours until this program run ends.
        Some(event) => unsafe { &mut *event },
        None => return Err(NoEvent::NotFollowed),
    };
    *event = PacketEvent::default();
    event.ifindex = ifindex;
    event.direction = direction;
    event.skb_len = skb.len;
    event.gso_size = skb.gso_size;
    event.gso_segs = skb.gso_segs;

    let snapshot = match SNAPSHOT.get_ptr_mut(0) {
        // SAFETY: a per-CPU slot, exclusively ours until this program run ends.
        Some(snapshot) => unsafe { &mut *snapshot },
        None => return Err(NoEvent::NotFollowed),
    };
    take_snapshot(ctx, skb.len, snapshot)?;
    let packet = &Packet { ctx, snapshot };
    let (ether_type, l3_offset) = l3_start(packet, hop, event)?;
    let filter = filter();
    let parsed = match parse_packet(packet, ether_type, l3_offset, &filter.vxlan_ports, &mut event.outer, &mut event.inner) {
        Ok(parsed) => parsed,
        Err(Skip::Unparsed) if !unparsed_could_be_followed(&event.outer, &event.inner, 0) => return Err(NoEvent::NotFollowed),
        Err(skip) => return Err(skip.into()),
    };
    event.flags |= parsed.flags;
    event.vni = parsed.vni;
    if !matches(&filter, &event.outer, &event.inner, event.flags) {
        return Err(NoEvent::NotFollowed);
    }
    // SAFETY: a helper without arguments or preconditions.
    event.ktime_ns = unsafe { bpf_ktime_get_ns() };
    Ok(event)
}

/// Copies the packet's first bytes (up to `SNAPSHOT_LEN`) into `snapshot`.
#[inline(always)]
fn take_snapshot(ctx: &TcContext, skb_len: u32, snapshot: &mut Snapshot) -> Result<(), Skip> {
    if skb_len == 0 {
        return Err(Skip::Unparsed);
    }
    // 1..=SNAPSHOT_LEN, written so that older verifiers (5.10's) see both bounds on the
    // register passed: LLVM would otherwise fold the check above into one they cannot read.
    let len = (core::hint::black_box((skb_len as usize).min(SNAPSHOT_LEN) - 1) & (SNAPSHOT_LEN - 1)) + 1;
    // SAFETY: the program's context and `len` (1..=SNAPSHOT_LEN) bytes of our own buffer.
    let ret = unsafe { bpf_skb_load_bytes(ctx.skb.skb.cast(), 0, snapshot.bytes.as_mut_ptr().cast(), len as u32) };
    if ret != 0 {
        return Err(Skip::Unparsed);
    }
    snapshot.len = len as u64;
    Ok(())
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

/// The fast "not ours" test, before any parse: with direct packet access, the outer IPv4
/// addresses and, for UDP to a VXLAN port, the inner IPv4 addresses at their fixed offset,
/// compared with the followed IPs. True only when the full parse would certainly report
/// nothing and count nothing (both headers plain IPv4 without options, their addresses
/// read, none followed); anything else (VLAN tags, IPv6, IP options, non-IP frames, headers
/// beyond the linear area) is left to the full parse, whose results it never changes.
#[inline(always)]
fn not_ours(ctx: &TcContext, hop: HopConfig) -> bool {
    let verdict = if hop.flags & HOP_NO_MAC_HEADER != 0 { not_ours_at::<0>(ctx.skb.skb) } else { not_ours_at::<ETH_HLEN>(ctx.skb.skb) };
    verdict != 0
}

/// `not_ours` for an IPv4 header at `L3` (0 on a device without a MAC header, else after
/// an untagged Ethernet header): every offset a constant, every read inside one bounds check.
/// A function of its own (a BPF-to-BPF call) that answers 1 or 0: the verifier's paths
/// through it end at its return, so the full parse after it is verified once, not once per
/// path (which older kernels' verifiers, 5.10's, do not prune well enough).
#[inline(never)]
fn not_ours_at<const L3: usize>(skb: *mut __sk_buff) -> u32 {
    // SAFETY: the program's context, valid for the whole run.
    let (data, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    u32::from(not_ours_inline::<L3>(data, end))
}

/// Kept small on the stack: the subprogram's frame adds to the program's, and 5.10 refuses
/// more than 512 bytes for both.
#[inline(always)]
fn not_ours_inline<const L3: usize>(data: usize, end: usize) -> bool {
    let (full_parse_only, vxlan_ports) = fast_path_config();
    if full_parse_only != 0 {
        return false;
    }
    if data + L3 + IPV4_HLEN + UDP_HLEN > end {
        // Short frames, and headers beyond the linear area: the full parse reads them.
        return false;
    }
    // SAFETY (all reads below): within [data, data + L3 + IPV4_HLEN + UDP_HLEN), checked above.
    let read_u8 = |offset: usize| unsafe { core::ptr::read((data + offset) as *const u8) };
    let read_u32 = |offset: usize| unsafe { core::ptr::read_unaligned((data + offset) as *const u32) };
    let read_be16 = |offset: usize| u16::from_be_bytes([read_u8(offset), read_u8(offset + 1)]);
    if L3 == ETH_HLEN && read_be16(12) != ETH_P_IP {
        return false;
    }
    if read_u8(L3) != 0x45 {
        return false;
    }
    if v4_may_be_followed(read_u32(L3 + 12)) || v4_may_be_followed(read_u32(L3 + 16)) {
        return false;
    }
    // Only a UDP first fragment to a VXLAN port carries an inner packet to look at.
    if read_u8(L3 + 9) != IPPROTO_UDP || read_be16(L3 + 6) & 0x1fff != 0 {
        return true;
    }
    let dport = read_be16(L3 + IPV4_HLEN + 2);
    if dport != vxlan_ports[0] && dport != vxlan_ports[1] {
        return true;
    }
    let inner = L3 + IPV4_HLEN + UDP_HLEN + VXLAN_HLEN;
    if data + inner + ETH_HLEN + IPV4_HLEN > end {
        return false;
    }
    // SAFETY (all reads below): within [data, data + inner + ETH_HLEN + IPV4_HLEN), checked above.
    if read_u8(L3 + IPV4_HLEN + UDP_HLEN) & 0x08 == 0 {
        // No VNI flag: the full parse does not look inside either.
        return true;
    }
    let vihl = read_u8(inner + ETH_HLEN);
    if read_be16(inner + 12) != ETH_P_IP || vihl >> 4 != 4 || vihl & 0x0f < 5 {
        return false;
    }
    !(v4_may_be_followed(read_u32(inner + ETH_HLEN + 12)) || v4_may_be_followed(read_u32(inner + ETH_HLEN + 16)))
}

/// The EtherType and offset of the IP header; for a VLAN-tagged frame, the tag goes into
/// `event`.
#[inline(always)]
fn l3_start(ctx: &Packet, hop: HopConfig, event: &mut PacketEvent) -> Result<(u16, usize), Skip> {
    if hop.flags & HOP_NO_MAC_HEADER != 0 {
        // Tunnel devices hand us the IP header at offset 0; its version nibble names it.
        let first: u8 = ctx.read(0)?;
        return match first >> 4 {
            4 => Ok((ETH_P_IP, 0)),
            6 => Ok((ETH_P_IPV6, 0)),
            _ => Err(Skip::NotIp),
        };
    }
    let (ether_type, offset, vlan_id) = parse_ethernet(ctx, 0)?;
    if let Some(vlan_id) = vlan_id {
        event.flags |= PKT_VLAN;
        event.vlan_id = vlan_id;
    }
    Ok((ether_type, offset))
}
