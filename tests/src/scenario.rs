//! Faults injected into the lab, each reproducing a runbook case, with the traffic that shows
//! it. The findings tests and `cargo xtask demo --fault` share them.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use anyhow::{Result, bail};

pub use crate::lab::DNS_SERVICE_IP;
use crate::{
    kube_proxy::{self, ServicePort},
    lab::{Lab, Pod},
    traffic,
};

/// A TCP port pod B serves on, for the firewall case.
pub const APP_PORT: u16 = 8080;
/// A port nothing listens on.
pub const CLOSED_PORT: u16 = 9;
/// The TCP port of the kube-proxy pitfall cases' Services (their backends serve `APP_PORT`).
pub const SERVICE_PORT: u16 = 80;
/// The UDP port of those Services and of their backends' echo servers.
pub const ECHO_PORT: u16 = 7000;
/// A Service whose backend is a second pod on node A, beside pod A (the br_netfilter case).
pub const NEIGHBOUR_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 20);
/// A Service whose backend is pod A itself (the hairpin case).
pub const SELF_SERVICE_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 21);
/// Datagrams pod A sends to such a Service.
pub const ECHO_DATAGRAMS: u32 = 2;

/// Extra LabSpec settings a scenario needs, applied before `Lab::up`.
pub fn adjust_spec(name: &str, spec: &mut crate::lab::LabSpec) {
    match name {
        "mtu" => spec.underlay_mtu_b = 1400,
        "pod-mtu" => spec.pod_mtu = 1500,
        // A second pod on node A to be the Service's backend.
        "br-netfilter" => spec.pods_per_node = 2,
        _ => {}
    }
}

/// The second pod on node A (with `adjust_spec("br-netfilter")`).
pub fn neighbour_pod(lab: &Lab) -> &Pod {
    &lab.node_a().pods[1]
}

/// A Service at `ip` with a TCP and a UDP port, whose one endpoint is `backend`, written on
/// node A as kube-proxy writes it.
fn add_service(lab: &Lab, name: &str, ip: Ipv4Addr, backend: Ipv4Addr) -> Result<()> {
    let tcp_name = format!("default/{name}:http");
    let udp_name = format!("default/{name}:echo");
    kube_proxy::add(
        &lab.node_a().netns,
        &[
            ServicePort {
                name: &tcp_name,
                protocol: "tcp",
                cluster_ip: ip,
                port: SERVICE_PORT,
                node_port: None,
                endpoint: SocketAddrV4::new(backend, APP_PORT),
            },
            ServicePort {
                name: &udp_name,
                protocol: "udp",
                cluster_ip: ip,
                port: ECHO_PORT,
                node_port: None,
                endpoint: SocketAddrV4::new(backend, ECHO_PORT),
            },
        ],
    )
}

/// What pod A got from a Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceAnswers {
    /// Its TCP connection was answered and carried a few bytes.
    pub tcp: bool,
    /// UDP echoes received, of `ECHO_DATAGRAMS`, on a connected socket (as resolvers use),
    /// which takes them only from the Service's address.
    pub udp_echoes: u32,
}

/// Pod A's TCP connection and UDP datagrams to the Service at `ip`.
pub fn reach_service(lab: &Lab, ip: Ipv4Addr) -> Result<ServiceAnswers> {
    let pod_a = &lab.pod_a().netns;
    let tcp = traffic::tcp_send(pod_a, ip, SERVICE_PORT, 10, 10, Duration::from_secs(2))?;
    let udp_echoes = traffic::udp_send_connected(pod_a, ip, ECHO_PORT, ECHO_DATAGRAMS, 10)?;
    Ok(ServiceAnswers { tcp: tcp.status.success() && String::from_utf8_lossy(&tcp.stdout).trim() == "10", udp_echoes })
}

pub struct Scenario {
    name: String,
    /// Kept running for as long as the scenario lives.
    _servers: Vec<traffic::Server>,
}

