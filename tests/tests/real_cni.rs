//! The built-in lab as real software builds it: pods made by Debian's CNI plugins (bridge,
//! host-local, loopback), cluster DNS served by dnsmasq behind a Service written the way
//! kube-proxy's iptables mode writes it. Checks that the lab really is that, and that podtrace
//! on it counts what tcpdump counts and reports no problem where there is none. Needs root.

use std::time::Duration;

use anyhow::{Context as _, Result};
use podtrace_tests::{
    capture::Captures,
    lab::{DNS_SERVICE_IP, KUBERNETES_SERVICE_IP, Lab, LabSpec, unique_prefix},
    podtrace::Podtrace,
    report::serious_findings,
    traffic,
};
use serde_json::Value;

fn lab(tag: &str) -> Lab {
    Lab::up(LabSpec { prefix: unique_prefix(tag), ..Default::default() }).expect("bringing up the lab")
}

fn text(output: std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn mtu(lab: &Lab, ns: &str, ifname: &str) -> Result<u32> {
    text(lab.run_in(ns, &["cat", &format!("/sys/class/net/{ifname}/mtu")])?).trim().parse().context("parsing an MTU")
}

/// Ping, a TCP bulk transfer and UDP echoes from pod A to pod B (across the tunnel).
fn healthy_traffic(lab: &Lab) -> Result<()> {
    let (pod_a, pod_b) = (lab.pod_a(), lab.pod_b());
    let _sink = traffic::tcp_sink(&pod_b.netns, 5201)?;
    let _echo = traffic::udp_echo(&pod_b.netns, 7000)?;
    assert_eq!(traffic::ping_received(&traffic::ping(&pod_a.netns, pod_b.ip, 5, 56)?), 5);
    let sent = traffic::tcp_send(&pod_a.netns, pod_b.ip, 5201, 200_000, 16_384, Duration::from_secs(10))?;
    assert_eq!(text(sent).trim(), "200000");
    assert_eq!(traffic::udp_send(&pod_a.netns, pod_b.ip, 7000, 10, 300)?, 10);
    Ok(())
}

/// Follows `pod_ips` on node A while `traffic` runs; the JSON report.
fn trace(lab: &Lab, pod_ips: &[&str], traffic: impl FnOnce(&Lab) -> Result<()>) -> Result<Value> {
    trace_on(lab, &lab.node_a().netns, pod_ips, traffic)
}

/// Follows `pod_ips` in the node namespace `node` while `traffic` runs; the JSON report.
fn trace_on(lab: &Lab, node: &str, pod_ips: &[&str], traffic: impl FnOnce(&Lab) -> Result<()>) -> Result<Value> {
    let mut args = vec!["follow"];
    args.extend_from_slice(pod_ips);
    args.extend(["-o", "json"]);
    let podtrace = Podtrace::start(node, &args)?;
    traffic(lab)?;
    // Let the last packets cross every hop before stopping.
    std::thread::sleep(Duration::from_millis(300));
    let finished = podtrace.finish()?;
    assert!(finished.status.success(), "{}", finished.stderr);
    finished.json()
}

#[test]
fn pods_are_made_by_the_bridge_plugin() -> Result<()> {
    let lab = lab("cni");
    for (node, pod) in [(lab.node_a(), lab.pod_a()), (lab.node_b(), lab.pod_b()), (lab.node_b(), lab.dns_pod())] {
        // The plugin names the host-side veth "veth" + 8 random hex digits.
        let random = pod.host_veth.strip_prefix("veth").unwrap_or_default();
        assert!(random.len() == 8 && random.chars().all(|c| c.is_ascii_hexdigit()), "{}", pod.host_veth);
        let port = text(lab.run_in(&node.netns, &["bridge", "-d", "link", "show", "dev", &pod.host_veth])?);
        assert!(port.contains("master cni0") && port.contains("hairpin on"), "{port}");
        assert_eq!(mtu(&lab, &node.netns, &pod.host_veth)?, 1450, "{}", pod.host_veth);
        assert_eq!(mtu(&lab, &pod.netns, "eth0")?, 1450, "eth0 of {}", pod.netns);
        assert_eq!(mtu(&lab, &node.netns, "cni0")?, 1450, "cni0 of {}", node.netns);
        let route = text(lab.run_in(&pod.netns, &["ip", "route", "show", "default"])?);
        assert_eq!(route.trim(), format!("default via {} dev eth0", node.gateway), "{}", pod.netns);
        // host-local allocated the address from the node's subnet, as the pod has it.
        let address = text(lab.run_in(&pod.netns, &["ip", "-4", "-o", "addr", "show", "dev", "eth0"])?);
        assert!(address.contains(&format!("inet {}/24", pod.ip)), "{address}");
        let subnet: std::net::Ipv4Addr = node.pod_cidr.split('/').next().unwrap_or_default().parse()?;
        assert_eq!(pod.ip.octets()[..3], subnet.octets()[..3], "{} in {}", pod.ip, node.pod_cidr);
    }
    Ok(())
}

#[test]
fn counts_match_tcpdump_on_the_real_cni_lab() -> Result<()> {
    let lab = lab("rcnt");
    let captures = Captures::start(&lab, lab.pod_a().ip)?;
    let report = trace(&lab, &[&lab.pod_a().ip.to_string()], healthy_traffic)?;
    captures.assert_equal_to(&report)?;
    assert_eq!(report["lost_events"], 0);
    assert_eq!(report["unparsed"], 0);
    Ok(())
}

#[test]
fn cluster_dns_answers_through_the_service_without_findings() -> Result<()> {
    let lab = lab("rdns");
    let report = trace(&lab, &[&lab.pod_a().ip.to_string()], |lab| {
        // dnsmasq answers the pod's query sent to the Service IP: kube-proxy's DNAT on node A
        // took it to the DNS pod on node B, and conntrack took the answer back.
        let addresses = traffic::dns_lookup(&lab.pod_a().netns, DNS_SERVICE_IP, Duration::from_secs(2))?;
        assert_eq!(addresses, [KUBERNETES_SERVICE_IP]);
        assert_eq!(traffic::dns_query(&lab.pod_a().netns, DNS_SERVICE_IP, 3, Duration::from_secs(2))?, 3);
        Ok(())
    })?;
    let unanswered: Vec<_> = report["findings"].as_array().unwrap().iter().filter(|f| f["kind"] == "dns-unanswered").collect();
    assert!(unanswered.is_empty(), "{unanswered:#?}");
    let serious = serious_findings(&report);
    assert!(serious.is_empty(), "{serious:#?}");
    Ok(())
}

#[test]
fn healthy_real_cni_lab_has_no_warning_or_error() -> Result<()> {
    let lab = lab("rok");
    let report = trace(&lab, &[&lab.pod_a().ip.to_string()], healthy_traffic)?;
    let serious = serious_findings(&report);
    assert!(serious.is_empty(), "{serious:#?}");
    assert!(report["hops"][0]["packets"].as_u64().unwrap() > 100, "the traffic ran");
    Ok(())
}

/// `follow A B`: both ends of the conversation at once, on node A, the pods on two nodes.
#[test]
fn following_both_pods_gives_no_warning_or_error() -> Result<()> {
    let lab = lab("rab");
    let (pod_a, pod_b) = (lab.pod_a().ip.to_string(), lab.pod_b().ip.to_string());
    let report = trace(&lab, &[&pod_a, &pod_b], healthy_traffic)?;
    let serious = serious_findings(&report);
    assert!(serious.is_empty(), "{serious:#?}");
    assert!(report["hops"][0]["packets"].as_u64().unwrap() > 100, "the traffic ran");
    Ok(())
}

/// `follow B D` on node B, where both pods live (pod B and the DNS pod): ping, TCP bulk, UDP
/// and DNS between them, each request and its reply both a followed pod's.
#[test]
fn following_two_pods_on_one_node_gives_no_warning_or_error() -> Result<()> {
    let lab = lab("rbd");
    let (pod_b, dns) = (lab.pod_b(), lab.dns_pod());
    let report = trace_on(&lab, &lab.node_b().netns, &[&pod_b.ip.to_string(), &dns.ip.to_string()], |lab| {
        let (pod_b, dns) = (lab.pod_b(), lab.dns_pod());
        let _sink = traffic::tcp_sink(&dns.netns, 5201)?;
        let _echo = traffic::udp_echo(&dns.netns, 7000)?;
        assert_eq!(traffic::ping_received(&traffic::ping(&pod_b.netns, dns.ip, 5, 56)?), 5);
        let sent = traffic::tcp_send(&pod_b.netns, dns.ip, 5201, 200_000, 16_384, Duration::from_secs(10))?;
        assert_eq!(text(sent).trim(), "200000");
        assert_eq!(traffic::udp_send(&pod_b.netns, dns.ip, 7000, 10, 300)?, 10);
        assert_eq!(traffic::dns_query(&pod_b.netns, dns.ip, 3, Duration::from_secs(2))?, 3);
        Ok(())
    })?;
    let serious = serious_findings(&report);
    assert!(serious.is_empty(), "{serious:#?}");
    assert!(report["hops"][0]["packets"].as_u64().unwrap() > 100, "the traffic ran");
    Ok(())
}

/// A healthy bulk transfer with offloads on (pod A's TCP hands the stack buffers of many
/// segments) and, now and then, one full-size segment lost on node B, out of node A's sight:
/// each is retransmitted once and the acknowledgements move on. That is TCP recovering, not
/// the MTU signature, and the sizes reported are wire segments, not GSO buffers.
#[test]
fn isolated_retransmits_with_offloads_on_are_no_mtu_signature() -> Result<()> {
    let lab = lab("rrtx");
    let (node_a, node_b, pod_a, pod_b) = (lab.node_a(), lab.node_b(), lab.pod_a(), lab.pod_b());
    for (ns, ifname) in [(&pod_a.netns, "eth0"), (&node_a.netns, pod_a.host_veth.as_str()), (&pod_b.netns, "eth0")] {
        traffic::set_offloads(ns, ifname, true)?;
    }
    // One in 50 full-size segments, at most two a second, so that a retransmission itself
    // is never lost.
    let port = "5201";
    let nth = ["-m", "statistic", "--mode", "nth", "--every", "50", "--packet", "0"];
    let mut rule = vec!["-A", "FORWARD", "-p", "tcp", "--dport", port, "-m", "length", "--length", "1000:65535"];
    rule.extend(nth);
    rule.extend(["-m", "limit", "--limit", "2/second", "--limit-burst", "1", "-j", "DROP"]);
    lab.iptables(&node_b.netns, &rule)?;
    let report = trace(&lab, &[&pod_a.ip.to_string()], |lab| {
        let _sink = traffic::tcp_sink(&lab.pod_b().netns, 5201)?;
        let sent = traffic::tcp_send(&lab.pod_a().netns, lab.pod_b().ip, 5201, 4_000_000, 65_536, Duration::from_secs(20))?;
        assert_eq!(text(sent).trim(), "4000000");
        Ok(())
    })?;
    let serious = serious_findings(&report);
    assert!(serious.is_empty(), "{serious:#?}");
    let retransmits: Vec<_> = report["findings"].as_array().unwrap().iter().filter(|f| f["kind"] == "retransmits").collect();
    assert!(!retransmits.is_empty(), "the losses on node B caused retransmits: {:#}", report["findings"]);
    for finding in retransmits {
        assert_eq!(finding["severity"], "info", "{finding:#}");
        assert_eq!(finding["evidence"]["mtu_signature"], false, "{finding:#}");
        assert_eq!(finding["evidence"]["repeated_without_ack_progress"], 0, "{finding:#}");
        // 1450 MTU - 20 IP - 32 TCP header with timestamps.
        assert_eq!(finding["evidence"]["largest_segment_sent"], 1398, "{finding:#}");
        let sizes = finding["evidence"]["segment_sizes"].as_array().unwrap();
        assert!(sizes.iter().all(|s| s["bytes"].as_u64().unwrap() <= 1398), "{sizes:?}");
    }
    Ok(())
}

/// Resets that refuse nothing: pod B's server resets an established connection (a RST to pod
/// A's ephemeral port), and pod A gives up on one and resets it itself. Neither is a refused
/// port; each is a connection-reset, as information, naming the flow and the side.
#[test]
fn resets_of_set_up_connections_are_no_refusal() -> Result<()> {
    let lab = lab("rrst");
    let (pod_a, pod_b) = (lab.pod_a().ip, lab.pod_b().ip);
    let report = trace(&lab, &[&pod_a.to_string()], |lab| {
        let (pod_a, pod_b) = (lab.pod_a(), lab.pod_b());
        let _resetter = traffic::tcp_resetter(&pod_b.netns, 5300)?;
        let _sink = traffic::tcp_sink(&pod_b.netns, 5201)?;
        assert_eq!(traffic::tcp_abort(&pod_a.netns, pod_b.ip, 5300, true)?, "reset");
        assert_eq!(traffic::tcp_abort(&pod_a.netns, pod_b.ip, 5201, false)?, "aborted");
        Ok(())
    })?;
    let serious = serious_findings(&report);
    assert!(serious.is_empty(), "{serious:#?}");
    let resets: Vec<_> = report["findings"].as_array().unwrap().iter().filter(|f| f["kind"] == "connection-reset").collect();
    let by = |who: std::net::Ipv4Addr, port: u16| {
        resets
            .iter()
            .find(|f| f["evidence"]["reset_by"] == who.to_string() && f["evidence"]["reset_by_port"] == port)
            .unwrap_or_else(|| panic!("no reset by {who}:{port} in {resets:#?}"))
    };
    let by_server = by(pod_b, 5300);
    assert_eq!(by_server["severity"], "info");
    assert_eq!(by_server["hop"], lab.pod_a().host_veth.as_str());
    assert_eq!(by_server["evidence"]["peer"], pod_a.to_string());
    assert_eq!(by_server["evidence"]["count"], 1, "once, not once per hop: {by_server:#}");
    let by_client = resets
        .iter()
        .find(|f| f["evidence"]["reset_by"] == pod_a.to_string() && f["evidence"]["peer_port"] == 5201)
        .unwrap_or_else(|| panic!("no reset by {pod_a} of its connection to port 5201 in {resets:#?}"));
    assert_eq!(by_client["severity"], "info");
    assert!(by_client["summary"].as_str().unwrap().contains("(the followed pod) reset its TCP connection"), "{by_client:#}");
    Ok(())
}
/// A promiscuous tcpdump on node B's cni0 beside podtrace, following pod B: the bridge copies
/// every frame it forwards between its ports up its own stack, where the copies are freed as
/// "not for this host" (OTHERHOST) while the originals are delivered. Pod B talks to pod A
/// across the tunnel and to the DNS pod beside it on the bridge (ping and UDP). Copies freed
/// are not drops.
#[test]
fn a_promiscuous_capture_on_the_bridge_invents_no_drops() -> Result<()> {
    let lab = lab("rpro");
    let _tcpdump = traffic::promiscuous_capture(&lab.node_b().netns, "cni0")?;
    let report = trace_on(&lab, &lab.node_b().netns, &[&lab.pod_b().ip.to_string()], |lab| {
        healthy_traffic(lab)?;
        let (pod_b, dns) = (lab.pod_b(), lab.dns_pod());
        assert_eq!(traffic::ping_received(&traffic::ping(&pod_b.netns, dns.ip, 5, 56)?), 5);
        let _echo = traffic::udp_echo(&dns.netns, 7001)?;
        assert_eq!(traffic::udp_send(&pod_b.netns, dns.ip, 7001, 5, 300)?, 5);
        Ok(())
    })?;
    let serious = serious_findings(&report);
    assert!(serious.is_empty(), "{serious:#?}");
    assert!(report["hops"].as_array().unwrap().iter().all(|hop| hop["drops"] == 0), "{:#}", report["hops"]);
    // The copies are there, and said to be copies.
    let copies = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "copies-freed" && f["evidence"]["reason"] == "OTHERHOST")
        .unwrap_or_else(|| panic!("no OTHERHOST copies in {:#}", report["findings"]));
    assert_eq!((&copies["severity"], &copies["hop"]), (&Value::from("info"), &Value::from("cni0")), "{copies:#}");
    assert!(copies["summary"].as_str().unwrap().contains("because cni0 is promiscuous"), "{copies:#}");
    Ok(())
}

