//! Which kernel drops were copies: a packet freed at one hop whose fingerprint is seen at a
//! later hop of the path was not lost (a promiscuous bridge passes a copy of each frame it
//! forwards up its own stack, which frees it). The drop and the later sighting come through
//! different rings, in either order: a drop that comes after is checked against the
//! correlator's journey of the packet (the caller's `furthest`), and one that comes first
//! waits here, in a bounded table, for a later sighting.

use std::{collections::VecDeque, net::IpAddr};

use crate::{
    events::{
        correlate::{FastMap, Fingerprint, fingerprint},
        decode::Layer,
    },
    node::path::Step,
};

/// Drops waiting for a later sighting.
const MAX_PENDING: usize = 16_384;
/// A sighting this far from a drop is another packet with the same fingerprint.
const WINDOW_NS: u64 = 2_000_000_000;

pub struct Copies<K> {
    followed: Vec<IpAddr>,
    /// Drops not (yet) known to be copies: their group, step and time.
    pending: FastMap<Fingerprint, Vec<(K, Step, u64)>>,
    /// Insertion order of `pending`, for expiry and eviction.
    pending_order: VecDeque<(Fingerprint, u64)>,
    pending_len: usize,
    /// Drops that left `pending` unmatched because it was full: counted as drops, unchecked.
    pub unchecked: u64,
}

impl<K: Copy> Copies<K> {
    pub fn new(followed: Vec<IpAddr>) -> Self {
        Self { followed, pending: FastMap::default(), pending_order: VecDeque::new(), pending_len: 0, unchecked: 0 }
    }

    pub fn fingerprint(&self, layer: &Layer) -> Option<Fingerprint> {
        fingerprint(layer, &self.followed).map(|(fingerprint, _)| fingerprint)
    }

    /// A packet seen at `step`; returns the groups of earlier drops it shows were copies.
    pub fn sighted(&mut self, fingerprint: Fingerprint, step: Step, ktime_ns: u64) -> Vec<K> {
        // Nearly always so: no lookup for the packets of a trace without drops.
        if self.pending.is_empty() {
            return Vec::new();
        }
        let Some(drops) = self.pending.get_mut(&fingerprint) else { return Vec::new() };
        let (copies, still): (Vec<_>, Vec<_>) =
            drops.drain(..).partition(|(_, dropped_at, at)| *dropped_at < step && ktime_ns.abs_diff(*at) < WINDOW_NS);
        *drops = still;
        self.pending_len -= copies.len();
        if drops.is_empty() {
            self.pending.remove(&fingerprint);
        }
        copies.into_iter().map(|(key, ..)| key).collect()
    }

    /// A packet dropped at `step`, whose journey so far reached step `furthest` (last seen
    /// then): whether it is already known to be a copy (seen further, close in time);
    /// otherwise it waits for a later sighting.
    pub fn dropped(&mut self, fingerprint: Fingerprint, step: Step, ktime_ns: u64, key: K, furthest: Option<(Step, u64)>) -> bool {
        if furthest.is_some_and(|(seen, at)| seen > step && ktime_ns.abs_diff(at) < WINDOW_NS) {
            return true;
        }
        // Drops older than the window stay drops; beyond the bound, the oldest go unchecked.
        while let Some(&(oldest, at)) = self.pending_order.front() {
            let expired = ktime_ns.saturating_sub(at) >= WINDOW_NS;
            if !expired && self.pending_len < MAX_PENDING {
                break;
            }
            self.pending_order.pop_front();
            if self.forget_pending(oldest, at) && !expired {
                self.unchecked += 1;
            }
        }
        self.pending.entry(fingerprint).or_default().push((key, step, ktime_ns));
        self.pending_order.push_back((fingerprint, ktime_ns));
        self.pending_len += 1;
        false
    }

    /// Removes the pending drop of `fingerprint` at `at`, if a sighting has not already.
    fn forget_pending(&mut self, fingerprint: Fingerprint, at: u64) -> bool {
        let Some(drops) = self.pending.get_mut(&fingerprint) else { return false };
        let Some(index) = drops.iter().position(|(_, _, t)| *t == at) else { return false };
        drops.remove(index);
        self.pending_len -= 1;
        if drops.is_empty() {
            self.pending.remove(&fingerprint);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{decode::Layer, testing::*};

    fn table() -> (Copies<u32>, Fingerprint) {
        let copies = Copies::new(vec![ip(POD)]);
        let fingerprint = copies.fingerprint(&echo(POD, PEER, 8, 1)).unwrap();
        (copies, fingerprint)
    }

    #[test]
    fn only_a_sighting_further_along_and_close_in_time_makes_a_copy() {
        let (mut copies, fingerprint) = table();
        assert!(!copies.dropped(fingerprint, 1, 1_000, 7, None));
        assert!(copies.sighted(fingerprint, 1, 2_000).is_empty(), "the same step is not further");
        assert!(copies.sighted(fingerprint, 2, WINDOW_NS + 1_000).is_empty(), "another packet, 2 s later");
        assert_eq!(copies.sighted(fingerprint, 2, 3_000), [7]);
        assert!(copies.sighted(fingerprint, 3, 4_000).is_empty(), "each drop is a copy once");
        // Seen further before the drop came, close in time; not further, or long before.
        assert!(copies.dropped(fingerprint, 1, 5_000, 8, Some((2, 4_000))));
        assert!(!copies.dropped(fingerprint, 2, 5_000, 8, Some((2, 4_000))));
        assert!(!copies.dropped(fingerprint, 1, WINDOW_NS + 5_000, 8, Some((2, 4_000))));
    }

    #[test]
    fn pending_drops_are_bounded_and_the_overflow_counted() {
        let mut copies: Copies<u32> = Copies::new(vec![ip(POD)]);
        for seq in 0..MAX_PENDING as u64 + 10 {
            let fingerprint = copies.fingerprint(&Layer { ip_id: seq as u16, ..echo(POD, PEER, 8, (seq >> 16) as u16) }).unwrap();
            copies.dropped(fingerprint, 1, seq, 0, None);
        }
        assert_eq!(copies.pending_len, MAX_PENDING);
        assert_eq!(copies.unchecked, 10);
        // Past the window, old drops are decided, not unchecked.
        let fingerprint = copies.fingerprint(&echo(POD, PEER, 0, 9)).unwrap();
        copies.dropped(fingerprint, 1, 3 * WINDOW_NS, 0, None);
        assert_eq!((copies.pending_len, copies.unchecked), (1, 10));
    }
}
