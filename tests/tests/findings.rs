//! Each runbook fault injected into the lab, podtrace run as a user would, and the finding
//! checked: kind, hop and values. Needs root.

use anyhow::Result;
use podtrace_tests::{
    lab::{Lab, LabSpec, unique_prefix},
    podtrace::Podtrace,
    report::hop,
    scenario::{self, Scenario, ServiceAnswers},
};
use serde_json::Value;

/// Brings up the lab for `name`, injects the fault, traces while the traffic runs, and
/// returns the JSON report.
fn trace(name: &str) -> Result<(Lab, Value)> {
    let mut spec = LabSpec { prefix: unique_prefix(name), ..Default::default() };
    scenario::adjust_spec(name, &mut spec);
    let lab = Lab::up(spec)?;
    let report = {
        let scenario = Scenario::prepare(&lab, name)?;
        let (node, pod) = scenario.traced(&lab);
        let podtrace = Podtrace::start(node, &["follow", &pod.to_string(), "-o", "json", "--reply-timeout-ms", "800"])?;
        scenario.traffic(&lab)?;
        // Give unanswered requests their reply timeout before ending the trace.
        std::thread::sleep(std::time::Duration::from_millis(900));
        let finished = podtrace.finish()?;
        assert!(finished.status.success(), "{}", finished.stderr);
        finished.json()?
    };
    Ok((lab, report))
}

fn findings<'a>(report: &'a Value, kind: &str) -> Vec<&'a Value> {
    report["findings"].as_array().unwrap().iter().filter(|f| f["kind"] == kind).collect()
}

fn one<'a>(report: &'a Value, kind: &str) -> &'a Value {
    let found = findings(report, kind);
    assert!(!found.is_empty(), "no {kind} finding in {:#}", report["findings"]);
    found[0]
}

fn assert_shape(finding: &Value) {
    for key in ["kind", "severity", "hop", "summary", "evidence", "advice"] {
        assert!(finding.get(key).is_some(), "finding without {key}: {finding:#}");
    }
    assert!(["info", "warning", "error"].contains(&finding["severity"].as_str().unwrap()));
}

#[test]
fn healthy_lab_has_no_warning_or_error() -> Result<()> {
    let (_lab, report) = trace("none")?;
    let serious: Vec<_> = report["findings"].as_array().unwrap().iter().filter(|f| f["severity"] != "info").collect();
    assert!(serious.is_empty(), "{serious:#?}");
    assert!(report["hops"][0]["packets"].as_u64().unwrap() > 100, "the traffic ran");
    Ok(())
}

#[test]
fn firewall_drop_on_node_b_names_the_reason_and_the_hop() -> Result<()> {
    let (_lab, report) = trace("drop")?;
    let drop = one(&report, "drop");
    assert_shape(drop);
    assert_eq!(drop["severity"], "error");
    // Kernels before 5.17 (5.10 in the VM suite) give no reason, and kernel_sources says so.
    let reasons_known = !report["kernel_sources"]["drops"].as_str().unwrap().contains("without drop reasons");
    assert_eq!(drop["evidence"]["reason"], if reasons_known { "NETFILTER_DROP" } else { "reason unknown on this kernel" });
    assert_eq!(drop["hop"], "flannel.1");
    assert_eq!(drop["evidence"]["direction"], "ingress");
    // nf_hook_slow with legacy iptables, nft_do_chain with iptables-nft.
    let function = drop["evidence"]["function"].as_str().unwrap();
    assert!(["nf_hook_slow", "nft_do_chain"].contains(&function), "{drop:#}");
    assert!(drop["evidence"]["location"].as_str().unwrap().starts_with(&format!("{function}+0x")), "{drop:#}");
    // Between flannel.1 ingress and cni0 egress.
    assert!(drop["summary"].as_str().unwrap().contains("after flannel.1 ingress, before cni0 egress"), "{drop:#}");
    // Every SYN to the firewalled port was dropped, and nothing else: the connection attempt
    // and at least one retransmission of it, each a packet whose journey ended at
    // flannel.1 ingress.
    let hop = report["hops"].as_array().unwrap().iter().find(|h| h["ifname"] == "flannel.1" && h["direction"] == "ingress").unwrap();
    let count = drop["evidence"]["count"].as_u64().unwrap();
    assert!(count >= 2, "{drop:#}");
    assert_eq!(hop["last_seen"], count, "{hop:#}");
    assert_eq!(hop["drops"], count);
    Ok(())
}

