//! Service DNAT as the followed pods' packets show it, shared by the detectors of the two
//! classic kube-proxy pitfalls (`br-netfilter-off`, `hairpin-off`) and by the drop
//! explanations; and the flows such a finding explains, which the other detectors then leave
//! to it: blaming the same packets on something else as well would send the reader after the
//! wrong fix.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    hash::Hash,
    net::IpAddr,
};

use tracer_common::{IPPROTO_TCP, IPPROTO_UDP};

use super::{FlowMap, TCP_ACK};
use crate::{
    events::{
        correlate::{Fingerprint, Flow, Sighting},
        decode::{Layer, Packet, TCP_SYN},
    },
    node::{HopKey, Path},
};

/// An address and a port.
pub type Endpoint = (IpAddr, u16);

/// A followed pod's end of a TCP or UDP conversation it opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientFlow {
    pub proto: u8,
    pub pod: IpAddr,
    pub port: u16,
}

/// Where a client flow was addressed (a Service) and where DNAT sent it (a backend).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceDnat {
    pub service: Endpoint,
    pub backend: Endpoint,
}

/// How many of the newest opening packets are remembered by fingerprint, and how many of the
/// newest flows by their client end. Both pitfalls show within a round trip of a flow's first
/// packet (DNAT as it crosses the node, the drop or the untranslated reply right after), so
/// only the newest ones matter, and the oldest are forgotten rather than the newest refused:
/// a busy pod's many flows never fill the tables.
const MAX_RECENT_PACKETS: usize = 4_096;
const MAX_RECENT_FLOWS: usize = 16_384;
/// Distinct backend addresses remembered.
const MAX_BACKENDS: usize = 1_024;

/// Packets that open a flow: a TCP SYN, or any UDP datagram (each may be the first).
fn is_opening(layer: &Layer) -> bool {
    match layer.proto {
        IPPROTO_TCP => layer.tcp_flags & TCP_SYN != 0 && layer.tcp_flags & TCP_ACK == 0,
        IPPROTO_UDP => true,
        _ => false,
    }
}

/// A map that keeps its newest `capacity` keys, in the order they were first inserted.
struct Newest<K, V> {
    map: FlowMap<K, V>,
    order: VecDeque<K>,
    capacity: usize,
}

impl<K: Copy + Eq + Hash, V: Copy> Newest<K, V> {
    fn new(capacity: usize) -> Self {
        Self { map: FlowMap::default(), order: VecDeque::new(), capacity }
    }

    /// Inserts `value` unless `key` is there already; forgets the oldest key beyond capacity.
    fn insert_new(&mut self, key: K, value: V) {
        if self.map.contains_key(&key) {
            return;
        }
        self.map.insert(key, value);
        self.order.push_back(key);
        if self.order.len() > self.capacity
            && let Some(oldest) = self.order.pop_front()
        {
            self.map.remove(&oldest);
        }
    }

    fn get(&self, key: &K) -> Option<V> {
        self.map.get(key).copied()
    }
}

/// Where the followed pods addressed the flows they opened, where they entered the path, and
/// where Service DNAT sent them: the same opening packet seen again further along the path
/// with another destination. Remembers the newest flows only.
pub struct ServiceFlows<'a> {
    path: &'a Path,
    /// The destination of each client flow's first opening packet.
    addressed: Newest<ClientFlow, Endpoint>,
    /// The destination of opening packets as they entered, by fingerprint.
    entered: Newest<Fingerprint, Endpoint>,
    translated: Newest<ClientFlow, ServiceDnat>,
    backends: BTreeSet<IpAddr>,
}

impl<'a> ServiceFlows<'a> {
    pub fn new(path: &'a Path) -> Self {
        Self {
            path,
            addressed: Newest::new(MAX_RECENT_FLOWS),
            entered: Newest::new(MAX_RECENT_PACKETS),
            translated: Newest::new(MAX_RECENT_FLOWS),
            backends: BTreeSet::new(),
        }
    }

    /// Returns the flow and its destination when this packet opened it where its pod's
    /// packets enter the path.
    pub fn observe(&mut self, packet: &Packet, sighting: Option<&Sighting>) -> Option<(ClientFlow, Endpoint)> {
        let sighting = sighting.filter(|sighting| sighting.flow == Flow::FromPod)?;
        let layer = packet.pod_layer();
        if !is_opening(layer) {
            return None;
        }
        let flow = ClientFlow { proto: layer.proto, pod: layer.src, port: layer.sport };
        let destination = (layer.dst, layer.dport);
        if sighting.previous.is_none() {
            if (HopKey { ifindex: packet.ifindex, direction: packet.direction }) != self.path.entry(layer.src) {
                return None;
            }
            self.addressed.insert_new(flow, destination);
            self.entered.insert_new(sighting.fingerprint, destination);
            return Some((flow, destination));
        }
        let addressed = self.entered.get(&sighting.fingerprint)?;
        if addressed != destination {
            self.translated.insert_new(flow, ServiceDnat { service: addressed, backend: destination });
            if self.backends.len() < MAX_BACKENDS {
                self.backends.insert(destination.0);
            }
        }
        None
    }

