//! `mtu-mismatch`: a tunnel (VXLAN, IPIP) whose MTU plus encapsulation exceeds its underlay's;
//! a pod's own MTU above the tunnel's (with the full-size segments its TCP retransmitted); a host-side veth or bridge MTU above it; a wire-sized packet
//! larger than the next hop's MTU; an underlay that drops received frames while the tunnel
//! is in use.
//!
//! The pod's own MTU is its end of the veth, in its namespace: the host side and the bridge
//! may be larger without the pod ever sending more. A blackhole is claimed only with
//! evidence: packets too large for the next hop that could not be fragmented were seen and
//! no fragmentation-needed was sent, or the fragmentation-needed that was sent was dropped.
//! A finding without such traffic says it is about the configuration only.
//!
//! A sender that never learns the smaller MTU shows in the traffic too: the same full-size TCP
//! segment arriving again and again (a sender that learned it resends the segment split to
//! fit). That is a blackhole whatever the kernel's ICMP says, and it is the only evidence when
//! the sender is outside the node (a NodePort client), whose retransmits no tracepoint here
//! sees.
//!
//! For IPv6 the error is ICMPv6 packet-too-big, and every forwarded packet counts as one that
//! cannot be fragmented: IPv6 routers never fragment. The kernel's `icmp:icmp_send` covers
//! IPv4 only, so a packet-too-big is known to be sent only when it is seen crossing the path on
//! its way back to a followed pod; none seen leaves it unknown.

use std::{
    collections::{BTreeMap, HashSet},
    net::IpAddr,
};

use serde_json::json;
use tracer_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP};

use super::{Detector, Finding, FindingKind, MAX_GROUPS, Severity, TraceEnd, drop};
use crate::{
    Direction,
    events::{
        correlate::Sighting,
        decode::{KernelRecord, KernelRecordKind, Layer, Packet},
    },
    node::{Family, Hop, HopKey, HopKind, Path, PodEnd},
};

/// VXLAN over IPv4 adds outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
const VXLAN_OVERHEAD_V4: u32 = 50;
const VXLAN_OVERHEAD_V6: u32 = 70;
/// IPIP adds the outer IPv4 header alone.
const IPIP_OVERHEAD: u32 = 20;
/// The smallest IPv4 and TCP headers: a retransmitted payload this much below a tunnel's MTU
/// fits it whatever options the segment carries.
const MIN_TCP_IPV4_HEADERS: u32 = 40;
/// Full-size TCP segments remembered to recognise them arriving again; past it, new ones are
/// counted as not tracked.
const MAX_TRACKED_SEGMENTS: usize = 4096;
/// How often full-size segments must arrive again before their senders are said never to
/// learn the smaller MTU: one could be a probe sent before the ICMP error arrived.
const MIN_RESENT_TO_CLAIM: u64 = 2;

/// A TCP segment at a hop: the hop, the flow and the sequence number.
type SegmentKey = (HopKey, IpAddr, IpAddr, u16, u16, u32);

/// What a tunnel adds to each packet it carries.
fn overhead(tunnel: &Hop) -> u32 {
    match (tunnel.kind, tunnel.vxlan_local) {
        (HopKind::Ipip, _) => IPIP_OVERHEAD,
        (_, Some(IpAddr::V6(_))) => VXLAN_OVERHEAD_V6,
        _ => VXLAN_OVERHEAD_V4,
    }
}

/// The largest wire-sized packets that crossed a hop bigger than the next hop's MTU.
#[derive(Clone, Debug, Default)]
struct Oversized {
    count: u64,
    /// Of them, those with Don't Fragment set: the ones no router may fragment.
    dont_fragment: u64,
    max_len: u32,
    example: String,
    /// Of them, TCP segments with Don't Fragment that had crossed the hop before, full-size:
    /// retransmitted by a sender that did not lower its MTU.
    resent: u64,
}

pub struct MtuMismatch<'a> {
    path: &'a Path,
    oversized: BTreeMap<(HopKey, Family), Oversized>,
    /// ICMP fragmentation-needed the kernel generated (`icmp:icmp_send`, IPv4 only).
    frag_needed_sent: u64,
    /// ICMPv6 packet-too-big seen crossing the path to a followed pod, each packet once.
    packet_too_big_seen: u64,
    /// Fragmentation-needed messages the kernel then dropped.
    frag_needed_dropped: u64,
    /// Frees of packet-too-big messages, by drop reason and location: judged at the end,
    /// when the location's function is known (see `delivered_then_freed`).
    packet_too_big_frees: BTreeMap<(u32, u64), u64>,
    /// Payload sizes of the followed pods' retransmitted TCP segments, and how many of each:
    /// judged at the end against the pod's and the tunnel's MTU.
    retransmitted: BTreeMap<u32, u64>,
    /// The oversized, unfragmentable TCP segments seen, to recognise them arriving again.
    oversized_segments: HashSet<SegmentKey>,
    /// Oversized segments seen once `oversized_segments` was full.
    segments_not_tracked: u64,
}

/// A packet-too-big freed by `icmpv6_rcv` without a reason had arrived: the receiving stack
/// took its MTU and some kernels (6.1) free a handled ICMPv6 error with the generic free.
/// A drop on the way there has a reason, or happens elsewhere.
fn delivered_then_freed(reason: u32, location: u64, end: &TraceEnd<'_>) -> bool {
    matches!(drop::reason_name(reason, end).as_str(), "NOT_SPECIFIED" | drop::UNKNOWN_REASON)
        && drop::function_name(location, end) == "icmpv6_rcv"
}

/// The ICMP error that teaches a sender of `family` a smaller MTU.
fn too_big_message(family: Family) -> &'static str {
    match family {
        Family::V4 => "ICMP fragmentation-needed",
        Family::V6 => "ICMPv6 packet-too-big",
    }
}

/// Whether `layer` is that error: fragmentation-needed (type 3 code 4) or packet-too-big (type 2).
fn is_too_big(layer: &Layer) -> bool {
    matches!((layer.proto, layer.icmp_type, layer.icmp_code), (IPPROTO_ICMP, 3, 4) | (IPPROTO_ICMPV6, 2, _))
}

/// Whether senders can learn the smaller MTU (the ICMP errors that teach it), and whether
/// traffic showed that they needed to.
#[derive(Clone, Copy)]
struct IcmpState {
    family: Family,
    /// None where it cannot be observed (no `icmp:icmp_send` for IPv4; for IPv6, none seen on
    /// the path): whether any was sent is unknown.
    sent: Option<u64>,
    dropped: u64,
    /// Packets too large for their next hop, with Don't Fragment set, were seen (or, for a
    /// tunnel, its underlay dropped received frames).
    traffic: bool,
    /// Of those packets, full-size TCP segments that arrived again.
    resent: u64,
}