impl Scenario {
    /// Injects the fault (the lab must have been built with `adjust_spec`).
    pub fn prepare(lab: &Lab, name: &str) -> Result<Self> {
        let (a, b) = (lab.node_a(), lab.node_b());
        let mut servers = Vec::new();
        match name {
            "none" => {
                servers.push(traffic::tcp_sink(&lab.pod_b().netns, 5201)?);
                servers.push(traffic::udp_echo(&lab.pod_b().netns, 7000)?);
            }
            "drop" => {
                servers.push(traffic::tcp_sink(&lab.pod_b().netns, APP_PORT)?);
                lab.iptables(&b.netns, &["-A", "FORWARD", "-p", "tcp", "--dport", &APP_PORT.to_string(), "-j", "DROP"])?;
            }
            "mtu" => servers.push(traffic::tcp_sink(&lab.pod_b().netns, 5201)?),
            "pod-mtu" => {
                lab.iptables(&a.netns, &["-A", "OUTPUT", "-p", "icmp", "--icmp-type", "fragmentation-needed", "-j", "DROP"])?;
            }
            "vxlan-source" => {
                // A second (DHCP-style) address on the NIC, and the tunnel bound to it, while
                // node B still sends to the first.
                lab.add_address(&a.netns, "eth0", "10.99.0.11/24")?;
                lab.rebind_vxlan(a, Ipv4Addr::new(10, 99, 0, 11))?;
            }
            "no-reply" => lab.route(&b.netns, &["del", &a.pod_cidr])?,
            // Cluster DNS (dnsmasq behind the kube-dns Service) is part of every lab; without
            // kube-proxy on node A, nothing there DNATs the Service IP.
            "dns" => kube_proxy::flush(&a.netns)?,
            "dns-ok" | "port-refused" => {}
            // A Service whose backend is beside pod A on node A's bridge, and bridged frames
            // kept out of iptables: replies come back from the backend untranslated.
            "br-netfilter" => {
                let backend = neighbour_pod(lab);
                servers.push(traffic::tcp_sink(&backend.netns, APP_PORT)?);
                servers.push(traffic::udp_echo(&backend.netns, ECHO_PORT)?);
                add_service(lab, "neighbour", NEIGHBOUR_SERVICE_IP, backend.ip)?;
                lab.set_bridge_nf_call_iptables(a, false)?;
            }
            // A Service that selects pod A itself, and pod A's bridge port without hairpin mode.
            "hairpin" => {
                let pod_a = lab.pod_a();
                servers.push(traffic::tcp_sink(&pod_a.netns, APP_PORT)?);
                servers.push(traffic::udp_echo(&pod_a.netns, ECHO_PORT)?);
                add_service(lab, "self", SELF_SERVICE_IP, pod_a.ip)?;
                lab.set_hairpin(a, pod_a, false)?;
            }
            other => bail!("unknown scenario {other}"),
        }
        Ok(Self { name: name.to_string(), _servers: servers })
    }

    /// The node namespace to run podtrace in, and the pod to follow.
    pub fn traced<'a>(&self, lab: &'a Lab) -> (&'a str, Ipv4Addr) {
        match self.name.as_str() {
            // The firewall sits on node B, so that is where the drop is seen.
            "drop" => (&lab.node_b().netns, lab.pod_b().ip),
            _ => (&lab.node_a().netns, lab.pod_a().ip),
        }
    }

    /// Sends the traffic that shows the fault. Failures of the traffic itself are expected
    /// (that is the fault); only failures to run it are errors.
    pub fn traffic(&self, lab: &Lab) -> Result<()> {
        let (pa, pb) = (lab.pod_a(), lab.pod_b());
        match self.name.as_str() {
            "none" => {
                traffic::ping(&pa.netns, pb.ip, 5, 56)?;
                traffic::tcp_send(&pa.netns, pb.ip, 5201, 200_000, 16_384, Duration::from_secs(10))?;
                traffic::udp_send(&pa.netns, pb.ip, 7000, 10, 300)?;
            }
            "drop" => {
                traffic::ping(&pa.netns, pb.ip, 2, 56)?;
                traffic::tcp_send(&pa.netns, pb.ip, APP_PORT, 1000, 1000, Duration::from_secs(3))?;
            }
            "mtu" => {
                // Short writes first (they fit), then a bulk transfer whose full-size segments
                // do not.
                traffic::tcp_send(&pa.netns, pb.ip, 5201, 2_000, 100, Duration::from_secs(3))?;
                traffic::tcp_send(&pa.netns, pb.ip, 5201, 100_000, 16_384, Duration::from_secs(4))?;
            }
            "pod-mtu" => {
                traffic::ping(&pa.netns, pb.ip, 2, 56)?;
                ping_df(&pa.netns, pb.ip, 1472, 3)?;
            }
            "vxlan-source" | "no-reply" => {
                traffic::ping(&pa.netns, pb.ip, 4, 56)?;
            }
            "dns" | "dns-ok" => {
                traffic::dns_query(&pa.netns, DNS_SERVICE_IP, 3, Duration::from_millis(700))?;
            }
            "port-refused" => {
                traffic::tcp_send(&pa.netns, pb.ip, CLOSED_PORT, 10, 10, Duration::from_secs(2))?;
                // Pod B's kernel answers each datagram with ICMP port unreachable.
                traffic::udp_send(&pa.netns, pb.ip, CLOSED_PORT, 3, 10)?;
            }
            "br-netfilter" => {
                reach_service(lab, NEIGHBOUR_SERVICE_IP)?;
            }
            "hairpin" => {
                reach_service(lab, SELF_SERVICE_IP)?;
            }
            other => bail!("unknown scenario {other}"),
        }
        Ok(())
    }
}

/// Pings with Don't Fragment set and a payload of `size` bytes.
pub fn ping_df(ns: &str, dst: Ipv4Addr, size: u32, count: u32) -> Result<()> {
    std::process::Command::new("ip")
        .args(["netns", "exec", ns, "ping", "-n", "-M", "do", "-c", &count.to_string(), "-s", &size.to_string()])
        .args(["-i", "0.2", "-W", "1", &dst.to_string()])
        .output()?;
    Ok(())
}
