//! Findings: what is wrong, at which hop, the evidence, and what to do.
//!
//! One detector per finding kind, each in its own file. While the trace runs, every detector
//! is fed the packets at each hop and the kernel's drop, retransmit and ICMP events, and keeps
//! bounded aggregates; when it ends, each is asked for its findings.

mod attempts;
mod bond;
mod br_netfilter;
mod connection_reset;
mod copies;
mod dns;
mod drop;
mod hairpin;
mod lost_events;
mod mtu;
mod no_reply;
mod pod_gone;
mod port_refused;
mod requests;
mod retransmits;
mod services;
#[cfg(test)]
mod testing;
mod vxlan_source;

use std::{collections::HashMap, fmt, net::IpAddr};

use serde::Serialize;
use serde_json::Value;

use self::{
    bond::Bonds, br_netfilter::BrNetfilterOff, connection_reset::ConnectionReset, dns::DnsUnanswered, drop::Drops, hairpin::HairpinOff,
    lost_events::LostEvents, mtu::MtuMismatch, no_reply::NoReply, pod_gone::PodGone, port_refused::PortRefused, retransmits::Retransmits,
    services::ServiceFlows, vxlan_source::VxlanSourceMismatch,
};
use crate::{
    events::{
        correlate::{Correlator, Sighting},
        decode::{DecodeErrors, KernelRecord, Packet},
    },
    kernel::symbols::KernelSymbols,
    node::{HopKey, HopKind, LinkDrops, Path},
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

/// What a finding is about; serialised as the README's kebab-case names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FindingKind {
    Drop,
    Retransmits,
    MtuMismatch,
    VxlanSourceMismatch,
    NoReply,
    DnsUnanswered,
    PortRefused,
    ConnectionReset,
    CopiesFreed,
    PodGone,
    LostEvents,
    BondDegraded,
    BondMisconfigured,
    BrNetfilterOff,
    HairpinOff,
}

impl fmt::Display for FindingKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Drop => "drop",
            Self::Retransmits => "retransmits",
            Self::MtuMismatch => "mtu-mismatch",
            Self::VxlanSourceMismatch => "vxlan-source-mismatch",
            Self::NoReply => "no-reply",
            Self::DnsUnanswered => "dns-unanswered",
            Self::PortRefused => "port-refused",
            Self::ConnectionReset => "connection-reset",
            Self::CopiesFreed => "copies-freed",
            Self::PodGone => "pod-gone",
            Self::LostEvents => "lost-events",
            Self::BondDegraded => "bond-degraded",
            Self::BondMisconfigured => "bond-misconfigured",
            Self::BrNetfilterOff => "br-netfilter-off",
            Self::HairpinOff => "hairpin-off",
        })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finding {
    pub kind: FindingKind,
    pub severity: Severity,
    /// The interface, or `None` for a finding about the whole path.
    pub hop: Option<String>,
    pub summary: String,
    pub evidence: Value,
    pub advice: String,
}

/// The TCP ACK flag (the others are in `events::decode`).
const TCP_ACK: u8 = 0x10;

/// Bounds on what each detector keeps, whatever the trace length.
const MAX_REQUESTS: usize = 16_384;
const MAX_GROUPS: usize = 1_024;

pub struct Settings {
    /// This node's tunnel endpoint, when the user knows it (`--node-ip`).
    pub node_ip: Option<IpAddr>,
    /// A request with no reply after this long counts as unanswered.
    pub reply_timeout_ns: u64,
    /// This node's own network namespace inode.
    pub own_netns: u32,
}

/// What is known when the trace has ended.
pub struct TraceEnd<'b> {
    /// CLOCK_MONOTONIC when the trace ended, on the same clock as the events.
    pub end_ns: u64,
    pub counters: Counters,
    pub ring_bytes: u32,
    pub kernel_ring_bytes: u32,
    pub decode_errors: &'b DecodeErrors,
    /// Tracepoint runs the kernel skipped because one was already running on that CPU
    /// (None: this kernel does not report it).
    pub recursion_misses: Option<u64>,
    /// Whether the ICMP errors the kernel sends were observed (`icmp:icmp_send` attached):
    /// without it, "none was sent" is unknown.
    pub icmp_send_observed: bool,
    /// Receive/transmit drop counters of each hop: how much they grew during the trace. A
    /// hop with none disappeared: its counters could not be read at the end.
    pub link_drops: &'b HashMap<u32, LinkDrops>,
    /// The path as it is at the end (bond and slave state re-read).
    pub final_path: &'b Path,
    pub drop_reasons: &'b HashMap<i64, String>,
    pub symbols: Option<&'b KernelSymbols>,
    /// Packets the full correlation table evicted while they may still have been crossing
    /// the path (`Correlator::evicted_in_transit`).
    pub evicted_in_transit: u64,
}

