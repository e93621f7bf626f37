//! Tracepoint programs: drops, TCP retransmits and ICMP errors for the followed flows.
//!
//! Tracepoints fire for the whole kernel, so every event is filtered twice: by network
//! namespace (only this node's and its local pods' namespaces count), and like the TC
//! programs' packets, by `matches` (the followed IPs and `--peer/--port/--proto`).
//! Struct offsets and tracepoint record layouts come from userspace (`LAYOUT`), read from the
//! running kernel's BTF and tracefs.

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, BPF_RB_RING_SIZE},
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel},
    macros::{btf_tracepoint, map, tracepoint},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::{BtfTracePointContext, TracePointContext},
};
use tracer_common::{
    COUNTER_LOST_KERNEL_EVENTS, COUNTER_UNPARSED, DROP_REASON_UNKNOWN, IPPROTO_TCP, IpLayer, KEV_DROP, KEV_ICMP_SEND, KEV_RECEIVED,
    KEV_RETRANSMIT, KernelEvent, KernelLayout, MAX_NETNS, NO_SUCH_REASON, PKT_INNER_TRUNCATED,
    parse::{ETH_P_IP, ETH_P_IPV6, Headers, Skip, could_be_followed, is_v4_mapped, parse_packet, v4_mapped},
};

use crate::maps::{count, filter, is_followed, matches};

/// Kernel memory starting at an skb's network header.
struct KernelMemory(*const u8);

impl Headers for KernelMemory {
    #[inline(always)]
    fn read<T: Copy>(&self, offset: usize) -> Result<T, Skip> {
        // SAFETY: bpf_probe_read_kernel validates the address and fails cleanly on a bad one.
        unsafe { bpf_probe_read_kernel(self.0.wrapping_add(offset) as *const T) }.map_err(|_| Skip::Unparsed)
    }
}

/// Set by userspace at load time from BTF and tracefs.
#[unsafe(no_mangle)]
static LAYOUT: KernelLayout = KernelLayout {
    skb_head: 0,
    skb_len: 0,
    skb_network_header: 0,
    skb_dev: 0,
    skb_sk: 0,
    skb_iif: 0,
    skb_cb: 0,
    dev_ifindex: 0,
    dev_nd_net: 0,
    net_ns_inum: 0,
    sock_net: 0,
    kfree_skbaddr: 0,
    kfree_location: 0,
    kfree_reason: 0,
    retrans_skbaddr: 0,
    retrans_skaddr: 0,
    retrans_state: 0,
    retrans_family: 0,
    retrans_sport: 0,
    retrans_dport: 0,
    retrans_saddr: 0,
    retrans_daddr: 0,
    retrans_saddr_v6: 0,
    retrans_daddr_v6: 0,
    icmp_skbaddr: 0,
    icmp_type: 0,
    icmp_code: 0,
    kfree_not_drops: [NO_SUCH_REASON; 2],
    skb_nfct: 0,
    ct_tuples: 0,
};

/// `sk_buff._nfct` and the original tuple's offset in `struct nf_conn` (0: no NAT following),
/// for the TC programs' NAT following (`nat`), read field by field: no copy of the whole
/// layout on the stack.
#[inline(always)]
pub fn conntrack_offsets() -> (u32, u32) {
    // SAFETY: a global written only by the loader.
    unsafe { (core::ptr::read_volatile(&raw const LAYOUT.skb_nfct), core::ptr::read_volatile(&raw const LAYOUT.ct_tuples)) }
}

/// Network namespaces (by inode number) whose events belong to this node.
#[map]
static NETNS: HashMap<u32, u8> = HashMap::with_max_entries(MAX_NETNS, 0);

#[map]
static KERNEL_EVENTS: RingBuf = RingBuf::with_byte_size(1 << 18, 0);

/// How deeply these programs can nest on one CPU: a tp_btf program does not take the CPU's
/// `bpf_prog_active`, so a softirq that interrupts it can run a classic tracepoint program
/// (task, softirq, hardirq, NMI: four levels).
const MAX_NESTING: u32 = 4;