    /// Where the flow's first opening packet was addressed as it entered the path.
    pub fn addressed(&self, flow: ClientFlow) -> Option<Endpoint> {
        self.addressed.get(&flow)
    }

    /// The flow's Service DNAT, when a hop saw its opening packet translated.
    pub fn translated(&self, flow: ClientFlow) -> Option<ServiceDnat> {
        self.translated.get(&flow)
    }

    /// Backend addresses a hop saw flows translated to.
    pub fn backends(&self) -> &BTreeSet<IpAddr> {
        &self.backends
    }
}

/// Flows of the followed pods that a pitfall finding explains, with their Service DNAT: the
/// other detectors leave their packets out.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Explained {
    flows: HashMap<ClientFlow, ServiceDnat>,
}

impl Explained {
    pub fn insert(&mut self, flow: ClientFlow, dnat: ServiceDnat) {
        self.flows.insert(flow, dnat);
    }

    pub fn extend(&mut self, other: Explained) {
        self.flows.extend(other.flows);
    }

    /// Whether `proto` packets between `a` and `b`, either way, belong to an explained flow:
    /// one of them is the client's end, and the other the Service it addressed or the backend
    /// DNAT sent it to.
    pub fn covers(&self, proto: u8, a: Endpoint, b: Endpoint) -> bool {
        let client_to = |(pod, port): Endpoint, other: Endpoint| {
            self.flows.get(&ClientFlow { proto, pod, port }).is_some_and(|dnat| other == dnat.service || other == dnat.backend)
        };
        client_to(a, b) || client_to(b, a)
    }

    /// Whether it explains `pod`'s `proto` flows to `service`, all of them DNATed (where a hop
    /// saw it) to the backends of those it explains: for requests folded together without
    /// their client ports.
    pub fn explains_service(&self, proto: u8, pod: IpAddr, service: Endpoint, dnat_to: &BTreeSet<Endpoint>) -> bool {
        let backends: BTreeSet<Endpoint> = self
            .flows
            .iter()
            .filter(|(flow, dnat)| (flow.proto, flow.pod) == (proto, pod) && dnat.service == service)
            .map(|(_, dnat)| dnat.backend)
            .collect();
        !backends.is_empty() && dnat_to.is_subset(&backends)
    }

    /// Whether `client` is the client's end of an explained flow and `other` the address of
    /// the Service it addressed or of its backend, on any port: for what names a peer by
    /// address alone (a port unreachable's quote holds no more).
    pub fn covers_client_of(&self, proto: u8, (pod, port): Endpoint, other: IpAddr) -> bool {
        self.flows.get(&ClientFlow { proto, pod, port }).is_some_and(|dnat| other == dnat.service.0 || other == dnat.backend.0)
    }
}

#[cfg(test)]
mod tests {
    use super::{super::testing::*, *};
    use crate::{Direction, events::decode::TCP_RST, node::path::fixtures::local_path};

    const SERVICE: &str = "10.96.0.20";
    const BACKEND: &str = "10.244.0.3";

    /// Pod A's SYN to the Service at its veth, then DNATed as the node routes it back out cni0.
    fn dnat_journey(feed: &mut Feed, flows: &mut ServiceFlows<'_>, sport: u16, start_ns: u64) {
        let syn = tcp(POD, sport, SERVICE, 80, TCP_SYN, 0);
        let at_veth = packet(syn.clone(), 5, Direction::Ingress, start_ns);
        let dnated = packet(Layer { dst: ip(BACKEND), dport: 8080, ..syn }, 4, Direction::Egress, start_ns + 1000);
        for packet in [at_veth, dnated] {
            let sighting = feed.observe(&packet);
            flows.observe(&packet, sighting.as_ref());
        }
    }

    #[test]
    fn an_opening_packet_seen_again_with_another_destination_was_translated() {
        let path = local_path();
        let mut flows = ServiceFlows::new(&path);
        let mut feed = Feed::new(&path);
        dnat_journey(&mut feed, &mut flows, 40000, 0);
        let flow = ClientFlow { proto: IPPROTO_TCP, pod: ip(POD), port: 40000 };
        assert_eq!(flows.addressed(flow), Some((ip(SERVICE), 80)));
        assert_eq!(flows.translated(flow), Some(ServiceDnat { service: (ip(SERVICE), 80), backend: (ip(BACKEND), 8080) }));
        assert_eq!(flows.backends(), &BTreeSet::from([ip(BACKEND)]));
    }

