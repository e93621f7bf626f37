//! `mtu-mismatch`: a tunnel whose MTU plus encapsulation exceeds its underlay's; a pod's own
//! MTU above the tunnel's; a host-side veth or bridge MTU above it; a wire-sized packet
//! larger than the next hop's MTU; an underlay that drops received frames while the tunnel
//! is in use.
//!
//! The pod's own MTU is its end of the veth, in its namespace: the host side and the bridge
//! may be larger without the pod ever sending more. A blackhole is claimed only with
//! evidence: packets too large for the next hop that could not be fragmented were seen and
//! no fragmentation-needed was sent, or the fragmentation-needed that was sent was dropped.
//! A finding without such traffic says it is about the configuration only.

use std::{collections::BTreeMap, net::IpAddr};

use serde_json::json;
use tracer_common::IPPROTO_ICMP;

use super::{Detector, Finding, FindingKind, Severity, TraceEnd};
use crate::{
    Direction,
    events::{
        correlate::Sighting,
        decode::{KernelRecord, KernelRecordKind, Packet},
    },
    node::{Hop, HopKey, HopKind, Path, PodEnd},
};

/// VXLAN over IPv4 adds outer IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
const VXLAN_OVERHEAD_V4: u32 = 50;
const VXLAN_OVERHEAD_V6: u32 = 70;

/// The largest wire-sized packets that crossed a hop bigger than the next hop's MTU.
#[derive(Clone, Debug, Default)]
struct Oversized {
    count: u64,
    /// Of them, those with Don't Fragment set: the ones no router may fragment.
    dont_fragment: u64,
    max_len: u32,
    example: String,
}

pub struct MtuMismatch<'a> {
    path: &'a Path,
    oversized: BTreeMap<HopKey, Oversized>,
    /// ICMP fragmentation-needed (and ICMPv6 packet-too-big) the kernel generated.
    frag_needed_sent: u64,
    /// Fragmentation-needed messages the kernel then dropped.
    frag_needed_dropped: u64,
}

/// Whether senders can learn the smaller MTU (the ICMP errors that teach it), and whether
/// traffic showed that they needed to.
#[derive(Clone, Copy)]
struct IcmpState {
    /// None where the kernel has no `icmp:icmp_send`: whether any was sent is unknown.
    sent: Option<u64>,
    dropped: u64,
    /// Packets too large for their next hop, with Don't Fragment set, were seen (or, for a
    /// tunnel, its underlay dropped received frames).
    traffic: bool,
}

impl IcmpState {
    fn blackhole(self) -> bool {
        self.dropped > 0 || (self.traffic && self.sent == Some(0))
    }

    fn describe(self) -> String {
        let Self { sent, dropped, traffic } = self;
        match (sent, dropped > 0, traffic) {
            (Some(sent), true, _) => format!(
                "{sent} ICMP fragmentation-needed messages were generated but {dropped} were dropped before reaching the pod: a blackhole"
            ),
            (None, true, _) => {
                format!("{dropped} ICMP fragmentation-needed messages were dropped before reaching the pod: a blackhole")
            }
            (Some(sent), false, _) if sent > 0 => format!("{sent} ICMP fragmentation-needed messages were sent back"),
            (Some(_), false, true) => {
                "no ICMP fragmentation-needed was sent, so senders never learn the smaller MTU: a blackhole".to_string()
            }
            (None, false, true) => "whether ICMP fragmentation-needed was sent cannot be observed on this kernel (no icmp:icmp_send \
                                    tracepoint); if these packets are never delivered, senders are not learning the smaller MTU"
                .to_string(),
            (_, false, false) => "configuration only: no packet too large for its next hop was seen during the trace".to_string(),
        }
    }
}

impl<'a> MtuMismatch<'a> {
    pub fn new(path: &'a Path) -> Self {
        Self { path, oversized: BTreeMap::new(), frag_needed_sent: 0, frag_needed_dropped: 0 }
    }

    fn icmp(&self, traffic: bool, end: &TraceEnd<'_>) -> IcmpState {
        IcmpState { sent: end.icmp_send_observed.then_some(self.frag_needed_sent), dropped: self.frag_needed_dropped, traffic }
    }

