//! Requests the pod sent and whether their replies came back, shared by the no-reply and the
//! dns-unanswered detectors, each of which tracks its own kinds of request.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use serde_json::{Value, json};
use tracer_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};

use super::{
    FlowMap, MAX_GROUPS, MAX_REQUESTS, TCP_ACK,
    services::{ClientFlow, Explained},
};
use crate::{
    events::{
        correlate::{Fingerprint, Flow, Sighting},
        decode::{Layer, Packet, TCP_SYN},
    },
    node::{HopKey, Path, path::Step},
};

const DNS_PORT: u16 = 53;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RequestKind {
    Echo,
    TcpSyn,
    Dns,
}

/// A request a followed pod sent, identified so that its reply can be recognised: per
/// followed IP, so that with several followed, one pod's reply never answers another's request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct RequestKey {
    kind: RequestKind,
    pod: IpAddr,
    proto: u8,
    pod_port: u16,
    /// ICMP echo id and sequence.
    echo: (u16, u16),
}

#[derive(Clone, Debug)]
struct Request {
    first_ns: u64,
    peer: IpAddr,
    peer_port: u16,
    packets: u64,
    /// Hops that saw the request, in the order they saw it.
    hops: Vec<HopKey>,
    /// Destination after Service DNAT, when a hop saw a different one.
    dnat_to: Option<(IpAddr, u16)>,
    /// The source address the node's NAT gave them (masquerade), where a hop saw them
    /// translated.
    translated_to: Option<IpAddr>,
    answered: bool,
}

/// Unanswered requests of one kind to one peer and port, and how far they got.
pub struct Unanswered {
    pub kind: RequestKind,
    pub peer: IpAddr,
    pub port: u16,
    pub requests: usize,
    /// The evidence both detectors report: counts, peer, and the hops reached.
    pub evidence: Value,
    /// "the last hop they reached was …, where they left this node; no reply came back through …".
    pub reach: String,
    /// The interface of the last hop they reached.
    pub last_hop: Option<String>,
    /// Where Service DNAT sent them, as `ip:port`.
    pub dnat_to: Vec<String>,
}

impl Unanswered {
    /// "ICMP echo requests", "TCP connection attempts to port 80", "DNS queries to …".
    pub fn what(&self) -> String {
        match self.kind {
            RequestKind::Echo => "ICMP echo requests".to_string(),
            RequestKind::TcpSyn => format!("TCP connection attempts to port {}", self.port),
            RequestKind::Dns => format!("DNS queries to {}:{}", self.peer, self.port),
        }
    }
}

/// Client flows listed per group, so that those a pitfall finding explains can be left out;
/// requests of flows beyond the list are counted per pod and protocol.
pub(super) const MAX_CLIENTS_LISTED: usize = 256;

/// Unanswered requests of one kind to one peer and port, folded together: the live ones a
/// report summarises, and the settled ones the table no longer holds.
#[derive(Clone, Debug, Default)]
struct Group {
    requests: usize,
    packets: u64,
    hops: BTreeSet<HopKey>,
    dnat_to: BTreeSet<(IpAddr, u16)>,
    translated_to: BTreeSet<IpAddr>,
    /// Requests and packets per TCP or UDP client flow.
    clients: BTreeMap<ClientFlow, (usize, u64)>,
    /// Requests and packets of client flows beyond the list, per pod and protocol.
    unlisted: BTreeMap<(IpAddr, u8), (usize, u64)>,
}

impl Group {
    fn add(&mut self, key: &RequestKey, request: &Request) {
        self.requests += 1;
        self.packets += request.packets;
        self.hops.extend(request.hops.iter().copied());
        self.dnat_to.extend(request.dnat_to);
        self.translated_to.extend(request.translated_to);
        if !matches!(key.proto, IPPROTO_TCP | IPPROTO_UDP) {
            return;
        }
        let client = ClientFlow { proto: key.proto, pod: key.pod, port: key.pod_port };
        let (requests, packets) = if self.clients.len() < MAX_CLIENTS_LISTED || self.clients.contains_key(&client) {
            self.clients.entry(client).or_default()
        } else {
            self.unlisted.entry((key.pod, key.proto)).or_default()
        };
        *requests += 1;
        *packets += request.packets;
    }

