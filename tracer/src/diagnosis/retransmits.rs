//! `retransmits`: TCP segments of the pod's connections were retransmitted. One retransmission
//! of a segment, after which the peer's acknowledgements move on, is TCP recovering from
//! reordering or an isolated loss. When full-size segments are retransmitted again and again
//! without the peer acknowledging anything new, while small ones get through, that is the MTU
//! signature.
//!
//! Sizes are wire segments: a retransmitted skb can be a GSO buffer of many segments, so a
//! size is capped at the largest segment the flow put on the wire (its `gso_size` under GSO).
//! A retransmission the receiver reports as a duplicate (D-SACK: an ACK whose first SACK
//! block lies at or below the cumulative ACK) was spurious: the original had arrived.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use serde_json::json;
use tracer_common::IPPROTO_TCP;

use super::{Detector, Finding, FindingKind, FlowMap, MAX_GROUPS, MAX_REQUESTS, Severity, TCP_ACK, TraceEnd, services::Explained};
use crate::{
    events::{
        correlate::Sighting,
        decode::{KernelRecord, KernelRecordKind, Packet},
    },
    node::{HopKey, Path},
};

/// (source, source port, destination, destination port) as the retransmitting socket sees it.
type FlowKey = (IpAddr, u16, IpAddr, u16);

/// Sequence numbers remembered per flow to recognise a segment retransmitted again.
const MAX_SEGMENTS: usize = 1_024;

#[derive(Clone, Debug, Default)]
struct RetransmitGroup {
    count: u64,
    /// Retransmitted skb lengths (a GSO buffer can hold several segments) and how often each
    /// was retransmitted; made wire sizes at the end, when the flow's segment size is known
    /// (the kernel events can arrive before the packets that preceded them).
    skb_lens: BTreeMap<u32, u64>,
    /// Per retransmitted sequence number: the peer's ACK advances when it was last retransmitted.
    segments: HashMap<u32, u64>,
    /// Retransmissions of a segment already retransmitted, with no ACK progress in between.
    stalled: u64,
}

/// What a TCP flow the pod opened carried: its largest wire segment, to tell full-size
/// segments from small ones; how many packets came back (each once, not once per hop), which
/// shows small packets get through; and how often the peer's acknowledgement moved forward.
#[derive(Clone, Copy, Debug, Default)]
struct TcpFlow {
    largest_segment: u32,
    replies: u64,
    /// The highest acknowledgement number the peer sent, and how many times it advanced.
    peer_ack: u32,
    ack_advances: u64,
    /// ACKs from the peer reporting a duplicate segment (D-SACK).
    duplicates_reported: u64,
}

impl TcpFlow {
    fn acknowledged(&mut self, ack: u32) {
        // Sequence space wraps: "after" is within half of it.
        if self.ack_advances == 0 || (ack.wrapping_sub(self.peer_ack) as i32) > 0 {
            self.peer_ack = ack;
            self.ack_advances += 1;
        }
    }
}

/// The payload of one wire segment of `packet`: `gso_size` for a GSO buffer.
fn wire_segment(packet: &Packet) -> u32 {
    let payload = u32::from(packet.pod_layer().payload_len());
    if packet.is_gso() { payload.min(packet.gso_size) } else { payload }
}

pub struct Retransmits<'a> {
    path: &'a Path,
    groups: BTreeMap<FlowKey, RetransmitGroup>,
    /// Keyed by the flow as its followed pod sees it: (pod, pod port, peer, peer port).
    tcp_flows: FlowMap<FlowKey, TcpFlow>,
    /// Flows a pitfall finding explains, set when the trace ends.
    explained: Explained,
}

impl<'a> Retransmits<'a> {
    pub fn new(path: &'a Path) -> Self {
        Self { path, groups: BTreeMap::new(), tcp_flows: FlowMap::default(), explained: Explained::default() }
    }

