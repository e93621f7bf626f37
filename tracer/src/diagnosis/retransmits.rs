//! `retransmits`: TCP segments of the pod's connections were retransmitted. When only
//! full-size segments are, while the peer keeps answering small ones, that is the MTU
//! signature.

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use serde_json::json;
use tracer_common::IPPROTO_TCP;

use super::{Detector, Finding, FindingKind, MAX_GROUPS, MAX_REQUESTS, Severity, TraceEnd};
use crate::{
    events::{
        correlate::{Flow, Sighting},
        decode::{KernelRecord, KernelRecordKind, Packet},
    },
    node::{HopKey, Path},
};

/// (source, source port, destination, destination port) as the retransmitting socket sees it.
type FlowKey = (IpAddr, u16, IpAddr, u16);

#[derive(Clone, Debug, Default)]
struct RetransmitGroup {
    count: u64,
    /// Segment payload sizes and how often each was retransmitted.
    sizes: BTreeMap<u32, u64>,
}

/// What a TCP flow the pod opened carried: its largest payload, to tell full-size segments
/// from small ones, and whether anything came back, which shows small packets get through.
#[derive(Clone, Copy, Debug, Default)]
struct TcpFlow {
    largest_payload: u32,
    replies: u64,
}

pub struct Retransmits<'a> {
    path: &'a Path,
    groups: BTreeMap<FlowKey, RetransmitGroup>,
    /// Keyed by (pod port, peer, peer port).
    tcp_flows: HashMap<(u16, IpAddr, u16), TcpFlow>,
}

impl<'a> Retransmits<'a> {
    pub fn new(path: &'a Path) -> Self {
        Self { path, groups: BTreeMap::new(), tcp_flows: HashMap::new() }
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
        match sighting.map(|s| s.flow) {
            Some(Flow::FromPod) => {
                let key = (layer.sport, layer.dst, layer.dport);
                if self.tcp_flows.len() < MAX_REQUESTS || self.tcp_flows.contains_key(&key) {
                    let flow = self.tcp_flows.entry(key).or_default();
                    flow.largest_payload = flow.largest_payload.max(u32::from(layer.payload_len()));
                }
            }
            Some(Flow::ToPod) => {
                if let Some(flow) = self.tcp_flows.get_mut(&(layer.dport, layer.src, layer.sport)) {
                    flow.replies += 1;
                }
            }
            None => {}
        }
    }

    fn observe_kernel(&mut self, record: &KernelRecord) {
        let KernelRecordKind::Retransmit { .. } = record.kind else { return };
        let flow = &record.outer;
        let key = (flow.src, flow.sport, flow.dst, flow.dport);
        if self.groups.len() >= MAX_GROUPS && !self.groups.contains_key(&key) {
            return;
        }
        let group = self.groups.entry(key).or_default();
        group.count += 1;
        if group.sizes.len() < 64 || group.sizes.contains_key(&record.skb_len) {
            *group.sizes.entry(record.skb_len).or_default() += 1;
        }
    }

    fn findings(&self, _end: &TraceEnd<'_>) -> Vec<Finding> {
        self.groups.iter().map(|(key, group)| self.finding(*key, group)).collect()
    }
}

impl Retransmits<'_> {
    fn finding(&self, key: FlowKey, group: &RetransmitGroup) -> Finding {
        let (src, sport, dst, dport) = key;
        let flow = self.tcp_flows.get(&(sport, dst, dport)).copied().unwrap_or_default();
        let largest = flow.largest_payload;
        let max_retransmitted = group.sizes.keys().max().copied().unwrap_or(0);
        let min_retransmitted = group.sizes.keys().min().copied().unwrap_or(0);
        // Every retransmitted segment within 10% of the largest the flow sent, while the peer
        // kept answering the small ones (handshake, ACKs, short writes).
        let mtu_signature = largest > 0 && min_retransmitted * 10 >= largest * 9 && flow.replies > 0;
        let mut summary = format!("{} segments of {src}:{sport} > {dst}:{dport} were retransmitted", group.count);
        if mtu_signature {
            summary.push_str(&format!(
                "; only full-size segments ({min_retransmitted}-{max_retransmitted} bytes) were retransmitted while small ones got through: the MTU signature"
            ));
        }
        summary.push('.');
        Finding {
            kind: FindingKind::Retransmits,
            severity: Severity::Warning,
            hop: self.path.hop(self.entry(key).ifindex).map(|hop| hop.ifname.clone()),
            summary,
            evidence: json!({
                "flow": format!("{src}:{sport} > {dst}:{dport}"),
                "retransmits": group.count,
                "segment_sizes": group.sizes.iter().map(|(size, count)| json!({"bytes": size, "count": count})).collect::<Vec<_>>(),
                "largest_segment_sent": largest,
                "packets_back_from_peer": flow.replies,
                "mtu_signature": mtu_signature,
            }),
            advice: if mtu_signature {
                "Large segments are lost on the path: compare the MTUs of the pod, the tunnel and both nodes' underlays, and make sure ICMP fragmentation-needed is not blocked.".into()
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
        let mut record = kernel(KernelRecordKind::Retransmit { seq: 1, tcp_state: 1 }, tcp(POD, 40000, PEER, 5201, 0x10, 0), 0, false, 1);
        record.skb_len = payload;
        record
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
}
