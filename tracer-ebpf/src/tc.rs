//! TC classifiers attached to ingress and egress of every hop on the pod's path.

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use tracer_common::{
    COUNTER_COUNT, COUNTER_LOST_EVENTS, COUNTER_MATCHED, COUNTER_NOT_IP, COUNTER_UNPARSED, DIR_EGRESS, DIR_INGRESS, FilterConfig,
    HOP_NO_MAC_HEADER, HopConfig, IpLayer, MAX_FOLLOWED, MAX_HOPS, PKT_INNER_TRUNCATED, PKT_VLAN, PKT_VXLAN, PacketEvent,
};

use crate::parse::{ETH_P_IP, ETH_P_IPV6, Headers as _, Skip, UDP_PAYLOAD, is_vxlan, parse_ethernet, parse_ip, parse_vxlan};

/// Set by userspace at load time; zero fields mean "any".
#[unsafe(no_mangle)]
pub static FILTER: FilterConfig = FilterConfig { peer: [0; 16], has_peer: 0, proto: 0, port: 0, vxlan_ports: [8472, 4789] };

/// Followed pod IPs (IPv4-mapped for IPv4).
#[map]
pub static FOLLOWED: HashMap<[u8; 16], u8> = HashMap::with_max_entries(MAX_FOLLOWED, 0);

/// Traced hops by ifindex; packets on other devices are ignored.
#[map]
static HOPS: HashMap<u32, HopConfig> = HashMap::with_max_entries(MAX_HOPS, 0);

/// Userspace resizes this at load time (`--ring-size`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

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

#[inline(always)]
pub fn count(index: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *counter += 1 };
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
        Err(Skip::NotIp) => count(COUNTER_NOT_IP),
        Err(Skip::Unparsed) => count(COUNTER_UNPARSED),
        Err(Skip::NotFollowed) => {}
    }
}

#[inline(always)]
fn build_event(ctx: &TcContext, direction: u8) -> Result<&PacketEvent, Skip> {
    // SAFETY: ctx.skb.skb is the program's context pointer, valid for the whole run.
    let skb = unsafe { &*ctx.skb.skb };
    let ifindex = skb.ifindex;
    let hop = match unsafe { HOPS.get(&ifindex) } {
        Some(hop) => *hop,
        None => return Err(Skip::NotFollowed),
    };
    let event = match SCRATCH.get_ptr_mut(0) {
        // SAFETY: per-CPU slot, exclusively ours for this run.
        Some(event) => unsafe { &mut *event },
        None => return Err(Skip::NotFollowed),
    };
    *event = PacketEvent::default();
    event.ifindex = ifindex;
    event.direction = direction;
    event.skb_len = skb.len;
    event.gso_size = skb.gso_size;
    event.gso_segs = skb.gso_segs;

    let (ether_type, l3_offset) = if hop.flags & HOP_NO_MAC_HEADER != 0 {
        // Tunnel devices hand us the IP header at offset 0; its version nibble names it.
        let first: u8 = ctx.read(0)?;
        match first >> 4 {
            4 => (ETH_P_IP, 0),
            6 => (ETH_P_IPV6, 0),
            _ => return Err(Skip::NotIp),
        }
    } else {
        let (ether_type, offset, vlan_id) = parse_ethernet(ctx, 0)?;
        if let Some(vlan_id) = vlan_id {
            event.flags |= PKT_VLAN;
            event.vlan_id = vlan_id;
        }
        (ether_type, offset)
    };
    let l4_offset = parse_ip(ctx, ether_type, l3_offset, &mut event.outer)?;

    let filter = unsafe { core::ptr::read_volatile(&FILTER) };
    if is_vxlan(&event.outer, &filter.vxlan_ports) {
        match parse_vxlan(ctx, l4_offset + UDP_PAYLOAD, &mut event.inner) {
            Ok(Some(vni)) => {
                event.flags |= PKT_VXLAN;
                event.vni = vni;
            }
            Ok(None) => {}
            Err(_) => {
                // Keep the event: the outer header still tells which hop saw the packet.
                event.flags |= PKT_VXLAN | PKT_INNER_TRUNCATED;
                count(COUNTER_UNPARSED);
            }
        }
    }

    let pod_layer = if event.flags & PKT_VXLAN != 0 && event.flags & PKT_INNER_TRUNCATED == 0 { &event.inner } else { &event.outer };
    let followed = is_followed(&event.outer) || (event.flags & PKT_VXLAN != 0 && is_followed(&event.inner));
    if !followed || !passes_filter(&filter, pod_layer) {
        return Err(Skip::NotFollowed);
    }
    event.ktime_ns = unsafe { bpf_ktime_get_ns() };
    Ok(event)
}

#[inline(always)]
pub fn is_followed(layer: &IpLayer) -> bool {
    unsafe { FOLLOWED.get(&layer.src).is_some() || FOLLOWED.get(&layer.dst).is_some() }
}

#[inline(always)]
fn passes_filter(filter: &FilterConfig, layer: &IpLayer) -> bool {
    if filter.has_peer != 0 && layer.src != filter.peer && layer.dst != filter.peer {
        return false;
    }
    if filter.proto != 0 && layer.proto != filter.proto {
        return false;
    }
    if filter.port != 0 && layer.sport != filter.port && layer.dport != filter.port {
        return false;
    }
    true
}
