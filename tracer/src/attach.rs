//! Loads the kernel programs and attaches them to ingress and egress of every hop.
//!
//! TCX links (kernel 6.6+) are owned by file descriptors, so they vanish with the process
//! even after SIGKILL. The clsact/cls_bpf fallback survives the process, so every filter
//! carries the program's name (which `sweep` looks for) and every clsact qdisc that podtrace
//! had to create is recorded in a state file, so a later run or `podtrace cleanup` removes it.

use std::{collections::BTreeSet, fs, io::ErrorKind, net::IpAddr, path::PathBuf};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, PerCpuArray, RingBuf},
    programs::{
        BtfTracePoint, LinkOrder, SchedClassifier, TcAttachType, TracePoint,
        tc::{self, NlOptions, TcAttachOptions},
    },
    util::KernelVersion,
};
use futures::TryStreamExt as _;
use netlink_packet_route::tc::TcHandle;
use tracer_common::{
    COUNTER_COUNT, COUNTER_LOST_EVENTS, COUNTER_MATCHED, COUNTER_NOT_IP, COUNTER_UNPARSED, FilterConfig, HOP_NO_MAC_HEADER, HopConfig,
    KernelLayout,
};

use crate::{
    Direction,
    discovery::{Hop, with_rtnetlink},
};

/// Which tracepoints have a readable tracefs format on this kernel.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tracepoints {
    pub kfree_skb: bool,
    pub tcp_retransmit_skb: bool,
    pub icmp_send: bool,
}

pub const INGRESS_PROGRAM: &str = "podtrace_ingress";
pub const EGRESS_PROGRAM: &str = "podtrace_egress";

/// The compiled kernel object, built by `build.rs` from `tracer-ebpf`.
static KERNEL_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

/// How TC programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// TCX where the kernel has it (6.6+), clsact otherwise.
    Auto,
    Tcx,
    /// clsact qdisc with a cls_bpf filter, as on kernels before 6.6.
    Clsact,
}

/// What the kernel counted, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub matched: u64,
    pub lost_events: u64,
    pub unparsed: u64,
    pub not_ip: u64,
}

pub struct LoadOptions {
    pub filter: FilterConfig,
    pub layout: KernelLayout,
    pub ring_bytes: u32,
}

/// How each kernel event source was attached, or why not.
#[derive(Clone, Debug, Default, serde::Serialize, PartialEq)]
pub struct KernelSources {
    pub drops: String,
    pub retransmits: String,
    pub icmp_errors: String,
}

/// The loaded programs and maps, before or after attaching.
pub struct Probes {
    ebpf: Ebpf,
    mode: AttachMode,
    /// Interfaces whose clsact qdisc podtrace created and must remove.
    created_clsact: BTreeSet<String>,
}

