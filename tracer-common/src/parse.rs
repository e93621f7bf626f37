//! The one header parser of podtrace, for the kernel programs and userspace alike: the TC
//! programs run it where their fast test cannot decide whether a packet is followed, the
//! tracepoint programs on an skb's memory, and userspace on the packet heads the TC programs
//! copy into their ring (`PacketRecord`), so that what the kernel decided and what userspace
//! reports are read by the same code. `parse_frame` reads a frame as a TC hop sees it,
//! `parse_packet` an IP packet and, for VXLAN and IPIP, the packet it carries.

use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    udp::UdpHdr,
    vlan::VlanHdr,
};

use crate::{
    IP_DF, IP_FRAGMENT, IP_LATER_FRAGMENT, IP_OPTIONS, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_IPIP, IPPROTO_TCP, IPPROTO_UDP, IpLayer,
    PKT_ENCAPSULATED, PKT_INNER_TRUNCATED, PKT_IPIP, PKT_VLAN, PKT_VXLAN,
};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
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

/// Why a packet could not be parsed.
pub enum Skip {
    NotIp,
    Unparsed,
}

/// Somewhere headers can be read from at an offset: a copy of the packet's head for the TC
/// programs and userspace, an skb's memory for the tracepoint programs.
pub trait Headers {
    fn read<T: Copy>(&self, offset: usize) -> Result<T, Skip>;

    /// A read in the TCP options walk, where each position depends on every option before
    /// it. A source may read these another way: the TC programs use `bpf_skb_load_bytes`,
    /// whose offset the verifier need not bound, so it does not follow every option
    /// sequence apart.
    #[inline(always)]
    fn read_walked<T: Copy>(&self, offset: usize) -> Result<T, Skip> {
        self.read(offset)
    }
}

/// Bytes in memory as `Headers`: a read past the end fails like one past the packet's end.
pub struct Bytes<'a>(pub &'a [u8]);

impl Headers for Bytes<'_> {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Result<T, Skip> {
        let bytes = self.0.get(offset..offset + size_of::<T>()).ok_or(Skip::Unparsed)?;
        // SAFETY: `bytes` holds size_of::<T>() bytes; T is a plain header type, read unaligned.
        Ok(unsafe { core::ptr::read_unaligned(bytes.as_ptr().cast()) })
    }
}

/// What `parse_packet` found besides the two layers.
pub struct Parsed {
    /// `PKT_VXLAN`, `PKT_IPIP`, `PKT_INNER_TRUNCATED`.
    pub flags: u8,
    pub vni: u32,
    /// Where the headers it read end (`headers_end`).
    pub headers_end: usize,
}

/// Where an L4 header at `l4_offset` ends as the parse reads it: TCP with its options, UDP
/// with its payload's first `PAYLOAD_HEAD_LEN` bytes, an ICMP header (an ICMP error's quote
/// is read further, see `parse_quoted`), nothing of other protocols. With the IP headers before
/// it, and for VXLAN the inner packet's, this is what a packet event copies of a frame
/// (`Frame::headers_end`): headers only, never payload, and all that a parse of the copy reads.
#[inline(always)]
pub fn l4_headers_end(proto: u8, l4_offset: usize, tcp_header_len: u8) -> usize {
    l4_offset
        + match proto {
            IPPROTO_TCP => (tcp_header_len as usize).max(TCP_HDR_LEN),
            IPPROTO_UDP => UdpHdr::LEN + PAYLOAD_HEAD_LEN,
            IPPROTO_ICMP | IPPROTO_ICMPV6 => ICMP_HDR_LEN,
            _ => 0,
        }
}

/// A frame as a TC hop sees it, parsed: what a packet event reports of its headers.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Frame {
    pub outer: IpLayer,
    /// The encapsulated packet when `flags` has `PKT_VXLAN` or `PKT_IPIP`.
    pub inner: IpLayer,
    /// VXLAN network identifier when `PKT_VXLAN` is set.
    pub vni: u32,
    /// 802.1Q VLAN id when `PKT_VLAN` is set.
    pub vlan_id: u16,
    /// Where the headers read end (`Parsed::headers_end`).
    pub headers_end: u16,
    /// `PKT_*` flags.
    pub flags: u8,
    /// Zero; keeps the struct free of trailing padding.
    pub reserved: [u8; 3],
}

