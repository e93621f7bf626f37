//! Bonded underlays. The bonding module is missing on some hosts (this project's CI host
//! among them), so these run in the VM suite (`cargo xtask vm`), which passes
//! `--include-ignored`. Needs root.

use std::time::Duration;

use anyhow::Result;
use podtrace_tests::{
    lab::{Lab, LabSpec, run, unique_prefix},
    podtrace::Podtrace,
    traffic,
};
use serde_json::Value;

fn bonded_lab(tag: &str, mode: &str) -> Result<Lab> {
    Lab::up(bonded_spec(tag, mode))
}

fn bonded_spec(tag: &str, mode: &str) -> LabSpec {
    LabSpec { prefix: unique_prefix(tag), bond_a: Some(mode.to_string()), ..Default::default() }
}

/// The `bond-misconfigured` findings of one problem.
fn misconfigured<'r>(report: &'r Value, problem: &str) -> Vec<&'r Value> {
    report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["kind"] == "bond-misconfigured" && f["evidence"]["problem"] == problem)
        .collect()
}

/// The bond's own view, independent of podtrace (/proc/net/bonding is per namespace).
fn bonding_proc(lab: &Lab) -> String {
    let output = lab.run_in(&lab.node_a().netns, &["cat", "/proc/net/bonding/bond0"]).expect("reading the bond state");
    String::from_utf8_lossy(&output.stdout).into_owned()
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

/// The active slave, as the bond itself reports it.
fn active_slave(lab: &Lab) -> String {
    bonding_proc(lab).lines().find_map(|line| line.strip_prefix("Currently Active Slave: ")).expect("an active slave").trim().to_string()
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
    assert!(report["findings"].as_array().unwrap().iter().all(|f| f["kind"] != "bond-misconfigured"), "{:#}", report["findings"]);
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

/// The recipe's "bond created but no connectivity": an address on a slave instead of the bond.
#[test]
#[ignore = "needs the bonding module: runs in the VM suite"]
fn an_address_on_a_slave_is_bond_misconfigured() -> Result<()> {
    let lab = bonded_lab("sadr", "active-backup")?;
    let ns = lab.node_a().netns.clone();
    // Another subnet than the underlay's, so the node's own traffic keeps its route.
    lab.add_address(&ns, "eth1", "192.168.77.1/24")?;
    let podtrace = Podtrace::start(&ns, &["follow", &lab.pod_a().ip.to_string(), "-o", "json"])?;
    traffic::ping(&lab.pod_a().netns, lab.pod_b().ip, 2, 56)?;
    let report = podtrace.finish()?.json()?;

    let found = misconfigured(&report, "slave-address");
    assert_eq!(found.len(), 1, "{:#}", report["findings"]);
    let finding = found[0];
    assert_eq!((finding["severity"].as_str(), finding["hop"].as_str()), (Some("error"), Some("eth1")), "{finding:#}");
    assert_eq!(finding["evidence"]["bond"], "bond0");
    assert_eq!(finding["evidence"]["slave_addresses"], serde_json::json!(["192.168.77.1/24"]));
    assert!(finding["evidence"]["bond_addresses"].as_array().unwrap().iter().any(|a| a == "10.99.0.1/24"), "{finding:#}");
    assert!(finding["advice"].as_str().unwrap().contains("ip addr del 192.168.77.1/24 dev eth1"), "{finding:#}");
    Ok(())
}

#[test]
#[ignore = "needs the bonding module: runs in the VM suite"]
fn miimon_0_without_arp_monitoring_is_bond_misconfigured() -> Result<()> {
    let lab = Lab::up(LabSpec { bond_a_miimon: 0, ..bonded_spec("mii0", "active-backup") })?;
    let ns = lab.node_a().netns.clone();
    assert!(bonding_proc(&lab).contains("MII Polling Interval (ms): 0"), "{}", bonding_proc(&lab));
    let podtrace = Podtrace::start(&ns, &["follow", &lab.pod_a().ip.to_string(), "-o", "json"])?;
    traffic::ping(&lab.pod_a().netns, lab.pod_b().ip, 2, 56)?;
    let report = podtrace.finish()?.json()?;

    let bond = report["hops"].as_array().unwrap().iter().find(|h| h["ifname"] == "bond0").unwrap();
    assert_eq!((bond["bond"]["miimon_ms"].as_u64(), bond["bond"]["arp_interval_ms"].as_u64()), (Some(0), Some(0)), "{bond:#}");
    let found = misconfigured(&report, "no-link-monitoring");
    assert_eq!(found.len(), 1, "{:#}", report["findings"]);
    let finding = found[0];
    assert_eq!((finding["severity"].as_str(), finding["hop"].as_str()), (Some("warning"), Some("bond0")), "{finding:#}");
    assert_eq!((finding["evidence"]["miimon_ms"].as_u64(), finding["evidence"]["arp_interval_ms"].as_u64()), (Some(0), Some(0)));
    assert!(finding["advice"].as_str().unwrap().contains("miimon 100"), "{finding:#}");
    Ok(())
}

/// Two LACP partners: each switch port is a port-channel of its own (two switches that are
/// not stacked), so the kernel puts the slaves in different aggregators.
#[test]
#[ignore = "needs the bonding module: runs in the VM suite"]
fn lacp_slaves_with_different_partners_are_not_aggregating() -> Result<()> {
    let lab = Lab::up(LabSpec { bond_a_partner_per_port: true, ..bonded_spec("lacp2", "802.3ad") })?;
    let ns = lab.node_a().netns.clone();
    // LACP settles within a few fast LACPDU periods (1 s): every slave has a partner.
    let partnered = |bonding: &str| {
        bonding
            .split("Slave Interface:")
            .skip(1)
            .map(|slave| slave.split("details partner lacp pdu:").nth(1).and_then(|p| p.lines().find(|l| l.contains("system mac address"))))
            .all(|mac| mac.is_some_and(|mac| !mac.contains("00:00:00:00:00:00")))
    };
    let mut waited = 0;
    while !partnered(&bonding_proc(&lab)) {
        assert!(waited < 60, "LACP never found the partners: {}", bonding_proc(&lab));
        std::thread::sleep(Duration::from_millis(500));
        waited += 1;
    }
    let podtrace = Podtrace::start(&ns, &["follow", &lab.pod_a().ip.to_string(), "-o", "json"])?;
    // Whether these get through depends on the switch that forwards the replies; the finding
    // must not.
    traffic::ping(&lab.pod_a().netns, lab.pod_b().ip, 2, 56)?;
    let report = podtrace.finish()?.json()?;

    let found = misconfigured(&report, "lacp-not-aggregating");
    assert_eq!(found.len(), 1, "{:#}\n{}", report["findings"], bonding_proc(&lab));
    let finding = found[0];
    assert_eq!(finding["hop"], "bond0");
    let slaves = finding["evidence"]["slaves"].as_array().unwrap();
    let aggregators: std::collections::BTreeSet<u64> = slaves.iter().filter_map(|s| s["aggregator"].as_u64()).collect();
    assert_eq!(aggregators.len(), 2, "{finding:#}");
    // Error exactly when a slave outside the active aggregator has a partner in sync.
    let active = finding["evidence"]["active_aggregator"].as_u64();
    let dropping = slaves.iter().any(|s| s["aggregator"].as_u64() != active && s["lacp_partner_in_sync"] == true);
    assert_eq!(finding["severity"], if dropping { "error" } else { "warning" }, "{finding:#}");
    assert!(finding["advice"].as_str().unwrap().contains("one LACP port-channel"), "{finding:#}");
    Ok(())
}

#[test]
#[ignore = "needs the bonding module: runs in the VM suite"]
fn a_layer2_hash_puts_every_flow_on_one_slave() -> Result<()> {
    let lab = Lab::up(LabSpec { bond_a_xmit_hash_policy: "layer2".into(), ..bonded_spec("l2", "balance-xor") })?;
    let ns = lab.node_a().netns.clone();
    let _echo = traffic::udp_echo(&lab.pod_b().netns, 7000)?;
    let podtrace = Podtrace::start(&ns, &["follow", &lab.pod_a().ip.to_string(), "-o", "json", "--proto", "udp"])?;
    // Each client is a new flow with its own VXLAN source port; layer2 hashes none of that.
    for _ in 0..12 {
        traffic::udp_send(&lab.pod_a().netns, lab.pod_b().ip, 7000, 1, 64)?;
    }
    let report = podtrace.finish()?.json()?;

    let (eth0, eth1) = (packets(&report, "eth0", "egress"), packets(&report, "eth1", "egress"));
    assert_eq!(eth0 + eth1, packets(&report, "bond0", "egress"));
    assert!(eth0 == 0 || eth1 == 0, "layer2 keeps one peer's flows on one slave: eth0 {eth0}, eth1 {eth1}");
    let found = misconfigured(&report, "xmit-hash-one-slave");
    assert_eq!(found.len(), 1, "{:#}", report["findings"]);
    let finding = found[0];
    assert_eq!((finding["severity"].as_str(), finding["hop"].as_str()), (Some("warning"), Some("bond0")), "{finding:#}");
    assert_eq!(finding["evidence"]["xmit_hash_policy"], "layer2");
    assert_eq!(finding["evidence"]["packets_per_slave"], serde_json::json!({"eth0": eth0, "eth1": eth1}));
    assert!(finding["evidence"]["flows"].as_u64().unwrap() >= 4, "{finding:#}");
    assert!(finding["summary"].as_str().unwrap().contains("layer3+4"), "{finding:#}");
    Ok(())
}

/// Frames on node A's eth0 cross one more veth pair in the switch than those on eth1, so each
/// waits one more turn of the receive backlog and balance-rr's next segment, sent through eth1,
/// overtakes it: two switch paths of different latency (the VM has no netem).
fn lengthen_eth0_path(lab: &Lab) -> Result<()> {
    let sw = lab.switch_ns.as_str();
    let steps: [&[&str]; 7] = [
        &["link", "add", "dl0", "type", "bridge"],
        &["link", "set", "dl0", "up"],
        &["link", "set", "port00", "nomaster"],
        &["link", "set", "port00", "master", "dl0"],
        &["link", "add", "dla", "type", "veth", "peer", "name", "dlb"],
        &["link", "set", "dla", "master", "dl0", "up"],
        &["link", "set", "dlb", "master", "br0", "up"],
    ];
    for step in steps {
        run(&[&["ip", "-n", sw][..], step].concat())?;
    }
    traffic::set_offloads(sw, "dla", false)?;
    traffic::set_offloads(sw, "dlb", false)
}

#[test]
#[ignore = "needs the bonding module: runs in the VM suite"]
fn balance_rr_reordering_is_named_round_robin_never_mtu() -> Result<()> {
    let lab = bonded_lab("rr", "balance-rr")?;
    lengthen_eth0_path(&lab)?;
    let ns = lab.node_a().netns.clone();
    let _sink = traffic::tcp_sink(&lab.pod_b().netns, 5201)?;
    let podtrace = Podtrace::start(&ns, &["follow", &lab.pod_a().ip.to_string(), "-o", "json", "--proto", "tcp", "--port", "5201"])?;
    let sent = traffic::tcp_send(&lab.pod_a().netns, lab.pod_b().ip, 5201, 2_000_000, 65_536, Duration::from_secs(60))?;
    assert!(sent.status.success(), "{}", String::from_utf8_lossy(&sent.stderr));
    let report = podtrace.finish()?.json()?;

    let (eth0, eth1) = (packets(&report, "eth0", "egress"), packets(&report, "eth1", "egress"));
    assert!(eth0 > 100 && eth1 > 100, "balance-rr stripes the flow: eth0 {eth0}, eth1 {eth1}");
    for finding in report["findings"].as_array().unwrap().iter().filter(|f| f["kind"] == "retransmits" || f["kind"] == "mtu-mismatch") {
        // The retransmits and MTU detectors are not this test's; what they say is shown.
        eprintln!("balance-rr: {}: {}", finding["kind"], finding["summary"]);
    }
    let found = misconfigured(&report, "round-robin-reordering");
    assert_eq!(found.len(), 1, "{:#}", report["findings"]);
    let finding = found[0];
    assert_eq!((finding["severity"].as_str(), finding["hop"].as_str()), (Some("warning"), Some("bond0")), "{finding:#}");
    assert_eq!(finding["evidence"]["striped_flows"], 1, "{finding:#}");
    let signs = finding["evidence"]["duplicate_acks"].as_u64().unwrap() + finding["evidence"]["retransmits"].as_u64().unwrap();
    assert!(signs > 0, "{finding:#}");
    let summary = finding["summary"].as_str().unwrap();
    assert!(summary.contains("round-robin reordering") && !summary.contains("MTU signature"), "{summary}");
    Ok(())
}
