//! The routing tables as discovery reads them, per address family: which devices routes of a
//! family leave through, and which device the default route leaves through for a pod's
//! traffic, in the table the node's policy rules (`ip rule`) pick for it.
//!
//! Table ids come from the RTA_TABLE and FRA_TABLE attributes: the messages' 8-bit header
//! field holds 252 ("compat") for every table above 255.

use std::net::IpAddr;

use anyhow::{Context as _, Result};
use futures::TryStreamExt as _;
use netlink_packet_route::{
    route::{RouteAddress, RouteAttribute, RouteHeader, RouteMessage, RouteType},
    rule::{RuleAction, RuleAttribute, RuleFlags, RuleMessage},
};
use rtnetlink::{Handle, IpVersion, RouteMessageBuilder};

/// The main routing table, the only one a kernel without policy routing has for unicast.
const RT_TABLE_MAIN: u32 = RouteHeader::RT_TABLE_MAIN as u32;

/// An IP address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Self::V4,
            IpAddr::V6(_) => Self::V6,
        }
    }

    fn other(self) -> Self {
        match self {
            Self::V4 => Self::V6,
            Self::V6 => Self::V4,
        }
    }

    fn ip_version(self) -> IpVersion {
        match self {
            Self::V4 => IpVersion::V4,
            Self::V6 => IpVersion::V6,
        }
    }
}

/// Where traffic whose default route is looked up comes from, as policy rules select it.
#[derive(Clone, Copy, Debug, Default)]
pub struct Origin<'a> {
    /// Its source address; `None` when it varies (traffic to a remote pod from anywhere).
    pub source: Option<IpAddr>,
    /// The device it enters the node's routing on (`lo` for the node's own packets); `None`
    /// when it varies.
    pub iif: Option<&'a str>,
}

/// Both families' tables.
pub struct Routing {
    ipv4: Tables,
    ipv6: Tables,
}

impl Routing {
    pub async fn read(handle: &Handle) -> Result<Self> {
        Ok(Self { ipv4: Tables::read(handle, Family::V4).await?, ipv6: Tables::read(handle, Family::V6).await? })
    }

    pub fn of(&self, family: Family) -> &Tables {
        match family {
            Family::V4 => &self.ipv4,
            Family::V6 => &self.ipv6,
        }
    }

    /// Whether packets of `family` may cross `ifindex`: routes of that family leave through
    /// it, or at least none of the other family do. A dual-stack node's IPv4 tunnel carries
    /// no IPv6 pod's packets, while a device without routes of either family (a tunnel whose
    /// peers are not programmed yet) is not ruled out.
    pub fn may_carry(&self, ifindex: u32, family: Family) -> bool {
        self.of(family).carries(ifindex) || !self.of(family.other()).carries(ifindex)
    }
}

/// One family's routes, in every table, and its policy rules in priority order.
pub struct Tables {
    routes: Vec<Route>,
    rules: Vec<Rule>,
}

impl Tables {
    async fn read(handle: &Handle, family: Family) -> Result<Self> {
        let what = match family {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        };
        let mut request = match family {
            Family::V4 => RouteMessageBuilder::<std::net::Ipv4Addr>::new().build(),
            Family::V6 => RouteMessageBuilder::<std::net::Ipv6Addr>::new().build(),
        };
        // Every table: the builder asks for main, which a strict-checking socket would honour.
        request.header.table = RouteHeader::RT_TABLE_UNSPEC;
        let routes: Vec<RouteMessage> =
            handle.route().get(request).execute().try_collect().await.with_context(|| format!("dumping {what} routes"))?;
        let rules = match handle.rule().get(family.ip_version()).execute().try_collect::<Vec<RuleMessage>>().await {
            Ok(rules) => Some(rules),
            // A kernel built without policy routing for this family has no rules to dump: it
            // looks up the main table alone.
            Err(rtnetlink::Error::NetlinkError(err)) if err.raw_code() == -libc::EAFNOSUPPORT => None,
            Err(err) => return Err(err).with_context(|| format!("dumping {what} policy rules")),
        };
        Ok(Self::new(&routes, rules.as_deref()))
    }

    /// From dumped messages; `rules` is `None` where the kernel has no policy routing.
    fn new(routes: &[RouteMessage], rules: Option<&[RuleMessage]>) -> Self {
        let mut rules: Vec<Rule> = match rules {
            Some(rules) => rules.iter().map(Rule::from_message).collect(),
            None => vec![Rule { action: RuleAction::ToTable, table: RT_TABLE_MAIN, ..Rule::default() }],
        };
        rules.sort_by_key(|rule| rule.priority);
        Self { routes: routes.iter().map(Route::from_message).collect(), rules }
    }

