//! The report as text: a table of hops in travel order, the bonds, and the findings.

use super::{HopReport, Report};
use crate::Direction;

/// The human-readable report.
pub fn render_text(report: &Report) -> String {
    let mut out = format!(
        "podtrace report for {} ({}) on node {} — {:.1} s, {} events, attach {}\n\n",
        report.pod_ip, report.locality, report.node, report.duration_s, report.events, report.attach_mode
    );
    out.push_str(&hop_table(report));
    for note in &report.notes {
        out.push_str(&format!("\nnote: {note}\n"));
    }
    for hop in report.hops.iter().filter(|hop| hop.direction == Direction::Egress) {
        if let Some(bond) = &hop.bond {
            out.push_str(&format!(
                "\nbond {}: mode {}, active slave {}\n",
                hop.ifname,
                bond.mode,
                bond.active_slave.as_deref().unwrap_or("none")
            ));
        }
    }
    let skipped = report.recursion_misses.map_or("unknown".to_string(), |misses| misses.to_string());
    out.push_str(&format!(
        "\nlost events: {}, unparsed packets: {}, lost kernel events: {}, skipped tracepoint runs: {skipped}, undecodable records: {}\n",
        report.lost_events, report.unparsed, report.lost_kernel_events, report.decode_errors.count
    ));
    out.push_str(&findings(report));
    out
}

const HEADER: [&str; 12] = ["hop", "kind", "dir", "mtu", "packets", "bytes", "max_len", "p50 µs", "p99 µs", "linked", "drops", "retrans"];

/// A row per hop in travel order, names left-aligned and numbers right-aligned.
fn hop_table(report: &Report) -> String {
    let rows: Vec<[String; 12]> = report.hops.iter().map(hop_row).collect();
    let mut widths: Vec<usize> = HEADER.iter().map(|h| h.chars().count()).collect();
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut text = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i < 3 {
                text.push_str(&format!("{cell:<width$}  "));
            } else {
                text.push_str(&format!("{cell:>width$}  "));
            }
        }
        text.trim_end().to_string() + "\n"
    };
    let mut table = line(HEADER.to_vec());
    for row in &rows {
        table.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    table
}

fn hop_row(hop: &HopReport) -> [String; 12] {
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
}

fn findings(report: &Report) -> String {
    if report.findings.is_empty() {
        return "\nfindings: none\n".to_string();
    }
    let mut text = "\nfindings:\n".to_string();
    for finding in &report.findings {
        text.push_str(&format!(
            "  [{}] {}{}: {}\n      evidence: {}\n      advice: {}\n",
            finding.severity,
            finding.kind,
            finding.hop.as_ref().map(|h| format!(" at {h}")).unwrap_or_default(),
            finding.summary,
            finding.evidence,
            finding.advice
        ));
    }
    text
}
