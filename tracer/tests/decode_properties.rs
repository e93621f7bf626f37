//! Property tests of what userspace does with ring records: the decoders and the correlation
//! take arbitrary input without panicking, and say so with an error where a record is not
//! one of ours. Host only; nothing here touches the kernel.

use std::{mem::offset_of, net::IpAddr};

use proptest::prelude::*;
use tracer::events::{
    correlate::{Correlator, Limits},
    decode::{self, Packet},
};
use tracer_common::{DIR_EGRESS, DIR_INGRESS, KernelEvent, PacketEvent};

const FOLLOWED: &str = "10.244.0.2";

/// A PacketEvent's bytes with arbitrary content but a direction our programs write.
fn packet_event_bytes() -> impl Strategy<Value = Vec<u8>> {
    (proptest::collection::vec(any::<u8>(), size_of::<PacketEvent>()), prop_oneof![Just(DIR_INGRESS), Just(DIR_EGRESS)]).prop_map(
        |(mut bytes, direction)| {
            bytes[offset_of!(PacketEvent, direction)] = direction;
            bytes
        },
    )
}

/// Whatever a decoded packet offers a report: its descriptions and lengths.
fn touch(packet: &Packet) {
    for layer in std::iter::once(&packet.outer).chain(packet.inner.as_ref()) {
        let _ = (layer.describe(), layer.proto_name(), layer.payload_len());
    }
    let _ = (packet.pod_layer(), packet.is_gso());
}

proptest! {
    // Integration tests have no source file proptest can store regressions beside.
    #![proptest_config(ProptestConfig { failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_decode_to_a_packet_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..2 * size_of::<PacketEvent>())) {
        match decode::decode(&bytes) {
            Ok(packet) => {
                prop_assert!(bytes.len() >= size_of::<PacketEvent>());
                touch(&packet);
            }
            Err(err) => {
                let direction = bytes.get(offset_of!(PacketEvent, direction)).copied();
                let short = bytes.len() < size_of::<PacketEvent>();
                prop_assert!(short || !matches!(direction, Some(DIR_INGRESS | DIR_EGRESS)), "{err:#}");
            }
        }
    }

    #[test]
    fn any_bytes_decode_to_a_kernel_record_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..2 * size_of::<KernelEvent>())) {
        if let Ok(record) = decode::decode_kernel(&bytes) {
            prop_assert!(bytes.len() >= size_of::<KernelEvent>());
            let _ = record.pod_layer().describe();
        }
    }

    /// Arbitrary events through the correlator, with a small bound: no panic, the in-flight
    /// table never exceeds its bound, and each hop counts no more packets than it was shown.
    #[test]
    fn correlation_of_arbitrary_events_stays_bounded(events in proptest::collection::vec(packet_event_bytes(), 1..300)) {
        let limits = Limits { max_in_flight: 32, expiry_ns: 1_000_000 };
        let followed: IpAddr = FOLLOWED.parse().unwrap();
        let mut correlator = Correlator::new(vec![followed], limits);
        let mut shown = std::collections::HashMap::new();
        for bytes in &events {
            let packet = decode::decode(bytes).expect("a valid direction decodes");
            touch(&packet);
            if correlator.observe(&packet).is_some() {
                *shown.entry((packet.ifindex, packet.direction)).or_insert(0u64) += 1;
            }
            prop_assert!(correlator.in_flight() <= limits.max_in_flight);
        }
        for ((ifindex, direction), count) in shown {
            let stats = correlator.hop_stats(tracer::node::HopKey { ifindex, direction });
            prop_assert!(stats.is_some_and(|stats| stats.packets <= count), "{ifindex} {direction:?}: {stats:?} > {count}");
        }
    }
}
