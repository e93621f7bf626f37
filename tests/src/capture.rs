//! tcpdump on the same interfaces podtrace traces, for counts to compare against.

use std::{
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, Ipv6Addr},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{
    lab::{Cni, Lab, Node},
    report::hop,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dir {
    In,
    Out,
}

pub struct Capture {
    child: Option<Child>,
    stderr: mpsc::Receiver<String>,
    what: String,
}

impl Capture {
    /// Starts `tcpdump` in `netns` on one direction of `ifname`, and returns once it listens.
    pub fn start(netns: &str, ifname: &str, dir: Dir, filter: &str) -> Result<Self> {
        let what = format!("tcpdump -i {ifname} -Q {dir:?} '{filter}' in {netns}");
        let mut child = Command::new("ip")
            // -p: a promiscuous capture on a bridge makes the kernel copy and free frames not
            // meant for it, which a drop tracer then sees.
            .args(["netns", "exec", netns, "tcpdump", "-p", "-n", "-i", ifname, "-Q"])
            .arg(match dir {
                Dir::In => "in",
                Dir::Out => "out",
            })
            // -Z root: stay root rather than switch to a `tcpdump` user that may not exist.
            .args(["--immediate-mode", "-B", "16384", "-Z", "root", "-w", "/dev/null", filter])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {what}"))?;
        let stderr = child.stderr.take().context("tcpdump stderr")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let capture = Self { child: Some(child), stderr: rx, what };
        loop {
            match capture.stderr.recv_timeout(Duration::from_secs(30)) {
                Ok(line) if line.contains("listening on") => return Ok(capture),
                Ok(_) => continue,
                Err(_) => bail!("{} did not start listening", capture.what),
            }
        }
    }

    /// Stops tcpdump and returns how many packets it captured.
    pub fn stop(mut self) -> Result<u64> {
        let mut child = self.child.take().context("capture already stopped")?;
        // SAFETY: plain syscall on our child.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        child.wait().with_context(|| format!("waiting for {}", self.what))?;
        let mut captured = None;
        let mut dropped = 0;
        while let Ok(line) = self.stderr.recv_timeout(Duration::from_secs(5)) {
            let count = line.split_whitespace().next().and_then(|n| n.parse::<u64>().ok());
            if line.contains("packets captured") {
                captured = count;
            } else if line.contains("dropped by kernel") {
                dropped = count.unwrap_or(0);
            }
        }
        if dropped > 0 {
            bail!("{} dropped {dropped} packets: its count is not exact", self.what);
        }
        captured.with_context(|| format!("{} printed no packet count", self.what))
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Plain IPv4 packets to or from `ip`.
pub fn ip_filter(ip: Ipv4Addr) -> String {
    format!("ip host {ip}")
}

/// VXLAN (UDP 8472) packets whose *inner* IPv4 source or destination is `ip`. Offsets are
/// from the UDP header: 8 (UDP) + 8 (VXLAN) + 14 (inner Ethernet) + 12 or 16 into the inner
/// IPv4 header.
pub fn vxlan_inner_filter(ip: Ipv4Addr) -> String {
    vxlan_inner_filter_on(ip, 8472)
}

/// The same for VXLAN to `port` (vxlan.calico's 4789).
pub fn vxlan_inner_filter_on(ip: Ipv4Addr, port: u16) -> String {
    let hex = u32::from(ip);
    format!("udp dst port {port} and (udp[42:4] = {hex:#010x} or udp[46:4] = {hex:#010x})")
}

/// IPIP (IP protocol 4) packets whose *inner* IPv4 source or destination is `ip`: the inner
/// header right behind an outer one without options, its addresses at 20 + 12 and 20 + 16.
pub fn ipip_inner_filter(ip: Ipv4Addr) -> String {
    let hex = u32::from(ip);
    format!("ip proto 4 and (ip[32:4] = {hex:#010x} or ip[36:4] = {hex:#010x})")
}

/// Plain IPv6 packets to or from `ip`.
pub fn ip6_filter(ip: Ipv6Addr) -> String {
    format!("ip6 host {ip}")
}

/// VXLAN (UDP 8472) over an IPv6 underlay whose *inner* IPv6 source or destination is `ip`.
/// libpcap's `udp[]` reads IPv4 only, so offsets are from the outer IPv6 header, without
/// extension headers: 40 (IPv6) + 8 (UDP) + 8 (VXLAN) + 14 (inner Ethernet) + 8 or 24 into
/// the inner IPv6 header.
pub fn vxlan6_inner_filter(ip: Ipv6Addr) -> String {
    let words = |at: usize| {
        ip.octets()
            .chunks(4)
            .enumerate()
            .map(|(i, word)| format!("ip6[{}:4] = {:#010x}", at + 4 * i, u32::from_be_bytes([word[0], word[1], word[2], word[3]])))
            .collect::<Vec<_>>()
            .join(" and ")
    };
    format!("ip6 and ip6[6] = 17 and udp dst port 8472 and ip6[68:2] = 0x86dd and (({}) or ({}))", words(78), words(94))
}

/// One tcpdump per hop podtrace traces, in each direction, with the filter that matches what
/// podtrace follows there.
pub struct Captures(Vec<(String, String, Capture)>);

impl Captures {
    /// On node A, following a pod of node A by its IPv4 address.
    pub fn start(lab: &Lab, pod_ip: Ipv4Addr) -> Result<Self> {
        Self::on_node(lab, lab.node_a(), &lab.pod_a().host_veth, pod_ip)
    }

    /// On `node`, following its pod `pod_ip` behind `veth`: the veth, the bridge (none for
    /// Calico), the tunnel and the underlay, where the pod's packets are encapsulated as the
    /// lab's CNI does it.
    pub fn on_node(lab: &Lab, node: &Node, veth: &str, pod_ip: Ipv4Addr) -> Result<Self> {
        let encapsulated = match lab.cni {
            Cni::Flannel => vxlan_inner_filter(pod_ip),
            Cni::CalicoVxlan => vxlan_inner_filter_on(pod_ip, 4789),
            Cni::CalicoIpip => ipip_inner_filter(pod_ip),
        };
        let mut hops = vec![(veth.to_string(), ip_filter(pod_ip))];
        if !node.bridge.is_empty() {
            hops.push((node.bridge.clone(), ip_filter(pod_ip)));
        }
        hops.push((node.vxlan.clone(), ip_filter(pod_ip)));
        hops.push((node.underlay.clone(), encapsulated));
        Self::on(&node.netns, &hops)
    }

    /// In `netns`, on each (interface, filter).
    pub fn on(netns: &str, hops: &[(String, String)]) -> Result<Self> {
        let mut captures = Vec::new();
        for (ifname, filter) in hops {
            for (dir, name) in [(Dir::In, "ingress"), (Dir::Out, "egress")] {
                captures.push((ifname.clone(), name.to_string(), Capture::start(netns, ifname, dir, filter)?));
            }
        }
        Ok(Self(captures))
    }

    /// Stops every capture: each hop's (ifname, direction) and tcpdump's count there.
    pub fn stop(self) -> Result<Vec<(String, String, u64)>> {
        self.0.into_iter().map(|(ifname, direction, capture)| Ok((ifname, direction, capture.stop()?))).collect()
    }

    /// Stops every capture and asserts that each hop's packet count in `report` equals
    /// tcpdump's, and that traffic crossed every hop.
    pub fn assert_equal_to(self, report: &Value) -> Result<()> {
        self.assert_equal_to_except(report, &[])
    }

    /// `assert_equal_to`, where podtrace is expected to count `fewer` packets than tcpdump on
    /// each (ifname, direction, fewer) of `fewer_at`: packets it cannot know are the pod's.
    pub fn assert_equal_to_except(self, report: &Value, fewer_at: &[(&str, &str, u64)]) -> Result<()> {
        let mut mismatches = Vec::new();
        for (ifname, direction, tcpdump) in self.stop()? {
            assert!(tcpdump > 0, "{ifname} {direction}: no traffic at all");
            let fewer = fewer_at.iter().find(|(i, d, _)| *i == ifname && *d == direction).map_or(0, |(_, _, fewer)| *fewer);
            let expected = tcpdump.saturating_sub(fewer);
            let podtrace = hop(report, &ifname, &direction)["packets"].as_u64().context("a hop's packets")?;
            if podtrace != expected {
                mismatches.push(format!("{ifname} {direction}: tcpdump {tcpdump}, expected {expected}, podtrace {podtrace}"));
            }
        }
        assert!(mismatches.is_empty(), "per-hop counts differ: {mismatches:#?}");
        Ok(())
    }
}