    /// Whether routes of this family, other than link-local and multicast ones (which every
    /// interface with the family enabled has), leave through `ifindex`, in any table.
    pub fn carries(&self, ifindex: u32) -> bool {
        self.routes.iter().any(|route| route.kind == RouteType::Unicast && !route.link_scoped() && route.devices.contains(&ifindex))
    }

    /// The gateways of the routes through `ifindex`: for a tunnel without an address of its
    /// own peer (Calico's `tunl0`), the peers' underlay addresses its routes name.
    pub fn gateways_via(&self, ifindex: u32) -> Vec<IpAddr> {
        let mut gateways = Vec::new();
        for gateway in self.routes.iter().filter(|route| route.devices.contains(&ifindex)).filter_map(|route| route.gateway) {
            if !gateways.contains(&gateway) {
                gateways.push(gateway);
            }
        }
        gateways
    }

    /// The device of the default route that traffic from `origin` takes: the rules walked
    /// in priority order as the kernel walks them, each table consulted for its default route.
    pub fn default_route_device(&self, origin: &Origin<'_>) -> Option<u32> {
        let mut goto: Option<u32> = None;
        for rule in &self.rules {
            if goto.is_some_and(|target| rule.priority < target) {
                continue;
            }
            goto = None;
            if rule.applies_to(origin) != Some(true) {
                continue;
            }
            match rule.action {
                RuleAction::ToTable => {}
                RuleAction::Goto => {
                    goto = Some(rule.goto);
                    continue;
                }
                RuleAction::Blackhole | RuleAction::Unreachable | RuleAction::Prohibit => return None,
                _ => continue,
            }
            // Of several default routes in one table, the kernel takes the lowest metric.
            let Some(route) = self.routes.iter().filter(|r| r.table == rule.table && r.is_default()).min_by_key(|r| r.metric) else {
                continue;
            };
            // `suppress_prefixlength N` rejects results of prefix length N or less: a default
            // route always (wg-quick's `lookup main suppress_prefixlength 0`).
            if rule.suppress_prefix_len.is_some() {
                continue;
            }
            match route.kind {
                RouteType::Unicast => return route.devices.first().copied(),
                // "Not in this table": the next rule decides.
                RouteType::Throw => continue,
                // Blackhole, unreachable, prohibit: the lookup ends without a device.
                _ => return None,
            }
        }
        None
    }
}

/// One route, as far as discovery reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Route {
    table: u32,
    kind: RouteType,
    destination: Option<IpAddr>,
    prefix_len: u8,
    /// The metric (RTA_PRIORITY).
    metric: u32,
    /// The output device, or each next hop's for a multipath route.
    devices: Vec<u32>,
    /// The gateway (`via`), for a route with one next hop.
    gateway: Option<IpAddr>,
}

impl Route {
    fn from_message(message: &RouteMessage) -> Self {
        let mut route = Self {
            table: u32::from(message.header.table),
            kind: message.header.kind,
            destination: None,
            prefix_len: message.header.destination_prefix_length,
            metric: 0,
            devices: Vec::new(),
            gateway: None,
        };
        for attr in &message.attributes {
            match attr {
                RouteAttribute::Table(table) => route.table = *table,
                RouteAttribute::Destination(RouteAddress::Inet(ip)) => route.destination = Some(IpAddr::V4(*ip)),
                RouteAttribute::Destination(RouteAddress::Inet6(ip)) => route.destination = Some(IpAddr::V6(*ip)),
                RouteAttribute::Priority(metric) => route.metric = *metric,
                RouteAttribute::Oif(index) => route.devices.push(*index),
                RouteAttribute::Gateway(RouteAddress::Inet(ip)) => route.gateway = Some(IpAddr::V4(*ip)),
                RouteAttribute::Gateway(RouteAddress::Inet6(ip)) => route.gateway = Some(IpAddr::V6(*ip)),
                RouteAttribute::MultiPath(hops) => route.devices.extend(hops.iter().map(|hop| hop.interface_index)),
                _ => {}
            }
        }
        route
    }

    fn is_default(&self) -> bool {
        self.prefix_len == 0
    }

    /// Routes to link-local or multicast destinations.
    fn link_scoped(&self) -> bool {
        match self.destination {
            Some(IpAddr::V4(ip)) => ip.is_link_local() || ip.is_multicast(),
            Some(IpAddr::V6(ip)) => ip.is_unicast_link_local() || ip.is_multicast(),
            None => false,
        }
    }
}