/// Node B's underlay MTU is 1400, node A's 1500: pod A's large segments stall. Node A sees
/// only full-size segments retransmitted (the MTU signature); node B sees a tunnel that
/// cannot fit its underlay, and its NIC dropping the frames.
#[test]
fn underlay_mtu_mismatch_between_nodes() -> Result<()> {
    let mut spec = LabSpec { prefix: unique_prefix("mtu"), ..Default::default() };
    scenario::adjust_spec("mtu", &mut spec);
    let lab = Lab::up(spec)?;
    let scenario = Scenario::prepare(&lab, "mtu")?;
    let on_a = Podtrace::start(&lab.node_a().netns, &["follow", &lab.pod_a().ip.to_string(), "-o", "json"])?;
    let on_b = Podtrace::start(&lab.node_b().netns, &["follow", &lab.pod_b().ip.to_string(), "-o", "json"])?;
    scenario.traffic(&lab)?;
    let report_a = on_a.finish()?.json()?;
    let report_b = on_b.finish()?.json()?;

    // One finding per retransmitting connection (a kernel may retransmit on more than one),
    // each on the hop where the pod's packets enter the path; that hop shows their sum.
    let all = findings(&report_a, "retransmits");
    let mut total = 0;
    for finding in &all {
        assert_shape(finding);
        assert_eq!(finding["hop"], lab.pod_a().host_veth.as_str(), "{finding:#}");
        let sizes = finding["evidence"]["segment_sizes"].as_array().unwrap();
        let count = finding["evidence"]["retransmits"].as_u64().unwrap();
        assert_eq!(sizes.iter().map(|s| s["count"].as_u64().unwrap()).sum::<u64>(), count, "{sizes:?}");
        total += count;
    }
    assert!(total > 0, "{:#}", report_a["findings"]);
    assert_eq!(report_a["hops"][0]["retransmits"], total);
    let retransmits = *all
        .iter()
        .find(|finding| finding["evidence"]["mtu_signature"] == true)
        .unwrap_or_else(|| panic!("no MTU signature: {:#}", report_a["findings"]));
    let count = retransmits["evidence"]["retransmits"].as_u64().unwrap();
    assert!(retransmits["summary"].as_str().unwrap().contains("only full-size segments"));
    // Full-size: 1450 MTU - 20 IP - 32 TCP header with timestamps.
    let sizes = retransmits["evidence"]["segment_sizes"].as_array().unwrap();
    assert!(sizes.iter().all(|s| s["bytes"] == 1398), "{sizes:?}");
    assert_eq!(sizes.iter().map(|s| s["count"].as_u64().unwrap()).sum::<u64>(), count, "{sizes:?}");
    // Each packet back from pod B counted once, not once per hop it crossed: no more than
    // pod A's veth delivered to it.
    let back = retransmits["evidence"]["packets_back_from_peer"].as_u64().unwrap();
    let delivered = hop(&report_a, &lab.pod_a().host_veth, "egress")["packets"].as_u64().unwrap();
    assert!(back > 0 && back <= delivered, "{back} packets back, {delivered} delivered: {retransmits:#}");
    // Node A's own configuration is consistent: no MTU finding there.
    assert!(findings(&report_a, "mtu-mismatch").is_empty(), "{:#}", report_a["findings"]);
    // Pod A's retransmits never show up in node B's report. (Pod B's own may: under a slow
    // VM its FIN to the stalled client can go out twice before the client's reset.)
    let pod_a_sends = format!("{}:", lab.pod_a().ip);
    let pod_a_retransmits: Vec<_> = findings(&report_b, "retransmits")
        .into_iter()
        .filter(|f| f["evidence"]["flow"].as_str().unwrap().starts_with(&pod_a_sends))
        .collect();
    assert!(pod_a_retransmits.is_empty(), "{:#}", report_b["findings"]);

    let mismatch = findings(&report_b, "mtu-mismatch")
        .into_iter()
        .find(|f| f["hop"] == "flannel.1")
        .unwrap_or_else(|| panic!("{:#}", report_b["findings"]))
        .clone();
    assert_shape(&mismatch);
    assert_eq!(mismatch["evidence"]["tunnel_mtu"], 1450);
    assert_eq!(mismatch["evidence"]["underlay"], "eth0");
    assert_eq!(mismatch["evidence"]["underlay_mtu"], 1400);
    assert_eq!(mismatch["evidence"]["blackhole"], true);
    assert!(mismatch["evidence"]["underlay_rx_dropped_during_trace"].as_u64().unwrap() > 0, "{mismatch:#}");
    Ok(())
}

