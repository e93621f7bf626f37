//! `lost-events`: events were lost (ring full), packets could not be parsed, or requests were
//! not tracked: the report is incomplete, and must say so.

use serde_json::json;

use super::{Detector, Finding, FindingKind, MAX_REQUESTS, Severity, TraceEnd};

#[derive(Default)]
pub struct LostEvents {
    /// Requests the request trackers had no room for, set when the trace ends.
    pub untracked_requests: u64,
}

impl LostEvents {
    fn kernel_finding(&self, end: &TraceEnd<'_>) -> Option<Finding> {
        let counters = &end.counters;
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
        let ring_bytes = end.ring_bytes;
        Some(Finding {
            kind: FindingKind::LostEvents,
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

    fn untracked_finding(&self) -> Option<Finding> {
        (self.untracked_requests > 0).then(|| Finding {
            kind: FindingKind::LostEvents,
            severity: Severity::Warning,
            hop: None,
            summary: format!("{} requests were not tracked: the request table was full.", self.untracked_requests),
            evidence: json!({ "untracked_requests": self.untracked_requests, "table_size": MAX_REQUESTS }),
            advice: "Narrow the trace with --peer, --port or --proto.".into(),
        })
    }
}

impl Detector for LostEvents {
    fn findings(&self, end: &TraceEnd<'_>) -> Vec<Finding> {
        self.kernel_finding(end).into_iter().chain(self.untracked_finding()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{super::testing::*, *};
    use crate::{node::path::fixtures::local_path, probes::Counters};

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
    fn nothing_lost_is_quiet() {
        let path = local_path();
        let end = End { counters: Counters { matched: 1000, not_ip: 50, ..Default::default() }, ..Default::default() };
        assert!(end.findings(&LostEvents::default(), &path).is_empty());
    }

    #[test]
    fn one_unparsed_packet_or_untracked_request_is_enough() {
        let path = local_path();
        let end = End { counters: Counters { unparsed: 1, ..Default::default() }, ..Default::default() };
        let findings = end.findings(&LostEvents { untracked_requests: 1 }, &path);
        assert_eq!(findings.len(), 2);
        assert!(findings[0].summary.contains("1 packets could not be parsed"));
        assert!(findings[0].advice.contains("tcpdump"));
        assert_eq!(findings[1].evidence["untracked_requests"], 1);
    }
}
