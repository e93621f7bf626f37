//! xtask must build on a fresh machine: its dependency tree may hold no crate whose build needs
//! the eBPF toolchain that `cargo xtask setup` installs. `cargo xtask test` checks it every run.

use std::{collections::BTreeSet, process::Command};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::workspace;

/// Crates that run aya-build (or are the kernel programs) and so need nightly rust-src and
/// bpf-linker, plus aya itself, which only `tracer` needs.
pub const FORBIDDEN: &[&str] = &["aya-build", "tracer", "tracer-ebpf", "aya", "aya-ebpf"];

/// Fails, naming the path, if xtask reaches a forbidden crate through normal or build
/// dependencies (dev-dependencies are not built by `cargo xtask`).
pub fn check_tooling_only() -> Result<()> {
    let output = Command::new("cargo")
        .args(["metadata", "--format-version", "1", "--manifest-path"])
        .arg(workspace().join("Cargo.toml"))
        .output()
        .context("running cargo metadata")?;
    if !output.status.success() {
        bail!("cargo metadata failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    let metadata: Value = serde_json::from_slice(&output.stdout).context("parsing cargo metadata")?;
    match forbidden_path(&metadata)? {
        Some(path) => bail!(
            "xtask depends on {} (through {}): its build needs the eBPF toolchain that `cargo xtask setup` installs, \
             so `cargo xtask` would fail on a fresh machine; run it as a cargo subprocess instead",
            path.last().map(String::as_str).unwrap_or_default(),
            path.join(" -> ")
        ),
        None => Ok(()),
    }
}

/// The first dependency path from xtask to a forbidden crate, by crate name.
fn forbidden_path(metadata: &Value) -> Result<Option<Vec<String>>> {
    let nodes = metadata["resolve"]["nodes"].as_array().context("cargo metadata has no resolve graph")?;
    let packages = metadata["packages"].as_array().context("cargo metadata has no packages")?;
    let name_of = |id: &str| {
        packages.iter().find(|package| package["id"] == id).and_then(|package| package["name"].as_str()).unwrap_or(id).to_string()
    };
    let root = packages
        .iter()
        .find(|package| package["name"] == "xtask")
        .and_then(|package| package["id"].as_str())
        .context("xtask is not in the workspace")?;
    let mut seen = BTreeSet::new();
    let mut stack = vec![vec![root.to_string()]];
    while let Some(path) = stack.pop() {
        let id = path.last().expect("paths are never empty").clone();
        if !seen.insert(id.clone()) {
            continue;
        }
        if path.len() > 1 && FORBIDDEN.contains(&name_of(&id).as_str()) {
            return Ok(Some(path.iter().map(|id| name_of(id)).collect()));
        }
        let Some(node) = nodes.iter().find(|node| node["id"] == id.as_str()) else { continue };
        for dep in node["deps"].as_array().into_iter().flatten() {
            let built_by_xtask =
                dep["dep_kinds"].as_array().into_iter().flatten().any(|kind| kind["kind"].is_null() || kind["kind"] == "build");
            if let (true, Some(dep_id)) = (built_by_xtask, dep["pkg"].as_str()) {
                let mut next = path.clone();
                next.push(dep_id.to_string());
                stack.push(next);
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn graph(xtask_deps: &[(&str, &str)]) -> Value {
        let package = |name: &str| json!({"id": format!("{name}-id"), "name": name});
        let dep = |name: &str, kind: &str| {
            let kind = if kind == "normal" { Value::Null } else { json!(kind) };
            json!({"pkg": format!("{name}-id"), "dep_kinds": [{"kind": kind}]})
        };
        json!({
            "packages": [package("xtask"), package("podtrace-tests"), package("tracer"), package("aya-build"), package("anyhow")],
            "resolve": {"nodes": [
                {"id": "xtask-id", "deps": xtask_deps.iter().map(|(name, kind)| dep(name, kind)).collect::<Vec<_>>()},
                {"id": "podtrace-tests-id", "deps": [dep("anyhow", "normal")]},
                {"id": "tracer-id", "deps": [dep("aya-build", "build")]},
                {"id": "aya-build-id", "deps": []},
                {"id": "anyhow-id", "deps": []},
            ]}
        })
    }

    #[test]
    fn tooling_only_tree_passes() {
        let metadata = graph(&[("podtrace-tests", "normal"), ("anyhow", "normal"), ("tracer", "dev")]);
        assert_eq!(forbidden_path(&metadata).unwrap(), None);
    }

    #[test]
    fn a_path_to_tracer_is_named() {
        let metadata = graph(&[("anyhow", "normal"), ("tracer", "normal")]);
        assert_eq!(forbidden_path(&metadata).unwrap(), Some(vec!["xtask".into(), "tracer".into()]));
    }

    #[test]
    fn a_build_dependency_counts() {
        let metadata = graph(&[("aya-build", "build")]);
        assert_eq!(forbidden_path(&metadata).unwrap(), Some(vec!["xtask".into(), "aya-build".into()]));
    }

    /// The real workspace, as `cargo xtask test` checks it.
    #[test]
    fn this_workspace_is_tooling_only() {
        check_tooling_only().unwrap();
    }
}
