//! What a pod bridge does with the pods' frames besides forwarding them, as far as Services
//! depend on it: whether bridged frames pass through iptables (br_netfilter), which a client
//! needs when the Service's backend sits behind the same bridge, and each port's hairpin
//! mode, which a pod needs to reach itself through a Service.

use std::{fs, io::ErrorKind, net::IpAddr};

use anyhow::{Context as _, Result};
use netlink_packet_route::link::{InfoBridge, InfoBridgePort};

/// Where br_netfilter keeps its per-namespace switches: `/proc/sys/net` shows the network
/// namespace of the process reading it, so this reads the node's own.
const SYSCTL_DIR: &str = "/proc/sys/net/bridge";

/// Whether frames a bridge forwards between its ports pass through iptables (ip6tables for
/// IPv6): br_netfilter must be loaded, and either the namespace's
/// `net.bridge.bridge-nf-call-iptables` or the bridge's own `nf_call_iptables` must be on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BridgeNetfilter {
    /// br_netfilter is loaded (its sysctls exist in this namespace).
    pub loaded: bool,
    /// `net.bridge.bridge-nf-call-iptables` and `…-ip6tables` in this namespace.
    pub sysctl: FamilySwitch,
    /// The bridge's own `nf_call_iptables` and `nf_call_ip6tables`.
    pub bridge: FamilySwitch,
}

/// One switch per IP family.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FamilySwitch {
    pub ipv4: bool,
    pub ipv6: bool,
}

impl FamilySwitch {
    fn of(&self, ip: IpAddr) -> bool {
        if ip.is_ipv4() { self.ipv4 } else { self.ipv6 }
    }
}

impl BridgeNetfilter {
    /// A bridge with its own switches `bridge`, in a namespace with `sysctls`.
    pub fn new(sysctls: Sysctls, bridge: FamilySwitch) -> Self {
        Self { loaded: sysctls.is_some(), sysctl: sysctls.unwrap_or_default(), bridge }
    }

    /// Whether bridged packets of `ip`'s family pass through iptables (or ip6tables).
    pub fn calls_iptables(&self, ip: IpAddr) -> bool {
        self.loaded && (self.sysctl.of(ip) || self.bridge.of(ip))
    }

    /// The sysctl and the bridge option that decide it for `ip`'s family.
    pub fn switch_names(ip: IpAddr) -> (&'static str, &'static str) {
        if ip.is_ipv4() {
            ("net.bridge.bridge-nf-call-iptables", "nf_call_iptables")
        } else {
            ("net.bridge.bridge-nf-call-ip6tables", "nf_call_ip6tables")
        }
    }

    /// "0", "1", or "absent (br_netfilter is not loaded)": the sysctl for `ip`'s family as read.
    pub fn sysctl_value(&self, ip: IpAddr) -> String {
        if self.loaded { u8::from(self.sysctl.of(ip)).to_string() } else { "absent (br_netfilter is not loaded)".to_string() }
    }

    /// The bridge's own switch for `ip`'s family.
    pub fn bridge_option(&self, ip: IpAddr) -> bool {
        self.bridge.of(ip)
    }
}

/// The namespace's `net.bridge.bridge-nf-call-iptables` and `…-ip6tables`; `None` when
/// br_netfilter is not loaded.
pub type Sysctls = Option<FamilySwitch>;

/// This namespace's br_netfilter sysctls.
pub fn read_sysctls() -> Result<Sysctls> {
    let read = |name: &str| -> Result<Option<bool>> {
        let path = format!("{SYSCTL_DIR}/{name}");
        match fs::read_to_string(&path) {
            Ok(text) => Ok(Some(text.trim() != "0")),
            Err(err) if err.kind() == ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err).with_context(|| format!("reading {path}")),
        }
    };
    match (read("bridge-nf-call-iptables")?, read("bridge-nf-call-ip6tables")?) {
        (Some(ipv4), Some(ipv6)) => Ok(Some(FamilySwitch { ipv4, ipv6 })),
        _ => Ok(None),
    }
}

/// A bridge's own `nf_call_iptables` switches, from its netlink attributes.
pub(super) fn parse_bridge(attrs: &[InfoBridge]) -> FamilySwitch {
    let mut switch = FamilySwitch::default();
    for attr in attrs {
        match attr {
            InfoBridge::NfCallIpTables(on) => switch.ipv4 = *on,
            InfoBridge::NfCallIp6Tables(on) => switch.ipv6 = *on,
            _ => {}
        }
    }
    switch
}

/// A bridge port's hairpin mode (IFLA_BRPORT_MODE), from its netlink attributes.
pub(super) fn parse_port_hairpin(attrs: &[InfoBridgePort]) -> Option<bool> {
    attrs.iter().find_map(|attr| match attr {
        InfoBridgePort::HairpinMode(on) => Some(*on),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bridged_packets_pass_iptables_only_with_the_module_and_a_switch_on() {
        let v4: IpAddr = "10.244.0.2".parse().unwrap();
        let v6: IpAddr = "fd00::2".parse().unwrap();
        let off = BridgeNetfilter { loaded: true, sysctl: FamilySwitch::default(), bridge: FamilySwitch::default() };
        assert!(!off.calls_iptables(v4));
        assert_eq!(off.sysctl_value(v4), "0");
        let sysctl_v4 = BridgeNetfilter { sysctl: FamilySwitch { ipv4: true, ipv6: false }, ..off };
        assert!(sysctl_v4.calls_iptables(v4) && !sysctl_v4.calls_iptables(v6));
        let bridge_option = BridgeNetfilter { bridge: FamilySwitch { ipv4: true, ipv6: true }, ..off };
        assert!(bridge_option.calls_iptables(v4) && bridge_option.calls_iptables(v6), "the bridge's own switch counts too");
        let not_loaded = BridgeNetfilter { loaded: false, ..bridge_option };
        assert!(!not_loaded.calls_iptables(v4), "without the module there are no hooks");
        assert_eq!(not_loaded.sysctl_value(v4), "absent (br_netfilter is not loaded)");
    }

    #[test]
    fn bridge_and_port_attributes_are_read() {
        let switch = parse_bridge(&[InfoBridge::NfCallIpTables(true), InfoBridge::NfCallIp6Tables(false)]);
        assert_eq!(switch, FamilySwitch { ipv4: true, ipv6: false });
        assert_eq!(parse_port_hairpin(&[InfoBridgePort::Learning(true), InfoBridgePort::HairpinMode(false)]), Some(false));
        assert_eq!(parse_port_hairpin(&[InfoBridgePort::Learning(true)]), None);
    }
}
