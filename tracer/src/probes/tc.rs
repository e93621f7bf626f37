//! The TC programs on every hop: TCX links where the kernel has them, clsact with cls_bpf
//! otherwise. TCX links (kernel 6.6+) are owned by file descriptors, so they vanish with the
//! process even after SIGKILL; the clsact fallback survives it, which `cleanup` handles.

use anyhow::{Context as _, Result};
use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType,
    tc::{self, NlOptions, TcAttachOptions},
};
use futures::TryStreamExt as _;

use super::{AttachMode, Probes, cleanup};
use crate::{
    Direction,
    node::{Hop, with_rtnetlink},
};

pub const INGRESS_PROGRAM: &str = "podtrace_ingress";
pub const EGRESS_PROGRAM: &str = "podtrace_egress";

impl Probes {
    /// Registers the hop with the kernel filter and attaches both programs to it.
    pub async fn attach(&mut self, hop: &Hop) -> Result<()> {
        self.register_hop(hop.ifindex, hop.no_mac_header)?;

        if self.mode == AttachMode::Clsact {
            match tc::qdisc_add_clsact(&hop.ifname) {
                Ok(()) => {
                    self.created_clsact.insert(hop.ifname.clone());
                    cleanup::record_created_clsact(&self.created_clsact)?;
                }
                Err(tc::TcError::NetlinkError(err)) if err.raw_os_error() == Some(libc::EEXIST) => {}
                Err(err) => return Err(err).with_context(|| format!("adding a clsact qdisc to {}", hop.ifname)),
            }
        }
        for direction in [Direction::Ingress, Direction::Egress] {
            let (name, attach_type) = match direction {
                Direction::Ingress => (INGRESS_PROGRAM, TcAttachType::Ingress),
                Direction::Egress => (EGRESS_PROGRAM, TcAttachType::Egress),
            };
            // First in line, so a later program that drops or redirects cannot hide the packet;
            // the program returns "continue", so everything after it still runs.
            let options = match self.mode {
                AttachMode::Clsact => {
                    TcAttachOptions::Netlink(NlOptions { priority: first_priority(hop, direction).await?, ..Default::default() })
                }
                _ => TcAttachOptions::TcxOrder(LinkOrder::first()),
            };
            let program: &mut SchedClassifier = self.ebpf.program_mut(name).context("program missing")?.try_into()?;
            program
                .attach_with_options(&hop.ifname, attach_type, options)
                .with_context(|| format!("attaching {name} to {} ({:?})", hop.ifname, self.mode))?;
        }
        Ok(())
    }
}

/// A cls_bpf priority ahead of every filter already on the hook (lower runs first).
async fn first_priority(hop: &Hop, direction: Direction) -> Result<u16> {
    let filters: Vec<_> = with_rtnetlink(async |handle| {
        let request = handle.traffic_filter(hop.ifindex as i32).get();
        let request = match direction {
            Direction::Ingress => request.ingress(),
            Direction::Egress => request.egress(),
        };
        request.execute().try_collect().await.with_context(|| format!("listing the TC filters on {}", hop.ifname))
    })
    .await?;
    let lowest = filters.iter().map(|filter| (filter.header.info >> 16) as u16).filter(|p| *p > 0).min();
    Ok(match lowest {
        None => 0,
        Some(1) => {
            log::warn!("a filter at priority 1 on {} {direction} runs before podtrace; packets it drops are not seen", hop.ifname);
            1
        }
        Some(lowest) => lowest - 1,
    })
}
