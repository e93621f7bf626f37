//! `br-netfilter-off`: replies to a followed pod's flows to a Service came from the backend's
//! own address, not the Service's. DNAT is undone by conntrack as a reply passes iptables; a
//! reply that reaches the pod untranslated never did, which happens when the backend sits
//! behind the same bridge as the client (the bridge forwards the reply from port to port) and
//! bridged frames bypass iptables: br_netfilter not loaded, or
//! `net.bridge.bridge-nf-call-iptables=0`. The client has no socket for such a reply and
//! discards it (TCP answers it with a RST). The evidence is packets: the flow's opening packet
//! seen DNATed from the Service to the backend, then a reply from the backend reaching the
//! pod; the node's br_netfilter setting, read at discovery, confirms it.

use std::{collections::BTreeMap, net::IpAddr};

use serde_json::json;
use tracer_common::{IPPROTO_TCP, IPPROTO_UDP};

use super::{
    Detector, Finding, FindingKind, LeftOut, MAX_REQUESTS, Severity, TraceEnd,
    services::{ClientFlow, Explained, ServiceDnat, ServiceFlows},
};
use crate::{
    events::{
        correlate::Sighting,
        decode::{Packet, proto_name},
    },
    node::{Hop, HopKey, HopKind, Path, bridge::BridgeNetfilter},
};

/// Untranslated replies folded per pod and Service DNAT: how many flows, how many packets.
#[derive(Default)]
struct Group {
    flows: usize,
    replies: u64,
}

pub struct BrNetfilterOff<'a> {
    path: &'a Path,
    /// Per client flow DNATed to a backend: its DNAT, and the replies that reached the pod
    /// from the backend.
    untranslated: BTreeMap<ClientFlow, (ServiceDnat, u64)>,
    /// Flows with untranslated replies beyond the table's bound.
    left_out: u64,
}

impl<'a> BrNetfilterOff<'a> {
    pub fn new(path: &'a Path) -> Self {
        Self { path, untranslated: BTreeMap::new(), left_out: 0 }
    }

    fn bridge(&self) -> Option<&Hop> {
        self.path.hops().find(|hop| hop.kind == HopKind::Bridge)
    }

    /// Flows with untranslated replies, unless the bridge is known to pass `pod`'s packets
    /// through iptables: then conntrack was skipped for another reason, which this finding
    /// does not know.
    fn confirmed(&self) -> impl Iterator<Item = (ClientFlow, ServiceDnat, u64)> + '_ {
        let netfilter = self.bridge().and_then(|bridge| bridge.bridge_netfilter);
        self.untranslated.iter().filter_map(move |(flow, (dnat, replies))| {
            let passes_iptables = netfilter.is_some_and(|netfilter| netfilter.calls_iptables(flow.pod));
            (!passes_iptables).then_some((*flow, *dnat, *replies))
        })
    }

    /// The flows this detector's findings explain.
    pub fn explained(&self) -> Explained {
        let mut explained = Explained::default();
        for (flow, dnat, _) in self.confirmed() {
            explained.insert(flow, dnat);
        }
        explained
    }

    /// A packet, once `services` has learned from it: a reply straight from a backend counts
    /// where it leaves the path towards its pod.
    pub fn observe_packet(&mut self, packet: &Packet, sighting: Option<&Sighting>, services: &ServiceFlows<'_>) {
        let layer = packet.pod_layer();
        // A reply counts once, where it leaves the path towards its pod.
        let hop = HopKey { ifindex: packet.ifindex, direction: packet.direction };
        if sighting.is_none() || !matches!(layer.proto, IPPROTO_TCP | IPPROTO_UDP) || hop != self.path.exit(layer.dst) {
            return;
        }
        let flow = ClientFlow { proto: layer.proto, pod: layer.dst, port: layer.dport };
        let Some(dnat) = services.translated(flow) else { return };
        if (layer.src, layer.sport) != dnat.backend || dnat.backend == dnat.service {
            return;
        }
        if self.untranslated.len() < MAX_REQUESTS || self.untranslated.contains_key(&flow) {
            self.untranslated.entry(flow).or_insert((dnat, 0)).1 += 1;
        } else {
            self.left_out += 1;
        }
    }
}

impl Detector for BrNetfilterOff<'_> {
    fn left_out(&self) -> Vec<LeftOut> {
        vec![LeftOut { what: "untranslated replies (more such flows than the table holds)", count: self.left_out }]
    }

    fn findings(&self, _end: &TraceEnd<'_>) -> Vec<Finding> {
        let mut groups: BTreeMap<(IpAddr, u8, ServiceDnat), Group> = BTreeMap::new();
        for (flow, dnat, replies) in self.confirmed() {
            let group = groups.entry((flow.pod, flow.proto, dnat)).or_default();
            group.flows += 1;
            group.replies += replies;
        }
        groups.into_iter().map(|((pod, proto, dnat), group)| self.finding(pod, proto, dnat, &group)).collect()
    }
}

