//! The TC programs on every hop: TCX links where the kernel has them, clsact with cls_bpf
//! otherwise. TCX links (kernel 6.6+) are owned by file descriptors, so they vanish with the
//! process even after SIGKILL; the clsact fallback survives it, so each filter is recorded
//! with its owner (`state`) for `cleanup`.

use anyhow::{Context as _, Result, bail};
use aya::programs::{
    LinkOrder, SchedClassifier, TcAttachType,
    tc::{self, NlOptions, TcAttachOptions},
};
use futures::TryStreamExt as _;

use super::{
    AttachMode, Probes,
    state::{self, FilterRecord},
};
use crate::{
    Direction,
    node::{Hop, ifindex_of, with_rtnetlink},
};

pub const INGRESS_PROGRAM: &str = "podtrace_ingress";
pub const EGRESS_PROGRAM: &str = "podtrace_egress";

impl Probes {
    /// Registers the hop with the kernel filter and attaches both programs to it. The caller
    /// holds the state lock (`StateLock`). In auto mode the first hop decides: TCX if the
    /// kernel accepts a TCX link (6.6+, or a kernel that backported it), clsact otherwise.
    pub async fn attach(&mut self, hop: &Hop) -> Result<()> {
        self.register_hop(hop.ifindex, self.hop_flags(hop))?;
        if self.mode == AttachMode::Auto {
            match self.attach_program(hop, Direction::Ingress, AttachMode::Tcx).await {
                Ok(()) => {
                    self.mode = AttachMode::Tcx;
                    return self.attach_program(hop, Direction::Egress, AttachMode::Tcx).await;
                }
                Err(err) if tcx_refused(&err) => {
                    log::info!("the kernel refuses TCX links ({err:#}); attaching with clsact");
                    self.mode = AttachMode::Clsact;
                }
                Err(err) => return Err(err),
            }
        }
        if self.mode == AttachMode::Clsact {
            match tc::qdisc_add_clsact(&hop.ifname) {
                Ok(()) => state::record_clsact(&hop.ifname)?,
                Err(tc::TcError::NetlinkError(err)) if err.raw_os_error() == Some(libc::EEXIST) => {}
                Err(err) => return Err(err).with_context(|| format!("adding a clsact qdisc to {}", hop.ifname)),
            }
        }
        for direction in [Direction::Ingress, Direction::Egress] {
            self.attach_program(hop, direction, self.mode).await.map_err(|err| match self.mode {
                AttachMode::Tcx if tcx_refused(&err) => {
                    err.context("this kernel does not accept TCX links (before 6.6, unless backported): use --attach clsact or auto")
                }
                _ => err,
            })?;
        }
        Ok(())
    }

    /// Attaches one program to one hook of the hop, first in line, and records it.
    async fn attach_program(&mut self, hop: &Hop, direction: Direction, mode: AttachMode) -> Result<()> {
        let (name, attach_type) = match direction {
            Direction::Ingress => (INGRESS_PROGRAM, TcAttachType::Ingress),
            Direction::Egress => (EGRESS_PROGRAM, TcAttachType::Egress),
        };
        // First in line, so a later program that drops or redirects cannot hide the packet;
        // the program returns "continue", so everything after it still runs.
        let options = match mode {
            AttachMode::Clsact => {
                TcAttachOptions::Netlink(NlOptions { priority: first_priority(hop, direction).await?, ..Default::default() })
            }
            _ => TcAttachOptions::TcxOrder(LinkOrder::first()),
        };
        let program: &mut SchedClassifier = self.ebpf.program_mut(name).context("program missing")?.try_into()?;
        let id = program
            .attach_with_options(&hop.ifname, attach_type, options)
            .with_context(|| format!("attaching {name} to {} ({mode:?})", hop.ifname))?;
        let link = program.take_link(id).context("taking the TC link")?;
        // The kernel attaches by name: a pod restarted since discovery would have a new
        // interface under the old name, and the hop would stay silently empty.
        if ifindex_of(&hop.ifname) != Some(hop.ifindex) {
            bail!(
                "{} was replaced since the path was discovered (it is no longer ifindex {}); run podtrace again",
                hop.ifname,
                hop.ifindex
            );
        }
        if let (Ok(priority), Ok(handle), Some(owner)) = (link.priority(), link.handle(), &self.owner) {
            let record = FilterRecord {
                owner: owner.id.clone(),
                ifindex: hop.ifindex,
                ifname: hop.ifname.clone(),
                ingress: direction == Direction::Ingress,
                priority,
                handle: handle.into(),
            };
            state::record_filter(&record)?;
            self.filters.push(record);
        }
        self.links.push(link);
        Ok(())
    }
}

/// Whether a TCX attach failed because the kernel has no TCX: it rejects the attach type.
fn tcx_refused(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|io| matches!(io.raw_os_error(), Some(libc::EINVAL | libc::EOPNOTSUPP)))
    })
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
