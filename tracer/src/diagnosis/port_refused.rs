//! `port-refused`: a connection attempt answered by a TCP RST, or a datagram answered by ICMP
//! port unreachable, counted once per refusal (where the reply was first seen), with the peer,
//! protocol and port. Other resets are `connection-reset`.

use std::{collections::BTreeMap, net::IpAddr};

use serde_json::json;
use tracer_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP};

use super::{
    Detector, Finding, FindingKind, LeftOut, MAX_GROUPS, Severity, TraceEnd,
    attempts::{Attempts, Rst},
    services::Explained,
};
use crate::{
    events::{
        correlate::Sighting,
        decode::{Packet, proto_name},
    },
    node::Path,
};

/// (refusing side, protocol, its port, side whose packets were refused) of a refusal; one of
/// the two is a followed pod.
type Refusal = (IpAddr, u8, u16, IpAddr);

pub struct PortRefused<'a> {
    path: &'a Path,
    attempts: Attempts,
    /// How often each refusal came, per signal ("TCP RST", "ICMP port unreachable").
    refused: BTreeMap<(Refusal, &'static str), u64>,
    /// Refusals of peers and ports beyond the table's bound.
    left_out: u64,
    /// Flows a pitfall finding explains, set when the trace ends.
    explained: Explained,
}

impl<'a> PortRefused<'a> {
    pub fn new(path: &'a Path) -> Self {
        Self { path, attempts: Attempts::default(), refused: BTreeMap::new(), left_out: 0, explained: Explained::default() }
    }

    /// Leaves out of the findings a client pod's refusals of replies that a pitfall finding
    /// explains: the pod refused them because they came from the backend, not the Service.
    pub fn defer_to(&mut self, explained: &Explained) {
        self.explained = explained.clone();
    }
}

impl Detector for PortRefused<'_> {
    fn observe_packet(&mut self, packet: &Packet, sighting: Option<&Sighting>) {
        // A reply crosses several hops: count it once, where first seen. The refusing side is
        // the peer, or a followed server pod refusing its clients.
        let layer = packet.pod_layer();
        let rst = self.attempts.observe(layer, sighting, |ip| self.path.follows(ip));
        let first_sighting = sighting.is_some_and(|s| s.previous.is_none());
        if !first_sighting || !(self.path.follows(layer.dst) || self.path.follows(layer.src)) {
            return;
        }
        let key = match (layer.proto, layer.icmp_type, layer.icmp_code) {
            // Port unreachable (ICMP 3/3, ICMPv6 1/4) names the refused port in its quote. Only
            // to the pod: one from the pod is as likely its answer to a late reply to a
            // client socket it already closed (a DNS answer after the resolver gave up).
            (IPPROTO_ICMP, 3, 3) | (IPPROTO_ICMPV6, 1, 4) if self.path.follows(layer.dst) => {
                ((layer.src, layer.quoted_proto, layer.quoted_dport, layer.dst), "ICMP port unreachable")
            }
            (IPPROTO_TCP, ..) if rst == Some(Rst::Refusal) => ((layer.src, IPPROTO_TCP, layer.sport, layer.dst), "TCP RST"),
            _ => return,
        };
        if self.refused.len() < MAX_GROUPS || self.refused.contains_key(&key) {
            *self.refused.entry(key).or_default() += 1;
        } else {
            self.left_out += 1;
        }
    }

    fn left_out(&self) -> Vec<LeftOut> {
        vec![
            LeftOut { what: "refusals (more refused peers and ports than the table holds)", count: self.left_out },
            LeftOut { what: "TCP connection attempts (the attempt table was full)", count: self.attempts.untracked },
        ]
    }

    fn findings(&self, _end: &TraceEnd<'_>) -> Vec<Finding> {
        self.refused
            .iter()
            .filter(|(((peer, proto, port, from), _), _)| !self.explained.covers_client_of(*proto, (*peer, *port), *from))
            .map(|(((peer, proto, port, from), how), count)| {
                let proto = proto_name(*proto);
                let listing = if proto == "udp" { "ss -lunp" } else { "ss -ltnp" };
                // Whose packets: the followed pod's, or a client's that a followed pod refused.
                let (pod, whose) = if self.path.follows(*from) {
                    (*from, if self.path.follows(*peer) { format!("{from}'s") } else { "the pod's".to_string() })
                } else {
                    (*peer, format!("{from}'s"))
                };
                Finding {
                    kind: FindingKind::PortRefused,
                    severity: Severity::Error,
                    hop: self.path.hop(self.path.entry(pod).ifindex).map(|hop| hop.ifname.clone()),
                    summary: format!("{peer} port {port}/{proto} refused {whose} packets ({how}, {}): nothing listens there.", times(*count)),
                    evidence: json!({ "peer": peer, "port": port, "proto": proto, "signal": how, "count": count, "from": from }),
                    advice: format!(
                        "Check that the server on {peer} listens on {proto} port {port} ({listing} in that pod) and that the Service's targetPort matches."
                    ),
                }
            })
            .collect()
    }
}

