//! `lost-events`: events were lost (ring full), packets could not be parsed, or requests were
//! not tracked: the report is incomplete, and must say so.

use serde_json::json;
use tracer_common::MAX_NAT_FLOWS;

use crate::events::correlate::Limits;

use super::{Detector, Finding, FindingKind, LeftOut, MAX_GROUPS, MAX_REQUESTS, Severity, TraceEnd};

#[derive(Default)]
pub struct LostEvents {
    /// What the other detectors' bounded tables had no room for, set when the trace ends.
    pub left_out: Vec<LeftOut>,
}

impl LostEvents {
    fn kernel_finding(&self, end: &TraceEnd<'_>) -> Option<Finding> {
        let counters = &end.counters;
        let decode_errors = end.decode_errors.count;
        let mut parts = Vec::new();
        if counters.lost_events > 0 {
            parts.push(format!("{} packet events were lost because their ring buffer was full", counters.lost_events));
        }
        if counters.lost_kernel_events > 0 {
            parts.push(format!("{} kernel events (drops, retransmits, ICMP errors) were lost", counters.lost_kernel_events));
        }
        if counters.unparsed > 0 {
            parts.push(format!("{} packets could not be parsed", counters.unparsed));
        }
        if decode_errors > 0 {
            parts.push(format!("{decode_errors} ring records could not be decoded"));
        }
        // The kernel forgets its least recently used translated flows past its table's size.
        let forgotten_flows = counters.nat_flows > u64::from(MAX_NAT_FLOWS);
        if forgotten_flows {
            parts.push(format!(
                "{} translated flows of the pod were learned, more than the {MAX_NAT_FLOWS} the kernel programs remember: replies of the \
                 oldest may have gone unrecognised where the node's NAT shows",
                counters.nat_flows
            ));
        }
        let recursion_misses = end.recursion_misses.unwrap_or(0);
        if recursion_misses > 0 {
            parts.push(format!(
                "the kernel skipped the tracepoint programs {recursion_misses} times (they were already running on that CPU)"
            ));
        }
        if parts.is_empty() {
            return None;
        }
        let (ring_bytes, kernel_ring_bytes) = (end.ring_bytes, end.kernel_ring_bytes);
        let mut advice = Vec::new();
        if counters.lost_events > 0 {
            advice.push(format!(
                "narrow the trace with --peer, --port or --proto, or enlarge the ring with --ring-size (now {ring_bytes} bytes)"
            ));
        }
        if counters.lost_kernel_events > 0 {
            advice.push(format!("enlarge the kernel-event ring with --kernel-ring-size (now {kernel_ring_bytes} bytes)"));
        }
        if forgotten_flows {
            advice.push("narrow the trace with --peer, --port or --proto to fewer translated flows".into());
        }
        if counters.unparsed > 0 {
            advice.push("unparsed packets are truncated or malformed headers: capture the hop with tcpdump to inspect them".into());
        }
        if decode_errors > 0 {
            advice.push("undecodable records mean the kernel programs and podtrace disagree: report it with the first error".into());
        }
        if recursion_misses > 0 {
            advice.push("skipped tracepoint runs are kernel events never seen: drops and retransmits may be undercounted".into());
        }
        let advice = advice.join("; ");
        Some(Finding {
            kind: FindingKind::LostEvents,
            severity: Severity::Warning,
            hop: None,
            summary: format!("The report is incomplete: {}.", parts.join(", ")),
            evidence: json!({
                "lost_events": counters.lost_events,
                "lost_kernel_events": counters.lost_kernel_events,
                "unparsed": counters.unparsed,
                "decode_errors": decode_errors,
                "first_decode_error": end.decode_errors.first,
                "recursion_misses": end.recursion_misses,
                "translated_flows": counters.nat_flows,
                "matched_events": counters.matched,
                "ring_bytes": ring_bytes,
                "kernel_ring_bytes": kernel_ring_bytes,
            }),
            advice: advice[..1].to_uppercase() + &advice[1..] + ".",
        })
    }

    fn left_out_finding(&self) -> Option<Finding> {
        let left_out: Vec<&LeftOut> = self.left_out.iter().filter(|left_out| left_out.count > 0).collect();
        if left_out.is_empty() {
            return None;
        }
        let listed: Vec<String> = left_out.iter().map(|left_out| format!("{} {}", left_out.count, left_out.what)).collect();
        let evidence: serde_json::Map<String, serde_json::Value> =
            left_out.iter().map(|left_out| (left_out.what.to_string(), json!(left_out.count))).collect();
        Some(Finding {
            kind: FindingKind::LostEvents,
            severity: Severity::Warning,
            hop: None,
            summary: format!("The findings are incomplete: podtrace's bounded tables left out {}.", listed.join(", ")),
            evidence: json!({ "left_out": evidence, "table_sizes": {
                "requests": MAX_REQUESTS,
                "groups": MAX_GROUPS,
                "packets_in_flight": Limits::default().max_in_flight,
            } }),
            advice: "Narrow the trace with --peer, --port or --proto, or trace for a shorter time.".into(),
        })
    }
}

