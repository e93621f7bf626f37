//! `pod-gone`: a followed local pod was deleted during the trace: its veth disappeared. Packets
//! still sent to its IP are dropped on the node or flooded to the other pods on the bridge,
//! which free them as not theirs (OTHERHOST); those are the pod's absence, not drops to fix on
//! the path, so they are counted here instead of as `drop` errors.

use std::{collections::BTreeMap, net::IpAddr};

use serde_json::json;

use super::{Detector, Finding, FindingKind, Severity, TraceEnd};
use crate::{
    events::decode::{KernelRecord, KernelRecordKind},
    node::Path,
};

pub struct PodGone<'a> {
    path: &'a Path,
    /// Kernel drops of packets addressed to each followed pod, per drop reason.
    drops_to: BTreeMap<(IpAddr, u32), u64>,
}

impl<'a> PodGone<'a> {
    pub fn new(path: &'a Path) -> Self {
        Self { path, drops_to: BTreeMap::new() }
    }
}

impl Detector for PodGone<'_> {
    fn observe_kernel(&mut self, record: &KernelRecord) {
        let KernelRecordKind::Drop { reason, .. } = record.kind else { return };
        let dst = record.pod_layer().dst;
        // One entry per followed IP and reason: bounded by the command line.
        if self.path.follows(dst) {
            *self.drops_to.entry((dst, reason)).or_default() += 1;
        }
    }

    fn findings(&self, end: &TraceEnd<'_>) -> Vec<Finding> {
        self.path
            .entries
            .iter()
            .filter(|entry| end.pod_gone(entry.pod_ip))
            .map(|entry| {
                let pod = entry.pod_ip;
                let veth = self.path.hop(entry.hop.ifindex).map_or_else(|| format!("ifindex {}", entry.hop.ifindex), |hop| hop.ifname.clone());
                let reasons: BTreeMap<String, u64> = self
                    .drops_to
                    .range((pod, 0)..=(pod, u32::MAX))
                    .map(|((_, reason), count)| (end.drop_reasons.get(&i64::from(*reason)).cloned().unwrap_or_else(|| format!("reason {reason}")), *count))
                    .collect();
                let dropped: u64 = reasons.values().sum();
                let mut summary = format!("The followed pod {pod} is gone: its veth {veth} disappeared during the trace");
                if dropped > 0 {
                    let named: Vec<String> = reasons.iter().map(|(reason, count)| format!("{count} {reason}")).collect();
                    summary.push_str(&format!("; {dropped} packets sent to its IP were dropped ({}), as nothing here answers for it any more", named.join(", ")));
                }
                summary.push('.');
                Finding {
                    kind: FindingKind::PodGone,
                    severity: Severity::Warning,
                    hop: Some(veth.clone()),
                    summary,
                    evidence: json!({ "pod": pod, "veth": veth, "drops_to_pod": dropped, "drop_reasons": reasons }),
                    advice: format!(
                        "Find where the pod went (kubectl get pod -o wide: a new pod has a new IP and veth) and follow it there; whatever still sends to {pod} uses a stale address (Service endpoints, a DNS cache, a hard-coded IP)."
                    ),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::{super::testing::*, *};
    use crate::node::path::fixtures::local_path;

    fn dropped(reason: u32, seq: u16) -> KernelRecord {
        kernel(KernelRecordKind::Drop { reason, location: 0 }, echo(PEER, POD, 8, seq), 2, true, 7)
    }

    #[test]
    fn a_followed_pod_whose_veth_vanished_is_gone_with_the_drops_to_it() {
        let path = local_path();
        let mut detector = PodGone::new(&path);
        for seq in 1..=4 {
            detector.observe_kernel(&dropped(77, seq));
        }
        detector.observe_kernel(&dropped(9, 5));
        let end = End { vanished: vec![5], drop_reasons: HashMap::from([(77, "OTHERHOST".into())]), ..Default::default() };
        let findings = end.findings(&detector, &path);
        assert_eq!(findings.len(), 1, "{findings:#?}");
        let gone = &findings[0];
        assert_eq!((gone.kind, gone.severity, gone.hop.as_deref()), (FindingKind::PodGone, Severity::Warning, Some("veth1")));
        assert_eq!(gone.evidence["drops_to_pod"], 5);
        assert_eq!(gone.evidence["drop_reasons"], serde_json::json!({"OTHERHOST": 4, "reason 9": 1}));
        assert!(
            gone.summary.starts_with("The followed pod 10.244.0.2 is gone: its veth veth1 disappeared during the trace; 5 packets"),
            "{}",
            gone.summary
        );
    }

    #[test]
    fn a_pod_still_there_or_another_hop_gone_is_no_finding() {
        let path = local_path();
        let mut detector = PodGone::new(&path);
        detector.observe_kernel(&dropped(77, 1));
        assert!(End::default().findings(&detector, &path).is_empty());
        // flannel.1 vanishing is no pod's absence.
        assert!(End { vanished: vec![3], ..Default::default() }.findings(&detector, &path).is_empty());
    }
}
