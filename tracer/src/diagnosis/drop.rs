//! `drop`: packets of the flow were freed by the kernel as a drop, with the kernel's reason,
//! the function that dropped them and the hop. A drop is a loss of the flow only if the packet
//! is not seen further along the path: normal consumption, copies (seen further on, or frames
//! for another host's MAC that a promiscuous interface passed up) and packets for a followed
//! pod that is gone (`pod-gone`) are not drops. Copies are reported as `copies-freed`. Drops
//! of flows a pitfall finding explains (`br-netfilter-off`, `hairpin-off`) are left to it, and
//! ICMP redirects netfilter dropped are explained for what they are: advice the node sent,
//! about packets it forwarded anyway.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    net::{IpAddr, Ipv4Addr},
};

use serde_json::json;
use tracer_common::{DROP_REASON_UNKNOWN, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};

use super::{
    Detector, Finding, FindingKind, LeftOut, MAX_GROUPS, Severity, TraceEnd,
    copies::Copies,
    services::{Endpoint, Explained},
};
use crate::{
    Direction,
    events::{
        correlate::{Correlator, Sighting},
        decode::{KernelRecord, KernelRecordKind, Layer, Packet},
    },
    node::{HopKey, Path},
};

/// Conversations remembered per group, so that those a pitfall finding explains can be left
/// out; drops of conversations beyond it are never left out.
const MAX_FLOWS_PER_GROUP: usize = 64;
/// Redirect gateways remembered per group.
const MAX_GATEWAYS: usize = 16;
/// The IPv4 ICMP redirect type.
const ICMP_REDIRECT: u8 = 5;

/// Drops that share reason, location, device, direction, namespace and followed destination.
#[derive(Clone, Debug, Default)]
struct DropGroup {
    /// ICMP echo replies: ping reads them from a raw socket, which gets a clone.
    echo_reply: bool,
    /// TCP segments: one that no socket wants is answered with a RST.
    tcp: bool,
    count: u64,
    /// Of `count`, packets seen further along the path: copies of packets that went on.
    copies: u64,
    bytes: u64,
    example: String,
    /// TCP and UDP drops per conversation (protocol, source, destination).
    flows: BTreeMap<(u8, Endpoint, Endpoint), u64>,
    /// For ICMP redirects: the gateways they advised, and who sent them.
    gateways: BTreeSet<IpAddr>,
    redirect_senders: BTreeSet<IpAddr>,
}

/// What drops are grouped by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct GroupKey {
    reason: u32,
    location: u64,
    ifindex: u32,
    received: bool,
    netns: u32,
    /// The followed pod the packets were addressed to.
    to_pod: Option<IpAddr>,
    /// IPv4 ICMP redirects, kept apart from whatever else was dropped in the same place.
    icmp_redirect: bool,
}

/// Packets not for this host: frames for another MAC, which a promiscuous interface (a
/// capture without `-p`) passes up its stack as copies, and the stack frees.
const OTHERHOST: &str = "OTHERHOST";

pub struct Drops<'a> {
    path: &'a Path,
    own_netns: u32,
    groups: BTreeMap<GroupKey, DropGroup>,
    copies: Copies<GroupKey>,
    /// The Service backends the pods' flows were DNATed to, set when the trace ends: they
    /// tell what a dropped redirect was about.
    service_backends: BTreeSet<IpAddr>,
    /// Flows a pitfall finding explains, set when the trace ends.
    explained: Explained,
    /// Drops of kinds and places beyond the table's bound.
    left_out: u64,
}

/// A group the end of the trace judged a real drop, with its names resolved.
struct Judged<'g> {
    key: GroupKey,
    group: &'g DropGroup,
    reason: String,
    function: String,
    /// Of the lost packets, those of flows a pitfall finding explains.
    explained: u64,
}

impl Judged<'_> {
    /// Packets of the group that were copies: frames for another host, or packets seen
    /// further along the path. A pitfall finding's evidence outweighs a sighting further on
    /// (a frame DNATed back to the bridge it came from can cross the bridge device's own
    /// transmit before it is dropped), so its flows' packets are never counted as copies.
    fn copies(&self) -> u64 {
        if self.reason == OTHERHOST { self.group.count } else { self.group.copies.min(self.group.count - self.explained) }
    }

    /// Packets of the group the flow lost.
    fn lost(&self) -> u64 {
        self.group.count - self.copies()
    }

    /// Lost packets no pitfall finding explains: what this detector reports.
    fn unexplained(&self) -> u64 {
        self.lost().saturating_sub(self.explained)
    }

    /// ICMP redirects that netfilter dropped (named by its function where the kernel gives no
    /// reason).
    fn is_netfilter_redirect(&self) -> bool {
        self.key.icmp_redirect && (self.reason == "NETFILTER_DROP" || (self.reason == UNKNOWN_REASON && self.function == "nf_hook_slow"))
    }
}

impl<'a> Drops<'a> {
    pub fn new(path: &'a Path, own_netns: u32) -> Self {
        let followed = path.entries.iter().map(|entry| entry.pod_ip).collect();
        Self {
            path,
            own_netns,
            groups: BTreeMap::new(),
            copies: Copies::new(followed),
            service_backends: BTreeSet::new(),
            explained: Explained::default(),
            left_out: 0,
        }
    }

    pub fn any(&self) -> bool {
        !self.groups.is_empty()
    }

    /// Leaves the drops of flows a pitfall finding explains out of this detector's findings
    /// (they still count as drops at their hop).
    pub fn defer_to(&mut self, explained: &Explained) {
        self.explained = explained.clone();
    }