impl Detector for LostEvents {
    fn findings(&self, end: &TraceEnd<'_>) -> Vec<Finding> {
        self.kernel_finding(end).into_iter().chain(self.left_out_finding()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{super::testing::*, *};
    use crate::{events::decode::DecodeErrors, node::path::fixtures::local_path, probes::Counters};

    #[test]
    fn lost_events_name_the_ring() {
        let path = local_path();
        let end = End { counters: Counters { lost_events: 3, matched: 10, ..Default::default() }, ..Default::default() };
        let findings = end.findings(&LostEvents::default(), &path);
        assert_eq!(findings.len(), 1);
        let finding = &findings[0];
        assert_eq!((finding.kind, finding.severity, finding.hop.as_deref()), (FindingKind::LostEvents, Severity::Warning, None));
        assert_eq!(finding.evidence["lost_events"], 3);
        assert_eq!(finding.evidence["ring_bytes"], 4096);
        assert!(finding.advice.contains("--ring-size"));
    }

    #[test]
    fn more_translated_flows_than_the_kernel_remembers_are_reported() {
        let path = local_path();
        let at_bound = End { counters: Counters { nat_flows: u64::from(MAX_NAT_FLOWS), ..Default::default() }, ..Default::default() };
        assert!(at_bound.findings(&LostEvents::default(), &path).is_empty());
        let beyond = End { counters: Counters { nat_flows: u64::from(MAX_NAT_FLOWS) + 1, ..Default::default() }, ..Default::default() };
        let findings = beyond.findings(&LostEvents::default(), &path);
        assert_eq!(findings.len(), 1, "{findings:#?}");
        assert_eq!(findings[0].evidence["translated_flows"], u64::from(MAX_NAT_FLOWS) + 1);
        assert!(findings[0].summary.contains("translated flows of the pod were learned"), "{}", findings[0].summary);
        assert!(findings[0].advice.starts_with("Narrow the trace"), "{}", findings[0].advice);
    }

    #[test]
    fn lost_kernel_events_and_decode_errors_name_their_remedy() {
        let path = local_path();
        let mut decode_errors = DecodeErrors::default();
        decode_errors.record(&anyhow::anyhow!("ring record with unknown direction 7"));
        decode_errors.record(&anyhow::anyhow!("a second one"));
        let end = End {
            counters: Counters { lost_kernel_events: 4, ..Default::default() },
            decode_errors,
            recursion_misses: Some(3),
            ..Default::default()
        };
        let findings = end.findings(&LostEvents::default(), &path);
        assert_eq!(findings.len(), 1);
        let finding = &findings[0];
        assert_eq!(finding.evidence["lost_kernel_events"], 4);
        assert_eq!(finding.evidence["decode_errors"], 2);
        assert_eq!(finding.evidence["first_decode_error"], "ring record with unknown direction 7");
        assert_eq!(finding.evidence["recursion_misses"], 3);
        assert!(finding.summary.contains("4 kernel events") && finding.summary.contains("2 ring records"), "{}", finding.summary);
        assert!(finding.advice.contains("--kernel-ring-size") && !finding.advice.contains("--ring-size "), "{}", finding.advice);
    }

    #[test]
    fn nothing_lost_is_quiet() {
        let path = local_path();
        let end = End { counters: Counters { matched: 1000, not_ip: 50, ..Default::default() }, ..Default::default() };
        assert!(end.findings(&LostEvents::default(), &path).is_empty());
    }

    #[test]
    fn one_unparsed_packet_or_untracked_request_is_enough() {
        let path = local_path();
        let end = End { counters: Counters { unparsed: 1, ..Default::default() }, ..Default::default() };
        let left_out = vec![LeftOut { what: "DNS queries (the request table was full)", count: 1 }];
        let findings = end.findings(&LostEvents { left_out }, &path);
        assert_eq!(findings.len(), 2);
        assert!(findings[0].summary.contains("1 packets could not be parsed"));
        assert!(findings[0].advice.contains("tcpdump"));
        assert_eq!(findings[1].evidence["left_out"]["DNS queries (the request table was full)"], 1);
        assert!(findings[1].summary.contains("left out 1 DNS queries"), "{}", findings[1].summary);
    }
}
