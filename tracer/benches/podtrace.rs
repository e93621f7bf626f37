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
use aya::{
    maps::{MapData, RingBuf},
    programs::{TestRun as _, TestRunOptions},
};
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

fn tcp_frame() -> Vec<u8> {
    // The inner frame of `vxlan_frame`, on its own: a pod's TCP segment on a bridge or veth.
    let mut frame = vxlan_frame();
    frame.drain(..14 + 20 + 8 + 8);
    frame
}

/// A classifier of two instructions (`r0 = TC_ACT_UNSPEC; exit`), loaded with the raw
/// syscall: what BPF_PROG_TEST_RUN costs by itself, the baseline every other case is read
/// against.
struct Baseline(libc::c_int);

impl Baseline {
    fn load() -> Result<Self> {
        // mov64 r0, -1; exit
        let insns: [u64; 2] =
            [u64::from_le_bytes([0xb7, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]), u64::from_le_bytes([0x95, 0, 0, 0, 0, 0, 0, 0])];
        let license = c"GPL";
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&3u32.to_ne_bytes()); // BPF_PROG_TYPE_SCHED_CLS
        attr[4..8].copy_from_slice(&2u32.to_ne_bytes());
        attr[8..16].copy_from_slice(&(insns.as_ptr() as u64).to_ne_bytes());
        attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
        // SAFETY: BPF_PROG_LOAD with a zeroed attr holding valid pointers for the call's duration.
        let fd = unsafe { libc::syscall(libc::SYS_bpf, 5, attr.as_mut_ptr(), attr.len()) };
        anyhow::ensure!(fd >= 0, "loading the baseline program: {}", std::io::Error::last_os_error());
        Ok(Self(fd as libc::c_int))
    }

    /// The kernel's mean nanoseconds per run over `repeat` runs on `frame`.
    fn test_run(&self, frame: &[u8], repeat: u32) -> Result<Duration> {
        let mut attr = [0u8; 128];
        attr[0..4].copy_from_slice(&(self.0 as u32).to_ne_bytes());
        attr[8..12].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
        attr[16..24].copy_from_slice(&(frame.as_ptr() as u64).to_ne_bytes());
        attr[32..36].copy_from_slice(&repeat.to_ne_bytes());
        // SAFETY: BPF_PROG_TEST_RUN with a zeroed attr; `frame` outlives the call.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, 10, attr.as_mut_ptr(), attr.len()) };
        anyhow::ensure!(rc == 0, "BPF_PROG_TEST_RUN on the baseline: {}", std::io::Error::last_os_error());
        Ok(Duration::from_nanos(u64::from(u32::from_ne_bytes(attr[36..40].try_into().unwrap()))))
    }
}

impl Drop for Baseline {
    fn drop(&mut self) {
        // SAFETY: our own descriptor.
        unsafe { libc::close(self.0) };
    }
}

fn loaded(followed: &str, on_hop: bool) -> Result<(Probes, RingBuf<MapData>)> {
    let filter = FilterConfig { vxlan_ports: [8472, 4789], ..Default::default() };
    let mut probes = Probes::load(
        &LoadOptions { filter, layout: Default::default(), ring_bytes: 1 << 22, kernel_ring_bytes: KERNEL_RING_BYTES },
        AttachMode::Auto,
    )?;
    probes.follow(followed.parse::<IpAddr>()?)?;
    if on_hop {
        // BPF_PROG_TEST_RUN hands the program an skb on the loopback device.
        probes.register_hop(1, false)?;
    }
    let events = probes.take_events()?;
    Ok((probes, events))
}

fn median(values: &mut [Duration]) -> Duration {
    values.sort();
    values[values.len() / 2]
}

/// Nanoseconds per run of the ingress program, each case against the harness baseline (a
/// program that only returns), measured in interleaved batches so that a noisy neighbour
/// weighs on every case alike; the median batch is reported.
fn kernel_cost() -> Result<()> {
    let vxlan = vxlan_frame();
    let tcp = tcp_frame();
    let baseline = Baseline::load()?;
    let (unfollowed, mut unfollowed_events) = loaded("10.1.1.1", true)?;
    let (followed, mut followed_events) = loaded("10.244.0.2", true)?;
    let (off_hop, _) = loaded("10.244.0.2", false)?;
    let cases: [(&str, Option<&Probes>, &[u8]); 6] = [
        ("harness baseline (a program that only returns)", None, &tcp),
        ("unfollowed plain TCP packet", Some(&unfollowed), &tcp),
        ("unfollowed VXLAN packet", Some(&unfollowed), &vxlan),
        ("followed plain TCP packet (event emitted)", Some(&followed), &tcp),
        ("followed VXLAN packet (event emitted)", Some(&followed), &vxlan),
        ("packet on a device that is not a hop", Some(&off_hop), &tcp),
    ];
    // A batch small enough for the ring to hold all its events, so every run of the followed
    // cases really emits one.
    let repeat = 10_000u32;
    let batches = 41;
    let mut samples = vec![Vec::new(); cases.len()];
    for _ in 0..batches {
        for ((_, probes, frame), samples) in cases.iter().zip(&mut samples) {
            let mean = match probes {
                None => baseline.test_run(frame, repeat)?,
                Some(probes) => {
                    let program = probes.program(Direction::Ingress)?;
                    program
                        .test_run(TestRunOptions { data_in: Some(frame), repeat, ..Default::default() })
                        .context("BPF_PROG_TEST_RUN")?
                        .duration
                }
            };
            samples.push(mean);
            // Keep the rings drained so a full ring does not turn the measurement into drops.
            while followed_events.next().is_some() {}
            while unfollowed_events.next().is_some() {}
        }
    }
    let medians: Vec<Duration> = samples.iter_mut().map(|s| median(s)).collect();
    let base = medians[0].as_nanos() as i128;
    println!("bench: kernel TC program, median of {batches} interleaved batches of {repeat} runs (BPF_PROG_TEST_RUN, ingress):");
    for ((label, _, _), ns) in cases.iter().zip(&medians) {
        let ns = ns.as_nanos() as i128;
        println!("bench:   {label}: {ns} ns per packet, {:+} ns over the baseline ({:.2}x)", ns - base, ns as f64 / base.max(1) as f64);
    }
    let lost = followed.counters()?.lost_events;
    println!("bench:   events lost to a full ring in the followed cases: {lost}");
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
