//! Finds the interfaces a pod's packets cross on this node, from the kernel's own tables
//! (rtnetlink): the route to the pod, the bridge fdb and neighbour entries, tunnels (VXLAN,
//! IPIP) and their underlay, and bonds with their slaves.

use std::{collections::BTreeMap, net::IpAddr};

use anyhow::{Context as _, Result, bail};
use futures::TryStreamExt as _;
use netlink_packet_route::{
    AddressFamily,
    link::{InfoKind, LinkLayerType},
    neighbour::{NeighbourAddress, NeighbourAttribute},
    route::{RouteAttribute, RouteType},
};
use rtnetlink::{Handle, RouteMessageBuilder};

use super::{
    bond::slave_state,
    bridge::{self, BridgeNetfilter},
    netlink::{Link, dump_addresses, dump_links, with_rtnetlink},
    netns::{self, PodInterface},
    path::{Entry, Hop, HopKey, HopKind, Locality, Path, PodEnd, Stage},
    routing::{Family, Origin, Routing},
};
use crate::Direction;

/// User adjustments to the discovered path.
#[derive(Clone, Debug, Default)]
pub struct PathOverrides {
    pub add: Vec<String>,
    pub exclude: Vec<String>,
}

/// One stage as discovery first finds it: (ifindex, kind) alternatives and the direction of
/// packets from the pod.
type Candidate = (Vec<(u32, HopKind)>, Direction);

/// The path of the first IP, with the hops of every further IP merged in as alternatives.
pub async fn discover(pod_ips: &[IpAddr], overrides: &PathOverrides) -> Result<Path> {
    let (first, rest) = pod_ips.split_first().context("no pod IP given")?;
    let mut path = with_rtnetlink(async |handle| discover_one(handle, *first, overrides).await).await?;
    for ip in rest {
        let more = with_rtnetlink(async |handle| discover_one(handle, *ip, overrides).await).await?;
        merge(&mut path, more);
    }
    let local_pods: Vec<(IpAddr, u32)> = path
        .entries
        .iter()
        .filter(|entry| path.hop(entry.hop.ifindex).is_some_and(|hop| hop.kind == HopKind::PodVeth))
        .map(|entry| (entry.pod_ip, entry.hop.ifindex))
        .collect();
    if let Some(note) = bridged_note(&path, &local_pods) {
        path.notes.push(note);
    }
    Ok(path)
}

/// Adds the veth of `peer` (the `--peer` address) when it is a pod behind the same bridge:
/// the followed pod's packets to it leave the path there, bridged from port to port. Returns
/// whether it was added; a remote pod, a Service IP or anything else (including an address
/// with no path on this node) leaves the path alone.
pub async fn add_local_peer(path: &mut Path, peer: IpAddr) -> bool {
    let Some(bridge) = path.hops().find(|hop| hop.kind == HopKind::Bridge).map(|hop| hop.ifindex) else { return false };
    let Ok(peer_path) = with_rtnetlink(async |handle| discover_one(handle, peer, &PathOverrides::default()).await).await else {
        return false;
    };
    let same_bridge = peer_path.hops().any(|hop| hop.kind == HopKind::Bridge && hop.ifindex == bridge);
    let Some(veth) = peer_path.hops().find(|hop| hop.kind == HopKind::PodVeth).filter(|_| same_bridge).cloned() else {
        return false;
    };
    let Some(stage) = path.stages.iter_mut().find(|stage| stage.hops.iter().any(|hop| hop.kind == HopKind::PodVeth)) else {
        return false;
    };
    if !stage.hops.iter().any(|hop| hop.ifindex == veth.ifindex) {
        stage.hops.push(veth.clone());
    }
    let mut pods: Vec<(IpAddr, u32)> = path.entries.first().map(|entry| (entry.pod_ip, entry.hop.ifindex)).into_iter().collect();
    pods.push((peer, veth.ifindex));
    if let Some(note) = bridged_note(path, &pods) {
        path.notes.push(note);
    }
    path.warnings.extend(peer_path.warnings);
    path.pod_netnsids.extend(peer_path.pod_netnsids);
    true
}

