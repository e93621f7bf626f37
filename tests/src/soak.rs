//! Soak: podtrace started, traced under traffic and killed with SIGKILL over and over, and a
//! long follow under steady traffic. What a killed run leaves (clsact filters, qdiscs, state
//! files, owner files) must be swept, every BPF object it held must be freed, and a run must
//! not use more file descriptors or memory because runs came before it or because it has run
//! long.

use std::{
    collections::BTreeSet,
    fs,
    os::unix::process::ExitStatusExt as _,
    process::Child,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    inspect,
    lab::{Lab, run},
    podtrace::{Podtrace, run_podtrace},
    traffic,
};

/// Pings from pod A to pod B in each kill cycle: every hop of pod A's path carries packets
/// while the run is sampled and killed.
const PINGS_PER_CYCLE: u32 = 3;

/// The largest RSS of the kill cycles may be this many times the smallest. Every cycle is a
/// fresh process doing the same work, so RSS differs only by noise: which ring-buffer pages
/// (1.25 MiB of rings in all, about 2.4% of the debug build's 52 MiB) and allocator arenas the
/// packets of that run happened to touch; 10 kill cycles measured 0.4%. A run that grew with
/// what earlier runs left (filter records, leftovers to sweep) would cross the bound.
pub const RSS_SPREAD: f64 = 1.1;

/// A long follow's RSS at the end may be at most this many times its RSS after the warm-up,
/// plus `FOLLOW_RSS_SLACK_KIB`. The in-flight table and the histograms are bounded and the
/// warm-up fills them (packets expire after 2 s), so a flat run stays within allocator noise
/// (none at all in a 40 s trial). The bound is about 7 MiB above a 52 MiB debug build; keeping
/// as little as 64 bytes per event (about 470 events/s from `ping -i 0.01` over 4 hops, as
/// measured) would add about 15 MiB in the 9 minutes after the warm-up.
pub const FOLLOW_RSS_GROWTH: f64 = 1.1;
pub const FOLLOW_RSS_SLACK_KIB: u64 = 2048;

/// How long BPF objects may take to be freed after their last holder went: the kernel frees
/// programs and maps from deferred work after an RCU grace period.
const FREE_GRACE: Duration = Duration::from_secs(10);

/// A process's open file descriptors and resident memory at one moment.
#[derive(Clone, Copy, Debug)]
pub struct ProcessSample {
    pub fds: usize,
    pub rss_kib: u64,
}

impl ProcessSample {
    /// Reads `/proc/<pid>`; fails when `pid` is not podtrace (still `ip netns exec`, or gone).
    pub fn of_podtrace(pid: u32) -> Result<Self> {
        let status = fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("reading /proc/{pid}/status"))?;
        let field = |name: &str| status.lines().find_map(|line| line.strip_prefix(name)).map(str::trim);
        if field("Name:") != Some("podtrace") {
            bail!("process {pid} is {:?}, not podtrace", field("Name:"));
        }
        let rss_kib = field("VmRSS:")
            .and_then(|value| value.trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("no VmRSS in /proc/{pid}/status"))?;
        let fds = fs::read_dir(format!("/proc/{pid}/fd")).with_context(|| format!("listing /proc/{pid}/fd"))?.count();
        Ok(Self { fds, rss_kib })
    }
}

