//! Which network namespaces belong to this node: its own and those of its local pods.
//!
//! Tracepoints see the whole kernel; in a lab, and on a node with many pods, other
//! namespaces produce events too. Kernel events count only when they come from one of the
//! namespaces found here. Pods' namespaces are recognised by the namespace id that the
//! node's veth reports for its peer (IFLA_LINK_NETNSID), matched against the id the kernel
//! gives each candidate namespace file (RTM_GETNSID).

use std::{
    collections::{BTreeSet, HashSet},
    fs::{self, File},
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result};
use futures::StreamExt as _;
use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    nsid::{NsidAttribute, NsidMessage},
};
use rtnetlink::Handle;

use super::netlink::with_rtnetlink;

/// The inode number of this process's network namespace: how the kernel programs and the
/// state files tell namespaces apart.
pub fn own_inode() -> Result<u32> {
    Ok(fs::metadata("/proc/self/ns/net").context("reading /proc/self/ns/net")?.ino() as u32)
}

/// The inode numbers of this node's namespace and of its local pods' namespaces.
pub async fn node_namespaces(pod_netnsids: &[i32]) -> Result<BTreeSet<u32>> {
    let own = own_inode()?;
    let mut namespaces = BTreeSet::from([own]);
    if pod_netnsids.is_empty() {
        return Ok(namespaces);
    }
    with_rtnetlink(async |handle| {
        let mut seen = HashSet::new();
        for candidate in candidates() {
            let Ok(file) = File::open(&candidate) else { continue };
            let Ok(inode) = file.metadata().map(|m| m.ino() as u32) else { continue };
            if !seen.insert(inode) || inode == own {
                continue;
            }
            if let Some(nsid) = nsid_of(handle, &file).await
                && pod_netnsids.contains(&nsid)
            {
                namespaces.insert(inode);
            }
        }
        Ok(namespaces)
    })
    .await
}

/// Namespace files that may be a pod's: named ones (CNI plugins and `ip netns` put them in
/// /run/netns) and every process's.
fn candidates() -> Vec<PathBuf> {
    let mut paths = Vec::new();
    for dir in ["/run/netns", "/var/run/netns"] {
        if let Ok(entries) = fs::read_dir(dir) {
            paths.extend(entries.flatten().map(|entry| entry.path()));
        }
    }
    if let Ok(entries) = fs::read_dir("/proc") {
        for entry in entries.flatten() {
            let name = entry.file_name();
            if name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
                paths.push(Path::new("/proc").join(name).join("ns/net"));
            }
        }
    }
    paths
}

/// The id this namespace has for the namespace open in `file`, if one is assigned.
async fn nsid_of(handle: &Handle, file: &File) -> Option<i32> {
    let mut message = NsidMessage::default();
    message.attributes = vec![NsidAttribute::Fd(file.as_raw_fd() as u32)];
    let mut request = NetlinkMessage::from(RouteNetlinkMessage::GetNsId(message));
    request.header.flags = NLM_F_REQUEST | NLM_F_ACK;
    let mut responses = handle.clone().request(request).ok()?;
    while let Some(response) = responses.next().await {
        if let NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNsId(message)) = response.payload {
            return message.attributes.iter().find_map(|attr| match attr {
                NsidAttribute::Id(id) if *id >= 0 => Some(*id),
                _ => None,
            });
        }
    }
    None
}
