//! Bonds and their slaves: their state as the kernel reports it, read at discovery and again
//! at the end of a trace (a bond can fail over mid-trace).

use std::collections::BTreeMap;

use anyhow::Result;
use netlink_packet_route::link::{BondAdInfo, BondMode, BondXmitHashPolicy, InfoBond, InfoBondPort, LacpState, MiiStatus};
use serde::Serialize;

use super::{
    netlink::{Link, dump_links, with_rtnetlink},
    path::Path,
};

/// Bond state as the kernel reports it, for the bond itself.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BondState {
    pub mode: String,
    pub active_slave: Option<String>,
    /// How often the MII link state of each slave is polled; 0 is never.
    pub miimon_ms: u32,
    /// How often ARP probes check each slave; 0 is never.
    pub arp_interval_ms: u32,
    /// What the balance-xor and 802.3ad modes hash to choose a slave for a packet.
    pub xmit_hash_policy: String,
    /// 802.3ad only: the aggregator that carries traffic, and its LACP partner's system MAC.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub active_aggregator: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lacp_partner_mac: Option<String>,
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
    /// 802.3ad only: the aggregator the bond put the slave in; slaves whose LACP partners
    /// differ end up in different ones.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aggregator: Option<u16>,
}

/// A bond slave's state as netlink reports it, before its bond is known.
#[derive(Clone, Copy, Debug)]
pub(super) struct SlaveLink {
    pub mii_up: bool,
    pub link_failures: u32,
    pub lacp_partner_in_sync: Option<bool>,
    pub aggregator: Option<u16>,
}

/// The bond's attributes; the active slave stays an ifindex until every link name is known.
pub(super) fn parse_bond(attrs: &[InfoBond]) -> BondState {
    let mut state = BondState::default();
    for attr in attrs {
        match attr {
            InfoBond::Mode(mode) => state.mode = bond_mode_name(*mode),
            InfoBond::ActivePort(index) => state.active_slave = Some(index.to_string()),
            InfoBond::MiiMon(ms) => state.miimon_ms = *ms,
            InfoBond::ArpInterval(ms) => state.arp_interval_ms = *ms,
            InfoBond::XmitHashPolicy(policy) => state.xmit_hash_policy = xmit_hash_policy_name(*policy),
            InfoBond::AdInfo(info) => {
                for item in info {
                    match item {
                        BondAdInfo::Aggregator(id) => state.active_aggregator = Some(*id),
                        BondAdInfo::PartnerMac(mac) => state.lacp_partner_mac = Some(mac_text(mac)),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    state
}

pub(super) fn parse_bond_port(attrs: &[InfoBondPort]) -> SlaveLink {
    let mut port = SlaveLink { mii_up: true, link_failures: 0, lacp_partner_in_sync: None, aggregator: None };
    for attr in attrs {
        match attr {
            InfoBondPort::MiiStatus(status) => port.mii_up = matches!(status, MiiStatus::Up),
            InfoBondPort::LinkFailureCount(count) => port.link_failures = *count,
            InfoBondPort::AdPartnerOperPortState(state) => port.lacp_partner_in_sync = Some(state.contains(LacpState::SYNCHRONIZATION)),
            InfoBondPort::AdAggregatorId(id) => port.aggregator = Some(*id),
            _ => {}
        }
    }
    port
}

/// Replaces each bond's active slave ifindex by its name.
pub(super) fn name_active_slaves(links: &mut BTreeMap<u32, Link>) {
    let names: BTreeMap<u32, String> = links.iter().map(|(i, l)| (*i, l.name.clone())).collect();
    for link in links.values_mut() {
        if let Some(bond) = &mut link.bond
            && let Some(active) = &bond.active_slave
            && let Ok(index) = active.parse::<u32>()
        {
            bond.active_slave = names.get(&index).cloned();
        }
    }
}

pub(super) fn slave_state(link: &Link, links: &BTreeMap<u32, Link>) -> Option<SlaveState> {
    let port = link.bond_port?;
    let bond = link.controller.and_then(|c| links.get(&c));
    let lacp = bond.and_then(|b| b.bond.as_ref()).is_some_and(|b| b.mode == "802.3ad");
    Some(SlaveState {
        bond: bond.map(|b| b.name.clone()).unwrap_or_default(),
        mii_up: port.mii_up,
        link_failures: port.link_failures,
        lacp_partner_in_sync: if lacp { Some(port.lacp_partner_in_sync.unwrap_or(false)) } else { None },
        aggregator: if lacp { port.aggregator } else { None },
    })
}

/// The path with its bonds' and slaves' state read again, e.g. after a failover mid-trace.
pub async fn refresh_bond_state(path: &Path) -> Result<Path> {
    let mut path = path.clone();
    if !path.hops().any(|hop| hop.bond.is_some() || hop.slave.is_some()) {
        return Ok(path);
    }
    let links = with_rtnetlink(async |handle| dump_links(handle).await).await?;
    for hop in path.hops_mut() {
        if let Some(link) = links.get(&hop.ifindex) {
            hop.bond = link.bond.clone();
            hop.slave = slave_state(link, &links);
        }
    }
    Ok(path)
}

fn bond_mode_name(mode: BondMode) -> String {
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

/// As `ip -d link` and `/proc/net/bonding` name them.
fn xmit_hash_policy_name(policy: BondXmitHashPolicy) -> String {
    match policy {
        BondXmitHashPolicy::Layer2 => "layer2".into(),
        BondXmitHashPolicy::Layer34 => "layer3+4".into(),
        BondXmitHashPolicy::Layer23 => "layer2+3".into(),
        BondXmitHashPolicy::Encap23 => "encap2+3".into(),
        BondXmitHashPolicy::Encap34 => "encap3+4".into(),
        BondXmitHashPolicy::VlanSrcMac => "vlan+srcmac".into(),
        other => format!("{other:?}"),
    }
}

fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter().map(|byte| format!("{byte:02x}")).collect::<Vec<_>>().join(":")
}
