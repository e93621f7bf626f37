//! TCP connection attempts of or to the followed pods still waiting for an answer, shared by the
//! port-refused and connection-reset detectors: a RST that answers a pending attempt is a
//! refusal (nothing listens there); any other RST resets a connection that was set up, or
//! one that the other side already gave up on.

use std::{collections::HashSet, net::IpAddr};

use tracer_common::IPPROTO_TCP;

use super::{MAX_REQUESTS, TCP_ACK};
use crate::events::{
    correlate::Sighting,
    decode::{Layer, TCP_RST, TCP_SYN},
};

/// What a RST is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rst {
    /// It answered a connection attempt, of a followed pod or to one.
    Refusal,
    /// Any other.
    Reset,
}

#[derive(Default)]
pub struct Attempts {
    /// (address, port) that sent each SYN to or from a followed pod not yet answered by a
    /// SYN-ACK or RST.
    pending: HashSet<(IpAddr, u16)>,
    /// Attempts not tracked because `pending` was full.
    pub untracked: u64,
}

impl Attempts {
    /// Follows a packet at its first sighting (it crosses several hops) and says what it is
    /// if it is a TCP RST.
    pub fn observe(&mut self, layer: &Layer, sighting: Option<&Sighting>, follows: impl Fn(IpAddr) -> bool) -> Option<Rst> {
        let first_sighting = sighting.is_some_and(|s| s.previous.is_none());
        if layer.proto != IPPROTO_TCP || !first_sighting {
            return None;
        }
        let (syn, ack, rst) = (layer.tcp_flags & TCP_SYN != 0, layer.tcp_flags & TCP_ACK != 0, layer.tcp_flags & TCP_RST != 0);
        let from = (layer.src, layer.sport);
        let to = (layer.dst, layer.dport);
        // Attempts both ways: a followed server pod refuses its clients too.
        if syn && !ack && (follows(layer.src) || follows(layer.dst)) {
            if self.pending.len() < MAX_REQUESTS {
                self.pending.insert(from);
            } else {
                self.untracked += 1;
            }
            return None;
        }
        if syn && ack {
            self.pending.remove(&to);
            return None;
        }
        if !rst {
            return None;
        }
        // A refusal acknowledges the SYN it answers.
        if ack && self.pending.remove(&to) {
            return Some(Rst::Refusal);
        }
        // A side that resets its own attempt gave up on it.
        self.pending.remove(&from);
        Some(Rst::Reset)
    }
}