impl TraceEnd<'_> {
    /// Whether the followed local pod `pod_ip` was deleted during the trace: its veth is gone.
    pub fn pod_gone(&self, pod_ip: IpAddr) -> bool {
        self.final_path.entries.iter().filter(|entry| entry.pod_ip == pod_ip).any(|entry| {
            self.final_path.hop(entry.hop.ifindex).is_some_and(|hop| hop.kind == HopKind::PodVeth)
                && !self.link_drops.contains_key(&entry.hop.ifindex)
        })
    }
}

/// One kind of finding: fed every packet and kernel event while the trace runs, asked for its
/// findings when it ends.
pub trait Detector {
    fn observe_packet(&mut self, _packet: &Packet, _sighting: Option<&Sighting>) {}
    fn observe_kernel(&mut self, _record: &KernelRecord) {}
    fn findings(&self, end: &TraceEnd<'_>) -> Vec<Finding>;
    /// What its bounded tables had to leave out: the report must say so.
    fn left_out(&self) -> Vec<LeftOut> {
        Vec::new()
    }
}

/// A detector's table of flows or requests, looked up for every packet: keyed by header
/// fields the network chooses, so hashed with a per-run random seed (foldhash), a fraction of
/// SipHash's cost.
pub(crate) type FlowMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;

/// Events a detector's bounded table had no room for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LeftOut {
    /// What was left out, plural: "TCP connection attempts", "drops".
    pub what: &'static str,
    pub count: u64,
}

/// The findings, and the per-hop counts the report shows beside the packet counts.
pub struct Outcome {
    pub findings: Vec<Finding>,
    /// Per (ifindex, direction): kernel drops attributed there.
    pub drops: HashMap<HopKey, u64>,
    /// Retransmits, attributed to the hop where the connection's pod enters the path.
    pub retransmits: HashMap<HopKey, u64>,
}

/// Every detector, fed together.
pub struct Diagnosis<'a> {
    /// The followed pods' Service flows, learned once per packet for the detectors that read
    /// them (br-netfilter-off, hairpin-off, the drops), which are fed them explicitly.
    services: ServiceFlows<'a>,
    br_netfilter: BrNetfilterOff<'a>,
    hairpin: HairpinOff<'a>,
    drops: Drops<'a>,
    retransmits: Retransmits<'a>,
    mtu: MtuMismatch<'a>,
    vxlan_source: VxlanSourceMismatch<'a>,
    no_reply: NoReply<'a>,
    dns: DnsUnanswered<'a>,
    port_refused: PortRefused<'a>,
    connection_reset: ConnectionReset<'a>,
    pod_gone: PodGone<'a>,
    bond: Bonds<'a>,
    lost_events: LostEvents,
    /// The newest event seen: requests younger than the reply timeout by then are not judged.
    last_ns: u64,
}

impl<'a> Diagnosis<'a> {
    pub fn new(path: &'a Path, settings: Settings) -> Self {
        Self {
            services: ServiceFlows::new(path),
            br_netfilter: BrNetfilterOff::new(path),
            hairpin: HairpinOff::new(path, settings.own_netns),
            drops: Drops::new(path, settings.own_netns),
            retransmits: Retransmits::new(path),
            mtu: MtuMismatch::new(path),
            vxlan_source: VxlanSourceMismatch::new(path, settings.node_ip),
            no_reply: NoReply::new(path, settings.reply_timeout_ns),
            dns: DnsUnanswered::new(path, settings.reply_timeout_ns),
            port_refused: PortRefused::new(path),
            connection_reset: ConnectionReset::new(path),
            pod_gone: PodGone::new(path),
            bond: Bonds::new(path),
            lost_events: LostEvents::default(),
            last_ns: 0,
        }
    }

    /// In the order findings of equal severity are listed: a pitfall that explains the
    /// packets first.
    fn detectors(&self) -> [&dyn Detector; 13] {
        [
            &self.br_netfilter,
            &self.hairpin,
            &self.drops,
            &self.retransmits,
            &self.mtu,
            &self.vxlan_source,
            &self.no_reply,
            &self.dns,
            &self.port_refused,
            &self.connection_reset,
            &self.pod_gone,
            &self.bond,
            &self.lost_events,
        ]
    }

