//! `kubectl podtrace` (the kubectl-podtrace plugin) against a stand-in `kubectl`: no Kubernetes
//! API server can run here, so tests/fixtures/kubectl/kubectl-standin.sh, installed as `kubectl`
//! first on PATH, records every call and answers from recorded Pod objects, shaped like the
//! Kubernetes API's documented Pod (v1). Needs neither root nor a cluster.

use std::{
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

const STANDIN: &str = include_str!("../fixtures/kubectl/kubectl-standin.sh");
const POD_RUNNING: &str = include_str!("../fixtures/kubectl/pod-running.json");
const POD_PENDING: &str = include_str!("../fixtures/kubectl/pod-pending.json");
const POD_HOST_NETWORK: &str = include_str!("../fixtures/kubectl/pod-host-network.json");

const REPORT: &str = "pod 10.244.0.2 on node node-a (local), 8 hops\nno findings\n";

/// kubectl-podtrace, built next to podtrace by `cargo build --package tracer`.
fn plugin() -> PathBuf {
    let plugin = podtrace_tests::podtrace::binary().with_file_name("kubectl-podtrace");
    assert!(plugin.exists(), "{} is missing: build it with `cargo build --package tracer`", plugin.display());
    plugin
}

/// One test's stand-in kubectl: its directory (script, answers, recorded calls), removed on drop.
struct StandIn {
    dir: PathBuf,
}

impl StandIn {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("kubectl-podtrace-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("bin")).unwrap();
        fs::create_dir_all(dir.join("pods")).unwrap();
        let kubectl = dir.join("bin/kubectl");
        fs::write(&kubectl, STANDIN).unwrap();
        fs::set_permissions(&kubectl, fs::Permissions::from_mode(0o755)).unwrap();
        fs::write(dir.join("report.txt"), REPORT).unwrap();
        Self { dir }
    }

    /// `kubectl get pod <name>` prints `pod`.
    fn with_pod(self, name: &str, pod: &str) -> Self {
        fs::write(self.dir.join("pods").join(format!("{name}.json")), pod).unwrap();
        self
    }

    /// Successive reads of the debug pod print these, the last one repeating.
    fn with_debug_states(self, states: &[Value]) -> Self {
        for (index, state) in states.iter().enumerate() {
            fs::write(self.dir.join(format!("debug-{}.json", index + 1)), state.to_string()).unwrap();
        }
        fs::write(self.dir.join("debug-states"), states.len().to_string()).unwrap();
        self
    }

    fn command(&self, args: &[&str]) -> Command {
        let path = std::env::join_paths(
            std::iter::once(self.dir.join("bin")).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
        )
        .unwrap();
        let mut command = Command::new(plugin());
        command.args(args).env("PATH", path).env("STANDIN_DIR", &self.dir).stdin(Stdio::null());
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running kubectl-podtrace")
    }

    /// Every kubectl call the plugin made, in order, as its argument list.
    fn calls(&self) -> Vec<Vec<String>> {
        let count: usize = fs::read_to_string(self.dir.join("calls")).map(|text| text.trim().parse().unwrap()).unwrap_or(0);
        (1..=count)
            .map(|n| fs::read_to_string(self.dir.join(format!("call-{n}.args"))).unwrap().lines().map(str::to_string).collect())
            .collect()
    }

    /// The manifest the plugin sent to `kubectl create -f -`, parsed.
    fn created_manifest(&self) -> Value {
        let calls = self.calls();
        let n = calls.iter().position(|call| call[0] == "create").expect("no kubectl create call") + 1;
        assert_eq!(calls[n - 1], ["create", "-f", "-"]);
        let manifest = fs::read_to_string(self.dir.join(format!("call-{n}.stdin"))).unwrap();
        serde_norway::from_str(&manifest).unwrap_or_else(|err| panic!("the manifest is not YAML ({err}):\n{manifest}"))
    }
}

impl Drop for StandIn {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The debug pod as `kubectl get pod -o json` shows it, with its container in `state`.
fn debug_pod(phase: &str, state: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "podtrace-web-0-00000", "namespace": "shop", "uid": "2c4e6a8c-0e1b-4d3f-a5c7-e9b2d4f6a8c0"},
        "spec": {
            "containers": [{"name": "podtrace", "image": "podtrace:0.1.0", "args": ["follow", "10.244.0.2"]}],
            "hostNetwork": true,
            "hostPID": true,
            "nodeName": "node-a",
            "restartPolicy": "Never"
        },
        "status": {
            "phase": phase,
            "hostIP": "10.99.0.1",
            "podIP": "10.99.0.1",
            "containerStatuses": [{
                "name": "podtrace",
                "image": "podtrace:0.1.0",
                "imageID": "",
                "lastState": {},
                "ready": state.get("running").is_some(),
                "restartCount": 0,
                "started": state.get("running").is_some(),
                "state": state
            }]
        }
    })
}

