//! The pod to follow: where it runs and its IPs, read with `kubectl get pod -o json`.

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::kubectl;

/// A running pod with its own network namespace: what `podtrace follow` needs.
pub struct Target {
    pub namespace: String,
    pub name: String,
    pub node: String,
    /// status.podIP first, then the pod's other IPs (dual stack).
    pub ips: Vec<String>,
}

/// Reads pod `name` (in `namespace`, or the current context's) and checks that it can be followed.
pub async fn inspect(name: &str, namespace: Option<&str>) -> Result<Target> {
    let shown = match namespace {
        Some(namespace) => format!("{namespace}/{name}"),
        None => format!("{name} (in the current namespace)"),
    };
    let mut args = vec!["get", "pod", name];
    if let Some(namespace) = namespace {
        args.extend(["-n", namespace]);
    }
    args.extend(["-o", "json"]);
    let output = kubectl::run(&args, None).await.with_context(|| format!("reading pod {shown}"))?;
    if !output.status.success() {
        // kubectl's message for a missing pod: `Error from server (NotFound): pods "x" not found`.
        if output.stderr.contains("(NotFound)") {
            bail!("pod {shown} not found: {}", output.error());
        }
        bail!("reading pod {shown}: {}", output.error());
    }
    let pod: Value = serde_json::from_str(&output.stdout).with_context(|| format!("reading pod {shown}: kubectl printed no pod JSON"))?;
    from_pod(&pod)
}

/// The target described by a Pod object, or why it cannot be followed.
fn from_pod(pod: &Value) -> Result<Target> {
    let text = |value: &Value| value.as_str().filter(|text| !text.is_empty()).map(str::to_string);
    let namespace = text(&pod["metadata"]["namespace"]).unwrap_or_else(|| "default".to_string());
    let name = text(&pod["metadata"]["name"]).context("the pod JSON has no metadata.name")?;
    let id = format!("{namespace}/{name}");
    if pod["spec"]["hostNetwork"] == true {
        bail!("pod {id} uses hostNetwork: it shares its node's network namespace, so it has no pod path to follow");
    }
    let phase = text(&pod["status"]["phase"]).unwrap_or_else(|| "unknown".to_string());
    if phase != "Running" {
        let why = [&pod["status"]["reason"], &pod["status"]["message"]].into_iter().filter_map(text).collect::<Vec<_>>().join(": ");
        let why = if why.is_empty() { String::new() } else { format!(" ({why})") };
        bail!("pod {id} is not running: its phase is {phase}{why}");
    }
    let node = text(&pod["spec"]["nodeName"]).with_context(|| format!("pod {id} has no node (spec.nodeName)"))?;
    let primary = text(&pod["status"]["podIP"]).with_context(|| format!("pod {id} has no IP yet (status.podIP)"))?;
    let mut ips = vec![primary];
    for ip in pod["status"]["podIPs"].as_array().into_iter().flatten().filter_map(|entry| text(&entry["ip"])) {
        if !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    Ok(Target { namespace, name, node, ips })
}
