//! What the TC and the tracepoint programs share: the followed IPs, the load-time filter, the
//! per-CPU counters, and `matches`, the one test of whether a parsed packet is reported.

use aya_ebpf::{
    macros::map,
    maps::{HashMap, PerCpuArray},
};
use tracer_common::{COUNTER_COUNT, FilterConfig, IpLayer, MAX_FOLLOWED, PKT_INNER_TRUNCATED, PKT_VXLAN};

/// Set by userspace at load time; zero fields mean "any".
#[unsafe(no_mangle)]
static FILTER: FilterConfig = FilterConfig { peer: [0; 16], has_peer: 0, proto: 0, port: 0, vxlan_ports: [8472, 4789] };

/// Followed pod IPs (IPv4-mapped for IPv4).
#[map]
static FOLLOWED: HashMap<[u8; 16], u8> = HashMap::with_max_entries(MAX_FOLLOWED, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_COUNT, 0);

/// The filter userspace wrote into `FILTER` before loading.
#[inline(always)]
pub fn filter() -> FilterConfig {
    // SAFETY: FILTER is only written by the loader, before any program runs; the volatile read
    // keeps the compiler from folding in the zero initialiser.
    unsafe { core::ptr::read_volatile(&FILTER) }
}

#[inline(always)]
pub fn count(index: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(index) {
        // SAFETY: a per-CPU slot; a program runs to completion on its CPU, so nothing else
        // writes it meanwhile.
        unsafe { *counter += 1 };
    }
}

/// Whether a parsed packet is reported: an outer or (for VXLAN) inner address is followed,
/// and the pod's own header passes `--peer`, `--port` and `--proto`.
#[inline(always)]
pub fn matches(filter: &FilterConfig, outer: &IpLayer, inner: &IpLayer, flags: u8) -> bool {
    // A truncated inner packet may still have its addresses: they count for following, but
    // the filter needs its ports, so it then applies to the outer header.
    let followed = is_followed(outer) || (flags & PKT_VXLAN != 0 && is_followed(inner));
    let pod_layer = if flags & PKT_VXLAN != 0 && flags & PKT_INNER_TRUNCATED == 0 { inner } else { outer };
    followed && passes_filter(filter, pod_layer)
}

#[inline(always)]
fn is_followed(layer: &IpLayer) -> bool {
    // SAFETY: only whether an entry exists is used; the returned reference is never read.
    unsafe { FOLLOWED.get(&layer.src).is_some() || FOLLOWED.get(&layer.dst).is_some() }
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
