//! The built-in lab and the helpers the privileged integration tests (and `cargo xtask`)
//! use: namespaces, pods made by the CNI plugins, Services as kube-proxy writes them, tcpdump
//! captures, traffic, running podtrace as a user would, and reading its report.

pub mod capture;
pub mod cni;
pub mod fixture;
pub mod inspect;
pub mod kube_proxy;
pub mod lab;
pub mod podtrace;
pub mod report;
pub mod scenario;
pub mod soak;
pub mod traffic;