    /// The group without the requests a pitfall finding explains: those of the client flows
    /// it covers to `peer`, and the unlisted ones of a pod whose flows to `peer` it explains
    /// when no hop saw any of the group's requests DNATed elsewhere. None when nothing is left.
    fn without(mut self, explained: &Explained, peer: (IpAddr, u16)) -> Option<Self> {
        let mut left_out: Vec<(usize, u64)> = self
            .clients
            .iter()
            .filter(|(client, _)| explained.covers(client.proto, (client.pod, client.port), peer))
            .map(|(_, counts)| *counts)
            .collect();
        left_out.extend(
            self.unlisted
                .iter()
                .filter(|((pod, proto), _)| explained.explains_service(*proto, *pod, peer, &self.dnat_to))
                .map(|(_, counts)| *counts),
        );
        for (requests, packets) in left_out {
            self.requests -= requests;
            self.packets -= packets;
        }
        (self.requests > 0).then_some(self)
    }
}

type GroupKey = (RequestKind, IpAddr, u16);

pub struct RequestTracker<'a> {
    path: &'a Path,
    kinds: &'static [RequestKind],
    reply_timeout_ns: u64,
    /// Requests still within their reply timeout, or not yet settled.
    requests: FlowMap<RequestKey, Request>,
    by_fingerprint: FlowMap<Fingerprint, RequestKey>,
    /// Requests past their reply timeout and unanswered, folded per kind, peer and port, so
    /// the table holds only those still waiting: a busy pod never fills it.
    settled: BTreeMap<GroupKey, Group>,
    /// When requests were last settled.
    settled_at_ns: u64,
    /// Requests not tracked because the table was full of requests still waiting, or whose
    /// group did not fit among the settled ones.
    untracked: u64,
    /// Flows a pitfall finding explains, set when the trace ends.
    explained: Explained,
}

impl<'a> RequestTracker<'a> {
    pub fn new(path: &'a Path, kinds: &'static [RequestKind], reply_timeout_ns: u64) -> Self {
        Self {
            path,
            kinds,
            reply_timeout_ns,
            requests: FlowMap::default(),
            by_fingerprint: FlowMap::default(),
            settled: BTreeMap::new(),
            settled_at_ns: 0,
            untracked: 0,
            explained: Explained::default(),
        }
    }

    /// Leaves requests of flows a pitfall finding explains out of `unanswered`.
    pub fn defer_to(&mut self, explained: &Explained) {
        self.explained = explained.clone();
    }

    /// Removes the requests whose reply timeout has passed: answered ones are done, and
    /// unanswered ones join their group of settled ones. At most a few times per reply
    /// timeout, since it walks the table.
    fn settle(&mut self, now: u64) {
        if now.saturating_sub(self.settled_at_ns) < self.reply_timeout_ns / 4 {
            return;
        }
        self.settled_at_ns = now;
        let cutoff = now.saturating_sub(self.reply_timeout_ns);
        let due: Vec<RequestKey> = self.requests.iter().filter(|(_, request)| request.first_ns <= cutoff).map(|(key, _)| *key).collect();
        for key in due {
            let Some(request) = self.requests.remove(&key) else { continue };
            if request.answered {
                continue;
            }
            let group_key = (key.kind, request.peer, request.peer_port);
            if self.settled.len() < MAX_GROUPS || self.settled.contains_key(&group_key) {
                self.settled.entry(group_key).or_default().add(&key, &request);
            } else {
                self.untracked += 1;
            }
        }
        self.by_fingerprint.retain(|_, key| self.requests.contains_key(key));
    }

    pub fn untracked(&self) -> u64 {
        self.untracked
    }

    pub fn observe(&mut self, packet: &Packet, sighting: Option<&Sighting>) {
        let Some(sighting) = sighting else { return };
        let layer = packet.pod_layer();
        if sighting.flow == Flow::FromPod {
            let hop = HopKey { ifindex: packet.ifindex, direction: packet.direction };
            // What the node's NAT made of the pod's address, where it shows.
            let translated_to = packet.translated.map(|wire| wire.src).filter(|src| *src != layer.src);
            self.track_request(layer, hop, sighting, translated_to, packet.ktime_ns);
        }
        // With both ends followed, a reply comes from a followed pod too.
        if self.path.follows(layer.dst) {
            self.track_reply(layer);
        }
    }

