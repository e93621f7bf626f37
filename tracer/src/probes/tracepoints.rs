//! The tracepoint programs: kernel drops (`skb:kfree_skb`, tp_btf where the kernel allows it),
//! TCP retransmits and ICMP errors, each attached only where this kernel has its tracepoint.

use std::collections::BTreeSet;

use anyhow::{Context as _, Result};
use aya::{
    maps::HashMap,
    programs::{BtfTracePoint, TracePoint},
};

use super::Probes;
use crate::kernel::tracefs::TracepointFormats;

/// How each kernel event source was attached, or why not.
#[derive(Clone, Debug, Default, serde::Serialize, PartialEq)]
pub struct KernelSources {
    pub drops: String,
    pub retransmits: String,
    pub icmp_errors: String,
}

impl Probes {
    /// Attaches the tracepoint programs. Kernel events count only from `namespaces`. A source
    /// is attached only if its tracefs format was readable (and so its offsets are in the
    /// layout).
    pub fn attach_kernel_events(
        &mut self,
        btf: &aya::Btf,
        namespaces: &BTreeSet<u32>,
        formats: &TracepointFormats,
    ) -> Result<KernelSources> {
        let mut netns: HashMap<_, u32, u8> = HashMap::try_from(self.ebpf.map_mut("NETNS").context("NETNS map missing")?)?;
        for inode in namespaces {
            netns.insert(*inode, 1, 0).context("registering a network namespace")?;
        }
        // The tp_btf program reads the reason argument, which the verifier refuses where
        // kfree_skb has none (before 5.17): the classic tracepoint serves there.
        let drops = match self.attach_btf_tracepoint("podtrace_kfree_skb_btf", "kfree_skb", btf) {
            Ok(()) => "tp_btf skb:kfree_skb".into(),
            Err(btf_err) if formats.kfree_skb.is_some() => {
                log::info!("tp_btf kfree_skb unavailable ({btf_err:#}); using the classic tracepoint");
                self.attach_tracepoint("podtrace_kfree_skb", "skb", "kfree_skb")?;
                match formats.kfree_skb.as_ref().is_some_and(|format| format.offset("reason").is_ok()) {
                    true => "tracepoint skb:kfree_skb".into(),
                    false => {
                        "tracepoint skb:kfree_skb, without drop reasons on this kernel (before 5.17): each drop's reason is unknown".into()
                    }
                }
            }
            Err(err) => return Err(err.context("attaching to skb:kfree_skb")),
        };
        let retransmits = if formats.tcp_retransmit_skb.is_some() {
            self.attach_tracepoint("podtrace_tcp_retransmit", "tcp", "tcp_retransmit_skb")?;
            "tracepoint tcp:tcp_retransmit_skb".into()
        } else {
            "unavailable: no tcp:tcp_retransmit_skb tracepoint".into()
        };
        let icmp_errors = if formats.icmp_send.is_some() {
            self.attach_tracepoint("podtrace_icmp_send", "icmp", "icmp_send")?;
            "tracepoint icmp:icmp_send".into()
        } else {
            "unavailable: no icmp:icmp_send tracepoint on this kernel".into()
        };
        Ok(KernelSources { drops, retransmits, icmp_errors })
    }

    fn attach_btf_tracepoint(&mut self, program: &str, tracepoint: &str, btf: &aya::Btf) -> Result<()> {
        let program: &mut BtfTracePoint = self.ebpf.program_mut(program).context("program missing")?.try_into()?;
        program.load(tracepoint, btf).with_context(|| format!("loading tp_btf {tracepoint}"))?;
        program.attach().with_context(|| format!("attaching tp_btf {tracepoint}"))?;
        Ok(())
    }

    fn attach_tracepoint(&mut self, program: &str, category: &str, name: &str) -> Result<()> {
        let program: &mut TracePoint = self.ebpf.program_mut(program).context("program missing")?.try_into()?;
        program.load().with_context(|| format!("loading the {category}:{name} program"))?;
        program.attach(category, name).with_context(|| format!("attaching to {category}:{name}"))?;
        Ok(())
    }
}
