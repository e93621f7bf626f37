//! The report: the model (this file), which serialises as the JSON report, and its text
//! rendering (`text`).

mod text;

use std::net::IpAddr;

use serde::Serialize;

pub use self::text::render_text;

use crate::{
    Direction,
    diagnosis::{Finding, Outcome},
    events::{correlate::Correlator, decode::DecodeErrors},
    node::{
        HopKey, HopKind, Locality, Path,
        bond::{BondState, SlaveState},
    },
    probes::{Counters, KernelSources},
};

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Latency {
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct HopReport {
    pub ifname: String,
    pub ifindex: u32,
    pub kind: HopKind,
    pub direction: Direction,
    pub mtu: u32,
    pub packets: u64,
    pub bytes: u64,
    pub max_len: u32,
    /// Latency from the previous hop the same packet crossed, in microseconds.
    pub latency_us: Latency,
    pub drops: u64,
    pub retransmits: u64,
    /// Packets also seen at an earlier hop (the fingerprint linked them).
    pub linked: u64,
    /// Packets whose last sighting was here.
    pub last_seen: u64,
    /// The interface disappeared during the trace.
    pub vanished: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bond: Option<BondState>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slave: Option<SlaveState>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Report {
    pub pod_ip: IpAddr,
    pub node: String,
    pub locality: Locality,
    pub attach_mode: String,
    pub kernel_sources: KernelSources,
    pub duration_s: f64,
    pub hops: Vec<HopReport>,
    /// Facts about the path that explain what the hops show (e.g. why a bridge counts none
    /// of the traffic between two pods behind it).
    pub notes: Vec<String>,
    pub findings: Vec<Finding>,
    pub lost_events: u64,
    pub unparsed: u64,
    /// Kernel events (drops, retransmits, ICMP errors) their ring had no room for.
    pub lost_kernel_events: u64,
    /// Tracepoint runs the kernel skipped (null: this kernel does not say).
    pub recursion_misses: Option<u64>,
    /// Flows of the followed pods the node translated (masquerade, NAT) that the kernel
    /// programs learned, to recognise their replies on the NICs.
    pub translated_flows: u64,
    /// Of those, flows begun elsewhere and DNATed to a followed pod (NodePort), learned from
    /// their first reply (see `notes`).
    pub dnat_flows: u64,
    /// Ring records that could not be decoded, and the first one's error.
    pub decode_errors: DecodeErrors,
    /// Packets the kernel matched (each crossing of each hop counts once).
    pub events: u64,
    pub correlation: CorrelationReport,
}

/// How the hop-by-hop correlation's bounded table fared.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct CorrelationReport {
    /// Packets it holds at most.
    pub table_size: usize,
    /// Packets it evicted, full, before their expiry: harmless for a packet past its last hop.
    pub evicted: u64,
    /// Of those, packets seen at a hop within the last 100 ms, likely still in transit.
    pub evicted_in_transit: u64,
}

/// Inputs that are not per-hop statistics.
pub struct RunFacts<'a> {
    pub node: String,
    pub attach_mode: String,
    pub kernel_sources: KernelSources,
    pub duration_s: f64,
    pub counters: Counters,
    pub recursion_misses: Option<u64>,
    pub decode_errors: DecodeErrors,
    pub vanished: &'a [u32],
}

pub fn build(path: &Path, correlator: &Correlator, facts: RunFacts<'_>, outcome: Outcome) -> Report {
    let hops = path
        .travel_order()
        .into_iter()
        .map(|(hop, direction)| {
            let key = HopKey { ifindex: hop.ifindex, direction };
            let stats = correlator.hop_stats(key).cloned().unwrap_or_default();
            let micros = |q: f64| stats.latency_ns.quantile(q).map(|ns| (ns as f64 / 100.0).round() / 10.0);
            HopReport {
                ifname: hop.ifname.clone(),
                ifindex: hop.ifindex,
                kind: hop.kind,
                direction,
                mtu: hop.mtu,
                packets: stats.packets,
                bytes: stats.bytes,
                max_len: stats.max_len,
                latency_us: Latency { p50: micros(0.5), p99: micros(0.99) },
                drops: outcome.drops.get(&key).copied().unwrap_or(0),
                retransmits: outcome.retransmits.get(&key).copied().unwrap_or(0),
                linked: stats.linked,
                last_seen: stats.last_seen,
                vanished: facts.vanished.contains(&hop.ifindex),
                bond: hop.bond.clone(),
                slave: hop.slave.clone(),
            }
        })
        .collect();
    Report {
        pod_ip: path.pod_ip,
        node: facts.node,
        locality: path.locality,
        attach_mode: facts.attach_mode,
        kernel_sources: facts.kernel_sources,
        duration_s: (facts.duration_s * 1000.0).round() / 1000.0,
        hops,
        notes: notes(path, &facts.counters),
        findings: outcome.findings,
        lost_events: facts.counters.lost_events,
        unparsed: facts.counters.unparsed,
        lost_kernel_events: facts.counters.lost_kernel_events,
        recursion_misses: facts.recursion_misses,
        translated_flows: facts.counters.nat_flows,
        dnat_flows: facts.counters.dnat_flows,
        decode_errors: facts.decode_errors,
        events: facts.counters.matched,
        correlation: CorrelationReport {
            table_size: correlator.table_size(),
            evicted: correlator.evicted,
            evicted_in_transit: correlator.evicted_in_transit,
        },
    }
}

