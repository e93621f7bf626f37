//! Path discovery on pods made by the real CNI bridge plugin, where the kernel's tables are
//! not what a fresh lab shows: an idle pod the bridge has forgotten, a host side whose MTU
//! differs from the pod's own, and two pods on one node talking to each other. Needs root.

use std::time::Duration;

use anyhow::{Context as _, Result};
use podtrace_tests::{
    lab::{Lab, LabSpec, Pod, unique_prefix},
    podtrace::{Podtrace, run_podtrace},
    report::hop,
    traffic,
};
use serde_json::Value;

fn lab(tag: &str, pods_per_node: usize) -> Lab {
    Lab::up(LabSpec { prefix: unique_prefix(tag), pods_per_node, ..Default::default() }).expect("bringing up the lab")
}

fn text(output: std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn pod_veths(report: &Value) -> Vec<String> {
    let mut veths: Vec<String> = report["hops"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["kind"] == "pod-veth")
        .map(|h| h["ifname"].as_str().unwrap().to_string())
        .collect();
    veths.dedup();
    veths
}

fn mac_of(lab: &Lab, pod: &Pod) -> Result<String> {
    let link = text(lab.run_in(&pod.netns, &["ip", "-o", "link", "show", "eth0"])?);
    let mac = link.split_whitespace().skip_while(|word| *word != "link/ether").nth(1).context("eth0 has no MAC")?;
    Ok(mac.to_string())
}

/// Item 7: after a few idle minutes the bridge's fdb entry for the pod ages out while its
/// neighbour entry stays. The pod's veth is still found, through the namespace that holds
/// its IP, and no other pod's veth is traced.
#[test]
fn an_idle_pod_is_found_after_the_bridge_forgot_it() -> Result<()> {
    let lab = lab("idle", 3);
    let (node, pod) = (lab.node_a(), lab.pod_a());
    assert_eq!(node.pods.len(), 3);
    // The node talks to the pod once: the neighbour entry resolves and the bridge learns it.
    assert_eq!(traffic::ping_received(&traffic::ping(&node.netns, pod.ip, 1, 56)?), 1);
    let mac = mac_of(&lab, pod)?;
    // What a few idle minutes do (the default ageing time is 300 s): the fdb entry goes. The
    // port stops learning first, or the pod's next frame (IPv6 DAD, MLD) brings it back.
    lab.run_in(&node.netns, &["bridge", "link", "set", "dev", &pod.host_veth, "learning", "off"])?;
    lab.run_in(&node.netns, &["bridge", "fdb", "del", &mac, "dev", &pod.host_veth, "master"])?;
    let fdb = text(lab.run_in(&node.netns, &["bridge", "fdb", "show", "br", &node.bridge])?);
    assert!(!fdb.contains(&mac), "the fdb still holds {mac}: {fdb}");
    let neighbour = text(lab.run_in(&node.netns, &["ip", "neigh", "show", &pod.ip.to_string()])?);
    assert!(neighbour.contains(&mac), "the neighbour entry is gone: {neighbour}");

    let finished = run_podtrace(&node.netns, &["follow", &pod.ip.to_string(), "--duration", "0.5", "-o", "json"])?;
    assert!(finished.status.success(), "{}", finished.stderr);
    assert!(!finished.stderr.contains("tracing all"), "{}", finished.stderr);
    assert_eq!(pod_veths(&finished.json()?), std::slice::from_ref(&pod.host_veth));
    // The pod's own end, read inside its namespace, is printed with the path.
    assert!(finished.stderr.contains("(pod side: eth0 mtu 1450)"), "{}", finished.stderr);
    Ok(())
}

/// Item 1: the pod's eth0 has MTU 1450 (the plugin's), its host-side veth and cni0 1500.
/// The pod cannot send packets the tunnel cannot carry: no error, and the host-side finding
/// says what it can cause and that it is about the configuration only.
#[test]
fn a_host_side_mtu_above_the_tunnel_is_configuration_only() -> Result<()> {
    let lab = lab("hmtu", 1);
    let (node, pod) = (lab.node_a(), lab.pod_a());
    lab.set_mtu(&node.netns, &pod.host_veth, 1500)?;
    lab.set_mtu(&node.netns, &node.bridge, 1500)?;
    let podtrace = Podtrace::start(&node.netns, &["follow", &pod.ip.to_string(), "-o", "json"])?;
    assert_eq!(traffic::ping_received(&traffic::ping(&pod.netns, lab.pod_b().ip, 3, 1400)?), 3);
    std::thread::sleep(Duration::from_millis(300));
    let finished = podtrace.finish()?;
    assert!(finished.status.success(), "{}", finished.stderr);
    let report = finished.json()?;
    let mtu: Vec<&Value> = report["findings"].as_array().unwrap().iter().filter(|f| f["kind"] == "mtu-mismatch").collect();
    assert!(mtu.iter().all(|f| f["severity"] == "warning"), "{mtu:#?}");
    let veth = mtu.iter().find(|f| f["hop"] == pod.host_veth.as_str()).unwrap_or_else(|| panic!("{mtu:#?}"));
    assert_eq!(veth["evidence"]["mtu"], 1500);
    assert_eq!(veth["evidence"]["pod_mtu"], 1450);
    assert_eq!(veth["evidence"]["configuration_only"], true);
    assert_eq!(veth["evidence"]["blackhole"], false);
    for finding in &mtu {
        let summary = finding["summary"].as_str().unwrap();
        assert!(!summary.contains("blackhole") && !summary.contains("the pod can send"), "{summary}");
        assert!(summary.contains("Configuration only"), "{summary}");
    }
    Ok(())
}

/// Item 8: two pods on node A, both followed, one pinging the other. Both veths are on the
/// path and count the pings; cni0 counts none, bridged frames never cross its own hooks, and
/// the path printed before tracing says so.
#[test]
fn same_node_pods_show_on_their_veths_and_the_path_says_why_cni0_is_silent() -> Result<()> {
    let lab = lab("same", 2);
    let node = lab.node_a();
    let (pod, peer) = (&node.pods[0], &node.pods[1]);
    let podtrace = Podtrace::start(&node.netns, &["follow", &pod.ip.to_string(), &peer.ip.to_string(), "-o", "json"])?;
    assert_eq!(traffic::ping_received(&traffic::ping(&pod.netns, peer.ip, 5, 56)?), 5);
    std::thread::sleep(Duration::from_millis(300));
    let finished = podtrace.finish()?;
    assert!(finished.status.success(), "{}", finished.stderr);
    let report = finished.json()?;
    for (veth, direction) in
        [(&pod.host_veth, "ingress"), (&peer.host_veth, "egress"), (&peer.host_veth, "ingress"), (&pod.host_veth, "egress")]
    {
        assert_eq!(hop(&report, veth, direction)["packets"], 5, "{veth} {direction}");
    }
    for direction in ["ingress", "egress"] {
        assert_eq!(hop(&report, &node.bridge, direction)["packets"], 0, "cni0 {direction}");
    }
    let note = format!("{} ({}) and {} ({}) are pods behind {}", pod.ip, pod.host_veth, peer.ip, peer.host_veth, node.bridge);
    assert!(finished.stderr.contains(&note), "{}", finished.stderr);
    assert!(finished.stderr.contains("counts none of that traffic"), "{}", finished.stderr);
    assert!(report["notes"].as_array().unwrap().iter().any(|n| n.as_str().unwrap().contains(&note)), "{:#}", report["notes"]);
    Ok(())
}

/// `--peer` naming a local pod behind the same bridge adds that pod's veth to the path, where
/// the followed pod's packets to it leave the path.
#[test]
fn a_local_peer_joins_the_path_through_its_veth() -> Result<()> {
    let lab = lab("peer", 2);
    let node = lab.node_a();
    let (pod, peer) = (&node.pods[0], &node.pods[1]);
    let args = ["follow", &pod.ip.to_string(), "--peer", &peer.ip.to_string(), "-o", "json"];
    let podtrace = Podtrace::start(&node.netns, &args)?;
    assert_eq!(traffic::ping_received(&traffic::ping(&pod.netns, peer.ip, 4, 56)?), 4);
    std::thread::sleep(Duration::from_millis(300));
    let finished = podtrace.finish()?;
    assert!(finished.status.success(), "{}", finished.stderr);
    let report = finished.json()?;
    for (veth, direction) in
        [(&pod.host_veth, "ingress"), (&peer.host_veth, "egress"), (&peer.host_veth, "ingress"), (&pod.host_veth, "egress")]
    {
        assert_eq!(hop(&report, veth, direction)["packets"], 4, "{veth} {direction}");
    }
    assert!(finished.stderr.contains("counts none of that traffic"), "{}", finished.stderr);
    Ok(())
}
