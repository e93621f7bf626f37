//! The built-in lab: a two-node flannel-VXLAN cluster in network namespaces. Pods are made by
//! the real CNI plugins (`bridge`, `host-local`, `loopback`) run inside the node's namespace,
//! as kubelet's runtime makes them; `flannel.1` is programmed by hand the way flanneld programs
//! it (Debian ships no flanneld). Cluster DNS is dnsmasq in a pod on node B behind a Service
//! written the way kube-proxy's iptables mode writes it. A dual-stack lab
//! (`LabSpec::dual_stack`) adds IPv6 the way kube-flannel with `EnableIPv6` does: an IPv6
//! underlay, `flannel-v6.1`, and a second (IPv6) range in the bridge plugin's configuration.
//! An external lab (`LabSpec::external`) adds a host outside the cluster, routed through the
//! switch, and the masquerade rules flanneld writes (`ipMasq`), so pods reach it source-NATed
//! to their node's address.
//! A Calico lab (`LabSpec::cni`) builds each node as Calico's felix and CNI plugin do instead:
//! routed pods without a bridge, and `tunl0` (IPIP) or `vxlan.calico` between the nodes.
//!
//! Everything is created inside namespaces the lab owns (`ip -n NS link add … netns OTHER`),
//! so nothing touches the root namespace and interface names repeat per node as on real
//! nodes. Dropping a `Lab` runs CNI DEL for every pod and deletes every namespace it made,
//! also when a test panics.

use std::{
    fs::File,
    net::{Ipv4Addr, Ipv6Addr, SocketAddrV4},
    path::PathBuf,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{
    cni::{self, BridgeNetwork, Sandbox},
    kube_proxy::{self, ServicePort},
};

/// The cluster DNS Service's IP (kube-dns' usual ClusterIP).
pub const DNS_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// The name cluster DNS answers for, and its answer (the `kubernetes` Service's ClusterIP).
pub const KUBERNETES_SERVICE_NAME: &str = "kubernetes.default.svc.cluster.local";
pub const KUBERNETES_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 1);
/// Per-instance state (host-local's leases, dnsmasq's log) lives in `STATE_DIR/<prefix>`.
pub const STATE_DIR: &str = "/run/podtrace-lab";

/// The pod network the lab's nodes run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cni {
    /// flannel's VXLAN backend: pods behind `cni0` (the bridge plugin), `flannel.1`.
    Flannel,
    /// Calico in IPIP mode: routed pods on `cali…` veths, `tunl0` between the nodes. Needs the
    /// ipip module (`ipip_available`).
    CalicoIpip,
    /// Calico in VXLAN mode: routed pods on `cali…` veths, `vxlan.calico` (UDP 4789).
    CalicoVxlan,
}

impl Cni {
    pub fn is_calico(self) -> bool {
        self != Self::Flannel
    }
}

/// Whether this kernel has IPIP (the ipip module, loaded here if it is not yet): Calico's IPIP
/// mode needs it. Loading it makes a fallback `tunl0` in every network namespace.
pub fn ipip_available() -> bool {
    let _ = Command::new("modprobe").args(["-q", "ipip"]).stderr(Stdio::null()).status();
    std::path::Path::new("/sys/module/ipip").exists()
}

/// What to build; `Default` is a healthy lab.
#[derive(Clone, Debug)]
pub struct LabSpec {
    /// The pod network: flannel (the default) or Calico in IPIP or VXLAN mode.
    pub cni: Cni,
    /// Namespace name prefix, unique per instance (see `unique_prefix`).
    pub prefix: String,
    pub underlay_mtu_a: u32,
    pub underlay_mtu_b: u32,
    /// The `mtu` of the bridge plugin's configuration: pod eth0, its host-side veth and cni0;
    /// for Calico, the pod's eth0 and its `cali…` veth.
    pub pod_mtu: u32,
    /// The tunnel's MTU: `flannel.1`, `vxlan.calico` or `tunl0`.
    pub vxlan_mtu: u32,
    /// With `CalicoIpip`: node A's `tunl0` MTU when it differs from `vxlan_mtu` (a node whose
    /// tunnel disagrees with the pods').
    pub tunnel_mtu_a: Option<u32>,
    pub pods_per_node: usize,
    /// Make node A's underlay `bond0` in this mode (e.g. `active-backup`, `balance-xor`)
    /// over two links, `eth0` and `eth1`. Needs the bonding module.
    pub bond_a: Option<String>,
    /// With `bond_a`: its `miimon` (0 turns MII monitoring off) and `xmit_hash_policy`.
    pub bond_a_miimon: u32,
    pub bond_a_xmit_hash_policy: String,
    /// With `bond_a`: the switch speaks LACP, each of its ports to node A a port-channel of
    /// its own, as two switches that are not stacked: the bond's slaves see two partners.
    pub bond_a_partner_per_port: bool,
    /// IPv6 beside IPv4, as kube-flannel with `EnableIPv6` makes it: node IPv6 addresses on
    /// the underlay, `flannel-v6.1` over them (created with `vxlan_mtu`, which the kernel caps
    /// at the underlay's MTU minus 70), and pods with an address from each family's range.
    pub dual_stack: bool,
    /// A host outside the cluster (`EXTERNAL_IP`, in a namespace of its own) that node A
    /// reaches through a router on the underlay (the switch), and on each node the masquerade
    /// rules flanneld writes with `ipMasq`: pods reach the host source-NATed to the node's
    /// address.
    pub external: bool,
}

/// The external host's address: TEST-NET-3, outside the cluster and the underlay.
pub const EXTERNAL_IP: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
/// The switch's addresses as the router between the underlay and the external host.
const UNDERLAY_ROUTER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 254);
const EXTERNAL_ROUTER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
/// The cluster's pod network (flannel's `Network`).
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";

