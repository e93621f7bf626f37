//! Leftovers of a killed run: podtrace's cls_bpf filters (found by program name) and the
//! clsact qdiscs it created, which are recorded in a state file per network namespace.

use std::{collections::BTreeSet, fs, io::ErrorKind, path::PathBuf};

use anyhow::{Context as _, Result, anyhow};
use aya::programs::{TcAttachType, tc};
use futures::TryStreamExt as _;
use netlink_packet_route::tc::TcHandle;

use super::tc::{EGRESS_PROGRAM, INGRESS_PROGRAM};
use crate::node::{netns, with_rtnetlink};

/// What `sweep` removed.
#[derive(Debug, Default)]
pub struct Swept {
    pub filters: Vec<String>,
    pub qdiscs: Vec<String>,
}

/// Removes podtrace's cls_bpf filters from every interface in this network namespace, and the
/// clsact qdiscs an earlier, killed run created. TCX links need nothing: they die with their
/// process.
pub async fn sweep() -> Result<Swept> {
    let mut swept = Swept::default();
    for ifname in interface_names()? {
        for (name, attach_type) in [(INGRESS_PROGRAM, TcAttachType::Ingress), (EGRESS_PROGRAM, TcAttachType::Egress)] {
            match tc::qdisc_detach_program(&ifname, attach_type, name) {
                Ok(()) => swept.filters.push(format!("{ifname} {name}")),
                // No such filter, or no clsact qdisc at all.
                Err(tc::TcError::IoError(err)) if err.kind() == ErrorKind::NotFound => {}
                // The interface went away while we looked.
                Err(tc::TcError::IoError(err)) if err.raw_os_error() == Some(libc::ENODEV) => {}
                Err(tc::TcError::NetlinkError(err)) if err.raw_os_error() == Some(libc::EINVAL) => {}
                Err(tc::TcError::NetlinkError(err)) if err.raw_os_error() == Some(libc::ENOENT) => {}
                Err(err) => return Err(err).with_context(|| format!("removing {name} from {ifname}")),
            }
        }
    }
    let recorded = recorded_clsact()?;
    for ifname in &recorded {
        match remove_clsact_if_unused(ifname).await {
            Ok(true) => swept.qdiscs.push(ifname.clone()),
            Ok(false) => {}
            Err(err) => log::warn!("leaving the clsact qdisc on {ifname}: {err:#}"),
        }
    }
    forget_created_clsact(&recorded)?;
    Ok(swept)
}

fn interface_names() -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir("/sys/class/net").context("listing /sys/class/net")? {
        let entry = entry?;
        // Not every entry is an interface (the bonding driver adds `bonding_masters`).
        if entry.path().join("ifindex").exists() {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Ok(names)
}

/// Deletes the clsact qdisc on `ifname` if no filter is left on it, so a qdisc that another
/// tool started using meanwhile stays. Returns whether it was deleted.
pub(super) async fn remove_clsact_if_unused(ifname: &str) -> Result<bool> {
    let Ok(index) = nix_ifindex(ifname) else {
        // The interface is gone, and its qdisc with it.
        return Ok(false);
    };
    with_rtnetlink(async |handle| {
        async {
            let ingress: Vec<_> = handle.traffic_filter(index).get().ingress().execute().try_collect().await?;
            let egress: Vec<_> = handle.traffic_filter(index).get().egress().execute().try_collect().await?;
            if !ingress.is_empty() || !egress.is_empty() {
                return Ok(false);
            }
            let mut request = handle.qdisc().del(index);
            request.message_mut().header.parent = TcHandle::CLSACT;
            request.message_mut().header.handle = TcHandle { major: 0xffff, minor: 0 };
            request.execute().await?;
            Ok(true)
        }
        .await
        .map_err(|err: rtnetlink::Error| anyhow!(err))
        .with_context(|| format!("removing the clsact qdisc from {ifname}"))
    })
    .await
}

fn nix_ifindex(ifname: &str) -> Result<i32> {
    let name = std::ffi::CString::new(ifname)?;
    // SAFETY: a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(anyhow!("no interface {ifname}")),
        index => Ok(index as i32),
    }
}

/// The state file for this network namespace: ifindexes repeat across namespaces, and so
/// do names, so the file is keyed by the namespace's inode.
fn state_file() -> Result<PathBuf> {
    let netns = netns::own_inode()?;
    Ok(PathBuf::from(format!("/run/podtrace/clsact-{netns}")))
}

fn recorded_clsact() -> Result<BTreeSet<String>> {
    let path = state_file()?;
    match fs::read_to_string(&path) {
        Ok(text) => Ok(text.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect()),
        Err(err) if err.kind() == ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
    }
}

pub(super) fn record_created_clsact(created: &BTreeSet<String>) -> Result<()> {
    let path = state_file()?;
    let mut all = recorded_clsact()?;
    all.extend(created.iter().cloned());
    write_state(&path, &all)
}

pub(super) fn forget_created_clsact(removed: &BTreeSet<String>) -> Result<()> {
    let path = state_file()?;
    let mut all = recorded_clsact()?;
    all.retain(|ifname| !removed.contains(ifname));
    write_state(&path, &all)
}

fn write_state(path: &PathBuf, ifnames: &BTreeSet<String>) -> Result<()> {
    if ifnames.is_empty() {
        return match fs::remove_file(path) {
            Err(err) if err.kind() != ErrorKind::NotFound => Err(err).with_context(|| format!("removing {}", path.display())),
            _ => Ok(()),
        };
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text: String = ifnames.iter().map(|name| format!("{name}\n")).collect();
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
