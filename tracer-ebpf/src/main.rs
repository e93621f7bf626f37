//! podtrace kernel programs.
//!
//! `tc` holds the TC classifiers, `nat` their following of the pods' translated flows (NAT on
//! the node's NICs), `kernel_events` the tracepoint programs; both parse with
//! `tracer_common::parse` (which userspace runs too) and decide what to report with
//! `maps::matches`.
//!
//! The TC programs only observe: they read headers with direct packet access and
//! `bpf_skb_load_bytes` (which works on non-linear skbs and bounds-checks for us), never
//! touch the packet, and always return the "continue" verdict so the packet's fate and any
//! other TC programs are unchanged.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod kernel_events;
#[cfg(target_arch = "bpf")]
mod maps;
#[cfg(target_arch = "bpf")]
mod nat;
#[cfg(target_arch = "bpf")]
mod tc;
#[cfg(target_arch = "bpf")]
mod zero;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects programs that can reach a panic; this is never linked in practice.
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