    #[test]
    fn untranslated_flows_and_other_packets_are_no_dnat() {
        let path = local_path();
        let mut flows = ServiceFlows::new(&path);
        let mut feed = Feed::new(&path);
        // A SYN to a pod straight across the tunnel: the same destination at every hop.
        for (ifindex, direction) in OUT {
            let packet = packet(tcp(POD, 40000, PEER, 80, TCP_SYN, 0), ifindex, direction, 0);
            let sighting = feed.observe(&packet);
            flows.observe(&packet, sighting.as_ref());
        }
        // A RST to one destination, first seen at the veth and then at cni0 egress with
        // another: not an opening packet, so not a flow this tracks.
        let rst = tcp(POD, 40001, SERVICE, 80, TCP_RST, 0);
        for packet in [packet(rst.clone(), 5, Direction::Ingress, 10), packet(Layer { dst: ip(BACKEND), ..rst }, 4, Direction::Egress, 20)]
        {
            let sighting = feed.observe(&packet);
            flows.observe(&packet, sighting.as_ref());
        }
        assert_eq!(flows.translated(ClientFlow { proto: IPPROTO_TCP, pod: ip(POD), port: 40000 }), None);
        assert_eq!(flows.addressed(ClientFlow { proto: IPPROTO_TCP, pod: ip(POD), port: 40001 }), None);
        assert!(flows.backends().is_empty());
    }

    /// Only the newest opening packets and flows are remembered: the oldest are forgotten, a
    /// new one is never refused, and the tables stay bounded.
    #[test]
    fn the_oldest_flows_are_forgotten() {
        let path = local_path();
        let mut flows = ServiceFlows::new(&path);
        let mut feed = Feed::new(&path);
        let datagram = |index: u32| Layer { ip_id: index as u16, ..udp(POD, 10_000 + (index % 50_000) as u16, SERVICE, 53) };
        let total = MAX_RECENT_FLOWS as u32 + 10;
        for index in 0..total {
            let packet = packet(datagram(index), 5, Direction::Ingress, u64::from(index));
            let sighting = feed.observe(&packet);
            flows.observe(&packet, sighting.as_ref());
        }
        assert_eq!((flows.entered.map.len(), flows.entered.order.len()), (MAX_RECENT_PACKETS, MAX_RECENT_PACKETS));
        assert_eq!((flows.addressed.map.len(), flows.addressed.order.len()), (MAX_RECENT_FLOWS, MAX_RECENT_FLOWS));
        let client = |index: u32| ClientFlow { proto: IPPROTO_UDP, pod: ip(POD), port: 10_000 + index as u16 };
        assert_eq!(flows.addressed(client(0)), None, "the oldest flow is forgotten");
        assert_eq!(flows.addressed(client(total - 1)), Some((ip(SERVICE), 53)), "the newest is remembered");
        // An opening packet seen again after many others entered is not matched; the newest is.
        for index in [0, total - 1] {
            let late = packet(Layer { dst: ip(BACKEND), ..datagram(index) }, 4, Direction::Egress, u64::from(total + index));
            let sighting = feed.observe(&late);
            flows.observe(&late, sighting.as_ref());
        }
        assert_eq!(flows.translated(client(0)), None);
        assert_eq!(flows.translated(client(total - 1)), Some(ServiceDnat { service: (ip(SERVICE), 53), backend: (ip(BACKEND), 53) }));
    }

    #[test]
    fn explained_flows_cover_packets_between_the_client_and_its_service_or_backend() {
        let mut explained = Explained::default();
        let client = (ip(POD), 40000);
        explained.insert(
            ClientFlow { proto: IPPROTO_TCP, pod: client.0, port: client.1 },
            ServiceDnat { service: (ip(SERVICE), 80), backend: (ip(BACKEND), 8080) },
        );
        assert!(explained.covers(IPPROTO_TCP, client, (ip(SERVICE), 80)));
        assert!(explained.covers(IPPROTO_TCP, (ip(BACKEND), 8080), client), "either way");
        assert!(explained.covers(IPPROTO_TCP, (ip(POD), 40000), (ip(BACKEND), 8080)));
        assert!(!explained.covers(IPPROTO_UDP, client, (ip(SERVICE), 80)), "another protocol");
        assert!(!explained.covers(IPPROTO_TCP, (ip(POD), 40001), (ip(SERVICE), 80)), "another client port");
        assert!(!explained.covers(IPPROTO_TCP, client, (ip(PEER), 80)), "another peer");
        assert!(explained.covers_client_of(IPPROTO_TCP, client, ip(BACKEND)));
        assert!(!explained.covers_client_of(IPPROTO_TCP, (ip(BACKEND), 8080), ip(POD)), "only from the client's end");
        let service = (ip(SERVICE), 80);
        assert!(explained.explains_service(IPPROTO_TCP, ip(POD), service, &BTreeSet::new()), "never seen DNATed");
        assert!(explained.explains_service(IPPROTO_TCP, ip(POD), service, &BTreeSet::from([(ip(BACKEND), 8080)])));
        assert!(!explained.explains_service(IPPROTO_TCP, ip(POD), service, &BTreeSet::from([(ip(PEER), 8080)])), "DNATed elsewhere too");
        assert!(!explained.explains_service(IPPROTO_TCP, ip(PEER), service, &BTreeSet::new()), "another pod");
        assert!(!explained.explains_service(IPPROTO_TCP, ip(POD), (ip(SERVICE), 443), &BTreeSet::new()), "another Service port");
    }
}