impl IcmpState {
    fn blackhole(self) -> bool {
        self.dropped > 0 || (self.traffic && self.sent == Some(0)) || self.resent >= MIN_RESENT_TO_CLAIM
    }

    fn describe(self) -> String {
        let Self { family, sent, dropped, traffic, resent } = self;
        let message = too_big_message(family);
        if resent >= MIN_RESENT_TO_CLAIM && dropped == 0 && sent != Some(0) {
            let never_learned = format!(
                "{resent} of these packets were the same TCP segments arriving again full-size: their senders retransmitted them without lowering their MTU"
            );
            return match sent {
                Some(sent) => format!(
                    "{sent} {message} messages were sent back, yet {never_learned} (the messages did not reach them, or were ignored): a blackhole"
                ),
                None => format!("{never_learned}, never learning the smaller MTU: a blackhole"),
            };
        }
        match (sent, dropped > 0, traffic) {
            (Some(sent), true, _) => {
                format!("{sent} {message} messages were generated but {dropped} were dropped before reaching the pod: a blackhole")
            }
            (None, true, _) => format!("{dropped} {message} messages were dropped before reaching the pod: a blackhole"),
            (Some(sent), false, _) if sent > 0 => format!("{sent} {message} messages were sent back"),
            (Some(_), false, true) => format!("no {message} was sent, so senders never learn the smaller MTU: a blackhole"),
            (None, false, true) => {
                let why = match family {
                    Family::V4 => "on this kernel (no icmp:icmp_send tracepoint)",
                    Family::V6 => "(the kernel has no tracepoint for the ICMPv6 errors it sends) and none crossed the traced hops",
                };
                format!(
                    "whether {message} was sent cannot be observed {why}; if these packets are never delivered, senders are not learning the smaller MTU"
                )
            }
            (_, false, false) => "configuration only: no packet too large for its next hop was seen during the trace".to_string(),
        }
    }
}

impl<'a> MtuMismatch<'a> {
    pub fn new(path: &'a Path) -> Self {
        Self {
            path,
            oversized: BTreeMap::new(),
            frag_needed_sent: 0,
            packet_too_big_seen: 0,
            frag_needed_dropped: 0,
            packet_too_big_frees: BTreeMap::new(),
            retransmitted: BTreeMap::new(),
            oversized_segments: HashSet::new(),
            segments_not_tracked: 0,
        }
    }

    fn icmp(&self, family: Family, traffic: bool, end: &TraceEnd<'_>) -> IcmpState {
        let (sent, dropped) = match family {
            Family::V4 => (end.icmp_send_observed.then_some(self.frag_needed_sent), self.frag_needed_dropped),
            // Seen only where one crosses a traced hop: none seen is not none sent.
            Family::V6 => {
                let dropped = self
                    .packet_too_big_frees
                    .iter()
                    .filter(|((reason, location), _)| !delivered_then_freed(*reason, *location, end))
                    .map(|(_, count)| count)
                    .sum();
                ((self.packet_too_big_seen > 0).then_some(self.packet_too_big_seen), dropped)
            }
        };
        IcmpState { family, sent, dropped, traffic, resent: 0 }
    }

    /// The family of the followed pod, which the configuration findings are about.
    fn pod_family(&self) -> Family {
        Family::of(self.path.pod_ip)
    }

    /// Whether any packet of `family` too large for its next hop could not be fragmented.
    fn unfragmentable_seen(&self, family: Family) -> bool {
        self.oversized.iter().any(|((_, of), oversized)| *of == family && oversized.dont_fragment > 0)
    }

    /// The hop a packet at `hop` goes to next on its way, and the IP-level MTU it must fit:
    /// of alternatives, the smallest.
    fn next_mtu(&self, hop: HopKey) -> Option<&Hop> {
        let next = self.path.next_on_same_way(self.path.step_of(hop)?)?;
        // A packet that enters a VXLAN device must fit its MTU; one leaving it must fit the
        // underlay's with the encapsulation included, which the outer header already shows.
        self.path.at_step(next).iter().filter_map(|key| self.path.hop(key.ifindex)).min_by_key(|hop| hop.mtu)
    }

    /// Configuration: a tunnel whose encapsulated packets cannot fit its underlay.
    fn tunnel_findings(&self, end: &TraceEnd<'_>) -> Vec<Finding> {
        let mut findings = Vec::new();
        for hop in self.path.hops().filter(|hop| hop.kind.is_tunnel()) {
            let Some(underlay) = hop.underlay.and_then(|u| self.path.hop(u)) else { continue };
            let overhead = overhead(hop);
            if hop.mtu + overhead <= underlay.mtu {
                continue;
            }
            let drops = end.link_drops.get(&underlay.ifindex).copied().unwrap_or_default();
            let received_dropped = drops.rx_dropped + drops.rx_length_errors;
            let family = self.pod_family();
            let icmp = self.icmp(family, self.unfragmentable_seen(family) || received_dropped > 0, end);
            // A frame too large for the interface that receives it is dropped there, and a
            // receiving interface sends no ICMP error: lost, whatever the senders' ICMP.
            let blackhole = icmp.blackhole() || received_dropped > 0;
            let fate = match received_dropped {
                0 => icmp.describe(),
                dropped => format!(
                    "{} dropped {dropped} received frames during the trace, and a receiving interface sends no ICMP error: a blackhole",
                    underlay.ifname
                ),
            };
            findings.push(Finding {
                kind: FindingKind::MtuMismatch,
                severity: Severity::Error,
                hop: Some(hop.ifname.clone()),
                summary: format!(
                    "{} has MTU {} but its underlay {} has MTU {}: encapsulated full-size packets ({} bytes) cannot fit; {fate}.",
                    hop.ifname, hop.mtu, underlay.ifname, underlay.mtu, hop.mtu + overhead
                ),
                evidence: json!({
                    "tunnel": hop.ifname, "tunnel_mtu": hop.mtu,
                    "underlay": underlay.ifname, "underlay_mtu": underlay.mtu,
                    "encapsulation_overhead": overhead,
                    "underlay_rx_dropped_during_trace": drops.rx_dropped,
                    "icmp_frag_needed_sent": icmp.sent,
                    "blackhole": blackhole,
                }),
                advice: format!(
                    "Set {}'s MTU to at most {} (underlay MTU minus {overhead}), or raise {}'s MTU to {}; every node's underlay must carry the same MTU.",
                    hop.ifname, underlay.mtu.saturating_sub(overhead), underlay.ifname, hop.mtu + overhead
                ),
            });
        }
        findings
    }

