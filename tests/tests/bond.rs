//! Bonded underlays. The bonding module is missing on some hosts (this project's CI host
//! among them), so these run in the VM suite (`cargo xtask vm`), which passes
//! `--include-ignored`. Needs root.

use std::time::Duration;

use anyhow::Result;
use podtrace_tests::{
    lab::{Lab, LabSpec, unique_prefix},
    podtrace::Podtrace,
    traffic,
};
use serde_json::Value;

fn bonded_lab(tag: &str, mode: &str) -> Result<Lab> {
    Lab::up(LabSpec { prefix: unique_prefix(tag), bond_a: Some(mode.to_string()), ..Default::default() })
}

fn packets(report: &Value, ifname: &str, direction: &str) -> u64 {
    report["hops"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["ifname"] == ifname && h["direction"] == direction)
        .unwrap_or_else(|| panic!("no hop {ifname} {direction}: {report:#}"))["packets"]
        .as_u64()
        .unwrap()
}

/// The bond's own view, independent of podtrace (/proc/net/bonding is per namespace).
fn active_slave(lab: &Lab) -> String {
    let output = lab.run_in(&lab.node_a().netns, &["cat", "/proc/net/bonding/bond0"]).expect("reading the bond state");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.strip_prefix("Currently Active Slave: "))
        .expect("an active slave")
        .trim()
        .to_string()
}

#[test]
#[ignore = "needs the bonding module: runs in the VM suite"]
fn active_backup_bond_is_traced_with_its_slaves() -> Result<()> {
    let lab = bonded_lab("bond", "active-backup")?;
    let ns = lab.node_a().netns.clone();
    let active = active_slave(&lab);
    let podtrace = Podtrace::start(&ns, &["follow", &lab.pod_a().ip.to_string(), "-o", "json"])?;
    let output = traffic::ping(&lab.pod_a().netns, lab.pod_b().ip, 5, 56)?;
    assert_eq!(traffic::ping_received(&output), 5);
    let report = podtrace.finish()?.json()?;

    let kinds: Vec<(String, String)> = report["hops"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["direction"] == "egress")
        .map(|h| (h["ifname"].as_str().unwrap().to_string(), h["kind"].as_str().unwrap().to_string()))
        .collect();
    for expected in [("bond0", "bond"), ("eth0", "bond-slave"), ("eth1", "bond-slave")] {
        assert!(kinds.contains(&(expected.0.to_string(), expected.1.to_string())), "{kinds:?}");
    }
    let bond = report["hops"].as_array().unwrap().iter().find(|h| h["ifname"] == "bond0").unwrap();
    assert_eq!(bond["bond"]["mode"], "active-backup");
    assert_eq!(bond["bond"]["active_slave"], active.as_str());
    // Everything leaves through the active slave.
    let backup = if active == "eth0" { "eth1" } else { "eth0" };
    assert_eq!(packets(&report, "bond0", "egress"), 5);
    assert_eq!(packets(&report, &active, "egress"), 5);
    assert_eq!(packets(&report, backup, "egress"), 0);
    assert!(report["findings"].as_array().unwrap().iter().all(|f| f["kind"] != "bond-degraded"));
    Ok(())
}