/// Kernel BPF objects by id. The kernel hands ids out cyclically up to 2^31, so an id seen held
/// by a run that is still listed a few minutes later is that run's object, never another run's.
#[derive(Debug, Default)]
struct BpfObjects {
    /// (bpftool object kind, id), e.g. ("prog", 4982).
    ids: BTreeSet<(&'static str, u32)>,
}

/// The `/proc/<pid>/fdinfo` key naming each kind's id, and bpftool's name for the kind.
const BPF_KINDS: [(&str, &str); 4] = [("prog_id:", "prog"), ("map_id:", "map"), ("link_id:", "link"), ("btf_id:", "btf")];

impl BpfObjects {
    /// Every program, map, link and BTF object `pid` holds a file descriptor to.
    fn held_by(pid: u32) -> Result<Self> {
        let mut objects = Self::default();
        let dir = format!("/proc/{pid}/fdinfo");
        for entry in fs::read_dir(&dir).with_context(|| format!("listing {dir}"))?.flatten() {
            // A descriptor closed since the listing has no fdinfo any more.
            let Ok(info) = fs::read_to_string(entry.path()) else { continue };
            for line in info.lines() {
                for (key, kind) in BPF_KINDS {
                    if let Some(id) = line.strip_prefix(key).and_then(|id| id.trim().parse().ok()) {
                        objects.ids.insert((kind, id));
                    }
                }
            }
        }
        Ok(objects)
    }

    fn count(&self, kind: &str) -> usize {
        self.ids.iter().filter(|(k, _)| *k == kind).count()
    }