    /// A pod's own MTU above the tunnel's: the pod sends packets the tunnel cannot carry.
    /// A host-side veth or bridge MTU above it: what only other senders can cause.
    fn pod_side_findings(&self, end: &TraceEnd<'_>) -> Vec<Finding> {
        let Some(tunnel) = self.path.hops().filter(|h| h.kind.is_tunnel()).min_by_key(|h| h.mtu) else { return Vec::new() };
        let mut findings = Vec::new();
        for hop in self.path.hops().filter(|h| matches!(h.kind, HopKind::PodVeth | HopKind::Bridge)) {
            match &hop.pod_end {
                Some(pod_end) if pod_end.mtu > tunnel.mtu => findings.push(self.pod_mtu_finding(hop, pod_end, tunnel, end)),
                _ if hop.mtu > tunnel.mtu => findings.push(self.host_side_finding(hop, tunnel)),
                _ => {}
            }
        }
        findings
    }

    /// Retransmitted segments of the followed pods that fit the pod's MTU (a single segment)
    /// but not the tunnel's, however small their headers: how many, and the largest payload.
    fn full_size_retransmits(&self, pod_mtu: u32, tunnel_mtu: u32) -> (u64, u32) {
        let too_big = |payload: u32| payload + MIN_TCP_IPV4_HEADERS > tunnel_mtu && payload + MIN_TCP_IPV4_HEADERS <= pod_mtu;
        self.retransmitted
            .iter()
            .filter(|(payload, _)| too_big(**payload))
            .fold((0, 0), |(count, largest), (payload, times)| (count + times, largest.max(*payload)))
    }

    fn pod_mtu_finding(&self, hop: &Hop, pod_end: &PodEnd, tunnel: &Hop, end: &TraceEnd<'_>) -> Finding {
        let family = self.pod_family();
        let icmp = self.icmp(family, self.unfragmentable_seen(family), end);
        let (retransmits, largest_retransmit) = self.full_size_retransmits(pod_end.mtu, tunnel.mtu);
        let retransmitted = match retransmits {
            0 => String::new(),
            count => format!(
                " {count} TCP segments of up to {largest_retransmit} payload bytes, too large for {} however small their headers, were retransmitted.",
                tunnel.ifname
            ),
        };
        Finding {
            kind: FindingKind::MtuMismatch,
            severity: if icmp.blackhole() { Severity::Error } else { Severity::Warning },
            hop: Some(hop.ifname.clone()),
            summary: format!(
                "The pod's {} (behind {}) has MTU {} but the tunnel {} has MTU {}: the pod can send packets the tunnel cannot carry; {}.{retransmitted}",
                pod_end.ifname,
                hop.ifname,
                pod_end.mtu,
                tunnel.ifname,
                tunnel.mtu,
                icmp.describe()
            ),
            evidence: json!({
                "interface": hop.ifname, "mtu": pod_end.mtu,
                "pod_interface": pod_end.ifname, "host_side_mtu": hop.mtu,
                "tunnel": tunnel.ifname, "tunnel_mtu": tunnel.mtu,
                "icmp_frag_needed_sent": icmp.sent,
                "icmp_frag_needed_dropped": icmp.dropped,
                "retransmitted_full_size_segments": retransmits,
                "largest_retransmitted_payload": (retransmits > 0).then_some(largest_retransmit),
                "configuration_only": !icmp.traffic && retransmits == 0,
                "blackhole": icmp.blackhole(),
            }),
            advice: format!(
                "Give the pod network MTU {} (the CNI's mtu setting) so pods never send larger packets, and let {} through.",
                tunnel.mtu,
                too_big_message(family)
            ),
        }
    }

    /// A host-side veth or bridge above the tunnel's MTU while the pods' own MTU is not (or
    /// could not be read): the pods send no larger packets, but the node's own traffic to a
    /// pod and frames bridged from other ports can be larger.
    fn host_side_finding(&self, hop: &Hop, tunnel: &Hop) -> Finding {
        let pod_mtu = self.path.hops().filter_map(|h| h.pod_end.as_ref()).map(|end| end.mtu).max();
        let pod_side = match pod_mtu {
            Some(mtu) => format!("the pod's own interface has MTU {mtu}, so the pod sends no larger packets"),
            None => "the pod's own MTU could not be read from its namespace".to_string(),
        };
        Finding {
            kind: FindingKind::MtuMismatch,
            severity: Severity::Warning,
            hop: Some(hop.ifname.clone()),
            summary: format!(
                "{} ({}) has MTU {}, above the tunnel {}'s {}; {pod_side}. Host-network traffic to the pod and frames bridged from other ports can still be up to {} bytes: those larger than the pod's MTU are dropped at its interface, and those routed into the tunnel do not fit it. Configuration only: this says nothing about traffic seen.",
                hop.ifname, hop.kind, hop.mtu, tunnel.ifname, tunnel.mtu, hop.mtu
            ),
            evidence: json!({
                "interface": hop.ifname, "mtu": hop.mtu, "pod_mtu": pod_mtu,
                "tunnel": tunnel.ifname, "tunnel_mtu": tunnel.mtu,
                "configuration_only": true,
                "blackhole": false,
            }),
            advice: format!("Set {} to the pod network MTU ({}) so every side of the pod path agrees.", hop.ifname, tunnel.mtu),
        }
    }

    /// Traffic: wire-sized packets larger than the next hop's MTU.
    fn oversized_findings(&self, end: &TraceEnd<'_>) -> Vec<Finding> {
        self.oversized
            .iter()
            .filter_map(|((hop, family), oversized)| {
                let (name, interface_mtu) = self.path.hop(hop.ifindex).map(|hop| (&hop.ifname, hop.mtu))?;
                let next = self.next_mtu(*hop)?;
                let direction = hop.direction;
                let icmp = IcmpState { resent: oversized.resent, ..self.icmp(*family, oversized.dont_fragment > 0, end) };
                let fate = if oversized.dont_fragment == 0 {
                    "none had Don't Fragment set, so the kernel fragments them".to_string()
                } else {
                    icmp.describe()
                };
                Some(Finding {
                    kind: FindingKind::MtuMismatch,
                    severity: if icmp.blackhole() { Severity::Error } else { Severity::Warning },
                    hop: Some(name.clone()),
                    summary: format!(
                        "{} packets of up to {} bytes crossed {name} (MTU {}) {direction} heading for {}, whose MTU is {}; {}.",
                        oversized.count, oversized.max_len, interface_mtu, next.ifname, next.mtu, fate
                    ),
                    evidence: json!({
                        "interface": name, "interface_mtu": interface_mtu, "direction": direction,
                        "largest_packet": oversized.max_len, "oversized_packets": oversized.count,
                        "dont_fragment_packets": oversized.dont_fragment,
                        "next_hop": next.ifname, "next_hop_mtu": next.mtu,
                        "example": oversized.example,
                        "icmp_frag_needed_sent": icmp.sent,
                        "icmp_frag_needed_dropped": icmp.dropped,
                        "retransmitted_full_size_frames": oversized.resent,
                        "full_size_segments_not_tracked": self.segments_not_tracked,
                        "blackhole": icmp.blackhole(),
                    }),
                    advice: format!(
                        "Lower the sender's MTU to {} or below, and let {} reach the pod so path MTU discovery works.",
                        next.mtu,
                        too_big_message(*family)
                    ),
                })
            })
            .collect()
    }