impl BrNetfilterOff<'_> {
    fn finding(&self, pod: IpAddr, proto: u8, dnat: ServiceDnat, group: &Group) -> Finding {
        let ServiceDnat { service: (service, service_port), backend: (backend, backend_port) } = dnat;
        let proto = proto_name(proto);
        let bridge = self.bridge();
        let bridge_name = bridge.map_or("the pod bridge", |bridge| bridge.ifname.as_str());
        let netfilter = bridge.and_then(|bridge| bridge.bridge_netfilter);
        let (sysctl, option) = BridgeNetfilter::switch_names(pod);
        let setting = match netfilter {
            Some(netfilter) if !netfilter.loaded => "br_netfilter is not loaded on this node".to_string(),
            Some(_) => format!("{sysctl} is 0 here (and {bridge_name}'s own {option} is off)"),
            None => "the node's br_netfilter setting could not be read (see the warnings)".to_string(),
        };
        let flows = if group.flows == 1 { "1 flow".to_string() } else { format!("{} flows", group.flows) };
        let (modprobe, family_switch) = ("modprobe br_netfilter", format!("sysctl -w {sysctl}=1"));
        Finding {
            kind: FindingKind::BrNetfilterOff,
            severity: Severity::Error,
            hop: bridge.map(|bridge| bridge.ifname.clone()),
            summary: format!(
                "Replies to {pod}'s {proto} flows to the Service {service}:{service_port} came from the backend {backend}:{backend_port} itself, not from the Service ({} packets on {flows}): the backend is behind {bridge_name} with the pod, so {bridge_name} forwarded its replies from port to port, and {setting}, so they bypassed iptables, where conntrack undoes the Service's DNAT. The pod has no socket for them and discards them{}.",
                group.replies,
                if proto == "tcp" { " (TCP answers each with a RST)" } else { "" }
            ),
            evidence: json!({
                "pod": pod,
                "service": format!("{service}:{service_port}"),
                "backend": format!("{backend}:{backend_port}"),
                "proto": proto,
                "flows": group.flows,
                "untranslated_replies": group.replies,
                "bridge": bridge.map(|bridge| &bridge.ifname),
                "br_netfilter_loaded": netfilter.map(|netfilter| netfilter.loaded),
                "sysctl": sysctl,
                "sysctl_value": netfilter.map(|netfilter| netfilter.sysctl_value(pod)),
                "bridge_option": option,
                "bridge_option_value": netfilter.map(|netfilter| netfilter.bridge_option(pod)),
            }),
            advice: format!(
                "Load br_netfilter and let bridged traffic through iptables, as kube-proxy requires: {modprobe} and {family_switch} on this node, persisted in /etc/modules-load.d/ and /etc/sysctl.d/."
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use tracer_common::IPPROTO_TCP;

    use super::{super::testing::*, *};
    use crate::{
        Direction,
        events::decode::{Layer, TCP_SYN},
        node::{bridge::FamilySwitch, path::fixtures::local_path},
    };

    /// br_netfilter loaded, with every switch off.
    fn all_off() -> BridgeNetfilter {
        BridgeNetfilter::new(Some(FamilySwitch::default()), FamilySwitch::default())
    }

    const SERVICE: &str = "10.96.0.20";
    const BACKEND: &str = "10.244.0.3";

    fn path_with(netfilter: Option<BridgeNetfilter>) -> Path {
        let mut path = local_path();
        path.stages[1].hops[0].bridge_netfilter = netfilter;
        path
    }

    /// Pod A's SYN from `sport` to the Service, DNATed to the backend as the node routes it
    /// back out cni0, and the backend's SYN-ACK, bridged straight to pod A's veth.
    fn connect(detector: &mut BrNetfilterOff<'_>, feed: &mut ServiceFeed<'_>, sport: u16, reply_from: &str, start_ns: u64) {
        let syn = Layer { ip_id: sport, ..tcp(POD, sport, SERVICE, 80, TCP_SYN, 0) };
        let reply_port = if reply_from == BACKEND { 8080 } else { 80 };
        let syn_ack = Layer { ip_id: sport + 1000, ..tcp(reply_from, reply_port, POD, sport, TCP_SYN | 0x10, 0) };
        for packet in [
            packet(syn.clone(), 5, Direction::Ingress, start_ns),
            packet(syn.clone(), 4, Direction::Ingress, start_ns + 1000),
            packet(Layer { dst: ip(BACKEND), dport: 8080, ..syn }, 4, Direction::Egress, start_ns + 2000),
            packet(syn_ack, 5, Direction::Egress, start_ns + 3000),
        ] {
            feed_packet(detector, feed, &packet);
        }
    }

    fn feed_packet(detector: &mut BrNetfilterOff<'_>, feed: &mut ServiceFeed<'_>, packet: &Packet) {
        let (sighting, _) = feed.observe(packet);
        detector.observe_packet(packet, sighting.as_ref(), &feed.services);
    }

    #[test]
    fn replies_straight_from_the_backend_with_br_netfilter_off_are_named() {
        let path = path_with(Some(all_off()));
        let mut detector = BrNetfilterOff::new(&path);
        let mut feed = ServiceFeed::new(&path);
        connect(&mut detector, &mut feed, 40000, BACKEND, 0);
        connect(&mut detector, &mut feed, 40001, BACKEND, 10_000);
        let findings = End::default().findings(&detector, &path);
        assert_eq!(findings.len(), 1, "{findings:#?}");
        let finding = &findings[0];
        assert_eq!((finding.kind, finding.severity, finding.hop.as_deref()), (FindingKind::BrNetfilterOff, Severity::Error, Some("cni0")));
        assert_eq!((&finding.evidence["service"], &finding.evidence["backend"]), (&json!("10.96.0.20:80"), &json!("10.244.0.3:8080")));
        assert_eq!((&finding.evidence["flows"], &finding.evidence["untranslated_replies"]), (&json!(2), &json!(2)));
        assert_eq!(
            (&finding.evidence["sysctl"], &finding.evidence["sysctl_value"]),
            (&json!("net.bridge.bridge-nf-call-iptables"), &json!("0"))
        );
        assert!(
            finding.summary.starts_with(
                "Replies to 10.244.0.2's tcp flows to the Service 10.96.0.20:80 came from the backend 10.244.0.3:8080 itself, not from the Service (2 packets on 2 flows)"
            ),
            "{}",
            finding.summary
        );
        assert!(finding.summary.contains("net.bridge.bridge-nf-call-iptables is 0 here"), "{}", finding.summary);
        assert!(finding.advice.contains("modprobe br_netfilter") && finding.advice.contains("net.bridge.bridge-nf-call-iptables=1"));
        let explained = detector.explained();
        assert!(explained.covers(IPPROTO_TCP, (ip(POD), 40000), (ip(BACKEND), 8080)));
        assert!(explained.covers(IPPROTO_TCP, (ip(BACKEND), 8080), (ip(POD), 40001)));
    }

    #[test]
    fn without_the_module_or_an_unreadable_setting_the_finding_says_so() {
        let not_loaded = BridgeNetfilter::new(None, FamilySwitch::default());
        for (netfilter, says) in
            [(Some(not_loaded), "br_netfilter is not loaded on this node"), (None, "the node's br_netfilter setting could not be read")]
        {
            let path = path_with(netfilter);
            let mut detector = BrNetfilterOff::new(&path);
            connect(&mut detector, &mut ServiceFeed::new(&path), 40000, BACKEND, 0);
            let findings = End::default().findings(&detector, &path);
            assert_eq!(findings.len(), 1, "{findings:#?}");
            assert!(findings[0].summary.contains(says), "{}", findings[0].summary);
        }
    }

    /// Replies from the Service's address (conntrack undid the DNAT, as for a backend on
    /// another node) are healthy; with the bridge passing packets through iptables, replies
    /// from the backend have another cause, which this finding does not claim.
    #[test]
    fn translated_replies_or_br_netfilter_on_are_quiet() {
        let path = path_with(Some(all_off()));
        let mut detector = BrNetfilterOff::new(&path);
        connect(&mut detector, &mut ServiceFeed::new(&path), 40000, SERVICE, 0);
        assert!(End::default().findings(&detector, &path).is_empty());

        let on = BridgeNetfilter::new(Some(FamilySwitch { ipv4: true, ipv6: true }), FamilySwitch::default());
        let bridge_option_on = BridgeNetfilter::new(Some(FamilySwitch::default()), FamilySwitch { ipv4: true, ipv6: false });
        for netfilter in [on, bridge_option_on] {
            let path = path_with(Some(netfilter));
            let mut detector = BrNetfilterOff::new(&path);
            connect(&mut detector, &mut ServiceFeed::new(&path), 40000, BACKEND, 0);
            assert!(End::default().findings(&detector, &path).is_empty());
            assert_eq!(detector.explained(), Explained::default());
        }
    }

    /// A reply from the backend to a flow that was never seen DNATed (the pod talking to the
    /// backend directly) is an ordinary reply.
    #[test]
    fn a_reply_to_an_untranslated_flow_is_ordinary() {
        let path = path_with(Some(all_off()));
        let mut detector = BrNetfilterOff::new(&path);
        let mut feed = ServiceFeed::new(&path);
        feed_packet(&mut detector, &mut feed, &packet(tcp(POD, 40000, BACKEND, 8080, TCP_SYN, 0), 5, Direction::Ingress, 0));
        feed_packet(&mut detector, &mut feed, &packet(tcp(BACKEND, 8080, POD, 40000, TCP_SYN | 0x10, 0), 5, Direction::Egress, 1000));
        assert!(End::default().findings(&detector, &path).is_empty());
    }
}