/// The path's notes, and what the run's counters say the hops could not show.
fn notes(path: &Path, counters: &Counters) -> Vec<String> {
    let mut notes = path.notes.clone();
    if counters.dnat_flows > 0 {
        notes.push(format!(
            "flows DNATed to the pod (NodePort): {}, each recognised from its first reply, so its packets before it (a TCP SYN, a \
             first datagram) were not matched on the hops before the NAT, where they carry the node's address",
            counters.dnat_flows
        ));
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::path::fixtures::local_path;

    #[test]
    fn flows_dnated_to_the_pod_are_counted_and_their_unmatched_first_packets_noted() {
        let path = local_path();
        let quiet = notes(&path, &Counters { nat_flows: 3, ..Default::default() });
        assert_eq!(quiet, path.notes, "masqueraded flows are matched from their first packet");
        let noted = notes(&path, &Counters { nat_flows: 3, dnat_flows: 2, ..Default::default() });
        assert_eq!(noted.len(), path.notes.len() + 1);
        let note = noted.last().unwrap();
        assert!(note.starts_with("flows DNATed to the pod (NodePort): 2,") && note.contains("before the NAT"), "{note}");
    }

    #[test]
    fn report_serialises_the_documented_schema() {
        let path = local_path();
        let correlator = Correlator::new(vec![path.pod_ip], Default::default());
        let facts = RunFacts {
            node: "node-a".into(),
            attach_mode: "tcx".into(),
            kernel_sources: KernelSources::default(),
            duration_s: 1.23456,
            counters: Counters { lost_events: 2, unparsed: 1, lost_kernel_events: 4, ..Default::default() },
            recursion_misses: None,
            decode_errors: DecodeErrors { count: 1, first: Some("ring record with unknown direction 9".into()) },
            vanished: &[3],
        };
        let outcome = Outcome { findings: vec![], drops: Default::default(), retransmits: Default::default() };
        let report = build(&path, &correlator, facts, outcome);
        let json = serde_json::to_value(&report).unwrap();
        for key in ["pod_ip", "node", "duration_s", "hops", "findings", "lost_events", "unparsed", "lost_kernel_events", "recursion_misses"]
        {
            assert!(json.get(key).is_some(), "missing {key}");
        }
        assert_eq!(json["duration_s"], 1.235);
        assert_eq!(json["lost_events"], 2);
        assert_eq!(json["lost_kernel_events"], 4);
        assert_eq!(json["correlation"], serde_json::json!({"table_size": 57_344, "evicted": 0, "evicted_in_transit": 0}));
        assert!(json["recursion_misses"].is_null(), "unknown on this kernel, not 0");
        assert_eq!(json["decode_errors"], serde_json::json!({"count": 1, "first": "ring record with unknown direction 9"}));
        let first = &json["hops"][0];
        for key in ["ifname", "ifindex", "kind", "direction", "mtu", "packets", "bytes", "max_len", "latency_us", "drops", "retransmits"] {
            assert!(first.get(key).is_some(), "hop missing {key}");
        }
        assert_eq!(first["kind"], "pod-veth");
        assert_eq!(first["direction"], "ingress");
        assert!(first["latency_us"]["p50"].is_null());
        assert_eq!(json["hops"][2]["vanished"], true);
        let rows: Vec<String> = json["hops"].as_array().unwrap().iter().map(|h| format!("{}:{}", h["ifname"], h["direction"])).collect();
        assert_eq!(rows.len(), 8, "each hop out and back: {rows:?}");
        let text = render_text(&report);
        assert!(text.contains("flannel.1 (gone)"));
        assert!(text.starts_with("podtrace report for 10.244.0.2 (local pod) on node node-a — "), "{text}");
        assert!(
            text.contains(
                "lost events: 2, unparsed packets: 1, lost kernel events: 4, skipped tracepoint runs: unknown, undecodable records: 1"
            ),
            "{text}"
        );
    }
}