/// Parses a frame into `frame` (which must start zeroed): its Ethernet header and VLAN tags,
/// or, where `no_mac_header`, the IP header `no_mac_l3` finds; then `parse_packet`.
/// `frame_len` is the whole frame's length (`skb->len`), of which `headers` may hold less.
#[inline(always)]
pub fn parse_frame<H: Headers>(
    headers: &H,
    no_mac_header: bool,
    frame_len: u32,
    vxlan_ports: &[u16; 2],
    frame: &mut Frame,
) -> Result<(), Skip> {
    let (ether_type, l3_offset, vlan_id) = if no_mac_header { no_mac_l3(headers, frame_len)? } else { parse_ethernet(headers, 0)? };
    if let Some(vlan_id) = vlan_id {
        frame.flags |= PKT_VLAN;
        frame.vlan_id = vlan_id;
    }
    let parsed = parse_packet(headers, ether_type, l3_offset, vxlan_ports, &mut frame.outer, &mut frame.inner)?;
    frame.flags |= parsed.flags;
    frame.vni = parsed.vni;
    frame.headers_end = parsed.headers_end as u16;
    Ok(())
}

/// Where the IP header starts on a hop without a MAC header (a tunnel device), as
/// `parse_ethernet` answers. Tunnel devices hand TC the IP header at offset 0, except at an
/// IPIP device's ingress on some kernels (5.10), where the packet still starts with the
/// underlay's Ethernet header and the outer IPv4 header (protocol 4), the pod's packet behind
/// them. So offset 0 is taken as IP only when a valid IP header spanning the whole frame
/// starts there; else Ethernet carrying IPIP is parsed as such; else, for any other layout,
/// the version nibble at offset 0 decides as it always did.
#[inline(always)]
fn no_mac_l3<H: Headers>(headers: &H, frame_len: u32) -> Result<(u16, usize, Option<u16>), Skip> {
    let first: u8 = headers.read(0)?;
    let ether_type = match first >> 4 {
        4 => ETH_P_IP,
        6 => ETH_P_IPV6,
        _ => 0,
    };
    if ether_type != 0 && ip_spans_frame(headers, first, frame_len) {
        return Ok((ether_type, 0, None));
    }
    // Untagged Ethernet, then an IPv4 header of protocol IPIP. Only the bytes looked at are
    // read: the kernel programs' stack has little room to spare.
    let ethernet_ipip = headers.read::<[u8; 2]>(ETH_TYPE_OFFSET).is_ok_and(|t| u16::from_be_bytes(t) == ETH_P_IP)
        && headers.read::<[u8; 10]>(EthHdr::LEN).is_ok_and(|ip| ip[0] >> 4 == 4 && ip[9] == IPPROTO_IPIP);
    if ethernet_ipip {
        return Ok((ETH_P_IP, EthHdr::LEN, None));
    }
    match ether_type {
        0 => Err(Skip::NotIp),
        ether_type => Ok((ether_type, 0, None)),
    }
}

/// Where the EtherType sits in an Ethernet header.
const ETH_TYPE_OFFSET: usize = 12;

/// Whether the IP header at offset 0 (whose first byte is `first`) is sound and says the
/// packet is `frame_len` bytes long: IPv4's total length, or IPv6's payload length plus its
/// 40-byte header.
#[inline(always)]
fn ip_spans_frame<H: Headers>(headers: &H, first: u8, frame_len: u32) -> bool {
    let (length_at, header) = if first >> 4 == 4 { (2, 0) } else { (4, Ipv6Hdr::LEN as u32) };
    if first >> 4 == 4 && ((first & 0x0f) as usize) * 4 < Ipv4Hdr::LEN {
        return false;
    }
    headers.read::<[u8; 2]>(length_at).is_ok_and(|length| u32::from(u16::from_be_bytes(length)) + header == frame_len)
}

