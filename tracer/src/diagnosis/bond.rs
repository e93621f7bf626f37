//! Bonds, as the bond reports its state at the end of the trace and as the traced packets
//! crossed its slaves:
//! - `bond-degraded`: a slave is down, has link failures, or has no LACP partner in 802.3ad
//!   mode;
//! - `bond-misconfigured`: the mistakes the NNCP bond recipe and the NodeBondDegraded runbook
//!   list, named by `problem` in the evidence: an address on a slave, no link monitoring,
//!   802.3ad slaves in different aggregators, a hash policy that put every traced flow on one
//!   slave, and the reordering balance-rr causes.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
};

use serde_json::{Value, json};
use tracer_common::IPPROTO_TCP;

use super::{Detector, Finding, FindingKind, FlowMap, MAX_GROUPS, Severity, TCP_ACK, TraceEnd};
use crate::{
    events::{
        correlate::Sighting,
        decode::{KernelRecord, KernelRecordKind, Layer, Packet, TCP_FIN, TCP_RST, TCP_SYN},
    },
    node::{
        Hop, HopKind, Path,
        bond::{BondState, SlaveState},
    },
};

/// The outer headers a bond hashes to choose a slave: addresses, protocol and ports.
type OuterFlow = (IpAddr, IpAddr, u8, u16, u16);
/// A TCP flow as its sender on this node sees it: (source, source port, destination, destination port).
type TcpFlowKey = (IpAddr, u16, IpAddr, u16);

/// Fewer flows than this on one slave could be a hash's chance; with this many, a hash over
/// ports would have put them all on one of two slaves only one time in eight.
const MIN_FLOWS_TO_JUDGE_HASH: usize = 4;

/// What left through one slave.
#[derive(Debug, Default)]
struct SlaveTraffic {
    packets: u64,
    flows: HashSet<OuterFlow>,
}

/// A TCP flow sent through a bond: the slaves its segments left through, and the signs of
/// reordering at its receiver.
#[derive(Debug, Default)]
struct TcpFlowOverBond {
    slaves: BTreeSet<u32>,
    retransmits: u64,
    duplicate_acks: u64,
    /// The acknowledgement number of the receiver's last pure ACK.
    last_pure_ack: Option<u32>,
}

pub struct Bonds<'a> {
    path: &'a Path,
    /// Per slave ifindex: what the pod's side sent through it.
    slaves_out: HashMap<u32, SlaveTraffic>,
    tcp_flows: FlowMap<TcpFlowKey, TcpFlowOverBond>,
}

impl<'a> Bonds<'a> {
    pub fn new(path: &'a Path) -> Self {
        Self { path, slaves_out: HashMap::new(), tcp_flows: FlowMap::default() }
    }

    fn tcp_flow(&mut self, key: TcpFlowKey) -> Option<&mut TcpFlowOverBond> {
        if !self.tcp_flows.contains_key(&key) && self.tcp_flows.len() >= MAX_GROUPS {
            return None;
        }
        Some(self.tcp_flows.entry(key).or_default())
    }

    /// A segment of the pod's side left through a slave.
    fn sent_through_slave(&mut self, ifindex: u32, packet: &Packet) {
        let traffic = self.slaves_out.entry(ifindex).or_default();
        traffic.packets += 1;
        let outer = &packet.outer;
        if traffic.flows.len() < MAX_GROUPS {
            traffic.flows.insert((outer.src, outer.dst, outer.proto, outer.sport, outer.dport));
        }
        let layer = packet.pod_layer();
        if layer.proto == IPPROTO_TCP
            && let Some(flow) = self.tcp_flow((layer.src, layer.sport, layer.dst, layer.dport))
        {
            flow.slaves.insert(ifindex);
        }
    }

    /// A packet came back through the bond: a pure ACK repeating the last one is a duplicate
    /// ACK, the receiver's answer to a segment that arrived out of order (or not at all).
    fn came_back_through_bond(&mut self, layer: &Layer) {
        let pure_ack = layer.proto == IPPROTO_TCP
            && layer.tcp_flags & TCP_ACK != 0
            && layer.tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST) == 0
            && layer.payload_len() == 0;
        if !pure_ack {
            return;
        }
        if let Some(flow) = self.tcp_flow((layer.dst, layer.dport, layer.src, layer.sport)) {
            if flow.last_pure_ack == Some(layer.tcp_ack) {
                flow.duplicate_acks += 1;
            }
            flow.last_pure_ack = Some(layer.tcp_ack);
        }
    }
}

