//! Recognises the same packet at each hop and keeps per-hop statistics.
//!
//! A packet is identified by a fingerprint of the fields that no hop on the path rewrites:
//! Service DNAT changes the destination address and port, VXLAN wraps the packet in new
//! headers, and forwarding decrements the TTL, but the pod-side address and port, the IP ID,
//! the payload length and the TCP sequence or ICMP id/sequence stay the same.
//!
//! Those are not enough on real traffic: Linux sends IP ID 0 in DF datagrams from unconnected
//! UDP sockets (DNS among them), and IPv6 has no IP ID and a flow label that is constant per
//! socket. So the first payload bytes of a UDP datagram (a DNS query's id) and the TCP
//! timestamp and newest SACK edge (which tell duplicate ACKs and retransmits apart) go in too.

use std::{
    collections::VecDeque,
    hash::{BuildHasherDefault, Hasher},
    net::IpAddr,
};

use tracer_common::{IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP};

use super::{
    decode::{Layer, Packet},
    histogram::Histogram,
};
use crate::node::HopKey;

/// Identity of one packet, stable across hops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Fingerprint(u64);

/// The hasher of the correlator's tables, whose keys are small and trusted (a fingerprint,
/// already a hash, and a hop), and of the fingerprint itself (with `avalanche` at the end):
/// a multiply-rotate mix per word instead of SipHash on every event.
#[derive(Default)]
pub struct WordHasher(u64);

impl Hasher for WordHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x517c_c1b7_2722_0a95);
    }

    fn write_u32(&mut self, word: u32) {
        self.write_u64(u64::from(word));
    }

    fn write_u8(&mut self, word: u8) {
        self.write_u64(u64::from(word));
    }

    fn write_usize(&mut self, word: usize) {
        self.write_u64(word as u64);
    }

    fn write_isize(&mut self, word: isize) {
        self.write_u64(word as u64);
    }
}

/// A table keyed by fingerprints (already hashes) or other small trusted keys.
pub(crate) type FastMap<K, V> = hashbrown::HashMap<K, V, BuildHasherDefault<WordHasher>>;

/// Which way a packet travels relative to the followed pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Flow {
    FromPod,
    ToPod,
}

/// Fingerprints a packet's pod-level header, or returns `None` when neither address is a
/// followed pod (which the kernel filter should already have excluded).
pub fn fingerprint(layer: &Layer, followed: &[IpAddr]) -> Option<(Fingerprint, Flow)> {
    let (flow, pod_addr, pod_port) = if followed.contains(&layer.src) {
        (Flow::FromPod, layer.src, layer.sport)
    } else if followed.contains(&layer.dst) {
        (Flow::ToPod, layer.dst, layer.dport)
    } else {
        return None;
    };
    // The fields packed into few words, each word one step of the mix: every field keeps
    // all its bits, so packets that differ in any of them still differ.
    let mut hasher = WordHasher::default();
    match pod_addr {
        IpAddr::V4(v4) => hasher.write_u64(u64::from(v4.to_bits()) | 1 << 32),
        IpAddr::V6(v6) => {
            let bits = v6.to_bits();
            hasher.write_u64(bits as u64);
            hasher.write_u64((bits >> 64) as u64);
        }
    }
    // IPv6 has no IP ID outside fragments; the flow label is the closest stable field.
    hasher.write_u64(
        u64::from(flow == Flow::ToPod)
            | u64::from(layer.proto) << 8
            | u64::from(layer.ip_id) << 16
            | u64::from(layer.payload_len()) << 32
            | u64::from(layer.later_fragment) << 48,
    );
    let port = if matches!(layer.proto, IPPROTO_TCP | IPPROTO_UDP) { pod_port } else { 0 };
    hasher.write_u64(u64::from(layer.flow_label) | u64::from(port) << 32);
    match layer.proto {
        IPPROTO_TCP => {
            hasher.write_u64(u64::from(layer.tcp_seq) | u64::from(layer.tcp_ack) << 32);
            hasher.write_u64(u64::from(layer.tcp_flags) | u64::from(layer.tcp_tsval) << 32);
            hasher.write_u64(u64::from(layer.tcp_sack_right));
        }
        IPPROTO_UDP => hasher.write_u64(u64::from(u32::from_ne_bytes(layer.payload_head))),
        IPPROTO_ICMP | IPPROTO_ICMPV6 => hasher.write_u64(
            u64::from(layer.icmp_type) | u64::from(layer.icmp_code) << 8 | u64::from(layer.icmp_id) << 16 | u64::from(layer.icmp_seq) << 32,
        ),
        _ => {}
    }
    Some((Fingerprint(avalanche(hasher.finish())), flow))
}