    fn detectors_mut(&mut self) -> [&mut dyn Detector; 13] {
        [
            &mut self.br_netfilter,
            &mut self.hairpin,
            &mut self.drops,
            &mut self.retransmits,
            &mut self.mtu,
            &mut self.vxlan_source,
            &mut self.no_reply,
            &mut self.dns,
            &mut self.port_refused,
            &mut self.connection_reset,
            &mut self.pod_gone,
            &mut self.bond,
            &mut self.lost_events,
        ]
    }

    pub fn observe_packet(&mut self, packet: &Packet, sighting: Option<&Sighting>) {
        self.last_ns = self.last_ns.max(packet.ktime_ns);
        if let Some((flow, service)) = self.services.observe(packet, sighting) {
            self.hairpin.flow_opened(flow, service);
        }
        self.br_netfilter.observe_packet(packet, sighting, &self.services);
        for detector in self.detectors_mut() {
            detector.observe_packet(packet, sighting);
        }
    }

    /// A kernel event; `sightings` has the journeys of the packets seen so far.
    pub fn observe_kernel(&mut self, record: &KernelRecord, sightings: &Correlator) {
        self.last_ns = self.last_ns.max(record.ktime_ns);
        self.hairpin.observe_kernel(record, &self.services);
        self.drops.observe_kernel(record, sightings);
        for detector in self.detectors_mut() {
            detector.observe_kernel(record);
        }
    }

    /// Whether any drop was seen, so kernel symbols are only loaded when needed.
    pub fn has_drops(&self) -> bool {
        self.drops.any()
    }

    pub fn finish(mut self, end: TraceEnd<'_>) -> Outcome {
        // Events can carry timestamps a little past the moment the trace was stopped.
        let end = TraceEnd { end_ns: end.end_ns.max(self.last_ns), ..end };
        // Packets a pitfall finding explains are not also blamed on something else.
        let mut explained = self.br_netfilter.explained();
        explained.extend(self.hairpin.explained());
        self.drops.defer_to(&explained);
        self.drops.know_backends(self.services.backends());
        self.no_reply.defer_to(&explained);
        self.dns.defer_to(&explained);
        self.port_refused.defer_to(&explained);
        self.connection_reset.defer_to(&explained);
        self.retransmits.defer_to(&explained);
        let in_transit = LeftOut {
            what: "packets from the hop-by-hop correlation, evicted by its full table while still in transit (their later hops go unlinked)",
            count: end.evicted_in_transit,
        };
        let left_out: Vec<LeftOut> =
            self.detectors().iter().flat_map(|detector| detector.left_out()).chain([in_transit]).filter(|l| l.count > 0).collect();
        self.lost_events.left_out = left_out;
        let mut findings: Vec<Finding> = self.detectors().iter().flat_map(|detector| detector.findings(&end)).collect();
        findings.sort_by_key(|finding| std::cmp::Reverse(finding.severity));
        Outcome { findings, drops: self.drops.per_hop(&end), retransmits: self.retransmits.per_hop() }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::{testing::*, *};
    use crate::{
        Direction,
        events::decode::{KernelRecordKind, Layer, TCP_RST, TCP_SYN},
        node::{
            bridge::{BridgeNetfilter, FamilySwitch},
            path::fixtures::local_path,
        },
    };

    const NODE_NS: u32 = 4026531840;
    const TIMEOUT: u64 = 1_000_000_000;
    const SERVICE: &str = "10.96.0.20";
    const BACKEND: &str = "10.244.0.3";
    const NOT_SPECIFIED: u32 = 2;
    const NETFILTER_DROP: u32 = 9;

    /// Feeds a whole trace through every detector, as the event loop does.
    struct Trace<'a> {
        diagnosis: Diagnosis<'a>,
        feed: Feed,
    }

    impl<'a> Trace<'a> {
        fn new(path: &'a Path) -> Self {
            let settings = Settings { node_ip: None, reply_timeout_ns: TIMEOUT, own_netns: NODE_NS };
            Self { diagnosis: Diagnosis::new(path, settings), feed: Feed::new(path) }
        }

