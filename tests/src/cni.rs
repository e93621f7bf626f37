//! The CNI plugins a node's container runtime calls for every pod (Debian's
//! `containernetworking-plugins`): `loopback` for `lo`, and `bridge` with `host-local` IPAM for
//! `eth0`, configured as flannel's CNI plugin delegates to them (with a second, IPv6 range on
//! a dual-stack cluster). They run inside the node's namespace, so `cni0` and the host-side
//! veth are created there, as on a real node.

use std::{
    io::Write as _,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::PathBuf,
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};

/// Where Debian installs the plugins.
pub const PLUGIN_DIR: &str = "/usr/lib/cni";
/// The bridge the plugin creates (flannel's delegate names it so).
pub const BRIDGE: &str = "cni0";

/// One node's pod network: what flannel writes into the bridge plugin's configuration from
/// its subnet lease.
#[derive(Clone, Debug)]
pub struct BridgeNetwork {
    /// The node's pod subnet, e.g. `10.244.0.0/24`.
    pub subnet: String,
    /// On a dual-stack cluster, the node's IPv6 pod subnet, e.g. `fd00:10:244::/64`.
    pub subnet6: Option<String>,
    pub mtu: u32,
    /// host-local's allocation state, private to one lab instance so that concurrent labs
    /// allocating the same subnet do not share leases.
    pub data_dir: PathBuf,
}

impl BridgeNetwork {
    /// The delegate configuration kube-flannel's CNI plugin passes to `bridge`: host-local
    /// with one range per address family.
    fn config(&self) -> Value {
        let ranges: Vec<Value> =
            [Some(&self.subnet), self.subnet6.as_ref()].into_iter().flatten().map(|subnet| json!([{ "subnet": subnet }])).collect();
        json!({
            "cniVersion": "0.4.0",
            "name": "cbr0",
            "type": "bridge",
            "bridge": BRIDGE,
            "isGateway": true,
            "isDefaultGateway": true,
            "ipMasq": false,
            "hairpinMode": true,
            "mtu": self.mtu,
            "ipam": {
                "type": "host-local",
                "ranges": ranges,
                "dataDir": self.data_dir,
            },
        })
    }
}

/// What the bridge plugin reported for a pod.
#[derive(Clone, Debug)]
pub struct Attachment {
    pub ip: Ipv4Addr,
    /// The pod's IPv6 address, from the IPv6 range.
    pub ip6: Option<Ipv6Addr>,
    /// The host-side veth, named at random by the plugin.
    pub host_veth: String,
}

/// A pod's sandbox as the runtime hands it to the plugins.
#[derive(Clone, Debug)]
pub struct Sandbox {
    /// The node namespace the plugins run in.
    pub node_netns: String,
    /// The pod's namespace (under /run/netns); its name is also the container ID.
    pub pod_netns: String,
}

const LOOPBACK_CONFIG: &str = r#"{"cniVersion":"0.4.0","name":"lo","type":"loopback"}"#;

/// `CNI_COMMAND=ADD`: `lo` up with the loopback plugin, then `eth0` from the bridge plugin.
pub fn add(sandbox: &Sandbox, network: &BridgeNetwork) -> Result<Attachment> {
    invoke(sandbox, "ADD", "loopback", "lo", LOOPBACK_CONFIG)?;
    let result = invoke(sandbox, "ADD", "bridge", "eth0", &network.config().to_string())?;
    parse_bridge_result(&result).with_context(|| format!("reading the bridge plugin's result for {}: {result}", sandbox.pod_netns))
}

/// `CNI_COMMAND=DEL`, in the reverse order of ADD, as the runtime does when a pod goes away:
/// the bridge plugin deletes the veth and host-local releases the address.
pub fn del(sandbox: &Sandbox, network: &BridgeNetwork) -> Result<()> {
    invoke(sandbox, "DEL", "bridge", "eth0", &network.config().to_string())?;
    invoke(sandbox, "DEL", "loopback", "lo", LOOPBACK_CONFIG)?;
    Ok(())
}