    /// The underlay dropped frames on receive while the tunnel was in use: what an MTU
    /// mismatch with a peer looks like from this side.
    fn underlay_drop_findings(&self, end: &TraceEnd<'_>) -> Vec<Finding> {
        if !self.path.hops().any(|hop| hop.kind.is_tunnel()) {
            return Vec::new();
        }
        let dropping = self.path.hops().filter(|h| h.kind.is_underlay()).find_map(|hop| {
            let drops = end.link_drops.get(&hop.ifindex).copied().unwrap_or_default();
            (drops.rx_dropped + drops.rx_length_errors > 0).then_some((hop, drops))
        });
        let Some((hop, drops)) = dropping else { return Vec::new() };
        vec![Finding {
            kind: FindingKind::MtuMismatch,
            severity: Severity::Warning,
            hop: Some(hop.ifname.clone()),
            summary: format!(
                "{} dropped {} received frames during the trace (MTU {}): frames larger than its MTU are dropped before any tracepoint sees them.",
                hop.ifname,
                drops.rx_dropped + drops.rx_length_errors,
                hop.mtu
            ),
            evidence: json!({ "interface": hop.ifname, "mtu": hop.mtu, "rx_dropped": drops.rx_dropped, "rx_length_errors": drops.rx_length_errors }),
            advice: "Compare this MTU with the peers' underlay MTU; all nodes' underlays must carry the same MTU.".into(),
        }]
    }
}

impl Detector for MtuMismatch<'_> {
    /// A wire-sized (non-GSO) packet larger than the MTU of the hop it heads for; and the
    /// packet-too-big messages on their way back to a followed pod.
    fn observe_packet(&mut self, packet: &Packet, sighting: Option<&Sighting>) {
        let pod_layer = packet.pod_layer();
        let first_sighting = sighting.is_none_or(|sighting| sighting.previous.is_none());
        if pod_layer.proto == IPPROTO_ICMPV6 && is_too_big(pod_layer) && self.path.follows(pod_layer.dst) && first_sighting {
            self.packet_too_big_seen += 1;
        }
        if packet.is_gso() {
            return;
        }
        let hop = HopKey { ifindex: packet.ifindex, direction: packet.direction };
        let Some((next_mtu, next_is_underlay)) = self.next_mtu(hop).map(|next| (next.mtu, next.kind.is_underlay())) else { return };
        let underlay = self.path.is_underlay(hop.ifindex);
        // Between underlay devices, and leaving through one, the outer header is what must
        // fit; a packet received on the underlay for the tunnel device is decapsulated there.
        let outer_must_fit = underlay && (hop.direction == Direction::Egress || next_is_underlay);
        let layer = if outer_must_fit { &packet.outer } else { pod_layer };
        let ip_len = u32::from(layer.total_len);
        if ip_len <= next_mtu {
            return;
        }
        let family = Family::of(layer.src);
        // The node forwards the pod's packets, and IPv6 routers never fragment; the outer
        // header is this node's own, which its stack may fragment as its DF bit says.
        let unfragmentable = layer.dont_fragment || (family == Family::V6 && !outer_must_fit);
        let entry = self.oversized.entry((hop, family)).or_default();
        entry.count += 1;
        entry.dont_fragment += u64::from(unfragmentable);
        if layer.proto == IPPROTO_TCP && unfragmentable {
            let segment = (hop, layer.src, layer.dst, layer.sport, layer.dport, layer.tcp_seq);
            if self.oversized_segments.contains(&segment) {
                entry.resent += 1;
            } else if self.oversized_segments.len() < MAX_TRACKED_SEGMENTS {
                self.oversized_segments.insert(segment);
            } else {
                self.segments_not_tracked += 1;
            }
        }
        if ip_len > entry.max_len {
            entry.max_len = ip_len;
            let df = match family {
                Family::V4 => format!(", DF {}", if layer.dont_fragment { "set" } else { "clear" }),
                Family::V6 => String::new(),
            };
            entry.example = format!("{} ({ip_len} bytes{df})", layer.describe());
        }
    }

    fn observe_kernel(&mut self, record: &KernelRecord) {
        let layer = record.pod_layer();
        match record.kind {
            // The socket's own addresses: a followed pod's segment when it is the source.
            KernelRecordKind::Retransmit { .. }
                if self.path.follows(layer.src)
                    && (self.retransmitted.len() < MAX_GROUPS || self.retransmitted.contains_key(&record.skb_len)) =>
            {
                *self.retransmitted.entry(record.skb_len).or_default() += 1;
            }
            // `icmp:icmp_send` fires in IPv4's ICMP only.
            KernelRecordKind::IcmpSent { icmp_type: 3, icmp_code: 4 } => self.frag_needed_sent += 1,
            KernelRecordKind::Drop { reason, location } if is_too_big(layer) => match layer.proto {
                IPPROTO_ICMPV6 => {
                    let key = (reason, location);
                    // A handful of distinct places at most; past the bound, the rest count
                    // with the first (a drop, unless that place was a delivery).
                    let key = if self.packet_too_big_frees.len() < MAX_GROUPS || self.packet_too_big_frees.contains_key(&key) {
                        key
                    } else {
                        *self.packet_too_big_frees.keys().next().expect("the map is full")
                    };
                    *self.packet_too_big_frees.entry(key).or_default() += 1;
                }
                _ => self.frag_needed_dropped += 1,
            },
            _ => {}
        }
    }

    fn findings(&self, end: &TraceEnd<'_>) -> Vec<Finding> {
        let mut findings = self.tunnel_findings(end);
        findings.extend(self.pod_side_findings(end));
        findings.extend(self.oversized_findings(end));
        // Receive drops only point at the MTU when nothing more specific did.
        if findings.is_empty() {
            findings.extend(self.underlay_drop_findings(end));
        }
        findings
    }
}

#[cfg(test)]
mod tests {
    use super::{super::testing::*, *};
    use crate::node::{LinkDrops, path::Entry, path::fixtures::local_path};

    fn ping_of(size: u16) -> Layer {
        Layer { total_len: size, ..echo(POD, PEER, 8, 1) }
    }

