//! The kernel programs from userspace: loading them and writing their maps (this file),
//! attaching the TC programs to every hop (`tc`), attaching the tracepoint programs
//! (`tracepoints`), what runs record so they never undo each other (`state`), and removing
//! what a killed run left behind (`cleanup`).

mod cleanup;
mod ring;
mod state;
mod tc;
mod tracepoints;

use std::net::IpAddr;

use anyhow::{Context as _, Result};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, PerCpuArray},
    programs::{SchedClassifier, tc::SchedClassifierLink},
};
use tracer_common::{
    COUNTER_COUNT, COUNTER_DNAT_FLOWS, COUNTER_LOST_EVENTS, COUNTER_LOST_KERNEL_EVENTS, COUNTER_MATCHED, COUNTER_NAT_FLOWS, COUNTER_NOT_IP,
    COUNTER_UNPARSED, FilterConfig, FollowedV4, HOP_NAT, HOP_NO_MAC_HEADER, HOP_SLOTS, HopConfig, HopSlot, KernelLayout, MAX_FAST_FOLLOWED,
    NatTuple,
};

pub use self::{
    cleanup::{Swept, sweep},
    ring::EventRing,
    state::{Owner, StateLock},
    tc::{EGRESS_PROGRAM, INGRESS_PROGRAM},
    tracepoints::KernelSources,
};
use crate::{
    Direction,
    events::decode::DecodeCounts,
    node::{Hop, HopKind},
};

/// The compiled kernel object, built by `build.rs` from `tracer-ebpf`.
static KERNEL_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tracer"));

/// How TC programs are attached.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AttachMode {
    /// TCX where the kernel accepts it (6.6+, or backported), clsact otherwise.
    Auto,
    Tcx,
    /// clsact qdisc with a cls_bpf filter, as on kernels before 6.6.
    Clsact,
}

/// What the kernel counted, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub matched: u64,
    /// Packet events that did not fit in their ring.
    pub lost_events: u64,
    pub unparsed: u64,
    pub not_ip: u64,
    /// Kernel events (drops, retransmits, ICMP errors) that did not fit in theirs.
    pub lost_kernel_events: u64,
    /// Translated flows of the followed pods the TC programs learned (`COUNTER_NAT_FLOWS`).
    pub nat_flows: u64,
    /// Of them, flows DNATed to a followed pod, learned from their first reply
    /// (`COUNTER_DNAT_FLOWS`).
    pub dnat_flows: u64,
}

impl Counters {
    /// The kernel's counts with what userspace found parsing the packets it reported: a
    /// record whose headers did not parse is an unparsed packet rather than an event, and a
    /// cut-short VXLAN payload an unparsed packet besides its event, as the kernel counts
    /// the packets it turns away.
    pub fn with_decoded(self, decoded: DecodeCounts) -> Self {
        Self {
            matched: self.matched.saturating_sub(decoded.unparsed_records),
            unparsed: self.unparsed + decoded.unparsed_records + decoded.truncated_inner,
            ..self
        }
    }
}

pub struct LoadOptions {
    pub filter: FilterConfig,
    pub layout: KernelLayout,
    /// Sizes of the packet-event and kernel-event rings.
    pub ring_bytes: u32,
    pub kernel_ring_bytes: u32,
}

/// The kernel-event ring's default size: drops, retransmits and ICMP errors are rare next to
/// packet events.
pub const KERNEL_RING_BYTES: u32 = 1 << 18;

/// The loaded programs and maps, before or after attaching.
pub struct Probes {
    ebpf: Ebpf,
    mode: AttachMode,
    /// The run that owns the attachments, when they are recorded (a `follow`).
    owner: Option<Owner>,
    /// The TC links; dropping one detaches it.
    links: Vec<SchedClassifierLink>,
    /// The cls_bpf filters this run recorded.
    filters: Vec<state::FilterRecord>,
    /// The tracepoint programs attached, by name.
    tracing_programs: Vec<String>,
    /// Whether the TC programs can read conntrack (`KernelLayout::skb_nfct`): then the hops
    /// where the node's NAT shows get `HOP_NAT`.
    conntrack: bool,
}