/// One event under construction per nesting level, so a nested program never overwrites the
/// record of the one it interrupted.
#[map]
static KERNEL_SCRATCH: PerCpuArray<KernelEvent> = PerCpuArray::with_max_entries(MAX_NESTING, 0);

/// This CPU's current nesting level.
#[map]
static NESTING: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

/// `network_header` of an skb whose network header was never set.
const HEADER_UNSET: u16 = 0xffff;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

#[inline(always)]
fn layout() -> KernelLayout {
    // SAFETY: a global written only by the loader.
    unsafe { core::ptr::read_volatile(&LAYOUT) }
}

#[inline(always)]
fn read<T: Copy>(base: *const u8, offset: u32) -> Option<T> {
    if base.is_null() {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel validates the address and fails cleanly on a bad one.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize) as *const T) }.ok()
}

/// A field of the tracepoint's record at `offset` (from tracefs, through `LAYOUT`).
#[inline(always)]
fn field<T: Copy>(ctx: &TracePointContext, offset: u32) -> Option<T> {
    // SAFETY: read_at goes through bpf_probe_read, which fails cleanly past the record.
    unsafe { ctx.read_at(offset as usize) }.ok()
}

/// `bpf_ktime_get_ns`, the clock of the TC programs' events.
#[inline(always)]
fn now() -> u64 {
    // SAFETY: a helper without arguments or preconditions.
    unsafe { bpf_ktime_get_ns() }
}

#[inline(always)]
fn netns_of_net(net: *const u8, layout: &KernelLayout) -> Option<u32> {
    read(net, layout.net_ns_inum)
}

/// The network namespace and ifindex of an skb: its device's, else its socket's.
#[inline(always)]
fn skb_place(skb: *const u8, layout: &KernelLayout) -> Option<(u32, u32)> {
    let dev: *const u8 = read(skb, layout.skb_dev)?;
    if !dev.is_null() {
        let net: *const u8 = read(dev, layout.dev_nd_net)?;
        return Some((netns_of_net(net, layout)?, read(dev, layout.dev_ifindex)?));
    }
    let sk: *const u8 = read(skb, layout.skb_sk)?;
    Some((sock_netns(sk, layout)?, 0))
}

#[inline(always)]
fn sock_netns(sk: *const u8, layout: &KernelLayout) -> Option<u32> {
    let net: *const u8 = read(sk, layout.sock_net)?;
    netns_of_net(net, layout)
}

#[inline(always)]
fn on_this_node(netns: u32) -> bool {
    // SAFETY: only whether an entry exists is used; the returned reference is never read.
    unsafe { NETNS.get(&netns).is_some() }
}

/// Runs `build` on this nesting level's event, cleared. Deeper than `MAX_NESTING`, the
/// event is counted lost.
#[inline(always)]
fn with_scratch(build: impl FnOnce(&mut KernelEvent)) {
    let Some(nesting) = NESTING.get_ptr_mut(0) else { return };
    // SAFETY: this CPU's slot. A program that interrupts us restores the level it found
    // before we resume, so the read-modify-write below never loses a level.
    let level = unsafe { *nesting };
    if level >= MAX_NESTING {
        count(COUNTER_LOST_KERNEL_EVENTS);
        return;
    }
    // SAFETY: as above.
    unsafe { *nesting = level + 1 };
    if let Some(event) = KERNEL_SCRATCH.get_ptr_mut(level) {
        // SAFETY: this CPU's slot for this level: a nested program uses the next one.
        let event = unsafe { &mut *event };
        crate::zero::zero(event);
        build(event);
    }
    // SAFETY: as above.
    unsafe { *nesting = level };
}

#[inline(always)]
fn submit(event: &mut KernelEvent, kind: u8) {
    event.kind = kind;
    event.ktime_ns = now();
    if KERNEL_EVENTS.output::<KernelEvent>(event, wakeup()).is_err() {
        count(COUNTER_LOST_KERNEL_EVENTS);
    }
}