    fn track_request(&mut self, layer: &Layer, hop: HopKey, sighting: &Sighting, translated_to: Option<IpAddr>, now: u64) {
        if let Some(key) = self.by_fingerprint.get(&sighting.fingerprint).copied() {
            if let Some(request) = self.requests.get_mut(&key) {
                if !request.hops.contains(&hop) {
                    request.hops.push(hop);
                }
                request.translated_to = request.translated_to.or(translated_to);
                if (layer.dst, layer.dport) != (request.peer, request.peer_port) && request.dnat_to.is_none() {
                    request.dnat_to = Some((layer.dst, layer.dport));
                }
            }
            return;
        }
        // Each followed IP's requests start where its packets enter the path.
        if hop != self.path.entry(layer.src) {
            return;
        }
        let Some(key) = request_key(layer).filter(|key| self.kinds.contains(&key.kind)) else { return };
        if self.requests.len() >= MAX_REQUESTS || self.by_fingerprint.len() >= 4 * MAX_REQUESTS {
            self.settle(now);
        }
        if let Some(request) = self.requests.get_mut(&key) {
            request.packets += 1;
        } else if self.requests.len() < MAX_REQUESTS {
            let request = Request {
                first_ns: now,
                peer: layer.dst,
                peer_port: layer.dport,
                packets: 1,
                hops: vec![hop],
                dnat_to: None,
                translated_to,
                answered: false,
            };
            self.requests.insert(key, request);
        } else {
            self.untracked += 1;
            return;
        }
        if self.by_fingerprint.len() < 4 * MAX_REQUESTS {
            self.by_fingerprint.insert(sighting.fingerprint, key);
        }
    }

    fn track_reply(&mut self, layer: &Layer) {
        let pod = layer.dst;
        let answered: &[RequestKey] = match layer.proto {
            IPPROTO_ICMP | IPPROTO_ICMPV6 if matches!(layer.icmp_type, 0 | 129) => {
                &[RequestKey { kind: RequestKind::Echo, pod, proto: layer.proto, pod_port: 0, echo: (layer.icmp_id, layer.icmp_seq) }]
            }
            // Any TCP segment back, even a RST, answers the connection attempt.
            IPPROTO_TCP => &[
                RequestKey { kind: RequestKind::TcpSyn, pod, proto: IPPROTO_TCP, pod_port: layer.dport, echo: (0, 0) },
                RequestKey { kind: RequestKind::Dns, pod, proto: IPPROTO_TCP, pod_port: layer.dport, echo: (0, 0) },
            ],
            IPPROTO_UDP => &[RequestKey { kind: RequestKind::Dns, pod, proto: IPPROTO_UDP, pod_port: layer.dport, echo: (0, 0) }],
            _ => &[],
        };
        for key in answered {
            if let Some(request) = self.requests.get_mut(key) {
                request.answered = true;
            }
        }
    }

    /// Requests still unanswered a reply timeout before `end_ns` (younger ones may yet be
    /// answered), grouped by kind, peer and port, with those settled earlier.
    pub fn unanswered(&self, end_ns: u64) -> Vec<Unanswered> {
        let cutoff = end_ns.saturating_sub(self.reply_timeout_ns);
        let mut groups = self.settled.clone();
        for (key, request) in &self.requests {
            if !request.answered && request.first_ns <= cutoff {
                groups.entry((key.kind, request.peer, request.peer_port)).or_default().add(key, request);
            }
        }
        groups
            .into_iter()
            .filter_map(|((kind, peer, port), group)| Some(((kind, peer, port), group.without(&self.explained, (peer, port))?)))
            .map(|((kind, peer, port), group)| self.summarise(kind, peer, port, &group))
            .collect()
    }