impl Detector for Bonds<'_> {
    fn observe_packet(&mut self, packet: &Packet, _sighting: Option<&Sighting>) {
        let Some(hop) = self.path.hop(packet.ifindex) else { return };
        match hop.kind {
            HopKind::BondSlave if packet.direction == hop.from_pod => self.sent_through_slave(hop.ifindex, packet),
            HopKind::Bond if packet.direction == hop.from_pod.opposite() => self.came_back_through_bond(packet.pod_layer()),
            _ => {}
        }
    }

    fn observe_kernel(&mut self, record: &KernelRecord) {
        if let KernelRecordKind::Retransmit { .. } = record.kind {
            let layer = record.pod_layer();
            if let Some(flow) = self.tcp_flow((layer.src, layer.sport, layer.dst, layer.dport)) {
                flow.retransmits += 1;
            }
        }
    }

    fn findings(&self, end: &TraceEnd<'_>) -> Vec<Finding> {
        let path = end.final_path;
        let slaves: Vec<(&Hop, &SlaveState)> = path.hops().filter_map(|hop| Some((hop, hop.slave.as_ref()?))).collect();
        let mut findings: Vec<Finding> = slaves.iter().filter_map(|(hop, slave)| degraded(path, hop, slave)).collect();
        findings.extend(slaves.iter().filter_map(|(hop, slave)| address_on_slave(path, hop, slave)));
        for (bond_hop, bond) in path.hops().filter_map(|hop| Some((hop, hop.bond.as_ref()?))) {
            let its_slaves: Vec<(&Hop, &SlaveState)> = slaves.iter().copied().filter(|(_, slave)| slave.bond == bond_hop.ifname).collect();
            findings.extend(no_link_monitoring(bond_hop, bond));
            findings.extend(lacp_not_aggregating(bond_hop, bond, &its_slaves));
            findings.extend(self.hash_on_one_slave(bond_hop, bond, &its_slaves));
            findings.extend(self.round_robin_reordering(bond_hop, bond, &its_slaves));
        }
        findings
    }
}

fn degraded(path: &Path, hop: &Hop, slave: &SlaveState) -> Option<Finding> {
    let mut problems = Vec::new();
    if !slave.mii_up {
        problems.push("its MII status is down".to_string());
    }
    if slave.link_failures > 0 {
        problems.push(format!("it has {} link failures", slave.link_failures));
    }
    if slave.lacp_partner_in_sync == Some(false) {
        problems.push("it has no LACP partner in sync (802.3ad)".to_string());
    }
    if problems.is_empty() {
        return None;
    }
    let bond = path.hops().find(|h| h.ifname == slave.bond).and_then(|h| h.bond.clone());
    Some(Finding {
        kind: FindingKind::BondDegraded,
        severity: if slave.mii_up { Severity::Warning } else { Severity::Error },
        hop: Some(hop.ifname.clone()),
        summary: format!("Bond {} is degraded: slave {} {}.", slave.bond, hop.ifname, problems.join(", ")),
        evidence: json!({
            "bond": slave.bond,
            "slave": hop.ifname,
            "mii_up": slave.mii_up,
            "link_failures": slave.link_failures,
            "lacp_partner_in_sync": slave.lacp_partner_in_sync,
            "mode": bond.as_ref().map(|b| b.mode.clone()),
            "active_slave": bond.and_then(|b| b.active_slave),
        }),
        advice: format!(
            "Check the cable and the switch port of {}, and the bond's view in /proc/net/bonding/{}; in 802.3ad mode the switch ports must be in one LACP port-channel.",
            hop.ifname, slave.bond
        ),
    })
}

/// A `bond-misconfigured` finding; `problem` and `bond` lead its evidence.
fn misconfigured(problem: &str, bond: &str, hop: &str, severity: Severity, summary: String, evidence: Value, advice: String) -> Finding {
    let mut all = json!({ "problem": problem, "bond": bond });
    if let (Some(all), Value::Object(more)) = (all.as_object_mut(), evidence) {
        all.extend(more);
    }
    Finding { kind: FindingKind::BondMisconfigured, severity, hop: Some(hop.to_string()), summary, evidence: all, advice }
}