/// For two or more pods (IP, veth ifindex) behind the path's bridge: why the bridge itself
/// counts none of the packets between them. A pod is its veth: a dual-stack pod followed by
/// both its addresses is one pod.
fn bridged_note(path: &Path, pods: &[(IpAddr, u32)]) -> Option<String> {
    let bridge = path.hops().find(|hop| hop.kind == HopKind::Bridge)?;
    let mut veths: Vec<(u32, Vec<String>)> = Vec::new();
    for (ip, ifindex) in pods {
        match veths.iter_mut().find(|(veth, _)| veth == ifindex) {
            Some((_, ips)) => ips.push(ip.to_string()),
            None => veths.push((*ifindex, vec![ip.to_string()])),
        }
    }
    if veths.len() < 2 {
        return None;
    }
    let named: Vec<String> =
        veths.iter().filter_map(|(ifindex, ips)| path.hop(*ifindex).map(|veth| format!("{} ({})", ips.join(", "), veth.ifname))).collect();
    Some(format!(
        "{} are pods behind {bridge}: the bridge forwards frames between them from port to port, and those never cross {bridge}'s own \
         ingress or egress hooks, so {bridge} counts none of that traffic; it shows on the pods' veths",
        named.join(" and "),
        bridge = bridge.ifname
    ))
}

/// Adds another IP's path: its entry, and each hop not yet on the path as an alternative in
/// the stage of the same kind and direction (another pod's veth beside the first pod's), or
/// as a stage of its own at the end.
fn merge(path: &mut Path, more: Path) {
    path.entries.extend(more.entries);
    for hop in more.stages.into_iter().flat_map(|stage| stage.hops) {
        if path.hop(hop.ifindex).is_some() {
            continue;
        }
        let same_role = path.stages.iter_mut().find(|stage| stage.hops.iter().any(|h| h.kind == hop.kind && h.from_pod == hop.from_pod));
        match same_role {
            Some(stage) => stage.hops.push(hop),
            None => path.stages.push(Stage { hops: vec![hop] }),
        }
    }
    path.warnings.extend(more.warnings);
    path.pod_netnsids.extend(more.pod_netnsids);
}

async fn discover_one(handle: &Handle, pod_ip: IpAddr, overrides: &PathOverrides) -> Result<Path> {
    let mut links = dump_links(handle).await?;
    let routing = Routing::read(handle).await?;
    resolve_ipip_underlays(handle, &mut links, &routing).await;
    let route_oif = route_oif(handle, pod_ip).await?;
    let oif = links.get(&route_oif).with_context(|| format!("route to {pod_ip} uses ifindex {route_oif}, which is gone"))?;
    let addresses = dump_addresses(handle).await?;
    let mut warnings = Vec::new();
    let PodSide { locality, mut candidates, inside } = pod_side(handle, &links, &addresses, oif, pod_ip, &mut warnings).await?;

    let network_side = match locality {
        Locality::Local => Direction::Egress,
        Locality::Remote => Direction::Ingress,
    };
    // A local pod's packets enter the node's routing on the device its route points at (the
    // bridge, or a routed CNI's veth); those to a remote pod come from anywhere.
    let origin = match locality {
        Locality::Local => Origin { source: Some(pod_ip), iif: Some(&oif.name) },
        Locality::Remote => Origin::default(),
    };
    let network = network_stages(&links, &routing, Family::of(pod_ip), &origin, locality);
    candidates.extend(network.into_iter().map(|stage| (stage, network_side)));
    for name in &overrides.add {
        let link =
            links.values().find(|link| &link.name == name).with_context(|| format!("--iface {name}: no such interface on this node"))?;
        candidates.push((vec![(link.index, classify(link, &links))], network_side));
    }
    for name in &overrides.exclude {
        if !links.values().any(|link| &link.name == name) {
            bail!("--exclude-iface {name}: no such interface on this node");
        }
    }

    // Read only where a bridge carries the pod's packets: nothing else depends on it.
    let bridge_sysctls = if candidates.iter().flat_map(|(hops, _)| hops).any(|(_, kind)| *kind == HopKind::Bridge) {
        bridge::read_sysctls()
            .map_err(|err| warnings.push(format!("whether bridged packets pass through iptables is unknown: {err:#}")))
            .ok()
    } else {
        None
    };
    let mut stages = build_stages(candidates, &links, &addresses, bridge_sysctls, overrides, &mut warnings);
    if let Some(inside) = inside {
        let host_end = stages.iter_mut().flat_map(|stage| &mut stage.hops).find(|hop| hop.ifindex == inside.peer_index);
        if let Some(hop) = host_end {
            hop.pod_end = Some(PodEnd { ifname: inside.name, mtu: inside.mtu });
        }
    }
    let Some(first) = stages.first().map(|stage| &stage.hops[0]) else {
        bail!("no path to {pod_ip} on this node: every hop was excluded");
    };
    let entries = vec![Entry { pod_ip, hop: HopKey { ifindex: first.ifindex, direction: first.from_pod } }];
    // Every pod behind a pod bridge or on a pod veth is local, not only the followed one: a
    // routed CNI's pod veths are those without an address of their own that routes go through.
    let pod_netnsids = links
        .values()
        .filter(|link| link.kind == Some(InfoKind::Veth))
        .filter(|link| {
            let on_path = stages.iter().flat_map(|s| &s.hops).any(|hop| hop.ifindex == link.index && hop.kind == HopKind::PodVeth);
            let routed = !has_own_address(link.index, &addresses)
                && [Family::V4, Family::V6].into_iter().any(|family| routing.of(family).carries(link.index));
            link.controlled_by(&InfoKind::Bridge, &links) || on_path || routed
        })
        .filter_map(|link| link.link_netnsid)
        .collect();
    Ok(Path { pod_ip, locality, stages, entries, pod_netnsids, warnings, notes: Vec::new() })
}

