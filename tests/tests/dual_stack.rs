//! Dual-stack pods: kube-flannel with IPv6 enabled (`flannel-v6.1` over an IPv6 underlay) and
//! pods with an address from each family's range of the bridge plugin. podtrace follows a pod
//! by its IPv6 address through the hops IPv6 packets cross, counts what tcpdump counts there,
//! and judges the IPv6 tunnel's MTU by ICMPv6 packet-too-big. Needs root.

use std::{net::IpAddr, time::Duration};

use anyhow::{Context as _, Result, bail};
use podtrace_tests::{
    capture::{Captures, ip6_filter, vxlan6_inner_filter},
    lab::{Lab, LabSpec, unique_prefix},
    podtrace::{Podtrace, run_podtrace},
    report::serious_findings,
    traffic,
};
use serde_json::Value;

/// flannel's defaults: pods and flannel.1 at the NIC's MTU minus 50 (1450), flannel-v6.1 at
/// what fits the IPv6 underlay, minus 70 (1430).
fn dual_stack_lab(tag: &str) -> Lab {
    Lab::up(LabSpec { prefix: unique_prefix(tag), dual_stack: true, ..Default::default() }).expect("bringing up the lab")
}

/// One MTU for the pod network that fits both tunnels: flannel's `"MTU": 1480` backend option
/// gives both VXLAN devices and the pods 1430.
fn one_mtu_lab(tag: &str) -> Lab {
    Lab::up(LabSpec { prefix: unique_prefix(tag), dual_stack: true, pod_mtu: 1430, vxlan_mtu: 1430, ..Default::default() })
        .expect("bringing up the lab")
}