/// One policy rule, as far as choosing a table for a pod's traffic goes.
#[derive(Clone, Debug, Default)]
struct Rule {
    priority: u32,
    action: RuleAction,
    table: u32,
    /// For `goto`: the priority of the rule it jumps to.
    goto: u32,
    source: Option<(IpAddr, u8)>,
    /// `to PREFIX`: only traffic to some destinations.
    has_destination: bool,
    iif: Option<String>,
    fwmark: Option<(u32, u32)>,
    invert: bool,
    /// Selectors on what a pod's traffic as a whole does not share: outgoing device, TOS, user,
    /// protocol, ports, VRF, tunnel id.
    narrower: bool,
    suppress_prefix_len: Option<u32>,
}

impl Rule {
    fn from_message(message: &RuleMessage) -> Self {
        let header = &message.header;
        let mut rule = Self {
            action: header.action,
            table: u32::from(header.table),
            has_destination: header.dst_len > 0,
            invert: header.flags.contains(RuleFlags::Invert),
            narrower: header.tos != 0,
            ..Self::default()
        };
        let mut fwmask = None;
        for attr in &message.attributes {
            match attr {
                RuleAttribute::Priority(priority) => rule.priority = *priority,
                RuleAttribute::Table(table) => rule.table = *table,
                RuleAttribute::Goto(target) => rule.goto = *target,
                RuleAttribute::Source(ip) if header.src_len > 0 => rule.source = Some((*ip, header.src_len)),
                RuleAttribute::Iifname(name) => rule.iif = Some(name.clone()),
                RuleAttribute::FwMark(mark) => rule.fwmark = Some((*mark, u32::MAX)),
                RuleAttribute::FwMask(mask) => fwmask = Some(*mask),
                // The kernel sends -1 for "none" with every rule.
                RuleAttribute::SuppressPrefixLen(len) if *len != u32::MAX => rule.suppress_prefix_len = Some(*len),
                RuleAttribute::Oifname(_)
                | RuleAttribute::UidRange(_)
                | RuleAttribute::IpProtocol(_)
                | RuleAttribute::SourcePortRange(_)
                | RuleAttribute::DestinationPortRange(_)
                | RuleAttribute::TunId(_) => rule.narrower = true,
                RuleAttribute::L3MDev(on) if *on => rule.narrower = true,
                _ => {}
            }
        }
        if let Some(mask) = fwmask {
            rule.fwmark = Some((rule.fwmark.map_or(0, |(mark, _)| mark), mask));
        }
        rule
    }

    /// Whether the rule selects all of `origin`'s traffic (to anywhere, without a firewall
    /// mark); `None` when that depends on more than the origin (its destination, port, user…).
    fn applies_to(&self, origin: &Origin<'_>) -> Option<bool> {
        if self.narrower || (self.has_destination && !self.invert) {
            return None;
        }
        let mut selected = !self.has_destination;
        if let Some((prefix, len)) = self.source {
            selected &= in_prefix(origin.source?, prefix, len);
        }
        if let Some(iif) = &self.iif {
            selected &= origin.iif? == iif;
        }
        if let Some((mark, mask)) = self.fwmark {
            // A pod's packets carry no firewall mark: the rule's mark must be 0 where it looks.
            selected &= mark & mask == 0;
        }
        Some(selected != self.invert)
    }
}

fn in_prefix(ip: IpAddr, prefix: IpAddr, len: u8) -> bool {
    let (ip, prefix, bits) = match (ip, prefix) {
        (IpAddr::V4(ip), IpAddr::V4(prefix)) => (u128::from(ip.to_bits()), u128::from(prefix.to_bits()), 32),
        (IpAddr::V6(ip), IpAddr::V6(prefix)) => (ip.to_bits(), prefix.to_bits(), 128),
        _ => return false,
    };
    let len = u32::from(len).min(bits);
    let shift = bits - len;
    len == 0 || (ip >> shift) == (prefix >> shift)
}

#[cfg(test)]
pub(super) mod fixtures {
    //! Route and rule messages as the kernel dumps them.

    use netlink_packet_route::{AddressFamily, route::RouteHeader};

    use super::*;

    /// A unicast route to `destination` (`"default"` or a prefix) in `table` through `oif`.
    pub fn route(destination: &str, table: u32, oif: u32) -> RouteMessage {
        typed_route(destination, table, Some(oif), RouteType::Unicast)
    }

