//! rtnetlink access shared by discovery, namespaces, probes and the trace loop: one
//! connection helper, the link and address dumps, and link statistics.

use std::{collections::BTreeMap, net::IpAddr};

use anyhow::{Context as _, Result};
use futures::TryStreamExt as _;
use netlink_packet_route::{
    address::AddressAttribute,
    link::{InfoData, InfoIpTunnel, InfoKind, InfoPortData, InfoVxlan, LinkAttribute, LinkInfo, LinkLayerType, LinkMessage, State},
};
use rtnetlink::Handle;

use super::{
    bond::{self, BondState, SlaveLink},
    bridge::{self, FamilySwitch},
};

/// Runs `work` over a fresh rtnetlink connection, which is closed when `work` ends.
pub async fn with_rtnetlink<T>(work: impl AsyncFnOnce(&Handle) -> Result<T>) -> Result<T> {
    let (connection, handle, _) = rtnetlink::new_connection().context("opening rtnetlink socket")?;
    let connection = tokio::spawn(connection);
    let result = work(&handle).await;
    connection.abort();
    result
}

/// What discovery needs to know about one link.
#[derive(Clone, Debug)]
pub(super) struct Link {
    pub index: u32,
    pub name: String,
    pub mtu: u32,
    pub kind: Option<InfoKind>,
    pub controller: Option<u32>,
    pub link_layer: LinkLayerType,
    pub oper_up: bool,
    /// For a tunnel (VXLAN, IPIP): the device it is bound to (`dev`); for an IPIP tunnel
    /// without one, discovery fills in the device its peers are reached through.
    pub tunnel_underlay: Option<u32>,
    pub vxlan_local: Option<IpAddr>,
    /// For VXLAN: the UDP destination port it sends to and listens on.
    pub vxlan_port: Option<u16>,
    pub bond: Option<BondState>,
    pub bond_port: Option<SlaveLink>,
    /// For a veth whose peer lives in another namespace: that namespace's id.
    pub link_netnsid: Option<i32>,
    /// For a veth: its peer's ifindex (IFLA_LINK), in the namespace `link_netnsid` names.
    pub peer_index: Option<u32>,
    /// For a bridge: its own `nf_call_iptables` and `nf_call_ip6tables` switches.
    pub bridge_nf_call: Option<FamilySwitch>,
    /// For a bridge port: whether hairpin mode lets the bridge send a frame back out the port
    /// it came in on.
    pub hairpin: Option<bool>,
}

impl Link {
    /// Whether this link's controller (the device it is enslaved to) is of `kind`.
    pub fn controlled_by(&self, kind: &InfoKind, links: &BTreeMap<u32, Link>) -> bool {
        self.controller.and_then(|c| links.get(&c)).is_some_and(|c| c.kind.as_ref() == Some(kind))
    }
}

/// Every interface of this network namespace, by index, from netlink (not /sys/class/net,
/// which shows the namespace sysfs was mounted in, not ours, under `nsenter -n`).
pub async fn interfaces() -> Result<BTreeMap<u32, String>> {
    with_rtnetlink(async |handle| Ok(dump_links(handle).await?.into_values().map(|link| (link.index, link.name)).collect())).await
}