/// Parses the IP packet at `l3_offset` into `outer` and, when it is VXLAN to one of
/// `vxlan_ports` or IPIP (IP protocol 4), the packet it carries into `inner`. An encapsulated
/// payload too short for its inner headers keeps the outer layer, which still tells where the
/// packet was, and sets `PKT_INNER_TRUNCATED`: the caller counts it as unparsed where it
/// `could_be_followed`.
#[inline(always)]
pub fn parse_packet<H: Headers>(
    headers: &H,
    ether_type: u16,
    l3_offset: usize,
    vxlan_ports: &[u16; 2],
    outer: &mut IpLayer,
    inner: &mut IpLayer,
) -> Result<Parsed, Skip> {
    let headers_end = parse_ip(headers, ether_type, l3_offset, outer)?;
    let mut parsed = Parsed { flags: 0, vni: 0, headers_end };
    let l4_offset = l3_offset + usize::from(outer.header_len);
    // Where the inner IP header starts (its EtherType, 0 for none, and offset), found for
    // either encapsulation, and then parsed at one place: a second copy of the IP and L4 parse
    // would double the paths the verifier walks. Plain values, not nested results: the kernel
    // programs' stack has little room to spare.
    let (mut inner_type, mut inner_offset, mut cut) = (0, 0, false);
    if is_vxlan(outer, vxlan_ports) {
        match vxlan_inner(headers, l4_offset + UdpHdr::LEN) {
            Ok(Some((vni, (ether_type, offset)))) => {
                parsed.flags |= PKT_VXLAN;
                parsed.vni = vni;
                (inner_type, inner_offset) = (ether_type, offset);
            }
            Ok(None) => {}
            Err(_) => {
                parsed.flags |= PKT_VXLAN;
                cut = true;
            }
        }
    } else if outer.proto == IPPROTO_IPIP && outer.flags & IP_LATER_FRAGMENT == 0 {
        // No header of its own: the inner IPv4 header follows the outer one.
        parsed.flags |= PKT_IPIP;
        (inner_type, inner_offset) = (ETH_P_IP, l4_offset);
    }
    if inner_type != 0 {
        match parse_ip(headers, inner_type, inner_offset, inner) {
            Ok(inner_end) => parsed.headers_end = inner_end,
            Err(_) => cut = true,
        }
    }
    if cut {
        // The frame ends inside the inner headers: all of it is headers.
        parsed.flags |= PKT_INNER_TRUNCATED;
        parsed.headers_end = usize::from(u16::MAX);
    }
    Ok(parsed)
}

/// Whether a packet whose headers could not all be read may be a followed pod's, and so
/// leaves the report incomplete: its headers were cut before its addresses (outer, or an
/// encapsulated packet's inner ones), or the addresses that were read name a followed IP
/// (`is_followed`, asked of the outer layer, and of the inner one under VXLAN or IPIP).
/// Other flows' truncated headers are none of the report's business.
#[inline(always)]
pub fn could_be_followed(outer: &IpLayer, inner: &IpLayer, flags: u8, is_followed: impl Fn(&IpLayer) -> bool) -> bool {
    let encapsulated = flags & PKT_ENCAPSULATED != 0;
    let addresses_unread = outer.version == 0 || (encapsulated && inner.version == 0);
    addresses_unread || is_followed(outer) || (encapsulated && is_followed(inner))
}

/// Where an IP header starts: its EtherType and offset.
type IpAt = (u16, usize);

/// Reads a VXLAN header at `offset` and the Ethernet header of the frame it carries; returns
/// the VNI and where the inner IP header starts, or `None` if the I flag is clear (not a VXLAN
/// packet after all).
#[inline(always)]
fn vxlan_inner<H: Headers>(headers: &H, offset: usize) -> Result<Option<(u32, IpAt)>, Skip> {
    let vxlan: [u8; VXLAN_HDR_LEN] = headers.read(offset)?;
    if vxlan[0] & VXLAN_FLAG_VNI == 0 {
        return Ok(None);
    }
    let vni = u32::from_be_bytes([0, vxlan[4], vxlan[5], vxlan[6]]);
    let (ether_type, l3_offset, _) = parse_ethernet(headers, offset + VXLAN_HDR_LEN)?;
    Ok(Some((vni, (ether_type, l3_offset))))
}

/// Whether a parsed outer layer is a UDP packet to one of the VXLAN ports.
#[inline(always)]
fn is_vxlan(layer: &IpLayer, ports: &[u16; 2]) -> bool {
    layer.proto == IPPROTO_UDP && layer.flags & IP_LATER_FRAGMENT == 0 && (layer.dport == ports[0] || layer.dport == ports[1])
}

