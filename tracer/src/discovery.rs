//! Finds the interfaces a pod's packets cross on this node, from the kernel's own tables
//! (rtnetlink): the route to the pod, the bridge fdb and neighbour entries, VXLAN devices
//! and their underlay, and bonds with their slaves.

use std::{collections::BTreeMap, fmt, net::IpAddr};

use anyhow::{Context as _, Result, bail};
use futures::TryStreamExt as _;
use netlink_packet_route::{
    AddressFamily,
    address::AddressAttribute,
    link::{
        InfoBond, InfoBondPort, InfoData, InfoKind, InfoPortData, InfoVxlan, LacpState, LinkAttribute, LinkInfo, LinkLayerType,
        LinkMessage, MiiStatus, State,
    },
    neighbour::{NeighbourAddress, NeighbourAttribute},
    route::{RouteAddress, RouteAttribute, RouteType},
};
use rtnetlink::{Handle, RouteMessageBuilder};
use serde::Serialize;

use crate::Direction;

/// The role an interface plays on the pod's path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HopKind {
    PodVeth,
    Bridge,
    Vxlan,
    Nic,
    Bond,
    BondSlave,
}

impl fmt::Display for HopKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::PodVeth => "pod-veth",
            Self::Bridge => "bridge",
            Self::Vxlan => "vxlan",
            Self::Nic => "nic",
            Self::Bond => "bond",
            Self::BondSlave => "bond-slave",
        })
    }
}

/// Bond state as the kernel reports it, for the bond itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BondState {
    pub mode: String,
    pub active_slave: Option<String>,
}

/// A bond slave's link state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SlaveState {
    pub bond: String,
    pub mii_up: bool,
    pub link_failures: u32,
    /// 802.3ad only: whether the LACP partner reports the port in sync.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lacp_partner_in_sync: Option<bool>,
}

/// One interface on the pod's path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hop {
    pub ifname: String,
    pub ifindex: u32,
    pub kind: HopKind,
    pub mtu: u32,
    /// Devices such as IPIP or WireGuard carry no Ethernet header.
    pub no_mac_header: bool,
    /// The TC hook that packets *from* the pod cross here; replies cross the other one.
    pub from_pod: Direction,
    /// For VXLAN devices: the underlay device's ifindex.
    pub underlay: Option<u32>,
    /// For VXLAN devices: the `local` tunnel source address.
    pub vxlan_local: Option<IpAddr>,
    /// Addresses on the interface, with prefix lengths.
    pub addresses: Vec<(IpAddr, u8)>,
    pub bond: Option<BondState>,
    pub slave: Option<SlaveState>,
}

/// Whether the followed pod lives on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Locality {
    Local,
    Remote,
}

/// The hops in the order a packet from the pod crosses them.
#[derive(Clone, Debug)]
pub struct Path {
    pub pod_ip: IpAddr,
    pub locality: Locality,
    pub hops: Vec<Hop>,
    /// Namespace ids (relative to this one) of the local pods' network namespaces, from the
    /// peers of the veths on the pod bridge.
    pub pod_netnsids: Vec<i32>,
    /// Things discovery had to guess, printed as warnings.
    pub warnings: Vec<String>,
}

/// User adjustments to the discovered path.
#[derive(Clone, Debug, Default)]
pub struct PathOverrides {
    pub add: Vec<String>,
    pub exclude: Vec<String>,
}

/// A bond slave's state as netlink reports it.
#[derive(Clone, Copy, Debug)]
struct SlaveLink {
    mii_up: bool,
    link_failures: u32,
    lacp_partner_in_sync: Option<bool>,
}

/// What discovery needs to know about one link.
#[derive(Clone, Debug)]
struct Link {
    index: u32,
    name: String,
    mtu: u32,
    kind: Option<InfoKind>,
    controller: Option<u32>,
    link_layer: LinkLayerType,
    oper_up: bool,
    vxlan_underlay: Option<u32>,
    vxlan_local: Option<IpAddr>,
    bond: Option<BondState>,
    bond_port: Option<SlaveLink>,
    /// For a veth whose peer lives in another namespace: that namespace's id.
    link_netnsid: Option<i32>,
}

