//! Independent views of kernel state, to check podtrace against: ifindexes from sysfs, TC
//! filters and qdiscs from `tc`, TCX links from `bpftool`.

use anyhow::{Context as _, Result};

use crate::lab::run;

pub fn ifindex(ns: &str, ifname: &str) -> Result<u32> {
    let output = run(&["ip", "netns", "exec", ns, "cat", &format!("/sys/class/net/{ifname}/ifindex")])?;
    String::from_utf8_lossy(&output.stdout).trim().parse().context("parsing ifindex")
}

/// Everything podtrace could have left on `ifname`: tc filters, a clsact qdisc, TCX programs.
/// Empty means nothing is left.
pub fn leftovers(ns: &str, ifname: &str) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for parent in ["ingress", "egress"] {
        let output = run(&["ip", "netns", "exec", ns, "tc", "filter", "show", "dev", ifname, parent])?;
        for line in String::from_utf8_lossy(&output.stdout).lines().filter(|l| !l.trim().is_empty()) {
            found.push(format!("{ifname} {parent} filter: {line}"));
        }
    }
    let output = run(&["ip", "netns", "exec", ns, "tc", "qdisc", "show", "dev", ifname])?;
    for line in String::from_utf8_lossy(&output.stdout).lines().filter(|l| l.contains("clsact")) {
        found.push(format!("{ifname} qdisc: {line}"));
    }
    let output = run(&["ip", "netns", "exec", ns, "bpftool", "-j", "net", "show", "dev", ifname])?;
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).context("parsing bpftool output")?;
    for entry in json.as_array().into_iter().flatten() {
        for (kind, programs) in entry.as_object().into_iter().flatten() {
            for program in programs.as_array().into_iter().flatten() {
                let name = program.get("name").and_then(|n| n.as_str()).unwrap_or("");
                if kind.starts_with("tcx") || (kind == "tc" && name.starts_with("podtrace")) {
                    found.push(format!("{ifname} {kind}: {program}"));
                }
            }
        }
    }
    Ok(found)
}

/// podtrace's state files for `ns` (the clsact qdiscs it created, the filters runs
/// attached) and any bpffs pins of podtrace.
pub fn state_leftovers(ns: &str) -> Result<Vec<String>> {
    use std::os::unix::fs::MetadataExt as _;
    let inode = std::fs::metadata(format!("/run/netns/{ns}")).context("reading the namespace inode")?.ino();
    let mut found = Vec::new();
    for kind in ["clsact", "filters"] {
        let state = format!("/run/podtrace/{kind}-{inode}");
        if std::path::Path::new(&state).exists() {
            found.push(state);
        }
    }
    if let Ok(entries) = std::fs::read_dir("/sys/fs/bpf") {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("podtrace") {
                found.push(format!("/sys/fs/bpf/{name}"));
            }
        }
    }
    Ok(found)
}
