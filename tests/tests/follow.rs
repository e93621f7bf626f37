//! `podtrace follow` on the built-in lab, run as a user would, checked against the lab's real
//! interfaces and against tcpdump on the same interfaces. Needs root.

use std::time::Duration;

use anyhow::Result;
use podtrace_tests::{
    capture::Captures,
    fixture, inspect,
    lab::{Lab, LabSpec, unique_prefix},
    podtrace::{self, Launcher, Podtrace, run_podtrace},
    report::hop,
    traffic,
};
use serde_json::Value;

fn lab(tag: &str) -> Lab {
    Lab::up(LabSpec { prefix: unique_prefix(tag), ..Default::default() }).expect("bringing up the lab")
}

fn hops(report: &Value) -> Vec<(String, String, String, u64)> {
    report["hops"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["ifname"].as_str().unwrap().to_string(),
                h["kind"].as_str().unwrap().to_string(),
                h["direction"].as_str().unwrap().to_string(),
                h["ifindex"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn discovered_path_is_the_labs_real_interfaces() -> Result<()> {
    let lab = lab("path");
    let node = lab.node_a();
    let ns = node.netns.as_str();
    let idx = |ifname: &str| inspect::ifindex(ns, ifname).unwrap() as u64;
    let veth = lab.pod_a().host_veth.clone();

    let local = run_podtrace(ns, &["follow", &lab.pod_a().ip.to_string(), "--duration", "0.5", "-o", "json"])?;
    assert!(local.status.success(), "{}", local.stderr);
    let report = local.json()?;
    assert_eq!(report["locality"], "local");
    let expected_local = [
        (veth.as_str(), "pod-veth", "ingress"),
        ("cni0", "bridge", "ingress"),
        ("flannel.1", "vxlan", "egress"),
        ("eth0", "nic", "egress"),
        ("eth0", "nic", "ingress"),
        ("flannel.1", "vxlan", "ingress"),
        ("cni0", "bridge", "egress"),
        (veth.as_str(), "pod-veth", "egress"),
    ];
    let expected: Vec<_> = expected_local.iter().map(|(n, k, d)| (n.to_string(), k.to_string(), d.to_string(), idx(n))).collect();
    assert_eq!(hops(&report), expected);
    assert_eq!(hop(&report, "flannel.1", "egress")["mtu"], 1450);
    assert_eq!(hop(&report, "eth0", "egress")["mtu"], 1500);
    // The path is printed before tracing starts.
    assert!(local.stderr.contains(&format!("{veth:<16} pod-veth")), "{}", local.stderr);

    let remote = run_podtrace(ns, &["follow", &lab.pod_b().ip.to_string(), "--duration", "0.5", "-o", "json"])?;
    assert!(remote.status.success(), "{}", remote.stderr);
    let report = remote.json()?;
    assert_eq!(report["locality"], "remote");
    let expected_remote =
        [("eth0", "nic", "ingress"), ("flannel.1", "vxlan", "ingress"), ("flannel.1", "vxlan", "egress"), ("eth0", "nic", "egress")];
    let expected: Vec<_> = expected_remote.iter().map(|(n, k, d)| (n.to_string(), k.to_string(), d.to_string(), idx(n))).collect();
    assert_eq!(hops(&report), expected);

    // --exclude-iface and --iface adjust the path.
    let adjusted = run_podtrace(
        ns,
        &["follow", &lab.pod_a().ip.to_string(), "--duration", "0.5", "-o", "json", "--exclude-iface", "cni0", "--iface", "lo"],
    )?;
    let names: Vec<String> = hops(&adjusted.json()?).into_iter().map(|h| h.0).collect();
    assert!(!names.contains(&"cni0".to_string()) && names.contains(&"lo".to_string()), "{names:?}");
    Ok(())
}

/// Traces pod A while `traffic` runs, with tcpdump on every hop, and checks the counts.
fn counts_match_tcpdump(tag: &str, traffic: impl FnOnce(&Lab)) -> Result<Value> {
    counts_match_tcpdump_with(Launcher::Binary, tag, traffic)
}

fn counts_match_tcpdump_with(launcher: Launcher, tag: &str, traffic: impl FnOnce(&Lab)) -> Result<Value> {
    let lab = lab(tag);
    let pod_ip = lab.pod_a().ip;
    let captures = Captures::start(&lab, pod_ip)?;
    let podtrace = Podtrace::launch(launcher, &lab.node_a().netns, &["follow", &pod_ip.to_string(), "-o", "json"])?;
    traffic(&lab);
    // Let the last packets cross every hop before stopping.
    std::thread::sleep(Duration::from_millis(300));
    let finished = podtrace.finish()?;
    assert!(finished.status.success(), "{}", finished.stderr);
    let report = finished.json()?;
    captures.assert_equal_to(&report)?;
    assert_eq!(report["lost_events"], 0);
    assert_eq!(report["unparsed"], 0);
    Ok(report)
}

#[test]
fn ping_counts_match_tcpdump_and_every_packet_is_linked_across_hops() -> Result<()> {
    let report = counts_match_tcpdump("ping", |lab| {
        let output = traffic::ping(&lab.pod_a().netns, lab.pod_b().ip, 5, 56).unwrap();
        assert_eq!(traffic::ping_received(&output), 5);
    })?;
    let veth = report["hops"][0]["ifname"].as_str().unwrap().to_string();
    for (ifname, direction) in [
        (veth.as_str(), "ingress"),
        ("cni0", "ingress"),
        ("flannel.1", "egress"),
        ("eth0", "egress"),
        ("eth0", "ingress"),
        ("flannel.1", "ingress"),
        ("cni0", "egress"),
        (veth.as_str(), "egress"),
    ] {
        let h = hop(&report, ifname, direction);
        assert_eq!(h["packets"], 5, "{ifname} {direction}");
        // The first hop of each direction has no previous hop; every other hop links each
        // packet to its sighting one hop earlier, through VXLAN encapsulation.
        let first = direction == "ingress" && (ifname == veth || ifname == "eth0");
        assert_eq!(h["linked"], if first { 0 } else { 5 }, "{ifname} {direction}");
        assert_eq!(h["latency_us"]["p50"].is_null(), first, "{ifname} {direction}");
    }
    assert_eq!(hop(&report, "eth0", "egress")["max_len"], 98 + 50);
    assert_eq!(hop(&report, &veth, "egress")["last_seen"], 5);
    assert_eq!(hop(&report, "eth0", "egress")["last_seen"], 5);
    Ok(())
}

/// The OCI image (`cargo xtask image`) run by podman inside node A's namespace with a debug
/// pod's mounts: the same counts as tcpdump, as for the binary. Skipped only where podman is
/// not installed (the VM suite).
#[test]
fn container_image_counts_match_tcpdump() -> Result<()> {
    let Some(image) = podtrace::image()? else {
        eprintln!("skipped: podman is not installed");
        return Ok(());
    };
    let report = counts_match_tcpdump_with(Launcher::Image(&image), "image", |lab| {
        let output = traffic::ping(&lab.pod_a().netns, lab.pod_b().ip, 4, 56).unwrap();
        assert_eq!(traffic::ping_received(&output), 4);
        let _server = traffic::udp_echo(&lab.pod_b().netns, 7000).unwrap();
        assert_eq!(traffic::udp_send(&lab.pod_a().netns, lab.pod_b().ip, 7000, 3, 200).unwrap(), 3);
    })?;
    // 4 echo requests and 3 datagrams out of the pod, 4 replies and 3 echoes back.
    assert_eq!(hop(&report, "eth0", "egress")["packets"], 7);
    assert_eq!(hop(&report, "eth0", "ingress")["packets"], 7);
    Ok(())
}

#[test]
fn tcp_counts_match_tcpdump() -> Result<()> {
    let report = counts_match_tcpdump("tcp", |lab| {
        let _server = traffic::tcp_sink(&lab.pod_b().netns, 5201).unwrap();
        let output = traffic::tcp_send(&lab.pod_a().netns, lab.pod_b().ip, 5201, 200_000, 16_384, Duration::from_secs(10)).unwrap();
        assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "200000");
    })?;
    // Full-size segments: 1450-byte IP packets inside 1500-byte VXLAN packets.
    assert_eq!(hop(&report, "eth0", "egress")["max_len"], 1514);
    assert_eq!(hop(&report, "cni0", "ingress")["max_len"], 1464);
    Ok(())
}

#[test]
fn udp_counts_match_tcpdump() -> Result<()> {
    counts_match_tcpdump("udp", |lab| {
        let _server = traffic::udp_echo(&lab.pod_b().netns, 7000).unwrap();
        assert_eq!(traffic::udp_send(&lab.pod_a().netns, lab.pod_b().ip, 7000, 10, 300).unwrap(), 10);
    })?;
    Ok(())
}

fn assert_nothing_left(lab: &Lab) {
    let ns = lab.node_a().netns.as_str();
    let mut left = Vec::new();
    for ifname in [lab.pod_a().host_veth.as_str(), "cni0", "flannel.1", "eth0"] {
        left.extend(inspect::leftovers(ns, ifname).unwrap());
    }
    left.extend(inspect::state_leftovers(ns).unwrap());
    assert!(left.is_empty(), "left behind: {left:#?}");
}

#[test]
fn nothing_stays_attached_after_exit_sigterm_and_sigkill() -> Result<()> {
    let lab = lab("exit");
    let ns = lab.node_a().netns.clone();
    let ip = lab.pod_a().ip.to_string();
    // auto is TCX from kernel 6.6 on and clsact before; clsact is forced on every kernel.
    for attach in ["auto", "clsact"] {
        // Normal exit at the end of --duration.
        let done = run_podtrace(&ns, &["follow", &ip, "--duration", "0.5", "--attach", attach])?;
        assert!(done.status.success(), "{}", done.stderr);
        assert_nothing_left(&lab);

        // SIGTERM still detaches and still prints the report.
        let podtrace = Podtrace::start(&ns, &["follow", &ip, "--attach", attach])?;
        podtrace.signal(libc::SIGTERM);
        let finished = podtrace.wait()?;
        assert!(finished.status.success(), "{}", finished.stderr);
        assert!(finished.stdout.contains("podtrace report"), "{}", finished.stdout);
        assert_nothing_left(&lab);

        // SIGKILL: TCX links die with the process; clsact filters stay until swept.
        let podtrace = Podtrace::start(&ns, &["follow", &ip, "--attach", attach])?;
        podtrace.signal(libc::SIGKILL);
        let killed = podtrace.wait()?;
        assert!(!killed.status.success());
        if killed.stderr.contains("programs, tcx)") {
            assert_nothing_left(&lab);
        } else {
            let left = inspect::leftovers(&ns, "eth0")?;
            assert!(left.iter().any(|l| l.contains("podtrace_ingress")), "{left:#?}");
            let cleanup = run_podtrace(&ns, &["cleanup"])?;
            assert!(cleanup.status.success(), "{}", cleanup.stderr);
            assert!(cleanup.stdout.contains("removed 8 filter(s) and 4 clsact qdisc(s)"), "{}", cleanup.stdout);
            assert_nothing_left(&lab);

            // The next run sweeps a killed run's leftovers by itself, too.
            let podtrace = Podtrace::start(&ns, &["follow", &ip, "--attach", attach])?;
            podtrace.signal(libc::SIGKILL);
            podtrace.wait()?;
            let next = run_podtrace(&ns, &["follow", &ip, "--duration", "0.5", "--attach", attach])?;
            assert!(next.stderr.contains("removed leftovers of an earlier run"), "{}", next.stderr);
            assert_nothing_left(&lab);
        }
    }
    Ok(())
}

/// Other TC programs on the same hook (a counter, and one that drops a UDP port) behave
/// exactly as without podtrace, in both attach modes.
#[test]
fn existing_tc_programs_behave_as_before() -> Result<()> {
    let lab = lab("coex");
    let ns = lab.node_a().netns.clone();
    let counter = fixture::Counter::load(&format!("{}-counter", lab.prefix))?;
    let dropper = fixture::PortDropper::load(&format!("{}-drop", lab.prefix), 7777)?;
    // On cni0 ingress, where the pod's packets enter the node's stack unencapsulated.
    fixture::attach(&ns, "cni0", "ingress", 10, &counter.pin)?;
    fixture::attach(&ns, "cni0", "ingress", 20, &dropper.pin)?;
    let _echo = traffic::udp_echo(&lab.pod_b().netns, 7000)?;
    let _blocked = traffic::udp_echo(&lab.pod_b().netns, 7777)?;
    let exercise = || -> (u64, u32, u32) {
        let before = counter.count().unwrap();
        let ok = traffic::udp_send(&lab.pod_a().netns, lab.pod_b().ip, 7000, 5, 100).unwrap();
        let blocked = traffic::udp_send(&lab.pod_a().netns, lab.pod_b().ip, 7777, 3, 100).unwrap();
        (counter.count().unwrap() - before, ok, blocked)
    };
    let without = exercise();
    assert_eq!(without, (8, 5, 0), "the fixtures themselves: 8 packets counted, port 7777 dropped");
    for attach in ["auto", "clsact"] {
        let podtrace = Podtrace::start(&ns, &["follow", &lab.pod_a().ip.to_string(), "-o", "json", "--attach", attach])?;
        let with = exercise();
        let report = podtrace.finish()?.json()?;
        assert_eq!(with, without, "{attach}");
        // podtrace runs first and sees the packets the dropper then drops; they never reach
        // flannel.1.
        assert_eq!(hop(&report, "cni0", "ingress")["packets"], 8, "{attach}");
        assert_eq!(hop(&report, "flannel.1", "egress")["packets"], 5, "{attach}");
        let filters = lab.run_in(&ns, &["tc", "filter", "show", "dev", "cni0", "ingress"])?;
        let filters = String::from_utf8_lossy(&filters.stdout).into_owned();
        assert!(filters.contains("pref 10") && filters.contains("pref 20") && !filters.contains("podtrace"), "{filters}");
    }
    assert_eq!(exercise(), without);
    Ok(())
}

#[test]
fn bad_inputs_fail_with_one_clear_line() -> Result<()> {
    let lab = lab("bad");
    let ns = lab.node_a().netns.clone();
    let pod = lab.pod_a().ip.to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["follow".into(), "10.244.0.300".into()], "podtrace: invalid pod IP \"10.244.0.300\": invalid IP address syntax"),
        (vec!["follow".into(), "10.99.0.2".into()], "podtrace: no path to 10.99.0.2 on this node: its route leaves through eth0"),
        (vec!["follow".into(), "10.99.0.1".into()], "podtrace: no path to 10.99.0.1 on this node: it is an address of this node"),
        (vec!["follow".into(), "192.0.2.7".into()], "podtrace: no path to 192.0.2.7 on this node: no route"),
        (vec!["follow".into(), pod.clone(), "--btf".into(), "/nonexistent/vmlinux".into()], "podtrace: no BTF at /nonexistent/vmlinux"),
        (
            vec!["follow".into(), pod.clone(), "--iface".into(), "nosuch0".into()],
            "podtrace: --iface nosuch0: no such interface on this node",
        ),
    ];
    for (args, expected) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run_podtrace(&ns, &args)?;
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", out.stderr);
        assert_eq!(out.stderr.lines().count(), 1, "{args:?}: one line, got:\n{}", out.stderr);
        assert!(out.stderr.starts_with(expected), "{args:?}: {}", out.stderr);
        assert_nothing_left(&lab);
    }

    // Without privileges: drop every capability and become nobody.
    let out = std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns,
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
            "--bounding-set=-all",
        ])
        .arg(podtrace_tests::podtrace::binary())
        .args(["follow", &pod])
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("podtrace: missing privileges: run as root or with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON"), "{stderr}");
    assert_nothing_left(&lab);
    Ok(())
}

