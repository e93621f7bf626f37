//! The debug pod: deploy/podtrace-debug.yaml with its placeholders filled in, created, watched
//! until podtrace runs, its log streamed, and deleted.

use std::{
    hash::{BuildHasher as _, RandomState},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{kubectl, target::Target};

/// The manifest `kubectl podtrace` creates is the one shipped for creating it by hand.
const MANIFEST: &str = include_str!("../../../../deploy/podtrace-debug.yaml");

/// How often the debug pod's status is read while waiting for it.
const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// Waiting reasons after which the container will not start without someone changing something
/// (the image, the node, the manifest): waiting longer would only delay the error.
const CANNOT_START: &[&str] =
    &["ErrImagePull", "ImagePullBackOff", "ErrImageNeverPull", "InvalidImageName", "CreateContainerConfigError", "CreateContainerError"];

pub struct DebugPod {
    pub namespace: String,
    pub name: String,
}

/// Where the debug pod's container is, as its pod status says.
enum State {
    /// Not running yet; the waiting reason (ContainerCreating, …) when there is one.
    Starting(Option<String>),
    Running,
    Exited(i32),
    /// It will not start, and why.
    CannotStart(String),
}

impl DebugPod {
    /// A debug pod named after the target, unique (a random suffix) so that several traces of
    /// one pod can run at once.
    pub fn new(target: &Target, namespace: Option<&str>) -> Self {
        let stem = target.name.get(..40).unwrap_or(&target.name).trim_end_matches(['-', '.']);
        let suffix = RandomState::new().hash_one(std::process::id()) & 0xfffff;
        Self { namespace: namespace.unwrap_or(&target.namespace).to_string(), name: format!("podtrace-{stem}-{suffix:05x}") }
    }

    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The manifest for following `target`: each placeholder, a quoted YAML string, replaced by
    /// a JSON string (valid YAML, with any character escaped); `${PODTRACE_POD_IP}` by the IPs
    /// followed by `follow_options`, items of the `args` list.
    fn manifest(&self, target: &Target, image: &str, follow_options: &[String]) -> String {
        let quoted = |value: &str| serde_json::to_string(value).expect("a string serialises");
        let args = target.ips.iter().chain(follow_options).map(|arg| quoted(arg)).collect::<Vec<_>>().join(", ");
        [
            ("PODTRACE_DEBUG_POD", quoted(&self.name)),
            ("PODTRACE_NAMESPACE", quoted(&self.namespace)),
            ("PODTRACE_NODE", quoted(&target.node)),
            ("PODTRACE_IMAGE", quoted(image)),
            ("PODTRACE_POD_IP", args),
        ]
        .iter()
        .fold(MANIFEST.to_string(), |manifest, (placeholder, value)| manifest.replace(&format!("\"${{{placeholder}}}\""), value))
    }

    pub async fn create(&self, target: &Target, image: &str, follow_options: &[String]) -> Result<()> {
        let manifest = self.manifest(target, image, follow_options);
        let output =
            kubectl::run(&["create", "-f", "-"], Some(&manifest)).await.with_context(|| format!("creating debug pod {}", self.id()))?;
        if !output.status.success() {
            bail!("creating debug pod {}: {}", self.id(), output.error());
        }
        Ok(())
    }

    /// Waits until podtrace runs (or has already finished).
    pub async fn wait_until_started(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            match self.state().await? {
                State::Running | State::Exited(_) => return Ok(()),
                State::CannotStart(why) => bail!("debug pod {} cannot start: {why}", self.id()),
                State::Starting(waiting) if start.elapsed() >= timeout => bail!(
                    "debug pod {} did not start within {} s: {}",
                    self.id(),
                    timeout.as_secs(),
                    waiting.as_deref().unwrap_or("still pending")
                ),
                State::Starting(_) => tokio::time::sleep(POLL_INTERVAL).await,
            }
        }
    }

    /// podtrace's output, to stdout as it comes, until the container ends.
    pub async fn stream_logs(&self) -> Result<()> {
        kubectl::stream(&["logs", "-f", &self.name, "-n", &self.namespace])
            .await
            .with_context(|| format!("streaming the report of debug pod {}", self.id()))
    }

    /// podtrace's exit status, once the pod's status shows it.
    pub async fn wait_for_exit(&self, timeout: Duration) -> Result<i32> {
        let start = Instant::now();
        loop {
            match self.state().await? {
                State::Exited(status) => return Ok(status),
                State::CannotStart(why) => bail!("debug pod {} failed: {why}", self.id()),
                State::Running | State::Starting(_) if start.elapsed() >= timeout => {
                    bail!("debug pod {}: its report ended but podtrace has not exited after {} s", self.id(), timeout.as_secs())
                }
                State::Running | State::Starting(_) => tokio::time::sleep(POLL_INTERVAL).await,
            }
        }
    }

    /// Deletes the pod without waiting for it to be gone (podtrace detaches on SIGTERM).
    pub async fn delete(&self) -> Result<()> {
        let output = kubectl::run(&["delete", "pod", &self.name, "-n", &self.namespace, "--wait=false"], None)
            .await
            .with_context(|| format!("deleting debug pod {}", self.id()))?;
        if !output.status.success() {
            bail!("deleting debug pod {}: {}", self.id(), output.error());
        }
        eprintln!("kubectl-podtrace: deleted debug pod {}", self.id());
        Ok(())
    }

    async fn state(&self) -> Result<State> {
        let output = kubectl::run(&["get", "pod", &self.name, "-n", &self.namespace, "-o", "json"], None)
            .await
            .with_context(|| format!("reading debug pod {}", self.id()))?;
        if !output.status.success() {
            bail!("reading debug pod {}: {}", self.id(), output.error());
        }
        let pod: Value = serde_json::from_str(&output.stdout)
            .with_context(|| format!("reading debug pod {}: kubectl printed no pod JSON", self.id()))?;
        Ok(state_of(&pod))
    }
}