#[test]
#[ignore = "needs the bonding module: runs in the VM suite"]
fn failover_shows_in_per_slave_counts_and_raises_bond_degraded() -> Result<()> {
    let lab = bonded_lab("fail", "active-backup")?;
    let ns = lab.node_a().netns.clone();
    let first = active_slave(&lab);
    let second = if first == "eth0" { "eth1" } else { "eth0" };
    let podtrace = Podtrace::start(&ns, &["follow", &lab.pod_a().ip.to_string(), "-o", "json"])?;
    traffic::ping(&lab.pod_a().netns, lab.pod_b().ip, 3, 56)?;
    // The switch port of the active slave fails: its carrier drops, the bond fails over.
    let switch_port = if first == "eth0" { "port00" } else { "port01" };
    lab.link_set(&lab.switch_ns, switch_port, false)?;
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(active_slave(&lab), second, "the bond failed over");
    traffic::ping(&lab.pod_a().netns, lab.pod_b().ip, 3, 56)?;
    let report = podtrace.finish()?.json()?;

    assert!(packets(&report, &first, "egress") >= 3, "before the failover");
    assert!(packets(&report, second, "egress") >= 3, "after the failover");
    let degraded: Vec<&Value> = report["findings"].as_array().unwrap().iter().filter(|f| f["kind"] == "bond-degraded").collect();
    assert_eq!(degraded.len(), 1, "{:#}", report["findings"]);
    assert_eq!(degraded[0]["hop"], first.as_str());
    assert_eq!(degraded[0]["evidence"]["mii_up"], false);
    assert_eq!(degraded[0]["evidence"]["bond"], "bond0");
    assert!(degraded[0]["evidence"]["link_failures"].as_u64().unwrap() >= 1);
    assert!(degraded[0]["advice"].as_str().unwrap().contains("/proc/net/bonding/bond0"));
    Ok(())
}

#[test]
#[ignore = "needs the bonding module: runs in the VM suite"]
fn balance_xor_spreads_flows_across_both_slaves() -> Result<()> {
    let lab = bonded_lab("xor", "balance-xor")?;
    let ns = lab.node_a().netns.clone();
    let _echo = traffic::udp_echo(&lab.pod_b().netns, 7000)?;
    let podtrace = Podtrace::start(&ns, &["follow", &lab.pod_a().ip.to_string(), "-o", "json", "--proto", "udp"])?;
    // Each client is a new flow (new source port), so VXLAN picks a new outer source port
    // and layer3+4 hashing a slave per flow.
    for _ in 0..12 {
        traffic::udp_send(&lab.pod_a().netns, lab.pod_b().ip, 7000, 1, 64)?;
    }
    let report = podtrace.finish()?.json()?;
    let (eth0, eth1) = (packets(&report, "eth0", "egress"), packets(&report, "eth1", "egress"));
    assert_eq!(eth0 + eth1, packets(&report, "bond0", "egress"));
    assert!(eth0 > 0 && eth1 > 0, "flows spread across slaves: eth0 {eth0}, eth1 {eth1}");
    let bond = report["hops"].as_array().unwrap().iter().find(|h| h["ifname"] == "bond0").unwrap();
    assert_eq!(bond["bond"]["mode"], "balance-xor");
    Ok(())
}

/// An 802.3ad bond whose switch does not speak LACP (the lab's switch is a plain bridge):
/// no slave has a partner in sync, and each is named.
#[test]
#[ignore = "needs the bonding module: runs in the VM suite"]
fn lacp_bond_without_a_partner_is_degraded() -> Result<()> {
    let lab = bonded_lab("lacp", "802.3ad")?;
    let ns = lab.node_a().netns.clone();
    let bonding = lab.run_in(&ns, &["cat", "/proc/net/bonding/bond0"])?;
    let bonding = String::from_utf8_lossy(&bonding.stdout).into_owned();
    assert!(bonding.contains("IEEE 802.3ad"), "{bonding}");
    let podtrace = Podtrace::start(&ns, &["follow", &lab.pod_a().ip.to_string(), "-o", "json"])?;
    // Whether these get through depends on the aggregator the bond settles on; the finding
    // must not.
    traffic::ping(&lab.pod_a().netns, lab.pod_b().ip, 2, 56)?;
    let report = podtrace.finish()?.json()?;

    let bond = report["hops"].as_array().unwrap().iter().find(|h| h["ifname"] == "bond0").unwrap();
    assert_eq!(bond["bond"]["mode"], "802.3ad");
    let mut named: Vec<&str> = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == "bond-degraded")
        .inspect(|f| {
            assert_eq!(f["evidence"]["lacp_partner_in_sync"], false, "{f:#}");
            assert!(f["summary"].as_str().unwrap().contains("no LACP partner"), "{f:#}");
        })
        .map(|f| f["hop"].as_str().unwrap())
        .collect();
    named.sort();
    assert_eq!(named, ["eth0", "eth1"], "{:#}", report["findings"]);
    Ok(())
}