impl Probes {
    pub fn load(options: &LoadOptions, mode: AttachMode) -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .override_global("FILTER", &options.filter, true)
            .override_global("LAYOUT", &options.layout, true)
            .map_max_entries("EVENTS", options.ring_bytes)
            .load(KERNEL_OBJECT)
            .context("loading the kernel programs")?;
        for name in [INGRESS_PROGRAM, EGRESS_PROGRAM] {
            let program: &mut SchedClassifier =
                ebpf.program_mut(name).with_context(|| format!("program {name} missing from the kernel object"))?.try_into()?;
            program.load().with_context(|| format!("verifying program {name}"))?;
        }
        let kernel = KernelVersion::current().map_err(|err| anyhow!("reading the kernel version: {err}"))?;
        let has_tcx = kernel >= KernelVersion::new(6, 6, 0);
        let mode = match mode {
            AttachMode::Auto if has_tcx => AttachMode::Tcx,
            AttachMode::Auto => AttachMode::Clsact,
            AttachMode::Tcx if !has_tcx => bail!("--attach tcx needs kernel 6.6 or newer; use --attach clsact (or auto) here"),
            explicit => explicit,
        };
        Ok(Self { ebpf, mode, created_clsact: BTreeSet::new() })
    }

    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    pub fn follow(&mut self, ip: IpAddr) -> Result<()> {
        let mut followed: HashMap<_, [u8; 16], u8> = HashMap::try_from(self.ebpf.map_mut("FOLLOWED").context("FOLLOWED map missing")?)?;
        followed.insert(mapped(ip), 1, 0).context("adding a followed IP")
    }

    /// Tells the kernel programs to report packets seen on `ifindex`.
    pub fn register_hop(&mut self, ifindex: u32, no_mac_header: bool) -> Result<()> {
        let mut hops: HashMap<_, u32, HopConfig> = HashMap::try_from(self.ebpf.map_mut("HOPS").context("HOPS map missing")?)?;
        let flags = if no_mac_header { HOP_NO_MAC_HEADER } else { 0 };
        hops.insert(ifindex, HopConfig { flags }, 0).context("registering the hop")
    }

    /// Registers the hop with the kernel filter and attaches both programs to it.
    pub async fn attach(&mut self, hop: &Hop) -> Result<()> {
        self.register_hop(hop.ifindex, hop.no_mac_header)?;

        if self.mode == AttachMode::Clsact {
            match tc::qdisc_add_clsact(&hop.ifname) {
                Ok(()) => {
                    self.created_clsact.insert(hop.ifname.clone());
                    record_created_clsact(&self.created_clsact)?;
                }
                Err(tc::TcError::NetlinkError(err)) if err.raw_os_error() == Some(libc::EEXIST) => {}
                Err(err) => return Err(err).with_context(|| format!("adding a clsact qdisc to {}", hop.ifname)),
            }
        }
        for direction in [Direction::Ingress, Direction::Egress] {
            let (name, attach_type) = match direction {
                Direction::Ingress => (INGRESS_PROGRAM, TcAttachType::Ingress),
                Direction::Egress => (EGRESS_PROGRAM, TcAttachType::Egress),
            };
            // First in line, so a later program that drops or redirects cannot hide the packet;
            // the program returns "continue", so everything after it still runs.
            let options = match self.mode {
                AttachMode::Clsact => {
                    TcAttachOptions::Netlink(NlOptions { priority: first_priority(hop, direction).await?, ..Default::default() })
                }
                _ => TcAttachOptions::TcxOrder(LinkOrder::first()),
            };
            let program: &mut SchedClassifier = self.ebpf.program_mut(name).context("program missing")?.try_into()?;
            program
                .attach_with_options(&hop.ifname, attach_type, options)
                .with_context(|| format!("attaching {name} to {} ({:?})", hop.ifname, self.mode))?;
        }
        Ok(())
    }

    pub fn take_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map("EVENTS").context("EVENTS map missing")?;
        Ok(RingBuf::try_from(map)?)
    }

    pub fn take_kernel_events(&mut self) -> Result<RingBuf<MapData>> {
        let map = self.ebpf.take_map("KERNEL_EVENTS").context("KERNEL_EVENTS map missing")?;
        Ok(RingBuf::try_from(map)?)
    }

    /// Attaches the tracepoint programs. Kernel events count only from `namespaces`.
    /// `tracepoints` names the sources whose tracefs format was readable (and so whose
    /// offsets are in the layout).
    pub fn attach_kernel_events(
        &mut self,
        btf: &aya::Btf,
        namespaces: &std::collections::BTreeSet<u32>,
        tracepoints: &Tracepoints,
    ) -> Result<KernelSources> {
        let mut netns: HashMap<_, u32, u8> = HashMap::try_from(self.ebpf.map_mut("NETNS").context("NETNS map missing")?)?;
        for inode in namespaces {
            netns.insert(*inode, 1, 0).context("registering a network namespace")?;
        }
        let drops = match self.attach_btf_tracepoint("podtrace_kfree_skb_btf", "kfree_skb", btf) {
            Ok(()) => "tp_btf skb:kfree_skb".into(),
            Err(btf_err) if tracepoints.kfree_skb => {
                log::info!("tp_btf kfree_skb unavailable ({btf_err:#}); using the classic tracepoint");
                self.attach_tracepoint("podtrace_kfree_skb", "skb", "kfree_skb")?;
                "tracepoint skb:kfree_skb".into()
            }
            Err(err) => return Err(err.context("attaching to skb:kfree_skb")),
        };
        let retransmits = if tracepoints.tcp_retransmit_skb {
            self.attach_tracepoint("podtrace_tcp_retransmit", "tcp", "tcp_retransmit_skb")?;
            "tracepoint tcp:tcp_retransmit_skb".into()
        } else {
            "unavailable: no tcp:tcp_retransmit_skb tracepoint".into()
        };
        let icmp_errors = if tracepoints.icmp_send {
            self.attach_tracepoint("podtrace_icmp_send", "icmp", "icmp_send")?;
            "tracepoint icmp:icmp_send".into()
        } else {
            "unavailable: no icmp:icmp_send tracepoint on this kernel".into()
        };
        Ok(KernelSources { drops, retransmits, icmp_errors })
    }

    fn attach_btf_tracepoint(&mut self, program: &str, tracepoint: &str, btf: &aya::Btf) -> Result<()> {
        let program: &mut BtfTracePoint = self.ebpf.program_mut(program).context("program missing")?.try_into()?;
        program.load(tracepoint, btf).with_context(|| format!("loading tp_btf {tracepoint}"))?;
        program.attach().with_context(|| format!("attaching tp_btf {tracepoint}"))?;
        Ok(())
    }

    fn attach_tracepoint(&mut self, program: &str, category: &str, name: &str) -> Result<()> {
        let program: &mut TracePoint = self.ebpf.program_mut(program).context("program missing")?.try_into()?;
        program.load().with_context(|| format!("loading the {category}:{name} program"))?;
        program.attach(category, name).with_context(|| format!("attaching to {category}:{name}"))?;
        Ok(())
    }

    pub fn counters(&self) -> Result<Counters> {
        let counters: PerCpuArray<_, u64> = PerCpuArray::try_from(self.ebpf.map("COUNTERS").context("COUNTERS map missing")?)?;
        let sum = |index: u32| -> Result<u64> { Ok(counters.get(&index, 0).context("reading COUNTERS")?.iter().sum()) };
        debug_assert_eq!(COUNTER_COUNT, 4);
        Ok(Counters {
            matched: sum(COUNTER_MATCHED)?,
            lost_events: sum(COUNTER_LOST_EVENTS)?,
            unparsed: sum(COUNTER_UNPARSED)?,
            not_ip: sum(COUNTER_NOT_IP)?,
        })
    }

    /// Access for the kernel-parser tests, which run the programs with BPF_PROG_TEST_RUN.
    pub fn program(&self, direction: Direction) -> Result<&SchedClassifier> {
        let name = match direction {
            Direction::Ingress => INGRESS_PROGRAM,
            Direction::Egress => EGRESS_PROGRAM,
        };
        Ok(self.ebpf.program(name).context("program missing")?.try_into()?)
    }

    /// Detaches every program and removes the clsact qdiscs podtrace created.
    pub async fn detach(self) -> Result<()> {
        let Self { ebpf, created_clsact, .. } = self;
        // Dropping the programs closes TCX links and deletes our cls_bpf filters.
        drop(ebpf);
        let mut failures = Vec::new();
        for ifname in &created_clsact {
            if let Err(err) = remove_clsact_if_unused(ifname).await {
                failures.push(format!("{ifname}: {err:#}"));
            }
        }
        forget_created_clsact(&created_clsact)?;
        if !failures.is_empty() {
            bail!("could not remove clsact qdiscs: {}", failures.join("; "));
        }
        Ok(())
    }
}

