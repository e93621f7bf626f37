//! Following the pods' flows through the node's NAT. On a hop with `HOP_NAT` (the NIC, a
//! bond, its slaves), an IPv4 packet the fast test turned away is looked up as a translated
//! flow of a followed pod:
//! - masqueraded egress: a pod talking to anything outside the cluster is masqueraded to the
//!   node's address on the way out (flannel's `ipMasq`, Calico's `natOutgoing`), so on the NIC
//!   its packets carry no followed address;
//! - NodePort ingress: a client outside sends to the node's address, which is DNATed to the
//!   pod only inside the node, and the pod's replies leave un-DNATed.
//!
//! On egress, after POSTROUTING, the skb's own conntrack entry (`skb->_nfct`) has both tuples
//! final. A translated entry makes the packet the pod's when the pod began the flow (its
//! original source, a packet of the original direction) or the flow was DNATed to it (its
//! reply source, a packet of the reply direction). Then the tuple its next packets arrive
//! with is learned (`NAT_FLOWS`): the reply tuple of the pod's own flows, the original tuple
//! of the flows DNATed to it. On ingress, before conntrack has undone (or done) the NAT, a
//! packet whose tuple was learned is the pod's.
//!
//! Either way the event is a `TranslatedRecord`: the packet's head and the tuple the pod's side
//! of the NAT has, so userspace links it to the pod's hops and names what it was translated to.
//! A DNATed flow is learned from its first reply: its packets before that (a TCP SYN, a first
//! datagram) are not matched on the hops before the NAT, and `COUNTER_DNAT_FLOWS` lets the
//! report say so.

use aya_ebpf::{
    bindings::{__sk_buff, BPF_RB_NO_WAKEUP},
    helpers::{bpf_probe_read_kernel_buf, bpf_skb_load_bytes},
    macros::map,
    maps::{LruHashMap, PerCpuArray},
};
use tracer_common::{
    COUNTER_DNAT_FLOWS, COUNTER_LOST_EVENTS, COUNTER_MATCHED, COUNTER_NAT_FLOWS, COUNTER_UNPARSED, CT_DST_ADDR, CT_DST_PORT, CT_L3NUM,
    CT_PROTONUM, CT_READ, CT_REPLY_TUPLE, CT_SRC_ADDR, CT_SRC_PORT, CT_STATUS, DIR_EGRESS, HEAD_SHORT, IP_CT_IS_REPLY, IP_CT_RELATED,
    IP_CT_RELATED_REPLY, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, IPS_NAT_MASK, MAX_NAT_FLOWS, NFCT_INFO_MASK, NatTuple, PKT_TRANSLATED,
    TranslatedRecord,
};

use crate::{
    kernel_events::conntrack_offsets,
    maps::{count, is_followed_v4, passes_filter_v4},
    tc::{EVENTS, copy_len, ipv4_headers_end, packet_meta},
};

/// Reply tuples of the followed pods' translated flows (as their packets arrive, before
/// conntrack undoes the NAT), each with the tuple the pod has for those packets.
#[map]
static NAT_FLOWS: LruHashMap<NatTuple, NatTuple> = LruHashMap::with_max_entries(MAX_NAT_FLOWS, 0);

/// Room for reading a conntrack entry and learning its flow, in per-CPU memory: on the stack
/// it would add to the TC program's own frame, and 5.10 refuses more than 512 bytes for both.
/// Aligned, so that every field of the entry is read with one aligned load (the `CT_*`
/// offsets are multiples of their fields' sizes).
#[repr(C, align(8))]
struct Scratch {
    entry: [u8; CT_READ],
    nfct: [u8; 8],
    /// The tuple the flow's next packets arrive with (a `NAT_FLOWS` key): the reply tuple of
    /// a flow the pod began, the original tuple of one DNATed to it.
    arriving: NatTuple,
    /// Those packets' tuple on the pod's side of the NAT.
    back: NatTuple,
    /// The packet's tuple on the pod's side of the NAT, when it is the pod's.
    pod: NatTuple,
}

#[map]
static NAT_SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);

