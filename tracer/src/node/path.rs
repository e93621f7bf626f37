//! The pod's path through this node: an ordered list of stages, each one or more alternative
//! hops (a bond's slaves; the pod veths of several followed IPs). A packet crosses one hop of
//! each stage on its way out, and the stages in reverse on its way back.
//!
//! Travel order, "the hop after this one" and each followed IP's first hop are defined here
//! once; discovery builds the path, and the diagnosis and the report read it.

use std::{fmt, net::IpAddr};

use serde::Serialize;

use super::{
    bond::{BondState, SlaveState},
    bridge::BridgeNetfilter,
};
use crate::Direction;

/// The role an interface plays on the pod's path.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HopKind {
    PodVeth,
    Bridge,
    Vxlan,
    /// An IPIP tunnel (Calico's `tunl0`): IPv4 in IPv4, no MAC header.
    Ipip,
    Nic,
    Bond,
    BondSlave,
}

impl HopKind {
    /// The devices that carry encapsulated packets on the wire side.
    pub fn is_underlay(self) -> bool {
        matches!(self, Self::Nic | Self::Bond | Self::BondSlave)
    }

    /// The devices that encapsulate the pod's packets.
    pub fn is_tunnel(self) -> bool {
        matches!(self, Self::Vxlan | Self::Ipip)
    }
}

impl fmt::Display for HopKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::PodVeth => "pod-veth",
            Self::Bridge => "bridge",
            Self::Vxlan => "vxlan",
            Self::Ipip => "ipip",
            Self::Nic => "nic",
            Self::Bond => "bond",
            Self::BondSlave => "bond-slave",
        })
    }
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
    /// For tunnels (VXLAN, IPIP): the underlay device's ifindex.
    pub underlay: Option<u32>,
    /// For VXLAN devices: the `local` tunnel source address.
    pub vxlan_local: Option<IpAddr>,
    /// For VXLAN devices: their UDP port.
    pub vxlan_port: Option<u16>,
    /// Addresses on the interface, with prefix lengths.
    pub addresses: Vec<(IpAddr, u8)>,
    pub bond: Option<BondState>,
    pub slave: Option<SlaveState>,
    /// For a pod veth: the pod's own end of it, when its namespace could be read.
    pub pod_end: Option<PodEnd>,
    /// For a bridge: whether the frames it forwards between its ports pass through iptables
    /// (None when that could not be read).
    pub bridge_netfilter: Option<BridgeNetfilter>,
    /// For a pod veth on a bridge: its port's hairpin mode.
    pub hairpin: Option<bool>,
}

/// The pod's end of its veth, inside the pod's network namespace: its MTU, not the host
/// side's, bounds what the pod sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodEnd {
    pub ifname: String,
    pub mtu: u32,
}

/// A hop as packets meet it: one interface, one direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HopKey {
    pub ifindex: u32,
    pub direction: Direction,
}

/// Hops of which a packet crosses exactly one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stage {
    pub hops: Vec<Hop>,
}

/// Whether the followed pod lives on this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Locality {
    Local,
    Remote,
}

impl std::fmt::Display for Locality {
    /// "local pod" or "remote pod", one spelling wherever it is printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Local => "local pod",
            Self::Remote => "remote pod",
        })
    }
}

/// Where one followed IP's packets enter the path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub pod_ip: IpAddr,
    pub hop: HopKey,
}

/// A stage crossed in one direction: a position in travel order. Steps `0..n` are the way
/// out through stages `0..n`, steps `n..2n` the way back through stages `n-1..=0`.
pub type Step = usize;

#[derive(Clone, Debug)]
pub struct Path {
    /// The first followed IP, which the report is about.
    pub pod_ip: IpAddr,
    pub locality: Locality,
    pub stages: Vec<Stage>,
    /// Per followed IP, the hop its packets cross first.
    pub entries: Vec<Entry>,
    /// Namespace ids (relative to this one) of the local pods' network namespaces, from the
    /// peers of the veths on the pod bridge.
    pub pod_netnsids: Vec<i32>,
    /// Things discovery had to guess, printed as warnings.
    pub warnings: Vec<String>,
    /// Facts about the path that explain what the report will show, printed with the path.
    pub notes: Vec<String>,
}