fn times(count: u64) -> String {
    if count == 1 { "once".to_string() } else { format!("{count} times") }
}

#[cfg(test)]
mod tests {
    use tracer_common::IPPROTO_UDP;

    use super::{super::testing::*, *};
    use crate::{
        Direction,
        events::decode::{Layer, TCP_RST, TCP_SYN},
        node::path::{
            Entry,
            fixtures::{key, local_path},
        },
    };

    fn port_unreachable(code: u8) -> Layer {
        Layer { icmp_type: 3, icmp_code: code, quoted_proto: IPPROTO_UDP, quoted_sport: 40000, quoted_dport: 9, ..echo(PEER, POD, 3, 0) }
    }

    #[test]
    fn a_rst_and_port_unreachables_are_counted_once_per_refusal() {
        let path = local_path();
        let mut detector = PortRefused::new(&path);
        let mut feed = Feed::new(&path);
        // The connection attempt, then the RST/ACK that answers it.
        feed.journey(&mut detector, &tcp(POD, 40000, PEER, 9, TCP_SYN, 0), &OUT, 0);
        feed.journey(&mut detector, &tcp(PEER, 9, POD, 40000, TCP_RST | 0x10, 0), &BACK, 0);
        for id in 1..=3 {
            feed.journey(&mut detector, &Layer { ip_id: id, ..port_unreachable(3) }, &BACK, u64::from(id) * 10_000);
        }
        let findings = End::default().findings(&detector, &path);
        assert_eq!(findings.len(), 2, "{findings:#?}");
        for (finding, (signal, proto, count)) in findings.iter().zip([("TCP RST", "tcp", 1), ("ICMP port unreachable", "udp", 3)]) {
            assert_eq!((finding.kind, finding.hop.as_deref()), (FindingKind::PortRefused, Some("veth1")));
            assert_eq!(finding.evidence["signal"], signal);
            assert_eq!(finding.evidence["proto"], proto);
            assert_eq!(finding.evidence["port"], 9);
            assert_eq!(finding.evidence["peer"], PEER);
            assert_eq!(finding.evidence["count"], count, "once per refusal, not per hop");
        }
    }

    #[test]
    fn ordinary_replies_are_quiet() {
        let path = local_path();
        let mut detector = PortRefused::new(&path);
        let mut feed = Feed::new(&path);
        feed.journey(&mut detector, &tcp(PEER, 80, POD, 40000, 0x12, 0), &BACK, 0);
        feed.journey(&mut detector, &echo(PEER, POD, 0, 1), &BACK, 10_000);
        // A RST the pod sends refuses nothing of the pod's.
        feed.journey(&mut detector, &tcp(POD, 40000, PEER, 80, TCP_RST, 0), &OUT, 20_000);
        assert!(End::default().findings(&detector, &path).is_empty());
    }

    #[test]
    fn host_unreachable_is_no_refusal() {
        let path = local_path();
        let mut detector = PortRefused::new(&path);
        Feed::new(&path).journey(&mut detector, &port_unreachable(1), &BACK, 0);
        assert!(End::default().findings(&detector, &path).is_empty());
    }

    #[test]
    fn with_both_ends_followed_a_refusal_by_the_peer_counts() {
        let mut path = local_path();
        path.entries.push(Entry { pod_ip: ip(PEER), hop: key(2, Direction::Ingress) });
        let mut detector = PortRefused::new(&path);
        let mut feed = Feed::new(&path);
        feed.journey(&mut detector, &tcp(POD, 40000, PEER, 9, TCP_SYN, 0), &OUT, 0);
        feed.journey(&mut detector, &tcp(PEER, 9, POD, 40000, TCP_RST | 0x10, 0), &BACK, 0);
        let findings = End::default().findings(&detector, &path);
        assert_eq!(findings.len(), 1);
        assert_eq!((findings[0].hop.as_deref(), &findings[0].evidence["count"]), (Some("veth1"), &serde_json::json!(1)));
    }