/// Pod A's MTU is 1500 over a 1450 tunnel and node A blocks ICMP fragmentation-needed.
#[test]
fn pod_mtu_above_the_tunnel_with_icmp_blocked_is_a_blackhole() -> Result<()> {
    let (lab, report) = trace("pod-mtu")?;
    let veth = lab.pod_a().host_veth.clone();
    let all = findings(&report, "mtu-mismatch");
    let config = all.iter().find(|f| f["hop"] == veth.as_str()).unwrap_or_else(|| panic!("{:#}", report["findings"]));
    assert_shape(config);
    assert_eq!(config["evidence"]["mtu"], 1500);
    assert_eq!(config["evidence"]["tunnel"], "flannel.1");
    assert_eq!(config["evidence"]["tunnel_mtu"], 1450);
    // Traffic: 1500-byte packets crossed cni0 heading for flannel.1 (MTU 1450); the kernel
    // generated fragmentation-needed, and the firewall dropped it: a blackhole.
    let oversized = all
        .iter()
        .find(|f| f["hop"] == "cni0" && f["evidence"]["largest_packet"].is_number())
        .unwrap_or_else(|| panic!("{:#}", report["findings"]));
    assert_eq!(oversized["evidence"]["largest_packet"], 1500);
    assert_eq!(oversized["evidence"]["next_hop"], "flannel.1");
    assert_eq!(oversized["evidence"]["next_hop_mtu"], 1450);
    // Where the kernel has no icmp:icmp_send (5.10), whether any was sent is unknown: null.
    match report["kernel_sources"]["icmp_errors"].as_str().unwrap().starts_with("unavailable") {
        false => assert!(oversized["evidence"]["icmp_frag_needed_sent"].as_u64().unwrap() > 0, "{oversized:#}"),
        true => assert!(oversized["evidence"]["icmp_frag_needed_sent"].is_null(), "{oversized:#}"),
    }
    assert!(oversized["evidence"]["icmp_frag_needed_dropped"].as_u64().unwrap() > 0, "{oversized:#}");
    assert_eq!(oversized["evidence"]["blackhole"], true);
    Ok(())
}

#[test]
fn vxlan_bound_to_a_second_address_is_named() -> Result<()> {
    let (_lab, report) = trace("vxlan-source")?;
    let all = findings(&report, "vxlan-source-mismatch");
    let traffic = all.iter().find(|f| f["evidence"]["outer_source"] == "10.99.0.11").unwrap_or_else(|| panic!("{:#}", report["findings"]));
    assert_shape(traffic);
    assert_eq!(traffic["severity"], "error");
    assert_eq!(traffic["hop"], "eth0");
    assert_eq!(traffic["evidence"]["endpoint"], "10.99.0.1");
    let addresses = all.iter().find(|f| f["evidence"]["addresses"].is_array()).unwrap_or_else(|| panic!("{:#}", report["findings"]));
    assert_eq!(addresses["hop"], "eth0");
    assert_eq!(addresses["evidence"]["addresses"], serde_json::json!(["10.99.0.1/24", "10.99.0.11/24"]));
    // What peers send to is what the node saw inbound.
    assert_eq!(traffic["evidence"]["inbound_destinations"]["10.99.0.1"], 4);
    Ok(())
}

#[test]
fn missing_return_route_gives_no_reply_with_the_last_hop() -> Result<()> {
    let (lab, report) = trace("no-reply")?;
    let finding = one(&report, "no-reply");
    assert_shape(finding);
    let evidence = &finding["evidence"];
    assert_eq!(evidence["requests"], 4);
    assert_eq!(evidence["peer"], lab.pod_b().ip.to_string());
    assert_eq!(evidence["last_hop"], "eth0 egress");
    assert_eq!(evidence["first_hop_missing"], "eth0 ingress");
    let veth = &lab.pod_a().host_veth;
    assert_eq!(evidence["hops_seen"], serde_json::json!([format!("{veth} ingress"), "cni0 ingress", "flannel.1 egress", "eth0 egress"]));
    assert_eq!(finding["hop"], "eth0");
    // They left node A at eth0; what is missing is the reply, not eth0 seeing them.
    let summary = finding["summary"].as_str().unwrap();
    assert!(summary.ends_with("where they left this node; no reply came back through eth0 ingress."), "{summary}");
    Ok(())
}

