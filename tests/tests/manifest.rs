//! deploy/podtrace-debug.yaml, the debug pod `kubectl podtrace` creates (and operators can create
//! by hand): parsed and checked field by field, and read by `kubectl create --dry-run=client`.
//! Needs neither root nor a cluster.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::TcpListener,
    process::Command,
    sync::{Arc, Mutex},
};

use serde_json::{Value, json};

const MANIFEST: &str = include_str!("../../deploy/podtrace-debug.yaml");

fn manifest() -> Value {
    serde_norway::from_str(MANIFEST).expect("deploy/podtrace-debug.yaml is not YAML")
}

/// The fields a debug pod needs for podtrace to trace the node's network.
fn assert_debug_pod(pod: &Value) {
    assert_eq!(pod["apiVersion"], "v1");
    assert_eq!(pod["kind"], "Pod");
    let spec = &pod["spec"];
    assert_eq!(spec["nodeName"], "${PODTRACE_NODE}");
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["hostPID"], true);
    assert_eq!(spec["restartPolicy"], "Never");
    let containers = spec["containers"].as_array().unwrap();
    assert_eq!(containers.len(), 1);
    let container = &containers[0];
    assert_eq!(container["image"], "${PODTRACE_IMAGE}");
    // The image's entrypoint is podtrace itself.
    assert_eq!(container["args"], json!(["follow", "${PODTRACE_POD_IP}"]));
    assert!(container.get("command").is_none(), "{container:#}");
    // The report names the Kubernetes node, from the downward API.
    assert_eq!(container["env"], json!([{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]));

    let security = &container["securityContext"];
    assert_ne!(security["privileged"], true, "capabilities, not a privileged container");
    let capabilities: Vec<&str> = security["capabilities"]["add"].as_array().unwrap().iter().map(|cap| cap.as_str().unwrap()).collect();
    // eBPF (SYS_ADMIN for older runtimes' seccomp profiles), the pods' namespaces through
    // /proc/<pid>/ns/net (SYS_PTRACE), kernel addresses in /proc/kallsyms (SYSLOG).
    for needed in ["BPF", "NET_ADMIN", "PERFMON", "SYS_ADMIN", "SYS_PTRACE", "SYSLOG"] {
        assert!(capabilities.contains(&needed), "{needed} missing from {capabilities:?}");
    }

    let volumes = spec["volumes"].as_array().unwrap();
    let mounts = container["volumeMounts"].as_array().unwrap();
    let host_mount = |path: &str| {
        let mount = mounts.iter().find(|mount| mount["mountPath"] == path).unwrap_or_else(|| panic!("nothing mounted at {path}"));
        let volume = volumes.iter().find(|volume| volume["name"] == mount["name"]).unwrap_or_else(|| panic!("no volume for {mount}"));
        assert_eq!(volume["hostPath"]["path"], path, "{volume}");
        mount["readOnly"] == true
    };
    assert!(host_mount("/sys/kernel/btf"), "/sys/kernel/btf is mounted read-only");
    assert!(!host_mount("/sys/fs/bpf"));
    assert!(!host_mount("/sys/kernel/tracing"));
    // The record of created clsact qdiscs outlives the pod, for the next run's sweep.
    assert!(!host_mount("/run/podtrace"));
}

#[test]
fn the_debug_pod_runs_on_the_nodes_network_with_the_ebpf_capabilities_and_mounts() {
    let pod = manifest();
    assert_debug_pod(&pod);
    assert_eq!(pod["metadata"]["name"], "${PODTRACE_DEBUG_POD}");
    assert_eq!(pod["metadata"]["namespace"], "${PODTRACE_NAMESPACE}");
}

#[test]
fn every_placeholder_is_documented_at_the_top() {
    let header: String = MANIFEST.lines().take_while(|line| line.starts_with('#')).collect::<Vec<_>>().join("\n");
    let body = &MANIFEST[header.len()..];
    let placeholders: Vec<&str> = body.split("${").skip(1).map(|rest| rest.split('}').next().unwrap()).collect();
    assert_eq!(placeholders.len(), 5, "{placeholders:?}");
    for placeholder in placeholders {
        assert!(header.contains(&format!("#   ${{{placeholder}}}")), "${{{placeholder}}} is not documented");
    }
}

/// A stand-in for the API server's discovery endpoints, the only requests a client-side dry run
/// makes (to learn that `v1 Pod` is the resource `pods`): kubectl cannot run it without them.
/// Records each request line.
fn discovery_server() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let requests = Arc::new(Mutex::new(Vec::new()));
    let recorded = Arc::clone(&requests);
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(&stream);
            let mut request = String::new();
            if reader.read_line(&mut request).is_err() {
                continue;
            }
            // The headers, up to the empty line; GET requests have no body.
            let mut header = String::new();
            while reader.read_line(&mut header).is_ok_and(|read| read > 2) {
                header.clear();
            }
            let path = request.split_whitespace().nth(1).unwrap_or("").split('?').next().unwrap_or("").to_string();
            recorded.lock().unwrap().push(request.trim().to_string());
            let document = match path.as_str() {
                "/version" => json!({"major": "1", "minor": "32", "gitVersion": "v1.32.4"}),
                "/api" => json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
                "/apis" => json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
                "/api/v1" => json!({"kind": "APIResourceList", "groupVersion": "v1", "resources": [
                    {"name": "pods", "singularName": "pod", "namespaced": true, "kind": "Pod", "verbs": ["create", "delete", "get", "list"]}
                ]}),
                _ => Value::Null,
            };
            let (status, body) = if document.is_null() { ("404 Not Found", String::new()) } else { ("200 OK", document.to_string()) };
            let _ = write!(
                &stream,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    (url, requests)
}

#[test]
fn kubectl_reads_it_as_the_same_pod() {
    if Command::new("kubectl").arg("version").arg("--client").output().is_err() {
        eprintln!("kubectl is not on PATH: the dry run is skipped (the parsed manifest is checked by the other tests)");
        return;
    }
    let (server, requests) = discovery_server();
    let cache = std::env::temp_dir().join(format!("podtrace-manifest-kubectl-cache-{}", std::process::id()));
    let manifest = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/podtrace-debug.yaml");
    let output = Command::new("kubectl")
        .args(["--server", &server, "--cache-dir"])
        .arg(&cache)
        // --validate=false: validation would need the server's OpenAPI schema.
        .args(["create", "--dry-run=client", "--validate=false", "-o", "json", "-f", manifest])
        .env("KUBECONFIG", "/dev/null")
        .output()
        .expect("running kubectl");
    let _ = std::fs::remove_dir_all(&cache);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "kubectl create --dry-run=client failed: {stderr}");
    let pod: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|err| panic!("kubectl printed no JSON ({err}): {stderr}"));
    assert_debug_pod(&pod);
    // A client-side dry run: kubectl only asked what a Pod is.
    let requests = requests.lock().unwrap();
    assert!(requests.iter().any(|request| request.starts_with("GET /api/v1")), "{requests:?}");
    assert!(requests.iter().all(|request| request.starts_with("GET ")), "{requests:?}");
}