/// The pod-side stages and what the pod's namespace showed of its interface.
struct PodSide {
    locality: Locality,
    candidates: Vec<Candidate>,
    inside: Option<PodInterface>,
}

/// The pod-side stages, decided by the device the route to the pod leaves through.
async fn pod_side(
    handle: &Handle,
    links: &BTreeMap<u32, Link>,
    addresses: &[(u32, IpAddr, u8)],
    oif: &Link,
    pod_ip: IpAddr,
    warnings: &mut Vec<String>,
) -> Result<PodSide> {
    match oif.kind {
        Some(InfoKind::Bridge) => {
            // Without the pod's port, every bridge port may be the pod's: alternatives.
            let (ports, inside) = pod_ports(handle, links, oif, pod_ip, warnings).await?;
            let veths = ports.into_iter().map(|index| (index, HopKind::PodVeth)).collect();
            let candidates = vec![(veths, Direction::Ingress), (vec![(oif.index, HopKind::Bridge)], Direction::Ingress)];
            Ok(PodSide { locality: Locality::Local, candidates, inside })
        }
        // Routed CNIs (Calico and the like) point the pod route straight at its veth, which
        // carries no address of its own; a veth with addresses is a node's uplink instead.
        Some(InfoKind::Veth) if !has_own_address(oif.index, addresses) => {
            let inside = look_inside(handle, pod_ip, &[oif], warnings).await;
            let candidates = vec![(vec![(oif.index, HopKind::PodVeth)], Direction::Ingress)];
            Ok(PodSide { locality: Locality::Local, candidates, inside })
        }
        // Through a tunnel (flannel's or Calico's VXLAN, Calico's IPIP): on another node.
        Some(InfoKind::Vxlan | InfoKind::IpIp) => Ok(PodSide { locality: Locality::Remote, candidates: Vec::new(), inside: None }),
        _ => bail!(
            "no path to {pod_ip} on this node: its route leaves through {} ({}), which is not a pod bridge, pod veth or tunnel (VXLAN, IPIP)",
            oif.name,
            kind_name(oif.kind.as_ref())
        ),
    }
}

