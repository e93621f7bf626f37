//! Findings: what is wrong, at which hop, the evidence, and what to do.

use std::fmt;

use serde::Serialize;
use serde_json::{Value, json};

use crate::attach::Counters;

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
}