    /// Only a RST that answers a connection attempt is a refusal: one after the handshake, or
    /// a late one to a client that gave up, resets a connection (`connection-reset`).
    #[test]
    fn a_rst_that_answers_no_attempt_is_no_refusal() {
        let path = local_path();
        let mut detector = PortRefused::new(&path);
        let mut feed = Feed::new(&path);
        feed.journey(&mut detector, &tcp(POD, 40000, PEER, 80, TCP_SYN, 0), &OUT, 0);
        feed.journey(&mut detector, &tcp(PEER, 80, POD, 40000, TCP_SYN | 0x10, 0), &BACK, 10_000);
        feed.journey(&mut detector, &Layer { tcp_seq: 5, ..tcp(PEER, 80, POD, 40000, TCP_RST | 0x10, 0) }, &BACK, 20_000);
        // A RST/ACK to an ephemeral port that sent no SYN: the client had given up.
        feed.journey(&mut detector, &tcp(PEER, 80, POD, 40001, TCP_RST | 0x10, 0), &BACK, 30_000);
        assert!(End::default().findings(&detector, &path).is_empty());
    }

    /// A followed server pod refusing a client's connection attempt: nothing listens on the
    /// pod's port. Its port unreachable may answer a late reply to a socket it closed: no
    /// refusal.
    #[test]
    fn a_followed_pod_refusing_its_clients_is_a_refusal() {
        let path = local_path();
        let mut detector = PortRefused::new(&path);
        let mut feed = Feed::new(&path);
        feed.journey(&mut detector, &tcp(PEER, 40000, POD, 8080, TCP_SYN, 0), &BACK, 0);
        feed.journey(&mut detector, &tcp(POD, 8080, PEER, 40000, TCP_RST | 0x10, 0), &OUT, 10_000);
        let quote = Layer {
            icmp_type: 3,
            icmp_code: 3,
            quoted_proto: IPPROTO_UDP,
            quoted_sport: 40000,
            quoted_dport: 7000,
            ..echo(POD, PEER, 3, 0)
        };
        feed.journey(&mut detector, &quote, &OUT, 20_000);
        let findings = End::default().findings(&detector, &path);
        assert_eq!(findings.len(), 1, "{findings:#?}");
        for (finding, port) in findings.iter().zip([8080]) {
            assert_eq!((finding.kind, finding.hop.as_deref()), (FindingKind::PortRefused, Some("veth1")));
            assert_eq!((&finding.evidence["peer"], &finding.evidence["from"]), (&serde_json::json!(POD), &serde_json::json!(PEER)));
            assert_eq!(finding.evidence["port"], port);
            assert!(finding.summary.starts_with(&format!("{POD} port {port}/")), "{}", finding.summary);
            assert!(finding.summary.contains(&format!("refused {PEER}'s packets")), "{}", finding.summary);
        }
    }

    /// With both pods followed and br_netfilter off, the client pod refuses the backend's
    /// untranslated UDP replies with port unreachable: br-netfilter-off explains that, not a
    /// missing listener.
    #[test]
    fn a_client_refusing_replies_a_pitfall_finding_explains_is_left_to_it() {
        use super::super::services::{ClientFlow, ServiceDnat};

        let backend = "10.244.0.3";
        let mut path = local_path();
        path.entries.push(Entry { pod_ip: ip(backend), hop: key(8, Direction::Ingress) });
        let mut detector = PortRefused::new(&path);
        let mut feed = Feed::new(&path);
        let quote = Layer {
            icmp_type: 3,
            icmp_code: 3,
            quoted_proto: IPPROTO_UDP,
            quoted_sport: 53,
            quoted_dport: 4000,
            ..echo(POD, backend, 3, 0)
        };
        feed.journey(&mut detector, &quote, &OUT[..1], 0);
        assert_eq!(End::default().findings(&detector, &path).len(), 1);
        let mut explained = Explained::default();
        explained.insert(
            ClientFlow { proto: IPPROTO_UDP, pod: ip(POD), port: 4000 },
            ServiceDnat { service: (ip("10.96.0.10"), 53), backend: (ip(backend), 53) },
        );
        detector.defer_to(&explained);
        assert!(End::default().findings(&detector, &path).is_empty());
    }
}