impl Path {
    /// Every hop once, in stage order.
    pub fn hops(&self) -> impl Iterator<Item = &Hop> {
        self.stages.iter().flat_map(|stage| &stage.hops)
    }

    pub fn hops_mut(&mut self) -> impl Iterator<Item = &mut Hop> {
        self.stages.iter_mut().flat_map(|stage| &mut stage.hops)
    }

    pub fn hop(&self, ifindex: u32) -> Option<&Hop> {
        self.hops().find(|hop| hop.ifindex == ifindex)
    }

    /// The first hop of the first followed IP.
    pub fn first_hop(&self) -> &Hop {
        self.hops().next().expect("discovery never returns an empty path")
    }

    /// Whether `ip` is one of the followed pod IPs.
    pub fn follows(&self, ip: IpAddr) -> bool {
        self.entries.iter().any(|entry| entry.pod_ip == ip)
    }

    /// The hop where packets from `pod_ip` enter the path; the first IP's for any other address.
    pub fn entry(&self, pod_ip: IpAddr) -> HopKey {
        self.entries.iter().find(|entry| entry.pod_ip == pod_ip).or(self.entries.first()).map_or_else(
            || {
                let first = self.first_hop();
                HopKey { ifindex: first.ifindex, direction: first.from_pod }
            },
            |entry| entry.hop,
        )
    }

    /// The hop where packets to `pod_ip` leave the path: its entry hop, the other way.
    pub fn exit(&self, pod_ip: IpAddr) -> HopKey {
        let entry = self.entry(pod_ip);
        HopKey { direction: entry.direction.opposite(), ..entry }
    }

    /// Every (hop, direction) once: the way out in stage order, then the way back in exactly
    /// the reverse order.
    pub fn travel_order(&self) -> Vec<(&Hop, Direction)> {
        let outbound: Vec<_> = self.hops().map(|hop| (hop, hop.from_pod)).collect();
        let inbound = outbound.iter().rev().map(|(hop, direction)| (*hop, direction.opposite()));
        outbound.iter().copied().chain(inbound).collect()
    }

    /// The step at which packets cross `key`.
    pub fn step_of(&self, key: HopKey) -> Option<Step> {
        let stage = self.stages.iter().position(|stage| stage.hops.iter().any(|hop| hop.ifindex == key.ifindex))?;
        let hop = self.hop(key.ifindex)?;
        Some(if hop.from_pod == key.direction { stage } else { 2 * self.stages.len() - 1 - stage })
    }

    /// The alternatives at a step, in the direction packets cross them there.
    pub fn at_step(&self, step: Step) -> Vec<HopKey> {
        let n = self.stages.len();
        let (stage, outbound) = match step {
            s if s < n => (s, true),
            s if s < 2 * n => (2 * n - 1 - s, false),
            _ => return Vec::new(),
        };
        self.stages[stage]
            .hops
            .iter()
            .map(|hop| HopKey { ifindex: hop.ifindex, direction: if outbound { hop.from_pod } else { hop.from_pod.opposite() } })
            .collect()
    }

    /// The step after `step` on the same way (out or back), if any: the turn from request to
    /// reply is not a hop.
    pub fn next_on_same_way(&self, step: Step) -> Option<Step> {
        let n = self.stages.len();
        let next = step + 1;
        ((step < n) == (next < n) && next < 2 * n).then_some(next)
    }

    /// "cni0 egress"; alternatives joined by "or".
    pub fn label(&self, keys: &[HopKey]) -> Option<String> {
        let labels: Vec<String> =
            keys.iter().filter_map(|key| self.hop(key.ifindex).map(|hop| format!("{} {}", hop.ifname, key.direction))).collect();
        (!labels.is_empty()).then(|| labels.join(" or "))
    }