/// The index the kernel gives `ifname` now, if it exists.
pub fn ifindex_of(ifname: &str) -> Option<u32> {
    let name = std::ffi::CString::new(ifname).ok()?;
    // SAFETY: `name` is a valid NUL-terminated string that lives across the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

pub(super) async fn dump_links(handle: &Handle) -> Result<BTreeMap<u32, Link>> {
    let messages: Vec<LinkMessage> = handle.link().get().execute().try_collect().await.context("dumping links")?;
    let mut links: BTreeMap<u32, Link> = messages.iter().map(parse_link).map(|link| (link.index, link)).collect();
    bond::name_active_slaves(&mut links);
    Ok(links)
}

fn parse_link(message: &LinkMessage) -> Link {
    let mut link = Link {
        index: message.header.index,
        name: String::new(),
        mtu: 0,
        kind: None,
        controller: None,
        link_layer: message.header.link_layer_type,
        oper_up: false,
        tunnel_underlay: None,
        vxlan_local: None,
        vxlan_port: None,
        bond: None,
        bond_port: None,
        link_netnsid: None,
        peer_index: None,
        bridge_nf_call: None,
        hairpin: None,
    };
    for attr in &message.attributes {
        match attr {
            LinkAttribute::IfName(name) => link.name = name.clone(),
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            LinkAttribute::Controller(index) => link.controller = Some(*index),
            LinkAttribute::LinkNetNsId(id) => link.link_netnsid = Some(*id),
            LinkAttribute::Link(index) if *index != 0 => link.peer_index = Some(*index),
            // Virtual devices without carrier detection report "unknown" while working.
            LinkAttribute::OperState(state) => link.oper_up = matches!(state, State::Up | State::Unknown),
            LinkAttribute::LinkInfo(infos) => parse_link_info(infos, &mut link),
            _ => {}
        }
    }
    link
}

fn parse_link_info(infos: &[LinkInfo], link: &mut Link) {
    for info in infos {
        match info {
            LinkInfo::Kind(kind) => link.kind = Some(kind.clone()),
            LinkInfo::Data(InfoData::Vxlan(attrs)) => {
                for attr in attrs {
                    match attr {
                        InfoVxlan::Link(index) if *index != 0 => link.tunnel_underlay = Some(*index),
                        InfoVxlan::Port(port) => link.vxlan_port = Some(*port),
                        InfoVxlan::Local(ip) if !ip.is_unspecified() => link.vxlan_local = Some(IpAddr::V4(*ip)),
                        InfoVxlan::Local6(ip) if !ip.is_unspecified() => link.vxlan_local = Some(IpAddr::V6(*ip)),
                        _ => {}
                    }
                }
            }
            LinkInfo::Data(InfoData::IpTunnel(attrs)) => {
                link.tunnel_underlay = attrs.iter().find_map(|attr| match attr {
                    InfoIpTunnel::Link(index) if *index != 0 => Some(*index),
                    _ => None,
                });
            }
            LinkInfo::Data(InfoData::Bond(attrs)) => link.bond = Some(bond::parse_bond(attrs)),
            LinkInfo::PortData(InfoPortData::BondPort(attrs)) => link.bond_port = Some(bond::parse_bond_port(attrs)),
            LinkInfo::Data(InfoData::Bridge(attrs)) => link.bridge_nf_call = Some(bridge::parse_bridge(attrs)),
            LinkInfo::PortData(InfoPortData::BridgePort(attrs)) => link.hairpin = bridge::parse_port_hairpin(attrs),
            _ => {}
        }
    }
}

/// Every address on this node: (ifindex, address, prefix length).
pub(super) async fn dump_addresses(handle: &Handle) -> Result<Vec<(u32, IpAddr, u8)>> {
    let messages: Vec<_> = handle.address().get().execute().try_collect().await.context("dumping addresses")?;
    Ok(messages
        .iter()
        .filter_map(|message| {
            let ip = message.attributes.iter().find_map(|attr| match attr {
                AddressAttribute::Address(ip) => Some(*ip),
                _ => None,
            })?;
            Some((message.header.index, ip, message.header.prefix_len))
        })
        .collect())
}

/// Receive-side drop counters of an interface, from the kernel's link statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LinkDrops {
    pub rx_dropped: u64,
    pub rx_length_errors: u64,
    pub tx_dropped: u64,
}

impl LinkDrops {
    /// How much each counter grew since `before`.
    pub fn since(self, before: Self) -> Self {
        Self {
            rx_dropped: self.rx_dropped.saturating_sub(before.rx_dropped),
            rx_length_errors: self.rx_length_errors.saturating_sub(before.rx_length_errors),
            tx_dropped: self.tx_dropped.saturating_sub(before.tx_dropped),
        }
    }
}

/// `None` when the interface is gone.
pub async fn link_drops(handle: &Handle, index: u32) -> Result<Option<LinkDrops>> {
    let message = match handle.link().get().match_index(index).execute().try_next().await {
        Ok(Some(message)) => message,
        Ok(None) => return Ok(None),
        Err(rtnetlink::Error::NetlinkError(err)) if err.raw_code() == -libc::ENODEV => return Ok(None),
        Err(err) => return Err(err).with_context(|| format!("querying the link statistics of ifindex {index}")),
    };
    Ok(Some(message.attributes.iter().fold(LinkDrops::default(), |drops, attr| match attr {
        LinkAttribute::Stats64(stats) => {
            LinkDrops { rx_dropped: stats.rx_dropped, rx_length_errors: stats.rx_length_errors, tx_dropped: stats.tx_dropped }
        }
        _ => drops,
    })))
}