/// Pod B, followed on node B, is deleted mid-trace (its veth removed, as CNI DEL does) while
/// pod A keeps pinging its IP. Node B still resolves the IP to the dead pod's MAC, the bridge
/// floods those frames to the DNS pod, whose stack frees them as not its own (OTHERHOST): that
/// is the pod being gone, not a drop on the path.
#[test]
fn a_followed_pod_deleted_mid_trace_is_gone() -> Result<()> {
    let lab = lab("rgone");
    let (pod_b, veth) = (lab.pod_b().ip, lab.pod_b().host_veth.clone());
    let report = trace_on(&lab, &lab.node_b().netns, &[&pod_b.to_string()], |lab| {
        let pod_a = lab.pod_a();
        assert_eq!(traffic::ping_received(&traffic::ping(&pod_a.netns, pod_b, 3, 56)?), 3);
        lab.run_in(&lab.node_b().netns, &["ip", "link", "del", &veth])?;
        assert_eq!(traffic::ping_received(&traffic::ping(&pod_a.netns, pod_b, 5, 56)?), 0);
        Ok(())
    })?;
    let errors: Vec<_> = report["findings"].as_array().unwrap().iter().filter(|f| f["severity"] == "error").collect();
    assert!(errors.is_empty(), "{errors:#?}");
    let gone = report["findings"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["kind"] == "pod-gone")
        .unwrap_or_else(|| panic!("no pod-gone in {:#}", report["findings"]));
    assert_eq!(gone["severity"], "warning");
    assert_eq!(gone["hop"], veth.as_str());
    assert_eq!(gone["evidence"]["pod"], pod_b.to_string());
    let summary = gone["summary"].as_str().unwrap();
    assert!(summary.starts_with(&format!("The followed pod {pod_b} is gone: its veth {veth} disappeared during the trace")), "{gone:#}");
    assert!(gone["evidence"]["drops_to_pod"].as_u64().unwrap() > 0, "{gone:#}");
    assert!(report["hops"].as_array().unwrap().iter().filter(|h| h["ifname"] == veth.as_str()).all(|h| h["vanished"] == true));
    Ok(())
}

