//! Findings: what is wrong, at which hop, the evidence, and what to do.
//!
//! `Diagnosis` watches the packets at each hop and the kernel's drop, retransmit and ICMP
//! events while the trace runs, keeping bounded aggregates, and turns them into findings
//! when it ends.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fmt,
    net::IpAddr,
};

use serde::Serialize;
use serde_json::{Value, json};
use tracer_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};

use crate::{
    Direction,
    events::{
        correlate::{Fingerprint, Flow, Sighting},
        decode::{KernelRecord, KernelRecordKind, Layer, Packet, TCP_RST, TCP_SYN, proto_name},
    },
    kernel::symbols::KernelSymbols,
    node::{HopKey, HopKind, LinkDrops, Path, path::Step},
    probes::Counters,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Error,
}

impl fmt::Display for Severity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Info => "info",
            Self::Warning => "warning",
            Self::Error => "error",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finding {
    pub kind: &'static str,
    pub severity: Severity,
    /// The interface, or `None` for a finding about the whole path.
    pub hop: Option<String>,
    pub summary: String,
    pub evidence: Value,
    pub advice: String,
}

/// VXLAN over IPv4 adds outer Ethernet-less IPv4 (20) + UDP (8) + VXLAN (8) + inner Ethernet (14).
const VXLAN_OVERHEAD_V4: u32 = 50;
const VXLAN_OVERHEAD_V6: u32 = 70;
/// Bounds on what the diagnosis keeps, whatever the trace length.
const MAX_REQUESTS: usize = 16_384;
const MAX_GROUPS: usize = 1_024;

const DNS_PORT: u16 = 53;

pub struct Settings {
    /// This node's tunnel endpoint, when the user knows it (`--node-ip`).
    pub node_ip: Option<IpAddr>,
    /// A request with no reply after this long counts as unanswered.
    pub reply_timeout_ns: u64,
    /// This node's own network namespace inode.
    pub own_netns: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum RequestKind {
    Echo,
    TcpSyn,
    Dns,
}

/// A request the pod sent, identified so that its reply can be recognised.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct RequestKey {
    kind: RequestKind,
    proto: u8,
    pod_port: u16,
    /// ICMP echo id and sequence.
    echo: (u16, u16),
}

#[derive(Clone, Debug)]
struct Request {
    first_ns: u64,
    peer: IpAddr,
    peer_port: u16,
    packets: u64,
    /// Hops that saw the request, in the order they saw it.
    hops: Vec<HopKey>,
    /// Destination after Service DNAT, when a hop saw a different one.
    dnat_to: Option<(IpAddr, u16)>,
    answered: bool,
}

#[derive(Clone, Debug, Default)]
struct DropGroup {
    /// ICMP echo replies: ping reads them from a raw socket, which gets a clone.
    echo_reply: bool,
    /// ICMP fragmentation-needed: a dropped one turns an MTU problem into a blackhole.
    frag_needed: bool,
    count: u64,
    bytes: u64,
    example: String,
    ifindex: u32,
    received: bool,
    netns: u32,
}

#[derive(Clone, Debug, Default)]
struct RetransmitGroup {
    count: u64,
    sizes: BTreeMap<u32, u64>,
}

#[derive(Clone, Copy, Debug, Default)]
struct TcpFlow {
    largest_payload: u32,
    replies: u64,
}

#[derive(Clone, Debug, Default)]
struct Oversized {
    count: u64,
    max_len: u32,
    example: String,
}

pub struct Diagnosis<'a> {
    path: &'a Path,
    settings: Settings,
    requests: HashMap<RequestKey, Request>,
    by_fingerprint: HashMap<Fingerprint, RequestKey>,
    dropped_requests: u64,
    drops: BTreeMap<(u32, u64, u32, bool, u32), DropGroup>,
    retransmits: BTreeMap<(IpAddr, u16, IpAddr, u16), RetransmitGroup>,
    /// Per TCP flow the pod opened: its largest payload, to tell full-size segments from small
    /// ones, and whether anything came back, which shows that small packets get through.
    tcp_flows: HashMap<(u16, IpAddr, u16), TcpFlow>,
    icmp_sent: BTreeMap<(u8, u8, u32), (u64, String)>,
    /// (peer, protocol, port, signal) of refused connections, and how often.
    refused: BTreeMap<(IpAddr, u8, u16, &'static str), u64>,
    oversized: BTreeMap<(u32, Direction), Oversized>,
    vxlan_out_sources: BTreeMap<IpAddr, u64>,
    vxlan_in_destinations: BTreeMap<IpAddr, u64>,
    last_ns: u64,
}

pub struct Outcome {
    pub findings: Vec<Finding>,
    /// Per (ifindex, direction): kernel drops attributed there.
    pub drops: HashMap<HopKey, u64>,
    /// Retransmits, attributed to the hop where the pod's packets enter the path.
    pub retransmits: HashMap<HopKey, u64>,
}

pub struct Finish<'b> {
    /// CLOCK_MONOTONIC when the trace ended, on the same clock as the events.
    pub end_ns: u64,
    pub counters: Counters,
    pub ring_bytes: u32,
    /// Receive/transmit drop counters of each hop: how much they grew during the trace.
    pub link_drops: &'b HashMap<u32, LinkDrops>,
    /// The path as it is at the end (bond and slave state re-read).
    pub final_path: &'b Path,
    pub drop_reasons: &'b HashMap<i64, String>,
    pub symbols: Option<&'b KernelSymbols>,
}

