//! Calico's routed pods, as Calico's felix and CNI plugin build a node: no bridge, a `cali…`
//! veth per pod with a /32 route and proxy ARP, and `tunl0` (IPIP) or `vxlan.calico` between
//! the nodes. podtrace run on both nodes as a user would, checked against tcpdump on every hop.
//! The IPIP tests need the ipip module: they skip where the kernel has none (the development
//! host) and run in the VM suite. Needs root.

use std::{net::SocketAddrV4, time::Duration};

use anyhow::Result;
use podtrace_tests::{
    capture::Captures,
    kube_proxy,
    lab::{Cni, Lab, LabSpec, ipip_available},
    podtrace::Podtrace,
    report::{hop, serious_findings},
    traffic,
};
use serde_json::Value;

/// Whether the IPIP tests can run here; says so when they cannot.
fn ipip_or_skip() -> bool {
    let available = ipip_available();
    if !available {
        eprintln!("skipped: this kernel has no ipip module (Calico's IPIP mode runs in the VM suite)");
    }
    available
}

/// (ifname, kind, direction) of each hop of a report, in its order.
fn path_of(report: &Value) -> Vec<(String, String, String)> {
    let field = |hop: &Value, name: &str| hop[name].as_str().unwrap().to_string();
    report["hops"].as_array().unwrap().iter().map(|h| (field(h, "ifname"), field(h, "kind"), field(h, "direction"))).collect()
}

/// Pod A's ping, TCP and UDP to pod B, with podtrace following pod A on node A and pod B on
/// node B, and tcpdump on every hop of both nodes: each hop's counts equal tcpdump's, the path
/// is the pod's veth, the tunnel and the underlay, and nothing is wrong.
fn counts_match_tcpdump_on_both_nodes(cni: Cni, tag: &str, tunnel_kind: &str) -> Result<()> {
    let lab = Lab::up(LabSpec::calico(cni, tag))?;
    let (node_a, node_b) = (lab.node_a(), lab.node_b());
    let (pod_a, pod_b) = (lab.pod_a(), lab.pod_b());
    let captures_a = Captures::on_node(&lab, node_a, &pod_a.host_veth, pod_a.ip)?;
    let captures_b = Captures::on_node(&lab, node_b, &pod_b.host_veth, pod_b.ip)?;
    let on_a = Podtrace::start(&node_a.netns, &["follow", &pod_a.ip.to_string(), "-o", "json"])?;
    let on_b = Podtrace::start(&node_b.netns, &["follow", &pod_b.ip.to_string(), "-o", "json"])?;
    let output = traffic::ping(&pod_a.netns, pod_b.ip, 5, 56)?;
    assert_eq!(traffic::ping_received(&output), 5);
    let _sink = traffic::tcp_sink(&pod_b.netns, 5201)?;
    let sent = traffic::tcp_send(&pod_a.netns, pod_b.ip, 5201, 200_000, 16_384, Duration::from_secs(10))?;
    assert_eq!(String::from_utf8_lossy(&sent.stdout).trim(), "200000");
    let _echo = traffic::udp_echo(&pod_b.netns, 7000)?;
    assert_eq!(traffic::udp_send(&pod_a.netns, pod_b.ip, 7000, 10, 300)?, 10);
    // Let the last packets cross every hop before stopping.
    std::thread::sleep(Duration::from_millis(300));
    let mut reports = Vec::new();
    for (podtrace, captures, pod) in [(on_a, captures_a, pod_a), (on_b, captures_b, pod_b)] {
        let finished = podtrace.finish()?;
        assert!(finished.status.success(), "{}", finished.stderr);
        let report = finished.json()?;
        captures.assert_equal_to(&report)?;
        assert_eq!((report["lost_events"].clone(), report["unparsed"].clone()), (0.into(), 0.into()), "{}", pod.host_veth);
        let expected: Vec<(String, String, String)> = [
            (pod.host_veth.as_str(), "pod-veth", "ingress"),
            (node_a.vxlan.as_str(), tunnel_kind, "egress"),
            ("eth0", "nic", "egress"),
            ("eth0", "nic", "ingress"),
            (node_a.vxlan.as_str(), tunnel_kind, "ingress"),
            (pod.host_veth.as_str(), "pod-veth", "egress"),
        ]
        .iter()
        .map(|(name, kind, direction)| (name.to_string(), kind.to_string(), direction.to_string()))
        .collect();
        assert_eq!(path_of(&report), expected);
        assert_eq!(report["locality"], "local");
        let serious = serious_findings(&report);
        assert!(serious.is_empty(), "a healthy Calico lab has no warning or error: {serious:#?}");
        reports.push(report);
    }
    // Every packet of pod A's flows crossed both nodes' tunnels: 5 pings, the TCP segments and
    // 10 datagrams out of node A's tunnel arrive at node B's.
    let out_of_a = hop(&reports[0], &node_a.vxlan, "egress")["packets"].as_u64().unwrap();
    assert_eq!(hop(&reports[1], &node_b.vxlan, "ingress")["packets"].as_u64().unwrap(), out_of_a);
    assert!(out_of_a > 15 + 100, "{out_of_a}");
    Ok(())
}

