//! What runs leave behind: the cls_bpf filters of runs that are gone (found through their
//! records, never by name alone, so a live run's filters stay), and clsact qdiscs podtrace
//! created that nothing uses any more. Every function here runs under the state lock.

use std::{collections::BTreeSet, io::ErrorKind};

use anyhow::{Context as _, Result, anyhow};
use aya::programs::{
    TcAttachType,
    links::Link as _,
    tc::{self, SchedClassifierLink, TcHandle},
};
use futures::TryStreamExt as _;
use netlink_packet_route::tc::TcHandle as NlTcHandle;

use super::{
    state::{self, FilterRecord, Owner},
    tc::{EGRESS_PROGRAM, INGRESS_PROGRAM},
};
use crate::node::{ifindex_of, interfaces, with_rtnetlink};

/// What `sweep` removed.
#[derive(Debug, Default)]
pub struct Swept {
    pub filters: Vec<String>,
    pub qdiscs: Vec<String>,
}

/// Removes the filters recorded by runs that are gone and the clsact qdiscs podtrace created
/// that nothing uses any more. When no run but `own` is alive, also every filter named like
/// podtrace's (one attached by a run killed before it could record it): with another run
/// alive, a filter known by name alone could be that run's.
pub async fn sweep(own: Option<&Owner>) -> Result<Swept> {
    let mut swept = Swept::default();
    let dead: Vec<FilterRecord> = state::recorded_filters()?.into_iter().filter(|record| !state::owner_alive(&record.owner)).collect();
    for record in &dead {
        if remove_filter(record).with_context(|| format!("removing a killed run's filter from {}", record.ifname))? {
            swept.filters.push(format!("{} {}", record.ifname, if record.ingress { INGRESS_PROGRAM } else { EGRESS_PROGRAM }));
        }
    }
    state::forget_filters(&dead)?;
    let others_alive = state::live_owners()?.iter().any(|id| Some(id) != own.map(|owner| &owner.id));
    if !others_alive {
        swept.filters.extend(remove_filters_by_name().await?);
    }
    swept.qdiscs = remove_unused_clsact().await?;
    Ok(swept)
}

/// Deletes one recorded filter. Returns false when it was already gone (with its interface).
fn remove_filter(record: &FilterRecord) -> Result<bool> {
    if ifindex_of(&record.ifname) != Some(record.ifindex) {
        // The interface is gone, and the filter with it; or the name is another interface's now.
        return Ok(false);
    }
    let attach_type = if record.ingress { TcAttachType::Ingress } else { TcAttachType::Egress };
    let handle = TcHandle::new((record.handle >> 16) as u16, record.handle as u16);
    let link = SchedClassifierLink::attached(&record.ifname, attach_type, record.priority, handle, None)?;
    match link.detach() {
        Ok(()) => Ok(true),
        Err(err) if is_gone(&err) => Ok(false),
        Err(err) => Err(anyhow!(err)),
    }
}

/// A filter or qdisc that is no longer there: another tool or the kernel removed it.
fn is_gone(err: &(dyn std::error::Error + 'static)) -> bool {
    let mut source = Some(err);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && matches!(io.raw_os_error(), Some(libc::ENOENT | libc::ENODEV | libc::EINVAL))
        {
            return true;
        }
        source = err.source();
    }
    false
}

async fn remove_filters_by_name() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    for ifname in interfaces().await?.into_values() {
        for (name, attach_type) in [(INGRESS_PROGRAM, TcAttachType::Ingress), (EGRESS_PROGRAM, TcAttachType::Egress)] {
            match tc::qdisc_detach_program(&ifname, attach_type, name) {
                Ok(()) => removed.push(format!("{ifname} {name}")),
                // No such filter, or no clsact qdisc at all.
                Err(tc::TcError::IoError(err)) if err.kind() == ErrorKind::NotFound => {}
                // The interface went away while we looked.
                Err(tc::TcError::IoError(err)) if err.raw_os_error() == Some(libc::ENODEV) => {}
                Err(tc::TcError::NetlinkError(err)) if matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENOENT)) => {}
                Err(err) => return Err(err).with_context(|| format!("removing {name} from {ifname}")),
            }
        }
    }
    Ok(removed)
}

/// Deletes the recorded clsact qdiscs on which no filter is left (another run's or another
/// tool's filter keeps a qdisc), and forgets those deleted or gone.
pub async fn remove_unused_clsact() -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let mut forgotten = BTreeSet::new();
    for ifname in state::recorded_clsact()? {
        match remove_clsact_if_unused(&ifname).await {
            Ok(Clsact::Removed) => {
                removed.push(ifname.clone());
                forgotten.insert(ifname);
            }
            Ok(Clsact::Gone) => {
                forgotten.insert(ifname);
            }
            Ok(Clsact::InUse) => {}
            Err(err) => log::warn!("leaving the clsact qdisc on {ifname}: {err:#}"),
        }
    }
    state::forget_clsact(&forgotten)?;
    Ok(removed)
}

/// What became of a recorded clsact qdisc.
enum Clsact {
    Removed,
    /// A filter is still on it: another run's or another tool's.
    InUse,
    /// Its interface is gone, and the qdisc with it.
    Gone,
}

/// Deletes the clsact qdisc on `ifname` if no filter is left on it.
async fn remove_clsact_if_unused(ifname: &str) -> Result<Clsact> {
    let Some(index) = ifindex_of(ifname) else { return Ok(Clsact::Gone) };
    let index = index as i32;
    with_rtnetlink(async |handle| {
        async {
            let ingress: Vec<_> = handle.traffic_filter(index).get().ingress().execute().try_collect().await?;
            let egress: Vec<_> = handle.traffic_filter(index).get().egress().execute().try_collect().await?;
            if !ingress.is_empty() || !egress.is_empty() {
                return Ok(Clsact::InUse);
            }
            let mut request = handle.qdisc().del(index);
            request.message_mut().header.parent = NlTcHandle::CLSACT;
            request.message_mut().header.handle = NlTcHandle { major: 0xffff, minor: 0 };
            request.execute().await?;
            Ok(Clsact::Removed)
        }
        .await
        .map_err(|err: rtnetlink::Error| anyhow!(err))
        .with_context(|| format!("removing the clsact qdisc from {ifname}"))
    })
    .await
}
