//! `connection-reset`: a TCP connection of a followed pod was reset after it was set up, or
//! after one side had already given up on it (a late RST to a closed client's ephemeral
//! port). An application's abortive close, not a missing listener: named with the flow and the
//! side that reset it, as information.

use std::{collections::BTreeMap, net::IpAddr};

use serde_json::json;
use tracer_common::IPPROTO_TCP;

use super::{
    Detector, Finding, FindingKind, LeftOut, MAX_GROUPS, Severity, TraceEnd,
    attempts::{Attempts, Rst},
    services::Explained,
};
use crate::{
    events::{correlate::Sighting, decode::Packet},
    node::Path,
};

/// (side that reset, its port, other side, its port).
type ResetFlow = (IpAddr, u16, IpAddr, u16);

pub struct ConnectionReset<'a> {
    path: &'a Path,
    attempts: Attempts,
    /// RSTs per flow, counted once each (where first seen).
    resets: BTreeMap<ResetFlow, u64>,
    /// Resets of flows beyond the table's bound.
    left_out: u64,
    /// Flows a pitfall finding explains, set when the trace ends.
    explained: Explained,
}

impl<'a> ConnectionReset<'a> {
    pub fn new(path: &'a Path) -> Self {
        Self { path, attempts: Attempts::default(), resets: BTreeMap::new(), left_out: 0, explained: Explained::default() }
    }

    /// Leaves resets of flows a pitfall finding explains out of the findings: there, the RST
    /// answers a reply the pod could not recognise.
    pub fn defer_to(&mut self, explained: &Explained) {
        self.explained = explained.clone();
    }
}