/// MurmurHash3's 64-bit finaliser: every input bit flips each output bit with probability
/// about one half, so fingerprints that differ in one field differ everywhere.
fn avalanche(mut hash: u64) -> u64 {
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

/// Everything counted at one hop.
#[derive(Clone, Debug, Default)]
pub struct HopStats {
    pub packets: u64,
    pub bytes: u64,
    pub max_len: u32,
    /// Largest frame that was not a GSO super-packet, i.e. what a wire would carry.
    pub max_wire_len: u32,
    /// Packets also seen at an earlier hop, whose latency is in `latency_ns`.
    pub linked: u64,
    /// Time since the packet was seen at its previous hop.
    pub latency_ns: Histogram,
    /// Packets whose journey (so far) ended here.
    pub last_seen: u64,
}

/// A packet in flight: where and when it was last seen. 32 bytes, so that the table's
/// entries (with their key) take as few cache lines as they can.
#[derive(Clone, Debug)]
struct InFlight {
    last_ns: u64,
    /// Hops already seen, so a second sighting at one of them is recognised as a new packet:
    /// bit `n` for the hop numbered `n`. No allocation per packet.
    seen: u64,
    generation: u64,
    /// The hop's number (`Correlator::hops`).
    last_hop: u32,
}

const _: () = assert!(size_of::<InFlight>() == 32);

/// Bounds on correlation memory.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub max_in_flight: usize,
    /// A packet not seen again within this time has finished its journey.
    pub expiry_ns: u64,
}

/// The in-flight table's default bound: as many entries as a hash table of 2^17 buckets holds
/// under churn. A table kept at its bound (a removal for every insert) slowly fills its free
/// slots with tombstones; then it rehashes in place only if it is at most half full (7/8 of
/// its buckets are usable), and doubles otherwise. With 65,536 as the bound, the table of a
/// 60 s lab trace doubled to 2^18 buckets (10.7 MB instead of 5.4).
pub const MAX_IN_FLIGHT: usize = (1 << 17) * 7 / 8 / 2;

impl Default for Limits {
    fn default() -> Self {
        Self { max_in_flight: MAX_IN_FLIGHT, expiry_ns: 2_000_000_000 }
    }
}

/// An evicted packet seen this recently may still be crossing the path: a node's hops are
/// microseconds apart, and even a packet queued behind a shaper is on in well under this.
pub const IN_TRANSIT_NS: u64 = 100_000_000;

/// The outcome of observing one packet at one hop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sighting {
    pub fingerprint: Fingerprint,
    pub flow: Flow,
    /// The hop it was seen at before this one, and how long ago.
    pub previous: Option<(HopKey, u64)>,
}

/// Follows packets across hops with bounded memory.
pub struct Correlator {
    followed: Vec<IpAddr>,
    limits: Limits,
    /// Every hop seen, numbered in the order first seen: one hash lookup per event finds the
    /// number, and the rest is indexing. Hops past the 64th have no bit in `InFlight::seen`:
    /// a repeated sighting there is not recognised (a path has a handful of hops).
    hop_numbers: FastMap<HopKey, usize>,
    hops: Vec<(HopKey, HopStats)>,
    in_flight: FastMap<Fingerprint, InFlight>,
    /// Insertion order for expiry and eviction; stale generations are skipped.
    order: VecDeque<(Fingerprint, u64, u64)>,
    next_generation: u64,
    /// Packets the full table evicted before their expiry.
    pub evicted: u64,
    /// Of those, packets last seen less than `IN_TRANSIT_NS` before: likely still crossing
    /// the path, so their later sightings start new journeys and their hops go unlinked.
    pub evicted_in_transit: u64,
    /// The newest event's time, against which an evicted packet's age is taken.
    now_ns: u64,
    /// Events whose addresses matched no followed IP.
    pub unmatched: u64,
}

