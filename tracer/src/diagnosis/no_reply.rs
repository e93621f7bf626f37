//! `no-reply`: ICMP echo requests or TCP connection attempts left the pod and got no reply
//! within the reply timeout. Names the last hop they reached and the first that never saw them.

use super::{
    Detector, Finding, FindingKind, LeftOut, Severity, TraceEnd,
    requests::{RequestKind, RequestTracker},
    services::Explained,
};
use crate::{
    events::{correlate::Sighting, decode::Packet},
    node::Path,
};

pub struct NoReply<'a> {
    path: &'a Path,
    requests: RequestTracker<'a>,
    reply_timeout_ns: u64,
}

impl<'a> NoReply<'a> {
    pub fn new(path: &'a Path, reply_timeout_ns: u64) -> Self {
        Self { path, requests: RequestTracker::new(path, &[RequestKind::Echo, RequestKind::TcpSyn], reply_timeout_ns), reply_timeout_ns }
    }
}

impl NoReply<'_> {
    /// Leaves requests of flows a pitfall finding explains out of the findings.
    pub fn defer_to(&mut self, explained: &Explained) {
        self.requests.defer_to(explained);
    }
}

impl Detector for NoReply<'_> {
    fn observe_packet(&mut self, packet: &Packet, sighting: Option<&Sighting>) {
        self.requests.observe(packet, sighting);
    }

    fn left_out(&self) -> Vec<LeftOut> {
        vec![LeftOut { what: "echo requests and TCP connection attempts (the request table was full)", count: self.requests.untracked() }]
    }

    fn findings(&self, end: &TraceEnd<'_>) -> Vec<Finding> {
        let pod = self.path.pod_ip;
        self.requests
            .unanswered(end.end_ns)
            .into_iter()
            .map(|group| Finding {
                kind: FindingKind::NoReply,
                severity: Severity::Error,
                hop: group.last_hop.clone(),
                summary: format!(
                    "{} {} from {pod} to {} got no reply within {} ms; {}.",
                    group.requests,
                    group.what(),
                    group.peer,
                    self.reply_timeout_ns / 1_000_000,
                    group.reach
                ),
                advice: format!(
                    "Follow the flow on the node that owns {}: check its route back to {pod} and its firewall; see the drop findings on either node.",
                    group.peer
                ),
                evidence: group.evidence,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{
        super::{MAX_REQUESTS, testing::*},
        *,
    };
    use tracer_common::IPPROTO_TCP;

    use super::super::{
        requests::MAX_CLIENTS_LISTED,
        services::{ClientFlow, Explained, ServiceDnat},
    };
    use crate::{
        Direction,
        events::decode::{Layer, TCP_SYN},
        node::path::{
            Entry,
            fixtures::{bonded_path, hop, key, local_path},
        },
    };

    const TIMEOUT: u64 = 1_000_000_000;

    fn ping(seq: u16) -> Layer {
        echo(POD, PEER, 8, seq)
    }

    #[test]
    fn an_unanswered_ping_names_the_last_hop_and_the_first_missing_one() {
        let path = local_path();
        let mut detector = NoReply::new(&path, TIMEOUT);
        let mut feed = Feed::new(&path);
        for seq in 1..=3 {
            feed.journey(&mut detector, &ping(seq), &OUT, u64::from(seq) * 1_000_000);
        }
        let findings = End { end_ns: 5 * TIMEOUT, ..Default::default() }.findings(&detector, &path);
        assert_eq!(findings.len(), 1, "{findings:#?}");
        let finding = &findings[0];
        assert_eq!((finding.kind, finding.severity, finding.hop.as_deref()), (FindingKind::NoReply, Severity::Error, Some("eth0")));
        assert_eq!(finding.evidence["requests"], 3);
        assert_eq!(finding.evidence["last_hop"], "eth0 egress");
        assert_eq!(finding.evidence["first_hop_missing"], "eth0 ingress");
        assert_eq!(finding.evidence["hops_seen"], serde_json::json!(["veth1 ingress", "cni0 ingress", "flannel.1 egress", "eth0 egress"]));
        assert!(finding.summary.starts_with("3 ICMP echo requests from 10.244.0.2 to 10.244.1.2 got no reply within 1000 ms"));
        assert!(
            finding.summary.ends_with(
                "the last hop they reached was eth0 egress, where they left this node; no reply came back through eth0 ingress."
            ),
            "{}",
            finding.summary
        );
    }

    /// Pings masqueraded on their way out: seen at the NIC as the node's address (the kernel
    /// reports the pod's side of the NAT with the wire's header), they are the pod's, and the
    /// finding names the address they left as.
    #[test]
    fn masqueraded_requests_name_the_address_they_left_as() {
        let path = local_path();
        let mut detector = NoReply::new(&path, TIMEOUT);
        let mut feed = Feed::new(&path);
        let node = "10.99.0.1";
        for seq in 1..=2 {
            // Outside the cluster: through the NIC, not the tunnel.
            let out = [OUT[0], OUT[1], OUT[3]];
            feed.journey_translated(&mut detector, &ping(seq), &out, u64::from(seq) * 1_000_000, &[(2, ip(node))]);
        }
        let findings = End { end_ns: 5 * TIMEOUT, ..Default::default() }.findings(&detector, &path);
        assert_eq!(findings.len(), 1, "{findings:#?}");
        let finding = &findings[0];
        assert_eq!(finding.evidence["last_hop"], "eth0 egress");
        assert_eq!(finding.evidence["translated_to"], serde_json::json!([node]));
        assert!(
            finding.summary.ends_with(
                "the last hop they reached was eth0 egress, where they left this node translated by the node's NAT to 10.99.0.1; no reply came back through eth0 ingress."
            ),
            "{}",
            finding.summary
        );
    }

    /// Requests that stop before the way out ends may have been delivered off the traced path
    /// (to a pod on this node): the next hop is not said to have missed them or a reply.
    #[test]
    fn requests_that_stop_on_this_node_say_so() {
        let path = local_path();
        let mut detector = NoReply::new(&path, TIMEOUT);
        Feed::new(&path).journey(&mut detector, &ping(1), &OUT[..2], 0);
        let findings = End { end_ns: 5 * TIMEOUT, ..Default::default() }.findings(&detector, &path);
        let summary = &findings[0].summary;
        assert!(
            summary.ends_with("the last hop they reached was cni0 ingress; the next traced hop, flannel.1 egress, never saw them: they were dropped on this node or delivered off the traced path."),
            "{summary}"
        );
        assert!(!summary.contains("reply came back"), "{summary}");
    }

    #[test]
    fn answered_pings_are_quiet() {
        let path = local_path();
        let mut detector = NoReply::new(&path, TIMEOUT);
        let mut feed = Feed::new(&path);
        feed.journey(&mut detector, &ping(1), &OUT, 0);
        feed.journey(&mut detector, &echo(PEER, POD, 0, 1), &BACK, 100_000);
        assert!(End { end_ns: 5 * TIMEOUT, ..Default::default() }.findings(&detector, &path).is_empty());
    }

    #[test]
    fn a_request_younger_than_the_timeout_is_not_judged() {
        let path = local_path();
        let mut detector = NoReply::new(&path, TIMEOUT);
        Feed::new(&path).journey(&mut detector, &ping(1), &OUT, 500);
        assert!(End { end_ns: 500 + TIMEOUT - 1, ..Default::default() }.findings(&detector, &path).is_empty());
        assert_eq!(End { end_ns: 500 + TIMEOUT, ..Default::default() }.findings(&detector, &path).len(), 1);
    }

    #[test]
    fn requests_start_only_at_the_pods_entry_hop() {
        let path = local_path();
        let mut detector = NoReply::new(&path, TIMEOUT);
        // First seen on the underlay: a packet that did not come from the pod's veth.
        Feed::new(&path).journey(&mut detector, &ping(1), &OUT[3..], 0);
        assert!(End { end_ns: 5 * TIMEOUT, ..Default::default() }.findings(&detector, &path).is_empty());
    }

    #[test]
    fn an_idle_bond_slave_is_not_the_first_hop_missing() {
        let path = bonded_path();
        let mut detector = NoReply::new(&path, TIMEOUT);
        let out =
            [(5, Direction::Ingress), (4, Direction::Ingress), (3, Direction::Egress), (6, Direction::Egress), (2, Direction::Egress)];
        Feed::new(&path).journey(&mut detector, &ping(1), &out, 0);
        let findings = End { end_ns: 5 * TIMEOUT, ..Default::default() }.findings(&detector, &path);
        assert_eq!(findings[0].evidence["last_hop"], "eth0 egress");
        assert_eq!(findings[0].evidence["first_hop_missing"], "eth0 ingress", "not the idle eth1");
        assert_eq!(findings[0].hop.as_deref(), Some("eth0"));
    }

    #[test]
    fn each_followed_ip_tracks_requests_from_its_own_first_hop() {
        let mut path = local_path();
        let second = "10.244.0.3";
        path.stages[0].hops.push(hop("veth2", 8, crate::node::HopKind::PodVeth, Direction::Ingress));
        path.entries.push(Entry { pod_ip: ip(second), hop: key(8, Direction::Ingress) });
        let mut detector = NoReply::new(&path, TIMEOUT);
        let mut out = OUT;
        out[0] = (8, Direction::Ingress);
        Feed::new(&path).journey(&mut detector, &echo(second, PEER, 8, 1), &out, 0);
        let findings = End { end_ns: 5 * TIMEOUT, ..Default::default() }.findings(&detector, &path);
        assert_eq!(findings.len(), 1, "the second pod's request is tracked");
        assert_eq!(findings[0].evidence["hops_seen"][0], "veth2 ingress");
    }

    #[test]
    fn with_both_ends_followed_the_peers_reply_answers() {
        let mut path = local_path();
        // The peer is a remote pod: its packets enter at eth0 ingress.
        path.entries.push(Entry { pod_ip: ip(PEER), hop: key(2, Direction::Ingress) });
        let mut detector = NoReply::new(&path, TIMEOUT);
        let mut feed = Feed::new(&path);
        feed.journey(&mut detector, &ping(1), &OUT, 0);
        feed.journey(&mut detector, &echo(PEER, POD, 0, 1), &BACK, 100_000);
        assert!(End { end_ns: 5 * TIMEOUT, ..Default::default() }.findings(&detector, &path).is_empty());
        // The peer's own unanswered ping is tracked from where it enters.
        feed.journey(&mut detector, &echo(PEER, POD, 8, 9), &BACK[..2], 200_000);
        let findings = End { end_ns: 5 * TIMEOUT, ..Default::default() }.findings(&detector, &path);
        assert_eq!(findings.len(), 1, "{findings:#?}");
        assert_eq!(findings[0].evidence["hops_seen"], serde_json::json!(["eth0 ingress", "flannel.1 ingress"]));
        assert_eq!(findings[0].evidence["first_hop_missing"], "cni0 egress");
    }

    /// Two pods on this node followed at once ping the same peer with the same id and
    /// sequence (ping's defaults in two pods): the peer's reply to one answers only that one.
    #[test]
    fn a_reply_answers_only_the_request_of_the_pod_it_is_addressed_to() {
        let mut path = local_path();
        let second = "10.244.0.3";
        path.stages[0].hops.push(hop("veth2", 8, crate::node::HopKind::PodVeth, Direction::Ingress));
        path.entries.push(Entry { pod_ip: ip(second), hop: key(8, Direction::Ingress) });
        let mut detector = NoReply::new(&path, TIMEOUT);
        let mut feed = Feed::new(&path);
        let (mut out_second, mut back_second) = (OUT, BACK);
        out_second[0] = (8, Direction::Ingress);
        back_second[3] = (8, Direction::Egress);
        feed.journey(&mut detector, &ping(1), &OUT, 0);
        feed.journey(&mut detector, &Layer { ip_id: 99, ..echo(second, PEER, 8, 1) }, &out_second, 10_000);
        feed.journey(&mut detector, &echo(PEER, POD, 0, 1), &BACK, 100_000);
        let findings = End { end_ns: 5 * TIMEOUT, ..Default::default() }.findings(&detector, &path);
        assert_eq!(findings.len(), 1, "{findings:#?}");
        assert_eq!(findings[0].evidence["hops_seen"][0], "veth2 ingress", "the second pod's ping is unanswered");
        // Its own reply answers it.
        feed.journey(&mut detector, &Layer { ip_id: 98, ..echo(PEER, second, 0, 1) }, &back_second, 200_000);
        assert!(End { end_ns: 5 * TIMEOUT, ..Default::default() }.findings(&detector, &path).is_empty());
    }

    /// Far more requests than the table holds, over more than a reply timeout: answered ones
    /// are settled away, so none goes untracked and no finding appears.
    #[test]
    fn a_busy_pod_never_fills_the_request_table() {
        let path = local_path();
        let mut detector = NoReply::new(&path, TIMEOUT);
        let mut feed = Feed::new(&path);
        let requests = 3 * MAX_REQUESTS as u64;
        for seq in 0..requests {
            let at = seq * 100_000;
            feed.journey(&mut detector, &ping(seq as u16), &OUT, at);
            feed.journey(&mut detector, &echo(PEER, POD, 0, seq as u16), &BACK, at + 50_000);
        }
        assert!(detector.left_out().iter().all(|left_out| left_out.count == 0));
        assert!(End { end_ns: requests * 100_000 + 5 * TIMEOUT, ..Default::default() }.findings(&detector, &path).is_empty());
    }

    /// Unanswered requests beyond the table's size are settled into their group, not lost:
    /// the finding counts every one of them.
    #[test]
    fn settled_unanswered_requests_are_still_reported() {
        let path = local_path();
        let mut detector = NoReply::new(&path, TIMEOUT);
        let mut feed = Feed::new(&path);
        let requests = MAX_REQUESTS as u64 + 3_000;
        for seq in 0..requests {
            feed.journey(&mut detector, &ping(seq as u16), &OUT, seq * 200_000);
        }
        assert!(detector.left_out().iter().all(|left_out| left_out.count == 0));
        let findings = End { end_ns: requests * 200_000 + 5 * TIMEOUT, ..Default::default() }.findings(&detector, &path);
        assert_eq!(findings.len(), 1, "{findings:#?}");
        assert_eq!(findings[0].evidence["requests"], requests);
        assert_eq!(findings[0].evidence["last_hop"], "eth0 egress");
    }

    const SERVICE: &str = "10.96.0.21";

    /// Pod A's connection attempt from `sport` to the Service, seen at its veth only (the
    /// bridge dropped it), or also DNATed to `dnat_to` further on.
    fn attempt(detector: &mut NoReply<'_>, feed: &mut Feed, sport: u16, dnat_to: Option<&str>, at_ns: u64) {
        let syn = Layer { ip_id: sport, ..tcp(POD, sport, SERVICE, 80, TCP_SYN, 0) };
        feed.journey(detector, &syn, &OUT[..1], at_ns);
        if let Some(backend) = dnat_to {
            feed.journey(detector, &Layer { dst: ip(backend), dport: 8080, ..syn }, &OUT[1..], at_ns + 1000);
        }
    }

    /// Explains pod A's flows from `ports` to the Service, DNATed back to the pod itself.
    fn looped_back(ports: impl Iterator<Item = u16>) -> Explained {
        let mut explained = Explained::default();
        for port in ports {
            explained.insert(
                ClientFlow { proto: IPPROTO_TCP, pod: ip(POD), port },
                ServiceDnat { service: (ip(SERVICE), 80), backend: (ip(POD), 8080) },
            );
        }
        explained
    }

    /// A pod reaching a Service that loops back to it (hairpin-off explains it): those
    /// connection attempts are left to that finding; other attempts to the Service are not.
    #[test]
    fn attempts_a_pitfall_finding_explains_are_left_to_it() {
        let path = local_path();
        let mut detector = NoReply::new(&path, TIMEOUT);
        let mut feed = Feed::new(&path);
        for sport in 40000..40003 {
            attempt(&mut detector, &mut feed, sport, None, u64::from(sport - 40000) * 1_000_000);
        }
        detector.defer_to(&looped_back(40000..40002));
        let end = End { end_ns: 5 * TIMEOUT, ..Default::default() };
        let findings = end.findings(&detector, &path);
        assert_eq!(findings.len(), 1, "{findings:#?}");
        assert_eq!((&findings[0].evidence["requests"], &findings[0].evidence["packets"]), (&serde_json::json!(1), &serde_json::json!(1)));
        detector.defer_to(&looped_back(40000..40003));
        assert!(end.findings(&detector, &path).is_empty());
    }

    /// Far more attempts than a group lists by client port: those beyond the list are left to
    /// the pitfall finding when it explains the pod's flows to that Service and none of the
    /// group was seen DNATed elsewhere; one seen DNATed to another backend keeps them reported.
    #[test]
    fn attempts_beyond_the_client_list_are_judged_by_service() {
        let path = local_path();
        let attempts = MAX_REQUESTS as u16 + 100;
        let trace = |other_backend: bool| {
            let mut detector = NoReply::new(&path, TIMEOUT);
            let mut feed = Feed::new(&path);
            for index in 0..attempts {
                let dnat_to = (other_backend && index == 0).then_some(PEER);
                attempt(&mut detector, &mut feed, 10_000 + index, dnat_to, u64::from(index) * 200_000);
            }
            detector.defer_to(&looped_back(10_000..10_000 + attempts));
            End { end_ns: u64::from(attempts) * 200_000 + 5 * TIMEOUT, ..Default::default() }.findings(&detector, &path)
        };
        assert!(trace(false).is_empty(), "{:#?}", trace(false));
        let findings = trace(true);
        assert_eq!(findings.len(), 1, "{findings:#?}");
        assert_eq!(findings[0].evidence["requests"], u64::from(attempts) - MAX_CLIENTS_LISTED as u64, "the unlisted ones");
    }
}