/// An address on a slave: the bond receives everything its slaves receive, so the address is
/// never answered through the slave, and routes through the slave bypass the bond.
fn address_on_slave(path: &Path, hop: &Hop, slave: &SlaveState) -> Option<Finding> {
    // An IPv6 link-local address is the kernel's own and harmless.
    let addresses: Vec<String> = hop
        .addresses
        .iter()
        .filter(|(ip, _)| !matches!(ip, IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80))
        .map(|(ip, len)| format!("{ip}/{len}"))
        .collect();
    if addresses.is_empty() {
        return None;
    }
    let bond_addresses: Vec<String> = path
        .hops()
        .find(|h| h.ifname == slave.bond)
        .map(|h| h.addresses.iter().map(|(ip, len)| format!("{ip}/{len}")).collect())
        .unwrap_or_default();
    let list = addresses.join(", ");
    Some(misconfigured(
        "slave-address",
        &slave.bond,
        &hop.ifname,
        Severity::Error,
        format!(
            "Slave {} of bond {} holds an IP address ({list}): addresses belong on the bond only. Traffic for it arrives as the bond's and its routes bypass the bond, so it has no connectivity (the runbook's \"bond created but no connectivity\").",
            hop.ifname, slave.bond
        ),
        json!({ "slave": hop.ifname, "slave_addresses": addresses, "bond_addresses": bond_addresses }),
        format!(
            "Remove the address from {slave_name} (ip addr del {first} dev {slave_name}) and configure it on {bond} only; in an NNCP policy, put the ipv4/ipv6 settings on the bond interface and set the ports' ipv4 and ipv6 to enabled: false.",
            slave_name = hop.ifname,
            first = addresses[0],
            bond = slave.bond
        ),
    ))
}

/// No MII and no ARP monitoring: the bond never learns that a slave's link failed and keeps
/// sending through it.
fn no_link_monitoring(hop: &Hop, bond: &BondState) -> Option<Finding> {
    if bond.miimon_ms != 0 || bond.arp_interval_ms != 0 {
        return None;
    }
    Some(misconfigured(
        "no-link-monitoring",
        &hop.ifname,
        &hop.ifname,
        Severity::Warning,
        format!(
            "Bond {} monitors no link: miimon is 0 and ARP monitoring is off (arp_interval 0), so a slave whose link fails stays in use and its traffic is lost unnoticed.",
            hop.ifname
        ),
        json!({ "mode": bond.mode, "miimon_ms": bond.miimon_ms, "arp_interval_ms": bond.arp_interval_ms }),
        format!(
            "Set miimon to 100 (ip link set {0} type bond miimon 100; in an NNCP policy, link-aggregation.options.miimon: 100), or configure ARP monitoring (arp_interval with arp_ip_target).",
            hop.ifname
        ),
    ))
}