impl<'a> Diagnosis<'a> {
    pub fn new(path: &'a Path, settings: Settings) -> Self {
        Self {
            path,
            settings,
            requests: HashMap::new(),
            by_fingerprint: HashMap::new(),
            dropped_requests: 0,
            drops: BTreeMap::new(),
            retransmits: BTreeMap::new(),
            tcp_flows: HashMap::new(),
            icmp_sent: BTreeMap::new(),
            refused: BTreeMap::new(),
            oversized: BTreeMap::new(),
            vxlan_out_sources: BTreeMap::new(),
            vxlan_in_destinations: BTreeMap::new(),
            last_ns: 0,
        }
    }

    fn hop_name(&self, ifindex: u32) -> Option<&str> {
        self.path.hop(ifindex).map(|hop| hop.ifname.as_str())
    }

    pub fn observe_packet(&mut self, packet: &Packet, sighting: Option<&Sighting>) {
        self.last_ns = self.last_ns.max(packet.ktime_ns);
        let hop = HopKey { ifindex: packet.ifindex, direction: packet.direction };
        self.observe_tunnel(packet);
        self.observe_size(packet, hop);
        let Some(sighting) = sighting else { return };
        let layer = packet.pod_layer();
        match sighting.flow {
            Flow::FromPod => {
                if layer.proto == IPPROTO_TCP {
                    let key = (layer.sport, layer.dst, layer.dport);
                    if self.tcp_flows.len() < MAX_REQUESTS || self.tcp_flows.contains_key(&key) {
                        let flow = self.tcp_flows.entry(key).or_default();
                        flow.largest_payload = flow.largest_payload.max(u32::from(layer.payload_len()));
                    }
                }
                self.track_request(layer, hop, sighting, packet.ktime_ns);
            }
            Flow::ToPod => {
                if layer.proto == IPPROTO_TCP
                    && let Some(flow) = self.tcp_flows.get_mut(&(layer.dport, layer.src, layer.sport))
                {
                    flow.replies += 1;
                }
                // A reply crosses several hops; count each refusal once, where first seen.
                self.track_reply(layer, sighting.previous.is_none());
            }
        }
    }

    /// Outer addresses of VXLAN packets on the underlay: what this node sends from, and
    /// what its peers send to.
    fn observe_tunnel(&mut self, packet: &Packet) {
        if packet.vni.is_none() {
            return;
        }
        let (map, address) = match packet.direction {
            Direction::Egress => (&mut self.vxlan_out_sources, packet.outer.src),
            Direction::Ingress => (&mut self.vxlan_in_destinations, packet.outer.dst),
        };
        if map.len() < MAX_GROUPS || map.contains_key(&address) {
            *map.entry(address).or_default() += 1;
        }
    }

    /// A wire-sized (non-GSO) packet larger than the MTU of the hop it heads for.
    fn observe_size(&mut self, packet: &Packet, hop: HopKey) {
        if packet.is_gso() {
            return;
        }
        let Some(next) = self.next_mtu(hop) else { return };
        let layer = if self.is_tunnel_egress(hop) { &packet.outer } else { packet.pod_layer() };
        let ip_len = u32::from(if self.path.is_underlay(hop.ifindex) { packet.outer.total_len } else { layer.total_len });
        if ip_len <= next.1 {
            return;
        }
        let entry = self.oversized.entry((hop.ifindex, hop.direction)).or_default();
        entry.count += 1;
        if ip_len > entry.max_len {
            entry.max_len = ip_len;
            entry.example = format!("{} ({} bytes, DF {})", layer.describe(), ip_len, if layer.dont_fragment { "set" } else { "clear" });
        }
    }

    fn is_tunnel_egress(&self, hop: HopKey) -> bool {
        hop.direction == Direction::Egress && self.path.is_underlay(hop.ifindex)
    }

    /// The hop a packet at `hop` goes to next on its way, and the IP-level MTU it must fit:
    /// of alternatives, the smallest.
    fn next_mtu(&self, hop: HopKey) -> Option<(u32, u32)> {
        let next = self.path.next_on_same_way(self.path.step_of(hop)?)?;
        // A packet that enters a VXLAN device must fit its MTU; one leaving it must fit the
        // underlay's with the encapsulation included, which the outer header already shows.
        self.path.at_step(next).iter().filter_map(|key| self.path.hop(key.ifindex)).map(|h| (h.ifindex, h.mtu)).min_by_key(|(_, mtu)| *mtu)
    }

