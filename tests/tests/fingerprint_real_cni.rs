//! Packets recognised hop by hop on real traffic, and only the followed pod's unparsable
//! packets counted, on pods made by the real CNI bridge plugin. Needs root.

use std::time::Duration;

use anyhow::Result;
use podtrace_tests::{
    lab::{DNS_SERVICE_IP, KUBERNETES_SERVICE_NAME, Lab, LabSpec, Pod, unique_prefix},
    podtrace::Podtrace,
    report::hop,
    traffic,
};
use serde_json::Value;

fn lab(tag: &str, pods_per_node: usize) -> Lab {
    Lab::up(LabSpec { prefix: unique_prefix(tag), pods_per_node, ..Default::default() }).expect("bringing up the lab")
}

/// A resolver's burst: `count` same-size queries back to back from one socket, random query
/// ids, DF set and IP ID 0, as Linux sends DF datagrams from unconnected UDP sockets (kernels
/// that number them instead, as newer ones may, are given ID 0 here by sending the queries
/// through a raw socket; the answers come back to a UDP socket bound to the same port).
/// Prints how many answers came.
const DNS_BURST: &str = r#"
import os, socket, struct, sys
src, server, name, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
answers = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); answers.bind((src, 0)); answers.settimeout(2)
sport = answers.getsockname()[1]
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
qname = b"".join(bytes([len(p)]) + p for p in name.encode().split(b".")) + b"\x00"
for i in range(count):
    qid = struct.unpack(">H", os.urandom(2))[0]
    dns = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + qname + b"\x00\x01\x00\x01"
    udp = struct.pack("!HHHH", sport, 53, 8 + len(dns), 0) + dns
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0x4000, 64, 17, 0, socket.inet_aton(src), socket.inet_aton(server))
    raw.sendto(ip + udp, (server, 0))
received = 0
try:
    while received < count:
        answers.recvfrom(512); received += 1
except socket.timeout:
    pass
print(received)
"#;

/// IPv4 packets to `dst` whose TCP header is cut after its ports: unparsable on every hop.
const TRUNCATED_TCP: &str = r#"
import socket, struct, sys
src, dst, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
for i in range(count):
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 24, i + 1, 0x4000, 64, 6, 0, socket.inet_aton(src), socket.inet_aton(dst))
    s.sendto(header + b"\x9c\x40\x00\x50", (dst, 0))
"#;

fn python(lab: &Lab, pod: &Pod, script: &str, args: &[String]) -> Result<String> {
    let mut command = vec!["python3", "-c", script];
    command.extend(args.iter().map(String::as_str));
    Ok(String::from_utf8_lossy(&lab.run_in(&pod.netns, &command)?.stdout).trim().to_string())
}

fn follow(lab: &Lab, pod: &Pod, traffic: impl FnOnce() -> Result<()>) -> Result<Value> {
    let podtrace = Podtrace::start(&lab.node_a().netns, &["follow", &pod.ip.to_string(), "-o", "json"])?;
    traffic()?;
    std::thread::sleep(Duration::from_millis(300));
    let finished = podtrace.finish()?;
    assert!(finished.status.success(), "{}", finished.stderr);
    finished.json()
}

/// Same-size DNS queries with IP ID 0 used to share one fingerprint: with the burst queued
/// between two hops (here in a rate-limited flannel.1 qdisc, as on a busy uplink), a query
/// reaching eth0 was linked to whichever twin was last seen at flannel.1, or to nothing.
/// Now each query's id tells it apart, and every query and answer after its first hop is
/// linked, with the queueing as its latency.
#[test]
fn a_dns_burst_with_ip_id_zero_is_linked_query_by_query() -> Result<()> {
    let lab = lab("dnsb", 1);
    let (pod, veth) = (lab.pod_a(), lab.pod_a().host_veth.clone());
    lab.run_in(
        &lab.node_a().netns,
        // Slower than the slowest sender (a VM under emulation sends a query every few
        // milliseconds), so that the burst always queues.
        &["tc", "qdisc", "add", "dev", &lab.node_a().vxlan, "root", "tbf", "rate", "50kbit", "burst", "1600", "latency", "2s"],
    )?;
    let args = [pod.ip.to_string(), DNS_SERVICE_IP.to_string(), KUBERNETES_SERVICE_NAME.to_string(), "40".to_string()];
    let report = follow(&lab, pod, || {
        assert_eq!(python(&lab, pod, DNS_BURST, &args)?, "40", "every query answered");
        Ok(())
    })?;
    assert_eq!(hop(&report, &veth, "ingress")["packets"], 40);
    let later = [("cni0", "ingress"), ("flannel.1", "egress"), ("eth0", "egress"), ("flannel.1", "ingress"), ("cni0", "egress")];
    for (ifname, direction) in later.into_iter().chain([(veth.as_str(), "egress")]) {
        let at = hop(&report, ifname, direction);
        assert_eq!(at["packets"], 40, "{ifname} {direction}: {at:#}");
        assert_eq!(at["linked"], 40, "{ifname} {direction}: every packet linked to its own earlier sighting: {at:#}");
    }
    let queued = hop(&report, "eth0", "egress")["latency_us"]["p99"].as_f64().unwrap_or_default();
    assert!(queued > 20_000.0, "eth0 egress p99 {queued} us: the queue in flannel.1's qdisc");
    Ok(())
}

/// Another pod's unparsable packets cross cni0, flannel.1 and eth0, hops of the followed
/// pod's path: they no longer count as the report's own unparsed packets. The followed pod's
/// do.
#[test]
fn only_the_followed_pods_unparsable_packets_count() -> Result<()> {
    let lab = lab("unpa", 2);
    let (pod, other, peer) = (&lab.node_a().pods[0], &lab.node_a().pods[1], lab.pod_b());
    let garbage = |from: &Pod| [from.ip.to_string(), peer.ip.to_string(), "20".to_string()];
    let report = follow(&lab, pod, || {
        python(&lab, other, TRUNCATED_TCP, &garbage(other))?;
        assert_eq!(traffic::ping_received(&traffic::ping(&pod.netns, peer.ip, 3, 56)?), 3);
        Ok(())
    })?;
    assert_eq!(report["unparsed"], 0, "{:#}", report["findings"]);
    assert!(report["findings"].as_array().unwrap().iter().all(|f| f["kind"] != "lost-events"), "{:#}", report["findings"]);

    let report = follow(&lab, pod, || python(&lab, pod, TRUNCATED_TCP, &garbage(pod)).map(drop))?;
    // Each crosses the pod's veth, cni0, flannel.1 and (encapsulated) eth0.
    assert_eq!(report["unparsed"], 20 * 4, "{:#}", report["findings"]);
    assert!(report["findings"].as_array().unwrap().iter().any(|f| f["kind"] == "lost-events"), "{:#}", report["findings"]);
    Ok(())
}