/// The state of the pod's (only) container, from its status.
fn state_of(pod: &Value) -> State {
    let status = &pod["status"];
    let container = &status["containerStatuses"][0]["state"];
    if let Some(exit_code) = container["terminated"]["exitCode"].as_i64() {
        return State::Exited(i32::try_from(exit_code).unwrap_or(1));
    }
    if container["running"].is_object() {
        return State::Running;
    }
    let explain = |reason: &Value, message: &Value| {
        [reason, message].into_iter().filter_map(Value::as_str).filter(|text| !text.is_empty()).collect::<Vec<_>>().join(": ")
    };
    let waiting = &container["waiting"];
    if waiting["reason"].as_str().is_some_and(|reason| CANNOT_START.contains(&reason)) {
        return State::CannotStart(explain(&waiting["reason"], &waiting["message"]));
    }
    // Failed before any container ran: the node rejected the pod (OutOfcpu, NodeAffinity, …).
    if status["phase"] == "Failed" {
        let why = explain(&status["reason"], &status["message"]);
        return State::CannotStart(if why.is_empty() { "the pod failed".to_string() } else { why });
    }
    State::Starting(waiting["reason"].as_str().map(str::to_string))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every placeholder of the shipped manifest is one the plugin fills in.
    #[test]
    fn manifest_has_no_placeholder_left() {
        let target = Target { namespace: "shop".into(), name: "web-0".into(), node: "node-a".into(), ips: vec!["10.244.0.2".into()] };
        let debug = DebugPod::new(&target, None);
        let manifest = debug.manifest(&target, "podtrace:test", &["--peer".into(), "a\"b".into()]);
        let body = manifest.lines().filter(|line| !line.trim_start().starts_with('#')).collect::<Vec<_>>().join("\n");
        assert!(MANIFEST.contains("\"${PODTRACE_POD_IP}\""), "{MANIFEST}");
        assert!(!body.contains("${PODTRACE_"), "{body}");
        assert!(body.contains(r#"args: ["follow", "10.244.0.2", "--peer", "a\"b"]"#), "{body}");
    }
}
