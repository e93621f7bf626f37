//! What the TC and the tracepoint programs share: the followed IPs, the load-time filter, the
//! per-CPU counters, and `matches`, the one test of whether a parsed packet is reported.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, PerCpuArray},
};
use tracer_common::{
    COUNTER_COUNT, FilterConfig, FollowedV4, IpLayer, MAX_FAST_FOLLOWED, MAX_FOLLOWED, PKT_ENCAPSULATED, PKT_INNER_TRUNCATED,
};

/// Set by userspace at load time; zero fields mean "any".
#[unsafe(no_mangle)]
static FILTER: FilterConfig =
    FilterConfig { peer: [0; 16], has_peer: 0, proto: 0, port: 0, vxlan_ports: [8472, 4789], full_parse_only: 0, reserved: 0 };

/// Followed pod IPs (IPv4-mapped for IPv4).
#[map]
static FOLLOWED: HashMap<[u8; 16], u8> = HashMap::with_max_entries(MAX_FOLLOWED, 0);

/// The followed IPv4 addresses for the TC programs' "not ours" test (one entry; an array
/// lookup with a constant index, which the verifier turns into a pointer).
#[map]
static FOLLOWED_V4: Array<FollowedV4> = Array::with_max_entries(1, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// The filter userspace wrote into `FILTER` before loading.
#[inline(always)]
pub fn filter() -> FilterConfig {
    // SAFETY: FILTER is only written by the loader, before any program runs; the volatile read
    // keeps the compiler from folding in the zero initialiser.
    unsafe { core::ptr::read_volatile(&FILTER) }
}

const _: () = assert!(MAX_FAST_FOLLOWED == 8, "holds compares 8 slots");

/// What the TC programs' fast test compares packets with: the followed IPv4 addresses (all
/// of them: `fast_followed` gives none when more are followed than `FollowedV4` holds), the
/// VXLAN ports, and whether `--peer`, `--port` or `--proto` narrow what is reported (then
/// the fast test can turn packets away but not report them).
pub struct FastFollowed {
    followed: &'static FollowedV4,
    pub narrowed: bool,
    pub vxlan_ports: [u16; 2],
}

impl FastFollowed {
    /// Whether an IPv4 address (as the packet's bytes, read as a native `u32`) is followed.
    #[inline(always)]
    pub fn holds(&self, addr: u32) -> bool {
        holds(self.followed, addr)
    }
}

/// The fast test's view of the followed IPs, or `None` where it cannot decide anything: it
/// is switched off (`full_parse_only`), or more IPv4 addresses are followed than it compares.
/// `FILTER`'s fields are read one by one, with no copy of the whole filter on the stack (a
/// subprogram's frame counts against 5.10's 512 bytes).
#[inline(always)]
pub fn fast_followed() -> Option<FastFollowed> {
    // SAFETY: as in `filter`.
    let (full_parse_only, has_peer, proto, port, vxlan_ports) = unsafe {
        (
            core::ptr::read_volatile(&raw const FILTER.full_parse_only),
            core::ptr::read_volatile(&raw const FILTER.has_peer),
            core::ptr::read_volatile(&raw const FILTER.proto),
            core::ptr::read_volatile(&raw const FILTER.port),
            core::ptr::read_volatile(&raw const FILTER.vxlan_ports),
        )
    };
    if full_parse_only != 0 {
        return None;
    }
    let followed = fast_followed_v4()?;
    Some(FastFollowed { followed, narrowed: has_peer != 0 || proto != 0 || port != 0, vxlan_ports })
}

/// The followed IPv4 addresses when `FollowedV4` holds all of them (then it answers alone,
/// without the `FOLLOWED` hash map); `None` when more are followed than it holds.
#[inline(always)]
fn fast_followed_v4() -> Option<&'static FollowedV4> {
    let followed = FOLLOWED_V4.get_ptr(0)?;
    // SAFETY: the map's single entry, written only by userspace.
    let followed = unsafe { &*followed };
    (followed.overflow == 0).then_some(followed)
}

/// Whether `addr` is one of the addresses set in `followed`.
#[inline(always)]
fn holds(followed: &FollowedV4, addr: u32) -> bool {
    let a = &followed.addrs;
    // One followed pod, the common case: one compare instead of eight, four times for a
    // VXLAN packet.
    if followed.count == 1 {
        return a[0] == addr;
    }
    // Every slot compared, a bit each, with constant offsets: no loop whose bound an older
    // verifier (5.10's) could lose track of. `count` masks the slots that are set.
    let hits = u32::from(a[0] == addr)
        | u32::from(a[1] == addr) << 1
        | u32::from(a[2] == addr) << 2
        | u32::from(a[3] == addr) << 3
        | u32::from(a[4] == addr) << 4
        | u32::from(a[5] == addr) << 5
        | u32::from(a[6] == addr) << 6
        | u32::from(a[7] == addr) << 7;
    let set = if followed.count >= MAX_FAST_FOLLOWED as u32 { u32::MAX } else { (1u32 << followed.count) - 1 };
    hits & set != 0
}