    fn summarise(&self, kind: RequestKind, peer: IpAddr, port: u16, group: &Group) -> Unanswered {
        let reach = Reach::of(self.path, group.hops.iter().copied());
        let seen_labels = reach.seen_labels(self.path);
        let first_missing = reach.first_missing(self.path);
        let last_label = seen_labels.last().cloned();
        let dnat_to: Vec<String> = group.dnat_to.iter().map(|(ip, p)| format!("{ip}:{p}")).collect();
        let translated_to: Vec<String> = group.translated_to.iter().map(IpAddr::to_string).collect();
        let evidence = json!({
            "requests": group.requests,
            "packets": group.packets,
            "peer": peer,
            "port": port,
            "last_hop": last_label,
            "first_hop_missing": first_missing,
            "hops_seen": seen_labels,
            "dnat_to": dnat_to,
            "translated_to": translated_to,
        });
        // Only where the way out ends did the requests leave this node: past that, what is
        // missing is the reply. Before it, they may have been delivered off the traced path
        // (to a pod on this node, or the node itself), so the next hop is no hop they needed.
        let left_the_node = reach.seen.last().is_some_and(|(step, _)| self.path.next_on_same_way(*step).is_none());
        // Masqueraded requests left as the node's address: the peer answers that, and its reply
        // comes back to it.
        let translated =
            if translated_to.is_empty() { String::new() } else { format!(" translated by the node's NAT to {}", translated_to.join(", ")) };
        let reach_text = match (&last_label, &first_missing) {
            (Some(last), Some(missing)) if left_the_node => {
                format!("the last hop they reached was {last}, where they left this node{translated}; no reply came back through {missing}")
            }
            (Some(last), Some(missing)) => format!(
                "the last hop they reached was {last}; the next traced hop, {missing}, never saw them: they were dropped on this node or delivered off the traced path"
            ),
            (Some(last), None) => format!("they reached {last}"),
            _ => "no hop saw them".to_string(),
        };
        let last_hop = reach.seen.last().and_then(|(_, key)| self.path.hop(key.ifindex)).map(|hop| hop.ifname.clone());
        Unanswered { kind, peer, port, requests: group.requests, evidence, reach: reach_text, last_hop, dnat_to }
    }
}

fn request_key(layer: &Layer) -> Option<RequestKey> {
    let pod = layer.src;
    match layer.proto {
        IPPROTO_ICMP | IPPROTO_ICMPV6 if matches!(layer.icmp_type, 8 | 128) => {
            Some(RequestKey { kind: RequestKind::Echo, pod, proto: layer.proto, pod_port: 0, echo: (layer.icmp_id, layer.icmp_seq) })
        }
        IPPROTO_TCP if layer.tcp_flags & TCP_SYN != 0 && layer.tcp_flags & TCP_ACK == 0 => Some(RequestKey {
            kind: if layer.dport == DNS_PORT { RequestKind::Dns } else { RequestKind::TcpSyn },
            pod,
            proto: IPPROTO_TCP,
            pod_port: layer.sport,
            echo: (0, 0),
        }),
        IPPROTO_UDP if layer.dport == DNS_PORT => {
            Some(RequestKey { kind: RequestKind::Dns, pod, proto: IPPROTO_UDP, pod_port: layer.sport, echo: (0, 0) })
        }
        _ => None,
    }
}

/// The hops a set of requests reached, and so the first hop on their way that none reached.
struct Reach {
    /// (step, hop) of every hop that saw a request, in travel order.
    seen: Vec<(Step, HopKey)>,
}

impl Reach {
    fn of(path: &Path, hops: impl Iterator<Item = HopKey>) -> Self {
        let mut seen: Vec<(Step, HopKey)> = hops.filter_map(|key| Some((path.step_of(key)?, key))).collect();
        seen.sort_by_key(|(step, key)| (*step, path.at_step(*step).iter().position(|k| k == key)));
        seen.dedup();
        Self { seen }
    }

    fn seen_labels(&self, path: &Path) -> Vec<String> {
        self.seen.iter().filter_map(|(_, key)| path.label(&[*key])).collect()
    }

    /// The step after the last one reached. Of its alternatives, those the requests used at
    /// the same stage on the other way, if any: a reply returns through the bond slave the
    /// request left by, not through an idle one.
    fn first_missing(&self, path: &Path) -> Option<String> {
        let (last, _) = self.seen.last()?;
        let alternatives = path.at_step(last + 1);
        let used: Vec<HopKey> =
            alternatives.iter().copied().filter(|key| self.seen.iter().any(|(_, seen)| seen.ifindex == key.ifindex)).collect();
        path.label(if used.is_empty() { &alternatives } else { &used })
    }
}
