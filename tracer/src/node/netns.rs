//! Which network namespaces belong to this node: its own and those of its local pods.
//!
//! Tracepoints see the whole kernel; in a lab, and on a node with many pods, other
//! namespaces produce events too. Kernel events count only when they come from one of the
//! namespaces found here. Pods' namespaces are recognised by the namespace id that the
//! node's veth reports for its peer (IFLA_LINK_NETNSID), matched against the id the kernel
//! gives each candidate namespace file (RTM_GETNSID).
//!
//! Discovery also looks inside them: the namespace whose interfaces hold a followed pod's IP
//! names that interface's veth peer (the pod's host-side veth) and the pod's own MTU.

use std::{
    collections::{BTreeSet, HashSet},
    fs::{self, File},
    net::IpAddr,
    os::{fd::AsRawFd as _, unix::fs::MetadataExt as _},
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow};
use futures::StreamExt as _;
use netlink_packet_core::{NLM_F_ACK, NLM_F_REQUEST, NetlinkMessage, NetlinkPayload};
use netlink_packet_route::{
    RouteNetlinkMessage,
    nsid::{NsidAttribute, NsidMessage},
};
use rtnetlink::Handle;

use super::netlink::{dump_addresses, dump_links, with_rtnetlink};

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

/// A pod's own interface, as its network namespace shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct PodInterface {
    /// The id this namespace gives the pod's namespace: the `link_netnsid` of its veth here.
    pub netnsid: i32,
    /// The ifindex, in this namespace, of the interface's veth peer.
    pub peer_index: u32,
    /// The pod's own MTU: the largest packet it sends.
    pub mtu: u32,
    pub name: String,
}

/// Finds the interface that holds `pod_ip` inside the network namespaces among `pod_netnsids`
/// (the peers of this node's pod veths), independently of the bridge's fdb, which forgets an
/// idle pod after a few minutes. Reads netlink tables only: sends nothing into the pod.
pub(super) async fn pod_interface(handle: &Handle, pod_ip: IpAddr, pod_netnsids: &[i32]) -> Result<Option<PodInterface>> {
    let own = own_inode()?;
    let mut seen = HashSet::new();
    for candidate in candidates() {
        let Ok(file) = File::open(&candidate) else { continue };
        let Ok(inode) = file.metadata().map(|m| m.ino() as u32) else { continue };
        if !seen.insert(inode) || inode == own {
            continue;
        }
        let Some(netnsid) = nsid_of(handle, &file).await.filter(|id| pod_netnsids.contains(id)) else { continue };
        if let Some((name, mtu, Some(peer_index))) = interface_holding(file, pod_ip)? {
            return Ok(Some(PodInterface { netnsid, peer_index, mtu, name }));
        }
    }
    Ok(None)
}

/// The name, MTU and veth peer index of the interface holding `ip` in the namespace open in
/// `netns`, read over a netlink socket opened inside it.
fn interface_holding(netns: File, ip: IpAddr) -> Result<Option<(String, u32, Option<u32>)>> {
    // A thread of its own, which ends with the lookup: a namespace entered with setns stays
    // with the thread, and no pooled runtime thread may carry it on to other work.
    let lookup = std::thread::spawn(move || -> Result<_> {
        // SAFETY: `netns` is an open network namespace file; setns changes only this thread.
        if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error()).context("entering a pod's network namespace");
        }
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting a netlink runtime")?;
        runtime.block_on(with_rtnetlink(async |handle| {
            let Some(index) = dump_addresses(handle).await?.iter().find(|(_, address, _)| *address == ip).map(|(index, _, _)| *index)
            else {
                return Ok(None);
            };
            Ok(dump_links(handle).await?.remove(&index).map(|link| (link.name, link.mtu, link.peer_index)))
        }))
    });
    lookup.join().map_err(|_| anyhow!("the namespace lookup thread panicked"))?
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