    /// Leaves retransmits of flows a pitfall finding explains out of the findings (they still
    /// count at their hop): those connections never got a reply they could use.
    pub fn defer_to(&mut self, explained: &Explained) {
        self.explained = explained.clone();
    }

    /// The hop where the pod that owns a connection enters the path.
    fn entry(&self, (src, _, dst, _): FlowKey) -> HopKey {
        self.path.entry(if !self.path.follows(src) && self.path.follows(dst) { dst } else { src })
    }

    /// Retransmits per hop, for the report's `retransmits` column.
    pub fn per_hop(&self) -> HashMap<HopKey, u64> {
        let mut per_hop = HashMap::new();
        for (flow, group) in &self.groups {
            *per_hop.entry(self.entry(*flow)).or_default() += group.count;
        }
        per_hop
    }
}

impl Detector for Retransmits<'_> {
    fn observe_packet(&mut self, packet: &Packet, sighting: Option<&Sighting>) {
        let layer = packet.pod_layer();
        if layer.proto != IPPROTO_TCP {
            return;
        }
        if sighting.is_none() {
            return;
        }
        let (src_followed, dst_followed) = (self.path.follows(layer.src), self.path.follows(layer.dst));
        // Every sender whose flow has a followed end: the pod, or a peer that is not followed
        // (another pod, the node itself) sending to it, whose retransmits are traced too.
        // With both ends followed, a segment is both one pod's and the other's reply.
        if src_followed || dst_followed {
            let key = (layer.src, layer.sport, layer.dst, layer.dport);
            if self.tcp_flows.len() < MAX_REQUESTS || self.tcp_flows.contains_key(&key) {
                let flow = self.tcp_flows.entry(key).or_default();
                flow.largest_segment = flow.largest_segment.max(wire_segment(packet));
            }
        }
        // A reply crosses several hops and is counted at one: where it leaves the path towards
        // its followed pod, where its addresses are the ones the pod's socket uses (Service
        // DNAT undone); a followed pod's reply to a peer that is not followed, where it enters
        // the path.
        let reply_hop = if dst_followed {
            self.path.exit(layer.dst)
        } else if src_followed {
            self.path.entry(layer.src)
        } else {
            return;
        };
        if packet_hop(packet) == reply_hop
            && let Some(flow) = self.tcp_flows.get_mut(&(layer.dst, layer.dport, layer.src, layer.sport))
        {
            flow.replies += 1;
            if layer.tcp_flags & TCP_ACK != 0 {
                flow.acknowledged(layer.tcp_ack);
                // RFC 2883: a first SACK block at or below the cumulative ACK reports data
                // received twice.
                if layer.tcp_sack_right != 0 && (layer.tcp_ack.wrapping_sub(layer.tcp_sack_right) as i32) >= 0 {
                    flow.duplicates_reported += 1;
                }
            }
        }
    }

    fn observe_kernel(&mut self, record: &KernelRecord) {
        let KernelRecordKind::Retransmit { seq, .. } = record.kind else { return };
        let socket = &record.outer;
        let key = (socket.src, socket.sport, socket.dst, socket.dport);
        if self.groups.len() >= MAX_GROUPS && !self.groups.contains_key(&key) {
            return;
        }
        let flow = self.tcp_flows.get(&key).copied().unwrap_or_default();
        let group = self.groups.entry(key).or_default();
        group.count += 1;
        if group.skb_lens.len() < 64 || group.skb_lens.contains_key(&record.skb_len) {
            *group.skb_lens.entry(record.skb_len).or_default() += 1;
        }
        if let Some(advances) = group.segments.get(&seq)
            && *advances == flow.ack_advances
        {
            group.stalled += 1;
        }
        if group.segments.len() < MAX_SEGMENTS || group.segments.contains_key(&seq) {
            group.segments.insert(seq, flow.ack_advances);
        }
    }

    fn findings(&self, _end: &TraceEnd<'_>) -> Vec<Finding> {
        self.groups
            .iter()
            .filter(|((src, sport, dst, dport), _)| !self.explained.covers(IPPROTO_TCP, (*src, *sport), (*dst, *dport)))
            .map(|(key, group)| self.finding(*key, group))
            .collect()
    }
}

