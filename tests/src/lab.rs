//! The built-in lab: a two-node flannel-VXLAN cluster in network namespaces, programmed the
//! way flanneld and the CNI bridge plugin program a real node.
//!
//! Everything is created inside namespaces the lab owns (`ip -n NS link add … netns OTHER`),
//! so nothing touches the root namespace and interface names repeat per node as on real
//! nodes. Dropping a `Lab` deletes every namespace it made, also when a test panics.

use std::{
    net::Ipv4Addr,
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context as _, Result, bail};

/// What to build; `Default` is a healthy lab.
#[derive(Clone, Debug)]
pub struct LabSpec {
    /// Namespace name prefix, unique per instance (see `unique_prefix`).
    pub prefix: String,
    pub underlay_mtu_a: u32,
    pub underlay_mtu_b: u32,
    /// MTU of pod eth0 and its host-side veth.
    pub pod_mtu: u32,
    pub vxlan_mtu: u32,
    pub pods_per_node: usize,
    /// Make node A's underlay `bond0` in this mode (e.g. `active-backup`, `balance-xor`)
    /// over two links, `eth0` and `eth1`. Needs the bonding module.
    pub bond_a: Option<String>,
}

impl Default for LabSpec {
    fn default() -> Self {
        Self {
            prefix: unique_prefix("lab"),
            underlay_mtu_a: 1500,
            underlay_mtu_b: 1500,
            pod_mtu: 1450,
            vxlan_mtu: 1450,
            pods_per_node: 1,
            bond_a: None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Pod {
    pub netns: String,
    pub ip: Ipv4Addr,
    /// The pod's veth end in the node namespace.
    pub host_veth: String,
}

#[derive(Clone, Debug)]
pub struct Node {
    pub netns: String,
    /// Underlay address (on `eth0`).
    pub ip: Ipv4Addr,
    pub underlay: String,
    pub bridge: String,
    pub vxlan: String,
    pub vtep_mac: String,
    pub pod_cidr: String,
    pub gateway: Ipv4Addr,
    pub pods: Vec<Pod>,
}

pub struct Lab {
    pub prefix: String,
    pub switch_ns: String,
    pub nodes: [Node; 2],
    /// Namespaces created so far, deleted on drop.
    created: Vec<String>,
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
        let node = |suffix: &str, index: u8| Node {
            netns: format!("{p}-{suffix}"),
            ip: Ipv4Addr::new(10, 99, 0, index + 1),
            underlay: if index == 0 && spec.bond_a.is_some() { "bond0".into() } else { "eth0".into() },
            bridge: "cni0".into(),
            vxlan: "flannel.1".into(),
            vtep_mac: format!("0e:00:00:00:0{}:01", index + 1),
            pod_cidr: format!("10.244.{index}.0/24"),
            gateway: Ipv4Addr::new(10, 244, index, 1),
            pods: (0..spec.pods_per_node)
                .map(|i| Pod {
                    netns: if i == 0 { format!("{p}-p{suffix}") } else { format!("{p}-p{suffix}{}", i + 1) },
                    ip: Ipv4Addr::new(10, 244, index, 2 + i as u8),
                    host_veth: format!("veth{suffix}{i}"),
                })
                .collect(),
        };
        let mut lab =
            Self { prefix: p.clone(), switch_ns: format!("{p}-sw"), nodes: [node("a", 0), node("b", 1)], created: Vec::new(), keep: false };
        // On failure the partly built lab is dropped, which deletes what was created.
        lab.build(&spec)?;
        Ok(lab)
    }

    fn add_netns(&mut self, name: &str) -> Result<()> {
        // A leftover from a killed run would make `ip netns add` fail.
        let _ = run(&["ip", "netns", "del", name]);
        run(&["ip", "netns", "add", name])?;
        self.created.push(name.to_string());
        run(&["ip", "-n", name, "link", "set", "lo", "up"])?;
        Ok(())
    }

    fn build(&mut self, spec: &LabSpec) -> Result<()> {
        let sw = self.switch_ns.clone();
        self.add_netns(&sw)?;
        run(&["ip", "-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        run(&["ip", "-n", &sw, "link", "set", "br0", "up"])?;
        let nodes = self.nodes.clone();
        for (index, node) in nodes.iter().enumerate() {
            let ns = node.netns.as_str();
            self.add_netns(ns)?;
            let mtu = if index == 0 { spec.underlay_mtu_a } else { spec.underlay_mtu_b }.to_string();
            let bond_mode = if index == 0 { spec.bond_a.as_deref() } else { None };
            let links: &[&str] = if bond_mode.is_some() { &["eth0", "eth1"] } else { &["eth0"] };
            for (link, ifname) in links.iter().enumerate() {
                let port = format!("port{index}{link}");
                run(&["ip", "-n", ns, "link", "add", ifname, "type", "veth", "peer", "name", &port, "netns", &sw])?;
                run(&["ip", "-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
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
                    "100",
                    "xmit_hash_policy",
                    "layer3+4",
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

            let pod_mtu = spec.pod_mtu.to_string();
            run(&["ip", "-n", ns, "link", "add", "cni0", "type", "bridge"])?;
            // A fixed MAC: otherwise the bridge takes its lowest port's, and changes it (breaking
            // every pod's ARP entry for the gateway) when that pod goes away.
            run(&["ip", "-n", ns, "link", "set", "cni0", "address", &format!("0a:58:0a:f4:0{index}:01")])?;
            run(&["ip", "-n", ns, "addr", "add", &format!("{}/24", node.gateway), "dev", "cni0"])?;
            run(&["ip", "-n", ns, "link", "set", "cni0", "mtu", &pod_mtu, "up"])?;

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
            // Set after the tunnel exists: the kernel refuses a VXLAN device that cannot fit
            // its underlay, but not an underlay lowered later, which is how nodes get there.
            run(&["ip", "-n", ns, "link", "set", underlay, "mtu", &mtu])?;

            for pod in &node.pods {
                self.add_netns(&pod.netns)?;
                let pns = pod.netns.as_str();
                run(&["ip", "-n", ns, "link", "add", &pod.host_veth, "type", "veth", "peer", "name", "eth0", "netns", pns])?;
                run(&["ip", "-n", ns, "link", "set", &pod.host_veth, "master", "cni0", "mtu", &pod_mtu, "up"])?;
                run(&["ip", "-n", pns, "link", "set", "eth0", "mtu", &pod_mtu, "up"])?;
                run(&["ip", "-n", pns, "addr", "add", &format!("{}/24", pod.ip), "dev", "eth0"])?;
                run(&["ip", "-n", pns, "route", "add", "default", "via", &node.gateway.to_string()])?;
                wire_like(ns, &pod.host_veth)?;
                wire_like(pns, "eth0")?;
            }
        }
        // Each node reaches the other's pod subnet through its VTEP, as flanneld programs it.
        for (index, node) in nodes.iter().enumerate() {
            let peer = &nodes[1 - index];
            let ns = node.netns.as_str();
            let peer_vtep = format!("10.244.{}.0", 1 - index);
            run(&["ip", "-n", ns, "route", "add", &peer.pod_cidr, "via", &peer_vtep, "dev", "flannel.1", "onlink"])?;
            run(&["ip", "-n", ns, "neigh", "add", &peer_vtep, "lladdr", &peer.vtep_mac, "dev", "flannel.1", "nud", "permanent"])?;
            run(&["ip", "netns", "exec", ns, "bridge", "fdb", "append", &peer.vtep_mac, "dev", "flannel.1", "dst", &peer.ip.to_string()])?;
        }
        // As on a real node, the node learns each pod's MAC when the pod first talks.
        for node in &nodes {
            for pod in &node.pods {
                run(&["ip", "netns", "exec", &pod.netns, "ping", "-c", "1", "-W", "2", &node.gateway.to_string()])
                    .with_context(|| format!("pod {} cannot reach its gateway", pod.ip))?;
            }
        }
        Ok(())
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

    /// Deletes every namespace now.
    pub fn down(mut self) {
        self.teardown();
    }

    fn teardown(&mut self) {
        for ns in self.created.drain(..).rev() {
            delete_netns(&ns);
        }
    }
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

/// Deletes every namespace whose name starts with `prefix-` (`cargo xtask lab down`).
pub fn delete_prefix(prefix: &str) -> Result<Vec<String>> {
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

/// veth links pass GSO super-packets, which hides MTU problems; turning segmentation and
/// receive offloads off makes them behave like a wire.
fn wire_like(ns: &str, ifname: &str) -> Result<()> {
    run(&["ip", "netns", "exec", ns, "ethtool", "-K", ifname, "tso", "off", "gso", "off", "gro", "off"]).map(drop)
}