fn text(output: std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn ip6(ip: Option<std::net::Ipv6Addr>) -> IpAddr {
    IpAddr::V6(ip.expect("a dual-stack lab's pods have IPv6 addresses"))
}

/// IPv6 ping, a TCP bulk transfer and UDP echoes from pod A to pod B, across flannel-v6.1.
fn ipv6_traffic(lab: &Lab) -> Result<()> {
    let (pod_a, pod_b) = (lab.pod_a(), lab.pod_b());
    let pod_b6 = ip6(pod_b.ip6);
    let _sink = traffic::tcp_sink_on(&pod_b.netns, "::".parse()?, 5201)?;
    let _echo = traffic::udp_echo_on(&pod_b.netns, "::".parse()?, 7000)?;
    assert_eq!(traffic::ping_received(&traffic::ping(&pod_a.netns, pod_b6, 5, 56)?), 5);
    let sent = traffic::tcp_send(&pod_a.netns, pod_b6, 5201, 200_000, 16_384, Duration::from_secs(10))?;
    assert_eq!(text(sent).trim(), "200000");
    assert_eq!(traffic::udp_send(&pod_a.netns, pod_b6, 7000, 10, 300)?, 10);
    Ok(())
}

/// Follows `pod_ip` on node A while `traffic` runs; the JSON report.
fn trace(lab: &Lab, pod_ip: IpAddr, traffic: impl FnOnce(&Lab) -> Result<()>) -> Result<Value> {
    let podtrace = Podtrace::start(&lab.node_a().netns, &["follow", &pod_ip.to_string(), "-o", "json"])?;
    traffic(lab)?;
    // Let the last packets cross every hop before stopping.
    std::thread::sleep(Duration::from_millis(300));
    let finished = podtrace.finish()?;
    assert!(finished.status.success(), "{}", finished.stderr);
    finished.json()
}

/// (ifname, kind, direction) of every hop, in path order.
fn hops(report: &Value) -> Vec<(String, String, String)> {
    report["hops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["ifname"].as_str().unwrap().into(), h["kind"].as_str().unwrap().into(), h["direction"].as_str().unwrap().into()))
        .collect()
}

fn expected(hops: &[(&str, &str, &str)]) -> Vec<(String, String, String)> {
    hops.iter().map(|(name, kind, direction)| (name.to_string(), kind.to_string(), direction.to_string())).collect()
}

/// Makes node A's neighbour entry for pod A's IPv6 address, and pod A's for its gateway,
/// reachable for the next ten minutes. Neighbour discovery carries the pod's address: a
/// reachability probe falling between the start (or the end) of tcpdump and of podtrace would
/// be counted by one and not the other.
fn quiet_neighbour_discovery(lab: &Lab) -> Result<()> {
    let (node, pod) = (lab.node_a(), lab.pod_a());
    let gateway = node.ipv6.as_ref().context("a dual-stack lab")?.gateway.to_string();
    let pod6 = ip6(pod.ip6).to_string();
    let bridge_setting = format!("net.ipv6.neigh.{}.base_reachable_time_ms=600000", node.bridge);
    lab.run_in(&node.netns, &["sysctl", "-qw", &bridge_setting])?;
    lab.run_in(&pod.netns, &["sysctl", "-qw", "net.ipv6.neigh.eth0.base_reachable_time_ms=600000"])?;
    for _ in 0..20 {
        // ping confirms the neighbour to the kernel once replies come back.
        lab.run_in(&node.netns, &["ping", "-c", "2", "-i", "0.2", "-W", "1", &pod6])?;
        lab.run_in(&pod.netns, &["ping", "-c", "2", "-i", "0.2", "-W", "1", &gateway])?;
        let node_side = text(lab.run_in(&node.netns, &["ip", "-6", "neigh", "show", &pod6, "dev", &node.bridge])?);
        let pod_side = text(lab.run_in(&pod.netns, &["ip", "-6", "neigh", "show", &gateway, "dev", "eth0"])?);
        if node_side.contains("REACHABLE") && pod_side.contains("REACHABLE") {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    bail!("the neighbour entries of {pod6} and {gateway} did not become reachable")
}

/// Pod A followed by its IPv6 address while IPv6 ping, TCP and UDP run to pod B on node B:
/// the path is the pod's veth, cni0, flannel-v6.1 and eth0, each hop counts what tcpdump counts
/// on it, and nothing is wrong.
#[test]
fn ipv6_counts_match_tcpdump_on_every_hop_of_flannel_v6() -> Result<()> {
    let lab = one_mtu_lab("ds6");
    let (node, pod) = (lab.node_a(), lab.pod_a());
    let pod6 = ip6(pod.ip6);
    let IpAddr::V6(pod6_v6) = pod6 else { unreachable!() };
    quiet_neighbour_discovery(&lab)?;
    let captures = Captures::on(
        &node.netns,
        &[
            (pod.host_veth.clone(), ip6_filter(pod6_v6)),
            (node.bridge.clone(), ip6_filter(pod6_v6)),
            ("flannel-v6.1".into(), ip6_filter(pod6_v6)),
            (node.underlay.clone(), vxlan6_inner_filter(pod6_v6)),
        ],
    )?;
    let report = trace(&lab, pod6, ipv6_traffic)?;
    captures.assert_equal_to(&report)?;
    assert_eq!(report["lost_events"], 0);
    assert_eq!(report["unparsed"], 0);
    let veth = pod.host_veth.as_str();
    assert_eq!(
        hops(&report),
        expected(&[
            (veth, "pod-veth", "ingress"),
            ("cni0", "bridge", "ingress"),
            ("flannel-v6.1", "vxlan", "egress"),
            ("eth0", "nic", "egress"),
            ("eth0", "nic", "ingress"),
            ("flannel-v6.1", "vxlan", "ingress"),
            ("cni0", "bridge", "egress"),
            (veth, "pod-veth", "egress"),
        ])
    );
    let serious = serious_findings(&report);
    assert!(serious.is_empty(), "{serious:#?}");
    Ok(())
}

/// Both addresses of a pod followed in one run, with IPv4 and IPv6 traffic: each family's
/// tunnel sends from its own endpoint (the node's IPv4 address for flannel.1, its IPv6 one
/// for flannel-v6.1), which is no VXLAN source mismatch, nor anything else to warn about.
#[test]
fn both_addresses_followed_at_once_give_no_warning() -> Result<()> {
    let lab = one_mtu_lab("dsb");
    let (pod_a, pod_b) = (lab.pod_a(), lab.pod_b());
    quiet_neighbour_discovery(&lab)?;
    let both = [pod_a.ip.to_string(), ip6(pod_a.ip6).to_string()];
    let podtrace = Podtrace::start(&lab.node_a().netns, &["follow", &both[0], &both[1], "-o", "json"])?;
    ipv6_traffic(&lab)?;
    assert_eq!(traffic::ping_received(&traffic::ping(&pod_a.netns, IpAddr::V4(pod_b.ip), 5, 56)?), 5);
    std::thread::sleep(Duration::from_millis(300));
    let finished = podtrace.finish()?;
    assert!(finished.status.success(), "{}", finished.stderr);
    let report = finished.json()?;
    let tunnels: Vec<_> = hops(&report).into_iter().filter(|(_, kind, _)| kind == "vxlan").map(|(name, _, _)| name).collect();
    assert!(tunnels.iter().any(|t| t == "flannel.1") && tunnels.iter().any(|t| t == "flannel-v6.1"), "{tunnels:?}");
    let serious = serious_findings(&report);
    assert!(serious.is_empty(), "{serious:#?}");
    Ok(())
}

/// On a dual-stack node each address of a pod has its family's path: the IPv6 one crosses
/// flannel-v6.1 and never flannel.1, the IPv4 one the other way round; a remote pod's IPv6
/// address meets eth0 first.
#[test]
fn each_address_of_a_dual_stack_pod_has_its_familys_path() -> Result<()> {
    let lab = dual_stack_lab("dsp");
    let ns = lab.node_a().netns.as_str();
    let discovered = |ip: String| -> Result<Value> {
        let finished = run_podtrace(ns, &["follow", &ip, "--duration", "0.5", "-o", "json"])?;
        assert!(finished.status.success(), "{}", finished.stderr);
        finished.json()
    };
    let veth = lab.pod_a().host_veth.as_str();
    let local = |tunnel| {
        expected(&[
            (veth, "pod-veth", "ingress"),
            ("cni0", "bridge", "ingress"),
            (tunnel, "vxlan", "egress"),
            ("eth0", "nic", "egress"),
            ("eth0", "nic", "ingress"),
            (tunnel, "vxlan", "ingress"),
            ("cni0", "bridge", "egress"),
            (veth, "pod-veth", "egress"),
        ])
    };
    let report = discovered(ip6(lab.pod_a().ip6).to_string())?;
    assert_eq!((report["locality"].as_str(), hops(&report)), (Some("local"), local("flannel-v6.1")));
    assert_eq!(report["hops"][2]["mtu"], 1430, "flannel-v6.1 fits the IPv6 underlay");
    let report = discovered(lab.pod_a().ip.to_string())?;
    assert_eq!((report["locality"].as_str(), hops(&report)), (Some("local"), local("flannel.1")));
    let report = discovered(ip6(lab.pod_b().ip6).to_string())?;
    let remote = expected(&[
        ("eth0", "nic", "ingress"),
        ("flannel-v6.1", "vxlan", "ingress"),
        ("flannel-v6.1", "vxlan", "egress"),
        ("eth0", "nic", "egress"),
    ]);
    assert_eq!((report["locality"].as_str(), hops(&report)), (Some("remote"), remote));
    Ok(())
}

/// Node A's IPv6 default route lives in table 1000, which a policy rule picks for what comes
/// from the pod bridge; table 2000 holds default routes no rule picks. Followed by its IPv6
/// address, the pod's path ends at the first table's device and never at the second's; by its
/// IPv4 address at neither: table 1000's IPv4 default route has no IPv4 rule pointing at it.
#[test]
fn the_default_route_is_the_one_the_policy_rules_pick_for_the_pod() -> Result<()> {
    let lab = dual_stack_lab("dsrt");
    let ns = lab.node_a().netns.as_str();
    for (device, table) in [("uplink0", "1000"), ("decoy0", "2000")] {
        // A veth pair stands in for another NIC (the lab's kernels may lack the dummy module).
        let far_end = format!("{device}p");
        lab.run_in(ns, &["ip", "link", "add", device, "type", "veth", "peer", "name", &far_end])?;
        lab.run_in(ns, &["ip", "link", "set", &far_end, "up"])?;
        lab.run_in(ns, &["ip", "link", "set", device, "up"])?;
        lab.run_in(ns, &["ip", "-6", "route", "add", "default", "dev", device, "table", table])?;
        lab.run_in(ns, &["ip", "-4", "route", "add", "default", "dev", device, "table", table])?;
    }
    lab.run_in(ns, &["ip", "-6", "rule", "add", "priority", "100", "iif", "cni0", "lookup", "1000"])?;
    let names = |ip: String| -> Result<Vec<String>> {
        let finished = run_podtrace(ns, &["follow", &ip, "--duration", "0.5", "-o", "json"])?;
        assert!(finished.status.success(), "{}", finished.stderr);
        Ok(hops(&finished.json()?).into_iter().map(|(name, ..)| name).collect())
    };
    let ipv6 = names(ip6(lab.pod_a().ip6).to_string())?;
    assert!(ipv6.contains(&"uplink0".to_string()) && !ipv6.contains(&"decoy0".to_string()), "{ipv6:?}");
    let ipv4 = names(lab.pod_a().ip.to_string())?;
    assert!(!ipv4.contains(&"uplink0".to_string()) && !ipv4.contains(&"decoy0".to_string()), "{ipv4:?}");
    Ok(())
}

/// flannel's default MTUs on a dual-stack node: the pods get 1450, which fits flannel.1 but
/// not flannel-v6.1 (1430). Followed by its IPv6 address, the pod's full-size TCP segments are
/// too large for flannel-v6.1; the node answers each with ICMPv6 packet-too-big, which podtrace
/// sees on its way back to the pod: a warning, not a blackhole, and never "fragmented". The
/// same pod followed by its IPv4 address has no MTU problem at all.
#[test]
fn flannels_default_mtus_put_ipv6_pods_above_their_tunnel_only() -> Result<()> {
    let lab = dual_stack_lab("dsmtu");
    let pod_b6 = ip6(lab.pod_b().ip6);
    let report = trace(&lab, ip6(lab.pod_a().ip6), |lab| {
        let _sink = traffic::tcp_sink_on(&lab.pod_b().netns, "::".parse()?, 5201)?;
        let sent = traffic::tcp_send(&lab.pod_a().netns, pod_b6, 5201, 100_000, 16_384, Duration::from_secs(10))?;
        assert_eq!(text(sent).trim(), "100000");
        Ok(())
    })?;
    let mtu: Vec<&Value> = report["findings"].as_array().unwrap().iter().filter(|f| f["kind"] == "mtu-mismatch").collect();
    let pod = mtu.iter().find(|f| f["hop"] == lab.pod_a().host_veth.as_str()).unwrap_or_else(|| panic!("{mtu:#?}"));
    assert_eq!(
        (&pod["evidence"]["mtu"], &pod["evidence"]["tunnel"], &pod["evidence"]["tunnel_mtu"]),
        (&1450.into(), &"flannel-v6.1".into(), &1430.into())
    );
    let oversized = mtu.iter().find(|f| f["evidence"]["largest_packet"].is_number()).unwrap_or_else(|| panic!("{mtu:#?}"));
    assert_eq!((&oversized["hop"], &oversized["evidence"]["next_hop"]), (&"cni0".into(), &"flannel-v6.1".into()));
    assert_eq!(oversized["evidence"]["largest_packet"], 1450);
    assert_eq!(
        oversized["evidence"]["dont_fragment_packets"], oversized["evidence"]["oversized_packets"],
        "IPv6 is never fragmented on the way"
    );
    assert!(oversized["evidence"]["icmp_frag_needed_sent"].as_u64().unwrap() > 0, "{oversized:#}");
    let summary = oversized["summary"].as_str().unwrap();
    assert!(summary.contains("ICMPv6 packet-too-big messages were sent back"), "{summary}");
    for finding in &mtu {
        assert_eq!((&finding["severity"], &finding["evidence"]["blackhole"]), (&"warning".into(), &false.into()), "{finding:#}");
    }

    let report = trace(&lab, lab.pod_a().ip.into(), |lab| {
        let _sink = traffic::tcp_sink(&lab.pod_b().netns, 5201)?;
        let sent = traffic::tcp_send(&lab.pod_a().netns, lab.pod_b().ip, 5201, 100_000, 16_384, Duration::from_secs(10))?;
        assert_eq!(text(sent).trim(), "100000");
        Ok(())
    })?;
    let serious = serious_findings(&report);
    assert!(serious.is_empty(), "{serious:#?}");
    Ok(())
}