    fn track_request(&mut self, layer: &Layer, hop: HopKey, sighting: &Sighting, now: u64) {
        if let Some(key) = self.by_fingerprint.get(&sighting.fingerprint).copied() {
            if let Some(request) = self.requests.get_mut(&key) {
                if !request.hops.contains(&hop) {
                    request.hops.push(hop);
                }
                if (layer.dst, layer.dport) != (request.peer, request.peer_port) && request.dnat_to.is_none() {
                    request.dnat_to = Some((layer.dst, layer.dport));
                }
            }
            return;
        }
        // Each followed IP's requests start where its packets enter the path.
        if hop != self.path.entry(layer.src) {
            return;
        }
        let Some(key) = request_key(layer) else { return };
        if let Some(request) = self.requests.get_mut(&key) {
            request.packets += 1;
        } else if self.requests.len() < MAX_REQUESTS {
            self.requests.insert(
                key,
                Request {
                    first_ns: now,
                    peer: layer.dst,
                    peer_port: layer.dport,
                    packets: 1,
                    hops: vec![hop],
                    dnat_to: None,
                    answered: false,
                },
            );
        } else {
            self.dropped_requests += 1;
            return;
        }
        if self.by_fingerprint.len() < 4 * MAX_REQUESTS {
            self.by_fingerprint.insert(sighting.fingerprint, key);
        }
    }

    fn track_reply(&mut self, layer: &Layer, first_sighting: bool) {
        match layer.proto {
            IPPROTO_ICMP | IPPROTO_ICMPV6 if matches!(layer.icmp_type, 0 | 129) => {
                let key = RequestKey { kind: RequestKind::Echo, proto: layer.proto, pod_port: 0, echo: (layer.icmp_id, layer.icmp_seq) };
                if let Some(request) = self.requests.get_mut(&key) {
                    request.answered = true;
                }
            }
            // Port unreachable (ICMP 3/3, ICMPv6 1/4) names the refused port in its quote.
            IPPROTO_ICMP | IPPROTO_ICMPV6
                if matches!((layer.proto, layer.icmp_type, layer.icmp_code), (IPPROTO_ICMP, 3, 3) | (IPPROTO_ICMPV6, 1, 4)) =>
            {
                self.count_refusal(first_sighting, (layer.src, layer.quoted_proto, layer.quoted_dport, "ICMP port unreachable"));
            }
            IPPROTO_TCP => {
                let key = RequestKey { kind: RequestKind::TcpSyn, proto: IPPROTO_TCP, pod_port: layer.dport, echo: (0, 0) };
                if layer.tcp_flags & TCP_RST != 0 {
                    self.count_refusal(first_sighting, (layer.src, IPPROTO_TCP, layer.sport, "TCP RST"));
                }
                let dns = RequestKey { kind: RequestKind::Dns, ..key };
                for key in [key, dns] {
                    if let Some(request) = self.requests.get_mut(&key) {
                        request.answered = true;
                    }
                }
            }
            IPPROTO_UDP => {
                let key = RequestKey { kind: RequestKind::Dns, proto: IPPROTO_UDP, pod_port: layer.dport, echo: (0, 0) };
                if let Some(request) = self.requests.get_mut(&key) {
                    request.answered = true;
                }
            }
            _ => {}
        }
    }

    pub fn observe_kernel(&mut self, record: &KernelRecord) {
        self.last_ns = self.last_ns.max(record.ktime_ns);
        match record.kind {
            KernelRecordKind::Drop { reason, location } => {
                let key = (reason, location, record.ifindex, record.received, record.netns);
                if self.drops.len() >= MAX_GROUPS && !self.drops.contains_key(&key) {
                    return;
                }
                let group = self.drops.entry(key).or_default();
                group.count += 1;
                group.bytes += u64::from(record.skb_len);
                group.ifindex = record.ifindex;
                group.received = record.received;
                group.netns = record.netns;
                if group.example.is_empty() {
                    let layer = record.pod_layer();
                    group.example = layer.describe();
                    group.echo_reply = matches!((layer.proto, layer.icmp_type), (IPPROTO_ICMP, 0) | (IPPROTO_ICMPV6, 129));
                    group.frag_needed = (layer.proto, layer.icmp_type, layer.icmp_code) == (IPPROTO_ICMP, 3, 4);
                }
            }
            KernelRecordKind::Retransmit { .. } => {
                let flow = &record.outer;
                let key = (flow.src, flow.sport, flow.dst, flow.dport);
                if self.retransmits.len() >= MAX_GROUPS && !self.retransmits.contains_key(&key) {
                    return;
                }
                let group = self.retransmits.entry(key).or_default();
                group.count += 1;
                if group.sizes.len() < 64 || group.sizes.contains_key(&record.skb_len) {
                    *group.sizes.entry(record.skb_len).or_default() += 1;
                }
            }
            KernelRecordKind::IcmpSent { icmp_type, icmp_code } => {
                let entry = self.icmp_sent.entry((icmp_type, icmp_code, record.ifindex)).or_insert((0, String::new()));
                entry.0 += 1;
                if entry.1.is_empty() {
                    entry.1 = record.pod_layer().describe();
                }
            }
        }
    }

    /// Whether any drop was seen, so kernel symbols are only loaded when needed.
    pub fn has_drops(&self) -> bool {
        !self.drops.is_empty()
    }

