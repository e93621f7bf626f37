//! The tracepoint programs: kernel drops (`skb:kfree_skb`, tp_btf where the kernel allows it),
//! TCP retransmits and ICMP errors, each attached only where this kernel has its tracepoint.

use std::{
    collections::BTreeSet,
    os::fd::{AsFd as _, AsRawFd as _, BorrowedFd},
};

use anyhow::{Context as _, Result};
use aya::{
    maps::HashMap,
    programs::{BtfTracePoint, TracePoint},
};
use aya_obj::generated::{bpf_attr, bpf_cmd, bpf_prog_info};

use super::Probes;
use crate::kernel::tracefs::TracepointFormats;

/// How each kernel event source was attached, or why not.
#[derive(Clone, Debug, Default, serde::Serialize, PartialEq)]
pub struct KernelSources {
    pub drops: String,
    pub retransmits: String,
    pub icmp_errors: String,
    /// `icmp:icmp_send` is attached: the ICMP errors the kernel sends are seen.
    #[serde(skip)]
    pub icmp_send_attached: bool,
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
        let icmp_send_attached = formats.icmp_send.is_some();
        let icmp_errors = if icmp_send_attached {
            self.attach_tracepoint("podtrace_icmp_send", "icmp", "icmp_send")?;
            "tracepoint icmp:icmp_send".into()
        } else {
            "unavailable: no icmp:icmp_send tracepoint on this kernel, so whether ICMP errors were sent is unknown".into()
        };
        Ok(KernelSources { drops, retransmits, icmp_errors, icmp_send_attached })
    }

    /// How often the kernel skipped a tracepoint program because it was already running on
    /// that CPU (`recursion_misses` of bpf_prog_info): events never seen. None where the kernel
    /// does not report it (before 5.12).
    pub fn recursion_misses(&self) -> Result<Option<u64>> {
        let mut total = Some(0);
        for name in &self.tracing_programs {
            let program = self.ebpf.program(name).with_context(|| format!("program {name} missing"))?;
            let fd = program.fd().with_context(|| format!("program {name} is not loaded"))?;
            let misses = recursion_misses_of(fd.as_fd()).with_context(|| format!("reading the statistics of {name}"))?;
            total = total.zip(misses).map(|(sum, misses)| sum + misses);
        }
        Ok(total)
    }

    fn attach_btf_tracepoint(&mut self, name: &str, tracepoint: &str, btf: &aya::Btf) -> Result<()> {
        let program: &mut BtfTracePoint = self.ebpf.program_mut(name).context("program missing")?.try_into()?;
        program.load(tracepoint, btf).with_context(|| format!("loading tp_btf {tracepoint}"))?;
        program.attach().with_context(|| format!("attaching tp_btf {tracepoint}"))?;
        self.tracing_programs.push(name.to_string());
        Ok(())
    }

    fn attach_tracepoint(&mut self, program_name: &str, category: &str, name: &str) -> Result<()> {
        let program: &mut TracePoint = self.ebpf.program_mut(program_name).context("program missing")?.try_into()?;
        program.load().with_context(|| format!("loading the {category}:{name} program"))?;
        program.attach(category, name).with_context(|| format!("attaching to {category}:{name}"))?;
        self.tracing_programs.push(program_name.to_string());
        Ok(())
    }
}

/// `recursion_misses` from the kernel's bpf_prog_info for one program, None where the
/// kernel's bpf_prog_info ends before that field.
fn recursion_misses_of(fd: BorrowedFd<'_>) -> Result<Option<u64>> {
    // SAFETY: both are plain C structs of integers, for which all zeroes is valid (and what
    // the kernel expects in the fields not set).
    let (mut info, mut attr): (bpf_prog_info, bpf_attr) = unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    // The `info` member of bpf_attr is BPF_OBJ_GET_INFO_BY_FD's argument; the kernel writes at
    // most `info_len` bytes into `info`, which outlives the call.
    attr.info.bpf_fd = fd.as_raw_fd() as u32;
    attr.info.info_len = size_of::<bpf_prog_info>() as u32;
    attr.info.info = (&raw mut info) as u64;
    // SAFETY: the bpf syscall with a valid command and a pointer to a bpf_attr of the size given.
    let ret =
        unsafe { libc::syscall(libc::SYS_bpf, bpf_cmd::BPF_OBJ_GET_INFO_BY_FD as libc::c_long, &raw mut attr, size_of::<bpf_attr>()) };
    if ret != 0 {
        return Err(std::io::Error::last_os_error()).context("BPF_OBJ_GET_INFO_BY_FD");
    }
    // SAFETY: the kernel wrote back how much of `info` it filled.
    let filled = unsafe { attr.info.info_len } as usize;
    let needed = std::mem::offset_of!(bpf_prog_info, recursion_misses) + size_of::<u64>();
    Ok((filled >= needed).then_some(info.recursion_misses))
}
