//! TC classifiers attached to ingress and egress of every hop on the pod's path.

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use tracer_common::{
    COUNTER_LOST_EVENTS, COUNTER_MATCHED, COUNTER_NOT_IP, COUNTER_UNPARSED, DIR_EGRESS, DIR_INGRESS, HOP_NO_MAC_HEADER, HopConfig,
    MAX_HOPS, PKT_VLAN, PacketEvent,
};

use crate::{
    maps::{count, filter, matches},
    parse::{ETH_P_IP, ETH_P_IPV6, Headers, Skip, parse_ethernet, parse_packet, unparsed_could_be_followed},
};

/// The TC programs read the packet with `bpf_skb_load_bytes`, which also reads the paged
/// part of a non-linear skb and fails cleanly past the end.
impl Headers for TcContext {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Result<T, Skip> {
        self.load(offset).map_err(|_| Skip::Unparsed)
    }
}

/// Traced hops by ifindex; packets on other devices are ignored.
#[map]
static HOPS: HashMap<u32, HopConfig> = HashMap::with_max_entries(MAX_HOPS, 0);

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
fn trace(ctx: &TcContext, direction: u8) {
    match build_event(ctx, direction) {
        Ok(event) => {
            count(COUNTER_MATCHED);
            if EVENTS.output::<PacketEvent>(event, 0).is_err() {
                count(COUNTER_LOST_EVENTS);
            }
        }
        Err(NoEvent::Parse(Skip::NotIp)) => count(COUNTER_NOT_IP),
        Err(NoEvent::Parse(Skip::Unparsed)) => count(COUNTER_UNPARSED),
        Err(NoEvent::NotFollowed) => {}
    }
}

#[inline(always)]
fn build_event(ctx: &TcContext, direction: u8) -> Result<&PacketEvent, NoEvent> {
    // SAFETY: ctx.skb.skb is the program's context pointer, valid for the whole run.
    let skb = unsafe { &*ctx.skb.skb };
    let ifindex = skb.ifindex;
    // SAFETY: the entry is copied out at once, and userspace only adds hops.
    let hop = match unsafe { HOPS.get(&ifindex) } {
        Some(hop) => *hop,
        None => return Err(NoEvent::NotFollowed),
    };
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

    let (ether_type, l3_offset) = l3_start(ctx, hop, event)?;
    let filter = filter();
    let parsed = match parse_packet(ctx, ether_type, l3_offset, &filter.vxlan_ports, &mut event.outer, &mut event.inner) {
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

/// The EtherType and offset of the IP header; for a VLAN-tagged frame, the tag goes into
/// `event`.
#[inline(always)]
fn l3_start(ctx: &TcContext, hop: HopConfig, event: &mut PacketEvent) -> Result<(u16, usize), Skip> {
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