    pub fn typed_route(destination: &str, table: u32, oif: Option<u32>, kind: RouteType) -> RouteMessage {
        let mut message = RouteMessage::default();
        message.header.kind = kind;
        // What the kernel puts in the 8-bit field for tables above 255.
        message.header.table = u8::try_from(table).unwrap_or(252);
        message.attributes.push(RouteAttribute::Table(table));
        if destination != "default" {
            let (ip, len) = destination.split_once('/').unwrap();
            let ip: IpAddr = ip.parse().unwrap();
            message.header.address_family = if ip.is_ipv4() { AddressFamily::Inet } else { AddressFamily::Inet6 };
            message.header.destination_prefix_length = len.parse().unwrap();
            message.attributes.push(RouteAttribute::Destination(match ip {
                IpAddr::V4(ip) => RouteAddress::Inet(ip),
                IpAddr::V6(ip) => RouteAddress::Inet6(ip),
            }));
        }
        message.attributes.extend(oif.map(RouteAttribute::Oif));
        message
    }

    /// `ip rule add priority P [attributes] lookup T`, as the kernel dumps it: with
    /// `suppress_prefixlength` -1, "none".
    pub fn rule(priority: u32, table: u32, attributes: Vec<RuleAttribute>) -> RuleMessage {
        let mut message = RuleMessage::default();
        message.header.action = RuleAction::ToTable;
        message.header.table = u8::try_from(table).unwrap_or(252);
        message.attributes = vec![RuleAttribute::Priority(priority), RuleAttribute::Table(table)];
        if !attributes.iter().any(|attr| matches!(attr, RuleAttribute::SuppressPrefixLen(_))) {
            message.attributes.push(RuleAttribute::SuppressPrefixLen(u32::MAX));
        }
        message.attributes.extend(attributes);
        message
    }

    /// The rules every kernel starts with: local, main, default.
    pub fn default_rules() -> Vec<RuleMessage> {
        vec![rule(0, 255, vec![]), rule(32766, u32::from(RouteHeader::RT_TABLE_MAIN), vec![]), rule(32767, 253, vec![])]
    }

    pub fn tables(routes: &[RouteMessage], rules: &[RuleMessage]) -> Tables {
        Tables::new(routes, Some(rules))
    }

    pub fn routing(ipv4: Tables, ipv6: Tables) -> Routing {
        Routing { ipv4, ipv6 }
    }
}

#[cfg(test)]
mod tests {
    use super::{fixtures::*, *};

    const MAIN: u32 = RT_TABLE_MAIN;
    const POD: Origin<'static> = Origin { source: Some(IpAddr::V4(std::net::Ipv4Addr::new(10, 244, 0, 2))), iif: Some("cni0") };

    #[test]
    fn the_table_id_above_255_comes_from_the_attribute() {
        // Table 1000 is 252 in the header; a rule points the pod's traffic at it.
        let routes = [route("default", MAIN, 2), route("default", 1000, 3)];
        let mut rules = default_rules();
        rules.push(rule(100, 1000, vec![RuleAttribute::Iifname("cni0".into())]));
        assert_eq!(tables(&routes, &rules).default_route_device(&POD), Some(3));
        // No rule consults table 1000, nor table 252: main's default route.
        assert_eq!(tables(&routes, &default_rules()).default_route_device(&POD), Some(2));
        let compat_only = [route("default", 1000, 3)];
        let mut rules = default_rules();
        rules.push(rule(100, 252, vec![]));
        assert_eq!(tables(&compat_only, &rules).default_route_device(&POD), None, "table 252 is not table 1000");
    }

    #[test]
    fn a_default_route_in_a_table_no_rule_consults_is_not_taken() {
        let routes = [route("10.99.0.0/24", MAIN, 2), route("default", 100, 3)];
        assert_eq!(tables(&routes, &default_rules()).default_route_device(&POD), None);
    }

    #[test]
    fn rules_select_by_source_and_incoming_device_in_priority_order() {
        let routes = [route("default", MAIN, 2), route("default", 100, 3), route("default", 200, 4)];
        let mut rules = default_rules();
        let source = |ip: &str, len| {
            let mut rule = rule(300, 200, vec![RuleAttribute::Source(ip.parse().unwrap())]);
            rule.header.src_len = len;
            rule
        };
        rules.push(source("10.244.0.0", 16));
        rules.push(rule(500, 100, vec![RuleAttribute::Iifname("cni0".into())]));
        let tables = tables(&routes, &rules);
        assert_eq!(tables.default_route_device(&POD), Some(4), "priority 300 before 500");
        let other_pod = Origin { source: Some("10.245.0.2".parse().unwrap()), iif: Some("cni0") };
        assert_eq!(tables.default_route_device(&other_pod), Some(3));
        let node = Origin { source: Some("10.99.0.1".parse().unwrap()), iif: Some("lo") };
        assert_eq!(tables.default_route_device(&node), Some(2));
        // Traffic whose source and device vary: only rules without those selectors count.
        assert_eq!(tables.default_route_device(&Origin::default()), Some(2));
    }

