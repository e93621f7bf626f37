//! The live lines of `--verbose`: one per packet per hop, as it is seen.

use std::{collections::HashMap, io::Write as _};

use crate::{
    events::{correlate::Sighting, decode::Packet},
    node::Path,
};

/// Where live lines go, if anywhere.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination {
    Stdout,
    /// When stdout carries the JSON report.
    Stderr,
}

pub struct LiveLines {
    destination: Option<Destination>,
    /// Hop names by ifindex.
    names: HashMap<u32, String>,
}

impl LiveLines {
    pub fn new(path: &Path, destination: Option<Destination>) -> Self {
        Self { destination, names: path.hops().map(|hop| (hop.ifindex, hop.ifname.clone())).collect() }
    }

    pub fn print(&self, packet: &Packet, sighting: Option<&Sighting>) {
        let Some(destination) = self.destination else { return };
        let line = self.line(packet, sighting);
        match destination {
            Destination::Stderr => crate::note!("{line}"),
            Destination::Stdout => {
                // A closed stdout (e.g. `| head`) must not abort the trace before detaching.
                let _ = writeln!(std::io::stdout().lock(), "{line}");
            }
        }
    }

    fn line(&self, packet: &Packet, sighting: Option<&Sighting>) -> String {
        let name = |ifindex: u32| self.names.get(&ifindex).map_or("?", String::as_str);
        let mut line = format!(
            "{:>15.6} {:<12} {:<7} len {:<5} {}",
            packet.ktime_ns as f64 / 1e9,
            name(packet.ifindex),
            packet.direction.to_string(),
            packet.skb_len,
            packet.pod_layer().describe()
        );
        match (packet.vni, &packet.inner) {
            (Some(vni), _) => line.push_str(&format!(" (vxlan vni {vni} {} > {})", packet.outer.src, packet.outer.dst)),
            (None, Some(_)) => line.push_str(&format!(" (ipip {} > {})", packet.outer.src, packet.outer.dst)),
            (None, None) => {}
        }
        if packet.is_gso() {
            line.push_str(&format!(" gso {}x{}", packet.gso_segs, packet.gso_size));
        }
        if let Some((previous, latency_ns)) = sighting.and_then(|s| s.previous) {
            line.push_str(&format!(" +{:.1}µs from {} {}", latency_ns as f64 / 1000.0, name(previous.ifindex), previous.direction));
        }
        line
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        Direction,
        events::{
            correlate::{Correlator, Limits},
            testing::{PEER, POD, echo, packet},
        },
        node::path::fixtures::local_path,
    };

    #[test]
    fn a_line_names_the_hop_and_where_the_packet_came_from() {
        let path = local_path();
        let live = LiveLines::new(&path, Some(Destination::Stdout));
        let mut correlator = Correlator::new(vec![path.pod_ip], Limits::default());
        let layer = echo(POD, PEER, 8, 1);
        let first = packet(layer.clone(), 5, Direction::Ingress, 1_000_000_000);
        let second = packet(layer, 4, Direction::Ingress, 1_000_003_000);
        correlator.observe(&first);
        let sighting = correlator.observe(&second);
        let line = live.line(&second, sighting.as_ref());
        assert!(line.starts_with("       1.000003 cni0         ingress len 98"), "{line}");
        assert!(line.contains("icmp 10.244.0.2 > 10.244.1.2 type 8"), "{line}");
        assert!(line.ends_with("+3.0µs from veth1 ingress"), "{line}");
    }
}