/// The text report's header names the node (`--node-name`), with one spelling of the pod's
/// locality, and no finding on a healthy lab.
#[test]
fn the_text_report_names_the_node() -> Result<()> {
    let lab = lab("rtxt");
    let pod_a = lab.pod_a().ip.to_string();
    let podtrace = Podtrace::start(&lab.node_a().netns, &["follow", &pod_a, "--node-name", "k8s-node-a"])?;
    assert_eq!(traffic::ping_received(&traffic::ping(&lab.pod_a().netns, lab.pod_b().ip, 3, 56)?), 3);
    std::thread::sleep(Duration::from_millis(300));
    let finished = podtrace.finish()?;
    assert!(finished.status.success(), "{}", finished.stderr);
    let header = finished.stdout.lines().next().unwrap_or_default();
    assert!(header.starts_with(&format!("podtrace report for {pod_a} (local pod) on node k8s-node-a — ")), "{}", finished.stdout);
    assert!(!finished.stdout.contains("Local pod") && !finished.stderr.contains("Local pod"), "{}{}", finished.stderr, finished.stdout);
    assert!(finished.stdout.contains("findings: none"), "{}", finished.stdout);
    Ok(())
}

/// Everything at once on a healthy lab: offloads on (GSO buffers), a promiscuous tcpdump on
/// node A's cni0, both pods followed, and ping, TCP bulk, UDP and DNS through the Service.
#[test]
fn healthy_lab_with_offloads_a_capture_and_both_pods_followed_has_no_warning_or_error() -> Result<()> {
    let lab = lab("rall");
    let (pod_a, pod_b) = (lab.pod_a(), lab.pod_b());
    for (ns, ifname) in [(&pod_a.netns, "eth0"), (&lab.node_a().netns, pod_a.host_veth.as_str()), (&pod_b.netns, "eth0")] {
        traffic::set_offloads(ns, ifname, true)?;
    }
    let _tcpdump = traffic::promiscuous_capture(&lab.node_a().netns, "cni0")?;
    let report = trace(&lab, &[&pod_a.ip.to_string(), &pod_b.ip.to_string()], |lab| {
        healthy_traffic(lab)?;
        assert_eq!(traffic::dns_query(&lab.pod_a().netns, DNS_SERVICE_IP, 3, Duration::from_secs(2))?, 3);
        Ok(())
    })?;
    let serious = serious_findings(&report);
    assert!(serious.is_empty(), "{serious:#?}");
    // GSO buffers: few packets, many bytes.
    assert!(report["hops"][0]["bytes"].as_u64().unwrap() > 200_000, "the traffic ran: {:#}", report["hops"][0]);
    Ok(())
}

