//! `vxlan-source-mismatch`: VXLAN packets leave with an outer source that is not this node's
//! tunnel endpoint (what peers send to, or `--node-ip`), or the underlay holds several IPv4
//! addresses in the tunnel subnet (a static address plus a DHCP one).

use std::{collections::BTreeMap, net::IpAddr};

use serde_json::json;

use super::{Detector, Finding, FindingKind, MAX_GROUPS, Severity, TraceEnd};
use crate::{
    Direction,
    events::{correlate::Sighting, decode::Packet},
    node::{Hop, HopKind, Path},
};

pub struct VxlanSourceMismatch<'a> {
    path: &'a Path,
    /// `--node-ip`, when given.
    node_ip: Option<IpAddr>,
    /// Outer source addresses of VXLAN packets this node sent, and how many.
    out_sources: BTreeMap<IpAddr, u64>,
    /// Outer destination addresses of VXLAN packets peers sent here, and how many.
    in_destinations: BTreeMap<IpAddr, u64>,
}

impl<'a> VxlanSourceMismatch<'a> {
    pub fn new(path: &'a Path, node_ip: Option<IpAddr>) -> Self {
        Self { path, node_ip, out_sources: BTreeMap::new(), in_destinations: BTreeMap::new() }
    }

    fn underlays(&self) -> Vec<&'a Hop> {
        self.path.hops().filter(|h| matches!(h.kind, HopKind::Nic | HopKind::Bond)).collect()
    }

    /// Traffic: packets sent from another address than the one peers send to.
    fn source_findings(&self) -> Vec<Finding> {
        let underlays = self.underlays();
        self.out_sources
            .iter()
            .filter_map(|(source, count)| Some((source, count, self.endpoint_for(source)?)))
            .filter(|(source, _, endpoint)| *source != endpoint)
            .map(|(source, count, endpoint)| {
                let nic = underlays.iter().find(|h| h.addresses.iter().any(|(ip, _)| ip == source)).or(underlays.first());
                Finding {
                    kind: FindingKind::VxlanSourceMismatch,
                    severity: Severity::Error,
                    hop: nic.map(|h| h.ifname.clone()),
                    summary: format!(
                        "{count} VXLAN packets left with outer source {source}, but this node's tunnel endpoint is {endpoint}{}: peers answer to {endpoint}, so replies miss the tunnel socket or never come back.",
                        if self.node_ip.is_some() { " (--node-ip)" } else { " (where peers send to)" }
                    ),
                    evidence: json!({
                        "outer_source": source, "packets": count, "endpoint": endpoint,
                        "inbound_destinations": self.in_destinations,
                        "vxlan_local": self.path.hops().find_map(|h| h.vxlan_local),
                        "interface": nic.map(|h| h.ifname.clone()),
                    }),
                    advice: format!(
                        "Bind the VXLAN device to {endpoint} (flannel: --iface / --public-ip), or remove the extra address {source} from the NIC."
                    ),
                }
            })
            .collect()
    }

    /// This node's tunnel endpoint in `source`'s address family: `--node-ip`, or where peers
    /// send that family's VXLAN packets. A dual-stack node has one of each (flannel.1 over
    /// IPv4, flannel-v6.1 over IPv6), and neither is a mismatch of the other.
    fn endpoint_for(&self, source: &IpAddr) -> Option<IpAddr> {
        let same_family = |ip: &IpAddr| ip.is_ipv4() == source.is_ipv4();
        self.node_ip
            .filter(same_family)
            .or_else(|| self.in_destinations.iter().filter(|(ip, _)| same_family(ip)).max_by_key(|(_, count)| **count).map(|(ip, _)| *ip))
    }

    /// Configuration: an underlay with two IPv4 addresses in one subnet.
    fn address_findings(&self) -> Vec<Finding> {
        let mut findings = Vec::new();
        for nic in self.underlays() {
            let v4: Vec<_> = nic.addresses.iter().filter(|(ip, _)| ip.is_ipv4()).collect();
            let mut same_subnet = Vec::new();
            for (i, (a, len)) in v4.iter().enumerate() {
                for (b, _) in v4.iter().skip(i + 1) {
                    if same_prefix(*a, *b, *len) {
                        same_subnet.push(format!("{a}/{len} and {b}"));
                    }
                }
            }
            if same_subnet.is_empty() {
                continue;
            }
            findings.push(Finding {
                kind: FindingKind::VxlanSourceMismatch,
                severity: Severity::Warning,
                hop: Some(nic.ifname.clone()),
                summary: format!(
                    "{} holds several IPv4 addresses in the tunnel subnet ({}): the tunnel may use one while peers send to the other (a static address plus a DHCP one).",
                    nic.ifname,
                    same_subnet.join("; ")
                ),
                evidence: json!({
                    "interface": nic.ifname,
                    "addresses": v4.iter().map(|(ip, len)| format!("{ip}/{len}")).collect::<Vec<_>>(),
                    "vxlan_local": self.path.hops().find_map(|h| h.vxlan_local),
                }),
                advice: "Keep one address per node in the tunnel subnet (disable the DHCP lease or the static one), and bind the tunnel to it.".into(),
            });
        }
        findings
    }
}