/// Every tunnel that may carry the pod's address family and its underlay, then the device of
/// the default route the pod's traffic takes; a bond is one stage and its slaves the next, as
/// alternatives. In the order a packet from the pod crosses them: one from a remote pod meets
/// the wire before the tunnel device.
///
/// A VXLAN device is on the path unless it carries only the other family's routes. An IPIP
/// device carries IPv4 only, and is on the path only where IPv4 routes go through it: loading
/// the ipip module makes a fallback `tunl0` in every namespace, used or not.
fn network_stages(
    links: &BTreeMap<u32, Link>,
    routing: &Routing,
    family: Family,
    origin: &Origin<'_>,
    locality: Locality,
) -> Vec<Vec<(u32, HopKind)>> {
    let mut stages = Vec::new();
    let tunnels = links.values().filter(|link| match link.kind {
        Some(InfoKind::Vxlan) => routing.may_carry(link.index, family),
        Some(InfoKind::IpIp) => family == Family::V4 && routing.of(Family::V4).carries(link.index),
        _ => false,
    });
    for tunnel in tunnels {
        stages.push(vec![(tunnel.index, classify(tunnel, links))]);
        // Without an explicit `dev` (or, for IPIP, a route to its peers), the kernel routes
        // the encapsulated packet: this node's own packet from the tunnel's address, in that
        // address's family.
        let underlay = tunnel.tunnel_underlay.or_else(|| {
            let encapsulated = Origin { source: tunnel.vxlan_local, iif: Some("lo") };
            routing.of(tunnel.vxlan_local.map_or(family, Family::of)).default_route_device(&encapsulated)
        });
        if let Some(underlay) = underlay {
            push_underlay(links, underlay, &mut stages);
        }
    }
    if let Some(default_device) = routing.of(family).default_route_device(origin) {
        push_underlay(links, default_device, &mut stages);
    }
    if locality == Locality::Remote {
        stages.reverse();
        stages.iter_mut().for_each(|stage| stage.reverse());
    }
    stages
}

/// An IPIP tunnel without `dev` (Calico's `tunl0`) sends each packet to the gateway its route
/// names, the peer node, through whatever device reaches that address: the device the kernel
/// routes the first such gateway through is its underlay. Left unknown when no route through
/// the tunnel names a gateway the kernel can route.
async fn resolve_ipip_underlays(handle: &Handle, links: &mut BTreeMap<u32, Link>, routing: &Routing) {
    for link in links.values_mut().filter(|link| link.kind == Some(InfoKind::IpIp) && link.tunnel_underlay.is_none()) {
        for gateway in routing.of(Family::V4).gateways_via(link.index) {
            if let Ok(device) = route_oif(handle, gateway).await
                && device != link.index
            {
                link.tunnel_underlay = Some(device);
                break;
            }
        }
    }
}

/// Adds an underlay device, and for a bond its slaves, once.
fn push_underlay(links: &BTreeMap<u32, Link>, index: u32, stages: &mut Vec<Vec<(u32, HopKind)>>) {
    let Some(link) = links.get(&index) else { return };
    if stages.iter().flatten().any(|(i, _)| *i == index) {
        return;
    }
    let kind = classify(link, links);
    stages.push(vec![(index, kind)]);
    if kind == HopKind::Bond {
        let slaves: Vec<_> =
            links.values().filter(|l| l.controller == Some(index)).map(|slave| (slave.index, HopKind::BondSlave)).collect();
        if !slaves.is_empty() {
            stages.push(slaves);
        }
    }
}

/// Turns candidates into hops: each interface once, excluded ones dropped, empty stages gone.
/// `bridge_sysctls` is None when they could not be read.
fn build_stages(
    candidates: Vec<Candidate>,
    links: &BTreeMap<u32, Link>,
    addresses: &[(u32, IpAddr, u8)],
    bridge_sysctls: Option<bridge::Sysctls>,
    overrides: &PathOverrides,
    warnings: &mut Vec<String>,
) -> Vec<Stage> {
    let mut seen = Vec::new();
    let mut stages = Vec::new();
    for (alternatives, from_pod) in candidates {
        let mut hops = Vec::new();
        for (index, kind) in alternatives {
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
                underlay: link.tunnel_underlay,
                vxlan_local: link.vxlan_local,
                vxlan_port: link.vxlan_port,
                addresses: addresses.iter().filter(|(i, _, _)| *i == index).map(|(_, ip, len)| (*ip, *len)).collect(),
                bond: link.bond.clone(),
                slave: slave_state(link, links),
                pod_end: None,
                bridge_netfilter: match (kind, link.bridge_nf_call, bridge_sysctls) {
                    (HopKind::Bridge, Some(switch), Some(sysctls)) => Some(BridgeNetfilter::new(sysctls, switch)),
                    _ => None,
                },
                hairpin: if kind == HopKind::PodVeth { link.hairpin } else { None },
            });
        }
        if !hops.is_empty() {
            stages.push(Stage { hops });
        }
    }
    stages
}

