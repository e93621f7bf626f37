//! Several podtraces on one node, and traces that end the way they do in the field (a dropped
//! session): no run disturbs another, and nothing is left behind. Needs root.

use std::{net::Ipv4Addr, time::Duration};

use anyhow::Result;
use podtrace_tests::{
    capture::{Capture, Dir, ip_filter, vxlan_inner_filter},
    inspect,
    lab::{Lab, LabSpec, Pod, unique_prefix},
    podtrace::Podtrace,
    report::hop,
    traffic,
};
use serde_json::Value;

/// tcpdump on the hops only one pod's traffic crosses alone (its veth) and on the underlay,
/// filtered to that pod.
struct PodCaptures(Vec<(String, &'static str, Capture)>);

impl PodCaptures {
    fn start(ns: &str, pod: &Pod) -> Result<Self> {
        let mut captures = Vec::new();
        for (ifname, filter) in [(pod.host_veth.as_str(), ip_filter(pod.ip)), ("eth0", vxlan_inner_filter(pod.ip))] {
            for (dir, direction) in [(Dir::In, "ingress"), (Dir::Out, "egress")] {
                captures.push((ifname.to_string(), direction, Capture::start(ns, ifname, dir, &filter)?));
            }
        }
        Ok(Self(captures))
    }

    fn assert_equal_to(self, report: &Value, pod: Ipv4Addr) -> Result<()> {
        for (ifname, direction, capture) in self.0 {
            let tcpdump = capture.stop()?;
            assert!(tcpdump > 0, "{pod}: no traffic on {ifname} {direction}");
            assert_eq!(hop(report, &ifname, direction)["packets"], tcpdump, "{pod}: {ifname} {direction}");
        }
        Ok(())
    }
}

fn nothing_left(lab: &Lab) -> Vec<String> {
    let ns = lab.node_a().netns.as_str();
    let mut left = Vec::new();
    let veths = lab.node_a().pods.iter().map(|pod| pod.host_veth.as_str());
    for ifname in veths.chain(["cni0", "flannel.1", "eth0"]) {
        left.extend(inspect::leftovers(ns, ifname).unwrap());
    }
    left.extend(inspect::state_leftovers(ns).unwrap());
    left
}

/// Two follows of different pods on one node, the second started while the first runs and
/// ended before it: each sees exactly what tcpdump sees, and the first keeps seeing its pod's
/// packets after the second has swept, attached and detached around it.
fn two_runs_on_one_node(attach: &str) -> Result<()> {
    let lab = Lab::up(LabSpec { prefix: unique_prefix(&format!("two-{attach}")), pods_per_node: 2, ..Default::default() })?;
    let ns = lab.node_a().netns.clone();
    let (first_pod, second_pod) = (&lab.node_a().pods[0], &lab.node_a().pods[1]);
    let peer = lab.pod_b().ip;
    let first_captures = PodCaptures::start(&ns, first_pod)?;
    let first = Podtrace::start(&ns, &["follow", &first_pod.ip.to_string(), "--attach", attach, "-o", "json"])?;
    let second_captures = PodCaptures::start(&ns, second_pod)?;
    let second = Podtrace::start(&ns, &["follow", &second_pod.ip.to_string(), "--attach", attach, "-o", "json"])?;
    assert_eq!(traffic::ping_received(&traffic::ping(&first_pod.netns, peer, 3, 56)?), 3);
    assert_eq!(traffic::ping_received(&traffic::ping(&second_pod.netns, peer, 4, 56)?), 4);
    std::thread::sleep(Duration::from_millis(300));
    let second = second.finish()?;
    assert!(second.status.success(), "the second run failed: {}", second.stderr);
    // The first run's programs are still attached after the second one detached.
    assert_eq!(traffic::ping_received(&traffic::ping(&first_pod.netns, peer, 2, 56)?), 2);
    std::thread::sleep(Duration::from_millis(300));
    let first = first.finish()?;
    assert!(first.status.success(), "the first run failed: {}", first.stderr);

    let first_report = first.json()?;
    let second_report = second.json()?;
    assert_eq!(hop(&first_report, &first_pod.host_veth, "ingress")["packets"], 5);
    assert_eq!(hop(&second_report, &second_pod.host_veth, "ingress")["packets"], 4);
    first_captures.assert_equal_to(&first_report, first_pod.ip)?;
    second_captures.assert_equal_to(&second_report, second_pod.ip)?;
    assert_eq!(nothing_left(&lab), Vec::<String>::new());
    Ok(())
}

#[test]
fn two_clsact_runs_on_one_node_leave_each_other_intact() -> Result<()> {
    two_runs_on_one_node("clsact")
}

/// TCX from kernel 6.6 on; clsact before (auto picks what the kernel has).
#[test]
fn two_auto_runs_on_one_node_leave_each_other_intact() -> Result<()> {
    two_runs_on_one_node("auto")
}

/// A dropped SSH or `kubectl exec` session sends SIGHUP: the run ends like SIGTERM, with its
/// report, and leaves nothing behind; a killed run's filters are swept by the next run while
/// a live run's stay.
#[test]
fn sighup_ends_a_run_cleanly_and_a_killed_run_is_swept_around_a_live_one() -> Result<()> {
    let lab = Lab::up(LabSpec { prefix: unique_prefix("hup"), pods_per_node: 2, ..Default::default() })?;
    let ns = lab.node_a().netns.clone();
    let (first_pod, second_pod) = (&lab.node_a().pods[0], &lab.node_a().pods[1]);
    for attach in ["auto", "clsact"] {
        let run = Podtrace::start(&ns, &["follow", &first_pod.ip.to_string(), "--attach", attach])?;
        run.signal(libc::SIGHUP);
        let finished = run.wait()?;
        assert!(finished.status.success(), "{attach}: {}", finished.stderr);
        assert!(finished.stdout.contains("podtrace report"), "{attach}: {}", finished.stdout);
        assert_eq!(nothing_left(&lab), Vec::<String>::new(), "{attach}");
    }

    let live = Podtrace::start(&ns, &["follow", &first_pod.ip.to_string(), "--attach", "clsact", "-o", "json"])?;
    let killed = Podtrace::start(&ns, &["follow", &second_pod.ip.to_string(), "--attach", "clsact"])?;
    killed.signal(libc::SIGKILL);
    assert!(!killed.wait()?.status.success());
    let killed_filters = inspect::leftovers(&ns, &second_pod.host_veth)?;
    assert!(killed_filters.iter().any(|line| line.contains("podtrace_ingress")), "{killed_filters:#?}");
    // A third run sweeps the killed run's filters and leaves the live one's.
    let third = Podtrace::start(&ns, &["follow", &second_pod.ip.to_string(), "--attach", "clsact", "--duration", "0.5"])?;
    let third = third.wait()?;
    assert!(third.status.success(), "{}", third.stderr);
    assert!(third.stderr.contains("removed leftovers of an earlier run"), "{}", third.stderr);
    assert_eq!(inspect::leftovers(&ns, &second_pod.host_veth)?, Vec::<String>::new());
    assert_eq!(traffic::ping_received(&traffic::ping(&first_pod.netns, lab.pod_b().ip, 2, 56)?), 2);
    std::thread::sleep(Duration::from_millis(300));
    let live = live.finish()?;
    assert!(live.status.success(), "{}", live.stderr);
    assert_eq!(hop(&live.json()?, &first_pod.host_veth, "ingress")["packets"], 2);
    assert_eq!(nothing_left(&lab), Vec::<String>::new());
    Ok(())
}