impl Detector for ConnectionReset<'_> {
    fn observe_packet(&mut self, packet: &Packet, sighting: Option<&Sighting>) {
        let layer = packet.pod_layer();
        if self.attempts.observe(layer, sighting, |ip| self.path.follows(ip)) != Some(Rst::Reset) {
            return;
        }
        let key = (layer.src, layer.sport, layer.dst, layer.dport);
        if self.resets.len() < MAX_GROUPS || self.resets.contains_key(&key) {
            *self.resets.entry(key).or_default() += 1;
        } else {
            self.left_out += 1;
        }
    }

    fn left_out(&self) -> Vec<LeftOut> {
        vec![LeftOut { what: "connection resets (more reset flows than the table holds)", count: self.left_out }]
    }

    fn findings(&self, _end: &TraceEnd<'_>) -> Vec<Finding> {
        self.resets
            .iter()
            .filter(|((by, by_port, other, other_port), _)| !self.explained.covers(IPPROTO_TCP, (*by, *by_port), (*other, *other_port)))
            .map(|(&(by, by_port, other, other_port), &count)| {
                let followed = if self.path.follows(by) { by } else { other };
                let side = if followed == by { "the followed pod" } else { "its peer" };
                let rsts = if count == 1 { "1 RST".to_string() } else { format!("{count} RSTs") };
                Finding {
                    kind: FindingKind::ConnectionReset,
                    severity: Severity::Info,
                    hop: self.path.hop(self.path.entry(followed).ifindex).map(|hop| hop.ifname.clone()),
                    summary: format!(
                        "{by}:{by_port} ({side}) reset its TCP connection with {other}:{other_port} ({rsts}): the connection was set up or already given up, so this is an abortive close, not a refused port."
                    ),
                    evidence: json!({
                        "flow": format!("{by}:{by_port} > {other}:{other_port}"),
                        "reset_by": by,
                        "reset_by_port": by_port,
                        "peer": other,
                        "peer_port": other_port,
                        "count": count,
                    }),
                    advice: format!(
                        "Nothing to fix if the application on {by} closes connections abortively on purpose (SO_LINGER 0, a killed process, a client that timed out and left); otherwise look at why it resets them."
                    ),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{super::testing::*, *};
    use crate::{
        Direction,
        events::decode::{Layer, TCP_RST, TCP_SYN},
        node::path::{
            Entry,
            fixtures::{key, local_path},
        },
    };

    const ACK: u8 = 0x10;

    #[test]
    fn a_reset_after_the_handshake_names_the_flow_and_the_side() {
        let path = local_path();
        let mut detector = ConnectionReset::new(&path);
        let mut feed = Feed::new(&path);
        feed.journey(&mut detector, &tcp(POD, 40000, PEER, 80, TCP_SYN, 0), &OUT, 0);
        feed.journey(&mut detector, &tcp(PEER, 80, POD, 40000, TCP_SYN | ACK, 0), &BACK, 10_000);
        // The peer resets the established connection; later the pod resets another one.
        feed.journey(&mut detector, &Layer { tcp_seq: 7, ..tcp(PEER, 80, POD, 40000, TCP_RST, 0) }, &BACK, 20_000);
        feed.journey(&mut detector, &Layer { tcp_seq: 9, ..tcp(POD, 40001, PEER, 80, TCP_RST | ACK, 0) }, &OUT, 30_000);
        let findings = End::default().findings(&detector, &path);
        assert_eq!(findings.len(), 2, "{findings:#?}");
        let by_peer = findings.iter().find(|f| f.evidence["reset_by"] == PEER).unwrap();
        assert_eq!((by_peer.kind, by_peer.severity, by_peer.hop.as_deref()), (FindingKind::ConnectionReset, Severity::Info, Some("veth1")));
        assert_eq!(by_peer.evidence["count"], 1, "once, not once per hop");
        assert_eq!(by_peer.evidence["flow"], format!("{PEER}:80 > {POD}:40000"));
        assert!(by_peer.summary.contains("(its peer) reset its TCP connection"), "{}", by_peer.summary);
        let by_pod = findings.iter().find(|f| f.evidence["reset_by"] == POD).unwrap();
        assert!(by_pod.summary.contains("(the followed pod)"), "{}", by_pod.summary);
    }

    #[test]
    fn a_late_rst_to_a_client_that_gave_up_is_a_reset() {
        let path = local_path();
        let mut detector = ConnectionReset::new(&path);
        let mut feed = Feed::new(&path);
        // The pod's attempt was never answered and it gave up; the late RST/ACK answers nothing.
        feed.journey(&mut detector, &tcp(POD, 40000, PEER, 80, TCP_SYN, 0), &OUT, 0);
        feed.journey(&mut detector, &Layer { tcp_seq: 1, ..tcp(POD, 40000, PEER, 80, TCP_RST, 0) }, &OUT, 10_000);
        feed.journey(&mut detector, &tcp(PEER, 80, POD, 40000, TCP_RST | ACK, 0), &BACK, 20_000);
        let findings = End::default().findings(&detector, &path);
        assert_eq!(findings.len(), 2, "{findings:#?}");
        assert!(findings.iter().all(|f| f.kind == FindingKind::ConnectionReset));
    }

    #[test]
    fn a_refusal_is_no_reset() {
        let mut path = local_path();
        path.entries.push(Entry { pod_ip: ip(PEER), hop: key(2, Direction::Ingress) });
        let mut detector = ConnectionReset::new(&path);
        let mut feed = Feed::new(&path);
        feed.journey(&mut detector, &tcp(POD, 40000, PEER, 9, TCP_SYN, 0), &OUT, 0);
        feed.journey(&mut detector, &tcp(PEER, 9, POD, 40000, TCP_RST | ACK, 0), &BACK, 10_000);
        assert!(End::default().findings(&detector, &path).is_empty());
    }

    /// With br_netfilter off, the backend's SYN-ACK reaches the client untranslated and the
    /// client's kernel answers it with a RST: br-netfilter-off explains that flow, so it is no
    /// abortive close; another flow's reset still is.
    #[test]
    fn resets_of_flows_a_pitfall_finding_explains_are_left_to_it() {
        use super::super::services::{ClientFlow, ServiceDnat};

        let (service, backend) = ("10.96.0.20", "10.244.0.3");
        let path = local_path();
        let mut detector = ConnectionReset::new(&path);
        let mut feed = Feed::new(&path);
        for (sport, ip_id) in [(40000, 1), (40001, 2)] {
            feed.journey(
                &mut detector,
                &Layer { ip_id, ..tcp(POD, sport, service, 80, TCP_SYN, 0) },
                &OUT[..1],
                u64::from(ip_id) * 100_000,
            );
            let syn_ack = Layer { ip_id: ip_id + 10, ..tcp(backend, 8080, POD, sport, TCP_SYN | ACK, 0) };
            feed.journey(&mut detector, &syn_ack, &BACK[3..], u64::from(ip_id) * 100_000 + 10_000);
            let rst = Layer { ip_id: ip_id + 20, ..tcp(POD, sport, backend, 8080, TCP_RST, 0) };
            feed.journey(&mut detector, &rst, &OUT[..1], u64::from(ip_id) * 100_000 + 20_000);
        }
        assert_eq!(End::default().findings(&detector, &path).len(), 2);
        let mut explained = Explained::default();
        explained.insert(
            ClientFlow { proto: IPPROTO_TCP, pod: ip(POD), port: 40000 },
            ServiceDnat { service: (ip(service), 80), backend: (ip(backend), 8080) },
        );
        detector.defer_to(&explained);
        let findings = End::default().findings(&detector, &path);
        assert_eq!(findings.len(), 1, "{findings:#?}");
        assert_eq!(findings[0].evidence["reset_by_port"], 40001);
    }
}