/// 802.3ad slaves in different aggregators: the kernel aggregates ports only when their LACP
/// partners (switch system MAC and key) agree, and only the active aggregator carries traffic.
fn lacp_not_aggregating(hop: &Hop, bond: &BondState, slaves: &[(&Hop, &SlaveState)]) -> Option<Finding> {
    if bond.mode != "802.3ad" {
        return None;
    }
    let aggregators: BTreeMap<&str, u16> =
        slaves.iter().filter(|(_, slave)| slave.mii_up).filter_map(|(h, slave)| Some((h.ifname.as_str(), slave.aggregator?))).collect();
    if aggregators.values().collect::<BTreeSet<_>>().len() < 2 {
        return None;
    }
    let outside: Vec<&(&Hop, &SlaveState)> = slaves
        .iter()
        .filter(|(h, _)| bond.active_aggregator.is_some_and(|active| aggregators.get(h.ifname.as_str()) != Some(&active)))
        .collect();
    // A partner in sync on a port outside the active aggregator sends traffic there, which
    // the bond drops: that breaks flows now.
    let dropping = outside.iter().any(|(_, slave)| slave.lacp_partner_in_sync == Some(true));
    let per_slave: Vec<String> = aggregators.iter().map(|(name, id)| format!("{name} in {id}")).collect();
    let idle: Vec<&str> = outside.iter().map(|(h, _)| h.ifname.as_str()).collect();
    let active = bond.active_aggregator.map_or_else(|| "unknown".to_string(), |id| id.to_string());
    let consequence = if dropping {
        format!(
            "{} outside it carry nothing and drop what their LACP partner sends them",
            if idle.is_empty() { "the slaves".to_string() } else { idle.join(", ") }
        )
    } else {
        format!("{} outside it carry nothing", if idle.is_empty() { "the slaves".to_string() } else { idle.join(", ") })
    };
    let names: Vec<&str> = aggregators.keys().copied().collect();
    Some(misconfigured(
        "lacp-not-aggregating",
        &hop.ifname,
        &hop.ifname,
        if dropping { Severity::Error } else { Severity::Warning },
        format!(
            "802.3ad bond {} is not aggregating: its slaves are in different aggregators ({}; active aggregator {active}), because their LACP partners differ (switch system MAC or key) or one has none; {consequence}.",
            hop.ifname,
            per_slave.join(", ")
        ),
        json!({
            "mode": bond.mode,
            "active_aggregator": bond.active_aggregator,
            "lacp_partner_mac": bond.lacp_partner_mac,
            "slaves": slaves.iter().map(|(h, slave)| json!({
                "slave": h.ifname,
                "aggregator": slave.aggregator,
                "lacp_partner_in_sync": slave.lacp_partner_in_sync,
                "mii_up": slave.mii_up,
            })).collect::<Vec<_>>(),
        }),
        format!(
            "Configure the switch ports of {} as one LACP port-channel (one switch, or MLAG/vPC across two) with LACP active; in /proc/net/bonding/{} every slave must show the same Aggregator ID and the same partner system MAC address and oper key.",
            names.join(" and "),
            hop.ifname
        ),
    ))
}