    pub fn finish(self, finish: Finish<'_>) -> Outcome {
        let mut findings = Vec::new();
        let mut drops_per_hop = HashMap::new();
        findings.extend(self.drop_findings(&finish, &mut drops_per_hop));
        findings.extend(self.retransmit_findings());
        findings.extend(self.mtu_findings(&finish));
        findings.extend(self.vxlan_source_findings());
        findings.extend(self.request_findings(finish.end_ns));
        findings.extend(self.refused_findings());
        findings.extend(bond_findings(finish.final_path));
        findings.extend(lost_events(&finish.counters, finish.ring_bytes));
        if self.dropped_requests > 0 {
            findings.push(Finding {
                kind: "lost-events",
                severity: Severity::Warning,
                hop: None,
                summary: format!("{} requests were not tracked: the request table was full.", self.dropped_requests),
                evidence: json!({ "untracked_requests": self.dropped_requests, "table_size": MAX_REQUESTS }),
                advice: "Narrow the trace with --peer, --port or --proto.".into(),
            });
        }
        // Retransmits belong to the hop where the pod that owns the connection enters the path.
        let mut retransmits_per_hop = HashMap::new();
        for ((src, _, dst, _), group) in &self.retransmits {
            *retransmits_per_hop.entry(self.path.entry(self.followed_of(*src, *dst))).or_default() += group.count;
        }
        findings.sort_by_key(|finding| std::cmp::Reverse(finding.severity));
        Outcome { findings, drops: drops_per_hop, retransmits: retransmits_per_hop }
    }

    fn drop_findings(&self, finish: &Finish<'_>, per_hop: &mut HashMap<HopKey, u64>) -> Vec<Finding> {
        let mut findings = Vec::new();
        for ((reason, location, _, _, _), group) in &self.drops {
            let reason_name = finish.drop_reasons.get(&i64::from(*reason)).cloned().unwrap_or_else(|| format!("reason {reason}"));
            let function = finish.symbols.map(|s| s.function(*location)).unwrap_or_else(|| format!("{location:#x}"));
            if is_normal_consumption(&reason_name, &function, group.echo_reply) {
                continue;
            }
            let direction = if group.received { Direction::Ingress } else { Direction::Egress };
            let in_node = group.netns == self.settings.own_netns;
            let hop = if in_node { self.hop_name(group.ifindex).map(str::to_string) } else { None };
            if hop.is_some() {
                *per_hop.entry(HopKey { ifindex: group.ifindex, direction }).or_default() += group.count;
            }
            let place = match (&hop, in_node) {
                (Some(name), _) => {
                    let next = self.next_hop_name(HopKey { ifindex: group.ifindex, direction });
                    match next {
                        Some(next) => format!("after {name} {direction}, before {next}"),
                        None => format!("at {name} {direction}"),
                    }
                }
                (None, true) => "on this node, off the traced path".to_string(),
                (None, false) => "inside a local pod's network namespace".to_string(),
            };
            findings.push(Finding {
                kind: "drop",
                severity: Severity::Error,
                hop: hop.clone(),
                summary: format!("{} packets of the flow were dropped {place}: {reason_name} in {function}.", group.count),
                evidence: json!({
                    "reason": reason_name,
                    "function": function,
                    "location": finish.symbols.map(|s| s.resolve(*location)),
                    "count": group.count,
                    "bytes": group.bytes,
                    "direction": direction,
                    "example": group.example,
                }),
                advice: drop_advice(&reason_name),
            });
        }
        findings
    }

    fn next_hop_name(&self, hop: HopKey) -> Option<String> {
        self.path.label(&self.path.at_step(self.path.step_of(hop)? + 1))
    }

    fn retransmit_findings(&self) -> Vec<Finding> {
        self.retransmits
            .iter()
            .map(|((src, sport, dst, dport), group)| {
                let flow = self.tcp_flows.get(&(*sport, *dst, *dport)).copied().unwrap_or_default();
                let largest = flow.largest_payload;
                let max_retransmitted = group.sizes.keys().max().copied().unwrap_or(0);
                let min_retransmitted = group.sizes.keys().min().copied().unwrap_or(0);
                // Every retransmitted segment within 10% of the largest the flow sent, while the
                // peer kept answering the small ones (handshake, ACKs, short writes).
                let mtu_signature = largest > 0 && min_retransmitted * 10 >= largest * 9 && flow.replies > 0;
                let mut summary = format!("{} segments of {src}:{sport} > {dst}:{dport} were retransmitted", group.count);
                if mtu_signature {
                    summary.push_str(&format!(
                        "; only full-size segments ({min_retransmitted}-{max_retransmitted} bytes) were retransmitted while small ones got through: the MTU signature"
                    ));
                }
                summary.push('.');
                Finding {
                    kind: "retransmits",
                    severity: Severity::Warning,
                    hop: Some(self.entry_name(*src, *dst)),
                    summary,
                    evidence: json!({
                        "flow": format!("{src}:{sport} > {dst}:{dport}"),
                        "retransmits": group.count,
                        "segment_sizes": group.sizes.iter().map(|(size, count)| json!({"bytes": size, "count": count})).collect::<Vec<_>>(),
                        "largest_segment_sent": largest,
                        "packets_back_from_peer": flow.replies,
                        "mtu_signature": mtu_signature,
                    }),
                    advice: if mtu_signature {
                        "Large segments are lost on the path: compare the MTUs of the pod, the tunnel and both nodes' underlays, and make sure ICMP fragmentation-needed is not blocked.".into()
                    } else {
                        "Look for drops and congestion on the path (see the drop findings and each hop's counters).".into()
                    },
                }
            })
            .collect()
    }