impl Correlator {
    pub fn new(followed: Vec<IpAddr>, limits: Limits) -> Self {
        Self {
            followed,
            limits,
            hop_numbers: FastMap::default(),
            hops: Vec::new(),
            in_flight: FastMap::default(),
            order: VecDeque::new(),
            next_generation: 0,
            evicted: 0,
            evicted_in_transit: 0,
            now_ns: 0,
            unmatched: 0,
        }
    }

    pub fn observe(&mut self, packet: &Packet) -> Option<Sighting> {
        let hop = self.hop_number(HopKey { ifindex: packet.ifindex, direction: packet.direction });
        let stats = &mut self.hops[hop].1;
        stats.packets += 1;
        stats.bytes += u64::from(packet.skb_len);
        stats.max_len = stats.max_len.max(packet.skb_len);
        if !packet.is_gso() {
            stats.max_wire_len = stats.max_wire_len.max(packet.skb_len);
        }

        let Some((fingerprint, flow)) = fingerprint(packet.pod_layer(), &self.followed) else {
            self.unmatched += 1;
            return None;
        };
        self.now_ns = self.now_ns.max(packet.ktime_ns);
        self.expire(packet.ktime_ns);

        let bit = 1u64.checked_shl(hop as u32).unwrap_or(0);
        let previous = match self.in_flight.get_mut(&fingerprint) {
            // Seen here before: a new packet with the same identity (a collision, or a
            // duplicate the kernel made), so its journey restarts.
            Some(entry) if entry.seen & bit != 0 => None,
            Some(entry) => {
                let previous = (entry.last_hop as usize, packet.ktime_ns.saturating_sub(entry.last_ns));
                entry.last_hop = hop as u32;
                entry.last_ns = packet.ktime_ns;
                entry.seen |= bit;
                Some(previous)
            }
            None => None,
        };
        match previous {
            Some((previous_hop, latency)) => {
                self.hops[previous_hop].1.last_seen -= 1;
                let stats = &mut self.hops[hop].1;
                stats.linked += 1;
                stats.latency_ns.record(latency);
                stats.last_seen += 1;
            }
            None => self.start(fingerprint, hop, bit, packet.ktime_ns),
        }
        let previous = previous.map(|(number, latency)| (self.hops[number].0, latency));
        Some(Sighting { fingerprint, flow, previous })
    }

    /// The hop's number, numbering it if it is new.
    fn hop_number(&mut self, hop: HopKey) -> usize {
        let hops = &mut self.hops;
        *self.hop_numbers.entry(hop).or_insert_with(|| {
            hops.push((hop, HopStats::default()));
            hops.len() - 1
        })
    }

    fn start(&mut self, fingerprint: Fingerprint, hop: usize, bit: u64, now_ns: u64) {
        if self.in_flight.len() >= self.limits.max_in_flight {
            self.evict_oldest();
        }
        let generation = self.next_generation;
        self.next_generation += 1;
        self.in_flight.insert(fingerprint, InFlight { last_ns: now_ns, seen: bit, generation, last_hop: hop as u32 });
        self.order.push_back((fingerprint, generation, now_ns));
        self.hops[hop].1.last_seen += 1;
        // Stale entries (restarted journeys) would otherwise pile up in `order`.
        if self.order.len() > 2 * self.limits.max_in_flight {
            self.order.retain(|(fp, generation, _)| self.in_flight.get(fp).is_some_and(|e| e.generation == *generation));
        }
    }

    fn expire(&mut self, now_ns: u64) {
        while let Some(&(fingerprint, generation, started)) = self.order.front() {
            if now_ns.saturating_sub(started) < self.limits.expiry_ns {
                break;
            }
            self.order.pop_front();
            if self.in_flight.get(&fingerprint).is_some_and(|e| e.generation == generation) {
                self.in_flight.remove(&fingerprint);
            }
        }
    }

