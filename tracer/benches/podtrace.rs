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
use podtrace_tests::{
    lab::{Lab, LabSpec},
    podtrace::Podtrace,
};
use tracer::{
    Direction,
    events::{
        correlate::{Correlator, Limits},
        decode::{PacketDecoder, packet_record},
    },
    probes::{AttachMode, EventRing, KERNEL_RING_BYTES, LoadOptions, Probes},
};
use tracer_common::{FilterConfig, HEAD_MEDIUM, IPPROTO_TCP, PacketMeta};

/// Every part by default; `cargo bench -p tracer --bench podtrace -- kernel userspace` runs
/// only the parts named (kernel, userspace, memory, lab).
fn main() -> Result<()> {
    let named: Vec<String> = std::env::args().skip(1).filter(|arg| !arg.starts_with("--")).collect();
    let runs = |part: &str| named.is_empty() || named.iter().any(|name| name == part);
    if runs("kernel") {
        kernel_cost()?;
    }
    if runs("userspace") {
        userspace_throughput();
    }
    if runs("memory") {
        correlation_memory();
    }
    if runs("lab") {
        lab_throughput()?;
    }
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
    inner[34..36].copy_from_slice(&40000u16.to_be_bytes());
    inner[36..38].copy_from_slice(&80u16.to_be_bytes());
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

const VXLAN_PORTS: [u16; 2] = [8472, 4789];

fn loaded(followed: &str, on_hop: bool, full_parse_only: bool) -> Result<(Probes, EventRing)> {
    loaded_with(followed, on_hop, FilterConfig { full_parse_only: u8::from(full_parse_only), ..Default::default() })
}

fn loaded_with(followed: &str, on_hop: bool, filter: FilterConfig) -> Result<(Probes, EventRing)> {
    let filter = FilterConfig { vxlan_ports: VXLAN_PORTS, ..filter };
    let mut probes = Probes::load(
        &LoadOptions { filter, layout: Default::default(), ring_bytes: 1 << 22, kernel_ring_bytes: KERNEL_RING_BYTES },
        AttachMode::Auto,
    )?;
    probes.follow(followed.parse::<IpAddr>()?)?;
    if on_hop {
        // BPF_PROG_TEST_RUN hands the program an skb on the loopback device.
        probes.register_hop(1, 0)?;
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
    let (unfollowed, mut unfollowed_events) = loaded("10.1.1.1", true, false)?;
    let (followed, mut followed_events) = loaded("10.244.0.2", true, false)?;
    let (off_hop, _) = loaded("10.244.0.2", false, false)?;
    // The same program without its fast test: every packet parsed in full.
    let (full_parse, mut full_parse_events) = loaded("10.1.1.1", true, true)?;
    // A followed packet the fast test leaves to the full parse: `--port` narrows the trace.
    let (narrowed, mut narrowed_events) = loaded_with("10.244.0.2", true, FilterConfig { port: 80, ..Default::default() })?;
    let cases: [(&str, Option<&Probes>, &[u8]); 10] = [
        ("harness baseline (a program that only returns)", None, &tcp),
        ("unfollowed plain TCP packet", Some(&unfollowed), &tcp),
        ("unfollowed VXLAN packet", Some(&unfollowed), &vxlan),
        ("followed plain TCP packet (event emitted)", Some(&followed), &tcp),
        ("followed VXLAN packet (event emitted)", Some(&followed), &vxlan),
        ("packet on a device that is not a hop", Some(&off_hop), &tcp),
        ("unfollowed plain TCP packet, fast test off (full parse)", Some(&full_parse), &tcp),
        ("unfollowed VXLAN packet, fast test off (full parse)", Some(&full_parse), &vxlan),
        ("followed plain TCP packet with --port 80 (full parse, event emitted)", Some(&narrowed), &tcp),
        ("followed VXLAN packet with --port 80 (full parse, event emitted)", Some(&narrowed), &vxlan),
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
            followed_events.drain(|_| {});
            unfollowed_events.drain(|_| {});
            full_parse_events.drain(|_| {});
            narrowed_events.drain(|_| {});
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

/// Event `i` of a synthetic trace as its ring record: a pod's TCP segment in VXLAN
/// (`vxlan_frame`), packet `i / hops` (its own IP ID and sequence number) at hop `i % hops`
/// of `hops`, a microsecond after the previous event.
fn synthetic(template: &[u8], i: u32, hops: u32) -> Vec<u8> {
    let (packet, hop) = (i / hops, i % hops);
    let mut frame = template.to_vec();
    // The inner IP header starts at 64 and its TCP header at 84.
    frame[68..70].copy_from_slice(&(packet as u16).to_be_bytes());
    frame[88..92].copy_from_slice(&packet.wrapping_mul(1398).to_be_bytes());
    let meta =
        PacketMeta { ktime_ns: u64::from(i) * 1_000, ifindex: 2 + hop, skb_len: 1514, direction: (hop % 2) as u8, ..Default::default() };
    packet_record(meta, &frame, HEAD_MEDIUM)
}

/// How many times each userspace case runs; the median run is reported, since one run of a
/// fifth of a second takes whatever else the machine does meanwhile.
const USERSPACE_RUNS: usize = 5;

/// Decode + correlation of a million events on one core, twice: each packet seen at the four
/// hops of a node's side of a VXLAN path (veth, cni0, flannel.1, eth0), as a trace gives
/// them, and each event a packet of its own (the worst case: every event a new entry in
/// the in-flight table, and the table at its bound, so each one also evicts the oldest).
/// Each case runs `USERSPACE_RUNS` times from a fresh decoder and correlator.
fn userspace_throughput() {
    let template = vxlan_frame();
    for (hops, label) in [(4, "each packet at 4 hops"), (1, "each event a new packet")] {
        let records: Vec<Vec<u8>> = (0..1_000_000).map(|i| synthetic(&template, i, hops)).collect();
        let mut runs: Vec<Duration> = (0..USERSPACE_RUNS)
            .map(|_| {
                let mut decoder = PacketDecoder::new(VXLAN_PORTS);
                let mut correlator = Correlator::new(vec!["10.244.0.2".parse().unwrap()], Limits::default());
                let started = Instant::now();
                for record in &records {
                    let packet = decoder.decode(record).expect("a record of ours").expect("headers that parse");
                    correlator.observe(&packet);
                }
                started.elapsed()
            })
            .collect();
        let elapsed = median(&mut runs);
        println!(
            "bench: userspace decode (the packet head's parse) + correlation, {label}: {:.2} M events/s ({} events in {:.2} s, the median of {USERSPACE_RUNS} runs)",
            records.len() as f64 / elapsed.as_secs_f64() / 1e6,
            records.len(),
            elapsed.as_secs_f64()
        );
    }
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
    let template = vxlan_frame();
    let mut decoder = PacketDecoder::new(VXLAN_PORTS);
    let mut correlator = Correlator::new(vec!["10.244.0.2".parse().unwrap()], Limits::default());
    let mut checkpoints = vec![(0, 0, rss_kib())];
    for i in 0..10_000_000u32 {
        correlator.observe(&decoder.decode(&synthetic(&template, i, 1)).expect("a record of ours").expect("headers that parse"));
        if (i + 1) % 2_500_000 == 0 {
            checkpoints.push((i + 1, correlator.in_flight(), rss_kib()));
        }
    }
    for (events, in_flight, rss) in checkpoints {
        println!("bench: correlation memory after {events} events: {in_flight} packets in flight, RSS {:.1} MiB", rss as f64 / 1024.0);
    }
}

/// What runs beside the traffic in one lab measurement.
#[derive(Clone, Copy, PartialEq)]
enum Observer {
    Untraced,
    FollowingThePod,
    FollowingAnotherPod,
    Tcpdump,
}

impl Observer {
    const ALL: [Self; 4] = [Self::Untraced, Self::FollowingThePod, Self::FollowingAnotherPod, Self::Tcpdump];

    fn label(self) -> &'static str {
        match self {
            Self::Untraced => "untraced",
            Self::FollowingThePod => "podtrace following the pod",
            Self::FollowingAnotherPod => "podtrace following another pod on the node",
            Self::Tcpdump => "tcpdump -p on the same interfaces",
        }
    }
}

/// A process killed when dropped.
struct Running(std::process::Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What one podtrace run reported besides the traffic.
#[derive(Default, Clone, Copy)]
struct Traced {
    events: u64,
    lost: u64,
    peak_rss_kib: u64,
    /// podtrace's CPU time (user and system) while the traffic ran.
    cpu_ns: u64,
}

/// CPU time process `pid` has used so far, user and system (`/proc/<pid>/stat`'s utime and
/// stime, in clock ticks).
fn cpu_time_ns(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    let ticks: u64 = [11, 12].iter().filter_map(|&i| fields.get(i)?.parse::<u64>().ok()).sum();
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    ticks * 1_000_000_000 / ticks_per_second
}

fn vm_hwm_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("VmHWM:").map(|v| v.trim().trim_end_matches(" kB").parse().unwrap_or(0))))
        .unwrap_or(0)
}

/// `iperf3 -c` from `lab`'s pod A to pod B (across the VXLAN tunnel) for `seconds`, `udp64`
/// for 64-byte UDP datagrams as fast as the sender can.
fn iperf(lab: &Lab, udp64: bool, seconds: u32) -> Result<Iperf> {
    let server = lab.pod_b().ip.to_string();
    let seconds = seconds.to_string();
    let mut args = vec!["iperf3", "-c", &server, "-p", "5201", "-t", &seconds, "-J"];
    if udp64 {
        args.extend(["-u", "-l", "64", "-b", "0"]);
    }
    let output = lab.run_in(&lab.pod_a().netns, &args)?;
    let report: serde_json::Value = serde_json::from_slice(&output.stdout).context("iperf3's JSON report")?;
    let end = &report["end"];
    let received = &end["sum_received"];
    let bps = received["bits_per_second"].as_f64().with_context(|| format!("iperf3 reported no rate: {report}"))?;
    Ok(Iperf {
        bps,
        bytes: received["bytes"].as_f64().unwrap_or(0.0),
        sent_bps: end["sum_sent"]["bits_per_second"].as_f64().unwrap_or(0.0),
        lost_percent: end["sum"]["lost_percent"].as_f64().unwrap_or(0.0),
    })
}

/// What one iperf3 run reported.
struct Iperf {
    /// The receiver's rate and bytes.
    bps: f64,
    bytes: f64,
    /// The sender's rate: for a UDP flood, what it managed to send, of which the receiver
    /// lost `lost_percent` (pod B's socket buffer overflowing while iperf3 -s falls behind).
    sent_bps: f64,
    lost_percent: f64,
}

/// One measurement: `observer` started, the traffic, `observer` stopped.
fn measure(lab: &Lab, observer: Observer, udp64: bool, seconds: u32) -> Result<(Iperf, Option<Traced>)> {
    let node = lab.node_a();
    let followed = match observer {
        Observer::FollowingThePod => Some(lab.pod_a().ip),
        Observer::FollowingAnotherPod => Some(node.pods[1].ip),
        _ => None,
    };
    let tracer = followed
        .map(|ip| Podtrace::start(&node.netns, &["follow", &ip.to_string(), "--duration", "600", "--output", "json"]))
        .transpose()?;
    let mut captures = Vec::new();
    if observer == Observer::Tcpdump {
        for ifname in [&lab.pod_a().host_veth, &node.bridge, &node.vxlan, &node.underlay] {
            captures.push(Running(lab.spawn_in(&node.netns, &["tcpdump", "-p", "-n", "-q", "-i", ifname, "-w", "/dev/null"])?));
        }
        // tcpdump needs a moment to open its sockets.
        std::thread::sleep(Duration::from_millis(500));
    }
    let cpu_before = tracer.as_ref().map_or(0, |tracer| cpu_time_ns(tracer.pid()));
    let run = iperf(lab, udp64, seconds)?;
    drop(captures);
    let traced = match tracer {
        Some(tracer) => {
            let cpu_ns = cpu_time_ns(tracer.pid()) - cpu_before;
            let peak_rss_kib = vm_hwm_kib(tracer.pid());
            let report = tracer.finish()?.json()?;
            let count = |key: &str| report[key].as_u64().unwrap_or(0);
            Some(Traced { events: count("events"), lost: count("lost_events") + count("lost_kernel_events"), peak_rss_kib, cpu_ns })
        }
        None => None,
    };
    Ok((run, traced))
}

/// The median over `runs` of one of their figures.
fn median_of(runs: &[Iperf], figure: impl Fn(&Iperf) -> f64) -> f64 {
    let mut values: Vec<f64> = runs.iter().map(figure).collect();
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// iperf3 across the lab (pod A on node A to pod B on node B, through both nodes' veth, cni0,
/// flannel.1 and eth0, offloads off as the lab sets them), untraced, following pod A, following
/// another pod on node A, and with tcpdump -p on pod A's interfaces, alternated in 3 rounds;
/// the median of each. Then one 60 s follow of pod A under iperf3 for podtrace's peak RSS.
fn lab_throughput() -> Result<()> {
    // The optimised podtrace of this bench build.
    // SAFETY: set before any thread of this program starts.
    unsafe { std::env::set_var("PODTRACE_BIN", env!("CARGO_BIN_EXE_podtrace")) };
    let lab = Lab::up(LabSpec { pods_per_node: 2, ..Default::default() })?;
    let _server = Running(lab.spawn_in(&lab.pod_b().netns, &["iperf3", "-s", "-p", "5201"])?);
    std::thread::sleep(Duration::from_millis(500));
    let seconds = 5;
    for (udp64, workload) in [(false, "iperf3 TCP"), (true, "iperf3 UDP 64-byte datagrams, unlimited rate")] {
        let mut runs: Vec<Vec<Iperf>> = Observer::ALL.iter().map(|_| Vec::new()).collect();
        let mut traced: Vec<Vec<Traced>> = vec![Vec::new(); Observer::ALL.len()];
        for _round in 0..3 {
            for (i, observer) in Observer::ALL.into_iter().enumerate() {
                let (run, tracer) = measure(&lab, observer, udp64, seconds)?;
                runs[i].push(run);
                traced[i].extend(tracer);
            }
        }
        let medians: Vec<f64> = runs.iter().map(|r| median_of(r, |run| run.bps)).collect();
        println!("bench: lab, {workload}, {seconds} s runs, median of 3 alternated rounds (one run of this bench):");
        for (i, observer) in Observer::ALL.into_iter().enumerate() {
            let mut line =
                format!("bench:   {}: {:.1} Mbit/s ({:.3}x untraced)", observer.label(), medians[i] / 1e6, medians[i] / medians[0]);
            if udp64 {
                line += &format!(
                    ", {:.0} datagrams/s received (sent {:.1} Mbit/s, {:.1}% lost at the receiver)",
                    median_of(&runs[i], |run| run.bytes / 64.0 / f64::from(seconds)),
                    median_of(&runs[i], |run| run.sent_bps) / 1e6,
                    median_of(&runs[i], |run| run.lost_percent)
                );
            }
            if !traced[i].is_empty() {
                let events: u64 = traced[i].iter().map(|t| t.events).sum();
                let lost: u64 = traced[i].iter().map(|t| t.lost).sum();
                let peak = traced[i].iter().map(|t| t.peak_rss_kib).max().unwrap_or(0);
                let cpu_ns: u64 = traced[i].iter().map(|t| t.cpu_ns).sum();
                line += &format!(
                    ", {:.0} events/s, {lost} lost events, peak RSS {:.1} MiB, podtrace's CPU {:.1}% of a core",
                    events as f64 / f64::from(3 * seconds),
                    peak as f64 / 1024.0,
                    cpu_ns as f64 / 1e9 / f64::from(3 * seconds) * 100.0
                );
                if events > 0 {
                    line += &format!(" ({:.0} ns per event)", cpu_ns as f64 / events as f64);
                }
            }
            println!("{line}");
        }
    }
    lab_program_costs(&lab)?;
    // Peak RSS over a 60 s follow under TCP iperf3.
    let node = lab.node_a();
    let tracer = Podtrace::start(&node.netns, &["follow", &lab.pod_a().ip.to_string(), "--duration", "600", "--output", "json"])?;
    let bps = iperf(&lab, false, 60)?.bps;
    let peak = vm_hwm_kib(tracer.pid());
    let report = tracer.finish()?.json()?;
    println!(
        "bench: lab, podtrace following the pod over 60 s of iperf3 TCP ({:.1} Mbit/s): peak RSS (VmHWM) {:.1} MiB, {} events, {} lost events",
        bps / 1e6,
        peak as f64 / 1024.0,
        report["events"].as_u64().unwrap_or(0),
        report["lost_events"].as_u64().unwrap_or(0) + report["lost_kernel_events"].as_u64().unwrap_or(0)
    );
    Ok(())
}

/// The kernel's own run statistics (`kernel.bpf_stats_enabled`) of every program process
/// `pid` holds, from its descriptors' fdinfo: (name, runs, nanoseconds).
fn program_stats(pid: u32) -> Vec<(String, u64, u64)> {
    let mut stats = Vec::new();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else { return stats };
    for fd in fds.flatten() {
        if std::fs::read_link(fd.path()).map(|l| l.to_string_lossy() != "anon_inode:bpf-prog").unwrap_or(true) {
            continue;
        }
        let Ok(info) = std::fs::read_to_string(format!("/proc/{pid}/fdinfo/{}", fd.file_name().to_string_lossy())) else { continue };
        let field = |key: &str| info.lines().find_map(|l| l.strip_prefix(key).map(|v| v.trim().parse::<u64>().unwrap_or(0))).unwrap_or(0);
        let id = field("prog_id:");
        let name = std::process::Command::new("bpftool")
            .args(["prog", "show", "id", &id.to_string(), "-j"])
            .output()
            .ok()
            .and_then(|o| serde_json::from_slice::<serde_json::Value>(&o.stdout).ok())
            .and_then(|v| v["name"].as_str().map(str::to_string))
            .unwrap_or_else(|| format!("id {id}"));
        if !stats.iter().any(|(n, _, _)| *n == name) {
            stats.push((name, field("run_cnt:"), field("run_time_ns:")));
        }
    }
    stats.sort();
    stats
}

/// Per-run cost of podtrace's programs on real traffic, from the kernel's run statistics
/// (switched on only here: they cost every program two clock reads): following another pod
/// on the node under the 64-byte UDP flood, where pod B's socket drops what it cannot take
/// (drops of unfollowed packets for `skb:kfree_skb`), and following the pod under TCP.
fn lab_program_costs(lab: &Lab) -> Result<()> {
    let previous = std::fs::read_to_string("/proc/sys/kernel/bpf_stats_enabled").unwrap_or_else(|_| "0".into());
    std::fs::write("/proc/sys/kernel/bpf_stats_enabled", "1").context("enabling kernel.bpf_stats_enabled")?;
    let node = lab.node_a();
    let result = (|| -> Result<()> {
        for (followed, udp64, label) in
            [(node.pods[1].ip, true, "following another pod, UDP 64-byte flood"), (lab.pod_a().ip, false, "following the pod, TCP")]
        {
            let tracer = Podtrace::start(&node.netns, &["follow", &followed.to_string(), "--duration", "600", "--output", "json"])?;
            iperf(lab, udp64, 5)?;
            let stats = program_stats(tracer.pid());
            tracer.finish()?;
            println!("bench: lab, kernel run statistics of podtrace's programs ({label}, 5 s, one run):");
            for (name, runs, ns) in stats {
                if runs > 0 {
                    println!("bench:   {name}: {runs} runs, {:.0} ns per run", ns as f64 / runs as f64);
                }
            }
        }
        Ok(())
    })();
    let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", previous.trim());
    result
}