    fn mtu_findings(&self, finish: &Finish<'_>) -> Vec<Finding> {
        let mut findings = Vec::new();
        let frag_needed: u64 =
            self.icmp_sent.iter().filter(|((t, c, _), _)| (*t == 3 && *c == 4) || *t == 2).map(|(_, (count, _))| *count).sum();
        let frag_needed_dropped: u64 = self.drops.values().filter(|group| group.frag_needed).map(|group| group.count).sum();
        let icmp_state = if frag_needed == 0 {
            "no ICMP fragmentation-needed was sent, so senders never learn the smaller MTU: a blackhole".to_string()
        } else if frag_needed_dropped > 0 {
            format!(
                "{frag_needed} ICMP fragmentation-needed messages were generated but {frag_needed_dropped} were dropped before reaching the pod: a blackhole"
            )
        } else {
            format!("{frag_needed} ICMP fragmentation-needed messages were sent back")
        };
        let blackhole = frag_needed == 0 || frag_needed_dropped > 0;

        // Configuration: a tunnel whose packets cannot fit its underlay.
        for hop in self.path.hops().filter(|hop| hop.kind == HopKind::Vxlan) {
            let Some(underlay) = hop.underlay.and_then(|u| self.path.hop(u)) else { continue };
            let overhead = match hop.vxlan_local {
                Some(IpAddr::V6(_)) => VXLAN_OVERHEAD_V6,
                _ => VXLAN_OVERHEAD_V4,
            };
            if hop.mtu + overhead > underlay.mtu {
                let drops = finish.link_drops.get(&underlay.ifindex).copied().unwrap_or_default();
                findings.push(Finding {
                    kind: "mtu-mismatch",
                    severity: Severity::Error,
                    hop: Some(hop.ifname.clone()),
                    summary: format!(
                        "{} has MTU {} but its underlay {} has MTU {}: encapsulated full-size packets ({} bytes) cannot fit; {icmp_state}.",
                        hop.ifname, hop.mtu, underlay.ifname, underlay.mtu, hop.mtu + overhead
                    ),
                    evidence: json!({
                        "tunnel": hop.ifname, "tunnel_mtu": hop.mtu,
                        "underlay": underlay.ifname, "underlay_mtu": underlay.mtu,
                        "encapsulation_overhead": overhead,
                        "underlay_rx_dropped_during_trace": drops.rx_dropped,
                        "icmp_frag_needed_sent": frag_needed,
                        "blackhole": blackhole,
                    }),
                    advice: format!(
                        "Set {}'s MTU to at most {} (underlay MTU minus {overhead}), or raise {}'s MTU to {}; every node's underlay must carry the same MTU.",
                        hop.ifname, underlay.mtu.saturating_sub(overhead), underlay.ifname, hop.mtu + overhead
                    ),
                });
            }
        }
        // Configuration: pod-side MTU above the tunnel's.
        let tunnel_mtu = self.path.hops().filter(|h| h.kind == HopKind::Vxlan).map(|h| h.mtu).min();
        if let Some(tunnel_mtu) = tunnel_mtu {
            for hop in self.path.hops().filter(|h| matches!(h.kind, HopKind::PodVeth | HopKind::Bridge) && h.mtu > tunnel_mtu) {
                let tunnel = self
                    .path
                    .hops()
                    .find(|h| h.kind == HopKind::Vxlan && h.mtu == tunnel_mtu)
                    .map(|h| h.ifname.clone())
                    .unwrap_or_default();
                findings.push(Finding {
                    kind: "mtu-mismatch",
                    severity: Severity::Error,
                    hop: Some(hop.ifname.clone()),
                    summary: format!(
                        "{} ({}) has MTU {} but the tunnel {tunnel} has MTU {tunnel_mtu}: the pod can send packets the tunnel cannot carry; {icmp_state}.",
                        hop.ifname, hop.kind, hop.mtu
                    ),
                    evidence: json!({
                        "interface": hop.ifname, "mtu": hop.mtu,
                        "tunnel": tunnel, "tunnel_mtu": tunnel_mtu,
                        "icmp_frag_needed_sent": frag_needed,
                        "icmp_frag_needed_dropped": frag_needed_dropped,
                        "blackhole": blackhole,
                    }),
                    advice: format!("Give the pod network MTU {tunnel_mtu} (the CNI's mtu setting) so pods never send larger packets, and let ICMP fragmentation-needed through."),
                });
            }
        }
        // Traffic: wire-sized packets larger than the next hop's MTU.
        for ((ifindex, direction), oversized) in &self.oversized {
            let Some(name) = self.hop_name(*ifindex) else { continue };
            let Some((next_index, next_mtu)) = self.next_mtu(HopKey { ifindex: *ifindex, direction: *direction }) else { continue };
            let next_name = self.hop_name(next_index).unwrap_or("?");
            findings.push(Finding {
                kind: "mtu-mismatch",
                severity: Severity::Error,
                hop: Some(name.to_string()),
                summary: format!(
                    "{} packets of up to {} bytes crossed {name} {direction} heading for {next_name}, whose MTU is {next_mtu}; {icmp_state}.",
                    oversized.count, oversized.max_len
                ),
                evidence: json!({
                    "interface": name, "direction": direction,
                    "largest_packet": oversized.max_len, "oversized_packets": oversized.count,
                    "next_hop": next_name, "next_hop_mtu": next_mtu,
                    "example": oversized.example,
                    "icmp_frag_needed_sent": frag_needed,
                    "icmp_frag_needed_dropped": frag_needed_dropped,
                    "blackhole": blackhole,
                }),
                advice: format!("Lower the sender's MTU to {next_mtu} or below, and let ICMP fragmentation-needed reach the pod so path MTU discovery works."),
            });
        }
        // The underlay dropped frames on receive while the tunnel was in use: what an MTU
        // mismatch with a peer looks like from this side.
        for hop in self.path.hops().filter(|h| h.kind.is_underlay()) {
            let drops = finish.link_drops.get(&hop.ifindex).copied().unwrap_or_default();
            let already = findings.iter().any(|f| f.kind == "mtu-mismatch");
            if drops.rx_dropped + drops.rx_length_errors > 0 && !already && self.path.has_kind(HopKind::Vxlan) {
                findings.push(Finding {
                    kind: "mtu-mismatch",
                    severity: Severity::Warning,
                    hop: Some(hop.ifname.clone()),
                    summary: format!(
                        "{} dropped {} received frames during the trace (MTU {}): frames larger than its MTU are dropped before any tracepoint sees them.",
                        hop.ifname, drops.rx_dropped + drops.rx_length_errors, hop.mtu
                    ),
                    evidence: json!({ "interface": hop.ifname, "mtu": hop.mtu, "rx_dropped": drops.rx_dropped, "rx_length_errors": drops.rx_length_errors }),
                    advice: "Compare this MTU with the peers' underlay MTU; all nodes' underlays must carry the same MTU.".into(),
                });
            }
        }
        findings
    }

