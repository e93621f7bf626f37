//! A pod talking to a host outside the cluster, masqueraded to its node's address on the way
//! out as flanneld's `ipMasq` rules do, and a client outside reaching a pod through a
//! NodePort, DNATed and masqueraded by kube-proxy's rules: podtrace follows the translated
//! packets on the NIC, where they carry no pod address, as the pod's. Needs root.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::Result;
use podtrace_tests::{
    capture::{Captures, ip_filter, vxlan_inner_filter},
    kube_proxy,
    lab::{EXTERNAL_IP, Lab, LabSpec, unique_prefix},
    podtrace::Podtrace,
    report::{hop, serious_findings},
    traffic,
};
use serde_json::Value;

/// The pod's and the node's traffic to the external host, told apart on the NIC, where both
/// carry the node's address: the pod pings with 56 bytes of data (84-byte IPv4 packets) and
/// connects to port 8080, the node pings with 120 and connects to port 8081.
const POD_PORT: u16 = 8080;
const NODE_PORT: u16 = 8081;

fn lab(tag: &str) -> Lab {
    Lab::up(LabSpec { prefix: unique_prefix(tag), external: true, ..Default::default() }).expect("bringing up the lab")
}

/// The pod's translated flows on node A's NIC: between the node's address and the external
/// host, the pod's echo size or the pod's port. The node's own flows have the same addresses.
fn translated_filter(node: Ipv4Addr) -> String {
    format!("host {node} and host {EXTERNAL_IP} and ((icmp and ip[2:2] = 84) or tcp port {POD_PORT})")
}

/// Follows pod A while it and node A ping the external host and send it a few TCP bytes,
/// with tcpdump on pod A's veth, cni0 (the pod's address) and eth0 (the translated tuple).
fn trace_external(lab: &Lab) -> Result<(Value, Captures)> {
    let ext = lab.external.as_deref().expect("an external lab");
    let node = lab.node_a();
    let pod = lab.pod_a();
    let hops = [
        (pod.host_veth.clone(), ip_filter(pod.ip)),
        ("cni0".to_string(), ip_filter(pod.ip)),
        (node.underlay.clone(), translated_filter(node.ip)),
    ];
    let _pod_sink = traffic::tcp_sink(ext, POD_PORT)?;
    let _node_sink = traffic::tcp_sink(ext, NODE_PORT)?;
    let captures = Captures::on(&node.netns, &hops)?;
    let podtrace = Podtrace::start(&node.netns, &["follow", &pod.ip.to_string(), "-o", "json"])?;
    let pod_ping = traffic::ping(&pod.netns, EXTERNAL_IP, 5, 56)?;
    let node_ping = traffic::ping(&node.netns, EXTERNAL_IP, 5, 120)?;
    let timeout = Duration::from_secs(5);
    let pod_tcp = traffic::tcp_send(&pod.netns, EXTERNAL_IP, POD_PORT, 20_000, 1000, timeout)?;
    let node_tcp = traffic::tcp_send(&node.netns, EXTERNAL_IP, NODE_PORT, 20_000, 1000, timeout)?;
    // Let the last packets cross every hop before stopping.
    std::thread::sleep(Duration::from_millis(300));
    let finished = podtrace.finish()?;
    assert!(finished.status.success(), "{}", finished.stderr);
    for (what, output) in [("pod ping", &pod_ping), ("node ping", &node_ping)] {
        assert_eq!(traffic::ping_received(output), 5, "{what}: {}", String::from_utf8_lossy(&output.stdout));
    }
    for (what, output) in [("pod TCP", &pod_tcp), ("node TCP", &node_tcp)] {
        assert!(output.status.success(), "{what}: {}", String::from_utf8_lossy(&output.stderr));
    }
    Ok((finished.json()?, captures))
}

/// Pod A's pings and TCP connection to the external host: every hop's count equals
/// tcpdump's, on eth0 with the translated tuple (the node's address), while the node's own
/// flows to the same host, with the same addresses, are not counted; the translated packets
/// are linked to the pod's on cni0 and the flows learned; nothing is wrong.
#[test]
fn masqueraded_ping_and_tcp_counts_match_tcpdump() -> Result<()> {
    let lab = lab("nat");
    let (report, captures) = trace_external(&lab)?;
    captures.assert_equal_to(&report)?;
    let underlay = lab.node_a().underlay.as_str();
    // Every translated packet leaving is one the pod sent through cni0; every reply coming in
    // reaches cni0 as the pod's.
    let out = hop(&report, underlay, "egress");
    assert_eq!(out["linked"], out["packets"], "{out}");
    let back = hop(&report, "cni0", "egress");
    assert_eq!(back["linked"], hop(&report, underlay, "ingress")["packets"], "{back}");
    for direction in ["egress", "ingress"] {
        assert_eq!(hop(&report, "flannel.1", direction)["packets"], 0, "nothing crossed the tunnel");
    }
    // The ping's flow and the TCP connection.
    assert_eq!(report["translated_flows"], 2, "{report:#}");
    assert_eq!((&report["lost_events"], &report["unparsed"]), (&Value::from(0), &Value::from(0)));
    assert!(serious_findings(&report).is_empty(), "{:#?}", report["findings"]);
    Ok(())
}