    fn evict_oldest(&mut self) {
        while let Some((fingerprint, generation, _)) = self.order.pop_front() {
            if let Some(entry) = self.in_flight.get(&fingerprint)
                && entry.generation == generation
            {
                if self.now_ns.saturating_sub(entry.last_ns) < IN_TRANSIT_NS {
                    self.evicted_in_transit += 1;
                }
                self.in_flight.remove(&fingerprint);
                self.evicted += 1;
                return;
            }
        }
    }

    /// The hops a packet still in flight was seen at on its journey so far, and when it was
    /// last seen: what tells a drop that the packet went on (a copy was freed).
    pub fn journey(&self, fingerprint: Fingerprint) -> Option<(impl Iterator<Item = HopKey> + '_, u64)> {
        let entry = self.in_flight.get(&fingerprint)?;
        let hops = self.hops.iter().take(64).enumerate().filter(|(number, _)| entry.seen & 1 << number != 0).map(|(_, (hop, _))| *hop);
        Some((hops, entry.last_ns))
    }

    pub fn hop_stats(&self, hop: HopKey) -> Option<&HopStats> {
        self.hop_numbers.get(&hop).map(|&number| &self.hops[number].1)
    }

    /// How many packets the table holds at most.
    pub fn table_size(&self) -> usize {
        self.limits.max_in_flight
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        Direction,
        events::testing::{self, packet},
    };

    /// An ICMP echo request with its id, sequence and IP ID.
    fn icmp(src: &str, dst: &str, id: u16, seq: u16, ip_id: u16) -> Layer {
        Layer { ip_id, icmp_type: 8, icmp_id: id, icmp_seq: seq, ..testing::layer(src, dst, IPPROTO_ICMP) }
    }

    fn tcp(src: &str, sport: u16, dst: &str, dport: u16, seq: u32, ip_id: u16, payload: u16) -> Layer {
        Layer {
            proto: IPPROTO_TCP,
            sport,
            dport,
            tcp_seq: seq,
            tcp_ack: 1,
            tcp_flags: 0x10,
            tcp_header_len: 32,
            total_len: 20 + 32 + payload,
            ..icmp(src, dst, 0, 0, ip_id)
        }
    }

    fn pod() -> Vec<IpAddr> {
        vec!["10.244.0.2".parse().unwrap()]
    }

    #[test]
    fn fingerprint_survives_dnat_and_ttl() {
        let before = tcp("10.244.0.2", 40000, "10.96.0.10", 53, 7, 99, 40);
        let mut after = tcp("10.244.0.2", 40000, "10.244.1.5", 5353, 7, 99, 40);
        after.ttl = 63;
        assert_eq!(fingerprint(&before, &pod()), fingerprint(&after, &pod()));
    }

    #[test]
    fn fingerprint_survives_vxlan_encapsulation() {
        let inner = icmp("10.244.0.2", "10.244.1.2", 5, 1, 1234);
        let plain = packet(inner.clone(), 3, Direction::Ingress, 0);
        let mut encapsulated = packet(icmp("10.99.0.1", "10.99.0.2", 0, 0, 7), 9, Direction::Egress, 10);
        encapsulated.inner = Some(inner);
        assert_eq!(fingerprint(plain.pod_layer(), &pod()).unwrap().0, fingerprint(encapsulated.pod_layer(), &pod()).unwrap().0);
    }

    #[test]
    fn retransmission_is_a_different_packet() {
        // Same seq, new IP ID: the kernel sends a retransmit as a new datagram.
        let first = tcp("10.244.0.2", 40000, "10.244.1.2", 80, 1000, 1, 1398);
        let again = tcp("10.244.0.2", 40000, "10.244.1.2", 80, 1000, 2, 1398);
        assert_ne!(fingerprint(&first, &pod()), fingerprint(&again, &pod()));
    }

    #[test]
    fn flow_follows_the_pod_address() {
        let out = icmp("10.244.0.2", "10.244.1.2", 1, 1, 1);
        let back = icmp("10.244.1.2", "10.244.0.2", 1, 1, 1);
        assert_eq!(fingerprint(&out, &pod()).unwrap().1, Flow::FromPod);
        assert_eq!(fingerprint(&back, &pod()).unwrap().1, Flow::ToPod);
        assert_ne!(fingerprint(&out, &pod()).unwrap().0, fingerprint(&back, &pod()).unwrap().0);
        assert!(fingerprint(&icmp("1.1.1.1", "2.2.2.2", 1, 1, 1), &pod()).is_none());
    }