    #[test]
    fn a_tunnel_that_cannot_fit_its_underlay_fires_at_the_edge() {
        let mut path = local_path();
        // 1450 + 50 = 1500 fits eth0's 1500 exactly: quiet.
        assert!(End::default().findings(&MtuMismatch::new(&path), &path).is_empty());
        path.stages[3].hops[0].mtu = 1499;
        let end = End { link_drops: [(2, LinkDrops { rx_dropped: 7, ..Default::default() })].into(), ..Default::default() };
        let findings = end.findings(&MtuMismatch::new(&path), &path);
        assert_eq!(findings.len(), 1, "the receive drops add no second finding: {findings:#?}");
        let finding = &findings[0];
        assert_eq!((finding.kind, finding.hop.as_deref()), (FindingKind::MtuMismatch, Some("flannel.1")));
        assert_eq!(finding.evidence["underlay"], "eth0");
        assert_eq!(finding.evidence["underlay_mtu"], 1499);
        assert_eq!(finding.evidence["underlay_rx_dropped_during_trace"], 7);
        assert_eq!(finding.evidence["blackhole"], true, "no fragmentation-needed was sent");
        // Frames dropped by the receiving underlay are lost whatever the kernel can say of ICMP.
        let end = End { icmp_send_missing: true, ..end };
        let finding = &end.findings(&MtuMismatch::new(&path), &path)[0];
        assert_eq!((finding.evidence["blackhole"].clone(), finding.evidence["icmp_frag_needed_sent"].clone()), (json!(true), json!(null)));
        assert!(finding.summary.contains("eth0 dropped 7 received frames"), "{}", finding.summary);
    }

    fn pod_end(mtu: u32) -> Option<PodEnd> {
        Some(PodEnd { ifname: "eth0".into(), mtu })
    }

    /// The pod's eth0 at `pod_mtu`, its host-side veth and cni0 at 1500, flannel.1 at 1450.
    fn host_side_1500(pod_mtu: u32) -> Path {
        let mut path = local_path();
        path.stages[0].hops[0].mtu = 1500;
        path.stages[0].hops[0].pod_end = pod_end(pod_mtu);
        path.stages[1].hops[0].mtu = 1500;
        path
    }

    #[test]
    fn a_host_side_above_the_tunnel_is_configuration_only_when_the_pod_is_not() {
        let path = host_side_1500(1450);
        let mut detector = MtuMismatch::new(&path);
        Feed::new(&path).journey(&mut detector, &ping_of(1450), &OUT[..2], 0);
        let findings = End::default().findings(&detector, &path);
        assert_eq!(findings.iter().map(|f| f.hop.as_deref().unwrap()).collect::<Vec<_>>(), ["veth1", "cni0"], "{findings:#?}");
        for finding in &findings {
            assert_eq!(finding.severity, Severity::Warning);
            assert_eq!(
                (finding.evidence["configuration_only"].clone(), finding.evidence["blackhole"].clone()),
                (json!(true), json!(false))
            );
            assert_eq!(finding.evidence["pod_mtu"], 1450);
            assert!(finding.summary.contains("Configuration only") && !finding.summary.contains("blackhole"), "{}", finding.summary);
            assert!(finding.summary.contains("Host-network traffic to the pod"), "{}", finding.summary);
        }
    }

    #[test]
    fn a_pod_mtu_above_the_tunnel_without_traffic_is_no_blackhole() {
        let path = host_side_1500(1500);
        let findings = End::default().findings(&MtuMismatch::new(&path), &path);
        let pod = findings.iter().find(|f| f.hop.as_deref() == Some("veth1")).unwrap();
        assert_eq!(pod.severity, Severity::Warning);
        assert_eq!((pod.evidence["mtu"].clone(), pod.evidence["host_side_mtu"].clone()), (json!(1500), json!(1500)));
        assert_eq!((pod.evidence["configuration_only"].clone(), pod.evidence["blackhole"].clone()), (json!(true), json!(false)));
        assert!(pod.summary.contains("The pod's eth0 (behind veth1) has MTU 1500"), "{}", pod.summary);
        assert!(pod.summary.contains("configuration only") && !pod.summary.contains("a blackhole"), "{}", pod.summary);
    }

    #[test]
    fn oversized_packets_without_dont_fragment_are_fragmented_not_blackholed() {
        let path = host_side_1500(1500);
        let mut detector = MtuMismatch::new(&path);
        let mut big = ping_of(1500);
        big.dont_fragment = false;
        Feed::new(&path).journey(&mut detector, &big, &OUT[..2], 0);
        let findings = End::default().findings(&detector, &path);
        let traffic = findings.iter().find(|f| f.evidence["largest_packet"].is_number()).unwrap();
        assert_eq!((traffic.evidence["dont_fragment_packets"].clone(), traffic.evidence["blackhole"].clone()), (json!(0), json!(false)));
        assert!(findings.iter().all(|f| f.evidence["blackhole"] == false && f.severity == Severity::Warning), "{findings:#?}");
        // The same packet with DF set and no fragmentation-needed sent: a blackhole, with evidence.
        let mut detector = MtuMismatch::new(&path);
        Feed::new(&path).journey(&mut detector, &ping_of(1500), &OUT[..2], 0);
        let findings = End::default().findings(&detector, &path);
        let pod = findings.iter().find(|f| f.hop.as_deref() == Some("veth1")).unwrap();
        assert_eq!((pod.severity, pod.evidence["blackhole"].clone()), (Severity::Error, json!(true)));
    }

    /// Without icmp:icmp_send (5.10) "no fragmentation-needed was sent" is unknown: no
    /// blackhole is claimed on that alone.
    #[test]
    fn unobservable_icmp_is_unknown_not_none() {
        let path = host_side_1500(1500);
        let mut detector = MtuMismatch::new(&path);
        Feed::new(&path).journey(&mut detector, &ping_of(1500), &OUT[..2], 0);
        let findings = End { icmp_send_missing: true, ..Default::default() }.findings(&detector, &path);
        let traffic = findings.iter().find(|f| f.evidence["largest_packet"].is_number()).unwrap();
        assert_eq!((traffic.evidence["icmp_frag_needed_sent"].clone(), traffic.evidence["blackhole"].clone()), (json!(null), json!(false)));
        assert!(traffic.summary.contains("cannot be observed on this kernel"), "{}", traffic.summary);
        assert!(findings.iter().all(|f| f.severity == Severity::Warning), "{findings:#?}");
    }