impl Probes {
    pub fn load(options: &LoadOptions, mode: AttachMode) -> Result<Self> {
        let mut ebpf = EbpfLoader::new()
            .override_global("FILTER", &options.filter, true)
            .override_global("LAYOUT", &options.layout, true)
            .map_max_entries("EVENTS", options.ring_bytes)
            .map_max_entries("KERNEL_EVENTS", options.kernel_ring_bytes)
            .load(KERNEL_OBJECT)
            .context("loading the kernel programs")?;
        for name in [INGRESS_PROGRAM, EGRESS_PROGRAM] {
            let program: &mut SchedClassifier =
                ebpf.program_mut(name).with_context(|| format!("program {name} missing from the kernel object"))?.try_into()?;
            program.load().with_context(|| format!("verifying program {name}"))?;
        }
        let conntrack = options.layout.skb_nfct != 0;
        Ok(Self { ebpf, mode, owner: None, links: Vec::new(), filters: Vec::new(), tracing_programs: Vec::new(), conntrack })
    }

    /// Records what `attach` attaches as `owner`'s, so other runs leave it alone while the
    /// owner lives and sweep it once it is gone.
    pub fn set_owner(&mut self, owner: Owner) {
        self.owner = Some(owner);
    }

    /// The attach mode; `Auto` until the first hop's attach has probed what the kernel accepts.
    pub fn mode(&self) -> AttachMode {
        self.mode
    }

    pub fn follow(&mut self, ip: IpAddr) -> Result<()> {
        let mut followed: HashMap<_, [u8; 16], u8> = HashMap::try_from(self.ebpf.map_mut("FOLLOWED").context("FOLLOWED map missing")?)?;
        followed.insert(mapped(ip), 1, 0).context("adding a followed IP")?;
        // The TC programs' fast "not ours" test compares IPv4 addresses directly.
        let v4 = match ip {
            IpAddr::V4(v4) => Some(v4),
            IpAddr::V6(v6) => v6.to_ipv4_mapped(),
        };
        if let Some(v4) = v4 {
            let mut fast: Array<_, FollowedV4> = Array::try_from(self.ebpf.map_mut("FOLLOWED_V4").context("FOLLOWED_V4 map missing")?)?;
            let mut entry = fast.get(&0, 0).context("reading FOLLOWED_V4")?;
            let addr = u32::from_ne_bytes(v4.octets());
            let count = entry.count as usize;
            if !entry.addrs[..count].contains(&addr) {
                if count < MAX_FAST_FOLLOWED {
                    entry.addrs[count] = addr;
                    entry.count += 1;
                } else {
                    entry.overflow = 1;
                }
                fast.set(0, entry, 0).context("writing FOLLOWED_V4")?;
            }
        }
        Ok(())
    }

    /// The kernel programs' settings for `hop` (`HOP_*`): how to read its frames, and whether
    /// the node's NAT shows there (a NIC, a bond or a slave, with a MAC header), so that the
    /// followed pods' translated flows are looked up.
    pub fn hop_flags(&self, hop: &Hop) -> u32 {
        let nat_shows = matches!(hop.kind, HopKind::Nic | HopKind::Bond | HopKind::BondSlave) && !hop.no_mac_header;
        (if hop.no_mac_header { HOP_NO_MAC_HEADER } else { 0 }) | (if nat_shows && self.conntrack { HOP_NAT } else { 0 })
    }