/// The reader drains this ring on its timer, and is woken only once the ring is half full,
/// so that a burst cannot fill it between two drains. Waking it for each event, as the
/// default does whenever it has caught up (and for events this rare it always has), cost
/// each event more than everything else the program does: an interrupt on this CPU (on a
/// virtual machine, a hypervisor exit), then the reader's wakeup; `tcp:tcp_retransmit_skb`
/// took 10 to 13 µs per run in the bench's lab runs.
#[inline(always)]
fn wakeup() -> u64 {
    let pending = KERNEL_EVENTS.query(u64::from(BPF_RB_AVAIL_DATA));
    let size = KERNEL_EVENTS.query(u64::from(BPF_RB_RING_SIZE));
    u64::from(if pending >= size / 2 { BPF_RB_FORCE_WAKEUP } else { BPF_RB_NO_WAKEUP })
}

/// Fills `event` from the skb's headers, starting at its network header; `false` if the
/// skb is not for this node or not a followed flow.
#[inline(always)]
fn fill_from_skb(skb: *const u8, event: &mut KernelEvent, layout: &KernelLayout) -> bool {
    let Some((netns, ifindex)) = skb_place(skb, layout) else { return false };
    if !on_this_node(netns) {
        return false;
    }
    event.netns = netns;
    event.ifindex = ifindex;
    event.skb_len = read(skb, layout.skb_len).unwrap_or(0);
    let iif: i32 = read(skb, layout.skb_iif).unwrap_or(0);
    if ifindex != 0 && iif == ifindex as i32 {
        event.flags |= KEV_RECEIVED;
    }
    let Some(head) = read::<*const u8>(skb, layout.skb_head) else { return false };
    let Some(network_header) = read::<u16>(skb, layout.skb_network_header) else { return false };
    if head.is_null() || network_header == HEADER_UNSET {
        return false;
    }
    let headers = KernelMemory(head.wrapping_add(network_header as usize));
    let first: u8 = match read(headers.0, 0) {
        Some(first) => first,
        None => return false,
    };
    let ether_type = match first >> 4 {
        4 => ETH_P_IP,
        6 => ETH_P_IPV6,
        _ => return false,
    };
    let filter = filter();
    match parse_packet(&headers, ether_type, 0, &filter.vxlan_ports, &mut event.outer, &mut event.inner) {
        Ok(parsed) => {
            event.flags |= parsed.flags;
            if parsed.flags & PKT_INNER_TRUNCATED != 0 && could_be_followed(&event.outer, &event.inner, parsed.flags, is_followed) {
                count(COUNTER_UNPARSED);
            }
            matches(&filter, &event.outer, &event.inner, parsed.flags)
        }
        // Another flow's truncated headers are none of the report's business.
        Err(Skip::Unparsed) => {
            if could_be_followed(&event.outer, &event.inner, 0, is_followed) {
                count(COUNTER_UNPARSED);
            }
            false
        }
        Err(_) => false,
    }
}

/// A drop of a followed flow, with its reason. A free whose reason says "not a drop" is
/// turned away first, before the scratch record or the skb is touched: the program runs on
/// every free on the node.
#[inline(always)]
fn on_drop(skb: *const u8, location: u64, reason: u32) {
    // SAFETY: a global written only by the loader; the field alone is read.
    let not_drops = unsafe { core::ptr::read_volatile(&raw const LAYOUT.kfree_not_drops) };
    if reason == not_drops[0] || reason == not_drops[1] {
        return;
    }
    with_scratch(|event| {
        if !fill_from_skb(skb, event, &layout()) {
            return;
        }
        event.location = location;
        event.reason = reason;
        submit(event, KEV_DROP);
    });
}

/// `skb:kfree_skb` through its BTF-typed arguments: (skb, location, reason, ...).
#[btf_tracepoint(function = "kfree_skb")]
pub fn podtrace_kfree_skb_btf(ctx: BtfTracePointContext) -> i32 {
    let skb: *const u8 = ctx.arg(0);
    let location: u64 = ctx.arg(1);
    let reason: u32 = ctx.arg(2);
    on_drop(skb, location, reason);
    0
}