/// Returns the EtherType after at most two VLAN tags, the L3 offset, and the outer VLAN id.
#[inline(always)]
pub fn parse_ethernet<H: Headers>(ctx: &H, offset: usize) -> Result<(u16, usize, Option<u16>), Skip> {
    let eth: EthHdr = ctx.read(offset)?;
    let mut ether_type = u16::from_be(eth.ether_type);
    let mut offset = offset + EthHdr::LEN;
    let mut vlan_id = None;
    // 802.1ad carries an 802.1Q tag inside, hence two rounds.
    for _ in 0..2 {
        if ether_type != ETH_P_8021Q && ether_type != ETH_P_8021AD {
            break;
        }
        let vlan: VlanHdr = ctx.read(offset)?;
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

/// Fills `layer` from the IP header at `offset` and the L4 header after it; returns where
/// they end (`l4_headers_end`; the IP header's end for a later fragment, which has no L4
/// header).
#[inline(always)]
fn parse_ip<H: Headers>(ctx: &H, ether_type: u16, offset: usize, layer: &mut IpLayer) -> Result<usize, Skip> {
    let l4_offset = if ether_type == ETH_P_IP { parse_ipv4(ctx, offset, layer)? } else { parse_ipv6(ctx, offset, layer)? };
    if layer.flags & IP_LATER_FRAGMENT != 0 {
        return Ok(l4_offset);
    }
    parse_l4(ctx, l4_offset, layer)
}

#[inline(always)]
fn parse_ipv4<H: Headers>(ctx: &H, offset: usize, layer: &mut IpLayer) -> Result<usize, Skip> {
    let ip: Ipv4Hdr = ctx.read(offset)?;
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
fn parse_ipv6<H: Headers>(ctx: &H, offset: usize, layer: &mut IpLayer) -> Result<usize, Skip> {
    let ip: Ipv6Hdr = ctx.read(offset)?;
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
                let ext: [u8; 2] = ctx.read(l4_offset)?;
                next = ext[0];
                l4_offset += (ext[1] as usize + 1) * 8;
                layer.flags |= IP_OPTIONS;
            }
            IPV6_FRAGMENT => {
                // next header, reserved, offset+flags (2), identification (4)
                let frag: [u8; 8] = ctx.read(l4_offset)?;
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

/// Fills `layer`'s L4 fields from the header at `offset`; returns where what it read ends.
#[inline(always)]
fn parse_l4<H: Headers>(ctx: &H, offset: usize, layer: &mut IpLayer) -> Result<usize, Skip> {
    match layer.proto {
        IPPROTO_TCP => {
            // ports, seq, ack, data offset, flags
            let tcp: [u8; 14] = ctx.read(offset)?;
            layer.sport = u16::from_be_bytes([tcp[0], tcp[1]]);
            layer.dport = u16::from_be_bytes([tcp[2], tcp[3]]);
            layer.tcp_seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
            layer.tcp_ack = u32::from_be_bytes([tcp[8], tcp[9], tcp[10], tcp[11]]);
            layer.tcp_header_len = (tcp[12] >> 4) * 4;
            layer.tcp_flags = tcp[13];
            parse_tcp_options(ctx, offset, layer);
        }
        IPPROTO_UDP => {
            let udp: UdpHdr = ctx.read(offset)?;
            layer.sport = udp.src_port();
            layer.dport = udp.dst_port();
            // The UDP length, not the frame: Ethernet padding after a short datagram is
            // there on some hops and trimmed on others.
            if udp.len() as usize >= UdpHdr::LEN + PAYLOAD_HEAD_LEN {
                layer.payload_head = ctx.read(offset + UdpHdr::LEN).unwrap_or_default();
            }
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            // type, code, checksum, then id and sequence for echo messages
            let icmp: [u8; ICMP_HDR_LEN] = ctx.read(offset)?;
            layer.icmp_type = icmp[0];
            layer.icmp_code = icmp[1];
            layer.icmp_id = u16::from_be_bytes([icmp[4], icmp[5]]);
            layer.icmp_seq = u16::from_be_bytes([icmp[6], icmp[7]]);
            if is_icmp_error(layer.proto, layer.icmp_type) {
                // A short quote leaves the quoted fields zero; the ICMP header itself is sound.
                // Cut short, the packet ends inside the quoted headers: all of it is headers.
                return Ok(parse_quoted(ctx, offset + ICMP_HDR_LEN, layer).unwrap_or(usize::from(u16::MAX)));
            }
        }
        _ => {}
    }
    Ok(l4_headers_end(layer.proto, offset, layer.tcp_header_len))
}

const ICMP_HDR_LEN: usize = 8;
/// What an ICMP error must quote of the packet it answers after its IP header (RFC 792): the
/// ports, or an ICMP header's type, code and id.
const QUOTED_L4_LEN: usize = 8;
const PAYLOAD_HEAD_LEN: usize = 4;
const TCP_HDR_LEN: usize = 20;
const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_TIMESTAMP: u8 = 8;
const TCPOPT_SACK: u8 = 5;
const TCPOLEN_TIMESTAMP: usize = 10;
/// Kind, length and one block (left and right edge).
const TCPOLEN_SACK_BLOCK: usize = 10;
/// Enough for any real option list (at most 40 bytes; Linux sends NOP, NOP, timestamp, then
/// NOP, NOP, SACK) and bounded so the verifier sees a finite loop.
const TCP_MAX_OPTIONS: usize = 12;

/// Reads the timestamp (TSval) and the first SACK block's right edge from the options of
/// the TCP header at `offset` into `layer`: a short walk of kind/length pairs that never
/// leaves the header. Options that are absent or cut short leave their fields zero.
#[inline(always)]
fn parse_tcp_options<H: Headers>(ctx: &H, offset: usize, layer: &mut IpLayer) {
    let end = layer.tcp_header_len as usize;
    let mut at = TCP_HDR_LEN;
    for _ in 0..TCP_MAX_OPTIONS {
        if at + 2 > end {
            break;
        }
        let Ok(kind) = ctx.read_walked::<u8>(offset + at) else { break };
        if kind == TCPOPT_EOL {
            break;
        }
        if kind == TCPOPT_NOP {
            at += 1;
            continue;
        }
        let Ok(len) = ctx.read_walked::<u8>(offset + at + 1) else { break };
        let len = len as usize;
        if len < 2 || at + len > end {
            break;
        }
        // Both carry two 32-bit values after kind and length; the whole pair must be there.
        if (kind == TCPOPT_TIMESTAMP && len == TCPOLEN_TIMESTAMP) || (kind == TCPOPT_SACK && len >= TCPOLEN_SACK_BLOCK) {
            let Ok(values) = ctx.read_walked::<[u8; 8]>(offset + at + 2) else { break };
            if kind == TCPOPT_TIMESTAMP {
                layer.tcp_tsval = u32::from_be_bytes([values[0], values[1], values[2], values[3]]);
            } else {
                layer.tcp_sack_right = u32::from_be_bytes([values[4], values[5], values[6], values[7]]);
            }
        }
        at += len;
    }
}

/// Destination unreachable, time exceeded, parameter problem (and ICMPv6 packet too big):
/// the messages that quote the packet they answer.
#[inline(always)]
fn is_icmp_error(proto: u8, icmp_type: u8) -> bool {
    match proto {
        IPPROTO_ICMP => matches!(icmp_type, 3 | 11 | 12),
        _ => matches!(icmp_type, 1..=4),
    }
}

/// Reads the protocol and ports of the packet an ICMP error quotes at `offset`: its IP header
/// and at least the first 8 bytes after it. Returns where the quoted IP header and the 8
/// bytes after it end (its L4 header's start: ports, or an ICMP header).
#[inline(always)]
fn parse_quoted<H: Headers>(ctx: &H, offset: usize, layer: &mut IpLayer) -> Result<usize, Skip> {
    let (proto, l4_offset) = if layer.proto == IPPROTO_ICMP {
        let ip: Ipv4Hdr = ctx.read(offset)?;
        (ip.proto, offset + ((ip.vihl & 0x0f) as usize) * 4)
    } else {
        let ip: Ipv6Hdr = ctx.read(offset)?;
        (ip.next_hdr, offset + Ipv6Hdr::LEN)
    };
    layer.quoted_proto = proto;
    if proto == IPPROTO_TCP || proto == IPPROTO_UDP {
        let ports: [u8; 4] = ctx.read(l4_offset)?;
        layer.quoted_sport = u16::from_be_bytes([ports[0], ports[1]]);
        layer.quoted_dport = u16::from_be_bytes([ports[2], ports[3]]);
    }
    Ok(l4_offset + QUOTED_L4_LEN)
}

/// `::ffff:a.b.c.d`, built from 32-bit words: as bytes, LLVM zeroes the first ten with a
/// `memset` call, which on BPF is a byte loop.
#[inline(always)]
pub fn v4_mapped(addr: [u8; 4]) -> [u8; 16] {
    let words = [0, 0, u32::from_ne_bytes([0, 0, 0xff, 0xff]), u32::from_ne_bytes(addr)];
    // SAFETY: four u32s are sixteen bytes, any bit pattern a valid [u8; 16].
    unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) }
}

/// Whether an IPv6-form address is an IPv4 one, v4-mapped (`::ffff:a.b.c.d`).
#[inline(always)]
pub fn is_v4_mapped(address: &[u8; 16]) -> bool {
    address[..10] == [0; 10] && address[10] == 0xff && address[11] == 0xff
}

#[cfg(test)]
mod tests {
    //! The parser on the host, against a byte slice standing in for the packet: what
    //! `bpf_skb_load_bytes` does, a read that fails past the end.

    extern crate std;
    use std::{vec, vec::Vec};

    use super::*;

    /// The stand-in for the followed-IP match: POD is followed.
    fn followed(layer: &IpLayer) -> bool {
        layer.src == v4_mapped(POD) || layer.dst == v4_mapped(POD)
    }

    /// Whether the kernel would count a truncated parse as unparsed.
    fn counted(parsed: &Parsed, outer: &IpLayer, inner: &IpLayer) -> bool {
        parsed.flags & PKT_INNER_TRUNCATED != 0 && could_be_followed(outer, inner, parsed.flags, followed)
    }

    const POD: [u8; 4] = [10, 244, 0, 2];
    const PEER: [u8; 4] = [10, 244, 1, 2];

    fn ipv4(src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
        let total = (20 + l4.len()) as u16;
        let mut packet = vec![0x45, 0];
        packet.extend_from_slice(&total.to_be_bytes());
        packet.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, proto, 0, 0]);
        packet.extend_from_slice(&src);
        packet.extend_from_slice(&dst);
        packet.extend_from_slice(l4);
        packet
    }

    fn ethernet(payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00];
        frame.extend_from_slice(payload);
        frame
    }

    fn echo_request() -> Vec<u8> {
        vec![8, 0, 0, 0, 0, 7, 0, 3]
    }

    fn vxlan(inner: &[u8]) -> Vec<u8> {
        let mut udp = vec![0xc7, 0x38, 0x21, 0x18, 0, 0, 0, 0, VXLAN_FLAG_VNI, 0, 0, 0, 0, 0, 1, 0];
        udp.extend_from_slice(inner);
        ipv4([10, 99, 0, 1], [10, 99, 0, 2], IPPROTO_UDP, &udp)
    }

    fn parse(packet: &[u8]) -> Result<(Parsed, IpLayer, IpLayer), Skip> {
        let (mut outer, mut inner) = (IpLayer::default(), IpLayer::default());
        let parsed = parse_packet(&Bytes(packet), ETH_P_IP, 0, &[8472, 4789], &mut outer, &mut inner)?;
        Ok((parsed, outer, inner))
    }

    #[test]
    fn vxlan_exposes_the_inner_packet() {
        let (parsed, outer, inner) = parse(&vxlan(&ethernet(&ipv4(POD, PEER, IPPROTO_ICMP, &echo_request())))).ok().unwrap();
        assert_eq!((parsed.flags, parsed.vni), (PKT_VXLAN, 1));
        assert_eq!((outer.proto, outer.dport), (IPPROTO_UDP, 8472));
        assert_eq!((inner.src, inner.dst, inner.proto), (v4_mapped(POD), v4_mapped(PEER), IPPROTO_ICMP));
        assert_eq!((inner.icmp_type, inner.icmp_id, inner.icmp_seq, inner.ip_id), (8, 7, 3, 0x1234));
        assert!(inner.flags & IP_DF != 0);
    }

    #[test]
    fn a_truncated_inner_packet_keeps_the_outer_and_counts_unparsed() {
        let inner = ethernet(&ipv4(POD, PEER, IPPROTO_ICMP, &echo_request()));
        for cut in [0, 10, 14 + 10, 14 + 20 + 2] {
            let (parsed, outer, inner) = parse(&vxlan(&inner[..cut])).ok().unwrap();
            assert_eq!(parsed.flags, PKT_VXLAN | PKT_INNER_TRUNCATED, "cut at {cut}");
            assert_eq!(outer.src, v4_mapped([10, 99, 0, 1]));
            assert!(counted(&parsed, &outer, &inner), "cut at {cut}");
        }
    }

    fn ipip(inner: &[u8]) -> Vec<u8> {
        ipv4([10, 99, 0, 1], [10, 99, 0, 2], IPPROTO_IPIP, inner)
    }

    #[test]
    fn ipip_exposes_the_inner_packet() {
        let (parsed, outer, inner) = parse(&ipip(&ipv4(POD, PEER, IPPROTO_ICMP, &echo_request()))).ok().unwrap();
        assert_eq!((parsed.flags, parsed.vni), (PKT_IPIP, 0));
        assert_eq!((outer.proto, outer.src, outer.total_len), (IPPROTO_IPIP, v4_mapped([10, 99, 0, 1]), 20 + 28));
        assert_eq!((inner.src, inner.dst, inner.proto), (v4_mapped(POD), v4_mapped(PEER), IPPROTO_ICMP));
        assert_eq!((inner.icmp_type, inner.icmp_id, inner.icmp_seq), (8, 7, 3));
        for cut in [0, 10, 20 + 2] {
            let (parsed, _, inner) = parse(&ipip(&ipv4(POD, PEER, IPPROTO_ICMP, &echo_request()))[..20 + cut]).ok().unwrap();
            assert_eq!(parsed.flags, PKT_IPIP | PKT_INNER_TRUNCATED, "cut at {cut}");
            assert!(counted(&parsed, &parse(&ipip(&[])).ok().unwrap().1, &inner), "cut at {cut}");
        }
        // A later fragment of an IPIP packet carries no inner header.
        let mut fragment = ipip(&ipv4(POD, PEER, IPPROTO_ICMP, &echo_request()));
        fragment[6..8].copy_from_slice(&0x0010u16.to_be_bytes());
        assert_eq!(parse(&fragment).ok().unwrap().0.flags, 0);
    }

    fn frame_of(bytes: &[u8], frame_len: u32) -> Result<Frame, Skip> {
        let mut frame = Frame::default();
        parse_frame(&Bytes(bytes), true, frame_len, &[8472, 4789], &mut frame)?;
        Ok(frame)
    }

    /// On a hop without a MAC header the IP header starts at offset 0, except at an IPIP
    /// device's ingress on 5.10, which still shows the underlay's Ethernet and outer IPv4
    /// headers: either way the pod's packet is the inner one.
    #[test]
    fn a_hop_without_a_mac_header_finds_its_ip_header() {
        let pod_packet = ipv4(POD, PEER, IPPROTO_ICMP, &echo_request());
        let at_zero = frame_of(&pod_packet, pod_packet.len() as u32).ok().unwrap();
        assert_eq!((at_zero.flags, at_zero.outer.src), (0, v4_mapped(POD)));
        let received = ethernet(&ipip(&pod_packet));
        let frame = frame_of(&received, received.len() as u32).ok().unwrap();
        assert_eq!((frame.flags, frame.outer.proto, frame.inner.src), (PKT_IPIP, IPPROTO_IPIP, v4_mapped(POD)));
        // The whole frame is the length, not what the head holds of it.
        let frame = frame_of(&received[..14 + 20 + 20], received.len() as u32 + 1000).ok().unwrap();
        assert_eq!((frame.flags, frame.inner.dst), (PKT_IPIP | PKT_INNER_TRUNCATED, v4_mapped(PEER)));
        // An IP header at 0 whose length is not the frame's, and no Ethernet behind it: IP at 0
        // all the same, as before.
        let frame = frame_of(&pod_packet, pod_packet.len() as u32 + 4).ok().unwrap();
        assert_eq!(frame.outer.src, v4_mapped(POD));
        // Neither IP nor Ethernet carrying IPIP.
        assert!(matches!(frame_of(&[0x00; 40], 40), Err(Skip::NotIp)));
        let mut other = ethernet(&ipv4(POD, PEER, IPPROTO_ICMP, &echo_request()));
        other[0] = 0;
        assert!(matches!(frame_of(&other, other.len() as u32), Err(Skip::NotIp)), "Ethernet without IPIP is not read as such");
    }

    #[test]
    fn a_udp_packet_to_another_port_is_not_vxlan() {
        let udp = [0xc7, 0x38, 0x00, 0x35, 0, 8, 0, 0];
        let (parsed, outer, inner) = parse(&ipv4(POD, PEER, IPPROTO_UDP, &udp)).ok().unwrap();
        assert_eq!((parsed.flags, outer.dport, inner), (0, 53, IpLayer::default()));
        assert!(!counted(&parsed, &outer, &inner));
    }

    #[test]
    fn a_truncated_outer_header_is_unparsed() {
        let packet = ipv4(POD, PEER, IPPROTO_TCP, &[0; 20]);
        assert!(matches!(parse(&packet[..19]), Err(Skip::Unparsed)), "inside the IP header");
        assert!(matches!(parse(&packet[..30]), Err(Skip::Unparsed)), "inside the TCP header");
    }

    #[test]
    fn unfollowed_flows_cut_after_their_addresses_are_not_counted() {
        const OTHER: [u8; 4] = [10, 244, 0, 9];
        let inner = |src| ethernet(&ipv4(src, PEER, IPPROTO_TCP, &[0; 20]));
        for (src, cut, expected) in [
            (OTHER, 14 + 20 + 4, false), // inside the other pod's TCP header: its addresses were read
            (POD, 14 + 20 + 4, true),    // the same cut in the followed pod's packet
            (OTHER, 14 + 10, true),      // inside the inner IP header: could be anyone's
        ] {
            let (parsed, outer, inner) = parse(&vxlan(&inner(src)[..cut])).ok().unwrap();
            assert_eq!(parsed.flags, PKT_VXLAN | PKT_INNER_TRUNCATED);
            assert_eq!(counted(&parsed, &outer, &inner), expected, "{src:?} cut at {cut}");
        }
        let mut outer = IpLayer::default();
        assert!(could_be_followed(&outer, &IpLayer::default(), 0, followed), "nothing read");
        outer.version = 4;
        outer.src = v4_mapped(OTHER);
        assert!(!could_be_followed(&outer, &IpLayer::default(), 0, followed));
        outer.dst = v4_mapped(POD);
        assert!(could_be_followed(&outer, &IpLayer::default(), 0, followed));
    }

    fn tcp_with_options(options: &[u8]) -> Vec<u8> {
        let mut tcp = vec![0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 2, (((20 + options.len()) / 4) as u8) << 4, 0x10, 0, 0, 0, 0, 0, 0];
        tcp.extend_from_slice(options);
        tcp
    }

    #[test]
    fn the_tcp_timestamp_is_found_among_the_options() {
        let ts = [8, 10, 0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 1];
        let data = [&[1, 1][..], &ts].concat(); // NOP, NOP, timestamp: Linux's data segments
        let syn = [&[2, 4, 5, 0xb4, 4, 2][..], &ts, &[1, 3, 3, 7]].concat(); // MSS, SACK-permitted, TS, NOP, WS
        for options in [data, syn] {
            let (_, layer, _) = parse(&ipv4(POD, PEER, IPPROTO_TCP, &tcp_with_options(&options))).ok().unwrap();
            assert_eq!((layer.tcp_tsval, layer.tcp_sack_right), (0xdead_beef, 0), "{options:?}");
        }
        // A duplicate ACK: NOP, NOP, TS, NOP, NOP, SACK with two blocks; the first is the newest.
        let sack = [0, 0, 0x10, 0, 0, 0, 0x20, 0, 0, 0, 0, 1, 0, 0, 0, 2];
        let dup_ack = [&[1, 1][..], &ts, &[1, 1, 5, 18], &sack].concat();
        let (_, layer, _) = parse(&ipv4(POD, PEER, IPPROTO_TCP, &tcp_with_options(&dup_ack))).ok().unwrap();
        assert_eq!((layer.tcp_tsval, layer.tcp_sack_right), (0xdead_beef, 0x2000));
        // No options, an end-of-list before the timestamp, a zero length, a timestamp that
        // runs past the header, and a header longer than the packet: no TSval, still parsed.
        let cut_short = {
            let mut tcp = tcp_with_options(&[1, 1, 8, 10, 1, 2, 3, 4]);
            tcp[12] = 0xf0;
            tcp
        };
        for tcp in [
            tcp_with_options(&[]),
            tcp_with_options(&[[0, 0, 0, 0].as_slice(), &ts, &[0, 0]].concat()),
            tcp_with_options(&[[5, 0, 0, 0].as_slice(), &ts, &[0, 0]].concat()),
            tcp_with_options(&[1, 1, 8, 10, 1, 2, 3, 4]),
            cut_short,
        ] {
            let (_, layer, _) = parse(&ipv4(POD, PEER, IPPROTO_TCP, &tcp)).ok().unwrap();
            assert_eq!(layer.tcp_tsval, 0, "{tcp:?}");
        }
    }

    #[test]
    fn the_udp_payload_head_is_read_within_the_datagram() {
        let dns = [0xc7, 0x38, 0x00, 0x35, 0, 20, 0, 0, 0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        let (_, layer, _) = parse(&ipv4(POD, PEER, IPPROTO_UDP, &dns)).ok().unwrap();
        assert_eq!(layer.payload_head, [0xab, 0xcd, 0x01, 0x00]);
        // A 2-byte datagram followed by Ethernet padding: the padding is not payload.
        let short = [0xc7, 0x38, 0x00, 0x35, 0, 10, 0, 0, 0xab, 0xcd, 0, 0, 0, 0];
        let (_, layer, _) = parse(&ipv4(POD, PEER, IPPROTO_UDP, &short)).ok().unwrap();
        assert_eq!(layer.payload_head, [0; 4]);
    }

    #[test]
    fn later_fragments_have_no_ports() {
        let mut packet = ipv4(POD, PEER, IPPROTO_UDP, &[0x11; 16]);
        packet[6..8].copy_from_slice(&0x0010u16.to_be_bytes());
        let (_, outer, _) = parse(&packet).ok().unwrap();
        assert!(outer.flags & IP_LATER_FRAGMENT != 0);
        assert_eq!((outer.sport, outer.dport), (0, 0));
    }

    #[test]
    fn v4_mapped_addresses_are_recognised() {
        assert!(is_v4_mapped(&v4_mapped(POD)));
        let mut v6 = v4_mapped(POD);
        v6[0] = 0xfd;
        assert!(!is_v4_mapped(&v6));
        assert!(!is_v4_mapped(&[0; 16]));
    }
}