    /// wg-quick: `not fwmark 51820 lookup 51820` sends unmarked traffic (the pods') into the
    /// tunnel, and `lookup main suppress_prefixlength 0` keeps main's specific routes only.
    #[test]
    fn wg_quick_rules_send_pod_traffic_to_its_table() {
        let routes = [route("default", MAIN, 2), route("default", 51820, 9)];
        let mut rules = default_rules();
        rules.push(rule(32764, MAIN, vec![RuleAttribute::SuppressPrefixLen(0)]));
        let mut not_marked = rule(32765, 51820, vec![RuleAttribute::FwMark(51820)]);
        not_marked.header.flags = RuleFlags::Invert;
        rules.push(not_marked);
        assert_eq!(tables(&routes, &rules).default_route_device(&POD), Some(9));
        // Marked traffic only (Calico's, Cilium's rules) never decides for all of a pod's.
        let mut rules = default_rules();
        rules.push(rule(100, 51820, vec![RuleAttribute::FwMark(0x200), RuleAttribute::FwMask(0xf00)]));
        assert_eq!(tables(&routes, &rules).default_route_device(&POD), Some(2));
    }

    #[test]
    fn goto_skips_the_rules_before_its_target() {
        let routes = [route("default", MAIN, 2), route("default", 100, 3)];
        let mut jump = rule(100, 0, vec![RuleAttribute::Goto(32766)]);
        jump.header.action = RuleAction::Goto;
        let mut rules = default_rules();
        rules.extend([jump, rule(200, 100, vec![])]);
        assert_eq!(tables(&routes, &rules).default_route_device(&POD), Some(2));
    }

    #[test]
    fn throw_goes_on_and_unreachable_ends_the_lookup() {
        let mut rules = default_rules();
        rules.push(rule(100, 100, vec![]));
        let throw = [typed_route("default", 100, None, RouteType::Throw), route("default", MAIN, 2)];
        assert_eq!(tables(&throw, &rules).default_route_device(&POD), Some(2));
        let unreachable = [typed_route("default", 100, None, RouteType::Unreachable), route("default", MAIN, 2)];
        assert_eq!(tables(&unreachable, &rules).default_route_device(&POD), None);
        // Rules that depend on the destination or the protocol are skipped.
        let mut narrow = default_rules();
        narrow.push(rule(100, 100, vec![RuleAttribute::Oifname("eth1".into())]));
        let mut to_prefix = rule(101, 100, vec![RuleAttribute::Destination("10.0.0.0".parse().unwrap())]);
        to_prefix.header.dst_len = 8;
        narrow.push(to_prefix);
        let routes = [route("default", 100, 3), route("default", MAIN, 2)];
        assert_eq!(tables(&routes, &narrow).default_route_device(&POD), Some(2));
    }

    #[test]
    fn the_lowest_metric_default_wins_and_a_kernel_without_rules_uses_main() {
        let mut low = route("default", MAIN, 3);
        low.attributes.push(RouteAttribute::Priority(10));
        let mut high = route("default", MAIN, 2);
        high.attributes.push(RouteAttribute::Priority(100));
        assert_eq!(tables(&[high.clone(), low.clone()], &default_rules()).default_route_device(&POD), Some(3));
        let routes = [route("default", 100, 4), high];
        assert_eq!(Tables::new(&routes, None).default_route_device(&POD), Some(2));
    }

    #[test]
    fn link_local_and_multicast_routes_say_nothing_about_a_family() {
        let v6 = tables(&[route("fe80::/64", MAIN, 3), route("ff00::/8", 255, 3), route("fd00:10:244:1::/64", MAIN, 8)], &[]);
        let v4 = tables(&[route("10.244.1.0/24", MAIN, 3), route("169.254.0.0/16", MAIN, 8)], &[]);
        let routing = routing(v4, v6);
        assert!(routing.may_carry(3, Family::V4) && !routing.may_carry(3, Family::V6), "flannel.1");
        assert!(routing.may_carry(8, Family::V6) && !routing.may_carry(8, Family::V4), "flannel-v6.1");
        assert!(routing.may_carry(5, Family::V4) && routing.may_carry(5, Family::V6), "no routes at all");
    }
}
