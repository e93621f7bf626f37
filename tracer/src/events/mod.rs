//! What the kernel programs report, in userspace: ring records into typed packets and kernel
//! events (`decode`), and the same packet recognised hop by hop (`correlate`, with latencies
//! in a fixed-size `histogram`).

pub mod correlate;
pub mod decode;
pub mod histogram;
#[cfg(test)]
pub(crate) mod testing;