fn packet_hop(packet: &Packet) -> HopKey {
    HopKey { ifindex: packet.ifindex, direction: packet.direction }
}

impl Retransmits<'_> {
    fn finding(&self, key: FlowKey, group: &RetransmitGroup) -> Finding {
        let (src, sport, dst, dport) = key;
        let flow = self.tcp_flows.get(&key).copied().unwrap_or_default();
        let largest = flow.largest_segment;
        let mut sizes: BTreeMap<u32, u64> = BTreeMap::new();
        for (skb_len, count) in &group.skb_lens {
            *sizes.entry(if largest == 0 { *skb_len } else { (*skb_len).min(largest) }).or_default() += count;
        }
        let max_retransmitted = sizes.keys().max().copied().unwrap_or(0);
        let min_retransmitted = sizes.keys().min().copied().unwrap_or(0);
        // The same full-size segments (within 10% of the largest the flow sent) retransmitted
        // again without the peer acknowledging anything new, while the peer kept answering
        // the small ones (handshake, ACKs, short writes).
        let full_size_only = largest > 0 && min_retransmitted * 10 >= largest * 9;
        // Retransmissions the receiver reported as duplicates were spurious, not lost.
        let spurious = flow.duplicates_reported.min(group.count);
        let stalled = if spurious >= group.count { 0 } else { group.stalled };
        let mtu_signature = full_size_only && stalled > 0 && flow.replies > 0;
        let mut summary = match group.count {
            1 => format!("1 segment of {src}:{sport} > {dst}:{dport} was retransmitted"),
            count => format!("{count} segments of {src}:{sport} > {dst}:{dport} were retransmitted"),
        };
        if mtu_signature {
            summary.push_str(&format!(
                "; only full-size segments ({min_retransmitted}-{max_retransmitted} bytes) were retransmitted, again and again without ACK progress, while small ones got through: the MTU signature"
            ));
        } else if spurious > 0 && stalled == 0 {
            summary.push_str(&format!(
                "; the receiver reported {spurious} of them as duplicates (D-SACK): spurious retransmissions after reordering or a late ACK, nothing was lost"
            ));
        } else if stalled == 0 {
            summary.push_str(if group.count == 1 { " once" } else { ", each once," });
            summary.push_str(
                " and the peer's acknowledgements moved on: TCP recovered (reordering or an isolated loss), nothing was lost for good",
            );
        } else {
            summary.push_str(&format!("; {stalled} were retransmissions of the same segments without ACK progress"));
        }
        summary.push('.');
        Finding {
            kind: FindingKind::Retransmits,
            severity: if stalled > 0 { Severity::Warning } else { Severity::Info },
            hop: self.path.hop(self.entry(key).ifindex).map(|hop| hop.ifname.clone()),
            summary,
            evidence: json!({
                "flow": format!("{src}:{sport} > {dst}:{dport}"),
                "retransmits": group.count,
                "repeated_without_ack_progress": stalled,
                "duplicates_reported_by_peer": flow.duplicates_reported,
                "segment_sizes": sizes.iter().map(|(size, count)| json!({"bytes": size, "count": count})).collect::<Vec<_>>(),
                "largest_segment_sent": largest,
                "packets_back_from_peer": flow.replies,
                "mtu_signature": mtu_signature,
            }),
            advice: if mtu_signature {
                "Large segments are lost on the path: compare the MTUs of the pod, the tunnel and both nodes' underlays, and make sure ICMP fragmentation-needed is not blocked.".into()
            } else if stalled == 0 {
                "Nothing to fix unless it keeps growing; then look for drops and congestion on the path (see the drop findings and each hop's counters).".into()
            } else {
                "Look for drops and congestion on the path (see the drop findings and each hop's counters).".into()
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{super::testing::*, *};
    use crate::{Direction, node::path::fixtures::local_path};

    fn retransmit(payload: u32) -> KernelRecord {
        retransmit_of(1, payload)
    }

    fn retransmit_of(seq: u32, skb_len: u32) -> KernelRecord {
        let mut record = kernel(KernelRecordKind::Retransmit { seq, tcp_state: 1 }, tcp(POD, 40000, PEER, 5201, 0x10, 0), 0, false, 1);
        record.skb_len = skb_len;
        record
    }

    /// The peer acknowledges up to `ack`, seen at each hop back.
    fn ack(feed: &mut Feed, detector: &mut Retransmits<'_>, ack: u32, ip_id: u16) {
        let mut layer = tcp(PEER, 5201, POD, 40000, 0x10, 0);
        (layer.tcp_ack, layer.ip_id) = (ack, ip_id);
        feed.journey(detector, &layer, &BACK, u64::from(ip_id) * 100_000);
    }

    /// A connection that sent small and full-size (1398-byte) segments and got answers.
    fn connection(detector: &mut Retransmits<'_>, path: &Path) {
        let mut feed = Feed::new(path);
        let mut small = tcp(POD, 40000, PEER, 5201, 0x18, 100);
        small.ip_id = 1;
        let mut full = tcp(POD, 40000, PEER, 5201, 0x10, 1398);
        full.ip_id = 2;
        feed.journey(detector, &small, &OUT, 0);
        feed.journey(detector, &full, &OUT, 10_000);
        feed.journey(detector, &tcp(PEER, 5201, POD, 40000, 0x10, 0), &BACK, 20_000);
    }

    #[test]
    fn only_full_size_retransmits_are_the_mtu_signature() {
        let path = local_path();
        let mut detector = Retransmits::new(&path);
        connection(&mut detector, &path);
        for _ in 0..4 {
            detector.observe_kernel(&retransmit(1398));
        }
        let findings = End::default().findings(&detector, &path);
        assert_eq!(findings.len(), 1);
        let finding = &findings[0];
        assert_eq!((finding.kind, finding.severity, finding.hop.as_deref()), (FindingKind::Retransmits, Severity::Warning, Some("veth1")));
        assert_eq!(finding.evidence["retransmits"], 4);
        assert_eq!(finding.evidence["mtu_signature"], true);
        assert_eq!(finding.evidence["largest_segment_sent"], 1398);
        assert_eq!(finding.evidence["segment_sizes"], serde_json::json!([{"bytes": 1398, "count": 4}]));
        assert!(finding.summary.contains("only full-size segments (1398-1398 bytes)"));
        assert_eq!(detector.per_hop(), HashMap::from([(HopKey { ifindex: 5, direction: Direction::Ingress }, 4)]));
    }

    #[test]
    fn no_retransmits_are_quiet() {
        let path = local_path();
        let mut detector = Retransmits::new(&path);
        connection(&mut detector, &path);
        assert!(End::default().findings(&detector, &path).is_empty());
        assert!(detector.per_hop().is_empty());
    }

    #[test]
    fn a_small_retransmitted_segment_is_no_mtu_signature() {
        let path = local_path();
        let mut detector = Retransmits::new(&path);
        connection(&mut detector, &path);
        detector.observe_kernel(&retransmit(1398));
        // 90% of the largest segment still counts as full-size; less does not.
        detector.observe_kernel(&retransmit(1259));
        assert_eq!(End::default().findings(&detector, &path)[0].evidence["mtu_signature"], true);
        detector.observe_kernel(&retransmit(1258));
        let finding = &End::default().findings(&detector, &path)[0];
        assert_eq!(finding.evidence["mtu_signature"], false);
        assert_eq!(finding.evidence["retransmits"], 3);
        assert!(finding.advice.contains("drops and congestion"));
    }

    #[test]
    fn packets_back_from_the_peer_are_counted_once_not_once_per_hop() {
        let path = local_path();
        let mut detector = Retransmits::new(&path);
        connection(&mut detector, &path);
        let mut feed = Feed::new(&path);
        let mut second = tcp(PEER, 5201, POD, 40000, 0x10, 0);
        second.ip_id = 9;
        feed.journey(&mut detector, &second, &BACK, 30_000);
        detector.observe_kernel(&retransmit(1398));
        let finding = &End::default().findings(&detector, &path)[0];
        assert_eq!(finding.evidence["packets_back_from_peer"], 2, "two replies crossed four hops each");
    }

    #[test]
    fn one_retransmit_of_a_full_size_segment_is_no_mtu_signature() {
        let path = local_path();
        let mut detector = Retransmits::new(&path);
        connection(&mut detector, &path);
        detector.observe_kernel(&retransmit(1398));
        let finding = &End::default().findings(&detector, &path)[0];
        assert_eq!(finding.evidence["mtu_signature"], false, "{finding:#?}");
        assert_eq!(finding.severity, Severity::Info, "TCP recovered");
        assert!(
            finding.summary.contains(
                "1 segment of 10.244.0.2:40000 > 10.244.1.2:5201 was retransmitted once and the peer's acknowledgements moved on"
            ),
            "{}",
            finding.summary
        );
    }

    #[test]
    fn a_segment_retransmitted_again_after_ack_progress_is_no_mtu_signature() {
        let path = local_path();
        let mut detector = Retransmits::new(&path);
        connection(&mut detector, &path);
        let mut feed = Feed::new(&path);
        detector.observe_kernel(&retransmit(1398));
        ack(&mut feed, &mut detector, 5000, 10);
        detector.observe_kernel(&retransmit(1398));
        let finding = &End::default().findings(&detector, &path)[0];
        assert_eq!((finding.evidence["mtu_signature"].clone(), finding.severity), (serde_json::json!(false), Severity::Info));
        assert_eq!(finding.evidence["repeated_without_ack_progress"], 0);
        // The same segment again, with no new acknowledgement: stalled.
        detector.observe_kernel(&retransmit(1398));
        let finding = &End::default().findings(&detector, &path)[0];
        assert_eq!((finding.evidence["mtu_signature"].clone(), finding.severity), (serde_json::json!(true), Severity::Warning));
    }

    #[test]
    fn sizes_are_wire_segments_not_gso_buffers() {
        let path = local_path();
        let mut detector = Retransmits::new(&path);
        let mut feed = Feed::new(&path);
        // A GSO buffer of 16 segments of 1398 bytes crosses the pod's veth.
        // Its retransmission's event comes first: the rings are read in either order.
        detector.observe_kernel(&retransmit_of(7, 16 * 1398));
        let mut bulk = packet(tcp(POD, 40000, PEER, 5201, 0x10, 16 * 1398), 5, Direction::Ingress, 0);
        (bulk.gso_size, bulk.gso_segs) = (1398, 16);
        feed.packet(&mut detector, &bulk);
        ack(&mut feed, &mut detector, 1, 3);
        detector.observe_kernel(&retransmit_of(9, 500));
        let finding = &End::default().findings(&detector, &path)[0];
        assert_eq!(finding.evidence["largest_segment_sent"], 1398);
        assert_eq!(finding.evidence["segment_sizes"], serde_json::json!([{"bytes": 500, "count": 1}, {"bytes": 1398, "count": 1}]));
    }

    /// A retransmission the receiver reports as a duplicate (D-SACK) was spurious, even when
    /// the same segment went out twice with no ACK progress in between.
    #[test]
    fn retransmits_the_receiver_reports_as_duplicates_are_spurious() {
        let path = local_path();
        let mut detector = Retransmits::new(&path);
        connection(&mut detector, &path);
        detector.observe_kernel(&retransmit(1398));
        detector.observe_kernel(&retransmit(1398));
        let mut dsack = tcp(PEER, 5201, POD, 40000, 0x10, 0);
        (dsack.tcp_ack, dsack.tcp_sack_right, dsack.ip_id) = (1 + 1398, 1 + 1398, 11);
        Feed::new(&path).journey(&mut detector, &dsack, &BACK, 500_000);
        let mut dsack_again = dsack.clone();
        dsack_again.ip_id = 12;
        Feed::new(&path).journey(&mut detector, &dsack_again, &BACK, 600_000);
        let finding = &End::default().findings(&detector, &path)[0];
        assert_eq!(finding.evidence["duplicates_reported_by_peer"], 2);
        assert_eq!((finding.evidence["mtu_signature"].clone(), finding.severity), (serde_json::json!(false), Severity::Info));
        assert!(finding.summary.contains("reported 2 of them as duplicates (D-SACK)"), "{}", finding.summary);
    }

    /// A connection attempt whose replies never reached the pod usably (a pitfall finding
    /// explains its flow) is left to that finding: its retransmitted SYN is no TCP recovery.
    /// It still counts at its hop.
    #[test]
    fn retransmits_of_flows_a_pitfall_finding_explains_are_left_to_it() {
        use super::super::services::{ClientFlow, Explained, ServiceDnat};

        let path = local_path();
        let mut detector = Retransmits::new(&path);
        detector.observe_kernel(&retransmit(0));
        assert_eq!(End::default().findings(&detector, &path).len(), 1);
        let mut explained = Explained::default();
        explained.insert(
            ClientFlow { proto: IPPROTO_TCP, pod: ip(POD), port: 40000 },
            ServiceDnat { service: (ip(PEER), 5201), backend: (ip(POD), 8080) },
        );
        detector.defer_to(&explained);
        assert!(End::default().findings(&detector, &path).is_empty());
        assert_eq!(detector.per_hop().values().sum::<u64>(), 1);
    }

    /// The node itself (or any sender that is not followed) retransmitting to the pod: its
    /// segments and the pod's answers are the flow's evidence, as for the pod's own flows.
    /// The node's segments cross only the pod's veth towards the pod, the answers only the
    /// other way.
    #[test]
    fn a_sender_that_is_not_followed_has_its_segments_and_the_pods_answers_counted() {
        const NODE: &str = "10.244.0.1";
        let path = local_path();
        let mut detector = Retransmits::new(&path);
        let mut feed = Feed::new(&path);
        let mut full = tcp(NODE, 40000, POD, 8080, 0x10, 1398);
        full.ip_id = 1;
        feed.journey(&mut detector, &full, &[(5, Direction::Egress)], 0);
        for ip_id in [2, 3] {
            let mut answer = tcp(POD, 8080, NODE, 40000, 0x10, 0);
            (answer.tcp_ack, answer.ip_id) = (1, ip_id);
            feed.journey(&mut detector, &answer, &[(5, Direction::Ingress)], u64::from(ip_id) * 10_000);
        }
        let mut record = kernel(KernelRecordKind::Retransmit { seq: 7, tcp_state: 1 }, tcp(NODE, 40000, POD, 8080, 0x10, 0), 0, false, 1);
        record.skb_len = 1398;
        detector.observe_kernel(&record);
        detector.observe_kernel(&record);
        let finding = &End::default().findings(&detector, &path)[0];
        assert_eq!(finding.evidence["flow"], "10.244.0.1:40000 > 10.244.0.2:8080");
        assert_eq!(finding.evidence["largest_segment_sent"], 1398);
        assert_eq!(finding.evidence["packets_back_from_peer"], 2);
        assert_eq!((finding.evidence["mtu_signature"].clone(), finding.hop.as_deref()), (serde_json::json!(true), Some("veth1")));
    }
}
