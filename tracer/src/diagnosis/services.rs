//! Service DNAT as the followed pods' packets show it, shared by the detectors of the two
//! classic kube-proxy pitfalls (`br-netfilter-off`, `hairpin-off`) and by the drop
//! explanations; and the flows such a finding explains, which the other detectors then leave
//! to it: blaming the same packets on something else as well would send the reader after the
//! wrong fix.

use std::{
    collections::{BTreeSet, HashMap, VecDeque},
    net::IpAddr,
};

use tracer_common::{IPPROTO_TCP, IPPROTO_UDP};

use super::{MAX_REQUESTS, TCP_ACK};
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

/// How many recent opening packets are remembered by fingerprint: DNAT happens within
/// microseconds of a packet entering the path, so only the newest ones matter.
const MAX_RECENT: usize = 4_096;

/// Packets that open a flow: a TCP SYN, or any UDP datagram (each may be the first).
fn is_opening(layer: &Layer) -> bool {
    match layer.proto {
        IPPROTO_TCP => layer.tcp_flags & TCP_SYN != 0 && layer.tcp_flags & TCP_ACK == 0,
        IPPROTO_UDP => true,
        _ => false,
    }
}

/// Where the followed pods addressed the flows they opened, where they entered the path, and
/// where Service DNAT sent them: the same opening packet seen again further along the path
/// with another destination.
pub struct ServiceFlows<'a> {
    path: &'a Path,
    /// The destination of each client flow's first opening packet.
    addressed: HashMap<ClientFlow, Endpoint>,
    /// The destination of recent opening packets as they entered, by fingerprint, and the
    /// order they came in, for eviction.
    recent: HashMap<Fingerprint, Endpoint>,
    recent_order: VecDeque<Fingerprint>,
    translated: HashMap<ClientFlow, ServiceDnat>,
    /// Flows not remembered because a table was full.
    pub untracked: u64,
}

impl<'a> ServiceFlows<'a> {
    pub fn new(path: &'a Path) -> Self {
        Self {
            path,
            addressed: HashMap::new(),
            recent: HashMap::new(),
            recent_order: VecDeque::new(),
            translated: HashMap::new(),
            untracked: 0,
        }
    }

    pub fn observe(&mut self, packet: &Packet, sighting: Option<&Sighting>) {
        let Some(sighting) = sighting.filter(|sighting| sighting.flow == Flow::FromPod) else { return };
        let layer = packet.pod_layer();
        if !is_opening(layer) {
            return;
        }
        let flow = ClientFlow { proto: layer.proto, pod: layer.src, port: layer.sport };
        let destination = (layer.dst, layer.dport);
        if sighting.previous.is_none() {
            // A flow's packets start where its pod's packets enter the path.
            if (HopKey { ifindex: packet.ifindex, direction: packet.direction }) == self.path.entry(layer.src) {
                self.entered(flow, sighting.fingerprint, destination);
            }
            return;
        }
        let Some(&addressed) = self.recent.get(&sighting.fingerprint) else { return };
        if addressed == destination || self.translated.contains_key(&flow) {
            return;
        }
        if self.translated.len() < MAX_REQUESTS {
            self.translated.insert(flow, ServiceDnat { service: addressed, backend: destination });
        } else {
            self.untracked += 1;
        }
    }

    fn entered(&mut self, flow: ClientFlow, fingerprint: Fingerprint, destination: Endpoint) {
        if self.addressed.len() < MAX_REQUESTS || self.addressed.contains_key(&flow) {
            self.addressed.entry(flow).or_insert(destination);
        } else {
            self.untracked += 1;
        }
        if self.recent.insert(fingerprint, destination).is_none() {
            self.recent_order.push_back(fingerprint);
        }
        if self.recent_order.len() > MAX_RECENT
            && let Some(oldest) = self.recent_order.pop_front()
        {
            self.recent.remove(&oldest);
        }
    }

    /// Where the flow's first opening packet was addressed as it entered the path.
    pub fn addressed(&self, flow: ClientFlow) -> Option<Endpoint> {
        self.addressed.get(&flow).copied()
    }

    /// The flow's Service DNAT, when a hop saw its opening packet translated.
    pub fn translated(&self, flow: ClientFlow) -> Option<ServiceDnat> {
        self.translated.get(&flow).copied()
    }

    /// Every backend address a hop saw a flow translated to.
    pub fn backends(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.translated.values().map(|dnat| dnat.backend.0)
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
        assert_eq!(flows.backends().collect::<Vec<_>>(), [ip(BACKEND)]);
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
        assert_eq!(flows.backends().count(), 0);
    }

    /// Only the newest opening packets are remembered by fingerprint: one seen again after
    /// many others entered is not matched, and the table stays bounded.
    #[test]
    fn the_recent_table_is_bounded() {
        let path = local_path();
        let mut flows = ServiceFlows::new(&path);
        let mut feed = Feed::new(&path);
        for port in 0..(MAX_RECENT as u16 + 10) {
            let packet = packet(Layer { ip_id: port, ..udp(POD, 10_000 + port, SERVICE, 53) }, 5, Direction::Ingress, u64::from(port));
            let sighting = feed.observe(&packet);
            flows.observe(&packet, sighting.as_ref());
        }
        assert_eq!((flows.recent.len(), flows.recent_order.len()), (MAX_RECENT, MAX_RECENT));
        let first = Layer { ip_id: 0, dst: ip(BACKEND), ..udp(POD, 10_000, SERVICE, 53) };
        let late = packet(first, 4, Direction::Egress, 100_000);
        let sighting = feed.observe(&late);
        flows.observe(&late, sighting.as_ref());
        assert_eq!(flows.translated(ClientFlow { proto: IPPROTO_UDP, pod: ip(POD), port: 10_000 }), None);
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
