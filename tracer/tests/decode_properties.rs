//! Property tests of what userspace does with ring records: the decoders and the correlation
//! take arbitrary input without panicking, and say so with an error where a record is not
//! one of ours. Host only; nothing here touches the kernel.

use std::{mem::offset_of, net::IpAddr};

use proptest::prelude::*;
use tracer::events::{
    correlate::{Correlator, Limits},
    decode::{self, Packet, PacketDecoder},
};
use tracer_common::{
    DIR_EGRESS, DIR_INGRESS, HEAD_LONG, HEAD_MEDIUM, HEAD_SHORT, HOP_NO_MAC_HEADER, KernelEvent, PacketMeta, PacketRecord,
};

const FOLLOWED: &str = "10.244.0.2";

fn decoder() -> PacketDecoder {
    PacketDecoder::new([8472, 4789])
}

/// A packet record of any of the three sizes with arbitrary content but the fields our programs always
/// write sound: a direction, and a head length within the head.
fn packet_record_bytes() -> impl Strategy<Value = Vec<u8>> {
    let sizes = prop_oneof![
        Just(size_of::<PacketRecord<HEAD_SHORT>>()),
        Just(size_of::<PacketRecord<HEAD_MEDIUM>>()),
        Just(size_of::<PacketRecord<HEAD_LONG>>())
    ];
    let directions = prop_oneof![Just(DIR_INGRESS), Just(DIR_EGRESS)];
    (sizes.prop_flat_map(|size| proptest::collection::vec(any::<u8>(), size)), directions, any::<u16>()).prop_map(
        |(mut bytes, direction, head_len)| {
            bytes[offset_of!(PacketMeta, direction)] = direction;
            let head_len = head_len % (bytes.len() - size_of::<PacketMeta>() + 1) as u16;
            bytes[offset_of!(PacketMeta, head_len)..][..2].copy_from_slice(&head_len.to_ne_bytes());
            bytes
        },
    )
}

/// A sound packet record whose head is an IPv4 header without options, on a device without
/// a MAC header, the rest arbitrary, sometimes from the followed pod: records that parse
/// into packets, some of them followed.
fn ipv4_record_bytes() -> impl Strategy<Value = Vec<u8>> {
    (packet_record_bytes(), any::<bool>()).prop_map(|(mut bytes, from_pod)| {
        bytes[offset_of!(PacketMeta, hop_flags)] = HOP_NO_MAC_HEADER as u8;
        let head = size_of::<PacketMeta>();
        let head_len = (bytes.len() - head) as u16;
        bytes[offset_of!(PacketMeta, head_len)..][..2].copy_from_slice(&head_len.to_ne_bytes());
        bytes[head] = 0x45;
        if from_pod {
            bytes[head + 12..head + 16].copy_from_slice(&FOLLOWED.parse::<std::net::Ipv4Addr>().unwrap().octets());
        }
        bytes
    })
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
    fn any_bytes_decode_to_a_packet_or_an_error(bytes in proptest::collection::vec(any::<u8>(), 0..size_of::<PacketRecord<HEAD_LONG>>() + 8)) {
        let mut decoder = decoder();
        match decoder.decode(&bytes) {
            Ok(packet) => {
                prop_assert!(matches!(bytes.len() - size_of::<PacketMeta>(), HEAD_SHORT | HEAD_MEDIUM | HEAD_LONG));
                if let Some(packet) = packet {
                    touch(&packet);
                }
            }
            Err(err) => {
                let direction = bytes.get(offset_of!(PacketMeta, direction)).copied();
                let sized = bytes.len().checked_sub(size_of::<PacketMeta>()).is_some_and(|head| matches!(head, HEAD_SHORT | HEAD_MEDIUM | HEAD_LONG));
                let head_len = bytes.get(offset_of!(PacketMeta, head_len)..offset_of!(PacketMeta, head_len) + 2)
                    .map(|b| usize::from(u16::from_ne_bytes([b[0], b[1]])));
                let fits = head_len.is_some_and(|len| len + size_of::<PacketMeta>() <= bytes.len());
                prop_assert!(!sized || !matches!(direction, Some(DIR_INGRESS | DIR_EGRESS)) || !fits, "{err:#}");
            }
        }
    }

    /// Every record our programs could have written decodes, to a packet or a counted
    /// unparsed one.
    #[test]
    fn sound_records_decode(bytes in packet_record_bytes()) {
        let mut decoder = decoder();
        let packet = decoder.decode(&bytes);
        prop_assert!(packet.is_ok(), "{:#}", packet.unwrap_err());
        let counts = decoder.counts();
        prop_assert_eq!(packet.unwrap().is_none(), counts.unparsed_records == 1);
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
    fn correlation_of_arbitrary_events_stays_bounded(events in proptest::collection::vec(ipv4_record_bytes(), 1..300)) {
        let limits = Limits { max_in_flight: 32, expiry_ns: 1_000_000 };
        let followed: IpAddr = FOLLOWED.parse().unwrap();
        let mut correlator = Correlator::new(vec![followed], limits);
        let mut shown = std::collections::HashMap::new();
        let mut decoder = decoder();
        for bytes in &events {
            let Some(packet) = decoder.decode(bytes).expect("a sound record decodes") else { continue };
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