    /// Whether any packet too large for its next hop had Don't Fragment set.
    fn unfragmentable_seen(&self) -> bool {
        self.oversized.values().any(|oversized| oversized.dont_fragment > 0)
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
        for hop in self.path.hops().filter(|hop| hop.kind == HopKind::Vxlan) {
            let Some(underlay) = hop.underlay.and_then(|u| self.path.hop(u)) else { continue };
            let overhead = match hop.vxlan_local {
                Some(IpAddr::V6(_)) => VXLAN_OVERHEAD_V6,
                _ => VXLAN_OVERHEAD_V4,
            };
            if hop.mtu + overhead <= underlay.mtu {
                continue;
            }
            let drops = end.link_drops.get(&underlay.ifindex).copied().unwrap_or_default();
            let received_dropped = drops.rx_dropped + drops.rx_length_errors;
            let icmp = self.icmp(self.unfragmentable_seen() || received_dropped > 0, end);
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
        let Some(tunnel) = self.path.hops().filter(|h| h.kind == HopKind::Vxlan).min_by_key(|h| h.mtu) else { return Vec::new() };
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

    fn pod_mtu_finding(&self, hop: &Hop, pod_end: &PodEnd, tunnel: &Hop, end: &TraceEnd<'_>) -> Finding {
        let icmp = self.icmp(self.unfragmentable_seen(), end);
        Finding {
            kind: FindingKind::MtuMismatch,
            severity: if icmp.blackhole() { Severity::Error } else { Severity::Warning },
            hop: Some(hop.ifname.clone()),
            summary: format!(
                "The pod's {} (behind {}) has MTU {} but the tunnel {} has MTU {}: the pod can send packets the tunnel cannot carry; {}.",
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
                "configuration_only": !icmp.traffic,
                "blackhole": icmp.blackhole(),
            }),
            advice: format!(
                "Give the pod network MTU {} (the CNI's mtu setting) so pods never send larger packets, and let ICMP fragmentation-needed through.",
                tunnel.mtu
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
            .filter_map(|(hop, oversized)| {
                let name = &self.path.hop(hop.ifindex)?.ifname;
                let next = self.next_mtu(*hop)?;
                let direction = hop.direction;
                let icmp = self.icmp(oversized.dont_fragment > 0, end);
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
                        "{} packets of up to {} bytes crossed {name} {direction} heading for {}, whose MTU is {}; {}.",
                        oversized.count, oversized.max_len, next.ifname, next.mtu, fate
                    ),
                    evidence: json!({
                        "interface": name, "direction": direction,
                        "largest_packet": oversized.max_len, "oversized_packets": oversized.count,
                        "dont_fragment_packets": oversized.dont_fragment,
                        "next_hop": next.ifname, "next_hop_mtu": next.mtu,
                        "example": oversized.example,
                        "icmp_frag_needed_sent": icmp.sent,
                        "icmp_frag_needed_dropped": icmp.dropped,
                        "blackhole": icmp.blackhole(),
                    }),
                    advice: format!(
                        "Lower the sender's MTU to {} or below, and let ICMP fragmentation-needed reach the pod so path MTU discovery works.",
                        next.mtu
                    ),
                })
            })
            .collect()
    }

    /// The underlay dropped frames on receive while the tunnel was in use: what an MTU
    /// mismatch with a peer looks like from this side.
    fn underlay_drop_findings(&self, end: &TraceEnd<'_>) -> Vec<Finding> {
        if !self.path.has_kind(HopKind::Vxlan) {
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
    /// A wire-sized (non-GSO) packet larger than the MTU of the hop it heads for.
    fn observe_packet(&mut self, packet: &Packet, _sighting: Option<&Sighting>) {
        if packet.is_gso() {
            return;
        }
        let hop = HopKey { ifindex: packet.ifindex, direction: packet.direction };
        let Some((next_mtu, next_is_underlay)) = self.next_mtu(hop).map(|next| (next.mtu, next.kind.is_underlay())) else { return };
        let underlay = self.path.is_underlay(hop.ifindex);
        // Between underlay devices, and leaving through one, the outer header is what must
        // fit; a packet received on the underlay for the tunnel device is decapsulated there.
        let outer_must_fit = underlay && (hop.direction == Direction::Egress || next_is_underlay);
        let layer = if outer_must_fit { &packet.outer } else { packet.pod_layer() };
        let ip_len = u32::from(layer.total_len);
        if ip_len <= next_mtu {
            return;
        }
        let entry = self.oversized.entry(hop).or_default();
        entry.count += 1;
        entry.dont_fragment += u64::from(layer.dont_fragment);
        if ip_len > entry.max_len {
            entry.max_len = ip_len;
            entry.example = format!("{} ({} bytes, DF {})", layer.describe(), ip_len, if layer.dont_fragment { "set" } else { "clear" });
        }
    }

    fn observe_kernel(&mut self, record: &KernelRecord) {
        let layer = record.pod_layer();
        let frag_needed = (layer.proto, layer.icmp_type, layer.icmp_code) == (IPPROTO_ICMP, 3, 4);
        match record.kind {
            KernelRecordKind::IcmpSent { icmp_type: 3, icmp_code: 4 } | KernelRecordKind::IcmpSent { icmp_type: 2, .. } => {
                self.frag_needed_sent += 1;
            }
            KernelRecordKind::Drop { .. } if frag_needed => self.frag_needed_dropped += 1,
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
    use crate::{
        events::decode::Layer,
        node::{LinkDrops, path::fixtures::local_path},
    };

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
}