/// Runs `work` over a fresh rtnetlink connection, which is closed when `work` ends.
pub async fn with_rtnetlink<T>(work: impl AsyncFnOnce(&Handle) -> Result<T>) -> Result<T> {
    let (connection, handle, _) = rtnetlink::new_connection().context("opening rtnetlink socket")?;
    let connection = tokio::spawn(connection);
    let result = work(&handle).await;
    connection.abort();
    result
}

pub async fn discover(pod_ip: IpAddr, overrides: &PathOverrides) -> Result<Path> {
    with_rtnetlink(async |handle| discover_with(handle, pod_ip, overrides).await).await
}

async fn discover_with(handle: &Handle, pod_ip: IpAddr, overrides: &PathOverrides) -> Result<Path> {
    let links = dump_links(handle).await?;
    let route_oif = route_oif(handle, pod_ip).await?;
    let oif = links.get(&route_oif).with_context(|| format!("route to {pod_ip} uses ifindex {route_oif}, which is gone"))?;

    let addresses = dump_addresses(handle).await?;
    let mut warnings = Vec::new();
    let mut path: Vec<(u32, HopKind, Direction)> = Vec::new();
    let locality = match oif.kind {
        Some(InfoKind::Bridge) => {
            let veths = pod_ports(handle, &links, oif, pod_ip, &mut warnings).await?;
            path.extend(veths.into_iter().map(|index| (index, HopKind::PodVeth, Direction::Ingress)));
            path.push((oif.index, HopKind::Bridge, Direction::Ingress));
            Locality::Local
        }
        // Routed CNIs (Calico and the like) point the pod route straight at its veth, which
        // carries no address of its own; a veth with addresses is a node's uplink instead.
        Some(InfoKind::Veth) if !addresses.iter().any(|(index, ip, _)| *index == oif.index && !is_link_local(ip)) => {
            path.push((oif.index, HopKind::PodVeth, Direction::Ingress));
            Locality::Local
        }
        Some(InfoKind::Vxlan) => Locality::Remote,
        _ => bail!(
            "no path to {pod_ip} on this node: its route leaves through {} ({}), which is not a pod bridge, pod veth or VXLAN device",
            oif.name,
            kind_name(oif.kind.as_ref())
        ),
    };

    let network_side = match locality {
        Locality::Local => Direction::Egress,
        Locality::Remote => Direction::Ingress,
    };
    let default_oif = default_route_oif(handle).await?;
    let mut network_hops = Vec::new();
    for vxlan in links.values().filter(|link| link.kind == Some(InfoKind::Vxlan)) {
        network_hops.push((vxlan.index, HopKind::Vxlan));
        // Without an explicit `dev`, the kernel sends the encapsulated packet by route lookup.
        if let Some(underlay) = vxlan.vxlan_underlay.or(default_oif) {
            push_underlay(&links, underlay, &mut network_hops);
        }
    }
    if let Some(default_oif) = default_oif {
        push_underlay(&links, default_oif, &mut network_hops);
    }
    // A packet from a remote pod meets the wire before the tunnel device.
    if locality == Locality::Remote {
        network_hops.reverse();
    }
    path.extend(network_hops.into_iter().map(|(index, kind)| (index, kind, network_side)));

    for name in &overrides.add {
        let link =
            links.values().find(|link| &link.name == name).with_context(|| format!("--iface {name}: no such interface on this node"))?;
        path.push((link.index, classify(link, &links), network_side));
    }
    for name in &overrides.exclude {
        if !links.values().any(|link| &link.name == name) {
            bail!("--exclude-iface {name}: no such interface on this node");
        }
    }

    let mut seen = Vec::new();
    let mut hops = Vec::new();
    for (index, kind, from_pod) in path {
        let link = &links[&index];
        if seen.contains(&index) || overrides.exclude.contains(&link.name) {
            continue;
        }
        seen.push(index);
        if !link.oper_up && kind != HopKind::BondSlave {
            warnings.push(format!("{} is not up; tracing it anyway", link.name));
        }
        hops.push(Hop {
            ifname: link.name.clone(),
            ifindex: link.index,
            kind,
            mtu: link.mtu,
            no_mac_header: !matches!(link.link_layer, LinkLayerType::Ether | LinkLayerType::Loopback),
            from_pod,
            underlay: link.vxlan_underlay,
            vxlan_local: link.vxlan_local,
            addresses: addresses.iter().filter(|(i, _, _)| *i == index).map(|(_, ip, len)| (*ip, *len)).collect(),
            bond: link.bond.clone(),
            slave: slave_state(link, &links),
        });
    }
    if hops.is_empty() {
        bail!("no path to {pod_ip} on this node: every hop was excluded");
    }
    // Every pod behind a pod bridge or on a pod veth is local, not only the followed one.
    let pod_netnsids = links
        .values()
        .filter(|link| link.kind == Some(InfoKind::Veth))
        .filter(|link| {
            let on_bridge = link.controller.and_then(|c| links.get(&c)).is_some_and(|c| c.kind == Some(InfoKind::Bridge));
            on_bridge || hops.iter().any(|hop| hop.ifindex == link.index && hop.kind == HopKind::PodVeth)
        })
        .filter_map(|link| link.link_netnsid)
        .collect();
    Ok(Path { pod_ip, locality, hops, pod_netnsids, warnings })
}