fn classify(link: &Link, links: &BTreeMap<u32, Link>) -> HopKind {
    match link.kind {
        Some(InfoKind::Bridge) => HopKind::Bridge,
        Some(InfoKind::Vxlan) => HopKind::Vxlan,
        Some(InfoKind::IpIp) => HopKind::Ipip,
        Some(InfoKind::Bond) => HopKind::Bond,
        _ if link.controlled_by(&InfoKind::Bond, links) => HopKind::BondSlave,
        Some(InfoKind::Veth) if link.controlled_by(&InfoKind::Bridge, links) => HopKind::PodVeth,
        _ => HopKind::Nic,
    }
}

fn kind_name(kind: Option<&InfoKind>) -> String {
    match kind {
        None => "device".into(),
        Some(kind) => kind.to_string(),
    }
}

/// Whether the interface holds an address of its own, other than a link-local one.
fn has_own_address(ifindex: u32, addresses: &[(u32, IpAddr, u8)]) -> bool {
    addresses.iter().any(|(index, ip, _)| *index == ifindex && !is_link_local(ip))
}

fn is_link_local(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.is_unicast_link_local(),
    }
}

/// The pod's MAC address behind `bridge`, from the neighbour table.
async fn pod_mac(handle: &Handle, bridge: &Link, pod_ip: IpAddr) -> Result<Option<Vec<u8>>> {
    let family = match pod_ip {
        IpAddr::V4(_) => AddressFamily::Inet,
        IpAddr::V6(_) => AddressFamily::Inet6,
    };
    let neighbours: Vec<_> =
        handle.neighbours().get().set_address_family(family).execute().try_collect().await.context("dumping the neighbour table")?;
    Ok(neighbours.iter().find_map(|neigh| {
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
    }))
}

/// The pod's interface inside its namespace, when it is the peer of one of `veths`; a
/// namespace that cannot be entered gives a warning and `None`.
async fn look_inside(handle: &Handle, pod_ip: IpAddr, veths: &[&Link], warnings: &mut Vec<String>) -> Option<PodInterface> {
    let netnsids: Vec<i32> = veths.iter().filter_map(|veth| veth.link_netnsid).collect();
    match netns::pod_interface(handle, pod_ip, &netnsids).await {
        Ok(inside) => {
            inside.filter(|inside| veths.iter().any(|veth| veth.index == inside.peer_index && veth.link_netnsid == Some(inside.netnsid)))
        }
        Err(err) => {
            warnings.push(format!("could not read {pod_ip}'s interface inside its network namespace: {err:#}"));
            None
        }
    }
}

/// The bridge port(s) behind which the pod sits, with its interface when found inside its
/// namespace: the port whose veth peer holds the pod IP; else its MAC from the neighbour
/// table and the port that MAC was learned on from the bridge fdb (which forgets idle pods);
/// every port when both fail.
async fn pod_ports(
    handle: &Handle,
    links: &BTreeMap<u32, Link>,
    bridge: &Link,
    pod_ip: IpAddr,
    warnings: &mut Vec<String>,
) -> Result<(Vec<u32>, Option<PodInterface>)> {
    let bridge_ports: Vec<&Link> = links.values().filter(|link| link.controller == Some(bridge.index)).collect();
    if let Some(inside) = look_inside(handle, pod_ip, &bridge_ports, warnings).await {
        return Ok((vec![inside.peer_index], Some(inside)));
    }
    Ok((fdb_ports(handle, links, bridge, pod_ip, warnings).await?, None))
}