#[test]
fn dns_without_service_rules_is_never_dnated() -> Result<()> {
    let (_lab, report) = trace("dns")?;
    let finding = one(&report, "dns-unanswered");
    assert_shape(finding);
    assert_eq!(finding["evidence"]["peer"], scenario::DNS_SERVICE_IP.to_string());
    assert_eq!(finding["evidence"]["port"], 53);
    assert_eq!(finding["evidence"]["dnat_to"], serde_json::json!([]));
    assert!(finding["summary"].as_str().unwrap().contains("never DNATed"), "{finding:#}");
    // Without the Service rules the node has no route to the Service IP: the queries stop
    // where the node routes them, at the pod bridge.
    assert_eq!(finding["hop"], "cni0", "{finding:#}");
    assert_eq!(finding["evidence"]["last_hop"], "cni0 ingress");
    assert!(finding["advice"].as_str().unwrap().contains("kube-proxy"));

    // With the Service rules in place, the same queries are answered: no finding.
    let (_lab, report) = trace("dns-ok")?;
    assert!(findings(&report, "dns-unanswered").is_empty(), "{:#}", report["findings"]);
    Ok(())
}

#[test]
fn closed_port_is_refused() -> Result<()> {
    let (lab, report) = trace("port-refused")?;
    let refused = findings(&report, "port-refused");
    assert_eq!(refused.len(), 2, "one per protocol: {:#}", report["findings"]);
    let by_signal =
        |signal: &str| *refused.iter().find(|f| f["evidence"]["signal"] == signal).unwrap_or_else(|| panic!("no {signal}: {refused:#?}"));
    for (signal, proto, count) in [("TCP RST", "tcp", 1), ("ICMP port unreachable", "udp", 3)] {
        let finding = by_signal(signal);
        assert_shape(finding);
        assert_eq!(finding["hop"], lab.pod_a().host_veth.as_str());
        assert_eq!(finding["evidence"]["peer"], lab.pod_b().ip.to_string());
        assert_eq!(finding["evidence"]["port"], scenario::CLOSED_PORT);
        assert_eq!(finding["evidence"]["proto"], proto);
        // Counted once per refusal, not once per hop it crossed.
        assert_eq!(finding["evidence"]["count"], count, "{finding:#}");
    }
    Ok(())
}

#[test]
fn lost_events_are_reported() -> Result<()> {
    let mut spec = LabSpec { prefix: unique_prefix("lost"), ..Default::default() };
    scenario::adjust_spec("none", &mut spec);
    let lab = Lab::up(spec)?;
    let scenario = Scenario::prepare(&lab, "none")?;
    // A one-page ring cannot hold a burst of 200 KB of segments crossing eight hops.
    let podtrace = Podtrace::start(&lab.node_a().netns, &["follow", &lab.pod_a().ip.to_string(), "-o", "json", "--ring-size", "4096"])?;
    scenario.traffic(&lab)?;
    let report = podtrace.finish()?.json()?;
    let lost = report["lost_events"].as_u64().unwrap();
    assert!(lost > 0, "expected lost events with a 4 KiB ring");
    let finding = one(&report, "lost-events");
    assert_eq!(finding["severity"], "warning");
    // About the whole report, not one hop.
    assert!(finding["hop"].is_null(), "{finding:#}");
    assert_eq!(finding["evidence"]["lost_events"].as_u64().unwrap(), lost);
    Ok(())
}

/// The tracepoint programs wake the reader only once their ring is half full, and it drains
/// the ring on its timer: drops spread over a trace, more than a one-page ring holds at once
/// (4,096 bytes, 18 events), all reach the report, none lost.
#[test]
fn drops_outnumbering_a_one_page_kernel_ring_all_arrive() -> Result<()> {
    let lab = Lab::up(LabSpec { prefix: unique_prefix("kring"), ..Default::default() })?;
    let (pod_a, pod_b) = (lab.pod_a(), lab.pod_b());
    lab.iptables(&lab.node_b().netns, &["-A", "FORWARD", "-p", "icmp", "-s", &pod_a.ip.to_string(), "-j", "DROP"])?;
    let podtrace = Podtrace::start(&lab.node_b().netns, &["follow", &pod_b.ip.to_string(), "-o", "json", "--kernel-ring-size", "4096"])?;
    let pings = 30;
    podtrace_tests::traffic::ping(&pod_a.netns, pod_b.ip, pings, 56)?;
    let finished = podtrace.finish()?;
    assert!(finished.status.success(), "{}", finished.stderr);
    let report = finished.json()?;
    assert_eq!(report["lost_kernel_events"], 0, "{:#}", report["findings"]);
    let drop = one(&report, "drop");
    assert_eq!(drop["evidence"]["count"], pings, "{drop:#}");
    Ok(())
}