    /// The backends the trace saw Service flows DNATed to.
    pub fn know_backends(&mut self, backends: &BTreeSet<IpAddr>) {
        self.service_backends = backends.clone();
    }

    /// A kernel event; `sightings` has the journeys of the packets seen so far, which tell
    /// whether a dropped one went on.
    pub fn observe_kernel(&mut self, record: &KernelRecord, sightings: &Correlator) {
        let KernelRecordKind::Drop { reason, location } = record.kind else { return };
        let layer = record.pod_layer();
        let key = GroupKey {
            reason,
            location,
            ifindex: record.ifindex,
            received: record.received,
            netns: record.netns,
            to_pod: self.path.follows(layer.dst).then_some(layer.dst),
            icmp_redirect: (layer.proto, layer.icmp_type) == (IPPROTO_ICMP, ICMP_REDIRECT),
        };
        if self.groups.len() >= MAX_GROUPS && !self.groups.contains_key(&key) {
            self.left_out += 1;
            return;
        }
        let step = self.hop_of(key).and_then(|hop| self.path.step_of(hop));
        let copy = match (step, self.copies.fingerprint(layer)) {
            (Some(step), Some(fingerprint)) => {
                let furthest = sightings
                    .journey(fingerprint)
                    .and_then(|(hops, last_ns)| hops.filter_map(|hop| self.path.step_of(hop)).max().map(|furthest| (furthest, last_ns)));
                self.copies.dropped(fingerprint, step, record.ktime_ns, key, furthest)
            }
            _ => false,
        };
        let group = self.groups.entry(key).or_default();
        group.count += 1;
        group.copies += u64::from(copy);
        group.bytes += u64::from(record.skb_len);
        if group.example.is_empty() {
            group.example = layer.describe();
            group.echo_reply = matches!((layer.proto, layer.icmp_type), (IPPROTO_ICMP, 0) | (IPPROTO_ICMPV6, 129));
            group.tcp = layer.proto == IPPROTO_TCP;
        }
        let flow = (layer.proto, (layer.src, layer.sport), (layer.dst, layer.dport));
        if matches!(layer.proto, IPPROTO_TCP | IPPROTO_UDP) && (group.flows.len() < MAX_FLOWS_PER_GROUP || group.flows.contains_key(&flow))
        {
            *group.flows.entry(flow).or_default() += 1;
        }
        if key.icmp_redirect && group.gateways.len() < MAX_GATEWAYS {
            group.gateways.insert(redirect_gateway(layer));
            group.redirect_senders.insert(layer.src);
        }
    }

    /// Drops per hop, for the report's `drops` column.
    pub fn per_hop(&self, end: &TraceEnd<'_>) -> HashMap<HopKey, u64> {
        let mut per_hop = HashMap::new();
        for judged in self.judged(end) {
            if let Some(hop) = self.hop_of(judged.key)
                && judged.lost() > 0
            {
                *per_hop.entry(hop).or_default() += judged.lost();
            }
        }
        per_hop
    }

    fn judged<'g>(&'g self, end: &TraceEnd<'_>) -> impl Iterator<Item = Judged<'g>> {
        let names: Vec<_> = self
            .groups
            .iter()
            .map(|(key, group)| {
                let explained = group
                    .flows
                    .iter()
                    .filter(|((proto, src, dst), _)| self.explained.covers(*proto, *src, *dst))
                    .map(|(_, count)| count)
                    .sum();
                Judged { key: *key, group, reason: reason_name(key.reason, end), function: function_name(key.location, end), explained }
            })
            .collect();
        names.into_iter().filter(move |judged| {
            let to_gone_pod = judged.key.to_pod.is_some_and(|pod| end.pod_gone(pod));
            !to_gone_pod && !is_normal_consumption(&judged.reason, &judged.function, judged.group)
        })
    }

    /// The traced hop a drop happened at: its device, in this node's namespace.
    fn hop_of(&self, key: GroupKey) -> Option<HopKey> {
        let direction = if key.received { Direction::Ingress } else { Direction::Egress };
        (key.netns == self.own_netns && self.path.hop(key.ifindex).is_some()).then_some(HopKey { ifindex: key.ifindex, direction })
    }

    /// "after flannel.1 ingress, before cni0 egress", or where off the path.
    fn place(&self, key: GroupKey) -> String {
        let Some(hop) = self.hop_of(key) else {
            return if key.netns == self.own_netns {
                "on this node, off the traced path"
            } else {
                "inside a local pod's network namespace"
            }
            .to_string();
        };
        let here = self.path.label(&[hop]).unwrap_or_default();
        let next = self.path.step_of(hop).and_then(|step| self.path.label(&self.path.at_step(step + 1)));
        match next {
            Some(next) => format!("after {here}, before {next}"),
            None => format!("at {here}"),
        }
    }
}

/// The gateway an IPv4 ICMP redirect advises: the 4 bytes after its checksum, which the
/// parser reads as an echo's id and sequence.
fn redirect_gateway(layer: &Layer) -> IpAddr {
    IpAddr::V4(Ipv4Addr::from((u32::from(layer.icmp_id) << 16) | u32::from(layer.icmp_seq)))
}