/// `skb:kfree_skb` as a classic tracepoint, for kernels that refuse tp_btf.
#[tracepoint]
pub fn podtrace_kfree_skb(ctx: TracePointContext) -> u32 {
    let layout = layout();
    let skb: u64 = field(&ctx, layout.kfree_skbaddr).unwrap_or(0);
    let location: u64 = field(&ctx, layout.kfree_location).unwrap_or(0);
    let reason: u32 = match layout.kfree_reason {
        // This kernel's record has no reason field (before 5.17).
        0 => DROP_REASON_UNKNOWN,
        offset => field(&ctx, offset).unwrap_or(0),
    };
    on_drop(skb as *const u8, location, reason);
    0
}

#[tracepoint]
pub fn podtrace_tcp_retransmit(ctx: TracePointContext) -> u32 {
    with_scratch(|event| on_retransmit(&ctx, event));
    0
}

#[inline(always)]
fn on_retransmit(ctx: &TracePointContext, event: &mut KernelEvent) {
    let layout = layout();
    let sk: u64 = field(ctx, layout.retrans_skaddr).unwrap_or(0);
    let Some(netns) = sock_netns(sk as *const u8, &layout) else { return };
    if !on_this_node(netns) || !retransmitted_flow(ctx, &layout, &mut event.outer) {
        return;
    }
    // The retransmitted segment is a TCP packet of the flow; no VXLAN layer, so no flags.
    if !matches(&filter(), &event.outer, &event.inner, 0) {
        return;
    }
    let skb: u64 = field(ctx, layout.retrans_skbaddr).unwrap_or(0);
    let skb = skb as *const u8;
    // The skb still sits in the write queue: its length is the segment's payload, and the
    // first word of its control block (struct tcp_skb_cb) is the sequence number.
    event.skb_len = read(skb, layout.skb_len).unwrap_or(0);
    event.tcp_seq = read(skb, layout.skb_cb).unwrap_or(0);
    event.reason = field::<i32>(ctx, layout.retrans_state).unwrap_or(0) as u32;
    event.netns = netns;
    submit(event, KEV_RETRANSMIT);
}

/// The retransmitting socket's addresses and ports, from the tracepoint's record; `false`
/// for a family other than IPv4 and IPv6.
#[inline(always)]
fn retransmitted_flow(ctx: &TracePointContext, layout: &KernelLayout, outer: &mut IpLayer) -> bool {
    // Older kernels' records (5.10) have no family field (its offset is 0, the common
    // header); the IPv6 fields hold every socket's addresses there, IPv4 ones as v4-mapped.
    let family = match layout.retrans_family {
        0 => None,
        offset => Some(field::<u16>(ctx, offset).unwrap_or(0)),
    };
    let v6 = |offset| field::<[u8; 16]>(ctx, offset).unwrap_or([0; 16]);
    let v4 = |offset| v4_mapped(field(ctx, offset).unwrap_or([0; 4]));
    let (version, src, dst) = match family {
        None => {
            let src = v6(layout.retrans_saddr_v6);
            (if is_v4_mapped(&src) { 4 } else { 6 }, src, v6(layout.retrans_daddr_v6))
        }
        Some(AF_INET) => (4, v4(layout.retrans_saddr), v4(layout.retrans_daddr)),
        Some(AF_INET6) => (6, v6(layout.retrans_saddr_v6), v6(layout.retrans_daddr_v6)),
        Some(_) => return false,
    };
    outer.version = version;
    outer.src = src;
    outer.dst = dst;
    outer.proto = IPPROTO_TCP;
    outer.sport = field(ctx, layout.retrans_sport).unwrap_or(0);
    outer.dport = field(ctx, layout.retrans_dport).unwrap_or(0);
    true
}

#[tracepoint]
pub fn podtrace_icmp_send(ctx: TracePointContext) -> u32 {
    with_scratch(|event| {
        let layout = layout();
        let skb: u64 = field(&ctx, layout.icmp_skbaddr).unwrap_or(0);
        if !fill_from_skb(skb as *const u8, event, &layout) {
            return;
        }
        event.icmp_type = field::<i32>(&ctx, layout.icmp_type).unwrap_or(0) as u8;
        event.icmp_code = field::<i32>(&ctx, layout.icmp_code).unwrap_or(0) as u8;
        submit(event, KEV_ICMP_SEND);
    });
    0
}