    fn vxlan_source_findings(&self) -> Vec<Finding> {
        let mut findings = Vec::new();
        // Where peers send to is this node's endpoint, unless the user said otherwise.
        let endpoint =
            self.settings.node_ip.or_else(|| self.vxlan_in_destinations.iter().max_by_key(|(_, count)| **count).map(|(ip, _)| *ip));
        let underlays: Vec<_> = self.path.hops().filter(|h| matches!(h.kind, HopKind::Nic | HopKind::Bond)).collect();
        if let Some(endpoint) = endpoint {
            for (source, count) in &self.vxlan_out_sources {
                if *source == endpoint {
                    continue;
                }
                let nic = underlays.iter().find(|h| h.addresses.iter().any(|(ip, _)| ip == source)).or(underlays.first());
                findings.push(Finding {
                    kind: "vxlan-source-mismatch",
                    severity: Severity::Error,
                    hop: nic.map(|h| h.ifname.clone()),
                    summary: format!(
                        "{count} VXLAN packets left with outer source {source}, but this node's tunnel endpoint is {endpoint}{}: peers answer to {endpoint}, so replies miss the tunnel socket or never come back.",
                        if self.settings.node_ip.is_some() { " (--node-ip)" } else { " (where peers send to)" }
                    ),
                    evidence: json!({
                        "outer_source": source, "packets": count, "endpoint": endpoint,
                        "inbound_destinations": self.vxlan_in_destinations,
                        "vxlan_local": self.path.hops().find_map(|h| h.vxlan_local),
                        "interface": nic.map(|h| h.ifname.clone()),
                    }),
                    advice: format!("Bind the VXLAN device to {endpoint} (flannel: --iface / --public-ip), or remove the extra address {source} from the NIC."),
                });
            }
        }
        for nic in &underlays {
            let v4: Vec<_> = nic.addresses.iter().filter(|(ip, _)| ip.is_ipv4()).collect();
            let mut same_subnet = Vec::new();
            for (i, (a, len)) in v4.iter().enumerate() {
                for (b, _) in v4.iter().skip(i + 1) {
                    if same_prefix(*a, *b, *len) {
                        same_subnet.push(format!("{a}/{len} and {b}"));
                    }
                }
            }
            if !same_subnet.is_empty() {
                let vxlan_local = self.path.hops().find_map(|h| h.vxlan_local);
                findings.push(Finding {
                    kind: "vxlan-source-mismatch",
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
                        "vxlan_local": vxlan_local,
                    }),
                    advice: "Keep one address per node in the tunnel subnet (disable the DHCP lease or the static one), and bind the tunnel to it.".into(),
                });
            }
        }
        findings
    }

    fn request_findings(&self, end_ns: u64) -> Vec<Finding> {
        // Requests younger than the timeout at the end may still be answered: not counted.
        let settled = end_ns.max(self.last_ns).saturating_sub(self.settings.reply_timeout_ns);
        let mut groups: BTreeMap<(RequestKind, IpAddr, u16), Vec<&Request>> = BTreeMap::new();
        for (key, request) in &self.requests {
            if !request.answered && request.first_ns <= settled {
                groups.entry((key.kind, request.peer, request.peer_port)).or_default().push(request);
            }
        }
        let mut findings = Vec::new();
        for ((kind, peer, port), requests) in groups {
            let packets: u64 = requests.iter().map(|r| r.packets).sum();
            let reach = Reach::of(self.path, requests.iter().flat_map(|r| r.hops.iter().copied()));
            let (seen_names, first_missing) = (reach.seen_labels(self.path), reach.first_missing(self.path));
            let last_name = seen_names.last().cloned();
            let last_hop = reach.seen.last().and_then(|(_, key)| self.hop_name(key.ifindex)).map(str::to_string);
            let dnat: Vec<String> =
                requests.iter().filter_map(|r| r.dnat_to).map(|(ip, p)| format!("{ip}:{p}")).collect::<BTreeSet<_>>().into_iter().collect();
            let what = match kind {
                RequestKind::Echo => "ICMP echo requests".to_string(),
                RequestKind::TcpSyn => format!("TCP connection attempts to port {port}"),
                RequestKind::Dns => format!("DNS queries to {peer}:{port}"),
            };
            let evidence = json!({
                "requests": requests.len(),
                "packets": packets,
                "peer": peer,
                "port": port,
                "last_hop": last_name,
                "first_hop_missing": first_missing,
                "hops_seen": seen_names,
                "dnat_to": dnat,
            });
            let reach = match (&last_name, &first_missing) {
                (Some(last), Some(missing)) => format!("the last hop they reached was {last}; {missing} never saw them or their reply"),
                (Some(last), None) => format!("they reached {last}"),
                _ => "no hop saw them".to_string(),
            };
            let finding = if kind == RequestKind::Dns {
                let dnat_text = if dnat.is_empty() {
                    format!("{peer} was never DNATed to a backend at any hop: the Service rules (kube-proxy) are missing on this node")
                } else {
                    format!("{peer} was DNATed to {}, so the Service rules exist; the backend did not answer", dnat.join(", "))
                };
                Finding {
                    kind: "dns-unanswered",
                    severity: Severity::Error,
                    hop: last_hop,
                    summary: format!("{} {what} got no answer; {dnat_text}; {reach}.", requests.len()),
                    evidence,
                    advice: if dnat.is_empty() {
                        "Check that kube-proxy runs on this node and has programmed the Service (iptables -t nat -L KUBE-SERVICES, or ipvsadm -Ln).".into()
                    } else {
                        "Check the DNS backend pods (kubectl -n kube-system get pods -l k8s-app=kube-dns) and the path to them.".into()
                    },
                }
            } else {
                Finding {
                    kind: "no-reply",
                    severity: Severity::Error,
                    hop: last_hop,
                    summary: format!(
                        "{} {what} from {} to {peer} got no reply within {} ms; {reach}.",
                        requests.len(),
                        self.path.pod_ip,
                        self.settings.reply_timeout_ns / 1_000_000
                    ),
                    evidence,
                    advice: format!(
                        "Follow the flow on the node that owns {peer}: check its route back to {} and its firewall; see the drop findings on either node.",
                        self.path.pod_ip
                    ),
                }
            };
            findings.push(finding);
        }
        findings
    }

    /// The followed one of two addresses (`a` if neither is).
    fn followed_of(&self, a: IpAddr, b: IpAddr) -> IpAddr {
        if self.path.entries.iter().any(|e| e.pod_ip == a) || !self.path.entries.iter().any(|e| e.pod_ip == b) { a } else { b }
    }

    /// The name of the hop where the followed one of `a` and `b` enters the path.
    fn entry_name(&self, a: IpAddr, b: IpAddr) -> String {
        self.hop_name(self.path.entry(self.followed_of(a, b)).ifindex).unwrap_or_default().to_string()
    }

    fn count_refusal(&mut self, first_sighting: bool, key: (IpAddr, u8, u16, &'static str)) {
        if first_sighting && (self.refused.len() < MAX_GROUPS || self.refused.contains_key(&key)) {
            *self.refused.entry(key).or_default() += 1;
        }
    }

    fn refused_findings(&self) -> Vec<Finding> {
        self.refused
            .iter()
            .map(|((peer, proto, port, how), count)| {
                let proto = proto_name(*proto);
                let listing = if proto == "udp" { "ss -lunp" } else { "ss -ltnp" };
                Finding {
                    kind: "port-refused",
                    severity: Severity::Error,
                    hop: Some(self.entry_name(self.path.pod_ip, *peer)),
                    summary: format!("{peer} port {port}/{proto} refused the pod's packets ({how}, {count} times): nothing listens there."),
                    evidence: json!({ "peer": peer, "port": port, "proto": proto, "signal": how, "count": count }),
                    advice: format!("Check that the server on {peer} listens on {proto} port {port} ({listing} in that pod) and that the Service's targetPort matches."),
                }
            })
            .collect()
    }
}

