//! The built-in lab and the helpers the privileged integration tests (and `cargo xtask`)
//! use: namespaces, tcpdump captures, traffic, and running podtrace as a user would.

pub mod capture;
pub mod fixture;
pub mod inspect;
pub mod lab;
pub mod podtrace;
pub mod scenario;
pub mod traffic;
