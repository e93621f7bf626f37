//! `cargo xtask demo`: the built-in lab, a pod talking, and podtrace's report on it.

use std::path::Path;

use anyhow::{Result, bail};
use podtrace_tests::{
    lab::{Lab, LabSpec, unique_prefix},
    podtrace::Podtrace,
    scenario::{self, Scenario},
};

/// A fault to inject before tracing, each showing one finding.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Fault {
    /// A healthy lab: no warning or error.
    None,
    /// An iptables DROP in node B's FORWARD chain for the app port (`drop`).
    Drop,
    /// Node B's underlay MTU is 1400 while the tunnel needs 1500 (`retransmits` with the MTU signature).
    Mtu,
    /// Pod A's MTU is 1500 over a 1450 tunnel, with ICMP fragmentation-needed blocked (`mtu-mismatch`).
    PodMtu,
    /// Node A's tunnel is bound to a second address peers do not know (`vxlan-source-mismatch`).
    VxlanSource,
    /// Node B lost its route back to pod A's subnet (`no-reply`).
    NoReply,
    /// A DNS Service IP without its DNAT rules (`dns-unanswered`).
    Dns,
    /// A connection to a port nothing listens on (`port-refused`).
    PortRefused,
}

impl Fault {
    fn scenario(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Drop => "drop",
            Self::Mtu => "mtu",
            Self::PodMtu => "pod-mtu",
            Self::VxlanSource => "vxlan-source",
            Self::NoReply => "no-reply",
            Self::Dns => "dns",
            Self::PortRefused => "port-refused",
        }
    }
}

pub fn run(binary: &Path, fault: Fault) -> Result<()> {
    // SAFETY: set before any thread is spawned; the podtrace runner reads it.
    unsafe { std::env::set_var("PODTRACE_BIN", binary) };
    let name = fault.scenario();
    let mut spec = LabSpec { prefix: unique_prefix("demo"), ..Default::default() };
    scenario::adjust_spec(name, &mut spec);
    println!("xtask: bringing up the lab ({}), fault: {name}", spec.prefix);
    let lab = Lab::up(spec)?;
    let scenario = Scenario::prepare(&lab, name)?;
    let (node, pod_ip) = scenario.traced(&lab);
    println!("xtask: ip netns exec {node} podtrace follow {pod_ip} --duration 8   (while the pod talks)\n");
    let podtrace = Podtrace::start(node, &["follow", &pod_ip.to_string(), "--duration", "8"])?;
    scenario.traffic(&lab)?;
    let finished = podtrace.wait()?;
    eprint!("{}", finished.stderr);
    println!();
    print!("{}", finished.stdout);
    if !finished.status.success() {
        bail!("podtrace failed ({})", finished.status);
    }
    drop(scenario);
    drop(lab);
    println!("\nxtask: lab torn down");
    Ok(())
}