/// Brings up the lab for the kube-proxy pitfall `name`, injects it, and traces pod A on node A
/// while it reaches `service`: what the pod got, and the JSON report.
fn trace_service_pitfall(name: &str, tag: &str, service: std::net::Ipv4Addr) -> Result<(Lab, Scenario, ServiceAnswers, Value)> {
    let mut spec = LabSpec { prefix: unique_prefix(tag), ..Default::default() };
    scenario::adjust_spec(name, &mut spec);
    let lab = Lab::up(spec)?;
    let scenario = Scenario::prepare(&lab, name)?;
    let (node, pod) = scenario.traced(&lab);
    let podtrace = Podtrace::start(node, &["follow", &pod.to_string(), "-o", "json", "--reply-timeout-ms", "800"])?;
    let answers = scenario::reach_service(&lab, service)?;
    std::thread::sleep(std::time::Duration::from_millis(900));
    let finished = podtrace.finish()?;
    assert!(finished.status.success(), "{}", finished.stderr);
    let report = finished.json()?;
    Ok((lab, scenario, answers, report))
}

/// Warnings and errors other than `kind`: the same packets blamed on something else.
fn serious_besides<'a>(report: &'a Value, kind: &str) -> Vec<&'a Value> {
    report["findings"].as_array().unwrap().iter().filter(|f| f["severity"] != "info" && f["kind"] != kind).collect()
}

/// br_netfilter off on node A (`net.bridge.bridge-nf-call-iptables=0`, or the module not
/// loaded at all) and pod A reaching a Service whose backend is the other pod on
/// node A: the backend's replies are bridged straight to pod A, never un-DNATed, and pod A
/// drops them. Named once, per protocol, and not also as a missing listener or a reset; the
/// ICMP redirects node A sends pod A meanwhile, which its NAT drops, are said to be that.
#[test]
fn br_netfilter_off_is_named_for_a_service_backend_beside_the_client() -> Result<()> {
    let (lab, _scenario, answers, report) = trace_service_pitfall("br-netfilter", "brnf", scenario::NEIGHBOUR_SERVICE_IP)?;
    // The failure is real: no usable reply on either protocol.
    assert_eq!(answers, ServiceAnswers { tcp: false, udp_echoes: 0 });
    let backend = scenario::neighbour_pod(&lab).ip;
    let loaded = lab.br_netfilter_loaded(lab.node_a());
    let named = findings(&report, "br-netfilter-off");
    assert_eq!(named.len(), 2, "one per protocol: {:#}", report["findings"]);
    for (proto, service_port, backend_port) in
        [("tcp", scenario::SERVICE_PORT, scenario::APP_PORT), ("udp", scenario::ECHO_PORT, scenario::ECHO_PORT)]
    {
        let finding = *named.iter().find(|f| f["evidence"]["proto"] == proto).unwrap_or_else(|| panic!("no {proto} in {named:#?}"));
        assert_shape(finding);
        assert_eq!((&finding["severity"], &finding["hop"]), (&Value::from("error"), &Value::from("cni0")), "{finding:#}");
        let evidence = &finding["evidence"];
        assert_eq!(evidence["pod"], lab.pod_a().ip.to_string());
        assert_eq!(evidence["service"], format!("{}:{service_port}", scenario::NEIGHBOUR_SERVICE_IP));
        assert_eq!(evidence["backend"], format!("{backend}:{backend_port}"));
        assert!(evidence["untranslated_replies"].as_u64().unwrap() >= 1, "{finding:#}");
        assert_eq!(evidence["br_netfilter_loaded"], loaded);
        assert_eq!(evidence["sysctl_value"], if loaded { "0" } else { "absent (br_netfilter is not loaded)" });
        assert!(finding["advice"].as_str().unwrap().contains("net.bridge.bridge-nf-call-iptables=1"), "{finding:#}");
    }
    let others = serious_besides(&report, "br-netfilter-off");
    assert!(others.is_empty(), "the same packets blamed on something else: {others:#?}");
    // Node A routed pod A's first packets to the backend back out cni0 and told pod A so; its
    // NAT dropped those redirects. Information, not a firewall.
    let redirects: Vec<_> = findings(&report, "drop").into_iter().filter(|f| f["evidence"]["icmp_type"] == 5).collect();
    assert_eq!(redirects.len(), 1, "{:#}", report["findings"]);
    let redirect = redirects[0];
    assert_eq!(redirect["severity"], "info");
    assert_eq!(redirect["evidence"]["redirect_gateways"], serde_json::json!([backend.to_string()]));
    assert_eq!(redirect["evidence"]["redirect_from"], serde_json::json!([lab.node_a().gateway.to_string()]));
    assert_eq!(redirect["evidence"]["about_service_dnat"], true, "{redirect:#}");
    assert!(
        redirect["summary"].as_str().unwrap().contains("Linux's NAT drops every redirect about a connection it translated"),
        "{redirect:#}"
    );
    assert!(!redirect["advice"].as_str().unwrap().contains("firewall"), "{redirect:#}");
    // The setting is the cause: with it on, the same Service answers.
    if loaded {
        lab.set_bridge_nf_call_iptables(lab.node_a(), true)?;
        assert_eq!(
            scenario::reach_service(&lab, scenario::NEIGHBOUR_SERVICE_IP)?,
            ServiceAnswers { tcp: true, udp_echoes: scenario::ECHO_DATAGRAMS }
        );
    }
    Ok(())
}