    pub fn has_kind(&self, kind: HopKind) -> bool {
        self.hops().any(|hop| hop.kind == kind)
    }

    /// The UDP ports the kernel programs and the userspace parse treat as VXLAN: those of
    /// the path's VXLAN devices, then flannel's 8472 and IANA's 4789 (Calico's) while slots
    /// remain, which a remote pod's tunnel may use too.
    pub fn vxlan_ports(&self) -> [u16; 2] {
        let mut ports: Vec<u16> = Vec::new();
        for port in self.hops().filter_map(|hop| hop.vxlan_port).chain([8472, 4789]) {
            if !ports.contains(&port) {
                ports.push(port);
            }
        }
        [ports[0], ports[1]]
    }

    /// Whether `ifindex` is a wire-side device (NIC, bond, bond slave) of this path.
    pub fn is_underlay(&self, ifindex: u32) -> bool {
        self.hop(ifindex).is_some_and(|hop| hop.kind.is_underlay())
    }

    /// The path as printed before tracing starts.
    pub fn describe(&self) -> String {
        let mut text = format!("podtrace: path of {} ({}):\n", self.pod_ip, self.locality);
        for hop in self.hops() {
            text.push_str(&format!(
                "  {:<16} {:<10} ifindex {:<4} mtu {:<5} from-pod {}",
                hop.ifname,
                hop.kind.to_string(),
                hop.ifindex,
                hop.mtu,
                hop.from_pod
            ));
            if let Some(end) = &hop.pod_end {
                text.push_str(&format!("  (pod side: {} mtu {})", end.ifname, end.mtu));
            }
            text.push('\n');
        }
        for note in &self.notes {
            text.push_str(&format!("  note: {note}\n"));
        }
        text
    }
}

#[cfg(test)]
pub(crate) mod fixtures {
    //! Paths for unit tests across the crate.

    use super::*;

    pub fn hop(name: &str, ifindex: u32, kind: HopKind, from_pod: Direction) -> Hop {
        Hop {
            ifname: name.into(),
            ifindex,
            kind,
            mtu: 1450,
            no_mac_header: false,
            from_pod,
            underlay: None,
            vxlan_local: None,
            vxlan_port: None,
            addresses: vec![],
            bond: None,
            slave: None,
            pod_end: None,
            bridge_netfilter: None,
            hairpin: None,
        }
    }

    pub fn path(stages: Vec<Vec<Hop>>) -> Path {
        let pod_ip: IpAddr = "10.244.0.2".parse().unwrap();
        let first = &stages[0][0];
        let entries = vec![Entry { pod_ip, hop: HopKey { ifindex: first.ifindex, direction: first.from_pod } }];
        Path {
            pod_ip,
            locality: Locality::Local,
            stages: stages.into_iter().map(|hops| Stage { hops }).collect(),
            entries,
            pod_netnsids: vec![],
            warnings: vec![],
            notes: vec![],
        }
    }

    /// veth1 (5), cni0 (4), flannel.1 (3, MTU 1450), eth0 (2, MTU 1500): pod A on node A.
    pub fn local_path() -> Path {
        let mut eth0 = hop("eth0", 2, HopKind::Nic, Direction::Egress);
        eth0.mtu = 1500;
        eth0.addresses = vec![("10.99.0.1".parse().unwrap(), 24)];
        let mut flannel = hop("flannel.1", 3, HopKind::Vxlan, Direction::Egress);
        flannel.underlay = Some(2);
        flannel.vxlan_local = Some("10.99.0.1".parse().unwrap());
        path(vec![
            vec![hop("veth1", 5, HopKind::PodVeth, Direction::Ingress)],
            vec![hop("cni0", 4, HopKind::Bridge, Direction::Ingress)],
            vec![flannel],
            vec![eth0],
        ])
    }