/// The pod's bridge port from the neighbour table and the bridge fdb; every port when that fails.
async fn fdb_ports(
    handle: &Handle,
    links: &BTreeMap<u32, Link>,
    bridge: &Link,
    pod_ip: IpAddr,
    warnings: &mut Vec<String>,
) -> Result<Vec<u32>> {
    if let Some(mac) = pod_mac(handle, bridge, pod_ip).await? {
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
            let same_mac = entry.attributes.iter().any(|attr| matches!(attr, NeighbourAttribute::LinkLayerAddress(m) if *m == mac));
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::node::{
        path::fixtures::{hop, key, local_path, path},
        routing::fixtures::{default_rules, route, routing, tables},
    };

    #[test]
    fn a_second_local_pod_is_an_alternative_with_its_own_entry() {
        let mut first = local_path();
        let second_ip: IpAddr = "10.244.0.3".parse().unwrap();
        let mut second = path(vec![
            vec![hop("veth2", 8, HopKind::PodVeth, Direction::Ingress)],
            vec![hop("cni0", 4, HopKind::Bridge, Direction::Ingress)],
            vec![hop("eth0", 2, HopKind::Nic, Direction::Egress)],
        ]);
        second.entries[0].pod_ip = second_ip;
        merge(&mut first, second);
        let names: Vec<Vec<&str>> = first.stages.iter().map(|s| s.hops.iter().map(|h| h.ifname.as_str()).collect()).collect();
        assert_eq!(names, [vec!["veth1", "veth2"], vec!["cni0"], vec!["flannel.1"], vec!["eth0"]]);
        assert_eq!(first.entry(second_ip), key(8, Direction::Ingress));
        assert_eq!(first.entry(first.pod_ip), key(5, Direction::Ingress));
    }

    #[test]
    fn two_local_pods_on_one_bridge_get_a_note_on_why_the_bridge_sees_nothing() {
        let mut path = local_path();
        path.stages[0].hops.push(hop("veth2", 8, HopKind::PodVeth, Direction::Ingress));
        let (pod, peer): (IpAddr, IpAddr) = ("10.244.0.2".parse().unwrap(), "10.244.0.3".parse().unwrap());
        assert_eq!(bridged_note(&path, &[(pod, 5)]), None, "one pod alone");
        let pod6: IpAddr = "fd00:10:244::2".parse().unwrap();
        assert_eq!(bridged_note(&path, &[(pod, 5), (pod6, 5)]), None, "one pod by both its addresses");
        let dual = bridged_note(&path, &[(pod, 5), (pod6, 5), (peer, 8)]).unwrap();
        assert!(dual.starts_with("10.244.0.2, fd00:10:244::2 (veth1) and 10.244.0.3 (veth2) are pods behind cni0"), "{dual}");
        let note = bridged_note(&path, &[(pod, 5), (peer, 8)]).unwrap();
        assert!(note.starts_with("10.244.0.2 (veth1) and 10.244.0.3 (veth2) are pods behind cni0"), "{note}");
        assert!(note.contains("never cross cni0's own ingress or egress hooks, so cni0 counts none of that traffic"), "{note}");
        path.stages.remove(1);
        assert_eq!(bridged_note(&path, &[(pod, 5), (peer, 8)]), None, "no bridge: routed pods cross no shared device");
        path.notes.push(note);
        assert!(path.describe().contains("\n  note: 10.244.0.2 (veth1) and"), "{}", path.describe());
    }

    #[test]
    fn a_hop_with_no_matching_role_gets_its_own_stage() {
        let mut first = local_path();
        merge(&mut first, path(vec![vec![hop("wg0", 9, HopKind::Bond, Direction::Egress)]]));
        assert_eq!(first.stages.len(), 5);
        assert_eq!(first.stages[4].hops[0].ifname, "wg0");
    }

    fn link(index: u32, name: &str, kind: Option<InfoKind>, controller: Option<u32>) -> (u32, Link) {
        let link = Link {
            index,
            name: name.into(),
            mtu: 1500,
            kind,
            controller,
            link_layer: LinkLayerType::Ether,
            oper_up: true,
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
        (index, link)
    }

    /// flannel.1 over bond0 with slaves eth0 and eth1, bond0 also the default route's device.
    fn bonded_node() -> BTreeMap<u32, Link> {
        let mut links = BTreeMap::from([
            link(2, "eth0", None, Some(6)),
            link(6, "bond0", Some(InfoKind::Bond), None),
            link(7, "eth1", None, Some(6)),
            link(3, "flannel.1", Some(InfoKind::Vxlan), None),
        ]);
        links.get_mut(&3).unwrap().tunnel_underlay = Some(6);
        links
    }

    const MAIN: u32 = 254;

    /// IPv4 routes only: the peer's pod subnet through flannel.1 (3), the default through `default_device`.
    fn ipv4_routing(default_device: u32) -> Routing {
        let ipv4 = tables(&[route("10.244.1.0/24", MAIN, 3), route("default", MAIN, default_device)], &default_rules());
        routing(ipv4, tables(&[route("fe80::/64", MAIN, 3)], &default_rules()))
    }

    const POD: Origin<'static> = Origin { source: Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 244, 0, 2))), iif: Some("cni0") };

    #[test]
    fn a_bonds_slaves_are_one_stage_of_alternatives() {
        let stages = network_stages(&bonded_node(), &ipv4_routing(6), Family::V4, &POD, Locality::Local);
        assert_eq!(stages, [vec![(3, HopKind::Vxlan)], vec![(6, HopKind::Bond)], vec![(2, HopKind::BondSlave), (7, HopKind::BondSlave)]]);
    }

    #[test]
    fn a_remote_pods_path_meets_the_wire_first() {
        let links = bonded_node();
        let candidates = network_stages(&links, &ipv4_routing(6), Family::V4, &Origin::default(), Locality::Remote)
            .into_iter()
            .map(|stage| (stage, Direction::Ingress))
            .collect();
        let stages = build_stages(candidates, &links, &[], None, &PathOverrides::default(), &mut Vec::new());
        let names: Vec<Vec<&str>> = stages.iter().map(|s| s.hops.iter().map(|h| h.ifname.as_str()).collect()).collect();
        assert_eq!(names, [vec!["eth1", "eth0"], vec!["bond0"], vec!["flannel.1"]]);
    }

    #[test]
    fn excluded_hops_go_and_empty_stages_with_them() {
        let links = bonded_node();
        let candidates = network_stages(&links, &ipv4_routing(6), Family::V4, &POD, Locality::Local)
            .into_iter()
            .map(|stage| (stage, Direction::Egress))
            .collect();
        let overrides = PathOverrides { add: vec![], exclude: vec!["bond0".into(), "eth1".into()] };
        let stages = build_stages(candidates, &links, &[], None, &overrides, &mut Vec::new());
        let names: Vec<Vec<&str>> = stages.iter().map(|s| s.hops.iter().map(|h| h.ifname.as_str()).collect()).collect();
        assert_eq!(names, [vec!["flannel.1"], vec!["eth0"]]);
    }

    /// kube-flannel with IPv6 enabled: flannel.1 (3) and flannel-v6.1 (8) over eth0 (2), each
    /// with its family's route to the peer's pod subnet, and a default route of each family
    /// through eth1 (7).
    fn dual_stack_node() -> (BTreeMap<u32, Link>, Routing) {
        let mut links = BTreeMap::from([
            link(2, "eth0", None, None),
            link(7, "eth1", None, None),
            link(3, "flannel.1", Some(InfoKind::Vxlan), None),
            link(8, "flannel-v6.1", Some(InfoKind::Vxlan), None),
        ]);
        for (index, local) in [(3, "10.99.0.1"), (8, "fd00:99::1")] {
            let tunnel = links.get_mut(&index).unwrap();
            tunnel.tunnel_underlay = Some(2);
            tunnel.vxlan_local = Some(local.parse().unwrap());
        }
        let ipv4 = tables(&[route("10.244.1.0/24", MAIN, 3), route("default", MAIN, 7)], &default_rules());
        // Every IPv6-enabled interface has a link-local route; flannel-v6.1's /128 address is
        // local-table only.
        let link_local: Vec<_> = [2, 3, 7, 8].into_iter().map(|index| route("fe80::/64", MAIN, index)).collect();
        let mut ipv6 = vec![route("fd00:10:244:1::/64", MAIN, 8), route("default", MAIN, 7)];
        ipv6.extend(link_local);
        (links, routing(ipv4, tables(&ipv6, &default_rules())))
    }

    #[test]
    fn a_dual_stack_pod_crosses_the_tunnel_of_its_address_family() {
        let (links, routing) = dual_stack_node();
        let pod6 = Origin { source: Some("fd00:10:244::2".parse().unwrap()), iif: Some("cni0") };
        let ipv6 = network_stages(&links, &routing, Family::V6, &pod6, Locality::Local);
        assert_eq!(ipv6, [vec![(8, HopKind::Vxlan)], vec![(2, HopKind::Nic)], vec![(7, HopKind::Nic)]]);
        let ipv4 = network_stages(&links, &routing, Family::V4, &POD, Locality::Local);
        assert_eq!(ipv4, [vec![(3, HopKind::Vxlan)], vec![(2, HopKind::Nic)], vec![(7, HopKind::Nic)]]);
    }

    /// A tunnel without `dev` whose own address is IPv6, carrying IPv4 pods: its packets leave
    /// by the IPv6 default route (eth0), the pod's other traffic by the IPv4 one (eth1).
    #[test]
    fn a_tunnel_without_a_device_leaves_by_its_own_familys_default_route() {
        let mut links =
            BTreeMap::from([link(2, "eth0", None, None), link(7, "eth1", None, None), link(3, "vxlan0", Some(InfoKind::Vxlan), None)]);
        links.get_mut(&3).unwrap().vxlan_local = Some("fd00:99::1".parse().unwrap());
        let ipv4 = tables(&[route("10.244.1.0/24", MAIN, 3), route("default", MAIN, 7)], &default_rules());
        let ipv6 = tables(&[route("default", MAIN, 2)], &default_rules());
        let stages = network_stages(&links, &routing(ipv4, ipv6), Family::V4, &POD, Locality::Local);
        assert_eq!(stages, [vec![(3, HopKind::Vxlan)], vec![(2, HopKind::Nic)], vec![(7, HopKind::Nic)]]);
    }

    /// A Calico IPIP node: tunl0 (4, its underlay resolved to eth0 through the peer's address)
    /// carries the other node's pod block; eth1 (7) has the default route. A second, unused
    /// fallback tunnel (9) has no routes.
    fn calico_ipip_node() -> (BTreeMap<u32, Link>, Routing) {
        let mut links = BTreeMap::from([
            link(2, "eth0", None, None),
            link(7, "eth1", None, None),
            link(4, "tunl0", Some(InfoKind::IpIp), None),
            link(9, "tunl1", Some(InfoKind::IpIp), None),
        ]);
        links.get_mut(&4).unwrap().tunnel_underlay = Some(2);
        let ipv4 = tables(&[route("10.244.1.0/26", MAIN, 4), route("default", MAIN, 7)], &default_rules());
        (links, routing(ipv4, tables(&[route("default", MAIN, 7)], &default_rules())))
    }

    #[test]
    fn an_ipip_tunnel_is_on_an_ipv4_path_only_where_routes_go_through_it() {
        let (links, routing) = calico_ipip_node();
        let pod = Origin { source: POD.source, iif: Some("cali1234") };
        let ipv4 = network_stages(&links, &routing, Family::V4, &pod, Locality::Local);
        assert_eq!(ipv4, [vec![(4, HopKind::Ipip)], vec![(2, HopKind::Nic)], vec![(7, HopKind::Nic)]]);
        let pod6 = Origin { source: Some("fd00:10:244::2".parse().unwrap()), iif: Some("cali1234") };
        assert_eq!(network_stages(&links, &routing, Family::V6, &pod6, Locality::Local), [vec![(7, HopKind::Nic)]]);
        let remote = network_stages(&links, &routing, Family::V4, &Origin::default(), Locality::Remote);
        assert_eq!(remote, [vec![(7, HopKind::Nic)], vec![(2, HopKind::Nic)], vec![(4, HopKind::Ipip)]]);
    }

    #[test]
    fn a_routes_gateway_is_read() {
        let mut message = route("10.244.1.0/26", MAIN, 4);
        message.attributes.push(RouteAttribute::Gateway(netlink_packet_route::route::RouteAddress::Inet("10.99.0.2".parse().unwrap())));
        let ipv4 = tables(&[message, route("default", MAIN, 7)], &default_rules());
        assert_eq!(ipv4.gateways_via(4), ["10.99.0.2".parse::<IpAddr>().unwrap()]);
        assert!(ipv4.gateways_via(7).is_empty());
    }
}