/// Hairpin mode off on pod A's bridge port and pod A reaching a Service that selects pod A
/// itself: its bridge drops the packets, DNATed back to pod A, as they come in on that port.
/// Named once, per protocol, and not also as a drop or as "no reply from the Service's node".
/// Hairpin mode matters only where bridged frames pass iptables (br_netfilter), so this skips
/// where the module is not loaded: there the node routes such packets instead.
#[test]
fn hairpin_off_is_named_for_a_pod_reaching_itself_through_a_service() -> Result<()> {
    let (lab, _scenario, answers, report) = trace_service_pitfall("hairpin", "hpin", scenario::SELF_SERVICE_IP)?;
    if !lab.br_netfilter_loaded(lab.node_a()) {
        eprintln!("skipped: br_netfilter is not loaded, so bridged frames never pass iptables and hairpin mode is never needed");
        return Ok(());
    }
    // The failure is real: no reply on either protocol.
    assert_eq!(answers, ServiceAnswers { tcp: false, udp_echoes: 0 });
    let (pod_a, veth) = (lab.pod_a().ip, lab.pod_a().host_veth.clone());
    let named = findings(&report, "hairpin-off");
    assert_eq!(named.len(), 2, "one per protocol: {:#}", report["findings"]);
    for (proto, service_port, backend_port) in
        [("tcp", scenario::SERVICE_PORT, scenario::APP_PORT), ("udp", scenario::ECHO_PORT, scenario::ECHO_PORT)]
    {
        let finding = *named.iter().find(|f| f["evidence"]["proto"] == proto).unwrap_or_else(|| panic!("no {proto} in {named:#?}"));
        assert_shape(finding);
        assert_eq!((&finding["severity"], &finding["hop"]), (&Value::from("error"), &Value::from(veth.as_str())), "{finding:#}");
        let evidence = &finding["evidence"];
        assert_eq!(evidence["service"], format!("{}:{service_port}", scenario::SELF_SERVICE_IP));
        assert_eq!(evidence["backend"], format!("{pod_a}:{backend_port}"));
        assert!(evidence["drops"].as_u64().unwrap() >= 1, "{finding:#}");
        assert_eq!((&evidence["bridge_port"], &evidence["hairpin"]), (&Value::from(veth.as_str()), &Value::from("off")));
        assert!(finding["advice"].as_str().unwrap().contains(&format!("bridge link set dev {veth} hairpin on")), "{finding:#}");
    }
    let others = serious_besides(&report, "hairpin-off");
    assert!(others.is_empty(), "the same packets blamed on something else: {others:#?}");
    // The setting is the cause: with hairpin mode on, the pod reaches itself.
    lab.set_hairpin(lab.node_a(), lab.pod_a(), true)?;
    assert_eq!(
        scenario::reach_service(&lab, scenario::SELF_SERVICE_IP)?,
        ServiceAnswers { tcp: true, udp_echoes: scenario::ECHO_DATAGRAMS }
    );
    Ok(())
}