fn slave_state(link: &Link, links: &BTreeMap<u32, Link>) -> Option<SlaveState> {
    let port = link.bond_port?;
    let bond = link.controller.and_then(|c| links.get(&c));
    let lacp = bond.and_then(|b| b.bond.as_ref()).is_some_and(|b| b.mode == "802.3ad");
    Some(SlaveState {
        bond: bond.map(|b| b.name.clone()).unwrap_or_default(),
        mii_up: port.mii_up,
        link_failures: port.link_failures,
        lacp_partner_in_sync: if lacp { Some(port.lacp_partner_in_sync.unwrap_or(false)) } else { None },
    })
}

/// The path with its bonds' and slaves' state read again, e.g. after a failover mid-trace.
pub async fn refresh_bond_state(path: &Path) -> Result<Path> {
    let mut path = path.clone();
    if !path.hops.iter().any(|hop| hop.bond.is_some() || hop.slave.is_some()) {
        return Ok(path);
    }
    let links = with_rtnetlink(async |handle| dump_links(handle).await).await?;
    for hop in &mut path.hops {
        if let Some(link) = links.get(&hop.ifindex) {
            hop.bond = link.bond.clone();
            hop.slave = slave_state(link, &links);
        }
    }
    Ok(path)
}

/// Adds an underlay device, and for a bond its slaves, once.
fn push_underlay(links: &BTreeMap<u32, Link>, index: u32, hops: &mut Vec<(u32, HopKind)>) {
    let Some(link) = links.get(&index) else { return };
    if hops.iter().any(|(i, _)| *i == index) {
        return;
    }
    let kind = classify(link, links);
    hops.push((index, kind));
    if kind == HopKind::Bond {
        for slave in links.values().filter(|l| l.controller == Some(index)) {
            hops.push((slave.index, HopKind::BondSlave));
        }
    }
}

fn classify(link: &Link, links: &BTreeMap<u32, Link>) -> HopKind {
    match link.kind {
        Some(InfoKind::Bridge) => HopKind::Bridge,
        Some(InfoKind::Vxlan) => HopKind::Vxlan,
        Some(InfoKind::Bond) => HopKind::Bond,
        _ if link.controller.and_then(|c| links.get(&c)).is_some_and(|c| c.kind == Some(InfoKind::Bond)) => HopKind::BondSlave,
        Some(InfoKind::Veth) if link.controller.and_then(|c| links.get(&c)).is_some_and(|c| c.kind == Some(InfoKind::Bridge)) => {
            HopKind::PodVeth
        }
        _ => HopKind::Nic,
    }
}

fn kind_name(kind: Option<&InfoKind>) -> String {
    match kind {
        None => "device".into(),
        Some(kind) => kind.to_string(),
    }
}