/// Slaves that are down, flapped, or lack an LACP partner.
fn bond_findings(path: &Path) -> Vec<Finding> {
    let mut findings = Vec::new();
    for hop in path.hops() {
        let Some(slave) = &hop.slave else { continue };
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
            continue;
        }
        let bond = path.hops().find(|h| h.ifname == slave.bond).and_then(|h| h.bond.clone());
        findings.push(Finding {
            kind: "bond-degraded",
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
        });
    }
    findings
}

/// The hops a set of requests reached, and so the first hop on their way that none reached.
struct Reach {
    /// (step, hop) of every hop that saw a request, in travel order.
    seen: Vec<(Step, HopKey)>,
}

impl Reach {
    fn of(path: &Path, hops: impl Iterator<Item = HopKey>) -> Self {
        let mut seen: Vec<(Step, HopKey)> = hops.filter_map(|key| Some((path.step_of(key)?, key))).collect();
        seen.sort_by_key(|(step, key)| (*step, path.at_step(*step).iter().position(|k| k == key)));
        seen.dedup();
        Self { seen }
    }

    fn seen_labels(&self, path: &Path) -> Vec<String> {
        self.seen.iter().filter_map(|(_, key)| path.label(&[*key])).collect()
    }

    /// The step after the last one reached. Of its alternatives, those the requests used at
    /// the same stage on the other way, if any: a reply returns through the bond slave the
    /// request left by, not through an idle one.
    fn first_missing(&self, path: &Path) -> Option<String> {
        let (last, _) = self.seen.last()?;
        let alternatives = path.at_step(last + 1);
        let used: Vec<HopKey> =
            alternatives.iter().copied().filter(|key| self.seen.iter().any(|(_, seen)| seen.ifindex == key.ifindex)).collect();
        path.label(if used.is_empty() { &alternatives } else { &used })
    }
}