    /// The local path with a bond (6) and its slaves eth0 (2) and eth1 (7) as the underlay.
    pub fn bonded_path() -> Path {
        let mut path = local_path();
        let mut bond = hop("bond0", 6, HopKind::Bond, Direction::Egress);
        bond.mtu = 1500;
        let slave = |name: &str, ifindex| {
            let mut slave = hop(name, ifindex, HopKind::BondSlave, Direction::Egress);
            slave.mtu = 1500;
            slave
        };
        path.stages.truncate(3);
        path.stages[2].hops[0].underlay = Some(6);
        path.stages.push(Stage { hops: vec![bond] });
        path.stages.push(Stage { hops: vec![slave("eth0", 2), slave("eth1", 7)] });
        path
    }

    pub fn key(ifindex: u32, direction: Direction) -> HopKey {
        HopKey { ifindex, direction }
    }
}

#[cfg(test)]
mod tests {
    use super::{fixtures::*, *};

    #[test]
    fn travel_order_is_out_then_back_in_reverse() {
        let path = local_path();
        let order: Vec<_> = path.travel_order().into_iter().map(|(hop, d)| format!("{}:{d}", hop.ifname)).collect();
        assert_eq!(
            order,
            [
                "veth1:ingress",
                "cni0:ingress",
                "flannel.1:egress",
                "eth0:egress",
                "eth0:ingress",
                "flannel.1:ingress",
                "cni0:egress",
                "veth1:egress"
            ]
        );
    }

    #[test]
    fn alternatives_share_a_step() {
        let path = bonded_path();
        let out = path.step_of(key(2, Direction::Egress)).unwrap();
        assert_eq!(path.step_of(key(7, Direction::Egress)), Some(out));
        assert_eq!(path.at_step(out), [key(2, Direction::Egress), key(7, Direction::Egress)]);
        // The way back starts at the same stage, in the other direction.
        assert_eq!(path.at_step(out + 1), [key(2, Direction::Ingress), key(7, Direction::Ingress)]);
        assert_eq!(path.label(&path.at_step(out)).unwrap(), "eth0 egress or eth1 egress");
    }

    #[test]
    fn the_next_step_stays_on_the_same_way() {
        let path = local_path();
        let cni0 = path.step_of(key(4, Direction::Ingress)).unwrap();
        assert_eq!(path.at_step(path.next_on_same_way(cni0).unwrap()), [key(3, Direction::Egress)]);
        // eth0 egress is the last hop out: the reply's eth0 ingress is not "next".
        assert_eq!(path.next_on_same_way(path.step_of(key(2, Direction::Egress)).unwrap()), None);
        assert_eq!(path.next_on_same_way(path.step_of(key(5, Direction::Egress)).unwrap()), None);
        let back = path.step_of(key(2, Direction::Ingress)).unwrap();
        assert_eq!(path.at_step(path.next_on_same_way(back).unwrap()), [key(3, Direction::Ingress)]);
    }

    #[test]
    fn each_followed_ip_has_its_entry() {
        let mut path = local_path();
        let second: IpAddr = "10.244.0.3".parse().unwrap();
        path.stages[0].hops.push(hop("veth2", 8, HopKind::PodVeth, Direction::Ingress));
        path.entries.push(Entry { pod_ip: second, hop: key(8, Direction::Ingress) });
        assert_eq!(path.entry(second), key(8, Direction::Ingress));
        assert_eq!(path.entry(path.pod_ip), key(5, Direction::Ingress));
        assert_eq!(path.entry("10.1.1.1".parse().unwrap()), key(5, Direction::Ingress));
        assert_eq!(path.exit(second), key(8, Direction::Egress));
        assert!(path.is_underlay(2) && !path.is_underlay(3));
    }

    #[test]
    fn the_vxlan_ports_are_the_devices_own_then_the_usual_ones() {
        let mut path = local_path();
        assert_eq!(path.vxlan_ports(), [8472, 4789], "no port read");
        path.stages[2].hops[0].vxlan_port = Some(4789);
        assert_eq!(path.vxlan_ports(), [4789, 8472], "vxlan.calico's");
        path.stages[2].hops[0].vxlan_port = Some(9999);
        assert_eq!(path.vxlan_ports(), [9999, 8472], "a port of its own");
    }
}