    /// Realistic streams: collisions among packets that are in flight together must be nil,
    /// and the only repeats over a long trace come from IP ID wrap-around of identical UDP
    /// datagrams, which are never in flight at the same time.
    #[test]
    fn collision_behaviour() {
        use std::collections::HashSet;
        let pods = pod();
        let mut seen = HashSet::new();
        let mut collisions = 0;
        // 50k TCP segments of one connection, IP IDs incrementing and wrapping.
        for i in 0..50_000u32 {
            let layer = tcp("10.244.0.2", 40000, "10.244.1.2", 80, 1 + i * 1398, i as u16, 1398);
            collisions += usize::from(!seen.insert(fingerprint(&layer, &pods).unwrap().0));
        }
        // 10k pings from 10 processes.
        for i in 0..10_000u32 {
            let layer = icmp("10.244.0.2", "10.244.1.2", (i % 10) as u16, (i / 10) as u16, i as u16);
            collisions += usize::from(!seen.insert(fingerprint(&layer, &pods).unwrap().0));
        }
        assert_eq!(collisions, 0);

        // Identical UDP datagrams from one port repeat once the 16-bit IP ID wraps.
        let mut udp_seen = HashSet::new();
        let mut repeats_at = None;
        for i in 0..70_000u32 {
            let layer = Layer { proto: IPPROTO_UDP, sport: 5000, dport: 53, ..icmp("10.244.0.2", "10.96.0.10", 0, 0, i as u16) };
            if !udp_seen.insert(fingerprint(&layer, &pods).unwrap().0) && repeats_at.is_none() {
                repeats_at = Some(i);
            }
        }
        assert_eq!(repeats_at, Some(65_536));
    }