        fn packet(&mut self, layer: &Layer, (ifindex, direction): (u32, Direction), at_ns: u64) {
            let packet = packet(layer.clone(), ifindex, direction, at_ns);
            let sighting = self.feed.observe(&packet);
            self.diagnosis.observe_packet(&packet, sighting.as_ref());
        }

        fn kernel(&mut self, kind: KernelRecordKind, layer: Layer, ifindex: u32, received: bool) {
            self.diagnosis.observe_kernel(&kernel(kind, layer, ifindex, received, NODE_NS), self.feed.sightings());
        }

        fn finish(self, path: &Path) -> Vec<Finding> {
            let end = End {
                end_ns: 10 * TIMEOUT,
                drop_reasons: HashMap::from([
                    (i64::from(NOT_SPECIFIED), "NOT_SPECIFIED".into()),
                    (i64::from(NETFILTER_DROP), "NETFILTER_DROP".into()),
                ]),
                ..Default::default()
            };
            self.diagnosis.finish(end.trace_end(path)).findings
        }
    }

    /// Packets the correlation table evicted while in transit leave hops unlinked: the report
    /// must say its per-hop linking is incomplete; evictions of finished packets are no news.
    #[test]
    fn packets_evicted_in_transit_are_reported_as_left_out() {
        let path = local_path();
        let finish = |evicted_in_transit| {
            let diagnosis = Diagnosis::new(&path, Settings { node_ip: None, reply_timeout_ns: TIMEOUT, own_netns: NODE_NS });
            diagnosis.finish(End { evicted_in_transit, ..Default::default() }.trace_end(&path)).findings
        };
        assert!(finish(0).is_empty());
        let findings = finish(7);
        assert_eq!(findings.len(), 1, "{findings:#?}");
        assert_eq!((findings[0].kind, findings[0].severity), (FindingKind::LostEvents, Severity::Warning));
        assert!(findings[0].summary.contains("left out 7 packets from the hop-by-hop correlation"), "{}", findings[0].summary);
        assert_eq!(findings[0].evidence["table_sizes"]["packets_in_flight"], 57_344);
    }

    const VETH_IN: (u32, Direction) = (5, Direction::Ingress);
    const VETH_OUT: (u32, Direction) = (5, Direction::Egress);
    const CNI0_IN: (u32, Direction) = (4, Direction::Ingress);
    const CNI0_OUT: (u32, Direction) = (4, Direction::Egress);

    /// With br_netfilter off, pod A connects to a Service whose backend is behind cni0 too: the
    /// node DNATs the SYN and routes it back out cni0 (telling the pod so with a redirect, which
    /// its NAT drops), the backend's SYN-ACK is bridged to pod A untranslated, pod A's kernel
    /// answers it with a RST and retransmits its SYN. One finding names it; the RST, the
    /// retransmit and the redirect blame nothing else.
    #[test]
    fn br_netfilter_off_is_named_once() {
        let mut path = local_path();
        path.stages[1].hops[0].bridge_netfilter = Some(BridgeNetfilter::new(Some(FamilySwitch::default()), FamilySwitch::default()));
        let mut trace = Trace::new(&path);
        let syn = tcp(POD, 40000, SERVICE, 80, TCP_SYN, 0);
        trace.packet(&syn, VETH_IN, 0);
        trace.packet(&syn, CNI0_IN, 1000);
        trace.packet(&Layer { dst: ip(BACKEND), dport: 8080, ..syn }, CNI0_OUT, 2000);
        let redirect = Layer { icmp_type: 5, icmp_code: 1, icmp_id: 0x0af4, icmp_seq: 3, ..echo("10.244.0.1", POD, 5, 0) };
        trace.kernel(KernelRecordKind::Drop { reason: NETFILTER_DROP, location: 0x10 }, redirect, 0, false);
        trace.packet(&Layer { ip_id: 50, ..tcp(BACKEND, 8080, POD, 40000, TCP_SYN | TCP_ACK, 0) }, VETH_OUT, 3000);
        trace.packet(&Layer { ip_id: 2, ..tcp(POD, 40000, BACKEND, 8080, TCP_RST, 0) }, VETH_IN, 4000);
        trace.kernel(KernelRecordKind::Retransmit { seq: 0, tcp_state: 2 }, tcp(POD, 40000, SERVICE, 80, TCP_SYN, 0), 0, false);
        let findings = trace.finish(&path);
        let serious: Vec<_> = findings.iter().filter(|f| f.severity != Severity::Info).collect();
        assert_eq!(serious.len(), 1, "{findings:#?}");
        assert_eq!(serious[0].kind, FindingKind::BrNetfilterOff);
        let others: Vec<_> = findings.iter().filter(|f| f.kind != FindingKind::BrNetfilterOff).collect();
        assert_eq!(others.len(), 1, "{others:#?}");
        assert_eq!(others[0].kind, FindingKind::Drop);
        assert_eq!(others[0].evidence["about_service_dnat"], true, "{:#?}", others[0]);
    }