/// The bridge port(s) behind which the pod sits: its MAC from the neighbour table, then the
/// port that MAC was learned on from the bridge fdb.
async fn pod_ports(
    handle: &Handle,
    links: &BTreeMap<u32, Link>,
    bridge: &Link,
    pod_ip: IpAddr,
    warnings: &mut Vec<String>,
) -> Result<Vec<u32>> {
    let family = match pod_ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    let neighbours: Vec<_> =
        handle.neighbours().get().set_address_family(family).execute().try_collect().await.context("dumping the neighbour table")?;
    let mac = neighbours.iter().find_map(|neigh| {
        if neigh.header.ifindex != bridge.index {
            return None;
        }
        let dst_matches = neigh.attributes.iter().any(|attr| match (attr, pod_ip) {
            (NeighbourAttribute::Destination(NeighbourAddress::Inet(a)), IpAddr::V4(ip)) => *a == ip,
            (NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)), IpAddr::V6(ip)) => *a == ip,
            _ => false,
        });
        dst_matches
            .then(|| {
                neigh.attributes.iter().find_map(|attr| match attr {
                    NeighbourAttribute::LinkLayerAddress(mac) if mac.iter().any(|b| *b != 0) => Some(mac.clone()),
                    _ => None,
                })
            })
            .flatten()
    });

    if let Some(mac) = &mac {
        let fdb: Vec<_> = handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute()
            .try_collect()
            .await
            .context("dumping the bridge fdb")?;
        let port = fdb.iter().find_map(|entry| {
            let on_bridge = links.get(&entry.header.ifindex).is_some_and(|l| l.controller == Some(bridge.index));
            let same_mac = entry.attributes.iter().any(|attr| matches!(attr, NeighbourAttribute::LinkLayerAddress(m) if m == mac));
            (on_bridge && same_mac).then_some(entry.header.ifindex)
        });
        if let Some(port) = port {
            return Ok(vec![port]);
        }
    }

    let ports: Vec<u32> = links.values().filter(|link| link.controller == Some(bridge.index)).map(|link| link.index).collect();
    if ports.is_empty() {
        bail!("no path to {pod_ip} on this node: its route points at bridge {}, which has no ports", bridge.name);
    }
    warnings.push(format!("{pod_ip} has no resolved MAC behind {} yet; tracing all {} of its ports", bridge.name, ports.len()));
    Ok(ports)
}

async fn route_oif(handle: &Handle, ip: IpAddr) -> Result<u32> {
    let message = RouteMessageBuilder::<IpAddr>::new()
        .destination_prefix(ip, if ip.is_ipv4() { 32 } else { 128 })
        .context("building route query")?
        .build();
    let routes: Vec<_> = match handle.route().get(message).execute().try_collect().await {
        Ok(routes) => routes,
        Err(err) => bail!("no path to {ip} on this node: no route ({err})"),
    };
    let route = routes.first().with_context(|| format!("no path to {ip} on this node: no route"))?;
    match route.header.kind {
        RouteType::Unicast => {}
        RouteType::Local => bail!("no path to {ip} on this node: it is an address of this node, not a pod"),
        kind => bail!("no path to {ip} on this node: its route is of type {kind:?}"),
    }
    route
        .attributes
        .iter()
        .find_map(|attr| match attr {
            RouteAttribute::Oif(index) => Some(*index),
            _ => None,
        })
        .with_context(|| format!("no path to {ip} on this node: its route has no output interface"))
}

/// The device of the IPv4 default route in the main table, if any.
async fn default_route_oif(handle: &Handle) -> Result<Option<u32>> {
    let routes: Vec<_> = handle
        .route()
        .get(RouteMessageBuilder::<std::net::Ipv4Addr>::new().build())
        .execute()
        .try_collect()
        .await
        .context("dumping IPv4 routes")?;
    Ok(routes.iter().find_map(|route| {
        let is_default = route.header.destination_prefix_length == 0
            && route.header.kind == RouteType::Unicast
            && !route
                .attributes
                .iter()
                .any(|attr| matches!(attr, RouteAttribute::Destination(RouteAddress::Inet(a)) if !a.is_unspecified()));
        if !is_default {
            return None;
        }
        route.attributes.iter().find_map(|attr| match attr {
            RouteAttribute::Oif(index) => Some(*index),
            _ => None,
        })
    }))
}