/// Runs one plugin with the runtime's environment and its configuration on stdin, and returns
/// its result (empty for DEL).
fn invoke(sandbox: &Sandbox, command: &str, plugin: &str, ifname: &str, config: &str) -> Result<Value> {
    let what = format!("CNI {command} {plugin} {ifname} of {} in {}", sandbox.pod_netns, sandbox.node_netns);
    let mut child = Command::new("ip")
        .args(["netns", "exec", &sandbox.node_netns, &format!("{PLUGIN_DIR}/{plugin}")])
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &sandbox.pod_netns)
        .env("CNI_NETNS", format!("/run/netns/{}", sandbox.pod_netns))
        .env("CNI_IFNAME", ifname)
        .env("CNI_PATH", PLUGIN_DIR)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    child.stdin.take().context("plugin stdin")?.write_all(config.as_bytes()).with_context(|| format!("configuring {what}"))?;
    let output = child.wait_with_output().with_context(|| format!("waiting for {what}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        // A plugin reports its error as JSON on stdout ({"code", "msg", "details"}).
        bail!("{what} failed ({}): {} {}", output.status, stdout.trim(), String::from_utf8_lossy(&output.stderr).trim());
    }
    if stdout.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&stdout).with_context(|| format!("{what} printed no JSON result: {stdout}"))
}

/// The pod's addresses (`ips[].address`, CIDRs; one IPv4, and an IPv6 one from a second
/// range) and the host-side veth: the interface with no `sandbox` that is not the bridge.
fn parse_bridge_result(result: &Value) -> Result<Attachment> {
    let (mut ip, mut ip6) = (None, None);
    for entry in result["ips"].as_array().context("no ips")? {
        let cidr = entry["address"].as_str().context("an ips entry without an address")?;
        let address: IpAddr = cidr.split('/').next().unwrap_or(cidr).parse().with_context(|| format!("parsing the pod address {cidr}"))?;
        match address {
            IpAddr::V4(v4) => ip = Some(v4),
            IpAddr::V6(v6) => ip6 = Some(v6),
        }
    }
    let host_veth = result["interfaces"]
        .as_array()
        .context("no interfaces")?
        .iter()
        .find(|interface| interface.get("sandbox").is_none() && interface["name"] != BRIDGE)
        .and_then(|interface| interface["name"].as_str())
        .context("no host-side interface")?
        .to_string();
    Ok(Attachment { ip: ip.context("no IPv4 address")?, ip6, host_veth })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_veth_is_the_interface_outside_the_sandbox_that_is_not_the_bridge() {
        let result = json!({
            "cniVersion": "0.4.0",
            "interfaces": [
                { "name": "cni0", "mac": "36:3b:6e:30:7c:c6" },
                { "name": "veth8b7c25e3", "mac": "be:ee:40:49:50:b4" },
                { "name": "eth0", "mac": "c6:ba:d2:02:73:8b", "sandbox": "/run/netns/p" }
            ],
            "ips": [{ "version": "4", "interface": 2, "address": "10.244.0.2/24", "gateway": "10.244.0.1" }],
            "routes": [{ "dst": "0.0.0.0/0", "gw": "10.244.0.1" }],
            "dns": {}
        });
        let attachment = parse_bridge_result(&result).unwrap();
        assert_eq!(attachment.ip, Ipv4Addr::new(10, 244, 0, 2));
        assert_eq!(attachment.ip6, None);
        assert_eq!(attachment.host_veth, "veth8b7c25e3");
    }

    #[test]
    fn a_dual_stack_pod_has_an_address_from_each_range() {
        let result = json!({
            "cniVersion": "0.4.0",
            "interfaces": [{ "name": "cni0" }, { "name": "veth0c5a1f2e" }, { "name": "eth0", "sandbox": "/run/netns/p" }],
            "ips": [
                { "version": "4", "interface": 2, "address": "10.244.0.2/24", "gateway": "10.244.0.1" },
                { "version": "6", "interface": 2, "address": "fd00:10:244::2/64", "gateway": "fd00:10:244::1" }
            ]
        });
        let attachment = parse_bridge_result(&result).unwrap();
        assert_eq!((attachment.ip, attachment.ip6), (Ipv4Addr::new(10, 244, 0, 2), Some("fd00:10:244::2".parse().unwrap())));
        let network =
            BridgeNetwork { subnet: "10.244.0.0/24".into(), subnet6: Some("fd00:10:244::/64".into()), mtu: 1450, data_dir: "/tmp".into() };
        assert_eq!(network.config()["ipam"]["ranges"], json!([[{ "subnet": "10.244.0.0/24" }], [{ "subnet": "fd00:10:244::/64" }]]));
    }
}