fn waiting(reason: &str, message: &str) -> Value {
    debug_pod("Pending", json!({"waiting": {"reason": reason, "message": message}}))
}

fn running() -> Value {
    debug_pod("Running", json!({"running": {"startedAt": "2026-11-29T12:00:02Z"}}))
}

fn terminated(exit_code: i32) -> Value {
    let (phase, reason) = if exit_code == 0 { ("Succeeded", "Completed") } else { ("Failed", "Error") };
    debug_pod(
        phase,
        json!({"terminated": {"exitCode": exit_code, "reason": reason, "startedAt": "2026-11-29T12:00:02Z", "finishedAt": "2026-11-29T12:00:12Z"}}),
    )
}

/// The stand-in for a running pod web-0 whose debug pod starts, runs and exits with `exit_code`.
fn healthy(tag: &str, exit_code: i32) -> StandIn {
    StandIn::new(tag).with_pod("web-0", POD_RUNNING).with_debug_states(&[
        waiting("ContainerCreating", ""),
        running(),
        terminated(exit_code),
    ])
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The `podtrace follow` arguments of the debug pod's container.
fn container_args(manifest: &Value) -> Vec<&str> {
    manifest["spec"]["containers"][0]["args"].as_array().unwrap().iter().map(|arg| arg.as_str().unwrap()).collect()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|item| item.to_string()).collect()
}

#[test]
fn follows_the_pod_from_a_debug_pod_on_its_node() {
    let standin = healthy("happy", 0);
    let output = standin.run(&["web-0", "-n", "shop"]);
    assert!(output.status.success(), "{}", stderr(&output));
    // stdout carries the report alone, as `kubectl logs -f` streamed it.
    assert_eq!(String::from_utf8_lossy(&output.stdout), REPORT);

    let manifest = standin.created_manifest();
    let debug = manifest["metadata"]["name"].as_str().unwrap().to_string();
    assert!(debug.starts_with("podtrace-web-0-"), "{debug}");
    assert_eq!(manifest["metadata"]["namespace"], "shop");
    assert_eq!(manifest["spec"]["nodeName"], "node-a");
    assert_eq!(manifest["spec"]["hostNetwork"], true);
    assert_eq!(manifest["spec"]["hostPID"], true);
    // The pod's IP, then its other IP (dual stack).
    assert_eq!(container_args(&manifest), ["follow", "10.244.0.2", "fd00:10:244::2"]);
    // Both crates take the workspace's version.
    assert_eq!(manifest["spec"]["containers"][0]["image"], format!("podtrace:{}", env!("CARGO_PKG_VERSION")));
    assert_eq!(manifest["spec"]["containers"][0]["env"][0]["name"], "NODE_NAME");

    let read_debug = strings(&["get", "pod", &debug, "-n", "shop", "-o", "json"]);
    let expected = [
        strings(&["get", "pod", "web-0", "-n", "shop", "-o", "json"]),
        strings(&["create", "-f", "-"]),
        // Pending (ContainerCreating), then Running.
        read_debug.clone(),
        read_debug.clone(),
        strings(&["logs", "-f", &debug, "-n", "shop"]),
        // Terminated: the exit status.
        read_debug,
        strings(&["delete", "pod", &debug, "-n", "shop", "--wait=false"]),
    ];
    assert_eq!(standin.calls(), expected);
}

#[test]
fn podtraces_exit_status_is_the_plugins() {
    let standin = healthy("status", 3);
    let output = standin.run(&["web-0", "-n", "shop"]);
    assert_eq!(output.status.code(), Some(3), "{}", stderr(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout), REPORT);
    assert_eq!(standin.calls().last().unwrap()[0], "delete");
}