    #[test]
    fn a_pod_mtu_above_the_tunnel_and_its_oversized_packets() {
        let mut path = local_path();
        path.stages[0].hops[0].mtu = 1500;
        path.stages[0].hops[0].pod_end = pod_end(1500);
        path.stages[1].hops[0].mtu = 1500;
        let mut detector = MtuMismatch::new(&path);
        let mut feed = Feed::new(&path);
        // 1450 bytes fit flannel.1; 1500 do not.
        feed.journey(&mut detector, &ping_of(1450), &OUT[..2], 0);
        let mut big = ping_of(1500);
        big.ip_id = 2;
        feed.journey(&mut detector, &big, &OUT[..2], 10_000);
        detector.observe_kernel(&kernel(KernelRecordKind::IcmpSent { icmp_type: 3, icmp_code: 4 }, big.clone(), 4, true, 1));
        let quoted = Layer { icmp_type: 3, icmp_code: 4, ..echo(PEER, POD, 3, 0) };
        detector.observe_kernel(&kernel(KernelRecordKind::Drop { reason: 9, location: 0 }, quoted, 5, false, 1));

        let findings = End::default().findings(&detector, &path);
        let config: Vec<_> = findings.iter().filter(|f| f.evidence["tunnel"] == "flannel.1").collect();
        assert_eq!(config.iter().map(|f| f.hop.as_deref().unwrap()).collect::<Vec<_>>(), ["veth1", "cni0"]);
        assert_eq!(config[0].evidence["mtu"], 1500);
        let traffic: Vec<_> = findings.iter().filter(|f| f.evidence["largest_packet"].is_number()).collect();
        assert_eq!(traffic.len(), 1, "only cni0 ingress heads for a smaller MTU: {findings:#?}");
        assert_eq!(traffic[0].hop.as_deref(), Some("cni0"));
        assert_eq!(traffic[0].evidence["largest_packet"], 1500);
        assert_eq!(traffic[0].evidence["oversized_packets"], 1);
        assert_eq!(traffic[0].evidence["next_hop"], "flannel.1");
        assert_eq!(traffic[0].evidence["next_hop_mtu"], 1450);
        assert_eq!(traffic[0].evidence["icmp_frag_needed_sent"], 1);
        assert_eq!(traffic[0].evidence["icmp_frag_needed_dropped"], 1);
        assert_eq!(traffic[0].evidence["blackhole"], true);
    }

    #[test]
    fn gso_packets_and_a_consistent_path_are_quiet() {
        let path = local_path();
        let mut detector = MtuMismatch::new(&path);
        let mut feed = Feed::new(&path);
        // A GSO super-packet is split before it reaches the wire.
        let mut gso = packet(ping_of(9000), 4, Direction::Ingress, 0);
        gso.gso_size = 1398;
        feed.packet(&mut detector, &gso);
        // Sent back with fragmentation-needed delivered: not a blackhole, but no finding either.
        detector.observe_kernel(&kernel(KernelRecordKind::IcmpSent { icmp_type: 3, icmp_code: 4 }, ping_of(1500), 4, true, 1));
        assert!(End::default().findings(&detector, &path).is_empty());
    }

    const POD6: &str = "fd00:10:244::2";
    const PEER6: &str = "fd00:10:244:1::2";
    /// cni0's address, the source of the packet-too-big the node sends the pod.
    const GATEWAY6: &str = "fd00:10:244::1";

    /// The host-side path with the pod followed by its IPv6 address.
    fn ipv6_pod(pod_mtu: u32) -> Path {
        let mut path = host_side_1500(pod_mtu);
        path.pod_ip = ip(POD6);
        path.entries[0].pod_ip = ip(POD6);
        path
    }

    /// An IPv6 TCP segment of `total_len` bytes from the pod: IPv6 has no DF bit.
    fn segment6(total_len: u16, seq: u32) -> Layer {
        Layer { total_len, header_len: 40, dont_fragment: false, tcp_seq: seq, ..tcp(POD6, 40000, PEER6, 5201, 0x10, 0) }
    }

    /// The packet-too-big the node sends back for a segment: ICMPv6 type 2.
    fn packet_too_big() -> Layer {
        Layer { icmp_type: 2, icmp_code: 0, header_len: 40, dont_fragment: false, ..layer(GATEWAY6, POD6, IPPROTO_ICMPV6) }
    }

    /// IPv6 has no Don't Fragment bit because routers never fragment it: a forwarded packet
    /// too large for its next hop is dropped and answered by packet-too-big, never fragmented.
    /// The kernel has no tracepoint for ICMPv6 errors, so with none seen on the path whether
    /// one was sent is unknown, even where `icmp:icmp_send` (IPv4's) is attached.
    #[test]
    fn oversized_ipv6_packets_are_never_fragmented_and_no_packet_too_big_seen_is_unknown() {
        let path = ipv6_pod(1500);
        let mut detector = MtuMismatch::new(&path);
        Feed::new(&path).journey(&mut detector, &segment6(1500, 1), &OUT[..2], 0);
        let findings = End::default().findings(&detector, &path);
        let traffic = findings.iter().find(|f| f.evidence["largest_packet"].is_number()).unwrap();
        assert_eq!(traffic.hop.as_deref(), Some("cni0"));
        assert_eq!((traffic.evidence["dont_fragment_packets"].clone(), traffic.evidence["blackhole"].clone()), (json!(1), json!(false)));
        assert_eq!(traffic.evidence["icmp_frag_needed_sent"], json!(null));
        assert!(!traffic.summary.contains("fragments them"), "{}", traffic.summary);
        assert!(traffic.summary.contains("whether ICMPv6 packet-too-big was sent cannot be observed"), "{}", traffic.summary);
        assert!(traffic.advice.contains("let ICMPv6 packet-too-big reach the pod"), "{}", traffic.advice);
        assert!(!traffic.evidence["example"].as_str().unwrap().contains("DF"), "{}", traffic.evidence["example"]);
        let pod = findings.iter().find(|f| f.hop.as_deref() == Some("veth1")).unwrap();
        assert_eq!((pod.severity, pod.evidence["configuration_only"].clone()), (Severity::Warning, json!(false)));
        assert!(pod.advice.contains("let ICMPv6 packet-too-big through"), "{}", pod.advice);
        assert!(findings.iter().all(|f| f.severity == Severity::Warning), "{findings:#?}");
    }