impl Bonds<'_> {
    /// A hash over MAC addresses (and IP addresses) only: every flow to the same next hop (to
    /// one peer node, under VXLAN) takes the same slave, while a hash over ports would spread
    /// them.
    fn hash_on_one_slave(&self, hop: &Hop, bond: &BondState, slaves: &[(&Hop, &SlaveState)]) -> Option<Finding> {
        let hashing_mode = matches!(bond.mode.as_str(), "802.3ad" | "balance-xor");
        if !hashing_mode || !matches!(bond.xmit_hash_policy.as_str(), "layer2" | "layer2+3") {
            return None;
        }
        // The slaves the bond can choose from: up, and in 802.3ad in the active aggregator.
        let usable = |slave: &SlaveState| slave.mii_up && (bond.mode != "802.3ad" || slave.aggregator == bond.active_aggregator);
        if slaves.iter().filter(|(_, slave)| usable(slave)).count() < 2 {
            return None;
        }
        let counts: Vec<(&str, u64)> =
            slaves.iter().map(|(h, _)| (h.ifname.as_str(), self.slaves_out.get(&h.ifindex).map_or(0, |traffic| traffic.packets))).collect();
        let flows: HashSet<&OuterFlow> =
            slaves.iter().filter_map(|(h, _)| self.slaves_out.get(&h.ifindex)).flat_map(|traffic| &traffic.flows).collect();
        let used: Vec<&(&str, u64)> = counts.iter().filter(|(_, packets)| *packets > 0).collect();
        if used.len() != 1 || flows.len() < MIN_FLOWS_TO_JUDGE_HASH {
            return None;
        }
        let (busy, packets) = *used[0];
        let idle: Vec<&str> = counts.iter().filter(|(_, packets)| *packets == 0).map(|(name, _)| *name).collect();
        Some(misconfigured(
            "xmit-hash-one-slave",
            &hop.ifname,
            &hop.ifname,
            Severity::Warning,
            format!(
                "Bond {} ({}) hashes with xmit_hash_policy {}, which ignores ports: all {} traced flows ({packets} packets) left through {busy} and none through {}. layer3+4 hashes IP addresses and ports, so it would spread them across the slaves.",
                hop.ifname,
                bond.mode,
                bond.xmit_hash_policy,
                flows.len(),
                idle.join(", ")
            ),
            json!({
                "mode": bond.mode,
                "xmit_hash_policy": bond.xmit_hash_policy,
                "flows": flows.len(),
                "packets_per_slave": counts.iter().map(|(name, packets)| (name.to_string(), json!(packets))).collect::<serde_json::Map<_, _>>(),
            }),
            format!(
                "Set xmit_hash_policy layer3+4 (ip link set {0} type bond xmit_hash_policy layer3+4; in an NNCP policy, link-aggregation.options.xmit_hash_policy: layer3+4), and hash the switch's port-channel on addresses and ports too.",
                hop.ifname
            ),
        ))
    }

    /// balance-rr sends each flow's segments through the slaves in turn, so they arrive out
    /// of order, and TCP answers reordering with duplicate ACKs and fast retransmits: no loss
    /// and no MTU problem.
    fn round_robin_reordering(&self, hop: &Hop, bond: &BondState, slaves: &[(&Hop, &SlaveState)]) -> Option<Finding> {
        if bond.mode != "balance-rr" {
            return None;
        }
        let own: BTreeSet<u32> = slaves.iter().map(|(h, _)| h.ifindex).collect();
        let striped: Vec<(&TcpFlowKey, &TcpFlowOverBond)> =
            self.tcp_flows.iter().filter(|(_, flow)| flow.slaves.intersection(&own).count() >= 2).collect();
        let retransmits: u64 = striped.iter().map(|(_, flow)| flow.retransmits).sum();
        let duplicate_acks: u64 = striped.iter().map(|(_, flow)| flow.duplicate_acks).sum();
        if retransmits + duplicate_acks == 0 {
            return None;
        }
        let affected = striped.iter().filter(|(_, flow)| flow.retransmits + flow.duplicate_acks > 0).count();
        let slave_names: Vec<&str> = slaves.iter().map(|(h, _)| h.ifname.as_str()).collect();
        Some(misconfigured(
            "round-robin-reordering",
            &hop.ifname,
            &hop.ifname,
            Severity::Warning,
            format!(
                "Bond {} is in balance-rr mode and stripes each TCP flow across {}: {retransmits} retransmits and {duplicate_acks} duplicate ACKs on {affected} of the {} striped flows are round-robin reordering (the receiver gets the segments out of order), not loss and not an MTU problem.",
                hop.ifname,
                slave_names.join(" and "),
                striped.len()
            ),
            json!({
                "mode": bond.mode,
                "striped_flows": striped.len(),
                "retransmits": retransmits,
                "duplicate_acks": duplicate_acks,
            }),
            format!(
                "Use a mode that keeps each flow on one slave: 802.3ad with xmit_hash_policy layer3+4 (the switch ports in one LACP port-channel), balance-xor, or active-backup (ip link set {0} type bond mode …, with {0} down; in an NNCP policy, link-aggregation.mode).",
                hop.ifname
            ),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::{super::testing::*, *};
    use crate::{Direction, node::path::fixtures::bonded_path};

    fn with_slaves(eth0: SlaveState, eth1: SlaveState) -> Path {
        with_bond(
            BondState { mode: "active-backup".into(), active_slave: Some("eth1".into()), miimon_ms: 100, ..Default::default() },
            eth0,
            eth1,
        )
    }

    fn with_bond(bond: BondState, eth0: SlaveState, eth1: SlaveState) -> Path {
        let mut path = bonded_path();
        path.stages[3].hops[0].bond = Some(bond);
        path.stages[4].hops[0].slave = Some(eth0);
        path.stages[4].hops[1].slave = Some(eth1);
        path
    }

    fn healthy() -> SlaveState {
        SlaveState { bond: "bond0".into(), mii_up: true, link_failures: 0, lacp_partner_in_sync: None, aggregator: None }
    }

    fn lacp_slave(aggregator: u16, in_sync: bool) -> SlaveState {
        SlaveState { lacp_partner_in_sync: Some(in_sync), aggregator: Some(aggregator), ..healthy() }
    }

    fn hashing(mode: &str, policy: &str) -> BondState {
        BondState { mode: mode.into(), miimon_ms: 100, xmit_hash_policy: policy.into(), active_aggregator: Some(1), ..Default::default() }
    }

    fn findings(detector: &Bonds<'_>, path: &Path) -> Vec<Finding> {
        End::default().findings(detector, path)
    }

    fn problems(findings: &[Finding]) -> Vec<(&str, Severity, &str)> {
        findings
            .iter()
            .filter(|f| f.kind == FindingKind::BondMisconfigured)
            .map(|f| (f.evidence["problem"].as_str().unwrap(), f.severity, f.hop.as_deref().unwrap()))
            .collect()
    }

    /// `flows` UDP flows from the pod, VXLAN-encapsulated, each leaving through `ifindex`.
    fn send_flows(detector: &mut Bonds<'_>, flows: u16, ifindex: impl Fn(u16) -> u32) {
        for flow in 0..flows {
            let mut packet = vxlan(udp(POD, 40000 + flow, PEER, 7000), "10.99.0.1", "10.99.0.2", ifindex(flow), Direction::Egress);
            packet.outer.sport = 50000 + flow;
            detector.observe_packet(&packet, None);
        }
    }

    #[test]
    fn the_new_kind_has_its_documented_name() {
        assert_eq!(serde_json::to_value(FindingKind::BondMisconfigured).unwrap(), "bond-misconfigured");
        assert_eq!(FindingKind::BondMisconfigured.to_string(), "bond-misconfigured");
    }

    #[test]
    fn a_slave_that_is_down_is_an_error() {
        let path = with_slaves(SlaveState { mii_up: false, link_failures: 1, ..healthy() }, healthy());
        let findings = findings(&Bonds::new(&path), &path);
        assert_eq!(findings.len(), 1);
        let finding = &findings[0];
        assert_eq!((finding.kind, finding.severity, finding.hop.as_deref()), (FindingKind::BondDegraded, Severity::Error, Some("eth0")));
        assert_eq!(finding.evidence["active_slave"], "eth1");
        assert_eq!(finding.evidence["mode"], "active-backup");
        assert!(finding.summary.contains("its MII status is down, it has 1 link failures"), "{}", finding.summary);
    }

    #[test]
    fn healthy_slaves_are_quiet() {
        let path = with_slaves(healthy(), SlaveState { lacp_partner_in_sync: Some(true), ..healthy() });
        assert!(findings(&Bonds::new(&path), &path).is_empty());
    }

    #[test]
    fn an_up_slave_with_past_failures_or_no_lacp_partner_is_a_warning() {
        let path = with_slaves(SlaveState { link_failures: 1, ..healthy() }, SlaveState { lacp_partner_in_sync: Some(false), ..healthy() });
        let findings = findings(&Bonds::new(&path), &path);
        assert_eq!(
            findings.iter().map(|f| (f.hop.as_deref().unwrap(), f.severity)).collect::<Vec<_>>(),
            [("eth0", Severity::Warning), ("eth1", Severity::Warning)]
        );
        assert!(findings[1].summary.contains("no LACP partner in sync"));
    }

    #[test]
    fn an_address_on_a_slave_is_an_error_naming_it() {
        let mut path = with_slaves(healthy(), healthy());
        path.stages[3].hops[0].addresses = vec![(ip("10.99.0.1"), 24)];
        path.stages[4].hops[1].addresses = vec![(ip("192.168.77.1"), 24), (ip("fe80::1"), 64)];
        let findings = findings(&Bonds::new(&path), &path);
        assert_eq!(problems(&findings), [("slave-address", Severity::Error, "eth1")]);
        let finding = &findings[0];
        assert_eq!(finding.evidence["slave_addresses"], json!(["192.168.77.1/24"]), "link-local is the kernel's own");
        assert_eq!(finding.evidence["bond_addresses"], json!(["10.99.0.1/24"]));
        assert!(finding.summary.contains("no connectivity"), "{}", finding.summary);
        assert!(finding.advice.contains("ip addr del 192.168.77.1/24 dev eth1"), "{}", finding.advice);
    }

    #[test]
    fn only_a_link_local_address_on_a_slave_is_quiet() {
        let mut path = with_slaves(healthy(), healthy());
        path.stages[4].hops[0].addresses = vec![(ip("fe80::1"), 64)];
        assert!(findings(&Bonds::new(&path), &path).is_empty());
    }

    #[test]
    fn no_mii_and_no_arp_monitoring_is_a_warning() {
        let path = with_bond(BondState { mode: "active-backup".into(), ..Default::default() }, healthy(), healthy());
        let findings = findings(&Bonds::new(&path), &path);
        assert_eq!(problems(&findings), [("no-link-monitoring", Severity::Warning, "bond0")]);
        assert_eq!(findings[0].evidence["miimon_ms"], 0);
        assert_eq!(findings[0].evidence["arp_interval_ms"], 0);
        assert!(findings[0].advice.contains("miimon 100"));
    }

    #[test]
    fn arp_monitoring_alone_is_link_monitoring() {
        let path = with_bond(BondState { mode: "active-backup".into(), arp_interval_ms: 1000, ..Default::default() }, healthy(), healthy());
        assert!(findings(&Bonds::new(&path), &path).is_empty());
    }

    #[test]
    fn lacp_slaves_in_different_aggregators_with_partners_are_an_error() {
        let path = with_bond(hashing("802.3ad", "layer3+4"), lacp_slave(1, true), lacp_slave(2, true));
        let findings = findings(&Bonds::new(&path), &path);
        assert_eq!(problems(&findings), [("lacp-not-aggregating", Severity::Error, "bond0")]);
        let finding = &findings[0];
        assert_eq!(finding.evidence["active_aggregator"], 1);
        assert_eq!(finding.evidence["slaves"][1]["aggregator"], 2);
        assert!(finding.summary.contains("eth0 in 1, eth1 in 2; active aggregator 1"), "{}", finding.summary);
        assert!(finding.summary.contains("eth1 outside it carry nothing and drop"), "{}", finding.summary);
    }

    #[test]
    fn lacp_slaves_in_different_aggregators_without_partners_are_a_warning_beside_bond_degraded() {
        let path = with_bond(hashing("802.3ad", "layer3+4"), lacp_slave(1, false), lacp_slave(2, false));
        let findings = findings(&Bonds::new(&path), &path);
        assert_eq!(problems(&findings), [("lacp-not-aggregating", Severity::Warning, "bond0")]);
        assert_eq!(findings.iter().filter(|f| f.kind == FindingKind::BondDegraded).count(), 2);
    }

    #[test]
    fn lacp_slaves_in_one_aggregator_or_a_down_slave_elsewhere_are_quiet() {
        let path = with_bond(hashing("802.3ad", "layer3+4"), lacp_slave(1, true), lacp_slave(1, true));
        assert!(findings(&Bonds::new(&path), &path).is_empty());
        // A slave that is down leaves its aggregator; bond-degraded names it.
        let path = with_bond(hashing("802.3ad", "layer3+4"), lacp_slave(1, true), SlaveState { mii_up: false, ..lacp_slave(2, true) });
        assert!(problems(&findings(&Bonds::new(&path), &path)).is_empty());
    }

    #[test]
    fn a_layer2_hash_that_put_every_flow_on_one_slave_is_a_warning_with_the_counts() {
        let path = with_bond(hashing("balance-xor", "layer2"), healthy(), healthy());
        let mut detector = Bonds::new(&path);
        send_flows(&mut detector, 6, |_| 7);
        let findings = findings(&detector, &path);
        assert_eq!(problems(&findings), [("xmit-hash-one-slave", Severity::Warning, "bond0")]);
        let finding = &findings[0];
        assert_eq!(finding.evidence["packets_per_slave"], json!({"eth0": 0, "eth1": 6}));
        assert_eq!(finding.evidence["flows"], 6);
        assert!(finding.summary.contains("all 6 traced flows (6 packets) left through eth1 and none through eth0"), "{}", finding.summary);
        assert!(finding.advice.contains("xmit_hash_policy layer3+4"));
    }

    #[test]
    fn spread_flows_few_flows_or_a_port_hash_are_quiet() {
        let path = with_bond(hashing("balance-xor", "layer2"), healthy(), healthy());
        let mut detector = Bonds::new(&path);
        send_flows(&mut detector, 6, |flow| if flow % 2 == 0 { 2 } else { 7 });
        assert!(findings(&detector, &path).is_empty(), "spread");
        let mut detector = Bonds::new(&path);
        send_flows(&mut detector, 3, |_| 7);
        assert!(findings(&detector, &path).is_empty(), "too few flows to judge a hash");
        let path = with_bond(hashing("balance-xor", "layer3+4"), healthy(), healthy());
        let mut detector = Bonds::new(&path);
        send_flows(&mut detector, 6, |_| 7);
        assert!(findings(&detector, &path).is_empty(), "layer3+4 put them there by chance");
    }

    #[test]
    fn a_layer2_hash_with_one_usable_slave_is_quiet() {
        // 802.3ad with the slaves in different aggregators: only one can carry traffic.
        let path = with_bond(hashing("802.3ad", "layer2"), lacp_slave(1, true), lacp_slave(2, false));
        let mut detector = Bonds::new(&path);
        send_flows(&mut detector, 6, |_| 2);
        assert!(!problems(&findings(&detector, &path)).iter().any(|(problem, _, _)| *problem == "xmit-hash-one-slave"));
    }

    /// A TCP flow of the pod's striped through eth0 and eth1 while the peer acknowledges
    /// `acks` (pure ACKs, through the bond on the way back).
    fn striped_flow(detector: &mut Bonds<'_>, acks: &[u32]) {
        for (segment, ifindex) in [2, 7, 2, 7].into_iter().enumerate() {
            let mut data = tcp(POD, 40000, PEER, 80, TCP_ACK, 1398);
            data.tcp_seq = 1 + 1398 * segment as u32;
            detector.observe_packet(&packet(data, ifindex, Direction::Egress, 0), None);
        }
        for ack in acks {
            let reply = Layer { tcp_ack: *ack, ..tcp(PEER, 80, POD, 40000, TCP_ACK, 0) };
            detector.observe_packet(&packet(reply, 6, Direction::Ingress, 0), None);
        }
    }

    fn round_robin() -> Path {
        with_bond(BondState { mode: "balance-rr".into(), miimon_ms: 100, ..Default::default() }, healthy(), healthy())
    }

    #[test]
    fn duplicate_acks_and_retransmits_on_a_round_robin_bond_are_named_reordering() {
        let path = round_robin();
        let mut detector = Bonds::new(&path);
        striped_flow(&mut detector, &[1399, 1399, 1399, 5593]);
        let retransmit = Layer { tcp_seq: 1399, ..tcp(POD, 40000, PEER, 80, TCP_ACK, 1398) };
        detector.observe_kernel(&kernel(KernelRecordKind::Retransmit { seq: 1399, tcp_state: 1 }, retransmit, 0, false, 1));
        let findings = findings(&detector, &path);
        assert_eq!(problems(&findings), [("round-robin-reordering", Severity::Warning, "bond0")]);
        let finding = &findings[0];
        assert_eq!((finding.evidence["retransmits"].as_u64(), finding.evidence["duplicate_acks"].as_u64()), (Some(1), Some(2)));
        assert_eq!(finding.evidence["striped_flows"], 1);
        assert!(
            finding
                .summary
                .contains("are round-robin reordering (the receiver gets the segments out of order), not loss and not an MTU problem"),
            "{}",
            finding.summary
        );
        assert!(!finding.summary.contains("MTU signature"));
    }

    #[test]
    fn a_round_robin_bond_with_acks_moving_on_is_quiet() {
        let path = round_robin();
        let mut detector = Bonds::new(&path);
        striped_flow(&mut detector, &[1399, 4195, 5593]);
        assert!(findings(&detector, &path).is_empty());
    }

    #[test]
    fn duplicate_acks_on_a_bond_that_keeps_flows_on_one_slave_are_not_reordering() {
        let path = with_slaves(healthy(), healthy());
        let mut detector = Bonds::new(&path);
        striped_flow(&mut detector, &[1399, 1399, 1399]);
        assert!(findings(&detector, &path).is_empty());
        // Nor on a balance-rr bond whose flow never left through more than one slave.
        let path = round_robin();
        let mut detector = Bonds::new(&path);
        for ack in [1399, 1399] {
            let mut data = tcp(POD, 40000, PEER, 80, TCP_ACK, 1398);
            data.tcp_seq = 1;
            detector.observe_packet(&packet(data, 2, Direction::Egress, 0), None);
            detector
                .observe_packet(&packet(Layer { tcp_ack: ack, ..tcp(PEER, 80, POD, 40000, TCP_ACK, 0) }, 6, Direction::Ingress, 0), None);
        }
        assert!(findings(&detector, &path).is_empty());
    }
}
