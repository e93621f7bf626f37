//! `hairpin-off`: a followed pod reached a Service that sent it back to the pod itself, and its
//! bridge dropped those packets as they came in on the pod's own port: a bridge sends a frame
//! back out the port it came in on only when that port is in hairpin mode. The evidence is the
//! kernel's drops of the pod's packets addressed to itself, received on its bridge port (a
//! packet the pod sends to its own address never leaves it, so only DNAT makes one), and the
//! port's hairpin mode, read at discovery, confirms it.

use std::{collections::BTreeMap, net::IpAddr};

use serde_json::json;
use tracer_common::{IPPROTO_TCP, IPPROTO_UDP};

use super::{
    Detector, Finding, FindingKind, LeftOut, MAX_GROUPS, Severity, TraceEnd,
    drop::{function_name, reason_name},
    services::{ClientFlow, Endpoint, Explained, ServiceDnat, ServiceFlows},
};
use crate::{
    events::decode::{KernelRecord, KernelRecordKind, proto_name},
    node::{Hop, Path},
};

/// A client flow whose packets DNAT sent back to the pod and the kernel dropped on its port.
#[derive(Clone, Copy, Debug)]
struct LoopedBack {
    /// Where the pod addressed the flow, once a packet entering the path showed it (the drop
    /// may come first: the two come through different rings).
    service: Option<Endpoint>,
    backend: Endpoint,
    drops: u64,
    /// The first drop's reason and location.
    reason: u32,
    location: u64,
}

/// Looped-back flows folded per pod, protocol, Service (when its address was seen) and backend.
#[derive(Default)]
struct Group {
    flows: usize,
    drops: u64,
    reason: u32,
    location: u64,
}

type GroupKey = (IpAddr, u8, Option<Endpoint>, Endpoint);

pub struct HairpinOff<'a> {
    path: &'a Path,
    own_netns: u32,
    looped: BTreeMap<ClientFlow, LoopedBack>,
    /// Drops of looped-back flows beyond the table's bound.
    left_out: u64,
}

impl<'a> HairpinOff<'a> {
    pub fn new(path: &'a Path, own_netns: u32) -> Self {
        Self { path, own_netns, looped: BTreeMap::new(), left_out: 0 }
    }

    /// The pod's bridge port, when it has hairpin mode off.
    fn port_without_hairpin(&self, pod: IpAddr) -> Option<&Hop> {
        self.path.hop(self.path.entry(pod).ifindex).filter(|hop| hop.hairpin == Some(false))
    }

    /// Looped-back flows whose pod's port has hairpin mode off: those the finding explains.
    fn confirmed(&self) -> impl Iterator<Item = (&ClientFlow, &LoopedBack)> {
        self.looped.iter().filter(|(flow, _)| self.port_without_hairpin(flow.pod).is_some())
    }

    /// The flows this detector's findings explain, with the Service each addressed.
    pub fn explained(&self) -> Explained {
        let mut explained = Explained::default();
        for (flow, looped) in self.confirmed() {
            explained.insert(*flow, ServiceDnat { service: looped.service.unwrap_or(looped.backend), backend: looped.backend });
        }
        explained
    }

    /// A flow a followed pod opened, addressed to `service` where it entered the path: names
    /// the Service of a looped-back flow whose drop came first.
    pub fn flow_opened(&mut self, flow: ClientFlow, service: Endpoint) {
        if let Some(looped) = self.looped.get_mut(&flow) {
            looped.service.get_or_insert(service);
        }
    }

    /// A kernel event, with the Service flows the packets so far showed.
    pub fn observe_kernel(&mut self, record: &KernelRecord, services: &ServiceFlows<'_>) {
        let KernelRecordKind::Drop { reason, location } = record.kind else { return };
        let layer = record.pod_layer();
        if !matches!(layer.proto, IPPROTO_TCP | IPPROTO_UDP) || layer.src != layer.dst || !self.path.follows(layer.src) {
            return;
        }
        // Received on the pod's own port of this node's bridge: the frame was to go back out
        // the port it came in on.
        let port = self.path.entry(layer.src);
        if record.netns != self.own_netns || !record.received || record.ifindex != port.ifindex {
            return;
        }
        let flow = ClientFlow { proto: layer.proto, pod: layer.src, port: layer.sport };
        if self.looped.len() >= MAX_GROUPS && !self.looped.contains_key(&flow) {
            self.left_out += 1;
            return;
        }
        let service = services.addressed(flow);
        self.looped.entry(flow).or_insert(LoopedBack { service, backend: (layer.dst, layer.dport), drops: 0, reason, location }).drops += 1;
    }
}