#[test]
fn follow_options_after_double_dash_go_to_podtrace_follow() {
    let standin = healthy("options", 0);
    let output = standin.run(&["web-0", "-n", "shop", "--", "--duration", "30", "--port", "8080", "--output", "json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(
        container_args(&standin.created_manifest()),
        ["follow", "10.244.0.2", "fd00:10:244::2", "--duration", "30", "--port", "8080", "--output", "json"]
    );
}

#[test]
fn image_and_debug_namespace_can_be_chosen() {
    let standin = healthy("image", 0);
    let output = standin.run(&["web-0", "-n", "shop", "--image", "registry.example:5000/podtrace:dev", "--debug-namespace", "tools"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let manifest = standin.created_manifest();
    assert_eq!(manifest["spec"]["containers"][0]["image"], "registry.example:5000/podtrace:dev");
    assert_eq!(manifest["metadata"]["namespace"], "tools");
    // Still on the pod's node, following the pod's IP.
    assert_eq!(manifest["spec"]["nodeName"], "node-a");
    assert_eq!(container_args(&manifest)[1], "10.244.0.2");
    let calls = standin.calls();
    let logs = calls.iter().find(|call| call[0] == "logs").unwrap();
    assert_eq!(logs[3..], ["-n", "tools"]);
    assert_eq!(calls.last().unwrap()[3..5], ["-n", "tools"]);
}

#[test]
fn keep_leaves_the_debug_pod() {
    let standin = healthy("keep", 0);
    let output = standin.run(&["web-0", "-n", "shop", "--keep"]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(String::from_utf8_lossy(&output.stdout), REPORT);
    let calls = standin.calls();
    assert!(calls.iter().any(|call| call[0] == "logs"), "{calls:?}");
    assert!(!calls.iter().any(|call| call[0] == "delete"), "{calls:?}");
    let debug = standin.created_manifest()["metadata"]["name"].as_str().unwrap().to_string();
    assert!(stderr(&output).contains(&format!("kept debug pod shop/{debug}")), "{}", stderr(&output));
}

/// An error: one line on stderr, exit status 1, and no debug pod created.
fn assert_refused(standin: &StandIn, output: &Output, expected: &str) {
    assert_eq!(output.status.code(), Some(1), "{}", stderr(output));
    assert_eq!(stderr(output), format!("kubectl-podtrace: {expected}\n"));
    assert!(output.stdout.is_empty());
    assert_eq!(standin.calls().len(), 1, "{:?}", standin.calls());
}

#[test]
fn a_missing_pod_is_an_error() {
    let standin = StandIn::new("missing");
    let output = standin.run(&["web-9", "-n", "shop"]);
    assert_refused(&standin, &output, r#"pod shop/web-9 not found: Error from server (NotFound): pods "web-9" not found"#);
}

#[test]
fn an_unreachable_api_server_is_an_error() {
    let standin = StandIn::new("unreachable");
    fs::write(standin.dir.join("unreachable"), "").unwrap();
    let output = standin.run(&["web-0", "-n", "shop"]);
    // kubectl's conclusion, without the log lines of its client libraries.
    assert_refused(
        &standin,
        &output,
        "reading pod shop/web-0: The connection to the server localhost:8080 was refused - did you specify the right host or port?",
    );
}

#[test]
fn a_pending_pod_is_an_error() {
    let standin = StandIn::new("pending").with_pod("web-1", POD_PENDING);
    let output = standin.run(&["web-1", "-n", "shop"]);
    assert_refused(&standin, &output, "pod shop/web-1 is not running: its phase is Pending");
}

#[test]
fn a_host_network_pod_is_an_error() {
    let standin = StandIn::new("host-network").with_pod("kube-proxy-7xk2p", POD_HOST_NETWORK);
    // Without -n: the namespace comes from the pod (kubectl looked in the current namespace).
    let output = standin.run(&["kube-proxy-7xk2p"]);
    assert_refused(
        &standin,
        &output,
        "pod kube-system/kube-proxy-7xk2p uses hostNetwork: it shares its node's network namespace, so it has no pod path to follow",
    );
    assert_eq!(standin.calls()[0], ["get", "pod", "kube-proxy-7xk2p", "-o", "json"]);
}

#[test]
fn a_debug_pod_that_cannot_pull_its_image_is_an_error_and_deleted() {
    let message = r#"failed to pull and unpack image "docker.io/library/podtrace:0.1.0": pull access denied"#;
    let standin = StandIn::new("pull").with_pod("web-0", POD_RUNNING).with_debug_states(&[waiting("ErrImagePull", message)]);
    let output = standin.run(&["web-0", "-n", "shop"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let debug = standin.created_manifest()["metadata"]["name"].as_str().unwrap().to_string();
    assert_eq!(
        stderr(&output).lines().last().unwrap(),
        format!("kubectl-podtrace: debug pod shop/{debug} cannot start: ErrImagePull: {message}")
    );
    let calls = standin.calls();
    assert!(!calls.iter().any(|call| call[0] == "logs"), "{calls:?}");
    assert_eq!(calls.last().unwrap()[..3], ["delete", "pod", debug.as_str()]);
}

#[test]
fn a_debug_pod_that_does_not_start_in_time_is_an_error_and_deleted() {
    let standin = StandIn::new("timeout").with_pod("web-0", POD_RUNNING).with_debug_states(&[waiting("ContainerCreating", "")]);
    let start = Instant::now();
    let output = standin.run(&["web-0", "-n", "shop", "--start-timeout", "1"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(start.elapsed() < Duration::from_secs(20), "{:?}", start.elapsed());
    let debug = standin.created_manifest()["metadata"]["name"].as_str().unwrap().to_string();
    assert!(
        stderr(&output).contains(&format!("kubectl-podtrace: debug pod shop/{debug} did not start within 1 s: ContainerCreating\n")),
        "{}",
        stderr(&output)
    );
    assert_eq!(standin.calls().last().unwrap()[..3], ["delete", "pod", debug.as_str()]);
}

/// Whether process `pid` has exited (gone, or a zombie waiting for its new parent).
fn exited(pid: &str) -> bool {
    fs::read_to_string(Path::new("/proc").join(pid).join("stat"))
        .map_or(true, |stat| stat.rsplit(')').next().unwrap().trim_start().starts_with('Z'))
}

#[test]
fn ctrl_c_deletes_the_debug_pod() {
    let standin = healthy("ctrl-c", 0);
    fs::write(standin.dir.join("logs-block"), "").unwrap();
    let stderr_file = standin.dir.join("plugin.stderr");
    // Files, not pipes: nothing the plugin leaves running can keep the test waiting.
    let mut plugin = standin
        .command(&["web-0", "-n", "shop"])
        .stdout(fs::File::create(standin.dir.join("plugin.stdout")).unwrap())
        .stderr(fs::File::create(&stderr_file).unwrap())
        .spawn()
        .unwrap();
    let logs_pid = standin.dir.join("logs.pid");
    let start = Instant::now();
    while !logs_pid.exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "kubectl logs -f never ran: {:?}", standin.calls());
        std::thread::sleep(Duration::from_millis(50));
    }
    // SAFETY: kill(2) on our own child's pid, which it still holds (it has not been waited for).
    assert_eq!(unsafe { libc::kill(plugin.id() as i32, libc::SIGINT) }, 0);
    let status = loop {
        if let Some(status) = plugin.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(30) {
            let _ = plugin.kill();
            panic!("kubectl-podtrace did not exit after SIGINT");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let plugin_stderr = fs::read_to_string(&stderr_file).unwrap();
    assert_eq!(status.code(), Some(130), "{plugin_stderr}");
    assert!(plugin_stderr.ends_with("kubectl-podtrace: interrupted\n"), "{plugin_stderr}");
    let debug = standin.created_manifest()["metadata"]["name"].as_str().unwrap().to_string();
    let calls = standin.calls();
    assert_eq!(calls[calls.len() - 2][0], "logs", "{calls:?}");
    assert_eq!(calls.last().unwrap(), &strings(&["delete", "pod", &debug, "-n", "shop", "--wait=false"]));
    // The streaming kubectl was stopped, not left behind.
    let logs_pid = fs::read_to_string(&logs_pid).unwrap().trim().to_string();
    let start = Instant::now();
    while !exited(&logs_pid) {
        assert!(start.elapsed() < Duration::from_secs(5), "kubectl logs -f (pid {logs_pid}) still runs");
        std::thread::sleep(Duration::from_millis(50));
    }
}
