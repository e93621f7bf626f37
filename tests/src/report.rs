//! Reading podtrace's JSON report (`--output json`).

use serde_json::Value;

/// The hop `ifname` `direction`; panics (naming the report) when the path has no such hop.
pub fn hop<'a>(report: &'a Value, ifname: &str, direction: &str) -> &'a Value {
    report["hops"]
        .as_array()
        .expect("a report has hops")
        .iter()
        .find(|h| h["ifname"] == ifname && h["direction"] == direction)
        .unwrap_or_else(|| panic!("no hop {ifname} {direction} in {report:#}"))
}

/// Findings of severity warning or error.
pub fn serious_findings(report: &Value) -> Vec<&Value> {
    report["findings"].as_array().expect("a report has findings").iter().filter(|f| f["severity"] != "info").collect()
}