const ETH_HLEN: usize = 14;
const IPV4_HLEN: usize = 20;
const AF_INET: u16 = 2;
const ICMP_ECHOREPLY: u8 = 0;
const BPF_NOEXIST: u64 = 1;

/// A packet on a `HOP_NAT` hop that the fast test turned away: a plain IPv4 packet (the fast
/// test read it so) with none of the followed addresses. Reported when it belongs to a
/// followed pod's translated flow. A function of its own, so that the cost and the
/// verifier's paths stay off every other packet's way.
#[inline(never)]
pub fn trace_translated(skb: *mut __sk_buff, direction: u32, hop_flags: u32) {
    let (nfct_offset, tuples_offset) = conntrack_offsets();
    if nfct_offset == 0 {
        return;
    }
    let Some(scratch) = NAT_SCRATCH.get_ptr_mut(0) else { return };
    // SAFETY: a per-CPU slot, exclusively ours until this program run ends.
    let scratch = unsafe { &mut *scratch };
    let ours =
        if direction == u32::from(DIR_EGRESS) { egress_flow(skb, scratch, nfct_offset, tuples_offset) } else { ingress_flow(skb, scratch) };
    if ours && passes_filter(&scratch.pod) {
        emit(skb, direction, hop_flags, &scratch.pod);
    }
}

/// The egress packet's conntrack entry, read in one go: a translated flow a followed pod began,
/// seen in its original direction, or one DNATed to a followed pod, seen in its reply
/// direction, gives the pod's tuple, and the tuple of the flow's next arrivals is learned.
#[inline(always)]
fn egress_flow(skb: *mut __sk_buff, scratch: &mut Scratch, nfct_offset: u32, tuples_offset: u32) -> bool {
    // SAFETY: the program's context is the kernel's `struct sk_buff`; `_nfct`'s offset comes
    // from its BTF, and bpf_probe_read_kernel fails cleanly on a bad address.
    if unsafe { bpf_probe_read_kernel_buf(skb.cast::<u8>().wrapping_add(nfct_offset as usize), &mut scratch.nfct) }.is_err() {
        return false;
    }
    let nfct = u64::from_ne_bytes(scratch.nfct);
    let conntrack = nfct & !NFCT_INFO_MASK;
    let info = nfct & NFCT_INFO_MASK;
    // No entry (untracked), or an ICMP error about the flow, which is not of the entry's
    // protocol and whose quote names the flow: left for later, as on ingress.
    if conntrack == 0 || info == IP_CT_RELATED || info == IP_CT_RELATED_REPLY {
        return false;
    }
    let reply_direction = info >= IP_CT_IS_REPLY;
    // SAFETY: the entry's address from the skb; the tuples' offset from BTF, the rest of the
    // layout checked against it by userspace; bpf_probe_read_kernel fails cleanly.
    if unsafe { bpf_probe_read_kernel_buf((conntrack as *const u8).wrapping_add(tuples_offset as usize), &mut scratch.entry) }.is_err() {
        return false;
    }
    let entry = scratch.entry.as_ptr();
    // SAFETY (all reads below): constant offsets inside the 8-aligned `entry`, each a multiple
    // of its field's size.
    let at_u32 = |offset: usize| unsafe { core::ptr::read(entry.add(offset).cast::<u32>()) };
    let at_u16 = |offset: usize| unsafe { core::ptr::read(entry.add(offset).cast::<u16>()) };
    let status = unsafe { core::ptr::read(entry.add(CT_STATUS).cast::<u64>()) };
    if at_u16(CT_L3NUM) != AF_INET || status & IPS_NAT_MASK == 0 {
        return false;
    }
    let proto = scratch.entry[CT_PROTONUM];
    let reply = CT_REPLY_TUPLE;
    let tuple = |src, dst, sport, dport, flags| NatTuple { src, dst, sport, dport, proto, flags, reserved: 0 };
    // Each branch reads the entry's fields itself: values read before it would live across
    // it, and the stack frame they spill to counts against 5.10's 512 bytes for the program
    // and its calls together.
    if reply_direction {
        // A flow DNATed to a followed pod (NodePort), whose reply this is: the packet has the
        // reply tuple on the pod's side, and the client's next packets arrive with the
        // original tuple, the pod getting them as the reply tuple reversed. TCP and UDP
        // only: nothing DNATs an echo to a pod.
        if !matches!(proto, IPPROTO_TCP | IPPROTO_UDP) || !is_followed_v4(at_u32(reply + CT_SRC_ADDR)) {
            return false;
        }
        let (reply_src, reply_dst) = (at_u32(reply + CT_SRC_ADDR), at_u32(reply + CT_DST_ADDR));
        let (reply_sport, reply_dport) = (at_u16(reply + CT_SRC_PORT), at_u16(reply + CT_DST_PORT));
        scratch.pod = tuple(reply_src, reply_dst, reply_sport, reply_dport, PKT_TRANSLATED);
        scratch.back = tuple(reply_dst, reply_src, reply_dport, reply_sport, PKT_TRANSLATED);
        scratch.arriving = tuple(at_u32(CT_SRC_ADDR), at_u32(CT_DST_ADDR), at_u16(CT_SRC_PORT), at_u16(CT_DST_PORT), 0);
        return learn(scratch, true);
    }
    if !is_followed_v4(at_u32(CT_SRC_ADDR)) {
        return false;
    }
    let (original_src, original_dst) = (at_u32(CT_SRC_ADDR), at_u32(CT_DST_ADDR));
    // An echo's "ports" are its id (`src.u`) and its type and code (`dst.u`): only the id is
    // the flow's, and the replies carry it as their id.
    let (pod_sport, pod_dport, reply_sport, reply_dport) = match proto {
        IPPROTO_TCP | IPPROTO_UDP => (at_u16(CT_SRC_PORT), at_u16(CT_DST_PORT), at_u16(reply + CT_SRC_PORT), at_u16(reply + CT_DST_PORT)),
        IPPROTO_ICMP => (at_u16(CT_SRC_PORT), 0, at_u16(reply + CT_SRC_PORT), 0),
        _ => return false,
    };
    scratch.pod = tuple(original_src, original_dst, pod_sport, pod_dport, PKT_TRANSLATED);
    // The replies arrive with the reply tuple's addresses and ports; the pod gets them back
    // from its peer, to its own port.
    scratch.arriving = tuple(at_u32(reply + CT_SRC_ADDR), at_u32(reply + CT_DST_ADDR), reply_sport, reply_dport, 0);
    let (sport, dport) = if proto == IPPROTO_ICMP { (pod_sport, 0) } else { (pod_dport, pod_sport) };
    scratch.back = tuple(original_dst, original_src, sport, dport, PKT_TRANSLATED);
    learn(scratch, false)
}