impl Default for LabSpec {
    fn default() -> Self {
        Self {
            cni: Cni::Flannel,
            prefix: unique_prefix("lab"),
            underlay_mtu_a: 1500,
            underlay_mtu_b: 1500,
            pod_mtu: 1450,
            vxlan_mtu: 1450,
            pods_per_node: 1,
            bond_a: None,
            bond_a_miimon: 100,
            bond_a_xmit_hash_policy: "layer3+4".into(),
            bond_a_partner_per_port: false,
            dual_stack: false,
            external: false,
            tunnel_mtu_a: None,
        }
    }
}

impl LabSpec {
    /// A healthy Calico lab in `cni`'s mode, with the MTUs Calico picks over a 1500-byte
    /// underlay: the underlay's minus 20 for IPIP, minus 50 for VXLAN, on the tunnel and the
    /// pods alike.
    pub fn calico(cni: Cni, tag: &str) -> Self {
        let mtu = if cni == Cni::CalicoIpip { 1480 } else { 1450 };
        Self { cni, prefix: unique_prefix(tag), pod_mtu: mtu, vxlan_mtu: mtu, ..Self::default() }
    }
}

#[derive(Clone, Debug)]
pub struct Pod {
    pub netns: String,
    pub ip: Ipv4Addr,
    /// On a dual-stack lab, the pod's IPv6 address.
    pub ip6: Option<Ipv6Addr>,
    /// The pod's veth end in the node namespace.
    pub host_veth: String,
}

#[derive(Clone, Debug)]
pub struct Node {
    pub netns: String,
    /// Underlay address (on `eth0`).
    pub ip: Ipv4Addr,
    pub underlay: String,
    /// `cni0`; empty for Calico, which bridges nothing.
    pub bridge: String,
    /// The tunnel: `flannel.1`, `tunl0` or `vxlan.calico`.
    pub vxlan: String,
    pub vtep_mac: String,
    /// The node's pod subnet (flannel's /24) or block (Calico's /26).
    pub pod_cidr: String,
    /// What a new pod pings so the node learns it: cni0's address; for Calico the node's own
    /// (its pods' gateway, 169.254.1.1, exists only as proxy ARP's answer).
    pub gateway: Ipv4Addr,
    pub pods: Vec<Pod>,
    /// On a dual-stack lab, the node's IPv6 side.
    pub ipv6: Option<NodeIpv6>,
}

/// A node's IPv6 side, as kube-flannel with `EnableIPv6` programs it beside the IPv4 one.
#[derive(Clone, Debug)]
pub struct NodeIpv6 {
    /// Underlay address, on the underlay beside the IPv4 one.
    pub ip: Ipv6Addr,
    /// `flannel-v6.1`.
    pub vxlan: String,
    pub vtep_mac: String,
    /// The IPv6 pod subnet, e.g. `fd00:10:244::/64`.
    pub pod_cidr: String,
    /// flannel-v6.1's own address (a /128): the subnet's first address. Peers route the subnet
    /// through it.
    pub vtep_ip: Ipv6Addr,
    /// cni0's IPv6 address from the bridge plugin: the subnet's first host address.
    pub gateway: Ipv6Addr,
}

pub struct Lab {
    pub prefix: String,
    pub cni: Cni,
    pub switch_ns: String,
    pub nodes: [Node; 2],
    /// The cluster DNS pod (dnsmasq) on node B, once made.
    dns: Option<Pod>,
    /// The host outside the cluster's namespace, on an external lab.
    pub external: Option<String>,
    /// Namespaces created so far, deleted on drop.
    created: Vec<String>,
    /// Pods the CNI plugins were called for, each deleted with CNI DEL on drop.
    sandboxes: Vec<(Sandbox, BridgeNetwork)>,
    dns_server: Option<Child>,
    state_dir: PathBuf,
    keep: bool,
}

static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// A short prefix unique to this process and call: `tag` (up to 4 chars) + pid + counter.
pub fn unique_prefix(tag: &str) -> String {
    let tag: String = tag.chars().filter(|c| c.is_ascii_alphanumeric()).take(4).collect::<String>().to_lowercase();
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    format!("{tag}{}{id}", std::process::id() % 100_000)
}