async fn dump_links(handle: &Handle) -> Result<BTreeMap<u32, Link>> {
    let messages: Vec<LinkMessage> = handle.link().get().execute().try_collect().await.context("dumping links")?;
    let mut links = BTreeMap::new();
    for message in messages {
        let link = parse_link(&message);
        links.insert(link.index, link);
    }
    // Resolve the bond's active slave to a name now that all links are known.
    let names: BTreeMap<u32, String> = links.iter().map(|(i, l)| (*i, l.name.clone())).collect();
    for link in links.values_mut() {
        if let Some(bond) = &mut link.bond
            && let Some(active) = &bond.active_slave
            && let Ok(index) = active.parse::<u32>()
        {
            bond.active_slave = names.get(&index).cloned();
        }
    }
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
        vxlan_underlay: None,
        vxlan_local: None,
        bond: None,
        bond_port: None,
        link_netnsid: None,
    };
    for attr in &message.attributes {
        match attr {
            LinkAttribute::IfName(name) => link.name = name.clone(),
            LinkAttribute::Mtu(mtu) => link.mtu = *mtu,
            LinkAttribute::Controller(index) => link.controller = Some(*index),
            LinkAttribute::LinkNetNsId(id) => link.link_netnsid = Some(*id),
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
                        InfoVxlan::Link(index) if *index != 0 => link.vxlan_underlay = Some(*index),
                        InfoVxlan::Local(ip) if !ip.is_unspecified() => link.vxlan_local = Some(IpAddr::V4(*ip)),
                        InfoVxlan::Local6(ip) if !ip.is_unspecified() => link.vxlan_local = Some(IpAddr::V6(*ip)),
                        _ => {}
                    }
                }
            }
            LinkInfo::Data(InfoData::Bond(attrs)) => {
                let mut state = BondState { mode: String::new(), active_slave: None };
                for attr in attrs {
                    match attr {
                        InfoBond::Mode(mode) => state.mode = bond_mode_name(*mode),
                        // Kept as the index until every link name is known.
                        InfoBond::ActivePort(index) => state.active_slave = Some(index.to_string()),
                        _ => {}
                    }
                }
                link.bond = Some(state);
            }
            LinkInfo::PortData(InfoPortData::BondPort(attrs)) => {
                let mut port = SlaveLink { mii_up: true, link_failures: 0, lacp_partner_in_sync: None };
                for attr in attrs {
                    match attr {
                        InfoBondPort::MiiStatus(status) => port.mii_up = matches!(status, MiiStatus::Up),
                        InfoBondPort::LinkFailureCount(count) => port.link_failures = *count,
                        InfoBondPort::AdPartnerOperPortState(state) => {
                            port.lacp_partner_in_sync = Some(state.contains(LacpState::SYNCHRONIZATION))
                        }
                        _ => {}
                    }
                }
                link.bond_port = Some(port);
            }
            _ => {}
        }
    }
}

fn bond_mode_name(mode: netlink_packet_route::link::BondMode) -> String {
    use netlink_packet_route::link::BondMode;
    match mode {
        BondMode::BalanceRr => "balance-rr".into(),
        BondMode::ActiveBackup => "active-backup".into(),
        BondMode::BalanceXor => "balance-xor".into(),
        BondMode::Broadcast => "broadcast".into(),
        BondMode::Ieee8023Ad => "802.3ad".into(),
        BondMode::BalanceTlb => "balance-tlb".into(),
        BondMode::BalanceAlb => "balance-alb".into(),
        other => format!("{other:?}"),
    }
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    }
}

async fn dump_addresses(handle: &Handle) -> Result<Vec<(u32, IpAddr, u8)>> {
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

/// `None` when the interface is gone.
pub async fn link_drops(handle: &Handle, index: u32) -> Result<Option<LinkDrops>> {
    let message = match handle.link().get().match_index(index).execute().try_next().await {
        Ok(Some(message)) => message,
        Ok(None) => return Ok(None),
        Err(rtnetlink::Error::NetlinkError(err)) if err.raw_code() == -libc::ENODEV => return Ok(None),
        Err(err) => return Err(err).context("querying link statistics"),
    };
    Ok(Some(message.attributes.iter().fold(LinkDrops::default(), |drops, attr| match attr {
        LinkAttribute::Stats64(stats) => {
            LinkDrops { rx_dropped: stats.rx_dropped, rx_length_errors: stats.rx_length_errors, tx_dropped: stats.tx_dropped }
        }
        _ => drops,
    })))
}