/// Pod B, followed on node B, refuses pod A's connection to a port nothing listens on: the
/// followed server pod's refusal, named with the client.
#[test]
fn a_followed_server_pod_refusing_a_client_is_port_refused() -> Result<()> {
    let lab = lab("rsrv");
    let (pod_a, pod_b) = (lab.pod_a().ip.to_string(), lab.pod_b().ip.to_string());
    let report = trace_on(&lab, &lab.node_b().netns, &[&pod_b], |lab| {
        // The client fails: that is the refusal.
        traffic::tcp_send(&lab.pod_a().netns, lab.pod_b().ip, 9, 10, 10, Duration::from_secs(2))?;
        Ok(())
    })?;
    let refused: Vec<_> = report["findings"].as_array().unwrap().iter().filter(|f| f["kind"] == "port-refused").collect();
    assert_eq!(refused.len(), 1, "{:#}", report["findings"]);
    let finding = refused[0];
    assert_eq!(finding["hop"], lab.pod_b().host_veth.as_str());
    assert_eq!((&finding["evidence"]["peer"], &finding["evidence"]["from"]), (&Value::from(pod_b.clone()), &Value::from(pod_a.clone())));
    assert_eq!((&finding["evidence"]["port"], &finding["evidence"]["count"]), (&Value::from(9), &Value::from(1)));
    assert!(finding["summary"].as_str().unwrap().starts_with(&format!("{pod_b} port 9/tcp refused {pod_a}'s packets")), "{finding:#}");
    // The SYN pod B's kernel answered with the RST is that refusal, not also a drop.
    let others: Vec<_> = serious_findings(&report).into_iter().filter(|f| f["kind"] != "port-refused").collect();
    assert!(others.is_empty(), "{others:#?}");
    Ok(())
}