/// A cls_bpf priority ahead of every filter already on the hook (lower runs first).
async fn first_priority(hop: &Hop, direction: Direction) -> Result<u16> {
    let filters: Vec<_> = with_rtnetlink(async |handle| {
        let request = handle.traffic_filter(hop.ifindex as i32).get();
        let request = match direction {
            Direction::Ingress => request.ingress(),
            Direction::Egress => request.egress(),
        };
        request.execute().try_collect().await.with_context(|| format!("listing the TC filters on {}", hop.ifname))
    })
    .await?;
    let lowest = filters.iter().map(|filter| (filter.header.info >> 16) as u16).filter(|p| *p > 0).min();
    Ok(match lowest {
        None => 0,
        Some(1) => {
            log::warn!("a filter at priority 1 on {} {direction} runs before podtrace; packets it drops are not seen", hop.ifname);
            1
        }
        Some(lowest) => lowest - 1,
    })
}

/// The map key form of an address: IPv4 as IPv4-mapped IPv6.
pub fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// What `sweep` removed.
#[derive(Debug, Default)]
pub struct Swept {
    pub filters: Vec<String>,
    pub qdiscs: Vec<String>,
}

/// Removes podtrace's cls_bpf filters from every interface in this network namespace, and the
/// clsact qdiscs an earlier, killed run created. TCX links need nothing: they die with their
/// process.
pub async fn sweep() -> Result<Swept> {
    let mut swept = Swept::default();
    for ifname in interface_names()? {
        for (name, attach_type) in [(INGRESS_PROGRAM, TcAttachType::Ingress), (EGRESS_PROGRAM, TcAttachType::Egress)] {
            match tc::qdisc_detach_program(&ifname, attach_type, name) {
                Ok(()) => swept.filters.push(format!("{ifname} {name}")),
                // No such filter, or no clsact qdisc at all.
                Err(tc::TcError::IoError(err)) if err.kind() == ErrorKind::NotFound => {}
                // The interface went away while we looked.
                Err(tc::TcError::IoError(err)) if err.raw_os_error() == Some(libc::ENODEV) => {}
                Err(tc::TcError::NetlinkError(err)) if err.raw_os_error() == Some(libc::EINVAL) => {}
                Err(tc::TcError::NetlinkError(err)) if err.raw_os_error() == Some(libc::ENOENT) => {}
                Err(err) => return Err(err).with_context(|| format!("removing {name} from {ifname}")),
            }
        }
    }
    let recorded = recorded_clsact()?;
    for ifname in &recorded {
        match remove_clsact_if_unused(ifname).await {
            Ok(true) => swept.qdiscs.push(ifname.clone()),
            Ok(false) => {}
            Err(err) => log::warn!("leaving the clsact qdisc on {ifname}: {err:#}"),
        }
    }
    forget_created_clsact(&recorded)?;
    Ok(swept)
}