/// The external host drops everything: the pod's pings and connection attempts left node A
/// masqueraded, so `no-reply` names eth0 egress as the last hop, the node's address as what
/// they left as, and eth0 ingress as where no reply came back.
#[test]
fn a_drop_outside_gives_no_reply_at_the_nic_with_the_translated_address() -> Result<()> {
    let lab = lab("natdrop");
    let ext = lab.external.as_deref().expect("an external lab");
    lab.iptables(ext, &["-A", "INPUT", "-j", "DROP"])?;
    let node = lab.node_a();
    let pod = lab.pod_a();
    let podtrace = Podtrace::start(&node.netns, &["follow", &pod.ip.to_string(), "-o", "json", "--reply-timeout-ms", "1000"])?;
    let ping = traffic::ping(&pod.netns, EXTERNAL_IP, 4, 56)?;
    assert_eq!(traffic::ping_received(&ping), 0);
    let tcp = traffic::tcp_send(&pod.netns, EXTERNAL_IP, POD_PORT, 100, 100, Duration::from_secs(2))?;
    assert!(!tcp.status.success(), "the connection must not be made");
    // Past the reply timeout of the last attempt.
    std::thread::sleep(Duration::from_millis(1200));
    let finished = podtrace.finish()?;
    assert!(finished.status.success(), "{}", finished.stderr);
    let report = finished.json()?;
    let no_reply: Vec<&Value> = report["findings"].as_array().unwrap().iter().filter(|f| f["kind"] == "no-reply").collect();
    assert_eq!(no_reply.len(), 2, "pings and connection attempts: {:#?}", report["findings"]);
    let underlay = node.underlay.as_str();
    for finding in no_reply {
        let evidence = &finding["evidence"];
        assert_eq!(finding["hop"], underlay);
        assert_eq!(evidence["peer"], EXTERNAL_IP.to_string());
        assert_eq!(evidence["last_hop"], format!("{underlay} egress"));
        assert_eq!(evidence["first_hop_missing"], format!("{underlay} ingress"));
        assert_eq!(evidence["translated_to"], serde_json::json!([node.ip.to_string()]));
        let summary = finding["summary"].as_str().unwrap();
        assert!(summary.contains(&format!("where they left this node translated by the node's NAT to {}", node.ip)), "{summary}");
    }
    Ok(())
}

/// The NodePort of the web Service whose endpoint is pod B, and the port pod B serves on.
const WEB_NODE_PORT: u16 = 30080;
const WEB_POD_PORT: u16 = 8080;

/// The external host connects to node A's NodePort, which kube-proxy's rules DNAT to pod B
/// on node B and masquerade. podtrace on node A follows pod B: on eth0 the client's packets
/// carry node A's address and the NodePort, and the replies leave un-DNATed, yet both are
/// counted as pod B's, as tcpdump counts that flow, except the SYN: it arrives before the
/// first reply that teaches the flow, and the report says so. Each translated packet is
/// linked to pod B's packets in flannel.1, and nothing is wrong.
#[test]
fn a_node_port_flow_is_followed_from_the_nic_through_its_dnat() -> Result<()> {
    let lab = lab("nport");
    let ext = lab.external.as_deref().expect("an external lab");
    let (node, pod_b) = (lab.node_a(), lab.pod_b());
    kube_proxy::add_web_node_port(&node.netns, WEB_NODE_PORT, SocketAddrV4::new(pod_b.ip, WEB_POD_PORT))?;
    let _sink = traffic::tcp_sink(&pod_b.netns, WEB_POD_PORT)?;
    let underlay = node.underlay.as_str();
    let hops = [
        (underlay.to_string(), format!("(host {EXTERNAL_IP} and tcp port {WEB_NODE_PORT}) or ({})", vxlan_inner_filter(pod_b.ip))),
        ("flannel.1".to_string(), ip_filter(pod_b.ip)),
    ];
    let captures = Captures::on(&node.netns, &hops)?;
    let podtrace = Podtrace::start(&node.netns, &["follow", &pod_b.ip.to_string(), "-o", "json"])?;
    let tcp = traffic::tcp_send(ext, node.ip, WEB_NODE_PORT, 20_000, 1000, Duration::from_secs(5))?;
    assert!(tcp.status.success(), "{}", String::from_utf8_lossy(&tcp.stderr));
    // Let the last packets cross every hop before stopping.
    std::thread::sleep(Duration::from_millis(300));
    let finished = podtrace.finish()?;
    assert!(finished.status.success(), "{}", finished.stderr);
    let report = finished.json()?;
    // The SYN, before any reply, is not matched on eth0 ingress.
    captures.assert_equal_to_except(&report, &[(underlay, "ingress", 1)])?;
    // Every client packet matched on eth0 went on through flannel.1 as pod B's; every reply
    // leaving eth0 for the client came out of flannel.1.
    let tunnel_out = hop(&report, "flannel.1", "egress");
    assert_eq!(tunnel_out["linked"].as_u64().unwrap(), tunnel_out["packets"].as_u64().unwrap() - 1, "all but the SYN: {tunnel_out}");
    let out = hop(&report, underlay, "egress");
    assert_eq!(out["linked"], out["packets"], "{out}");
    assert_eq!((&report["translated_flows"], &report["dnat_flows"]), (&Value::from(1), &Value::from(1)), "{report:#}");
    let notes = report["notes"].as_array().unwrap();
    assert!(notes.iter().any(|note| note.as_str().unwrap().starts_with("flows DNATed to the pod (NodePort): 1,")), "{notes:#?}");
    assert_eq!((&report["lost_events"], &report["unparsed"]), (&Value::from(0), &Value::from(0)));
    assert!(serious_findings(&report).is_empty(), "{:#?}", report["findings"]);
    Ok(())
}