    /// The node's packet-too-big crosses cni0 and the pod's veth on its way to the pod: one
    /// message sent back, counted once. Dropped before the pod, it is a blackhole.
    #[test]
    fn a_packet_too_big_seen_on_its_way_to_the_pod_is_sent_and_one_dropped_is_a_blackhole() {
        let path = ipv6_pod(1500);
        let mut detector = MtuMismatch::new(&path);
        let mut feed = Feed::new(&path);
        feed.journey(&mut detector, &segment6(1500, 1), &OUT[..2], 0);
        feed.journey(&mut detector, &packet_too_big(), &BACK[2..], 10_000);
        let findings = End::default().findings(&detector, &path);
        let traffic = findings.iter().find(|f| f.evidence["largest_packet"].is_number()).unwrap();
        assert_eq!((traffic.evidence["icmp_frag_needed_sent"].clone(), traffic.evidence["blackhole"].clone()), (json!(1), json!(false)));
        assert!(traffic.summary.contains("1 ICMPv6 packet-too-big messages were sent back"), "{}", traffic.summary);
        assert!(findings.iter().all(|f| f.severity == Severity::Warning), "{findings:#?}");

        let mut detector = MtuMismatch::new(&path);
        Feed::new(&path).journey(&mut detector, &segment6(1500, 2), &OUT[..2], 0);
        detector.observe_kernel(&kernel(KernelRecordKind::Drop { reason: 9, location: 0 }, packet_too_big(), 4, false, 1));
        let findings = End::default().findings(&detector, &path);
        let traffic = findings.iter().find(|f| f.evidence["largest_packet"].is_number()).unwrap();
        assert_eq!((traffic.severity, traffic.evidence["blackhole"].clone()), (Severity::Error, json!(true)));
        assert!(traffic.summary.contains("1 ICMPv6 packet-too-big messages were dropped before reaching the pod"), "{}", traffic.summary);
    }

    /// Kernels such as 6.1 free a packet-too-big that the pod's stack handled with the generic
    /// free in icmpv6_rcv: delivered, not dropped. The same free with a reason, or elsewhere,
    /// still is a drop.
    #[test]
    fn a_packet_too_big_freed_by_icmpv6_rcv_without_a_reason_was_delivered() {
        const ICMPV6_RCV: u64 = 0xffff_ffff_8160_0000;
        const NF_HOOK_SLOW: u64 = 0xffff_ffff_8170_0000;
        let end = || End {
            drop_reasons: std::collections::HashMap::from([(2, "NOT_SPECIFIED".into()), (9, "NETFILTER_DROP".into())]),
            symbols: Some(crate::kernel::symbols::KernelSymbols::new(BTreeMap::from([
                (ICMPV6_RCV, "icmpv6_rcv".to_string()),
                (NF_HOOK_SLOW, "nf_hook_slow".to_string()),
            ]))),
            ..Default::default()
        };
        let path = ipv6_pod(1500);
        let blackhole = |reason: u32, location: u64| {
            let mut detector = MtuMismatch::new(&path);
            let mut feed = Feed::new(&path);
            feed.journey(&mut detector, &segment6(1500, 1), &OUT[..2], 0);
            feed.journey(&mut detector, &packet_too_big(), &BACK[2..], 10_000);
            detector.observe_kernel(&kernel(KernelRecordKind::Drop { reason, location }, packet_too_big(), 0, true, 1));
            let findings = end().findings(&detector, &path);
            findings.iter().find(|f| f.evidence["largest_packet"].is_number()).unwrap().evidence["blackhole"].clone()
        };
        assert_eq!(blackhole(2, ICMPV6_RCV + 0x1a0), json!(false), "handled, then freed");
        assert_eq!(blackhole(9, NF_HOOK_SLOW + 0x40), json!(true), "dropped by netfilter");
        assert_eq!(blackhole(9, ICMPV6_RCV + 0x1a0), json!(true), "a reason is a drop, wherever");
    }

    /// A packet-too-big counts only for IPv6 traffic, fragmentation-needed only for IPv4.
    #[test]
    fn each_family_is_judged_by_its_own_icmp_error() {
        let path = ipv6_pod(1500);
        let mut detector = MtuMismatch::new(&path);
        let mut feed = Feed::new(&path);
        feed.journey(&mut detector, &segment6(1500, 1), &OUT[..2], 0);
        // An IPv4 fragmentation-needed the kernel sent says nothing of the IPv6 segment.
        detector.observe_kernel(&kernel(KernelRecordKind::IcmpSent { icmp_type: 3, icmp_code: 4 }, ping_of(1500), 4, true, 1));
        let findings = End::default().findings(&detector, &path);
        let traffic = findings.iter().find(|f| f.evidence["largest_packet"].is_number()).unwrap();
        assert_eq!(traffic.evidence["icmp_frag_needed_sent"], json!(null), "{traffic:#?}");
        // And the pod followed by both addresses: a packet-too-big sent to its IPv6 address
        // does not lift the blackhole of its IPv4 packets.
        let mut path = host_side_1500(1500);
        path.entries.push(Entry { pod_ip: ip(POD6), hop: path.entries[0].hop });
        let mut detector = MtuMismatch::new(&path);
        let mut feed = Feed::new(&path);
        feed.journey(&mut detector, &ping_of(1500), &OUT[..2], 0);
        feed.journey(&mut detector, &segment6(1500, 1), &OUT[..2], 5_000);
        feed.journey(&mut detector, &packet_too_big(), &BACK[2..], 10_000);
        let findings = End::default().findings(&detector, &path);
        let sent = |hop: &str, family_example: &str| {
            let finding = findings
                .iter()
                .find(|f| f.hop.as_deref() == Some(hop) && f.evidence["example"].as_str().is_some_and(|e| e.contains(family_example)))
                .unwrap_or_else(|| panic!("{findings:#?}"));
            (finding.evidence["icmp_frag_needed_sent"].clone(), finding.evidence["blackhole"].clone())
        };
        assert_eq!(sent("cni0", POD6), (json!(1), json!(false)));
        assert_eq!(sent("cni0", POD), (json!(0), json!(true)));
        let pod = findings.iter().find(|f| f.hop.as_deref() == Some("veth1")).unwrap();
        assert_eq!((pod.severity, pod.evidence["blackhole"].clone()), (Severity::Error, json!(true)));
    }

    #[test]
    fn underlay_receive_drops_need_a_tunnel_in_use() {
        let mut path = local_path();
        let end = End { link_drops: [(2, LinkDrops { rx_length_errors: 3, ..Default::default() })].into(), ..Default::default() };
        let findings = end.findings(&MtuMismatch::new(&path), &path);
        assert_eq!(findings.len(), 1);
        assert_eq!((findings[0].severity, findings[0].hop.as_deref()), (Severity::Warning, Some("eth0")));
        assert_eq!(findings[0].evidence["rx_length_errors"], 3);
        path.stages.remove(2);
        assert!(end.findings(&MtuMismatch::new(&path), &path).is_empty(), "no VXLAN device on the path");
    }