    /// xorshift64*: deterministic, so the measured counts are exact.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
    }

    /// The fingerprint as it was before the payload head, TSval and SACK edge went in.
    fn fingerprint_without_new_fields(layer: &Layer) -> Fingerprint {
        let old = Layer { tcp_tsval: 0, tcp_sack_right: 0, payload_head: [0; 4], ..layer.clone() };
        fingerprint(&old, &pod_ips()).unwrap().0
    }

    fn pod_ips() -> Vec<IpAddr> {
        vec!["10.244.0.2".parse().unwrap(), "fd00:10:244::2".parse().unwrap()]
    }

    /// Packets that share a fingerprint with another packet of the same window (in flight
    /// together), by each fingerprint function.
    fn collisions(windows: &[Vec<Layer>]) -> (usize, usize) {
        use std::collections::HashSet;
        let count = |print: &dyn Fn(&Layer) -> Fingerprint| {
            windows
                .iter()
                .map(|window| {
                    let mut seen = HashSet::new();
                    window.iter().filter(|layer| !seen.insert(print(layer))).count()
                })
                .sum()
        };
        (count(&fingerprint_without_new_fields), count(&|layer: &Layer| fingerprint(layer, &pod_ips()).unwrap().0))
    }

    /// A resolver's DNS bursts: 200 rounds of 25 lookups (A and AAAA each, same size, from a
    /// handful of sockets), IP ID 0 and DF as Linux sends them from unconnected UDP sockets,
    /// random query ids.
    #[test]
    fn dns_bursts_with_ip_id_zero_are_told_apart_by_the_query_id() {
        let mut rng = Rng(0x5eed);
        let names = [b"kubernetes.default.svc.cluster.local".len(), b"api.example.com".len(), b"db.shop.svc.cluster.local".len()];
        let windows: Vec<Vec<Layer>> = (0..200)
            .map(|_| {
                (0..50)
                    .map(|query| {
                        let id = (rng.next() >> 48) as u16;
                        let length = 20 + 8 + 12 + names[query / 2 % names.len()] as u16 + 2 + 4;
                        let [id_high, id_low] = id.to_be_bytes();
                        Layer {
                            proto: IPPROTO_UDP,
                            sport: 40000 + (query % 4) as u16,
                            dport: 53,
                            total_len: length,
                            payload_head: [id_high, id_low, 0x01, 0x00],
                            ..icmp("10.244.0.2", "10.96.0.10", 0, 0, 0)
                        }
                    })
                    .collect()
            })
            .collect();
        let (before, after) = collisions(&windows);
        eprintln!("DNS bursts: {before} of 10000 queries collided before, {after} after");
        assert!(before > 7_000, "{before}");
        // Only a query id repeated by chance within one burst (same socket, same size) collides.
        assert!(after <= 5, "{after}");
    }

    /// An IPv6 bulk transfer out of the pod at 1 Gbit/s for 100 ms (a segment every 12 us, the
    /// flow label constant, no IP ID), one segment in 200 lost: the receiver sends a duplicate
    /// ACK with a growing SACK edge for every later segment until the fast retransmit (one
    /// 200 us round trip after the third) arrives. TSval ticks every millisecond, as Linux's.
    #[test]
    fn ipv6_duplicate_acks_and_retransmits_are_told_apart() {
        let tcp6 = |src: &str, dst: &str, seq: u32, ack: u32, payload: u16, tsval_us: u64| Layer {
            flow_label: 0x5_1234,
            tcp_tsval: (tsval_us / 1_000) as u32,
            total_len: 40 + 32 + payload,
            header_len: 40,
            ip_id: 0,
            tcp_ack: ack,
            ..tcp(src, 40000, dst, 5201, seq, 0, payload)
        };
        let (pod, peer) = ("fd00:10:244::2", "fd00:10:244:1::2");
        let (mut out, mut back) = (Vec::new(), Vec::new());
        let (mut lost, mut retransmits) = (None, 0);
        for segment in 0..8_000u32 {
            let now = u64::from(segment) * 12;
            let seq = segment * 1448;
            out.push(tcp6(pod, peer, seq, 1, 1448, now));
            match lost {
                None if segment % 200 == 199 => lost = Some((seq, now, 0u32)),
                Some((lost_seq, lost_at, dups)) => {
                    let mut ack = Layer { tcp_sack_right: seq + 1448, ..tcp6(peer, pod, 1, lost_seq, 0, now + 100) };
                    (ack.sport, ack.dport) = (5201, 40000);
                    back.push(ack);
                    if dups == 2 {
                        retransmits += 1;
                        out.push(tcp6(pod, peer, lost_seq, 1, 1448, now + 100));
                    }
                    lost = if now + 100 >= lost_at + 400 { None } else { Some((lost_seq, lost_at, dups + 1)) };
                }
                None => {}
            }
        }
        let (acks_before, acks_after) = collisions(std::slice::from_ref(&back));
        let (data_before, data_after) = collisions(&[out]);
        eprintln!(
            "IPv6 bulk transfer: {acks_before} of {} duplicate ACKs and {data_before} of {retransmits} retransmits collided before, \
             {acks_after} and {data_after} after",
            back.len()
        );
        assert_eq!((acks_before, data_before), (back.len() - retransmits, retransmits), "all but the first ACK of each loss");
        assert_eq!(acks_after, 0, "the SACK edge grows with every duplicate ACK");
        // A retransmit sent within the millisecond of its original carries the same TSval and
        // still collides; the correlator then tells them apart by the hop seen twice.
        assert!(data_after < data_before, "{data_after}");
    }

    #[test]
    fn links_a_packet_across_hops_with_latency() {
        let mut correlator = Correlator::new(pod(), Limits::default());
        let layer = icmp("10.244.0.2", "10.244.1.2", 1, 1, 1);
        let hops = [(3, Direction::Ingress), (2, Direction::Ingress), (5, Direction::Egress), (1, Direction::Egress)];
        for (step, (ifindex, direction)) in hops.iter().enumerate() {
            let sighting = correlator.observe(&packet(layer.clone(), *ifindex, *direction, step as u64 * 1000)).unwrap();
            assert_eq!(sighting.previous.is_some(), step > 0);
        }
        for (step, (ifindex, direction)) in hops.iter().enumerate() {
            let stats = correlator.hop_stats(HopKey { ifindex: *ifindex, direction: *direction }).unwrap();
            assert_eq!(stats.packets, 1);
            assert_eq!(stats.linked, u64::from(step > 0));
            assert_eq!(stats.last_seen, u64::from(step == hops.len() - 1));
            if step > 0 {
                let p50 = stats.latency_ns.quantile(0.5).unwrap();
                assert!((900..=1100).contains(&p50), "p50 {p50}");
            }
        }
    }

    #[test]
    fn a_second_sighting_at_the_same_hop_is_a_new_packet() {
        let mut correlator = Correlator::new(pod(), Limits::default());
        let layer = icmp("10.244.0.2", "10.244.1.2", 1, 1, 1);
        correlator.observe(&packet(layer.clone(), 3, Direction::Ingress, 0));
        let again = correlator.observe(&packet(layer, 3, Direction::Ingress, 10)).unwrap();
        assert!(again.previous.is_none());
        let stats = correlator.hop_stats(HopKey { ifindex: 3, direction: Direction::Ingress }).unwrap();
        assert_eq!((stats.packets, stats.linked), (2, 0));
    }

    #[test]
    fn memory_is_bounded() {
        let limits = Limits { max_in_flight: 100, expiry_ns: u64::MAX };
        let mut correlator = Correlator::new(pod(), limits);
        for i in 0..10_000u32 {
            correlator.observe(&packet(icmp("10.244.0.2", "10.244.1.2", 1, i as u16, i as u16), 3, Direction::Ingress, u64::from(i)));
            assert!(correlator.in_flight() <= 100);
            assert!(correlator.order.len() <= 200);
        }
        assert_eq!(correlator.evicted, 10_000 - 100);
        // One nanosecond apart: every evicted packet was still in transit.
        assert_eq!(correlator.evicted_in_transit, 10_000 - 100);
    }

    /// A full table under churn (each packet evicting the oldest) keeps its 2^17 buckets,
    /// and its insertion order as many entries, however many tombstones its removals leave:
    /// with 65,536 entries as its bound, the table doubled to 2^18 buckets within this churn
    /// (10.7 MB, as heaptrack showed it in a lab trace).
    #[test]
    fn the_default_bound_keeps_the_table_at_its_size_under_churn() {
        let mut correlator = Correlator::new(pod(), Limits::default());
        let hop = correlator.hop_number(HopKey { ifindex: 3, direction: Direction::Ingress });
        let mut rng = Rng(7);
        for i in 0..40 * MAX_IN_FLIGHT as u64 {
            correlator.start(Fingerprint(rng.next()), hop, 1, i);
        }
        assert_eq!(correlator.in_flight(), MAX_IN_FLIGHT);
        assert_eq!(correlator.in_flight.allocation_size(), (1 << 17) * (size_of::<(Fingerprint, InFlight)>() + 1) + 16);
        assert!(correlator.order.capacity() <= 1 << 17, "{}", correlator.order.capacity());
    }

    #[test]
    fn evicting_a_packet_long_past_its_last_hop_is_not_in_transit() {
        let limits = Limits { max_in_flight: 2, expiry_ns: u64::MAX };
        let mut correlator = Correlator::new(pod(), limits);
        let second = 1_000_000_000;
        for (i, at) in [(1u16, 0), (2, 0), (3, second), (4, second + 1)] {
            correlator.observe(&packet(icmp("10.244.0.2", "10.244.1.2", 1, i, i), 3, Direction::Ingress, at));
        }
        // The first two were a second old when the third and fourth pushed them out.
        assert_eq!((correlator.evicted, correlator.evicted_in_transit), (2, 0));
        correlator.observe(&packet(icmp("10.244.0.2", "10.244.1.2", 1, 5, 5), 3, Direction::Ingress, second + 2));
        assert_eq!((correlator.evicted, correlator.evicted_in_transit), (3, 1));
    }

    #[test]
    fn finished_packets_expire() {
        let limits = Limits { max_in_flight: 1000, expiry_ns: 1_000 };
        let mut correlator = Correlator::new(pod(), limits);
        correlator.observe(&packet(icmp("10.244.0.2", "10.244.1.2", 1, 1, 1), 3, Direction::Ingress, 0));
        correlator.observe(&packet(icmp("10.244.0.2", "10.244.1.2", 1, 2, 2), 3, Direction::Ingress, 5_000));
        assert_eq!(correlator.in_flight(), 1);
    }
}