    /// Those still loaded in the kernel, after giving deferred freeing `FREE_GRACE`.
    fn still_loaded(&self) -> Result<Vec<String>> {
        let deadline = Instant::now() + FREE_GRACE;
        loop {
            let mut loaded = Vec::new();
            for (_, kind) in BPF_KINDS {
                let listed = loaded_ids(kind)?;
                loaded
                    .extend(self.ids.iter().filter(|(k, id)| *k == kind && listed.contains(id)).map(|(k, id)| format!("bpf {k} id {id}")));
            }
            if loaded.is_empty() || Instant::now() > deadline {
                return Ok(loaded);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// The ids of every loaded object of a kind (`bpftool -j <kind> show`).
fn loaded_ids(kind: &str) -> Result<BTreeSet<u32>> {
    let output = run(&["bpftool", "-j", kind, "show"])?;
    let listed: serde_json::Value = serde_json::from_slice(&output.stdout).with_context(|| format!("parsing bpftool {kind} show"))?;
    Ok(listed.as_array().into_iter().flatten().filter_map(|object| object["id"].as_u64()).map(|id| id as u32).collect())
}

/// Everything of podtrace left in node A's namespace: filters, clsact qdiscs and TCX programs
/// on every lab interface of node A, state files and bpffs pins.
pub fn node_a_leftovers(lab: &Lab) -> Result<Vec<String>> {
    let node = lab.node_a();
    let mut found = Vec::new();
    let veths = node.pods.iter().map(|pod| pod.host_veth.as_str());
    for ifname in veths.chain([node.bridge.as_str(), node.vxlan.as_str(), node.underlay.as_str()]) {
        found.extend(inspect::leftovers(&node.netns, ifname)?);
    }
    found.extend(inspect::state_leftovers(&node.netns)?);
    Ok(found)
}

/// Owner files of the given runs (all gone) still in `/run/podtrace`. Only these runs' files
/// are looked at: another run on this machine may be between creating and locking its own.
fn owner_files_of(pids: &[u32]) -> Result<Vec<String>> {
    let entries = match fs::read_dir("/run/podtrace") {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err).context("listing /run/podtrace"),
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let owner_pid = name.strip_prefix("owner-").and_then(|id| id.split('-').next()).and_then(|pid| pid.parse::<u32>().ok());
        if owner_pid.is_some_and(|pid| pids.contains(&pid)) {
            found.push(format!("/run/podtrace/{name}"));
        }
    }
    Ok(found)
}

/// What a series of kill cycles measured.
#[derive(Debug)]
pub struct CycleFigures {
    pub attach: String,
    /// One per cycle, taken after the cycle's traffic.
    pub samples: Vec<ProcessSample>,
    pub elapsed: Duration,
    /// BPF programs, maps, links and BTF objects the runs held, all checked freed.
    pub programs: usize,
    pub maps: usize,
    pub links: usize,
    pub btfs: usize,
    /// What remained after the last cycle and `podtrace cleanup`: must be nothing.
    pub remained: Vec<String>,
}

impl CycleFigures {
    pub fn fd_range(&self) -> (usize, usize) {
        range(self.samples.iter().map(|sample| sample.fds))
    }

    pub fn rss_range_kib(&self) -> (u64, u64) {
        range(self.samples.iter().map(|sample| sample.rss_kib))
    }

    /// Why this series is not clean: leftovers, an fd count that changed between cycles, an
    /// RSS spread beyond `RSS_SPREAD`. Empty when it is.
    pub fn problems(&self) -> Vec<String> {
        let mut problems: Vec<String> = self.remained.iter().map(|left| format!("{}: remained: {left}", self.attach)).collect();
        let (fd_min, fd_max) = self.fd_range();
        if fd_min != fd_max {
            problems.push(format!("{}: fd count varied between cycles: {fd_min} to {fd_max}", self.attach));
        }
        let (rss_min, rss_max) = self.rss_range_kib();
        if rss_max as f64 > rss_min as f64 * RSS_SPREAD {
            problems.push(format!("{}: RSS varied beyond {RSS_SPREAD}x between cycles: {} to {}", self.attach, mib(rss_min), mib(rss_max)));
        }
        problems
    }

    /// One line for a summary.
    pub fn summary(&self) -> String {
        let (fd_min, fd_max) = self.fd_range();
        let fds = if fd_min == fd_max { format!("{fd_min} fds in every cycle") } else { format!("fds {fd_min} to {fd_max}") };
        let (rss_min, rss_max) = self.rss_range_kib();
        let remained =
            if self.remained.is_empty() { "nothing remained".to_string() } else { format!("{} left behind", self.remained.len()) };
        format!(
            "{}: {} kill cycles in {:.0} s; {fds}; RSS {} to {} (max/min {:.3}, bound {RSS_SPREAD}); {} programs, {} maps, {} links, {} BTF objects freed; {remained}",
            self.attach,
            self.samples.len(),
            self.elapsed.as_secs_f64(),
            mib(rss_min),
            mib(rss_max),
            rss_max as f64 / rss_min.max(1) as f64,
            self.programs,
            self.maps,
            self.links,
            self.btfs,
        )
    }

    /// The per-cycle series, ten cycles a line.
    pub fn series(&self) -> String {
        let lines = self.samples.chunks(10).enumerate().map(|(chunk, samples)| {
            let cells: Vec<String> = samples.iter().map(|sample| format!("{}/{:.1}", sample.fds, sample.rss_kib as f64 / 1024.0)).collect();
            format!("  cycles {:>3}-{:<3} fds/RSS MiB: {}", chunk * 10 + 1, chunk * 10 + samples.len(), cells.join(" "))
        });
        lines.collect::<Vec<_>>().join("\n")
    }
}

/// Runs `cycles` cycles in node A's namespace of: `podtrace follow <pod A> --attach <attach>`
/// (until it is attached), pings from pod A to pod B, a sample of podtrace's fds and RSS, then
/// SIGKILL. Then `podtrace cleanup` once, and a look for anything of these runs that remained.
pub fn kill_cycles(lab: &Lab, attach: &str, cycles: usize) -> Result<CycleFigures> {
    let ns = lab.node_a().netns.as_str();
    let pod_ip = lab.pod_a().ip.to_string();
    let started = Instant::now();
    let mut samples = Vec::with_capacity(cycles);
    let mut objects = BpfObjects::default();
    let mut pids = Vec::with_capacity(cycles);
    for cycle in 1..=cycles {
        let podtrace = Podtrace::start(ns, &["follow", &pod_ip, "--attach", attach])
            .with_context(|| format!("{attach}: cycle {cycle}: starting podtrace"))?;
        let pid = podtrace.pid();
        pids.push(pid);
        let ping = traffic::ping(&lab.pod_a().netns, lab.pod_b().ip, PINGS_PER_CYCLE, 56)?;
        let received = traffic::ping_received(&ping);
        if received != PINGS_PER_CYCLE {
            bail!("{attach}: cycle {cycle}: {received} of {PINGS_PER_CYCLE} pings answered: the lab is broken");
        }
        let sample = ProcessSample::of_podtrace(pid).with_context(|| format!("{attach}: cycle {cycle}"))?;
        objects.ids.extend(BpfObjects::held_by(pid)?.ids);
        samples.push(sample);
        podtrace.signal(libc::SIGKILL);
        let finished = podtrace.wait()?;
        if finished.status.signal() != Some(libc::SIGKILL) {
            bail!("{attach}: cycle {cycle}: podtrace ended by itself before the kill ({}):\n{}", finished.status, finished.stderr);
        }
    }
    let cleanup = run_podtrace(ns, &["cleanup"])?;
    if !cleanup.status.success() {
        bail!("{attach}: podtrace cleanup failed ({}): {}", cleanup.status, cleanup.stderr);
    }
    let mut remained = node_a_leftovers(lab)?;
    remained.extend(owner_files_of(&pids)?);
    remained.extend(objects.still_loaded()?);
    Ok(CycleFigures {
        attach: attach.to_string(),
        samples,
        elapsed: started.elapsed(),
        programs: objects.count("prog"),
        maps: objects.count("map"),
        links: objects.count("link"),
        btfs: objects.count("btf"),
        remained,
    })
}

/// A child process killed when dropped (a bounded traffic generator), also on an early return.
struct KilledOnDrop(Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// One sample of a long follow.
#[derive(Clone, Copy, Debug)]
pub struct FollowSample {
    pub at: Duration,
    pub process: ProcessSample,
}

/// What a long follow measured.
#[derive(Debug)]
pub struct FollowFigures {
    pub duration: Duration,
    pub samples: Vec<FollowSample>,
    /// The sample the end is compared with: the first one after a minute (or after half the
    /// run, for shorter runs), once the bounded tables have filled.
    pub baseline: FollowSample,
    /// Packets the report counts at pod A's veth ingress, and the events podtrace matched.
    pub pod_veth_packets: u64,
    pub events: u64,
    pub lost_events: u64,
    pub remained: Vec<String>,
}

impl FollowFigures {
    fn end(&self) -> FollowSample {
        *self.samples.last().unwrap_or(&self.baseline)
    }

    /// The largest end RSS still called flat.
    pub fn rss_bound_kib(&self) -> u64 {
        (self.baseline.process.rss_kib as f64 * FOLLOW_RSS_GROWTH) as u64 + FOLLOW_RSS_SLACK_KIB
    }

    pub fn problems(&self) -> Vec<String> {
        let mut problems: Vec<String> = self.remained.iter().map(|left| format!("follow: remained: {left}")).collect();
        let end = self.end().process;
        if end.rss_kib > self.rss_bound_kib() {
            problems.push(format!(
                "follow: RSS grew from {} to {} (bound {})",
                mib(self.baseline.process.rss_kib),
                mib(end.rss_kib),
                mib(self.rss_bound_kib())
            ));
        }
        let (fd_min, fd_max) = range(self.samples.iter().map(|sample| sample.process.fds));
        if fd_min != fd_max {
            problems.push(format!("follow: fd count varied: {fd_min} to {fd_max}"));
        }
        if self.lost_events > 0 {
            problems.push(format!("follow: {} events lost: the report is incomplete", self.lost_events));
        }
        problems
    }

    pub fn summary(&self) -> String {
        let (rss_min, rss_max) = range(self.samples.iter().map(|sample| sample.process.rss_kib));
        let (fd_min, fd_max) = range(self.samples.iter().map(|sample| sample.process.fds));
        let fds = if fd_min == fd_max { format!("{fd_min} fds throughout") } else { format!("fds {fd_min} to {fd_max}") };
        let end = self.end();
        format!(
            "follow: {:.1} min under ping -i 0.01 ({:.0} requests/s at pod A's veth), {} events ({} lost), {} packets at pod A's veth ingress; {fds}; RSS {} at {:.0} s, {} at the end ({:.0} s; bound {}), range {} to {}; {}",
            self.duration.as_secs_f64() / 60.0,
            self.pod_veth_packets as f64 / self.duration.as_secs_f64(),
            self.events,
            self.lost_events,
            self.pod_veth_packets,
            mib(self.baseline.process.rss_kib),
            self.baseline.at.as_secs_f64(),
            mib(end.process.rss_kib),
            end.at.as_secs_f64(),
            mib(self.rss_bound_kib()),
            mib(rss_min),
            mib(rss_max),
            if self.remained.is_empty() { "nothing remained".to_string() } else { format!("{} left behind", self.remained.len()) },
        )
    }

    /// The RSS series in MiB, six samples a line.
    pub fn series(&self) -> String {
        let lines = self.samples.chunks(6).map(|samples| {
            let cells: Vec<String> = samples
                .iter()
                .map(|sample| format!("{:>4.0}s {:.1}", sample.at.as_secs_f64(), sample.process.rss_kib as f64 / 1024.0))
                .collect();
            format!("  RSS MiB: {}", cells.join("  "))
        });
        lines.collect::<Vec<_>>().join("\n")
    }
}

/// Follows pod A for `duration` while it pings pod B every 10 ms, sampling podtrace's
/// fds and RSS every `every` (each sample is passed to `progress` as it is taken), then ends
/// the run with Ctrl-C and reads its report.
pub fn steady_follow(lab: &Lab, duration: Duration, every: Duration, progress: &mut dyn FnMut(&FollowSample)) -> Result<FollowFigures> {
    let ns = lab.node_a().netns.as_str();
    let pod = lab.pod_a();
    let podtrace = Podtrace::start(ns, &["follow", &pod.ip.to_string(), "-o", "json"])?;
    let pid = podtrace.pid();
    // Bounded by count (one per 10 ms for the run) and by deadline (the run plus a margin);
    // it is killed when the run ends anyway.
    let count = (duration.as_secs() * 100).to_string();
    let deadline = (duration.as_secs() + 30).to_string();
    let ping = lab.spawn_in(&pod.netns, &["ping", "-n", "-q", "-i", "0.01", "-c", &count, "-w", &deadline, &lab.pod_b().ip.to_string()])?;
    let ping = KilledOnDrop(ping);
    let started = Instant::now();
    let warmup = (duration / 2).min(Duration::from_secs(60));
    let mut samples = Vec::new();
    let mut baseline = None;
    while started.elapsed() < duration {
        std::thread::sleep(every.min(duration.saturating_sub(started.elapsed())));
        let sample = FollowSample { at: started.elapsed(), process: ProcessSample::of_podtrace(pid)? };
        progress(&sample);
        if baseline.is_none() && sample.at >= warmup {
            baseline = Some(sample);
        }
        samples.push(sample);
    }
    drop(ping);
    // Let the last replies cross every hop before the run ends.
    std::thread::sleep(Duration::from_millis(500));
    let finished = podtrace.finish()?;
    if !finished.status.success() {
        bail!("the long follow failed ({}):\n{}", finished.status, finished.stderr);
    }
    let report = finished.json()?;
    let pod_veth_packets = report["hops"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|hop| hop["ifname"] == pod.host_veth.as_str() && hop["direction"] == "ingress")
        .and_then(|hop| hop["packets"].as_u64())
        .context("no packet count for pod A's veth ingress in the report")?;
    Ok(FollowFigures {
        duration,
        baseline: baseline.context("the follow took no sample")?,
        samples,
        pod_veth_packets,
        events: report["events"].as_u64().context("no event count in the report")?,
        lost_events: report["lost_events"].as_u64().context("no lost-event count in the report")?,
        remained: node_a_leftovers(lab)?,
    })
}

fn range<T: Copy + Ord + Default>(values: impl Iterator<Item = T>) -> (T, T) {
    values
        .fold(None, |acc: Option<(T, T)>, value| Some(acc.map_or((value, value), |(min, max)| (min.min(value), max.max(value)))))
        .unwrap_or_default()
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}