impl Detector for Drops<'_> {
    fn left_out(&self) -> Vec<LeftOut> {
        vec![LeftOut { what: "drops (more kinds and places of drop than the table holds)", count: self.left_out }]
    }

    fn observe_packet(&mut self, packet: &Packet, sighting: Option<&Sighting>) {
        let Some(sighting) = sighting else { return };
        let Some(step) = self.path.step_of(HopKey { ifindex: packet.ifindex, direction: packet.direction }) else { return };
        for key in self.copies.sighted(sighting.fingerprint, step, packet.ktime_ns) {
            if let Some(group) = self.groups.get_mut(&key) {
                group.copies += 1;
            }
        }
    }

    fn findings(&self, end: &TraceEnd<'_>) -> Vec<Finding> {
        let mut findings = Vec::new();
        for judged in self.judged(end) {
            let copies = judged.copies();
            if copies > 0 {
                findings.push(self.copies_finding(&judged, copies, end));
            }
            if judged.unexplained() > 0 {
                findings.push(if judged.is_netfilter_redirect() {
                    self.redirect_finding(&judged, end)
                } else {
                    self.drop_finding(&judged, end)
                });
            }
        }
        findings
    }
}

impl Drops<'_> {
    fn evidence(&self, judged: &Judged<'_>, count: u64, end: &TraceEnd<'_>) -> serde_json::Value {
        json!({
            "reason": judged.reason,
            "function": judged.function,
            "location": end.symbols.map(|s| s.resolve(judged.key.location)),
            "count": count,
            "bytes": judged.group.bytes,
            "direction": if judged.key.received { Direction::Ingress } else { Direction::Egress },
            "example": judged.group.example,
            "not_checked_for_copies": self.copies.unchecked,
        })
    }

    fn hop_name(&self, key: GroupKey) -> Option<String> {
        self.hop_of(key).and_then(|hop| self.path.hop(hop.ifindex)).map(|hop| hop.ifname.clone())
    }

    fn drop_finding(&self, judged: &Judged<'_>, end: &TraceEnd<'_>) -> Finding {
        let Judged { key, reason, function, .. } = judged;
        let count = judged.unexplained();
        Finding {
            kind: FindingKind::Drop,
            severity: Severity::Error,
            hop: self.hop_name(*key),
            summary: format!("{count} packets of the flow were dropped {}: {reason} in {function}.", self.place(*key)),
            evidence: self.evidence(judged, count, end),
            advice: drop_advice(reason),
        }
    }

    /// A node sends an ICMP redirect when it forwards a packet back out the interface it came
    /// in on, to a next hop the sender could reach directly, and forwards the packet all the
    /// same: the redirect is advice, and losing it loses nothing of the flow. Linux's NAT drops
    /// every redirect about a connection it translated (nf_nat_icmp_reply_translation), so a
    /// redirect about a Service's DNAT to a backend on the same bridge never leaves the node,
    /// whatever the rules; when the gateway is such a backend, that is what happened.
    fn redirect_finding(&self, judged: &Judged<'_>, end: &TraceEnd<'_>) -> Finding {
        let Judged { key, group, reason, function, .. } = judged;
        let count = judged.unexplained();
        let join = |ips: &BTreeSet<IpAddr>| ips.iter().map(IpAddr::to_string).collect::<Vec<_>>().join(", ");
        let (gateways, senders) = (join(&group.gateways), join(&group.redirect_senders));
        let to = key.to_pod.map(|pod| format!(" to {pod}")).unwrap_or_default();
        let about_dnat = !group.gateways.is_empty() && group.gateways.is_subset(&self.service_backends);
        let why = if about_dnat {
            format!(
                "{senders} forwarded the pod's packets, DNATed to {gateways} (a Service backend on the same link), back out the interface they came in on, and advised the pod to send to {gateways} directly; Linux's NAT drops every redirect about a connection it translated, before any filter rule sees it"
            )
        } else {
            format!(
                "{senders} forwarded the pod's packets back out the interface they came in on and advised the pod to send to {gateways} directly; netfilter drops such a redirect when Linux's NAT translated the connection it is about (Service DNAT), or when a rule drops ICMP the node sends"
            )
        };
        Finding {
            kind: FindingKind::Drop,
            severity: Severity::Info,
            hop: self.hop_name(*key),
            summary: format!(
                "{count} ICMP redirects{to} were dropped {} ({reason} in {function}): {why}. A redirect is advice: the packets it was about were forwarded anyway, so nothing of the flow was lost.",
                self.place(*key)
            ),
            evidence: {
                let mut evidence = self.evidence(judged, count, end);
                evidence["icmp_type"] = json!(ICMP_REDIRECT);
                evidence["redirect_gateways"] = json!(group.gateways);
                evidence["redirect_from"] = json!(group.redirect_senders);
                evidence["about_service_dnat"] = json!(about_dnat);
                evidence
            },
            advice: if about_dnat {
                "Nothing to fix for the redirects: they are the kernel's NAT at work (net.ipv4.conf.all.send_redirects=0 stops the node sending them).".into()
            } else {
                "Nothing to fix for the flow. To see which it was: conntrack -L shows whether the connections are NATed, iptables-save / nft list ruleset the rules on OUTPUT and POSTROUTING.".into()
            },
        }
    }

    fn copies_finding(&self, judged: &Judged<'_>, count: u64, end: &TraceEnd<'_>) -> Finding {
        let Judged { key, reason, function, .. } = judged;
        let hop = self.hop_of(*key).and_then(|hop| self.path.hop(hop.ifindex));
        let why = if reason == OTHERHOST {
            let device = hop.map_or("an interface".to_string(), |hop| hop.ifname.clone());
            format!(
                "frames addressed to another MAC, passed up this host's stack because {device} is promiscuous (a capture such as tcpdump without -p); the originals went on to their destination"
            )
        } else {
            "the same packets were seen further along the path, so these were copies".to_string()
        };
        Finding {
            kind: FindingKind::CopiesFreed,
            severity: Severity::Info,
            hop: hop.map(|hop| hop.ifname.clone()),
            summary: format!(
                "{count} copies of the flow's packets{} were freed {} ({reason} in {function}): {why}. Nothing was lost.",
                key.to_pod.map(|pod| format!(" to {pod}")).unwrap_or_default(),
                self.place(*key)
            ),
            evidence: self.evidence(judged, count, end),
            advice: "Nothing to fix: the copies stop with the capture (tcpdump -p leaves the interface out of promiscuous mode).".into(),
        }
    }
}