#[test]
fn calico_vxlan_counts_match_tcpdump_on_every_hop_of_both_nodes() -> Result<()> {
    counts_match_tcpdump_on_both_nodes(Cni::CalicoVxlan, "cvx", "vxlan")
}

#[test]
fn calico_ipip_counts_match_tcpdump_on_every_hop_of_both_nodes() -> Result<()> {
    if !ipip_or_skip() {
        return Ok(());
    }
    counts_match_tcpdump_on_both_nodes(Cni::CalicoIpip, "cip", "ipip")
}

/// A remote pod behind either tunnel: the underlay, then the tunnel.
#[test]
fn a_remote_calico_pod_is_behind_the_tunnel() -> Result<()> {
    let modes: &[(Cni, &str)] =
        if ipip_available() { &[(Cni::CalicoVxlan, "vxlan"), (Cni::CalicoIpip, "ipip")] } else { &[(Cni::CalicoVxlan, "vxlan")] };
    for (cni, kind) in modes {
        let lab = Lab::up(LabSpec::calico(*cni, "crem"))?;
        let podtrace = Podtrace::start(&lab.node_a().netns, &["follow", &lab.pod_b().ip.to_string(), "-o", "json"])?;
        let output = traffic::ping(&lab.pod_a().netns, lab.pod_b().ip, 3, 56)?;
        assert_eq!(traffic::ping_received(&output), 3);
        let report = podtrace.finish()?.json()?;
        assert_eq!(report["locality"], "remote", "{kind}");
        let tunnel = lab.node_a().vxlan.as_str();
        let kinds: Vec<(String, String, String)> = path_of(&report);
        assert_eq!(kinds[0], ("eth0".to_string(), "nic".to_string(), "ingress".to_string()), "{kind}");
        assert_eq!(kinds[1], (tunnel.to_string(), kind.to_string(), "ingress".to_string()), "{kind}");
        assert_eq!(hop(&report, tunnel, "egress")["packets"], 3, "{kind}: the echo requests");
        assert_eq!(hop(&report, "eth0", "ingress")["packets"], 3, "{kind}: the echo replies, matched on the inner addresses");
    }
    Ok(())
}

/// The runbook case with offloads off, pod to pod: pod A's MTU (and its cali veth's) is 1500
/// but node A's tunl0 is 1440, and node A's fragmentation-needed never reaches the pod. Pod A's
/// full-size TCP segments do not fit tunl0 and are retransmitted again and again:
/// `mtu-mismatch` names tunl0 and both MTUs, with those retransmits as evidence.
#[test]
fn calico_ipip_pod_above_tunl0_1440_is_an_mtu_mismatch_with_its_full_size_retransmits() -> Result<()> {
    if !ipip_or_skip() {
        return Ok(());
    }
    let spec = LabSpec { pod_mtu: 1500, tunnel_mtu_a: Some(1440), ..LabSpec::calico(Cni::CalicoIpip, "cmtu") };
    let lab = Lab::up(spec)?;
    let (node_a, pod_a, pod_b) = (lab.node_a(), lab.pod_a(), lab.pod_b());
    lab.iptables(&node_a.netns, &["-A", "OUTPUT", "-p", "icmp", "--icmp-type", "fragmentation-needed", "-j", "DROP"])?;
    let _sink = traffic::tcp_sink(&pod_b.netns, 5201)?;
    let podtrace = Podtrace::start(&node_a.netns, &["follow", &pod_a.ip.to_string(), "-o", "json"])?;
    // The handshake and small segments get through; the full-size ones never do.
    let _ = traffic::tcp_send(&pod_a.netns, pod_b.ip, 5201, 20_000, 16_384, Duration::from_secs(3))?;
    let finished = podtrace.finish()?;
    assert!(finished.status.success(), "{}", finished.stderr);
    let report = finished.json()?;
    let mismatches: Vec<&Value> = report["findings"].as_array().unwrap().iter().filter(|f| f["kind"] == "mtu-mismatch").collect();
    let pod = mismatches
        .iter()
        .find(|f| f["hop"] == pod_a.host_veth.as_str())
        .unwrap_or_else(|| panic!("no mtu-mismatch at {}: {:#}", pod_a.host_veth, report["findings"]));
    assert_eq!(pod["evidence"]["tunnel"], "tunl0");
    assert_eq!(pod["evidence"]["tunnel_mtu"], 1440);
    assert_eq!(pod["evidence"]["mtu"], 1500);
    let summary = pod["summary"].as_str().unwrap();
    assert!(summary.contains("tunl0") && summary.contains("1440") && summary.contains("1500"), "{summary}");
    // Full-size: 1500 - 20 (IPv4) - 32 (TCP with timestamps).
    assert!(pod["evidence"]["retransmitted_full_size_segments"].as_u64().unwrap() >= 2, "{pod:#}");
    assert_eq!(pod["evidence"]["largest_retransmitted_payload"], 1448, "{pod:#}");
    assert!(summary.contains("were retransmitted"), "{summary}");
    // The traffic itself: 1500-byte packets crossed the pod's veth heading for tunl0.
    let oversized = mismatches
        .iter()
        .find(|f| f["evidence"]["largest_packet"].is_number())
        .unwrap_or_else(|| panic!("no oversized packets: {:#}", report["findings"]));
    assert_eq!((oversized["hop"].clone(), oversized["evidence"]["next_hop"].clone()), (pod_a.host_veth.as_str().into(), "tunl0".into()));
    assert_eq!(
        (oversized["evidence"]["largest_packet"].clone(), oversized["evidence"]["next_hop_mtu"].clone()),
        (1500.into(), 1440.into())
    );
    assert_eq!(oversized["evidence"]["blackhole"], true, "{oversized:#}");
    Ok(())
}

