//! The per-hop report: what was counted where, in path order, plus findings.

use std::net::IpAddr;

use serde::Serialize;

use crate::{
    Direction,
    attach::{Counters, KernelSources},
    correlate::{Correlator, HopKey},
    discovery::{BondState, HopKind, Locality, Path, SlaveState},
    findings::{Finding, Outcome},
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
    pub findings: Vec<Finding>,
    pub lost_events: u64,
    pub unparsed: u64,
    /// Packets the kernel matched (each crossing of each hop counts once).
    pub events: u64,
}

/// Inputs that are not per-hop statistics.
pub struct RunFacts<'a> {
    pub node: String,
    pub attach_mode: String,
    pub kernel_sources: KernelSources,
    pub duration_s: f64,
    pub counters: Counters,
    pub vanished: &'a [u32],
}

/// The hops in the order a request and then its reply cross them.
pub fn ordered_hops(path: &Path) -> Vec<(usize, Direction)> {
    let outbound = path.hops.iter().enumerate().map(|(i, hop)| (i, hop.from_pod));
    let inbound = path.hops.iter().enumerate().rev().map(|(i, hop)| (i, hop.from_pod.opposite()));
    outbound.chain(inbound).collect()
}

pub fn build(path: &Path, correlator: &Correlator, facts: RunFacts<'_>, outcome: Outcome) -> Report {
    let hops = ordered_hops(path)
        .into_iter()
        .map(|(index, direction)| {
            let hop = &path.hops[index];
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
        findings: outcome.findings,
        lost_events: facts.counters.lost_events,
        unparsed: facts.counters.unparsed,
        events: facts.counters.matched,
    }
}

/// The human-readable report.
pub fn render_text(report: &Report) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "podtrace report for {} ({}) on {} — {:.1} s, {} events, attach {}\n\n",
        report.pod_ip,
        match report.locality {
            Locality::Local => "local pod",
            Locality::Remote => "remote pod",
        },
        report.node,
        report.duration_s,
        report.events,
        report.attach_mode
    ));
    let header = ["hop", "kind", "dir", "mtu", "packets", "bytes", "max_len", "p50 µs", "p99 µs", "linked", "drops", "retrans"];
    let rows: Vec<[String; 12]> = report
        .hops
        .iter()
        .map(|hop| {
            let latency = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1}"));
            [
                if hop.vanished { format!("{} (gone)", hop.ifname) } else { hop.ifname.clone() },
                hop.kind.to_string(),
                hop.direction.to_string(),
                hop.mtu.to_string(),
                hop.packets.to_string(),
                hop.bytes.to_string(),
                hop.max_len.to_string(),
                latency(hop.latency_us.p50),
                latency(hop.latency_us.p99),
                hop.linked.to_string(),
                hop.drops.to_string(),
                hop.retransmits.to_string(),
            ]
        })
        .collect();
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            // Names left-aligned, numbers right-aligned.
            if i < 3 {
                text.push_str(&format!("{cell:<width$}  "));
            } else {
                text.push_str(&format!("{cell:>width$}  "));
            }
        }
        text.trim_end().to_string() + "\n"
    };
    out.push_str(&line(header.to_vec()));
    for row in &rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    for hop in report.hops.iter().filter(|hop| hop.bond.is_some() && hop.direction == Direction::Egress) {
        if let Some(bond) = &hop.bond {
            out.push_str(&format!(
                "\nbond {}: mode {}, active slave {}\n",
                hop.ifname,
                bond.mode,
                bond.active_slave.as_deref().unwrap_or("none")
            ));
        }
    }
    out.push_str(&format!("\nlost events: {}, unparsed packets: {}\n", report.lost_events, report.unparsed));
    if report.findings.is_empty() {
        out.push_str("\nfindings: none\n");
    } else {
        out.push_str("\nfindings:\n");
        for finding in &report.findings {
            out.push_str(&format!(
                "  [{}] {}{}: {}\n      evidence: {}\n      advice: {}\n",
                finding.severity,
                finding.kind,
                finding.hop.as_ref().map(|h| format!(" at {h}")).unwrap_or_default(),
                finding.summary,
                finding.evidence,
                finding.advice
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Hop;

    fn hop(name: &str, index: u32, kind: HopKind, from_pod: Direction) -> Hop {
        Hop {
            ifname: name.into(),
            ifindex: index,
            kind,
            mtu: 1450,
            no_mac_header: false,
            from_pod,
            underlay: None,
            vxlan_local: None,
            addresses: vec![],
            bond: None,
            slave: None,
        }
    }

    fn local_path() -> Path {
        Path {
            pod_ip: "10.244.0.2".parse().unwrap(),
            locality: Locality::Local,
            hops: vec![
                hop("veth1", 5, HopKind::PodVeth, Direction::Ingress),
                hop("cni0", 4, HopKind::Bridge, Direction::Ingress),
                hop("flannel.1", 3, HopKind::Vxlan, Direction::Egress),
                hop("eth0", 2, HopKind::Nic, Direction::Egress),
            ],
            pod_netnsids: vec![],
            warnings: vec![],
        }
    }

    #[test]
    fn hops_are_in_request_then_reply_order() {
        let path = local_path();
        let order: Vec<_> = ordered_hops(&path).into_iter().map(|(i, d)| format!("{}:{}", path.hops[i].ifname, d)).collect();
        assert_eq!(
            order,
            [
                "veth1:ingress",
                "cni0:ingress",
                "flannel.1:egress",
                "eth0:egress",
                "eth0:ingress",
                "flannel.1:ingress",
                "cni0:egress",
                "veth1:egress"
            ]
        );
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
            counters: Counters { matched: 0, lost_events: 2, unparsed: 1, not_ip: 0 },
            vanished: &[3],
        };
        let outcome = Outcome { findings: vec![], drops: Default::default(), retransmits: Default::default() };
        let report = build(&path, &correlator, facts, outcome);
        let json = serde_json::to_value(&report).unwrap();
        for key in ["pod_ip", "node", "duration_s", "hops", "findings", "lost_events", "unparsed"] {
            assert!(json.get(key).is_some(), "missing {key}");
        }
        assert_eq!(json["duration_s"], 1.235);
        assert_eq!(json["lost_events"], 2);
        let first = &json["hops"][0];
        for key in ["ifname", "ifindex", "kind", "direction", "mtu", "packets", "bytes", "max_len", "latency_us", "drops", "retransmits"] {
            assert!(first.get(key).is_some(), "hop missing {key}");
        }
        assert_eq!(first["kind"], "pod-veth");
        assert_eq!(first["direction"], "ingress");
        assert!(first["latency_us"]["p50"].is_null());
        assert_eq!(json["hops"][2]["vanished"], true);
        let text = render_text(&report);
        assert!(text.contains("flannel.1 (gone)"));
        assert!(text.contains("lost events: 2, unparsed packets: 1"));
    }
}