/// Learns that packets arriving as `scratch.arriving` are the pod's, as `scratch.back`; a new
/// flow is counted in `COUNTER_NAT_FLOWS`, and one DNATed to the pod in `COUNTER_DNAT_FLOWS`
/// too. Always `true`: the packet it is learned from is the pod's.
#[inline(always)]
fn learn(scratch: &Scratch, dnat: bool) -> bool {
    // SAFETY: only whether an entry exists is used.
    // A new flow (another CPU may have learned it meanwhile: then it is not counted twice).
    if unsafe { NAT_FLOWS.get(&scratch.arriving) }.is_none() && NAT_FLOWS.insert(&scratch.arriving, &scratch.back, BPF_NOEXIST).is_ok() {
        count(COUNTER_NAT_FLOWS);
        if dnat {
            count(COUNTER_DNAT_FLOWS);
        }
    }
    true
}

/// The ingress packet's tuple, looked up among the learned reply tuples.
#[inline(always)]
fn ingress_flow(skb: *mut __sk_buff, scratch: &mut Scratch) -> bool {
    // SAFETY: the program's context, valid for the whole run.
    let (data, end) = unsafe { ((*skb).data as usize, (*skb).data_end as usize) };
    const L3: usize = ETH_HLEN;
    if data + L3 + IPV4_HLEN + 8 > end {
        return false;
    }
    // SAFETY (all reads below): within [data, data + L3 + IPV4_HLEN + 8), checked above; the
    // fast test found an IPv4 header without options at L3.
    let read_u8 = |offset: usize| unsafe { core::ptr::read((data + offset) as *const u8) };
    let read_u16 = |offset: usize| unsafe { core::ptr::read_unaligned((data + offset) as *const u16) };
    let read_u32 = |offset: usize| unsafe { core::ptr::read_unaligned((data + offset) as *const u32) };
    // A later fragment has no ports; the key would be another flow's.
    if read_u16(L3 + 6) & u16::to_be(0x1fff) != 0 {
        return false;
    }
    let proto = read_u8(L3 + 9);
    let l4 = L3 + IPV4_HLEN;
    let (sport, dport) = match proto {
        IPPROTO_TCP | IPPROTO_UDP => (read_u16(l4), read_u16(l4 + 2)),
        // Echo replies; an ICMP error about a translated packet names the flow only inside the
        // packet it quotes, left for later.
        IPPROTO_ICMP if read_u8(l4) == ICMP_ECHOREPLY => (read_u16(l4 + 4), 0),
        _ => return false,
    };
    let key = NatTuple { src: read_u32(L3 + 12), dst: read_u32(L3 + 16), sport, dport, proto, flags: 0, reserved: 0 };
    // SAFETY: the entry is copied out at once.
    match unsafe { NAT_FLOWS.get(&key) } {
        Some(pod) => {
            scratch.pod = *pod;
            true
        }
        None => false,
    }
}