/// The runbook's case as it was paged: a client outside the cluster POSTs to a NodePort on
/// node A, DNATed to pod B on node B across tunl0 (MTU 1440), offloads off, node A's
/// fragmentation-needed never leaving it. The handshake works (MSS 1460); the client's
/// 1500-byte frames arrive at node A's eth0 again and again and never fit tunl0. podtrace on
/// node A following pod B: the path starts at eth0 ingress, where the client's packets are
/// matched through the NAT, and `mtu-mismatch` names tunl0, 1440 and 1500, with the full-size
/// frames that arrived again as evidence of a blackhole.
#[test]
fn a_node_port_client_above_tunl0_1440_is_an_mtu_mismatch_at_the_nic_with_its_full_size_frames_arriving_again() -> Result<()> {
    if !ipip_or_skip() {
        return Ok(());
    }
    const NODE_PORT: u16 = 30080;
    let spec = LabSpec { pod_mtu: 1500, tunnel_mtu_a: Some(1440), external: true, ..LabSpec::calico(Cni::CalicoIpip, "cnport") };
    let lab = Lab::up(spec)?;
    let ext = lab.external.as_deref().expect("an external lab");
    let (node_a, pod_b) = (lab.node_a(), lab.pod_b());
    kube_proxy::add_web_node_port(&node_a.netns, NODE_PORT, SocketAddrV4::new(pod_b.ip, 5201))?;
    lab.iptables(&node_a.netns, &["-A", "OUTPUT", "-p", "icmp", "--icmp-type", "fragmentation-needed", "-j", "DROP"])?;
    let _sink = traffic::tcp_sink(&pod_b.netns, 5201)?;
    let podtrace = Podtrace::start(&node_a.netns, &["follow", &pod_b.ip.to_string(), "-o", "json"])?;
    // The handshake gets through; the full-size segments never do.
    let _ = traffic::tcp_send(ext, node_a.ip, NODE_PORT, 20_000, 16_384, Duration::from_secs(3))?;
    let finished = podtrace.finish()?;
    assert!(finished.status.success(), "{}", finished.stderr);
    let report = finished.json()?;
    let underlay = node_a.underlay.as_str();
    assert_eq!(path_of(&report)[0], (underlay.to_string(), "nic".to_string(), "ingress".to_string()));
    assert!(hop(&report, underlay, "ingress")["packets"].as_u64().unwrap() > 0, "{:#}", report["hops"]);
    assert_eq!(report["dnat_flows"], 1, "the NodePort flow, learned from the SYN-ACK");
    let finding = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "mtu-mismatch" && f["hop"] == underlay && f["evidence"]["largest_packet"].is_number())
        .unwrap_or_else(|| panic!("no mtu-mismatch for the client's packets at {underlay}: {:#}", report["findings"]));
    let evidence = &finding["evidence"];
    assert_eq!(
        (&evidence["direction"], &evidence["next_hop"], &evidence["next_hop_mtu"]),
        (&"ingress".into(), &"tunl0".into(), &1440.into())
    );
    assert_eq!((&evidence["largest_packet"], &evidence["interface_mtu"]), (&1500.into(), &1500.into()));
    assert!(evidence["retransmitted_full_size_frames"].as_u64().unwrap() >= 2, "{finding:#}");
    assert_eq!((&finding["severity"], &evidence["blackhole"]), (&"error".into(), &true.into()), "{finding:#}");
    let summary = finding["summary"].as_str().unwrap();
    assert!(summary.contains("tunl0") && summary.contains("1440") && summary.contains("1500"), "{summary}");
    assert!(summary.contains("the same TCP segments arriving again full-size"), "{summary}");
    Ok(())
}
