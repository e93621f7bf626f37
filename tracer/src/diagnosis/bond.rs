//! `bond-degraded`: a bond slave is down, has link failures, or has no LACP partner in
//! 802.3ad mode, as the bond reports it at the end of the trace.

use serde_json::json;

use super::{Detector, Finding, FindingKind, Severity, TraceEnd};
use crate::node::{Hop, Path, bond::SlaveState};

pub struct BondDegraded;

impl Detector for BondDegraded {
    fn findings(&self, end: &TraceEnd<'_>) -> Vec<Finding> {
        let path = end.final_path;
        path.hops().filter_map(|hop| Some((hop, hop.slave.as_ref()?))).filter_map(|(hop, slave)| degraded(path, hop, slave)).collect()
    }
}

fn degraded(path: &Path, hop: &Hop, slave: &SlaveState) -> Option<Finding> {
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
        return None;
    }
    let bond = path.hops().find(|h| h.ifname == slave.bond).and_then(|h| h.bond.clone());
    Some(Finding {
        kind: FindingKind::BondDegraded,
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
    })
}

#[cfg(test)]
mod tests {
    use super::{super::testing::*, *};
    use crate::node::{bond::BondState, path::fixtures::bonded_path};

    fn with_slaves(eth0: SlaveState, eth1: SlaveState) -> Path {
        let mut path = bonded_path();
        path.stages[3].hops[0].bond = Some(BondState { mode: "active-backup".into(), active_slave: Some("eth1".into()) });
        path.stages[4].hops[0].slave = Some(eth0);
        path.stages[4].hops[1].slave = Some(eth1);
        path
    }

    fn healthy() -> SlaveState {
        SlaveState { bond: "bond0".into(), mii_up: true, link_failures: 0, lacp_partner_in_sync: None }
    }

    #[test]
    fn a_slave_that_is_down_is_an_error() {
        let path = with_slaves(SlaveState { mii_up: false, link_failures: 1, ..healthy() }, healthy());
        let findings = End::default().findings(&BondDegraded, &path);
        assert_eq!(findings.len(), 1);
        let finding = &findings[0];
        assert_eq!((finding.kind, finding.severity, finding.hop.as_deref()), (FindingKind::BondDegraded, Severity::Error, Some("eth0")));
        assert_eq!(finding.evidence["active_slave"], "eth1");
        assert_eq!(finding.evidence["mode"], "active-backup");
        assert!(finding.summary.contains("its MII status is down, it has 1 link failures"), "{}", finding.summary);
    }

    #[test]
    fn healthy_slaves_are_quiet() {
        let path = with_slaves(healthy(), SlaveState { lacp_partner_in_sync: Some(true), ..healthy() });
        assert!(End::default().findings(&BondDegraded, &path).is_empty());
    }

    #[test]
    fn an_up_slave_with_past_failures_or_no_lacp_partner_is_a_warning() {
        let path = with_slaves(SlaveState { link_failures: 1, ..healthy() }, SlaveState { lacp_partner_in_sync: Some(false), ..healthy() });
        let findings = End::default().findings(&BondDegraded, &path);
        assert_eq!(
            findings.iter().map(|f| (f.hop.as_deref().unwrap(), f.severity)).collect::<Vec<_>>(),
            [("eth0", Severity::Warning), ("eth1", Severity::Warning)]
        );
        assert!(findings[1].summary.contains("no LACP partner in sync"));
    }
}
