//! `drop`: packets of the flow were freed by the kernel as a drop, with the kernel's reason,
//! the function that dropped them and the hop. Normal consumption is not a drop.

use std::collections::{BTreeMap, HashMap};

use serde_json::json;
use tracer_common::{DROP_REASON_UNKNOWN, IPPROTO_ICMP, IPPROTO_ICMPV6};

use super::{Detector, Finding, FindingKind, MAX_GROUPS, Severity, TraceEnd};
use crate::{
    Direction,
    events::decode::{KernelRecord, KernelRecordKind},
    node::{HopKey, Path},
};

/// Drops that share reason, location, device, direction and namespace.
#[derive(Clone, Debug, Default)]
struct DropGroup {
    /// ICMP echo replies: ping reads them from a raw socket, which gets a clone.
    echo_reply: bool,
    count: u64,
    bytes: u64,
    example: String,
}

/// (reason, location, ifindex, received, netns)
type GroupKey = (u32, u64, u32, bool, u32);

pub struct Drops<'a> {
    path: &'a Path,
    own_netns: u32,
    groups: BTreeMap<GroupKey, DropGroup>,
}

/// A group the end of the trace judged a real drop, with its names resolved.
struct Judged<'g> {
    key: GroupKey,
    group: &'g DropGroup,
    reason: String,
    function: String,
}

impl<'a> Drops<'a> {
    pub fn new(path: &'a Path, own_netns: u32) -> Self {
        Self { path, own_netns, groups: BTreeMap::new() }
    }

    pub fn any(&self) -> bool {
        !self.groups.is_empty()
    }

    /// Drops per hop, for the report's `drops` column.
    pub fn per_hop(&self, end: &TraceEnd<'_>) -> HashMap<HopKey, u64> {
        let mut per_hop = HashMap::new();
        for judged in self.judged(end) {
            if let Some(hop) = self.hop_of(judged.key) {
                *per_hop.entry(hop).or_default() += judged.group.count;
            }
        }
        per_hop
    }

    fn judged<'g>(&'g self, end: &TraceEnd<'_>) -> impl Iterator<Item = Judged<'g>> {
        let names: Vec<_> = self
            .groups
            .iter()
            .map(|(key, group)| {
                let (reason, location, ..) = *key;
                let reason = match reason {
                    DROP_REASON_UNKNOWN => UNKNOWN_REASON.to_string(),
                    reason => end.drop_reasons.get(&i64::from(reason)).cloned().unwrap_or_else(|| format!("reason {reason}")),
                };
                let function = end.symbols.map(|s| s.function(location)).unwrap_or_else(|| format!("{location:#x}"));
                Judged { key: *key, group, reason, function }
            })
            .collect();
        names.into_iter().filter(|judged| !is_normal_consumption(&judged.reason, &judged.function, judged.group.echo_reply))
    }

    /// The traced hop a drop happened at: its device, in this node's namespace.
    fn hop_of(&self, (_, _, ifindex, received, netns): GroupKey) -> Option<HopKey> {
        let direction = if received { Direction::Ingress } else { Direction::Egress };
        (netns == self.own_netns && self.path.hop(ifindex).is_some()).then_some(HopKey { ifindex, direction })
    }

