//! `dns-unanswered`: DNS queries (UDP or TCP 53) got no answer. Says whether the Service IP
//! was DNATed to a backend at any hop: never DNATed means the node lacks the Service rules.

use super::{
    Detector, Finding, FindingKind, LeftOut, Severity, TraceEnd,
    requests::{RequestKind, RequestTracker},
    services::Explained,
};
use crate::{
    events::{correlate::Sighting, decode::Packet},
    node::Path,
};

pub struct DnsUnanswered<'a> {
    requests: RequestTracker<'a>,
}

impl<'a> DnsUnanswered<'a> {
    pub fn new(path: &'a Path, reply_timeout_ns: u64) -> Self {
        Self { requests: RequestTracker::new(path, &[RequestKind::Dns], reply_timeout_ns) }
    }
}

impl DnsUnanswered<'_> {
    /// Leaves requests of flows a pitfall finding explains out of the findings.
    pub fn defer_to(&mut self, explained: &Explained) {
        self.requests.defer_to(explained);
    }
}

impl Detector for DnsUnanswered<'_> {
    fn observe_packet(&mut self, packet: &Packet, sighting: Option<&Sighting>) {
        self.requests.observe(packet, sighting);
    }

    fn left_out(&self) -> Vec<LeftOut> {
        vec![LeftOut { what: "DNS queries (the request table was full)", count: self.requests.untracked() }]
    }

    fn findings(&self, end: &TraceEnd<'_>) -> Vec<Finding> {
        self.requests
            .unanswered(end.end_ns)
            .into_iter()
            .map(|group| {
                let peer = group.peer;
                let (dnat, advice) = if group.dnat_to.is_empty() {
                    (
                        format!("{peer} was never DNATed to a backend at any hop: the Service rules (kube-proxy) are missing on this node"),
                        "Check that kube-proxy runs on this node and has programmed the Service (iptables -t nat -L KUBE-SERVICES, or ipvsadm -Ln).",
                    )
                } else {
                    (
                        format!("{peer} was DNATed to {}, so the Service rules exist; the backend did not answer", group.dnat_to.join(", ")),
                        "Check the DNS backend pods (kubectl -n kube-system get pods -l k8s-app=kube-dns) and the path to them.",
                    )
                };
                Finding {
                    kind: FindingKind::DnsUnanswered,
                    severity: Severity::Error,
                    hop: group.last_hop.clone(),
                    summary: format!("{} {} got no answer; {dnat}; {}.", group.requests, group.what(), group.reach),
                    advice: advice.into(),
                    evidence: group.evidence,
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{super::testing::*, *};
    use crate::node::path::fixtures::local_path;

    const TIMEOUT: u64 = 1_000_000_000;
    const SERVICE: &str = "10.96.0.10";

    #[test]
    fn a_query_never_dnated_blames_the_service_rules() {
        let path = local_path();
        let mut detector = DnsUnanswered::new(&path, TIMEOUT);
        Feed::new(&path).journey(&mut detector, &udp(POD, 40000, SERVICE, 53), &OUT[..2], 0);
        let findings = End { end_ns: 2 * TIMEOUT, ..Default::default() }.findings(&detector, &path);
        assert_eq!(findings.len(), 1);
        let finding = &findings[0];
        assert_eq!(finding.kind, FindingKind::DnsUnanswered);
        assert_eq!(finding.hop.as_deref(), Some("cni0"));
        assert_eq!(finding.evidence["last_hop"], "cni0 ingress");
        assert_eq!(finding.evidence["first_hop_missing"], "flannel.1 egress");
        assert_eq!(finding.evidence["dnat_to"], serde_json::json!([]));
        assert!(finding.summary.contains("never DNATed"), "{}", finding.summary);
        assert!(finding.advice.contains("kube-proxy"));
    }

    #[test]
    fn a_dnated_query_blames_the_backend() {
        let path = local_path();
        let mut detector = DnsUnanswered::new(&path, TIMEOUT);
        let mut feed = Feed::new(&path);
        feed.journey(&mut detector, &udp(POD, 40000, SERVICE, 53), &OUT[..2], 0);
        // After the Service DNAT, the destination is the backend.
        feed.journey(&mut detector, &udp(POD, 40000, PEER, 53), &OUT[2..], 5_000);
        let findings = End { end_ns: 2 * TIMEOUT, ..Default::default() }.findings(&detector, &path);
        assert_eq!(findings[0].evidence["dnat_to"], serde_json::json!(["10.244.1.2:53"]));
        assert_eq!(findings[0].hop.as_deref(), Some("eth0"));
        assert!(findings[0].advice.contains("kube-dns"));
    }

    #[test]
    fn answered_queries_and_other_traffic_are_quiet() {
        let path = local_path();
        let mut detector = DnsUnanswered::new(&path, TIMEOUT);
        let mut feed = Feed::new(&path);
        feed.journey(&mut detector, &udp(POD, 40000, SERVICE, 53), &OUT, 0);
        feed.journey(&mut detector, &udp(SERVICE, 53, POD, 40000), &BACK, 10_000);
        // Not DNS: an unanswered datagram to another port is no query.
        feed.journey(&mut detector, &udp(POD, 40001, PEER, 54), &OUT, 20_000);
        // A ping is the no-reply detector's business.
        feed.journey(&mut detector, &echo(POD, PEER, 8, 1), &OUT, 30_000);
        assert!(End { end_ns: 2 * TIMEOUT, ..Default::default() }.findings(&detector, &path).is_empty());
    }
}
