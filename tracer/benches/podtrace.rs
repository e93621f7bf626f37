//! `cargo xtask bench` (which runs `cargo bench --package tracer --bench podtrace` after setup):
//! speed and memory figures, measured here rather than asserted in tests. Needs root, like the
//! kernel-parser tests: the TC program is loaded and run through BPF_PROG_TEST_RUN.
//!
//! - the TC program's cost per packet, in the kernel, through BPF_PROG_TEST_RUN;
//! - userspace decode + correlation throughput;
//! - correlation memory over a long trace, which must stay flat.

use std::{
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use aya::programs::{TestRun as _, TestRunOptions};
use tracer::{
    Direction,
    events::{
        correlate::{Correlator, Limits},
        decode,
    },
    probes::{AttachMode, KERNEL_RING_BYTES, LoadOptions, Probes},
};
use tracer_common::{FilterConfig, IPPROTO_TCP, IpLayer, PKT_VXLAN, PacketEvent};

fn main() -> Result<()> {
    kernel_cost()?;
    userspace_throughput();
    correlation_memory();
    Ok(())
}

fn vxlan_frame() -> Vec<u8> {
    let mut inner = vec![0u8; 14 + 20 + 20 + 100];
    inner[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    inner[14] = 0x45;
    inner[16..18].copy_from_slice(&((20 + 20 + 100) as u16).to_be_bytes());
    inner[22] = 64;
    inner[23] = IPPROTO_TCP;
    inner[26..30].copy_from_slice(&[10, 244, 0, 2]);
    inner[30..34].copy_from_slice(&[10, 244, 1, 2]);
    inner[46] = 5 << 4;
    let mut frame = vec![0u8; 14 + 20 + 8 + 8];
    frame[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    frame[14] = 0x45;
    let total = (20 + 8 + 8 + inner.len()) as u16;
    frame[16..18].copy_from_slice(&total.to_be_bytes());
    frame[22] = 64;
    frame[23] = 17;
    frame[26..30].copy_from_slice(&[10, 99, 0, 1]);
    frame[30..34].copy_from_slice(&[10, 99, 0, 2]);
    frame[36..38].copy_from_slice(&8472u16.to_be_bytes());
    frame[42] = 0x08;
    frame[48] = 1;
    frame.extend_from_slice(&inner);
    frame
}

/// Nanoseconds per run of the ingress program: on a followed VXLAN packet (event emitted),
/// on an unfollowed one (parsed and filtered out), and on a device that is not a hop (one map
/// lookup: the harness's own cost, to read the other two against).
fn kernel_cost() -> Result<()> {
    let filter = FilterConfig { vxlan_ports: [8472, 4789], ..Default::default() };
    let frame = vxlan_frame();
    let cases = [
        ("followed VXLAN packet (event emitted)", "10.244.0.2", true),
        ("unfollowed VXLAN packet", "10.1.1.1", true),
        ("packet on a device that is not a hop", "10.244.0.2", false),
    ];
    for (label, followed, on_hop) in cases {
        let mut probes = Probes::load(
            &LoadOptions { filter, layout: Default::default(), ring_bytes: 1 << 22, kernel_ring_bytes: KERNEL_RING_BYTES },
            AttachMode::Auto,
        )?;
        probes.follow(followed.parse::<IpAddr>()?)?;
        if on_hop {
            // BPF_PROG_TEST_RUN hands the program an skb on the loopback device.
            probes.register_hop(1, false)?;
        }
        // Keep the ring drained so a full ring does not turn the measurement into drops.
        let mut events = probes.take_events()?;
        let program = probes.program(Direction::Ingress)?;
        // A batch small enough for the ring to hold all its events, so every run of the
        // followed case really emits one.
        let repeat = 10_000;
        let batches = 50u32;
        let mut total = Duration::ZERO;
        for _ in 0..batches {
            let result =
                program.test_run(TestRunOptions { data_in: Some(&frame), repeat, ..Default::default() }).context("BPF_PROG_TEST_RUN")?;
            // The kernel reports the mean time of one run over the batch.
            total += result.duration;
            while events.next().is_some() {}
        }
        let lost = probes.counters()?.lost_events;
        println!(
            "bench: kernel, {label}: {} ns per packet per hop ({} runs, {lost} events lost to a full ring)",
            (total / batches).as_nanos(),
            u64::from(repeat) * u64::from(batches)
        );
    }
    Ok(())
}

fn synthetic(i: u32) -> PacketEvent {
    let mut inner = IpLayer {
        version: 4,
        proto: IPPROTO_TCP,
        ip_id: i as u16,
        total_len: 1450,
        header_len: 20,
        tcp_header_len: 32,
        tcp_seq: i.wrapping_mul(1398),
        tcp_flags: 0x10,
        sport: 40000,
        dport: 80,
        ..Default::default()
    };
    inner.src = std::net::Ipv4Addr::new(10, 244, 0, 2).to_ipv6_mapped().octets();
    inner.dst = std::net::Ipv4Addr::new(10, 244, 1, 2).to_ipv6_mapped().octets();
    PacketEvent {
        ktime_ns: u64::from(i) * 1_000,
        ifindex: 2 + i % 4,
        skb_len: 1514,
        flags: PKT_VXLAN,
        vni: 1,
        direction: (i % 2) as u8,
        inner,
        ..Default::default()
    }
}

fn as_bytes(event: &PacketEvent) -> &[u8] {
    // SAFETY: plain old data, read as bytes.
    unsafe { std::slice::from_raw_parts((event as *const PacketEvent).cast::<u8>(), size_of::<PacketEvent>()) }
}

fn userspace_throughput() {
    let events: Vec<PacketEvent> = (0..1_000_000).map(synthetic).collect();
    let mut correlator = Correlator::new(vec!["10.244.0.2".parse().unwrap()], Limits::default());
    let started = Instant::now();
    for event in &events {
        let packet = decode::decode(as_bytes(event)).expect("valid event");
        correlator.observe(&packet);
    }
    let elapsed = started.elapsed();
    println!(
        "bench: userspace decode + correlation: {:.2} M events/s ({} events in {:.2} s)",
        events.len() as f64 / elapsed.as_secs_f64() / 1e6,
        events.len(),
        elapsed.as_secs_f64()
    );
}

/// Resident memory now (not the high-water mark, which the throughput phase's input set).
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").parse().unwrap_or(0))))
        .unwrap_or(0)
}

/// Ten million distinct packets through the correlator: its memory must reach a plateau.
fn correlation_memory() {
    let mut correlator = Correlator::new(vec!["10.244.0.2".parse().unwrap()], Limits::default());
    let mut checkpoints = vec![(0, 0, rss_kib())];
    for i in 0..10_000_000u32 {
        correlator.observe(&decode::from_event(&synthetic(i)));
        if (i + 1) % 2_500_000 == 0 {
            checkpoints.push((i + 1, correlator.in_flight(), rss_kib()));
        }
    }
    for (events, in_flight, rss) in checkpoints {
        println!("bench: correlation memory after {events} events: {in_flight} packets in flight, RSS {:.1} MiB", rss as f64 / 1024.0);
    }
}