fn interface_names() -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir("/sys/class/net").context("listing /sys/class/net")? {
        let entry = entry?;
        // Not every entry is an interface (the bonding driver adds `bonding_masters`).
        if entry.path().join("ifindex").exists() {
            names.push(entry.file_name().to_string_lossy().into_owned());
        }
    }
    Ok(names)
}

/// Deletes the clsact qdisc on `ifname` if no filter is left on it, so a qdisc that another
/// tool started using meanwhile stays. Returns whether it was deleted.
async fn remove_clsact_if_unused(ifname: &str) -> Result<bool> {
    let Ok(index) = nix_ifindex(ifname) else {
        // The interface is gone, and its qdisc with it.
        return Ok(false);
    };
    with_rtnetlink(async |handle| {
        async {
            let ingress: Vec<_> = handle.traffic_filter(index).get().ingress().execute().try_collect().await?;
            let egress: Vec<_> = handle.traffic_filter(index).get().egress().execute().try_collect().await?;
            if !ingress.is_empty() || !egress.is_empty() {
                return Ok(false);
            }
            let mut request = handle.qdisc().del(index);
            request.message_mut().header.parent = TcHandle::CLSACT;
            request.message_mut().header.handle = TcHandle { major: 0xffff, minor: 0 };
            request.execute().await?;
            Ok(true)
        }
        .await
        .map_err(|err: rtnetlink::Error| anyhow!(err))
        .with_context(|| format!("removing the clsact qdisc from {ifname}"))
    })
    .await
}

fn nix_ifindex(ifname: &str) -> Result<i32> {
    let name = std::ffi::CString::new(ifname)?;
    // SAFETY: a valid NUL-terminated string.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(anyhow!("no interface {ifname}")),
        index => Ok(index as i32),
    }
}

/// The state file for this network namespace: ifindexes repeat across namespaces, and so
/// do names, so the file is keyed by the namespace's inode.
fn state_file() -> Result<PathBuf> {
    let netns = crate::netns::own_inode()?;
    Ok(PathBuf::from(format!("/run/podtrace/clsact-{netns}")))
}

fn recorded_clsact() -> Result<BTreeSet<String>> {
    let path = state_file()?;
    match fs::read_to_string(&path) {
        Ok(text) => Ok(text.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect()),
        Err(err) if err.kind() == ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(err) => Err(err).with_context(|| format!("reading {}", path.display())),
    }
}

fn record_created_clsact(created: &BTreeSet<String>) -> Result<()> {
    let path = state_file()?;
    let mut all = recorded_clsact()?;
    all.extend(created.iter().cloned());
    write_state(&path, &all)
}

fn forget_created_clsact(removed: &BTreeSet<String>) -> Result<()> {
    let path = state_file()?;
    let mut all = recorded_clsact()?;
    all.retain(|ifname| !removed.contains(ifname));
    write_state(&path, &all)
}

fn write_state(path: &PathBuf, ifnames: &BTreeSet<String>) -> Result<()> {
    if ifnames.is_empty() {
        return match fs::remove_file(path) {
            Err(err) if err.kind() != ErrorKind::NotFound => Err(err).with_context(|| format!("removing {}", path.display())),
            _ => Ok(()),
        };
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let text: String = ifnames.iter().map(|name| format!("{name}\n")).collect();
    fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