#[test]
fn an_interface_that_vanishes_gives_a_warning_and_tracing_goes_on() -> Result<()> {
    let lab = Lab::up(LabSpec { prefix: unique_prefix("gone"), pods_per_node: 2, ..Default::default() })?;
    let ns = lab.node_a().netns.clone();
    let second = lab.node_a().pods[1].clone();
    // Follow both local pods, so both veths are on the path; then delete the second's.
    let podtrace = Podtrace::start(&ns, &["follow", &lab.pod_a().ip.to_string(), &second.ip.to_string(), "-o", "json"])?;
    lab.run_in(&ns, &["ip", "link", "del", &second.host_veth])?;
    std::thread::sleep(Duration::from_millis(1200));
    let output = traffic::ping(&lab.pod_a().netns, lab.pod_b().ip, 3, 56)?;
    assert_eq!(traffic::ping_received(&output), 3);
    let finished = podtrace.finish()?;
    assert!(finished.status.success(), "{}", finished.stderr);
    assert!(finished.stderr.contains(&format!("podtrace: warning: interface {} (ifindex", second.host_veth)), "{}", finished.stderr);
    let report = finished.json()?;
    assert_eq!(hop(&report, &second.host_veth, "ingress")["vanished"], true);
    assert_eq!(hop(&report, &lab.pod_a().host_veth, "ingress")["packets"], 3);
    assert_nothing_left(&lab);
    Ok(())
}