    /// With hairpin mode off on pod A's port, pod A connects to a Service that selects pod A
    /// itself: the bridge drops the SYN, DNATed to pod A, as pod A's port receives it (the
    /// retransmission after crossing cni0's transmit, as when the bridge had to resolve pod
    /// A's address first). One finding names it; the drops and the unanswered attempt blame
    /// nothing else, not even as copies.
    #[test]
    fn hairpin_off_is_named_once() {
        let mut path = local_path();
        path.stages[0].hops[0].hairpin = Some(false);
        let mut trace = Trace::new(&path);
        for attempt in 0..2u16 {
            let syn = Layer { ip_id: attempt, ..tcp(POD, 40000, SERVICE, 80, TCP_SYN, 0) };
            let at = u64::from(attempt) * TIMEOUT;
            trace.packet(&syn, VETH_IN, at);
            let dnated = Layer { dst: ip(POD), dport: 8080, ..syn };
            if attempt == 1 {
                trace.packet(&dnated, CNI0_OUT, at + 1000);
            }
            trace.kernel(KernelRecordKind::Drop { reason: NOT_SPECIFIED, location: 0x10 }, dnated, 5, true);
        }
        trace.kernel(KernelRecordKind::Retransmit { seq: 0, tcp_state: 2 }, tcp(POD, 40000, SERVICE, 80, TCP_SYN, 0), 0, false);
        let findings = trace.finish(&path);
        assert_eq!(findings.len(), 1, "{findings:#?}");
        assert_eq!((findings[0].kind, findings[0].evidence["drops"].as_u64()), (FindingKind::HairpinOff, Some(2)));
    }

    /// The same trace with hairpin mode on: whatever dropped those packets is not hairpin mode,
    /// so the drop and the unanswered attempt are reported as they are.
    #[test]
    fn with_hairpin_on_the_same_drops_are_plain_drops() {
        let mut path = local_path();
        path.stages[0].hops[0].hairpin = Some(true);
        let mut trace = Trace::new(&path);
        let syn = tcp(POD, 40000, SERVICE, 80, TCP_SYN, 0);
        trace.packet(&syn, VETH_IN, 0);
        trace.kernel(KernelRecordKind::Drop { reason: NOT_SPECIFIED, location: 0x10 }, Layer { dst: ip(POD), dport: 8080, ..syn }, 5, true);
        let kinds: Vec<FindingKind> = trace.finish(&path).iter().map(|f| f.kind).collect();
        assert_eq!(kinds, [FindingKind::Drop, FindingKind::NoReply]);
    }

    #[test]
    fn kinds_serialise_to_the_documented_names() {
        let names: Vec<String> = [
            FindingKind::Drop,
            FindingKind::Retransmits,
            FindingKind::MtuMismatch,
            FindingKind::VxlanSourceMismatch,
            FindingKind::NoReply,
            FindingKind::DnsUnanswered,
            FindingKind::PortRefused,
            FindingKind::ConnectionReset,
            FindingKind::CopiesFreed,
            FindingKind::PodGone,
            FindingKind::LostEvents,
            FindingKind::BondDegraded,
            FindingKind::BondMisconfigured,
            FindingKind::BrNetfilterOff,
            FindingKind::HairpinOff,
        ]
        .iter()
        .map(|kind| {
            let json = serde_json::to_value(kind).unwrap();
            assert_eq!(json.as_str().unwrap(), kind.to_string(), "Display and JSON agree");
            kind.to_string()
        })
        .collect();
        assert_eq!(
            names,
            [
                "drop",
                "retransmits",
                "mtu-mismatch",
                "vxlan-source-mismatch",
                "no-reply",
                "dns-unanswered",
                "port-refused",
                "connection-reset",
                "copies-freed",
                "pod-gone",
                "lost-events",
                "bond-degraded",
                "bond-misconfigured",
                "br-netfilter-off",
                "hairpin-off"
            ]
        );
    }
}