    /// Calico IPIP on node A: the pod's cali veth (5) and the pod's eth0 at
    /// `pod_mtu`, no bridge, tunl0 (3) at `tunnel_mtu` over eth0 (2, 1500).
    fn calico_ipip(pod_mtu: u32, tunnel_mtu: u32) -> Path {
        let mut path = local_path();
        path.stages.remove(1);
        let veth = &mut path.stages[0].hops[0];
        (veth.ifname, veth.mtu, veth.pod_end) = ("cali1a2b3c4d5e6".into(), pod_mtu, pod_end(pod_mtu));
        let tunnel = &mut path.stages[1].hops[0];
        (tunnel.ifname, tunnel.kind, tunnel.mtu, tunnel.vxlan_local) = ("tunl0".into(), HopKind::Ipip, tunnel_mtu, None);
        path
    }

    #[test]
    fn an_ipip_tunnel_adds_20_bytes() {
        assert!(End::default().findings(&MtuMismatch::new(&calico_ipip(1480, 1480)), &calico_ipip(1480, 1480)).is_empty());
        let path = calico_ipip(1490, 1490);
        let findings = End::default().findings(&MtuMismatch::new(&path), &path);
        let tunnel = findings.iter().find(|f| f.hop.as_deref() == Some("tunl0")).unwrap_or_else(|| panic!("{findings:#?}"));
        assert_eq!(tunnel.evidence["encapsulation_overhead"], 20);
        assert!(tunnel.summary.contains("encapsulated full-size packets (1510 bytes)"), "{}", tunnel.summary);
        assert!(tunnel.advice.contains("at most 1480 (underlay MTU minus 20)"), "{}", tunnel.advice);
    }

    /// The runbook's case: the pod at 1500 over tunl0 at 1440, its full-size segments
    /// retransmitted. Segments that fit tunl0, and GSO buffers of several, are no evidence.
    #[test]
    fn a_pod_above_its_ipip_tunnel_names_the_full_size_segments_it_retransmitted() {
        let path = calico_ipip(1500, 1440);
        let mut detector = MtuMismatch::new(&path);
        let retransmit = |payload| {
            let mut record =
                kernel(KernelRecordKind::Retransmit { seq: 1, tcp_state: 1 }, tcp(POD, 40000, PEER, 5201, 0x10, 0), 0, false, 1);
            record.skb_len = payload;
            record
        };
        for payload in [1448, 1448, 1448, 1388, 2896] {
            detector.observe_kernel(&retransmit(payload));
        }
        let findings = End::default().findings(&detector, &path);
        let pod = findings.iter().find(|f| f.hop.as_deref() == Some("cali1a2b3c4d5e6")).unwrap_or_else(|| panic!("{findings:#?}"));
        assert_eq!(
            (pod.evidence["tunnel"].clone(), pod.evidence["tunnel_mtu"].clone(), pod.evidence["mtu"].clone()),
            (json!("tunl0"), json!(1440), json!(1500))
        );
        assert_eq!(pod.evidence["retransmitted_full_size_segments"], 3);
        assert_eq!(pod.evidence["largest_retransmitted_payload"], 1448);
        assert_eq!(pod.evidence["configuration_only"], false);
        assert!(pod.summary.contains("3 TCP segments of up to 1448 payload bytes, too large for tunl0"), "{}", pod.summary);
        // A peer's retransmits are not the pod's.
        let mut detector = MtuMismatch::new(&path);
        let mut theirs = retransmit(1448);
        theirs.outer = tcp(PEER, 5201, POD, 40000, 0x10, 0);
        detector.observe_kernel(&theirs);
        let findings = End::default().findings(&detector, &path);
        let pod = findings.iter().find(|f| f.hop.as_deref() == Some("cali1a2b3c4d5e6")).unwrap();
        assert_eq!(pod.evidence["retransmitted_full_size_segments"], 0);
    }

    /// The runbook's NodePort case: a client outside the node sends full-size segments that
    /// arrive at eth0 and head for tunl0 (1440). Its retransmits are no tracepoint's here; the
    /// same segment arriving again full-size is the evidence, even though the kernel sent a
    /// fragmentation-needed. A sender that learned the MTU resends the segment smaller: no
    /// blackhole claimed on that.
    #[test]
    fn full_size_segments_arriving_again_are_a_blackhole_whatever_icmp_was_sent() {
        let path = calico_ipip(1480, 1440);
        let eth0_in = [(2, Direction::Ingress)];
        let segment = |ip_id, payload| Layer { ip_id, tcp_seq: 1000, ..tcp(PEER, 40000, POD, 5201, 0x10, payload) };
        let frag_needed = || kernel(KernelRecordKind::IcmpSent { icmp_type: 3, icmp_code: 4 }, segment(1, 1448), 2, true, 1);
        let traffic_finding = |detector: &MtuMismatch| {
            let findings = End::default().findings(detector, &path);
            findings.into_iter().find(|f| f.evidence["largest_packet"].is_number()).expect("an oversized finding")
        };

        let mut detector = MtuMismatch::new(&path);
        let mut feed = Feed::new(&path);
        for (attempt, ip_id) in [1, 2, 3].into_iter().enumerate() {
            feed.journey(&mut detector, &segment(ip_id, 1448), &eth0_in, attempt as u64 * 1_000_000);
            detector.observe_kernel(&frag_needed());
        }
        let finding = traffic_finding(&detector);
        assert_eq!(finding.hop.as_deref(), Some("eth0"));
        assert_eq!((finding.evidence["next_hop"].clone(), finding.evidence["next_hop_mtu"].clone()), (json!("tunl0"), json!(1440)));
        assert_eq!((finding.evidence["largest_packet"].clone(), finding.evidence["interface_mtu"].clone()), (json!(1500), json!(1500)));
        assert_eq!(finding.evidence["retransmitted_full_size_frames"], 2);
        assert_eq!((finding.severity, finding.evidence["blackhole"].clone()), (Severity::Error, json!(true)));
        assert!(finding.summary.contains("crossed eth0 (MTU 1500) ingress heading for tunl0, whose MTU is 1440"), "{}", finding.summary);
        assert!(
            finding.summary.contains("3 ICMP fragmentation-needed messages were sent back, yet 2 of these packets"),
            "{}",
            finding.summary
        );

        // The sender learned: the segment comes again in pieces that fit.
        let mut detector = MtuMismatch::new(&path);
        let mut feed = Feed::new(&path);
        feed.journey(&mut detector, &segment(1, 1448), &eth0_in, 0);
        detector.observe_kernel(&frag_needed());
        feed.journey(&mut detector, &segment(2, 1380), &eth0_in, 1_000_000);
        let finding = traffic_finding(&detector);
        assert_eq!(finding.evidence["retransmitted_full_size_frames"], 0);
        assert_eq!((finding.severity, finding.evidence["blackhole"].clone()), (Severity::Warning, json!(false)));
        assert!(finding.summary.contains("1 ICMP fragmentation-needed messages were sent back."), "{}", finding.summary);
    }
}