/// How a drop's reason reads on a kernel that reports none (before 5.17).
pub(super) const UNKNOWN_REASON: &str = "reason unknown on this kernel";

/// A drop reason's name on the running kernel.
pub(super) fn reason_name(reason: u32, end: &TraceEnd<'_>) -> String {
    match reason {
        DROP_REASON_UNKNOWN => UNKNOWN_REASON.to_string(),
        reason => end.drop_reasons.get(&i64::from(reason)).cloned().unwrap_or_else(|| format!("reason {reason}")),
    }
}

/// The kernel function a drop happened in, or its address when symbols are unavailable.
pub(super) fn function_name(location: u64, end: &TraceEnd<'_>) -> String {
    end.symbols.map(|s| s.function(location)).unwrap_or_else(|| format!("{location:#x}"))
}

/// Frees that are the kernel's normal work, not losses: the reason says "not a drop" or the
/// function is a known consumer that still uses the generic free. Where the kernel gives no
/// reason, the function alone decides, as for NOT_SPECIFIED.
fn is_normal_consumption(reason: &str, function: &str, group: &DropGroup) -> bool {
    // A socket's queues purged when it closes: packets delivered, never read.
    // The enum's first two names keep their `SKB_` prefix (`SKB_NOT_DROPPED_YET`, `SKB_CONSUMED`).
    if matches!(reason, "SKB_NOT_DROPPED_YET" | "SKB_CONSUMED" | "QUEUE_PURGE" | "SOCKET_CLOSE") {
        return true;
    }
    // Echo replies are delivered to raw sockets (ping) as clones; the original is then freed
    // because no ICMP datagram socket wants it (in ping_rcv, or icmp_rcv where it is inlined).
    if matches!(reason, "NO_SOCKET" | UNKNOWN_REASON) && group.echo_reply {
        return true;
    }
    // A TCP segment no socket wants is answered with a RST, which port-refused (an attempt)
    // or connection-reset (any other segment) reports.
    if reason == "NO_SOCKET" && group.tcp {
        return true;
    }
    // icmpv6_rcv: kernels before 6.4 free every ICMPv6 message they handled but an echo
    // (packet-too-big, neighbour discovery) with the generic free; its real drops have reasons.
    matches!(reason, "NOT_SPECIFIED" | UNKNOWN_REASON)
        && matches!(
            function,
            "skb_release_data"
                | "kfree_skb_list_reason"
                | "sk_stream_kill_queues"
                | "skb_queue_purge_reason"
                | "tcp_v4_rcv"
                | "tcp_v6_rcv"
                | "icmpv6_rcv"
        )
}