/// Runs a command and fails with its stderr when it fails.
pub fn run(args: &[&str]) -> Result<Output> {
    let output =
        Command::new(args[0]).args(&args[1..]).stdin(Stdio::null()).output().with_context(|| format!("running {}", args.join(" ")))?;
    if !output.status.success() {
        bail!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(output)
}

impl Lab {
    pub fn up(spec: LabSpec) -> Result<Self> {
        let p = spec.prefix.clone();
        let calico = spec.cni.is_calico();
        let node = |suffix: &str, index: u8| Node {
            netns: format!("{p}-{suffix}"),
            ip: Ipv4Addr::new(10, 99, 0, index + 1),
            underlay: if index == 0 && spec.bond_a.is_some() { "bond0".into() } else { "eth0".into() },
            bridge: if calico { String::new() } else { cni::BRIDGE.into() },
            vxlan: match spec.cni {
                Cni::Flannel => "flannel.1".into(),
                Cni::CalicoIpip => "tunl0".into(),
                Cni::CalicoVxlan => "vxlan.calico".into(),
            },
            // felix picks a random MAC for vxlan.calico; flanneld too for flannel.1.
            vtep_mac: format!("{}:00:00:00:0{}:01", if calico { "66" } else { "0e" }, index + 1),
            pod_cidr: if calico { format!("10.244.{index}.0/26") } else { format!("10.244.{index}.0/24") },
            // What the bridge plugin gives cni0 with isGateway: the subnet's first address.
            gateway: if calico { Ipv4Addr::new(10, 99, 0, index + 1) } else { Ipv4Addr::new(10, 244, index, 1) },
            // Filled in as the plugin makes them.
            pods: Vec::new(),
            ipv6: spec.dual_stack.then(|| NodeIpv6 {
                ip: Ipv6Addr::new(0xfd00, 0x99, 0, 0, 0, 0, 0, u16::from(index) + 1),
                vxlan: "flannel-v6.1".into(),
                vtep_mac: format!("0e:00:00:00:0{}:02", index + 1),
                pod_cidr: format!("fd00:10:244:{index}::/64"),
                vtep_ip: Ipv6Addr::new(0xfd00, 0x10, 0x244, u16::from(index), 0, 0, 0, 0),
                gateway: Ipv6Addr::new(0xfd00, 0x10, 0x244, u16::from(index), 0, 0, 0, 1),
            }),
        };
        let mut lab = Self {
            prefix: p.clone(),
            cni: spec.cni,
            switch_ns: format!("{p}-sw"),
            nodes: [node("a", 0), node("b", 1)],
            dns: None,
            external: None,
            created: Vec::new(),
            sandboxes: Vec::new(),
            dns_server: None,
            state_dir: PathBuf::from(STATE_DIR).join(&p),
            keep: false,
        };
        // On failure the partly built lab is dropped, which deletes what was created.
        lab.build(&spec)?;
        Ok(lab)
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        // A leftover from a killed run would make `ip netns add` fail.
        let _ = run(&["ip", "netns", "del", name]);
        run(&["ip", "netns", "add", name])?;
        self.created.push(name.to_string());
        Ok(())
    }

    /// A pod as the runtime makes it: a namespace, then CNI ADD of loopback and bridge in the
    /// node's namespace.
    fn add_pod(&mut self, node_index: usize, netns: String, network: &BridgeNetwork) -> Result<Pod> {
        self.add_netns(&netns)?;
        let node_netns = self.nodes[node_index].netns.clone();
        let sandbox = Sandbox { node_netns: node_netns.clone(), pod_netns: netns.clone() };
        // Recorded before ADD: the runtime also DELs a pod whose ADD failed halfway.
        self.sandboxes.push((sandbox.clone(), network.clone()));
        let attachment = cni::add(&sandbox, network)?;
        // The plugin leaves offloads on; the MTU labs need both veth ends to behave as a wire.
        wire_like(&node_netns, &attachment.host_veth)?;
        wire_like(&netns, "eth0")?;
        Ok(Pod { netns, ip: attachment.ip, ip6: attachment.ip6, host_veth: attachment.host_veth })
    }

    fn build(&mut self, spec: &LabSpec) -> Result<()> {
        // Leases left by a killed run with this prefix would shift every pod's address.
        let _ = std::fs::remove_dir_all(&self.state_dir);
        std::fs::create_dir_all(&self.state_dir).with_context(|| format!("creating {}", self.state_dir.display()))?;
        let sw = self.switch_ns.clone();
        self.add_netns(&sw)?;
        run(&["ip", "-n", &sw, "link", "set", "lo", "up"])?;
        run(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        let nodes = self.nodes.clone();
        for (index, node) in nodes.iter().enumerate() {
            let ns = node.netns.as_str();
            self.add_netns(ns)?;
            run(&["ip", "-n", ns, "link", "set", "lo", "up"])?;
            let mtu = if index == 0 { spec.underlay_mtu_a } else { spec.underlay_mtu_b }.to_string();
            let bond_mode = if index == 0 { spec.bond_a.as_deref() } else { None };
            let links: &[&str] = if bond_mode.is_some() { &["eth0", "eth1"] } else { &["eth0"] };
            for (link, ifname) in links.iter().enumerate() {
                let port = format!("port{index}{link}");
                run(&["ip", "-n", ns, "link", "add", ifname, "type", "veth", "peer", "name", &port, "netns", &sw])?;
                if bond_mode.is_some() && spec.bond_a_partner_per_port {
                    let channel = format!("lacp{link}");
                    run(&[
                        "ip",
                        "-n",
                        &sw,
                        "link",
                        "add",
                        &channel,
                        "type",
                        "bond",
                        "mode",
                        "802.3ad",
                        "lacp_rate",
                        "fast",
                        "miimon",
                        "100",
                    ])?;
                    run(&["ip", "-n", &sw, "link", "set", &port, "master", &channel])?;
                    run(&["ip", "-n", &sw, "link", "set", &channel, "master", "br0", "up"])?;
                    run(&["ip", "-n", &sw, "link", "set", &port, "up"])?;
                } else {
                    run(&["ip", "-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
                }
                wire_like(ns, ifname)?;
                wire_like(&sw, &port)?;
            }
            if let Some(mode) = bond_mode {
                run(&[
                    "ip",
                    "-n",
                    ns,
                    "link",
                    "add",
                    "bond0",
                    "type",
                    "bond",
                    "mode",
                    mode,
                    "miimon",
                    &spec.bond_a_miimon.to_string(),
                    "xmit_hash_policy",
                    &spec.bond_a_xmit_hash_policy,
                ])?;
                for ifname in links {
                    run(&["ip", "-n", ns, "link", "set", ifname, "master", "bond0"])?;
                    run(&["ip", "-n", ns, "link", "set", ifname, "up"])?;
                }
            }
            let underlay = node.underlay.as_str();
            run(&["ip", "-n", ns, "link", "set", underlay, "up"])?;
            run(&["ip", "-n", ns, "addr", "add", &format!("{}/24", node.ip), "dev", underlay])?;
            run(&["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
            if let Some(v6) = &node.ipv6 {
                // nodad: the lab's addresses are unique by construction; DAD would only delay.
                run(&["ip", "-n", ns, "addr", "add", &format!("{}/64", v6.ip), "dev", underlay, "nodad"])?;
                run(&["ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1"])?;
            }

            if spec.cni.is_calico() {
                self.calico_tunnel(spec, index)?;
            } else {
                Self::flannel_tunnel(spec, node, index)?;
            }
            // Set after the tunnel exists: the kernel refuses a VXLAN device that cannot fit
            // its underlay, but not an underlay lowered later, which is how nodes get there.
            run(&["ip", "-n", ns, "link", "set", underlay, "mtu", &mtu])?;

            if spec.cni.is_calico() {
                self.calico_pods(spec, index)?;
            } else {
                self.bridge_pods(spec, index)?;
            }
        }
        if spec.cni.is_calico() {
            self.calico_routes()?;
        } else {
            flannel_routes(&nodes)?;
        }
        let dns = self.dns_pod().clone();
        // kube-proxy runs on every node and writes every Service there.
        for node in &nodes {
            kube_proxy::load(&node.netns, &dns_service(dns.ip))?;
        }
        // As on a real node, the node learns each pod's MAC when the pod first talks.
        for (node, pod) in self.nodes.iter().flat_map(|node| node.pods.iter().map(move |pod| (node, pod))).chain([(&self.nodes[1], &dns)]) {
            run(&["ip", "netns", "exec", &pod.netns, "ping", "-c", "1", "-W", "2", &node.gateway.to_string()])
                .with_context(|| format!("pod {} cannot reach its gateway", pod.ip))?;
            if let (Some(v6), Some(ip6)) = (&node.ipv6, pod.ip6) {
                // Up to 10 s for one reply: cni0's address may still be in duplicate address
                // detection, which the bridge plugin leaves on.
                run(&["ip", "netns", "exec", &pod.netns, "ping", "-c", "1", "-w", "10", &v6.gateway.to_string()])
                    .with_context(|| format!("pod {ip6} cannot reach its gateway"))?;
            }
        }
        if spec.external {
            self.add_external()?;
        }
        self.start_dns_server(&dns)
    }

    /// The host outside the cluster: a namespace behind the switch, which routes between it
    /// and the underlay as a site's router does; node A's default route through that router;
    /// and flanneld's masquerade rules on each node.
    fn add_external(&mut self) -> Result<()> {
        let sw = self.switch_ns.clone();
        let ext = format!("{}-ext", self.prefix);
        self.add_netns(&ext)?;
        run(&["ip", "-n", &sw, "addr", "add", &format!("{UNDERLAY_ROUTER}/24"), "dev", "br0"])?;
        run(&["ip", "netns", "exec", &sw, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        run(&["ip", "-n", &sw, "link", "add", "ext0", "type", "veth", "peer", "name", "eth0", "netns", &ext])?;
        run(&["ip", "-n", &sw, "addr", "add", &format!("{EXTERNAL_ROUTER}/24"), "dev", "ext0"])?;
        run(&["ip", "-n", &sw, "link", "set", "ext0", "up"])?;
        run(&["ip", "-n", &ext, "link", "set", "lo", "up"])?;
        run(&["ip", "-n", &ext, "addr", "add", &format!("{EXTERNAL_IP}/24"), "dev", "eth0"])?;
        run(&["ip", "-n", &ext, "link", "set", "eth0", "up"])?;
        run(&["ip", "-n", &ext, "route", "add", "default", "via", &EXTERNAL_ROUTER.to_string()])?;
        wire_like(&sw, "ext0")?;
        wire_like(&ext, "eth0")?;
        let node_a = self.nodes[0].clone();
        // Replaced: a Calico node has that default route already.
        run(&["ip", "-n", &node_a.netns, "route", "replace", "default", "via", &UNDERLAY_ROUTER.to_string(), "dev", &node_a.underlay])?;
        for node in &self.nodes {
            flannel_masquerade(&node.netns, &node.pod_cidr)?;
        }
        self.external = Some(ext);
        Ok(())
    }

    /// `flannel.1` (and `flannel-v6.1` on a dual-stack lab) as flanneld's VXLAN backend makes it.
    fn flannel_tunnel(spec: &LabSpec, node: &Node, index: usize) -> Result<()> {
        let (ns, underlay) = (node.netns.as_str(), node.underlay.as_str());
        let local = node.ip.to_string();
        run(&[
            "ip",
            "-n",
            ns,
            "link",
            "add",
            "flannel.1",
            "type",
            "vxlan",
            "id",
            "1",
            "dstport",
            "8472",
            "local",
            &local,
            "dev",
            underlay,
            "nolearning",
        ])?;
        run(&["ip", "-n", ns, "link", "set", "flannel.1", "address", &node.vtep_mac])?;
        run(&["ip", "-n", ns, "link", "set", "flannel.1", "mtu", &spec.vxlan_mtu.to_string(), "up"])?;
        let vtep_ip = format!("10.244.{index}.0/32");
        run(&["ip", "-n", ns, "addr", "add", &vtep_ip, "dev", "flannel.1"])?;
        if let Some(v6) = &node.ipv6 {
            // flanneld asks for the same MTU as flannel.1's; created over an IPv6 underlay,
            // the kernel caps it at the underlay's MTU minus 70.
            let local = v6.ip.to_string();
            let mtu = spec.vxlan_mtu.to_string();
            run(&[
                "ip",
                "-n",
                ns,
                "link",
                "add",
                &v6.vxlan,
                "address",
                &v6.vtep_mac,
                "mtu",
                &mtu,
                "type",
                "vxlan",
                "id",
                "1",
                "dstport",
                "8472",
                "local",
                &local,
                "dev",
                underlay,
                "nolearning",
            ])?;
            run(&["ip", "-n", ns, "link", "set", &v6.vxlan, "up"])?;
            run(&["ip", "-n", ns, "addr", "add", &format!("{}/128", v6.vtep_ip), "dev", &v6.vxlan, "nodad"])?;
        }
        Ok(())
    }

    /// The node's pods (and on node B the DNS pod), made by the bridge plugin.
    fn bridge_pods(&mut self, spec: &LabSpec, index: usize) -> Result<()> {
        let node = self.nodes[index].clone();
        let ns = node.netns.as_str();
        // The plugin creates cni0 (with its gateway address and a MAC of its own) on the
        // first ADD. host-local hands out .2, .3, … in the order pods are made. A pod MTU
        // above the tunnel's (the pod-mtu fault) is a configuration the plugin makes as
        // readily: a CNI config whose mtu disagrees with flannel's.
        let network = BridgeNetwork {
            subnet: node.pod_cidr.clone(),
            subnet6: node.ipv6.as_ref().map(|v6| v6.pod_cidr.clone()),
            mtu: spec.pod_mtu,
            data_dir: self.state_dir.join(ns),
        };
        for i in 0..spec.pods_per_node {
            let suffix = if index == 0 { "a" } else { "b" };
            let netns = if i == 0 { format!("{}-p{suffix}", self.prefix) } else { format!("{}-p{suffix}{}", self.prefix, i + 1) };
            let pod = self.add_pod(index, netns, &network)?;
            self.nodes[index].pods.push(pod);
        }
        if index == 1 {
            self.dns = Some(self.add_pod(index, format!("{}-dns", self.prefix), &network)?);
        }
        Ok(())
    }

    /// The node's tunnel as felix programs it: `tunl0` up with the node's tunnel address
    /// (the ipip module made it with the namespace), or `vxlan.calico` (VNI 4096, UDP 4789,
    /// bound to the node's address, no learning: felix writes every neighbour and fdb entry).
    /// Calico nodes have a default route, which proxy ARP needs to answer for 169.254.1.1;
    /// nothing in the lab is behind its gateway.
    fn calico_tunnel(&self, spec: &LabSpec, index: usize) -> Result<()> {
        let node = &self.nodes[index];
        let (ns, underlay) = (node.netns.as_str(), node.underlay.as_str());
        let mtu = match spec.tunnel_mtu_a {
            Some(mtu) if index == 0 => mtu,
            _ => spec.vxlan_mtu,
        }
        .to_string();
        let tunnel_ip = format!("{}/32", calico_tunnel_ip(index));
        if spec.cni == Cni::CalicoVxlan {
            let local = node.ip.to_string();
            run(&[
                "ip",
                "-n",
                ns,
                "link",
                "add",
                "vxlan.calico",
                "address",
                &node.vtep_mac,
                "type",
                "vxlan",
                "id",
                "4096",
                "dstport",
                "4789",
                "local",
                &local,
                "dev",
                underlay,
                "nolearning",
            ])?;
        }
        run(&["ip", "-n", ns, "link", "set", &node.vxlan, "mtu", &mtu, "up"])?;
        run(&["ip", "-n", ns, "addr", "add", &tunnel_ip, "dev", &node.vxlan])?;
        // Both tunnels merge what they decapsulate (GRO cells) unless told not to: the pod's
        // veth would then get super-packets that it splits after TC, as no wire does.
        wire_like(ns, &node.vxlan)?;
        run(&["ip", "-n", ns, "route", "add", "default", "via", &UNDERLAY_ROUTER.to_string(), "dev", underlay])?;
        Ok(())
    }

    /// The node's pods (and on node B the DNS pod) as Calico's CNI plugin makes them, with
    /// addresses from the node's block.
    fn calico_pods(&mut self, spec: &LabSpec, index: usize) -> Result<()> {
        let suffix = if index == 0 { "a" } else { "b" };
        for i in 0..spec.pods_per_node {
            let netns = if i == 0 { format!("{}-p{suffix}", self.prefix) } else { format!("{}-p{suffix}{}", self.prefix, i + 1) };
            let pod = self.add_calico_pod(index, netns, i, spec.pod_mtu)?;
            self.nodes[index].pods.push(pod);
        }
        if index == 1 {
            self.dns = Some(self.add_calico_pod(index, format!("{}-dns", self.prefix), spec.pods_per_node, spec.pod_mtu)?);
        }
        Ok(())
    }

    /// A routed pod, as Calico's CNI plugin makes it: a veth `cali<hash>` whose host side has
    /// no address, the MAC ee:ee:ee:ee:ee:ee and proxy ARP on, and a /32 route to the pod
    /// through it; the pod's eth0 with a /32 address, a link route to 169.254.1.1 and the
    /// default route through it (answered by the host side's proxy ARP).
    fn add_calico_pod(&mut self, node_index: usize, netns: String, ordinal: usize, mtu: u32) -> Result<Pod> {
        self.add_netns(&netns)?;
        let node_ns = self.nodes[node_index].netns.clone();
        let ip = Ipv4Addr::new(10, 244, node_index as u8, 2 + ordinal as u8);
        let host_veth = calico_veth_name(&netns);
        let mtu = mtu.to_string();
        run(&[
            "ip", "-n", &node_ns, "link", "add", &host_veth, "mtu", &mtu, "type", "veth", "peer", "name", "eth0", "mtu", &mtu, "netns",
            &netns,
        ])?;
        run(&["ip", "-n", &node_ns, "link", "set", &host_veth, "address", "ee:ee:ee:ee:ee:ee", "up"])?;
        for setting in [
            format!("net.ipv4.conf.{host_veth}.proxy_arp=1"),
            format!("net.ipv4.neigh.{host_veth}.proxy_delay=0"),
            format!("net.ipv4.conf.{host_veth}.rp_filter=1"),
        ] {
            run(&["ip", "netns", "exec", &node_ns, "sysctl", "-qw", &setting])?;
        }
        run(&["ip", "-n", &node_ns, "route", "add", &format!("{ip}/32"), "dev", &host_veth, "scope", "link"])?;
        run(&["ip", "-n", &netns, "link", "set", "lo", "up"])?;
        run(&["ip", "-n", &netns, "link", "set", "eth0", "up"])?;
        run(&["ip", "-n", &netns, "addr", "add", &format!("{ip}/32"), "dev", "eth0"])?;
        run(&["ip", "-n", &netns, "route", "add", "169.254.1.1", "dev", "eth0", "scope", "link"])?;
        run(&["ip", "-n", &netns, "route", "add", "default", "via", "169.254.1.1", "dev", "eth0"])?;
        wire_like(&node_ns, &host_veth)?;
        wire_like(&netns, "eth0")?;
        Ok(Pod { netns, ip, ip6: None, host_veth })
    }

    /// Each node reaches the other's block as felix programs it: through `tunl0` to the other
    /// node's address (`onlink`, as BIRD installs it), or through `vxlan.calico` to the other
    /// node's tunnel address with permanent neighbour and fdb entries; its own block is a
    /// blackhole route, as Calico's IPAM leaves it, for addresses no pod holds.
    fn calico_routes(&self) -> Result<()> {
        for (index, node) in self.nodes.iter().enumerate() {
            let peer = &self.nodes[1 - index];
            let ns = node.netns.as_str();
            run(&["ip", "-n", ns, "route", "add", "blackhole", &node.pod_cidr, "proto", RTPROT_BIRD])?;
            if self.cni == Cni::CalicoIpip {
                run(&[
                    "ip",
                    "-n",
                    ns,
                    "route",
                    "add",
                    &peer.pod_cidr,
                    "via",
                    &peer.ip.to_string(),
                    "dev",
                    "tunl0",
                    "onlink",
                    "proto",
                    RTPROT_BIRD,
                ])?;
                continue;
            }
            let peer_vtep = calico_tunnel_ip(1 - index).to_string();
            run(&["ip", "-n", ns, "route", "add", &peer.pod_cidr, "via", &peer_vtep, "dev", "vxlan.calico", "onlink"])?;
            run(&["ip", "-n", ns, "neigh", "add", &peer_vtep, "lladdr", &peer.vtep_mac, "dev", "vxlan.calico", "nud", "permanent"])?;
            run(&[
                "ip",
                "netns",
                "exec",
                ns,
                "bridge",
                "fdb",
                "append",
                &peer.vtep_mac,
                "dev",
                "vxlan.calico",
                "dst",
                &peer.ip.to_string(),
            ])?;
        }
        Ok(())
    }

    /// dnsmasq in the DNS pod, answering for the `kubernetes` Service's name. It stays in the
    /// foreground, a child of the lab, killed on teardown.
    fn start_dns_server(&mut self, dns: &Pod) -> Result<()> {
        let log_path = self.state_dir.join("dnsmasq.log");
        let log = File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let child = Command::new("ip")
            .args(["netns", "exec", &dns.netns, "dnsmasq", "--no-daemon", "--no-resolv", "--no-hosts", "--bind-interfaces"])
            .arg(format!("--address=/{KUBERNETES_SERVICE_NAME}/{KUBERNETES_SERVICE_IP}"))
            .arg(format!("--listen-address={}", dns.ip))
            // Stay root: the VM has no dnsmasq user or dip group to switch to.
            .args(["--user=root", "--group=root"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting dnsmasq")?;
        let dnsmasq = self.dns_server.insert(child);
        // dnsmasq's /proc/PID/net/{udp,tcp} (its namespace's sockets) show what it bound: the
        // address as the in-memory word in hex, then port 53.
        let local = format!("{:08X}:0035", u32::from_ne_bytes(dns.ip.octets()));
        for _ in 0..100 {
            if let Some(status) = dnsmasq.try_wait().context("waiting for dnsmasq")? {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("dnsmasq exited ({status}): {}", log.trim());
            }
            let pid = dnsmasq.id();
            let listening = ["udp", "tcp"]
                .iter()
                .all(|proto| std::fs::read_to_string(format!("/proc/{pid}/net/{proto}")).is_ok_and(|sockets| sockets.contains(&local)));
            if listening {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        bail!("dnsmasq did not listen on {}:53 within 10 s", dns.ip)
    }

    pub fn node_a(&self) -> &Node {
        &self.nodes[0]
    }

    pub fn node_b(&self) -> &Node {
        &self.nodes[1]
    }

    pub fn pod_a(&self) -> &Pod {
        &self.nodes[0].pods[0]
    }

    pub fn pod_b(&self) -> &Pod {
        &self.nodes[1].pods[0]
    }

    /// The cluster DNS pod on node B, behind `DNS_SERVICE_IP`.
    pub fn dns_pod(&self) -> &Pod {
        self.dns.as_ref().expect("Lab::up makes the DNS pod")
    }

    /// Keep the namespaces when the lab is dropped (`cargo xtask lab up`).
    pub fn keep(mut self) {
        self.keep = true;
    }

    /// Runs a command inside a namespace.
    pub fn run_in(&self, ns: &str, args: &[&str]) -> Result<Output> {
        let mut full = vec!["ip", "netns", "exec", ns];
        full.extend_from_slice(args);
        run(&full)
    }

    /// Starts a command inside a namespace; output is piped.
    pub fn spawn_in(&self, ns: &str, args: &[&str]) -> Result<Child> {
        Command::new("ip")
            .args(["netns", "exec", ns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} in {ns}", args.join(" ")))
    }

    // ---- faults --------------------------------------------------------------------------

    pub fn set_mtu(&self, ns: &str, ifname: &str, mtu: u32) -> Result<()> {
        run(&["ip", "-n", ns, "link", "set", ifname, "mtu", &mtu.to_string()]).map(drop)
    }

    pub fn add_address(&self, ns: &str, ifname: &str, cidr: &str) -> Result<()> {
        run(&["ip", "-n", ns, "addr", "add", cidr, "dev", ifname]).map(drop)
    }

    pub fn iptables(&self, ns: &str, args: &[&str]) -> Result<()> {
        let mut full = vec!["iptables", "-w"];
        full.extend_from_slice(args);
        self.run_in(ns, &full).map(drop)
    }

    pub fn link_set(&self, ns: &str, ifname: &str, up: bool) -> Result<()> {
        run(&["ip", "-n", ns, "link", "set", ifname, if up { "up" } else { "down" }]).map(drop)
    }

    /// Whether br_netfilter is loaded: its sysctls exist (not in the VM suite's initramfs).
    pub fn br_netfilter_loaded(&self, node: &Node) -> bool {
        self.run_in(&node.netns, &["test", "-e", "/proc/sys/net/bridge/bridge-nf-call-iptables"]).is_ok()
    }

    /// Sets `net.bridge.bridge-nf-call-iptables` in `node`'s namespace: whether frames its
    /// bridge forwards between ports pass through iptables. Changes nothing where br_netfilter
    /// is not loaded: there they never do.
    pub fn set_bridge_nf_call_iptables(&self, node: &Node, on: bool) -> Result<()> {
        if self.br_netfilter_loaded(node) {
            let setting = format!("net.bridge.bridge-nf-call-iptables={}", u8::from(on));
            self.run_in(&node.netns, &["sysctl", "-qw", &setting])?;
        }
        Ok(())
    }

    /// Turns hairpin mode of `pod`'s bridge port on `node` on or off: whether the bridge may
    /// send a frame back out the port it came in on.
    pub fn set_hairpin(&self, node: &Node, pod: &Pod, on: bool) -> Result<()> {
        let mode = if on { "on" } else { "off" };
        run(&["ip", "-n", &node.netns, "link", "set", &pod.host_veth, "type", "bridge_slave", "hairpin", mode]).map(drop)
    }

    pub fn route(&self, ns: &str, args: &[&str]) -> Result<()> {
        let mut full = vec!["ip", "-n", ns, "route"];
        full.extend_from_slice(args);
        run(&full).map(drop)
    }

    /// Rebinds a node's VXLAN device to another local address, as flanneld does when it
    /// picks a different address of the NIC.
    pub fn rebind_vxlan(&self, node: &Node, local: Ipv4Addr) -> Result<()> {
        let ns = node.netns.as_str();
        let mtu = read_mtu(ns, &node.vxlan)?;
        run(&["ip", "-n", ns, "link", "del", &node.vxlan])?;
        run(&[
            "ip",
            "-n",
            ns,
            "link",
            "add",
            &node.vxlan,
            "type",
            "vxlan",
            "id",
            "1",
            "dstport",
            "8472",
            "local",
            &local.to_string(),
            "dev",
            &node.underlay,
            "nolearning",
        ])?;
        run(&["ip", "-n", ns, "link", "set", &node.vxlan, "address", &node.vtep_mac])?;
        run(&["ip", "-n", ns, "link", "set", &node.vxlan, "mtu", &mtu.to_string(), "up"])?;
        let index = if node.netns == self.nodes[0].netns { 0 } else { 1 };
        let peer = &self.nodes[1 - index];
        let peer_vtep = format!("10.244.{}.0", 1 - index);
        run(&["ip", "-n", ns, "addr", "add", &format!("10.244.{index}.0/32"), "dev", &node.vxlan])?;
        run(&["ip", "-n", ns, "route", "add", &peer.pod_cidr, "via", &peer_vtep, "dev", &node.vxlan, "onlink"])?;
        run(&["ip", "-n", ns, "neigh", "add", &peer_vtep, "lladdr", &peer.vtep_mac, "dev", &node.vxlan, "nud", "permanent"])?;
        run(&["ip", "netns", "exec", ns, "bridge", "fdb", "append", &peer.vtep_mac, "dev", &node.vxlan, "dst", &peer.ip.to_string()])?;
        Ok(())
    }

    /// Deletes every pod and namespace now.
    pub fn down(mut self) {
        self.teardown();
    }

    /// As a node does: the DNS server stops, the runtime runs CNI DEL for each pod, and then
    /// the namespaces go. Failures are printed, not returned: this runs in `drop`.
    fn teardown(&mut self) {
        if let Some(mut dnsmasq) = self.dns_server.take() {
            let _ = dnsmasq.kill();
            let _ = dnsmasq.wait();
        }
        for (sandbox, network) in self.sandboxes.drain(..).rev() {
            if let Err(err) = cni::del(&sandbox, &network) {
                eprintln!("lab teardown: {err:#}");
            }
        }
        for ns in self.created.drain(..).rev() {
            delete_netns(&ns);
        }
        let _ = std::fs::remove_dir_all(&self.state_dir);
    }
}

/// The masquerade rules flanneld writes with `ipMasq` (its iptables traffic manager's
/// `MasqRules` for the node's subnet `pod_cidr` of `CLUSTER_CIDR`), in their order: traffic
/// kube-proxy marked for masquerading and traffic within the pod network keep their
/// addresses, pods' traffic to anywhere else but multicast is masqueraded, and so is the
/// host's traffic to the pod network. Loaded with `iptables-restore --noflush` as kube-proxy's
/// rules are, beside them.
fn flannel_masquerade(netns: &str, pod_cidr: &str) -> Result<()> {
    let comment = r#"-m comment --comment "flanneld masq""#;
    let rules = format!(
        "*nat\n\
         :FLANNEL-POSTRTG - [0:0]\n\
         -A POSTROUTING {comment} -j FLANNEL-POSTRTG\n\
         -A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {comment} -j RETURN\n\
         -A FLANNEL-POSTRTG -s {pod_cidr} -d {CLUSTER_CIDR} {comment} -j RETURN\n\
         -A FLANNEL-POSTRTG -s {CLUSTER_CIDR} -d {pod_cidr} {comment} -j RETURN\n\
         -A FLANNEL-POSTRTG ! -s {CLUSTER_CIDR} -d {pod_cidr} {comment} -j RETURN\n\
         -A FLANNEL-POSTRTG -s {CLUSTER_CIDR} ! -d 224.0.0.0/4 {comment} -j MASQUERADE --random-fully\n\
         -A FLANNEL-POSTRTG ! -s {CLUSTER_CIDR} -d {CLUSTER_CIDR} {comment} -j MASQUERADE --random-fully\n\
         COMMIT\n"
    );
    kube_proxy::restore(netns, &rules)
}

/// Each node reaches the other's pod subnet through its VTEP, as flanneld programs it.
fn flannel_routes(nodes: &[Node; 2]) -> Result<()> {
    for (index, node) in nodes.iter().enumerate() {
        let peer = &nodes[1 - index];
        let ns = node.netns.as_str();
        let peer_vtep = format!("10.244.{}.0", 1 - index);
        run(&["ip", "-n", ns, "route", "add", &peer.pod_cidr, "via", &peer_vtep, "dev", "flannel.1", "onlink"])?;
        run(&["ip", "-n", ns, "neigh", "add", &peer_vtep, "lladdr", &peer.vtep_mac, "dev", "flannel.1", "nud", "permanent"])?;
        run(&["ip", "netns", "exec", ns, "bridge", "fdb", "append", &peer.vtep_mac, "dev", "flannel.1", "dst", &peer.ip.to_string()])?;
        if let (Some(v6), Some(peer6)) = (&node.ipv6, &peer.ipv6) {
            let peer_vtep = peer6.vtep_ip.to_string();
            run(&["ip", "-n", ns, "-6", "route", "add", &peer6.pod_cidr, "via", &peer_vtep, "dev", &v6.vxlan, "onlink"])?;
            run(&["ip", "-n", ns, "-6", "neigh", "add", &peer_vtep, "lladdr", &peer6.vtep_mac, "dev", &v6.vxlan, "nud", "permanent"])?;
            let peer_ip = peer6.ip.to_string();
            run(&["ip", "netns", "exec", ns, "bridge", "fdb", "append", &peer6.vtep_mac, "dev", &v6.vxlan, "dst", &peer_ip])?;
        }
    }
    Ok(())
}

/// The routing protocol number BIRD installs Calico's routes with ("bird" in iproute2's
/// rt_protos, which the VM suite's initramfs does not carry).
const RTPROT_BIRD: &str = "12";

/// A node's Calico tunnel address: its block's first host address.
fn calico_tunnel_ip(node_index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, node_index as u8, 1)
}

/// `cali` and 11 hex digits of a hash of the pod, as Calico's CNI plugin names a pod's
/// host-side veth (from its workload endpoint).
fn calico_veth_name(pod_netns: &str) -> String {
    use std::hash::{Hash as _, Hasher as _};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    pod_netns.hash(&mut hasher);
    format!("cali{:011x}", hasher.finish() & 0xfff_ffff_ffff)
}

/// The kube-dns Service's ports, each with the DNS pod as its endpoint.
fn dns_service(endpoint: Ipv4Addr) -> [ServicePort<'static>; 2] {
    let port = |name, protocol| ServicePort {
        name,
        protocol,
        cluster_ip: DNS_SERVICE_IP,
        port: 53,
        node_port: None,
        endpoint: SocketAddrV4::new(endpoint, 53),
    };
    [port("kube-system/kube-dns:dns", "udp"), port("kube-system/kube-dns:dns-tcp", "tcp")]
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.keep {
            self.teardown();
        }
    }
}

/// Kills what still runs in the namespace, then deletes it.
pub fn delete_netns(ns: &str) {
    if let Ok(output) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for pid in String::from_utf8_lossy(&output.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: plain syscall.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
}

/// Deletes every namespace whose name starts with `prefix-` (`cargo xtask lab down`), and the
/// instance's state. Deleting a pod's namespace deletes its veth; host-local's leases go with
/// the state directory.
pub fn delete_prefix(prefix: &str) -> Result<Vec<String>> {
    let _ = std::fs::remove_dir_all(PathBuf::from(STATE_DIR).join(prefix));
    let output = run(&["ip", "netns", "list"])?;
    let mut deleted = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        if name.starts_with(&format!("{prefix}-")) {
            delete_netns(name);
            deleted.push(name.to_string());
        }
    }
    Ok(deleted)
}

fn read_mtu(ns: &str, ifname: &str) -> Result<u32> {
    let output = run(&["ip", "netns", "exec", ns, "cat", &format!("/sys/class/net/{ifname}/mtu")])?;
    String::from_utf8_lossy(&output.stdout).trim().parse().context("parsing MTU")
}

/// veth links (and tunnels, receiving) pass GSO super-packets, which hides MTU problems;
/// turning segmentation and receive offloads off makes them behave like a wire.
fn wire_like(ns: &str, ifname: &str) -> Result<()> {
    run(&["ip", "netns", "exec", ns, "ethtool", "-K", ifname, "tso", "off", "gso", "off", "gro", "off"]).map(drop)
}