impl Detector for VxlanSourceMismatch<'_> {
    /// Outer addresses of VXLAN packets on the underlay: what this node sends from, and what
    /// its peers send to.
    fn observe_packet(&mut self, packet: &Packet, _sighting: Option<&Sighting>) {
        if packet.vni.is_none() {
            return;
        }
        let (map, address) = match packet.direction {
            Direction::Egress => (&mut self.out_sources, packet.outer.src),
            Direction::Ingress => (&mut self.in_destinations, packet.outer.dst),
        };
        if map.len() < MAX_GROUPS || map.contains_key(&address) {
            *map.entry(address).or_default() += 1;
        }
    }

    fn findings(&self, _end: &TraceEnd<'_>) -> Vec<Finding> {
        let mut findings = self.source_findings();
        findings.extend(self.address_findings());
        findings
    }
}

fn same_prefix(a: IpAddr, b: IpAddr, len: u8) -> bool {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => {
            let mask = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len.min(32))) };
            u32::from(a) & mask == u32::from(b) & mask
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::{super::testing::*, *};
    use crate::node::path::fixtures::local_path;

    fn traffic(detector: &mut VxlanSourceMismatch<'_>, path: &Path, source: &str) {
        let mut feed = Feed::new(path);
        for seq in 1..=3 {
            feed.packet(detector, &vxlan(echo(POD, PEER, 8, seq), source, "10.99.0.2", 2, Direction::Egress));
            feed.packet(detector, &vxlan(echo(PEER, POD, 0, seq), "10.99.0.2", "10.99.0.1", 2, Direction::Ingress));
        }
    }

    #[test]
    fn packets_from_another_address_than_peers_send_to() {
        let mut path = local_path();
        path.stages[3].hops[0].addresses.push((ip("10.99.0.11"), 24));
        let mut detector = VxlanSourceMismatch::new(&path, None);
        traffic(&mut detector, &path, "10.99.0.11");
        let findings = End::default().findings(&detector, &path);
        let traffic = findings.iter().find(|f| f.evidence["outer_source"] == "10.99.0.11").expect("a traffic finding");
        assert_eq!((traffic.severity, traffic.hop.as_deref()), (Severity::Error, Some("eth0")));
        assert_eq!(traffic.evidence["endpoint"], "10.99.0.1");
        assert_eq!(traffic.evidence["packets"], 3);
        assert_eq!(traffic.evidence["inbound_destinations"]["10.99.0.1"], 3);
        let addresses = findings.iter().find(|f| f.evidence["addresses"].is_array()).expect("an address finding");
        assert_eq!(addresses.severity, Severity::Warning);
        assert_eq!(addresses.evidence["addresses"], serde_json::json!(["10.99.0.1/24", "10.99.0.11/24"]));
    }

    #[test]
    fn packets_from_the_endpoint_are_quiet() {
        let path = local_path();
        let mut detector = VxlanSourceMismatch::new(&path, None);
        traffic(&mut detector, &path, "10.99.0.1");
        assert!(End::default().findings(&detector, &path).is_empty());
    }

    #[test]
    fn node_ip_overrides_what_peers_send_to() {
        let path = local_path();
        let mut detector = VxlanSourceMismatch::new(&path, Some(ip("10.99.0.5")));
        traffic(&mut detector, &path, "10.99.0.1");
        let findings = End::default().findings(&detector, &path);
        assert_eq!(findings.len(), 1);
        assert_eq!(findings[0].evidence["endpoint"], "10.99.0.5");
        assert!(findings[0].summary.contains("(--node-ip)"));
    }

    /// A pod followed by both its addresses: flannel.1 sends from the node's IPv4 address,
    /// flannel-v6.1 from its IPv6 one; each is its own family's endpoint.
    #[test]
    fn each_address_family_has_its_own_endpoint() {
        let path = local_path();
        let mut detector = VxlanSourceMismatch::new(&path, None);
        traffic(&mut detector, &path, "10.99.0.1");
        let mut feed = Feed::new(&path);
        for seq in 1..=3 {
            feed.packet(&mut detector, &vxlan(echo(POD, PEER, 8, seq), "fd00:99::1", "fd00:99::2", 2, Direction::Egress));
            feed.packet(&mut detector, &vxlan(echo(PEER, POD, 0, seq), "fd00:99::2", "fd00:99::1", 2, Direction::Ingress));
        }
        assert!(End::default().findings(&detector, &path).is_empty());
        // An IPv6 source that is not where IPv6 peers send to still is a mismatch.
        let mut feed = Feed::new(&path);
        feed.packet(&mut detector, &vxlan(echo(POD, PEER, 8, 9), "fd00:99::7", "fd00:99::2", 2, Direction::Egress));
        let findings = End::default().findings(&detector, &path);
        assert_eq!(findings.len(), 1, "{findings:#?}");
        assert_eq!(
            (findings[0].evidence["outer_source"].as_str(), findings[0].evidence["endpoint"].as_str()),
            (Some("fd00:99::7"), Some("fd00:99::1"))
        );
    }

    #[test]
    fn two_addresses_in_different_subnets_are_fine() {
        let mut path = local_path();
        path.stages[3].hops[0].addresses.push((ip("10.98.0.11"), 24));
        assert!(End::default().findings(&VxlanSourceMismatch::new(&path, None), &path).is_empty());
        assert!(same_prefix(ip("10.99.0.1"), ip("10.99.0.11"), 24));
        assert!(!same_prefix(ip("10.99.0.1"), ip("10.99.1.1"), 24));
        assert!(same_prefix(ip("10.99.0.1"), ip("10.99.1.1"), 16));
    }
}