    /// "after flannel.1 ingress, before cni0 egress", or where off the path.
    fn place(&self, key: GroupKey) -> String {
        let Some(hop) = self.hop_of(key) else {
            return if key.4 == self.own_netns { "on this node, off the traced path" } else { "inside a local pod's network namespace" }
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

impl Detector for Drops<'_> {
    fn observe_kernel(&mut self, record: &KernelRecord) {
        let KernelRecordKind::Drop { reason, location } = record.kind else { return };
        let key = (reason, location, record.ifindex, record.received, record.netns);
        if self.groups.len() >= MAX_GROUPS && !self.groups.contains_key(&key) {
            return;
        }
        let group = self.groups.entry(key).or_default();
        group.count += 1;
        group.bytes += u64::from(record.skb_len);
        if group.example.is_empty() {
            let layer = record.pod_layer();
            group.example = layer.describe();
            group.echo_reply = matches!((layer.proto, layer.icmp_type), (IPPROTO_ICMP, 0) | (IPPROTO_ICMPV6, 129));
        }
    }

    fn findings(&self, end: &TraceEnd<'_>) -> Vec<Finding> {
        self.judged(end)
            .map(|Judged { key, group, reason, function }| {
                let (_, location, _, received, _) = key;
                let direction = if received { Direction::Ingress } else { Direction::Egress };
                Finding {
                    kind: FindingKind::Drop,
                    severity: Severity::Error,
                    hop: self.hop_of(key).and_then(|hop| self.path.hop(hop.ifindex)).map(|hop| hop.ifname.clone()),
                    summary: format!("{} packets of the flow were dropped {}: {reason} in {function}.", group.count, self.place(key)),
                    evidence: json!({
                        "reason": reason,
                        "function": function,
                        "location": end.symbols.map(|s| s.resolve(location)),
                        "count": group.count,
                        "bytes": group.bytes,
                        "direction": direction,
                        "example": group.example,
                    }),
                    advice: drop_advice(&reason),
                }
            })
            .collect()
    }
}

/// How a drop's reason reads on a kernel that reports none (before 5.17).
const UNKNOWN_REASON: &str = "reason unknown on this kernel";

/// Frees that are the kernel's normal work, not losses: the reason says "not a drop" or the
/// function is a known consumer that still uses the generic free. Where the kernel gives no
/// reason, the function alone decides, as for NOT_SPECIFIED.
fn is_normal_consumption(reason: &str, function: &str, echo_reply: bool) -> bool {
    if matches!(reason, "NOT_DROPPED_YET" | "CONSUMED") {
        return true;
    }
    // Echo replies are delivered to raw sockets (ping) as clones; the original is then freed
    // because no ICMP datagram socket wants it (in ping_rcv, or icmp_rcv where it is inlined).
    if matches!(reason, "NO_SOCKET" | UNKNOWN_REASON) && echo_reply {
        return true;
    }
    matches!(reason, "NOT_SPECIFIED" | UNKNOWN_REASON)
        && matches!(
            function,
            "skb_release_data" | "kfree_skb_list_reason" | "sk_stream_kill_queues" | "skb_queue_purge_reason" | "tcp_v4_rcv" | "tcp_v6_rcv"
        )
}

fn drop_advice(reason: &str) -> String {
    match reason {
        "NETFILTER_DROP" => "A firewall rule dropped the packets: list the rules on that node (iptables-save / nft list ruleset) and the NetworkPolicies that apply to the pod.".into(),
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

    use super::{super::testing::*, *};
    use crate::{events::decode::Layer, kernel::symbols::KernelSymbols, node::path::fixtures::local_path};

    const NODE_NS: u32 = 4026531840;
    const NF_HOOK_SLOW: u64 = 0xffff_ffff_8120_0000;
    const SKB_RELEASE_DATA: u64 = 0xffff_ffff_8130_0000;
    const ICMP_RCV: u64 = 0xffff_ffff_8140_0000;

    fn end() -> End {
        End {
            drop_reasons: HashMap::from([(2, "NOT_SPECIFIED".into()), (5, "NO_SOCKET".into()), (9, "NETFILTER_DROP".into())]),
            symbols: Some(KernelSymbols::new(BTreeMap::from([
                (NF_HOOK_SLOW, "nf_hook_slow".to_string()),
                (SKB_RELEASE_DATA, "skb_release_data".to_string()),
                (ICMP_RCV, "icmp_rcv".to_string()),
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
            detector.observe_kernel(&drop(9, NF_HOOK_SLOW + 0x10, tcp(PEER, 8080, POD, 40000, 0x12, 0), 3, NODE_NS));
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
        detector.observe_kernel(&drop(2, SKB_RELEASE_DATA, tcp(POD, 40000, PEER, 80, 0x10, 100), 5, NODE_NS));
        // ping's raw socket got a clone of the echo reply; the original has no socket.
        detector.observe_kernel(&drop(5, ICMP_RCV, echo(PEER, POD, 0, 1), 0, NODE_NS));
        assert!(detector.any());
        assert!(end().findings(&detector, &path).is_empty());
        assert!(detector.per_hop(&end().trace_end(&path)).is_empty());
    }

    #[test]
    fn no_socket_is_a_drop_for_anything_but_an_echo_reply() {
        let path = local_path();
        let mut detector = Drops::new(&path, NODE_NS);
        detector.observe_kernel(&drop(5, ICMP_RCV, udp(PEER, 5000, POD, 9), 0, NODE_NS));
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
        detector.observe_kernel(&drop(9, NF_HOOK_SLOW, tcp(PEER, 80, POD, 4000, 0x10, 0), 3, NODE_NS + 1));
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
        detector.observe_kernel(&drop(DROP_REASON_UNKNOWN, NF_HOOK_SLOW, tcp(PEER, 8080, POD, 40000, 0x12, 0), 3, NODE_NS));
        detector.observe_kernel(&drop(DROP_REASON_UNKNOWN, SKB_RELEASE_DATA, tcp(POD, 40000, PEER, 80, 0x10, 100), 5, NODE_NS));
        detector.observe_kernel(&drop(DROP_REASON_UNKNOWN, ICMP_RCV, echo(PEER, POD, 0, 1), 0, NODE_NS));
        let findings = end().findings(&detector, &path);
        assert_eq!(findings.len(), 1, "{findings:#?}");
        assert_eq!(findings[0].evidence["reason"], UNKNOWN_REASON);
        assert_eq!(findings[0].evidence["function"], "nf_hook_slow");
        assert!(findings[0].advice.contains("before 5.17"), "{}", findings[0].advice);
    }
}