/// `--peer`, `--port` and `--proto` on the pod's side of the NAT, as `maps::matches` applies
/// them to the pod's header (the parse reads no ports for ICMP).
#[inline(always)]
fn passes_filter(pod: &NatTuple) -> bool {
    let (sport, dport) = if pod.proto == IPPROTO_ICMP { (0, 0) } else { (u16::from_be(pod.sport), u16::from_be(pod.dport)) };
    passes_filter_v4(pod.src, pod.dst, pod.proto, sport, dport)
}

/// The event of a translated packet: its headers (never payload, as `tc::emit` copies them:
/// a plain IPv4 packet's fit a `HEAD_SHORT` head) copied straight into the ring record, with
/// the pod's tuple. An ICMP error (whose quote would name the flow) and a TCP header beyond the
/// linear area are left out, as their translated flows are left for later.
#[inline(always)]
fn emit(skb: *mut __sk_buff, direction: u32, hop_flags: u32, pod: &NatTuple) {
    // SAFETY: the program's context, valid for the whole run.
    let skb_ref = unsafe { &*skb };
    let Some(headers_end) = ipv4_headers_end(skb_ref.data as usize, skb_ref.data_end as usize, ETH_HLEN) else {
        count(COUNTER_UNPARSED);
        return;
    };
    let Some(len) = copy_len::<HEAD_SHORT>(skb_ref.len.min(headers_end as u32)) else {
        count(COUNTER_UNPARSED);
        return;
    };
    let Some(mut record) = EVENTS.reserve::<TranslatedRecord>(0) else {
        count(COUNTER_MATCHED);
        count(COUNTER_LOST_EVENTS);
        return;
    };
    let record_ptr = record.as_mut_ptr();
    // SAFETY: the program's context, and `len` (1..=HEAD_SHORT) bytes of the reserved record's head.
    let copied = unsafe { bpf_skb_load_bytes(skb.cast(), 0, (*record_ptr).head.as_mut_ptr().cast(), len as u32) };
    if copied != 0 {
        record.discard(0);
        count(COUNTER_UNPARSED);
        return;
    }
    count(COUNTER_MATCHED);
    // SAFETY: the reserved record is ours until submitted.
    unsafe {
        (*record_ptr).meta = packet_meta(skb_ref, len, direction, hop_flags);
        (*record_ptr).pod = *pod;
    }
    // Never woken, as `tc::emit`'s records: the reader drains the ring on a timer.
    record.submit(u64::from(BPF_RB_NO_WAKEUP));
}