impl Detector for HairpinOff<'_> {
    fn left_out(&self) -> Vec<LeftOut> {
        vec![LeftOut { what: "drops of packets DNATed back to their pod (more such flows than the table holds)", count: self.left_out }]
    }

    fn findings(&self, end: &TraceEnd<'_>) -> Vec<Finding> {
        let mut groups: BTreeMap<GroupKey, Group> = BTreeMap::new();
        for (flow, looped) in self.confirmed() {
            let key = (flow.pod, flow.proto, looped.service, looped.backend);
            let group = groups.entry(key).or_insert_with(|| Group { reason: looped.reason, location: looped.location, ..Group::default() });
            group.flows += 1;
            group.drops += looped.drops;
        }
        groups.into_iter().filter_map(|(key, group)| self.finding(key, &group, end)).collect()
    }
}

impl HairpinOff<'_> {
    fn finding(&self, (pod, proto, service, (backend, backend_port)): GroupKey, group: &Group, end: &TraceEnd<'_>) -> Option<Finding> {
        let port = self.port_without_hairpin(pod)?;
        let veth = &port.ifname;
        let proto = proto_name(proto);
        let (reason, function) = (reason_name(group.reason, end), function_name(group.location, end));
        let reached = match service {
            Some((ip, service_port)) => {
                format!("{pod} reached the Service {ip}:{service_port}/{proto}, which sent it to {backend}:{backend_port}, the pod itself")
            }
            None => format!("{pod}'s packets were DNATed to {backend}:{backend_port}/{proto}, the pod itself"),
        };
        let flows = if group.flows == 1 { "1 flow".to_string() } else { format!("{} flows", group.flows) };
        Some(Finding {
            kind: FindingKind::HairpinOff,
            severity: Severity::Error,
            hop: Some(veth.clone()),
            summary: format!(
                "{reached}: {} packets of {flows} were dropped as its bridge port {veth} received them ({reason} in {function}). A bridge sends a frame back out the port it came in on only in hairpin mode, and {veth} has hairpin mode off.",
                group.drops
            ),
            evidence: json!({
                "pod": pod,
                "service": service.map(|(ip, port)| format!("{ip}:{port}")),
                "backend": format!("{backend}:{backend_port}"),
                "proto": proto,
                "flows": group.flows,
                "drops": group.drops,
                "reason": reason,
                "function": function,
                "bridge_port": veth,
                "hairpin": "off",
            }),
            advice: format!(
                "Turn hairpin mode on for the pod's bridge port (bridge link set dev {veth} hairpin on); for every pod, set \"hairpinMode\": true in the CNI bridge plugin's configuration (kubenet: kubelet --hairpin-mode=hairpin-veth)."
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::{super::testing::*, *};
    use crate::{
        Direction,
        events::decode::{Layer, Packet, TCP_SYN},
        node::path::fixtures::local_path,
    };

    const NODE_NS: u32 = 4026531840;
    const SERVICE: &str = "10.96.0.21";
    const NOT_SPECIFIED: u32 = 2;

    /// The local path with pod A's port (veth1) in hairpin mode `hairpin`.
    fn path_with_hairpin(hairpin: Option<bool>) -> Path {
        let mut path = local_path();
        path.stages[0].hops[0].hairpin = hairpin;
        path
    }

    fn end() -> End {
        End { drop_reasons: HashMap::from([(i64::from(NOT_SPECIFIED), "NOT_SPECIFIED".into())]), ..Default::default() }
    }

    /// Pod A's SYN from `sport` to the Service, seen at its veth, then dropped there DNATed to
    /// itself, `drops` times (the SYN and its retransmissions).
    fn looped_syn(detector: &mut HairpinOff<'_>, feed: &mut ServiceFeed<'_>, sport: u16, drops: u16) {
        for attempt in 0..drops {
            let syn = Layer { ip_id: sport.wrapping_add(attempt), ..tcp(POD, sport, SERVICE, 80, TCP_SYN, 0) };
            feed_packet(detector, feed, &packet(syn.clone(), 5, Direction::Ingress, u64::from(attempt) * 1000));
            let dnated = Layer { dst: ip(POD), dport: 8080, ..syn };
            detector.observe_kernel(
                &kernel(KernelRecordKind::Drop { reason: NOT_SPECIFIED, location: 0x10 }, dnated, 5, true, NODE_NS),
                &feed.services,
            );
        }
    }

    fn feed_packet(detector: &mut HairpinOff<'_>, feed: &mut ServiceFeed<'_>, packet: &Packet) {
        if let (_, Some((flow, service))) = feed.observe(packet) {
            detector.flow_opened(flow, service);
        }
    }

    #[test]
    fn packets_dnated_back_to_the_pod_and_dropped_on_its_port_without_hairpin_are_named() {
        let path = path_with_hairpin(Some(false));
        let mut detector = HairpinOff::new(&path, NODE_NS);
        let mut feed = ServiceFeed::new(&path);
        looped_syn(&mut detector, &mut feed, 40000, 2);
        looped_syn(&mut detector, &mut feed, 40001, 1);
        let findings = end().findings(&detector, &path);
        assert_eq!(findings.len(), 1, "{findings:#?}");
        let finding = &findings[0];
        assert_eq!((finding.kind, finding.severity, finding.hop.as_deref()), (FindingKind::HairpinOff, Severity::Error, Some("veth1")));
        assert_eq!(finding.evidence["service"], "10.96.0.21:80");
        assert_eq!(finding.evidence["backend"], "10.244.0.2:8080");
        assert_eq!((&finding.evidence["flows"], &finding.evidence["drops"]), (&json!(2), &json!(3)));
        assert_eq!(finding.evidence["reason"], "NOT_SPECIFIED");
        assert!(
            finding.summary.starts_with("10.244.0.2 reached the Service 10.96.0.21:80/tcp, which sent it to 10.244.0.2:8080, the pod itself: 3 packets of 2 flows were dropped as its bridge port veth1 received them"),
            "{}",
            finding.summary
        );
        assert!(finding.summary.ends_with("and veth1 has hairpin mode off."), "{}", finding.summary);
        assert!(
            finding.advice.contains("bridge link set dev veth1 hairpin on") && finding.advice.contains("hairpinMode"),
            "{}",
            finding.advice
        );
        let explained = detector.explained();
        assert!(explained.covers(IPPROTO_TCP, (ip(POD), 40000), (ip(SERVICE), 80)));
        assert!(explained.covers(IPPROTO_TCP, (ip(POD), 40001), (ip(POD), 8080)));
    }

    /// With hairpin mode on (or no bridge port at all), such drops are something else: no
    /// finding, and nothing explained.
    #[test]
    fn a_port_with_hairpin_on_or_no_bridge_port_is_quiet() {
        for hairpin in [Some(true), None] {
            let path = path_with_hairpin(hairpin);
            let mut detector = HairpinOff::new(&path, NODE_NS);
            looped_syn(&mut detector, &mut ServiceFeed::new(&path), 40000, 2);
            assert!(end().findings(&detector, &path).is_empty(), "hairpin {hairpin:?}");
            assert_eq!(detector.explained(), Explained::default());
        }
    }

    /// Drops of packets that are not the pod's own looped back: to another address, on
    /// another device or namespace, or sent rather than received.
    #[test]
    fn other_drops_are_no_hairpin() {
        let path = path_with_hairpin(Some(false));
        let mut detector = HairpinOff::new(&path, NODE_NS);
        let drop = |layer: Layer, ifindex, received, netns| {
            kernel(KernelRecordKind::Drop { reason: NOT_SPECIFIED, location: 0x10 }, layer, ifindex, received, netns)
        };
        let looped = tcp(POD, 40000, POD, 8080, TCP_SYN, 0);
        for record in [
            drop(tcp(POD, 40000, PEER, 8080, TCP_SYN, 0), 5, true, NODE_NS),
            drop(looped.clone(), 4, true, NODE_NS),
            drop(looped.clone(), 5, true, NODE_NS + 1),
            drop(looped.clone(), 5, false, NODE_NS),
            drop(echo(POD, POD, 8, 1), 5, true, NODE_NS),
        ] {
            detector.observe_kernel(&record, &ServiceFlows::new(&path));
        }
        assert!(end().findings(&detector, &path).is_empty());
    }

    /// The drop can come before the packet that shows where it was addressed (two rings): the
    /// Service is still named. Without that packet, the finding names the backend alone.
    #[test]
    fn the_service_is_named_whatever_the_order_and_left_out_when_unseen() {
        let path = path_with_hairpin(Some(false));
        let mut detector = HairpinOff::new(&path, NODE_NS);
        let syn = tcp(POD, 40000, SERVICE, 80, TCP_SYN, 0);
        let mut feed = ServiceFeed::new(&path);
        detector.observe_kernel(
            &kernel(
                KernelRecordKind::Drop { reason: NOT_SPECIFIED, location: 0x10 },
                Layer { dst: ip(POD), dport: 8080, ..syn.clone() },
                5,
                true,
                NODE_NS,
            ),
            &feed.services,
        );
        assert_eq!(end().findings(&detector, &path)[0].evidence["service"], serde_json::Value::Null);
        assert!(
            end().findings(&detector, &path)[0]
                .summary
                .starts_with("10.244.0.2's packets were DNATed to 10.244.0.2:8080/tcp, the pod itself")
        );
        feed_packet(&mut detector, &mut feed, &packet(syn, 5, Direction::Ingress, 0));
        assert_eq!(end().findings(&detector, &path)[0].evidence["service"], "10.96.0.21:80");
    }
}