fn drop_advice(reason: &str) -> String {
    match reason {
        "NETFILTER_DROP" => "Netfilter dropped the packets: usually a firewall rule (list the rules on that node with iptables-save / nft list ruleset, and the NetworkPolicies that apply to the pod); with no rule that matches, the kernel's own conntrack or NAT (a full conntrack table shows in conntrack -S and dmesg).".into(),
        "NO_SOCKET" => "Nothing listens for these packets on the receiving side: check the server's port, or, for VXLAN, that the tunnel device is bound to the address peers send to.".into(),
        "IP_OUTNOROUTES" | "IP_INNOROUTES" => "The node has no route for these packets: check its routing table (ip route) for the pod subnets.".into(),
        "PKT_TOO_BIG" => "Packets larger than the next hop's MTU with DF set: align the MTUs along the path and let ICMP fragmentation-needed through.".into(),
        "NEIGH_FAILED" | "NEIGH_QUEUEFULL" | "NEIGH_DEAD" => "The next hop's MAC address could not be resolved: check the neighbour table and, for VXLAN, the fdb entries.".into(),
        "IP_RPFILTER" => "Reverse-path filtering dropped the packets: the return route points elsewhere; check rp_filter and the routes.".into(),
        "QDISC_DROP" | "QDISC_OVERLIMIT" | "CPU_BACKLOG" | "FULL_RING" => "The interface or CPU is congested: check qdisc and ring statistics (tc -s qdisc, ethtool -S).".into(),
        reason if reason.starts_with("TCP_") => "TCP discarded the segments: check for window or sequence problems (ss -ti) on the endpoints.".into(),
        UNKNOWN_REASON => "This kernel (before 5.17) does not say why it drops packets: the function that dropped them and the hop point at the cause (a firewall rule for nf_hook_slow or nft_do_chain, a route for ip_route_input, a listener for the receive functions).".into(),
        _ => "Look up the drop reason in the kernel's include/net/dropreason-core.h and inspect the function that dropped the packets.".into(),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::{
        super::{
            services::{ClientFlow, ServiceDnat},
            testing::*,
        },
        *,
    };
    use crate::{
        events::decode::{Layer, TCP_SYN},
        kernel::symbols::KernelSymbols,
        node::path::fixtures::local_path,
    };

    const NODE_NS: u32 = 4026531840;
    const NF_HOOK_SLOW: u64 = 0xffff_ffff_8120_0000;
    const SKB_RELEASE_DATA: u64 = 0xffff_ffff_8130_0000;
    const ICMP_RCV: u64 = 0xffff_ffff_8140_0000;
    const IP_RCV_CORE: u64 = 0xffff_ffff_8150_0000;
    const OTHERHOST_REASON: u32 = 77;

    fn end() -> End {
        End {
            drop_reasons: HashMap::from([
                (2, "NOT_SPECIFIED".into()),
                (5, "NO_SOCKET".into()),
                (9, "NETFILTER_DROP".into()),
                (OTHERHOST_REASON.into(), OTHERHOST.into()),
            ]),
            symbols: Some(KernelSymbols::new(BTreeMap::from([
                (NF_HOOK_SLOW, "nf_hook_slow".to_string()),
                (SKB_RELEASE_DATA, "skb_release_data".to_string()),
                (ICMP_RCV, "icmp_rcv".to_string()),
                (IP_RCV_CORE, "ip_rcv_core".to_string()),
            ]))),
            ..Default::default()
        }
    }

    fn drop(reason: u32, location: u64, layer: Layer, ifindex: u32, netns: u32) -> KernelRecord {
        kernel(KernelRecordKind::Drop { reason, location }, layer, ifindex, true, netns)
    }

    #[test]
    fn a_firewall_drop_names_reason_function_and_hop() {
        let path = local_path();
        let mut detector = Drops::new(&path, NODE_NS);
        for _ in 0..3 {
            detector.observe_kernel(
                &drop(9, NF_HOOK_SLOW + 0x10, tcp(PEER, 8080, POD, 40000, 0x12, 0), 3, NODE_NS),
                Feed::new(&path).sightings(),
            );
        }
        let end = end();
        let findings = end.findings(&detector, &path);
        assert_eq!(findings.len(), 1);
        let finding = &findings[0];
        assert_eq!((finding.kind, finding.hop.as_deref()), (FindingKind::Drop, Some("flannel.1")));
        assert_eq!(finding.evidence["reason"], "NETFILTER_DROP");
        assert_eq!(finding.evidence["function"], "nf_hook_slow");
        assert_eq!(finding.evidence["location"], "nf_hook_slow+0x10");
        assert_eq!(finding.evidence["count"], 3);
        assert_eq!(finding.evidence["direction"], "ingress");
        assert!(finding.summary.contains("after flannel.1 ingress, before cni0 egress"), "{}", finding.summary);
        assert!(finding.advice.contains("firewall"));
        let per_hop = detector.per_hop(&end.trace_end(&path));
        assert_eq!(per_hop, HashMap::from([(HopKey { ifindex: 3, direction: Direction::Ingress }, 3)]));
    }

    #[test]
    fn normal_consumption_is_quiet() {
        let path = local_path();
        let mut detector = Drops::new(&path, NODE_NS);
        detector.observe_kernel(&drop(2, SKB_RELEASE_DATA, tcp(POD, 40000, PEER, 80, 0x10, 100), 5, NODE_NS), Feed::new(&path).sightings());
        // Answered with a RST: port-refused or connection-reset says so.
        detector.observe_kernel(&drop(5, 0, tcp(PEER, 40000, POD, 9, 0x02, 0), 0, NODE_NS + 1), Feed::new(&path).sightings());
        // ping's raw socket got a clone of the echo reply; the original has no socket.
        detector.observe_kernel(&drop(5, ICMP_RCV, echo(PEER, POD, 0, 1), 0, NODE_NS), Feed::new(&path).sightings());
        assert!(detector.any());
        assert!(end().findings(&detector, &path).is_empty());
        assert!(detector.per_hop(&end().trace_end(&path)).is_empty());
    }

    #[test]
    fn no_socket_is_a_drop_for_anything_but_an_echo_reply() {
        let path = local_path();
        let mut detector = Drops::new(&path, NODE_NS);
        detector.observe_kernel(&drop(5, ICMP_RCV, udp(PEER, 5000, POD, 9), 0, NODE_NS), Feed::new(&path).sightings());
        let findings = end().findings(&detector, &path);
        assert_eq!(findings.len(), 1);
        assert_eq!(findings[0].evidence["reason"], "NO_SOCKET");
        assert_eq!(findings[0].hop, None, "no device: off the traced path");
        assert!(findings[0].summary.contains("on this node, off the traced path"));
    }

    #[test]
    fn a_drop_in_a_pods_namespace_has_no_hop() {
        let path = local_path();
        let mut detector = Drops::new(&path, NODE_NS);
        // ifindex 3 in the pod's namespace is not the node's flannel.1.
        detector.observe_kernel(&drop(9, NF_HOOK_SLOW, tcp(PEER, 80, POD, 4000, 0x10, 0), 3, NODE_NS + 1), Feed::new(&path).sightings());
        let findings = end().findings(&detector, &path);
        assert_eq!(findings[0].hop, None);
        assert!(findings[0].summary.contains("inside a local pod's network namespace"));
    }

    /// Before 5.17 the kernel gives no reason: a drop is still a drop, named by its function,
    /// and the normal frees are still told apart by function alone.
    #[test]
    fn drops_without_a_reason_are_named_by_their_function() {
        let path = local_path();
        let mut detector = Drops::new(&path, NODE_NS);
        detector.observe_kernel(
            &drop(DROP_REASON_UNKNOWN, NF_HOOK_SLOW, tcp(PEER, 8080, POD, 40000, 0x12, 0), 3, NODE_NS),
            Feed::new(&path).sightings(),
        );
        detector.observe_kernel(
            &drop(DROP_REASON_UNKNOWN, SKB_RELEASE_DATA, tcp(POD, 40000, PEER, 80, 0x10, 100), 5, NODE_NS),
            Feed::new(&path).sightings(),
        );
        detector.observe_kernel(&drop(DROP_REASON_UNKNOWN, ICMP_RCV, echo(PEER, POD, 0, 1), 0, NODE_NS), Feed::new(&path).sightings());
        let findings = end().findings(&detector, &path);
        assert_eq!(findings.len(), 1, "{findings:#?}");
        assert_eq!(findings[0].evidence["reason"], UNKNOWN_REASON);
        assert_eq!(findings[0].evidence["function"], "nf_hook_slow");
        assert!(findings[0].advice.contains("before 5.17"), "{}", findings[0].advice);
    }

    /// A packet freed at cni0 ingress but seen at flannel.1 egress, before or after the drop
    /// event arrives, went on: the freed one was a copy.
    #[test]
    fn a_dropped_packet_seen_further_along_the_path_is_a_copy() {
        let path = local_path();
        let mut detector = Drops::new(&path, NODE_NS);
        let mut feed = Feed::new(&path);
        let segment = |ip_id| Layer { ip_id, ..tcp(POD, 40000, PEER, 80, 0x10, 100) };
        // Seen further first, then the drop; the drop first, then seen further; never seen further.
        feed.journey(&mut detector, &segment(1), &OUT, 0);
        detector.observe_kernel(&drop(9, NF_HOOK_SLOW, segment(1), 4, NODE_NS), feed.sightings());
        feed.journey(&mut detector, &segment(2), &OUT[..2], 10_000);
        detector.observe_kernel(&drop(9, NF_HOOK_SLOW, segment(2), 4, NODE_NS), feed.sightings());
        feed.journey(&mut detector, &segment(2), &OUT[2..], 12_000);
        feed.journey(&mut detector, &segment(3), &OUT[..2], 20_000);
        detector.observe_kernel(&drop(9, NF_HOOK_SLOW, segment(3), 4, NODE_NS), feed.sightings());
        let end = end();
        let findings = end.findings(&detector, &path);
        assert_eq!(findings.len(), 2, "{findings:#?}");
        let copies = findings.iter().find(|f| f.kind == FindingKind::CopiesFreed).unwrap();
        assert_eq!((copies.severity, &copies.evidence["count"]), (Severity::Info, &serde_json::json!(2)));
        assert!(copies.summary.contains("seen further along the path"), "{}", copies.summary);
        let drop = findings.iter().find(|f| f.kind == FindingKind::Drop).unwrap();
        assert_eq!((drop.severity, &drop.evidence["count"]), (Severity::Error, &serde_json::json!(1)));
        assert_eq!(detector.per_hop(&end.trace_end(&path)), HashMap::from([(HopKey { ifindex: 4, direction: Direction::Ingress }, 1)]));
    }

    /// A promiscuous bridge passes frames for other MACs up its stack, which frees them as not
    /// for this host, whether or not the original crossed a traced hop further on.
    #[test]
    fn frames_for_another_host_are_copies_never_errors() {
        let path = local_path();
        let mut detector = Drops::new(&path, NODE_NS);
        for seq in 1..=3 {
            detector
                .observe_kernel(&drop(OTHERHOST_REASON, IP_RCV_CORE, echo(PEER, POD, 0, seq), 4, NODE_NS), Feed::new(&path).sightings());
        }
        let end = end();
        let findings = end.findings(&detector, &path);
        assert_eq!(findings.len(), 1, "{findings:#?}");
        let copies = &findings[0];
        assert_eq!((copies.kind, copies.severity, copies.hop.as_deref()), (FindingKind::CopiesFreed, Severity::Info, Some("cni0")));
        assert_eq!(copies.evidence["count"], 3);
        assert!(copies.summary.contains("because cni0 is promiscuous"), "{}", copies.summary);
        assert!(detector.per_hop(&end.trace_end(&path)).is_empty());
    }

    #[test]
    fn a_socket_closing_with_unread_data_is_no_drop() {
        let path = local_path();
        let mut detector = Drops::new(&path, NODE_NS);
        let end = End { drop_reasons: HashMap::from([(40, "QUEUE_PURGE".into()), (41, "SOCKET_CLOSE".into())]), ..Default::default() };
        detector.observe_kernel(
            &drop(40, SKB_RELEASE_DATA, tcp(PEER, 80, POD, 40000, 0x18, 100), 0, NODE_NS + 1),
            Feed::new(&path).sightings(),
        );
        detector.observe_kernel(
            &drop(41, SKB_RELEASE_DATA, tcp(PEER, 80, POD, 40000, 0x18, 200), 0, NODE_NS + 1),
            Feed::new(&path).sightings(),
        );
        assert!(end.findings(&detector, &path).is_empty());
    }

    /// Drops of packets to a followed pod whose veth is gone are the pod's absence (pod-gone).
    #[test]
    fn drops_to_a_pod_that_is_gone_are_no_drop_findings() {
        let path = local_path();
        let mut detector = Drops::new(&path, NODE_NS);
        detector.observe_kernel(&drop(OTHERHOST_REASON, IP_RCV_CORE, echo(PEER, POD, 8, 1), 2, NODE_NS + 1), Feed::new(&path).sightings());
        detector.observe_kernel(&drop(9, NF_HOOK_SLOW, tcp(PEER, 80, POD, 40000, 0x10, 0), 3, NODE_NS), Feed::new(&path).sightings());
        let gone = End { vanished: vec![5], ..end() };
        assert!(gone.findings(&detector, &path).is_empty());
        assert!(detector.per_hop(&gone.trace_end(&path)).is_empty());
        // While the pod is there, the firewall drop is one.
        assert_eq!(end().findings(&detector, &path).iter().filter(|f| f.kind == FindingKind::Drop).count(), 1);
    }

    /// The group table is bounded; what does not fit is counted, for lost-events to report.
    #[test]
    fn drops_beyond_the_table_are_counted_as_left_out() {
        let path = local_path();
        let mut detector = Drops::new(&path, NODE_NS);
        for location in 0..MAX_GROUPS as u64 + 5 {
            detector.observe_kernel(
                &drop(9, NF_HOOK_SLOW + location, tcp(PEER, 8080, POD, 40000, 0x12, 0), 3, NODE_NS),
                Feed::new(&path).sightings(),
            );
        }
        assert_eq!(detector.left_out()[0].count, 5);
    }

    const SERVICE: &str = "10.96.0.20";
    const BACKEND: &str = "10.244.0.3";

    /// What the node sends a pod it routes back out cni0: an ICMP redirect (type 5, code 1
    /// for a host) from its cni0 address, naming `gateway` in the bytes read as id and sequence.
    fn redirect(gateway: [u8; 4], seq: u16) -> Layer {
        Layer {
            icmp_type: ICMP_REDIRECT,
            icmp_code: 1,
            icmp_id: u16::from_be_bytes([gateway[0], gateway[1]]),
            icmp_seq: u16::from_be_bytes([gateway[2], gateway[3]]),
            ip_id: seq,
            ..echo("10.244.0.1", POD, ICMP_REDIRECT, 0)
        }
    }

    /// Pod A's SYN to the Service at its veth, then DNATed to the backend at cni0 egress.
    fn service_syn(detector: &mut Drops<'_>, feed: &mut ServiceFeed<'_>, sport: u16) {
        let syn = Layer { ip_id: sport, ..tcp(POD, sport, SERVICE, 80, TCP_SYN, 0) };
        for packet in [
            packet(syn.clone(), 5, Direction::Ingress, 0),
            packet(Layer { dst: ip(BACKEND), dport: 8080, ..syn }, 4, Direction::Egress, 1000),
        ] {
            let (sighting, _) = feed.observe(&packet);
            detector.observe_packet(&packet, sighting.as_ref());
        }
        detector.know_backends(feed.services.backends());
    }

    /// The redirects a node sends about a Service's DNAT to a backend on the pod's bridge,
    /// dropped by its NAT with no rule at all: no firewall is blamed, and nothing is an error.
    #[test]
    fn redirects_about_service_dnat_dropped_by_netfilter_are_the_kernels_nat() {
        let path = local_path();
        let mut detector = Drops::new(&path, NODE_NS);
        service_syn(&mut detector, &mut ServiceFeed::new(&path), 40000);
        for seq in 1..=2 {
            detector.observe_kernel(
                &kernel(
                    KernelRecordKind::Drop { reason: 9, location: NF_HOOK_SLOW + 0x7d },
                    redirect([10, 244, 0, 3], seq),
                    0,
                    false,
                    NODE_NS,
                ),
                Feed::new(&path).sightings(),
            );
        }
        let end = end();
        let findings = end.findings(&detector, &path);
        assert_eq!(findings.len(), 1, "{findings:#?}");
        let finding = &findings[0];
        assert_eq!((finding.kind, finding.severity), (FindingKind::Drop, Severity::Info));
        assert_eq!(finding.evidence["redirect_gateways"], json!(["10.244.0.3"]));
        assert_eq!(finding.evidence["redirect_from"], json!(["10.244.0.1"]));
        assert_eq!((&finding.evidence["about_service_dnat"], &finding.evidence["count"]), (&json!(true), &json!(2)));
        assert!(
            finding.summary.starts_with(
                "2 ICMP redirects to 10.244.0.2 were dropped on this node, off the traced path (NETFILTER_DROP in nf_hook_slow)"
            ),
            "{}",
            finding.summary
        );
        assert!(finding.summary.contains("DNATed to 10.244.0.3 (a Service backend on the same link)"), "{}", finding.summary);
        assert!(finding.summary.contains("Linux's NAT drops every redirect about a connection it translated"), "{}", finding.summary);
        assert!(finding.summary.ends_with("nothing of the flow was lost."), "{}", finding.summary);
        assert!(!finding.summary.contains("rule dropped") && !finding.advice.contains("firewall"), "{finding:#?}");
    }

    /// A redirect whose gateway no hop saw as a DNAT target: both possible causes are named,
    /// neither claimed; other packets dropped in the same place stay an error of their own.
    #[test]
    fn a_redirect_of_unknown_cause_says_what_is_known() {
        let path = local_path();
        let mut detector = Drops::new(&path, NODE_NS);
        detector.observe_kernel(
            &kernel(KernelRecordKind::Drop { reason: 9, location: NF_HOOK_SLOW }, redirect([10, 244, 0, 9], 1), 0, false, NODE_NS),
            Feed::new(&path).sightings(),
        );
        detector.observe_kernel(
            &kernel(KernelRecordKind::Drop { reason: 9, location: NF_HOOK_SLOW }, udp("10.244.0.1", 53, POD, 4000), 0, false, NODE_NS),
            Feed::new(&path).sightings(),
        );
        let findings = end().findings(&detector, &path);
        assert_eq!(findings.len(), 2, "{findings:#?}");
        let redirect = findings.iter().find(|f| f.evidence["icmp_type"] == ICMP_REDIRECT).unwrap();
        assert_eq!((redirect.severity, &redirect.evidence["about_service_dnat"]), (Severity::Info, &json!(false)));
        assert!(redirect.summary.contains("advised the pod to send to 10.244.0.9 directly"), "{}", redirect.summary);
        assert!(
            redirect.summary.contains(
                "when Linux's NAT translated the connection it is about (Service DNAT), or when a rule drops ICMP the node sends"
            ),
            "{}",
            redirect.summary
        );
        let other = findings.iter().find(|f| f.evidence["icmp_type"].is_null()).unwrap();
        assert_eq!(other.severity, Severity::Error);
        assert!(other.advice.starts_with("Netfilter dropped the packets: usually a firewall rule"), "{}", other.advice);
        assert!(other.advice.contains("the kernel's own conntrack or NAT"), "{}", other.advice);
    }

    /// Drops of flows a pitfall finding explains are left to it, whatever else shares their
    /// group; they still count as drops at their hop.
    #[test]
    fn drops_of_explained_flows_are_left_to_the_pitfall() {
        let path = local_path();
        let mut detector = Drops::new(&path, NODE_NS);
        let looped = tcp(POD, 40000, POD, 8080, TCP_SYN, 0);
        for ip_id in 1..=2 {
            detector.observe_kernel(&drop(2, IP_RCV_CORE, Layer { ip_id, ..looped.clone() }, 5, NODE_NS), Feed::new(&path).sightings());
        }
        detector.observe_kernel(&drop(2, IP_RCV_CORE, tcp(POD, 40001, POD, 8080, TCP_SYN, 0), 5, NODE_NS), Feed::new(&path).sightings());
        let mut explained = Explained::default();
        explained.insert(
            ClientFlow { proto: IPPROTO_TCP, pod: ip(POD), port: 40000 },
            ServiceDnat { service: (ip(SERVICE), 80), backend: (ip(POD), 8080) },
        );
        detector.defer_to(&explained);
        let end = end();
        let findings = end.findings(&detector, &path);
        assert_eq!(findings.len(), 1, "{findings:#?}");
        assert_eq!(findings[0].evidence["count"], 1, "only the unexplained flow's drop: {findings:#?}");
        assert_eq!(detector.per_hop(&end.trace_end(&path)), HashMap::from([(HopKey { ifindex: 5, direction: Direction::Ingress }, 3)]));
        detector.observe_kernel(&drop(5, ICMP_RCV, udp(BACKEND, 53, POD, 4000), 0, NODE_NS + 1), Feed::new(&path).sightings());
        explained.insert(
            ClientFlow { proto: IPPROTO_UDP, pod: ip(POD), port: 4000 },
            ServiceDnat { service: (ip(SERVICE), 53), backend: (ip(BACKEND), 53) },
        );
        explained.insert(
            ClientFlow { proto: IPPROTO_TCP, pod: ip(POD), port: 40001 },
            ServiceDnat { service: (ip(SERVICE), 80), backend: (ip(POD), 8080) },
        );
        detector.defer_to(&explained);
        assert!(end.findings(&detector, &path).is_empty(), "the backend's reply the pod had no socket for is explained too");
    }

    /// A frame DNATed back to the port it came from can cross cni0's transmit before the
    /// bridge drops it on that port: seen further along, yet lost. With its flow explained, it
    /// is neither a copy nor a drop finding, and counts as a drop at its hop.
    #[test]
    fn explained_drops_seen_further_along_are_no_copies() {
        let path = local_path();
        let mut detector = Drops::new(&path, NODE_NS);
        let mut feed = Feed::new(&path);
        let looped = tcp(POD, 40000, POD, 8080, TCP_SYN, 0);
        feed.packet(&mut detector, &packet(Layer { dst: ip(SERVICE), dport: 80, ..looped.clone() }, 5, Direction::Ingress, 0));
        feed.packet(&mut detector, &packet(looped.clone(), 4, Direction::Egress, 1000));
        detector.observe_kernel(&drop(2, IP_RCV_CORE, looped, 5, NODE_NS), feed.sightings());
        let end = end();
        assert_eq!(end.findings(&detector, &path)[0].kind, FindingKind::CopiesFreed, "unexplained, the sighting makes it a copy");
        let mut explained = Explained::default();
        explained.insert(
            ClientFlow { proto: IPPROTO_TCP, pod: ip(POD), port: 40000 },
            ServiceDnat { service: (ip(SERVICE), 80), backend: (ip(POD), 8080) },
        );
        detector.defer_to(&explained);
        assert!(end.findings(&detector, &path).is_empty(), "{:#?}", end.findings(&detector, &path));
        assert_eq!(detector.per_hop(&end.trace_end(&path)), HashMap::from([(HopKey { ifindex: 5, direction: Direction::Ingress }, 1)]));
    }
}
