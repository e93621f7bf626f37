//! The report's `node` is the Kubernetes node's name when podtrace is given one: `--node-name`,
//! or NODE_NAME (which the debug pod sets from the downward API); else the host name. Needs root.

use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, ensure};
use podtrace_tests::{
    lab::{Lab, LabSpec, unique_prefix},
    podtrace::binary,
};
use serde_json::Value;

/// `podtrace follow` in `netns` with NODE_NAME set to `node_name_env` (or unset), its report's node.
fn reported_node(netns: &str, pod_ip: &str, extra: &[&str], node_name_env: Option<&str>) -> Result<String> {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", netns]).arg(binary()).args(["follow", pod_ip, "--duration", "2", "--output", "json"]).args(extra);
    match node_name_env {
        Some(node_name) => command.env("NODE_NAME", node_name),
        None => command.env_remove("NODE_NAME"),
    };
    let output = command.stdin(Stdio::null()).output().context("running podtrace")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    ensure!(output.status.success(), "podtrace failed ({}): {stderr}", output.status);
    let report: Value = serde_json::from_slice(&output.stdout).with_context(|| format!("podtrace printed no JSON report: {stderr}"))?;
    report["node"].as_str().map(str::to_string).with_context(|| format!("no node in the report: {report}"))
}

#[test]
fn node_name_comes_from_the_flag_then_the_environment_then_the_host_name() -> Result<()> {
    let lab = Lab::up(LabSpec { prefix: unique_prefix("nodename"), ..Default::default() })?;
    let netns = lab.node_a().netns.as_str();
    let pod_ip = lab.pod_a().ip.to_string();

    // The flag wins over the environment.
    assert_eq!(reported_node(netns, &pod_ip, &["--node-name", "k8s-node-a"], Some("from-env"))?, "k8s-node-a");
    assert_eq!(reported_node(netns, &pod_ip, &[], Some("k8s-node-b"))?, "k8s-node-b");
    // `ip netns exec` keeps the UTS namespace: the host name is this machine's.
    let host_name = std::fs::read_to_string("/proc/sys/kernel/hostname")?.trim().to_string();
    assert_eq!(reported_node(netns, &pod_ip, &[], None)?, host_name);
    Ok(())
}