fn request_key(layer: &Layer) -> Option<RequestKey> {
    match layer.proto {
        IPPROTO_ICMP | IPPROTO_ICMPV6 if matches!(layer.icmp_type, 8 | 128) => {
            Some(RequestKey { kind: RequestKind::Echo, proto: layer.proto, pod_port: 0, echo: (layer.icmp_id, layer.icmp_seq) })
        }
        IPPROTO_TCP if layer.tcp_flags & TCP_SYN != 0 && layer.tcp_flags & 0x10 == 0 => Some(RequestKey {
            kind: if layer.dport == DNS_PORT { RequestKind::Dns } else { RequestKind::TcpSyn },
            proto: IPPROTO_TCP,
            pod_port: layer.sport,
            echo: (0, 0),
        }),
        IPPROTO_UDP if layer.dport == DNS_PORT => {
            Some(RequestKey { kind: RequestKind::Dns, proto: IPPROTO_UDP, pod_port: layer.sport, echo: (0, 0) })
        }
        _ => None,
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

/// Frees that are the kernel's normal work, not losses: the reason says "not a drop" or the
/// function is a known consumer that still uses the generic free.
fn is_normal_consumption(reason: &str, function: &str, echo_reply: bool) -> bool {
    if matches!(reason, "NOT_DROPPED_YET" | "CONSUMED") {
        return true;
    }
    // Echo replies are delivered to raw sockets (ping) as clones; the original is then freed
    // because no ICMP datagram socket wants it (in ping_rcv, or icmp_rcv where it is inlined).
    if reason == "NO_SOCKET" && echo_reply {
        return true;
    }
    reason == "NOT_SPECIFIED"
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
        _ => "Look up the drop reason in the kernel's include/net/dropreason-core.h and inspect the function that dropped the packets.".into(),
    }
}

/// The report must never be silently incomplete.
pub fn lost_events(counters: &Counters, ring_bytes: u32) -> Option<Finding> {
    if counters.lost_events == 0 && counters.unparsed == 0 {
        return None;
    }
    let mut parts = Vec::new();
    if counters.lost_events > 0 {
        parts.push(format!("{} events were lost because the ring buffer was full", counters.lost_events));
    }
    if counters.unparsed > 0 {
        parts.push(format!("{} packets could not be parsed", counters.unparsed));
    }
    Some(Finding {
        kind: "lost-events",
        severity: Severity::Warning,
        hop: None,
        summary: format!("The report is incomplete: {}.", parts.join(" and ")),
        evidence: json!({
            "lost_events": counters.lost_events,
            "unparsed": counters.unparsed,
            "matched_events": counters.matched,
            "ring_bytes": ring_bytes,
        }),
        advice: if counters.lost_events > 0 {
            format!("Narrow the trace with --peer, --port or --proto, or enlarge the ring with --ring-size (now {ring_bytes} bytes).")
        } else {
            "Unparsed packets are truncated or malformed headers; capture the hop with tcpdump to inspect them.".to_string()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lost_events_only_when_something_was_lost() {
        assert!(lost_events(&Counters::default(), 1 << 20).is_none());
        let finding = lost_events(&Counters { lost_events: 3, ..Default::default() }, 4096).unwrap();
        assert_eq!(finding.kind, "lost-events");
        assert_eq!(finding.severity, Severity::Warning);
        assert_eq!(finding.evidence["lost_events"], 3);
        assert!(finding.advice.contains("--ring-size"));
        let unparsed = lost_events(&Counters { unparsed: 1, ..Default::default() }, 4096).unwrap();
        assert!(unparsed.summary.contains("1 packets could not be parsed"));
    }

    #[test]
    fn subnets_and_consumption() {
        let a: IpAddr = "10.99.0.1".parse().unwrap();
        assert!(same_prefix(a, "10.99.0.11".parse().unwrap(), 24));
        assert!(!same_prefix(a, "10.98.0.1".parse().unwrap(), 24));
        assert!(is_normal_consumption("NOT_SPECIFIED", "skb_release_data", false));
        assert!(!is_normal_consumption("NOT_SPECIFIED", "__dev_forward_skb2", false));
        assert!(!is_normal_consumption("NETFILTER_DROP", "nf_hook_slow", false));
        assert!(is_normal_consumption("NO_SOCKET", "icmp_rcv", true));
        assert!(!is_normal_consumption("NO_SOCKET", "__udp4_lib_rcv", false));
    }
}