    /// Tells the kernel programs to report packets seen on `ifindex`, read as `flags` say.
    pub fn register_hop(&mut self, ifindex: u32, flags: u32) -> Result<()> {
        let mut hops: HashMap<_, u32, HopConfig> = HashMap::try_from(self.ebpf.map_mut("HOPS").context("HOPS map missing")?)?;
        hops.insert(ifindex, HopConfig { flags }, 0).context("registering the hop")?;
        // The array slot that finds the hop without a hash lookup, unless another hop holds it.
        let mut slots: Array<_, HopSlot> = Array::try_from(self.ebpf.map_mut("HOP_SLOT").context("HOP_SLOT map missing")?)?;
        let index = ifindex % HOP_SLOTS;
        let slot = slots.get(&index, 0).context("reading HOP_SLOT")?;
        if slot.ifindex == 0 || slot.ifindex == ifindex {
            slots.set(index, HopSlot { ifindex, flags }, 0).context("writing HOP_SLOT")?;
        }
        Ok(())
    }

    pub fn take_events(&mut self) -> Result<EventRing> {
        self.take_ring("EVENTS")
    }

    pub fn take_kernel_events(&mut self) -> Result<EventRing> {
        self.take_ring("KERNEL_EVENTS")
    }

    fn take_ring(&mut self, name: &str) -> Result<EventRing> {
        match self.ebpf.take_map(name).with_context(|| format!("{name} map missing"))? {
            aya::maps::Map::RingBuf(map) => EventRing::new(map).with_context(|| format!("reading the {name} ring buffer")),
            _ => anyhow::bail!("{name} is not a ring buffer map"),
        }
    }

    pub fn counters(&self) -> Result<Counters> {
        let counters: PerCpuArray<_, u64> = PerCpuArray::try_from(self.ebpf.map("COUNTERS").context("COUNTERS map missing")?)?;
        let sum = |index: u32| -> Result<u64> { Ok(counters.get(&index, 0).context("reading COUNTERS")?.iter().sum()) };
        debug_assert_eq!(COUNTER_COUNT, 7);
        Ok(Counters {
            matched: sum(COUNTER_MATCHED)?,
            lost_events: sum(COUNTER_LOST_EVENTS)?,
            unparsed: sum(COUNTER_UNPARSED)?,
            not_ip: sum(COUNTER_NOT_IP)?,
            lost_kernel_events: sum(COUNTER_LOST_KERNEL_EVENTS)?,
            nat_flows: sum(COUNTER_NAT_FLOWS)?,
            dnat_flows: sum(COUNTER_DNAT_FLOWS)?,
        })
    }

    /// Learns a translated flow as the TC programs do on egress: its replies arriving as
    /// `reply` are the pod's, with `pod` its side of the NAT. For the kernel-parser tests,
    /// whose BPF_PROG_TEST_RUN skbs have no conntrack entry to learn from.
    pub fn learn_translated_flow(&mut self, reply: NatTuple, pod: NatTuple) -> Result<()> {
        let mut flows: HashMap<_, NatTuple, NatTuple> =
            HashMap::try_from(self.ebpf.map_mut("NAT_FLOWS").context("NAT_FLOWS map missing")?)?;
        flows.insert(reply, pod, 0).context("writing NAT_FLOWS")
    }

    /// Access for the kernel-parser tests, which run the programs with BPF_PROG_TEST_RUN.
    pub fn program(&self, direction: Direction) -> Result<&SchedClassifier> {
        let name = match direction {
            Direction::Ingress => INGRESS_PROGRAM,
            Direction::Egress => EGRESS_PROGRAM,
        };
        Ok(self.ebpf.program(name).context("program missing")?.try_into()?)
    }

    /// Detaches every program, forgets this run's records and removes the clsact qdiscs
    /// podtrace created that nothing uses any more (another live run's filters keep theirs).
    pub async fn detach(self) -> Result<()> {
        let Self { ebpf, mode, links, filters, owner, .. } = self;
        let _lock = StateLock::acquire()?;
        // Dropping a link closes a TCX link or deletes a cls_bpf filter; then the programs.
        drop(links);
        drop(ebpf);
        state::forget_filters(&filters)?;
        if mode == AttachMode::Clsact {
            cleanup::remove_unused_clsact().await?;
        }
        drop(owner);
        Ok(())
    }
}

/// The map key form of an address: IPv4 as IPv4-mapped IPv6.
pub fn mapped(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}