#[inline(always)]
pub fn count(index: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot; a program runs to completion on its CPU, so nothing else
        // writes it meanwhile.
        unsafe { *counter += 1 };
    }
}

/// Whether a parsed packet is reported: an outer or (for VXLAN and IPIP) inner address is followed,
/// and the pod's own header passes `--peer`, `--port` and `--proto`.
#[inline(always)]
pub fn matches(filter: &FilterConfig, outer: &IpLayer, inner: &IpLayer, flags: u8) -> bool {
    // A truncated inner packet may still have its addresses: they count for following, but
    // the filter needs its ports, so it then applies to the outer header.
    let encapsulated = flags & PKT_ENCAPSULATED != 0;
    let followed = is_followed(outer) || (encapsulated && is_followed(inner));
    let pod_layer = if encapsulated && flags & PKT_INNER_TRUNCATED == 0 { inner } else { outer };
    followed && passes_filter(filter, pod_layer)
}

/// Whether an address of `layer` is followed.
#[inline(always)]
pub fn is_followed(layer: &IpLayer) -> bool {
    if layer.version == 4 {
        if let Some(followed) = fast_followed_v4() {
            let v4 = |addr: &[u8; 16]| u32::from_ne_bytes([addr[12], addr[13], addr[14], addr[15]]);
            return holds(followed, v4(&layer.src)) || holds(followed, v4(&layer.dst));
        }
    }
    // SAFETY: only whether an entry exists is used; the returned reference is never read.
    unsafe { FOLLOWED.get(&layer.src).is_some() || FOLLOWED.get(&layer.dst).is_some() }
}

/// `passes_filter` for an IPv4 flow given by its addresses (as the packet's bytes, read as
/// native `u32`s), protocol and ports (host order; 0 where the parse reads none): `FILTER`'s
/// fields read one by one, with no copy of the whole filter on the stack.
#[inline(always)]
pub fn passes_filter_v4(src: u32, dst: u32, proto: u8, sport: u16, dport: u16) -> bool {
    // SAFETY: as in `filter`.
    let (has_peer, filter_proto, port) = unsafe {
        (
            core::ptr::read_volatile(&raw const FILTER.has_peer),
            core::ptr::read_volatile(&raw const FILTER.proto),
            core::ptr::read_volatile(&raw const FILTER.port),
        )
    };
    if has_peer != 0 && !peer_is_v4(src) && !peer_is_v4(dst) {
        return false;
    }
    if filter_proto != 0 && proto != filter_proto {
        return false;
    }
    !(port != 0 && sport != port && dport != port)
}

/// Whether `--peer` is the IPv4 address `addr` (as the packet's bytes, read as a native
/// `u32`): `FILTER.peer` read a 16-bit word at a time (it starts the 2-aligned filter), each
/// compared before the next is read, so that few registers hold it at once.
#[inline(always)]
fn peer_is_v4(addr: u32) -> bool {
    let words = (&raw const FILTER.peer).cast::<u16>();
    let bytes = addr.to_ne_bytes();
    let expected = [0, 0, 0, 0, 0, 0xffff, u16::from_ne_bytes([bytes[0], bytes[1]]), u16::from_ne_bytes([bytes[2], bytes[3]])];
    // SAFETY: as in `filter`; the 8 words of the 16-byte `peer`, 2-aligned at its start.
    expected.iter().enumerate().all(|(index, word)| unsafe { core::ptr::read_volatile(words.add(index)) } == *word)
}

/// Whether an IPv4 address (as the packet's bytes, read as a native `u32`) is followed.
#[inline(always)]
pub fn is_followed_v4(addr: u32) -> bool {
    if let Some(followed) = fast_followed_v4() {
        return holds(followed, addr);
    }
    let mapped = tracer_common::parse::v4_mapped(addr.to_ne_bytes());
    // SAFETY: only whether an entry exists is used.
    unsafe { FOLLOWED.get(&mapped).is_some() }
}

#[inline(always)]
fn passes_filter(filter: &FilterConfig, layer: &IpLayer) -> bool {
    if filter.has_peer != 0 && layer.src != filter.peer && layer.dst != filter.peer {
        return false;
    }
    if filter.proto != 0 && layer.proto != filter.proto {
        return false;
    }
    if filter.port != 0 && layer.sport != filter.port && layer.dport != filter.port {
        return false;
    }
    true
}
