//! TC classifiers attached to ingress and egress of every hop on the pod's path.

use aya_ebpf::{
    bindings::TC_ACT_UNSPEC,
    helpers::bpf_ktime_get_ns,
    macros::{classifier, map},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::TcContext,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
    vlan::VlanHdr,
};
use tracer_common::{
    COUNTER_COUNT, COUNTER_LOST_EVENTS, COUNTER_MATCHED, COUNTER_NOT_IP, COUNTER_UNPARSED,
    DIR_EGRESS, DIR_INGRESS, FilterConfig, HOP_NO_MAC_HEADER, HopConfig, IP_DF, IP_FRAGMENT,
    IP_LATER_FRAGMENT, IP_OPTIONS, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, IpLayer,
    MAX_FOLLOWED, MAX_HOPS, PKT_INNER_TRUNCATED, PKT_VLAN, PKT_VXLAN, PacketEvent,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const VXLAN_HDR_LEN: usize = 8;
const VXLAN_FLAG_VNI: u8 = 0x08;

// IPv6 extension headers we step over to reach the L4 header.
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DSTOPTS: u8 = 60;
/// Bounded so the verifier sees a finite loop; real traffic rarely chains more than two.
const IPV6_MAX_EXT_HEADERS: usize = 4;

/// Set by userspace at load time; zero fields mean "any".
#[unsafe(no_mangle)]
static FILTER: FilterConfig = FilterConfig {
    peer: [0; 16],
    has_peer: 0,
    proto: 0,
    port: 0,
    vxlan_ports: [8472, 4789],
};

/// Followed pod IPs (IPv4-mapped for IPv4).
#[map]
static FOLLOWED: HashMap<[u8; 16], u8> = HashMap::with_max_entries(MAX_FOLLOWED, 0);

/// Traced hops by ifindex; packets on other devices are ignored.
#[map]
static HOPS: HashMap<u32, HopConfig> = HashMap::with_max_entries(MAX_HOPS, 0);

/// Userspace resizes this at load time (`--ring-size`).
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

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
fn count(index: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *counter += 1 };
    }
}

/// Why a packet produced no event.
enum Skip {
    NotIp,
    Unparsed,
    NotFollowed,
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
        let first: u8 = ctx.load(0).map_err(|_| Skip::Unparsed)?;
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
    let outer = &event.outer;
    if outer.proto == IPPROTO_UDP
        && outer.flags & IP_LATER_FRAGMENT == 0
        && (outer.dport == filter.vxlan_ports[0] || outer.dport == filter.vxlan_ports[1])
    {
        let vxlan_offset = l4_offset + UdpHdr::LEN;
        let vxlan: [u8; VXLAN_HDR_LEN] = ctx.load(vxlan_offset).map_err(|_| Skip::Unparsed)?;
        if vxlan[0] & VXLAN_FLAG_VNI != 0 {
            event.flags |= PKT_VXLAN;
            event.vni = u32::from_be_bytes([0, vxlan[4], vxlan[5], vxlan[6]]);
            let inner = parse_ethernet(ctx, vxlan_offset + VXLAN_HDR_LEN).and_then(
                |(ether_type, offset, _)| parse_ip(ctx, ether_type, offset, &mut event.inner),
            );
            if inner.is_err() {
                // Keep the event: the outer header still tells which hop saw the packet.
                event.flags |= PKT_INNER_TRUNCATED;
                count(COUNTER_UNPARSED);
            }
        }
    }

    let pod_layer = if event.flags & PKT_VXLAN != 0 && event.flags & PKT_INNER_TRUNCATED == 0 {
        &event.inner
    } else {
        &event.outer
    };
    let followed = is_followed(&event.outer) || (event.flags & PKT_VXLAN != 0 && is_followed(&event.inner));
    if !followed || !passes_filter(&filter, pod_layer) {
        return Err(Skip::NotFollowed);
    }
    event.ktime_ns = unsafe { bpf_ktime_get_ns() };
    Ok(event)
}

#[inline(always)]
fn is_followed(layer: &IpLayer) -> bool {
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

/// Returns the EtherType after at most two VLAN tags, the L3 offset, and the outer VLAN id.
#[inline(always)]
fn parse_ethernet(ctx: &TcContext, offset: usize) -> Result<(u16, usize, Option<u16>), Skip> {
    let eth: EthHdr = ctx.load(offset).map_err(|_| Skip::Unparsed)?;
    let mut ether_type = u16::from_be(eth.ether_type);
    let mut offset = offset + EthHdr::LEN;
    let mut vlan_id = None;
    // 802.1ad carries an 802.1Q tag inside, hence two rounds.
    for _ in 0..2 {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let vlan: VlanHdr = ctx.load(offset).map_err(|_| Skip::Unparsed)?;
        if vlan_id.is_none() {
            vlan_id = Some(u16::from_be_bytes(vlan.tci) & 0x0fff);
        }
        ether_type = u16::from_be(vlan.ether_type);
        offset += VlanHdr::LEN;
    }
    match ether_type {
        ETH_P_IP | ETH_P_IPV6 => Ok((ether_type, offset, vlan_id)),
        _ => Err(Skip::NotIp),
    }
}

/// Fills `layer` from the IP header at `offset` and the L4 header after it; returns the L4 offset.
#[inline(always)]
fn parse_ip(ctx: &TcContext, ether_type: u16, offset: usize, layer: &mut IpLayer) -> Result<usize, Skip> {
    let l4_offset = if ether_type == ETH_P_IP {
        parse_ipv4(ctx, offset, layer)?
    } else {
        parse_ipv6(ctx, offset, layer)?
    };
    if layer.flags & IP_LATER_FRAGMENT == 0 {
        parse_l4(ctx, l4_offset, layer)?;
    }
    Ok(l4_offset)
}

#[inline(always)]
fn parse_ipv4(ctx: &TcContext, offset: usize, layer: &mut IpLayer) -> Result<usize, Skip> {
    let ip: Ipv4Hdr = ctx.load(offset).map_err(|_| Skip::Unparsed)?;
    let header_len = ((ip.vihl & 0x0f) as usize) * 4;
    if ip.vihl >> 4 != 4 || header_len < Ipv4Hdr::LEN {
        return Err(Skip::Unparsed);
    }
    layer.version = 4;
    layer.src = v4_mapped(ip.src_addr);
    layer.dst = v4_mapped(ip.dst_addr);
    layer.proto = ip.proto;
    layer.ttl = ip.ttl;
    layer.ip_id = u16::from_be_bytes(ip.id);
    layer.total_len = u16::from_be_bytes(ip.tot_len);
    layer.header_len = header_len as u16;
    let frags = u16::from_be_bytes(ip.frags);
    if frags & 0x4000 != 0 {
        layer.flags |= IP_DF;
    }
    if frags & 0x2000 != 0 || frags & 0x1fff != 0 {
        layer.flags |= IP_FRAGMENT;
    }
    if frags & 0x1fff != 0 {
        layer.flags |= IP_LATER_FRAGMENT;
    }
    if header_len > Ipv4Hdr::LEN {
        layer.flags |= IP_OPTIONS;
    }
    Ok(offset + header_len)
}

#[inline(always)]
fn parse_ipv6(ctx: &TcContext, offset: usize, layer: &mut IpLayer) -> Result<usize, Skip> {
    let ip: Ipv6Hdr = ctx.load(offset).map_err(|_| Skip::Unparsed)?;
    if ip.vcf[0] >> 4 != 6 {
        return Err(Skip::Unparsed);
    }
    layer.version = 6;
    layer.src = ip.src_addr;
    layer.dst = ip.dst_addr;
    layer.ttl = ip.hop_limit;
    layer.flow_label = u32::from_be_bytes([0, ip.vcf[1] & 0x0f, ip.vcf[2], ip.vcf[3]]);
    layer.total_len = u16::from_be_bytes(ip.payload_len).saturating_add(Ipv6Hdr::LEN as u16);
    let mut next = ip.next_hdr;
    let mut l4_offset = offset + Ipv6Hdr::LEN;
    for _ in 0..IPV6_MAX_EXT_HEADERS {
        match next {
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                let ext: [u8; 2] = ctx.load(l4_offset).map_err(|_| Skip::Unparsed)?;
                next = ext[0];
                l4_offset += (ext[1] as usize + 1) * 8;
                layer.flags |= IP_OPTIONS;
            }
            IPV6_FRAGMENT => {
                // next header, reserved, offset+flags (2), identification (4)
                let frag: [u8; 8] = ctx.load(l4_offset).map_err(|_| Skip::Unparsed)?;
                next = frag[0];
                l4_offset += 8;
                let offset_flags = u16::from_be_bytes([frag[2], frag[3]]);
                layer.flags |= IP_FRAGMENT | IP_OPTIONS;
                if offset_flags & 0xfff8 != 0 {
                    layer.flags |= IP_LATER_FRAGMENT;
                }
                // The low half of the fragment id stands in for IPv4's IP ID.
                layer.ip_id = u16::from_be_bytes([frag[6], frag[7]]);
            }
            _ => break,
        }
    }
    layer.proto = next;
    layer.header_len = (l4_offset - offset) as u16;
    Ok(l4_offset)
}

#[inline(always)]
fn parse_l4(ctx: &TcContext, offset: usize, layer: &mut IpLayer) -> Result<(), Skip> {
    match layer.proto {
        IPPROTO_TCP => {
            // ports, seq, ack, data offset, flags
            let tcp: [u8; 14] = ctx.load(offset).map_err(|_| Skip::Unparsed)?;
            layer.sport = u16::from_be_bytes([tcp[0], tcp[1]]);
            layer.dport = u16::from_be_bytes([tcp[2], tcp[3]]);
            layer.tcp_seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
            layer.tcp_ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
            layer.tcp_header_len = (tcp[12] >> 4) * 4;
            layer.tcp_flags = tcp[13];
        }
        IPPROTO_UDP => {
            let udp: UdpHdr = ctx.load(offset).map_err(|_| Skip::Unparsed)?;
            layer.sport = udp.src_port();
            layer.dport = udp.dst_port();
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            // type, code, checksum, then id and sequence for echo messages
            let icmp: [u8; 8] = ctx.load(offset).map_err(|_| Skip::Unparsed)?;
            layer.icmp_type = icmp[0];
            layer.icmp_code = icmp[1];
            layer.icmp_id = u16::from_be_bytes([icmp[4], icmp[5]]);
            layer.icmp_seq = u16::from_be_bytes([icmp[6], icmp[7]]);
        }
        _ => {}
    }
    Ok(())
}

#[inline(always)]
fn v4_mapped(addr: [u8; 4]) -> [u8; 16] {
    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, addr[0], addr[1], addr[2], addr[3]]
}
