//! Builds the `KernelLayout` the tracepoint programs read kernel memory with: struct member
//! offsets from BTF, tracepoint record offsets from tracefs.

use std::collections::HashMap;

use anyhow::{Context as _, Result, bail};
use tracer_common::{
    CT_DST_ADDR, CT_DST_PORT, CT_L3NUM, CT_PROTONUM, CT_REPLY_TUPLE, CT_SRC_ADDR, CT_SRC_PORT, CT_STATUS, KernelLayout, NO_SUCH_REASON,
};

use super::{btf::KernelBtf, tracefs::TracepointFormats};

/// Struct offsets from BTF plus, for each tracepoint whose format is available, its record
/// offsets. Missing tracepoints leave their offsets at zero; their programs are not attached.
/// A missing `reason` in `skb:kfree_skb` (kernels before 5.17) leaves that offset zero too.
/// `drop_reasons`: the kernel's `enum skb_drop_reason`, value to name without its prefix.
pub fn build(btf: &KernelBtf, formats: &TracepointFormats, drop_reasons: &HashMap<i64, String>) -> Result<KernelLayout> {
    let mut layout = KernelLayout {
        skb_head: btf.offset_of("sk_buff", "head")?,
        skb_len: btf.offset_of("sk_buff", "len")?,
        skb_network_header: btf.offset_of("sk_buff", "network_header")?,
        skb_dev: btf.offset_of("sk_buff", "dev")?,
        skb_sk: btf.offset_of("sk_buff", "sk")?,
        skb_iif: btf.offset_of("sk_buff", "skb_iif")?,
        skb_cb: btf.offset_of("sk_buff", "cb")?,
        dev_ifindex: btf.offset_of("net_device", "ifindex")?,
        dev_nd_net: btf.offset_of("net_device", "nd_net")?,
        net_ns_inum: btf.offset_of("net", "ns.inum")?,
        sock_net: btf.offset_of("sock", "__sk_common.skc_net")?,
        kfree_not_drops: ["SKB_NOT_DROPPED_YET", "SKB_CONSUMED"].map(|name| reason_value(drop_reasons, name)),
        ..Default::default()
    };
    match conntrack(btf) {
        Ok((skb_nfct, ct_tuples)) => (layout.skb_nfct, layout.ct_tuples) = (skb_nfct, ct_tuples),
        Err(err) => crate::note!("podtrace: warning: flows the node translates (masquerade, NAT) are not followed on its NICs: {err:#}"),
    }
    if let Some(format) = &formats.kfree_skb {
        layout.kfree_skbaddr = format.offset("skbaddr")?;
        layout.kfree_location = format.offset("location")?;
        // No reason field before 5.17: 0 tells the program so (`DROP_REASON_UNKNOWN`).
        layout.kfree_reason = format.offset("reason").unwrap_or(0);
    }
    if let Some(format) = &formats.tcp_retransmit_skb {
        layout.retrans_skbaddr = format.offset("skbaddr")?;
        layout.retrans_skaddr = format.offset("skaddr")?;
        layout.retrans_state = format.offset("state")?;
        // No family field on older kernels (5.10): 0 tells the program to read the IPv6 fields, which
        // hold IPv4 addresses v4-mapped there.
        layout.retrans_family = format.offset("family").unwrap_or(0);
        layout.retrans_sport = format.offset("sport")?;
        layout.retrans_dport = format.offset("dport")?;
        layout.retrans_saddr = format.offset("saddr")?;
        layout.retrans_daddr = format.offset("daddr")?;
        layout.retrans_saddr_v6 = format.offset("saddr_v6")?;
        layout.retrans_daddr_v6 = format.offset("daddr_v6")?;
    }
    if let Some(format) = &formats.icmp_send {
        layout.icmp_skbaddr = format.offset("skbaddr")?;
        layout.icmp_type = format.offset("type")?;
        layout.icmp_code = format.offset("code")?;
    }
    Ok(layout)
}

/// Where the TC programs read an skb's conntrack entry: `sk_buff._nfct`, and the original
/// tuple in `struct nf_conn`, whose neighbours (the reply tuple, `status`) and fields must sit
/// where `tracer_common::CT_*` says, since the programs read them at those offsets.
pub fn conntrack(btf: &KernelBtf) -> Result<(u32, u32)> {
    let nfct = btf.offset_of("sk_buff", "_nfct").context("the kernel has no conntrack")?;
    let tuples = btf.offset_of("nf_conn", "tuplehash")? + btf.offset_of("nf_conntrack_tuple_hash", "tuple")?;
    let status = btf.offset_of("nf_conn", "status")?;
    let expected = [
        ("the tuple hash's size", btf.size_of("nf_conntrack_tuple_hash")?, CT_REPLY_TUPLE),
        ("status", status.checked_sub(tuples).unwrap_or(u32::MAX), CT_STATUS),
        ("src.u3", btf.offset_of("nf_conntrack_tuple", "src.u3")?, CT_SRC_ADDR),
        ("src.u", btf.offset_of("nf_conntrack_tuple", "src.u")?, CT_SRC_PORT),
        ("src.l3num", btf.offset_of("nf_conntrack_tuple", "src.l3num")?, CT_L3NUM),
        ("dst.u3", btf.offset_of("nf_conntrack_tuple", "dst.u3")?, CT_DST_ADDR),
        ("dst.u", btf.offset_of("nf_conntrack_tuple", "dst.u")?, CT_DST_PORT),
        ("dst.protonum", btf.offset_of("nf_conntrack_tuple", "dst.protonum")?, CT_PROTONUM),
    ];
    for (what, found, expected) in expected {
        if found as usize != expected {
            bail!("struct nf_conn's {what} is at {found}, not {expected} as podtrace reads it");
        }
    }
    Ok((nfct, tuples))
}

/// The value of the drop reason `name`, or `NO_SUCH_REASON`.
fn reason_value(drop_reasons: &HashMap<i64, String>, name: &str) -> u32 {
    drop_reasons.iter().find(|(_, reason)| *reason == name).and_then(|(value, _)| u32::try_from(*value).ok()).unwrap_or(NO_SUCH_REASON)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::kernel::tracefs::TracepointFormat;

    #[test]
    fn running_kernel_layout() {
        let btf = KernelBtf::from_file(Path::new("/sys/kernel/btf/vmlinux")).unwrap();
        let formats = TracepointFormats::read().unwrap();
        let Some(kfree) = &formats.kfree_skb else { panic!("every kernel podtrace supports has skb:kfree_skb") };
        let reasons = btf.enum_values("skb_drop_reason", "SKB_DROP_REASON_").unwrap_or_default();
        let layout = build(&btf, &formats, &reasons).unwrap();
        assert!(layout.skb_len > 0 && layout.skb_head > layout.skb_len);
        // Every kernel with drop reasons has SKB_NOT_DROPPED_YET (the enum's first two names
        // keep their `SKB_` prefix); SKB_CONSUMED came later (6.0).
        let named = |value: u32| reasons.get(&i64::from(value)).map(String::as_str);
        if !reasons.is_empty() {
            assert_eq!(named(layout.kfree_not_drops[0]), Some("SKB_NOT_DROPPED_YET"));
        }
        for value in layout.kfree_not_drops {
            assert!(value == NO_SUCH_REASON || matches!(named(value), Some("SKB_NOT_DROPPED_YET" | "SKB_CONSUMED")), "{value}");
        }
        assert_eq!(layout.kfree_skbaddr, 8);
        // The reason field exists from 5.17 on; before, its offset stays 0.
        match kfree.offset("reason") {
            Ok(offset) => assert!(layout.kfree_reason == offset && layout.kfree_reason > layout.kfree_location),
            Err(_) => assert_eq!(layout.kfree_reason, 0),
        }
        // Record fields start after the 8 bytes of common fields. icmp:icmp_send exists from
        // 5.16 on; without it its offsets stay 0.
        match &formats.icmp_send {
            Some(icmp) => {
                assert_eq!(layout.icmp_type, icmp.offset("type").unwrap());
                assert!(layout.icmp_type >= 8 && layout.icmp_code > layout.icmp_type, "{layout:?}");
            }
            None => assert_eq!((layout.icmp_skbaddr, layout.icmp_type), (0, 0)),
        }
    }

    /// The kernel's conntrack as the TC programs read it (from vmlinux' BTF, or the
    /// `nf_conntrack` module's where it is one): every kernel podtrace supports has it so.
    #[test]
    fn conntrack_entries_have_the_layout_the_programs_read() {
        let mut btf = KernelBtf::from_file(Path::new("/sys/kernel/btf/vmlinux")).unwrap();
        let module = Path::new("/sys/kernel/btf/nf_conntrack");
        if module.exists() {
            btf.add_module(module).unwrap();
        }
        let (nfct, tuples) = conntrack(&btf).unwrap();
        assert!(nfct > 0 && tuples > 0 && tuples < 128, "{nfct} {tuples}");
        assert_eq!(btf.size_of("nf_conntrack_tuple").unwrap(), 40);
    }

    #[test]
    fn kfree_skb_without_a_reason_field_leaves_its_offset_zero() {
        // skb:kfree_skb on 5.10.
        let format = "name: kfree_skb\nID: 1420\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
                      \tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;\n\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;\n\
                      \tfield:unsigned short protocol;\toffset:24;\tsize:2;\tsigned:0;\n";
        let btf = KernelBtf::from_file(Path::new("/sys/kernel/btf/vmlinux")).unwrap();
        let mut formats = TracepointFormats::read().unwrap();
        formats.kfree_skb = Some(TracepointFormat::parse("skb:kfree_skb", format).unwrap());
        let layout = build(&btf, &formats, &HashMap::new()).unwrap();
        assert_eq!((layout.kfree_skbaddr, layout.kfree_location, layout.kfree_reason), (8, 16, 0));
        // No drop reasons at all: nothing to turn away, not even a drop of unknown reason.
        assert_eq!(layout.kfree_not_drops, [NO_SUCH_REASON; 2]);
    }

    #[test]
    fn a_missing_tracepoint_leaves_its_offsets_zero() {
        let btf = KernelBtf::from_file(Path::new("/sys/kernel/btf/vmlinux")).unwrap();
        let mut formats = TracepointFormats::read().unwrap();
        formats.icmp_send = None;
        let layout = build(&btf, &formats, &HashMap::new()).unwrap();
        assert_eq!((layout.icmp_skbaddr, layout.icmp_type, layout.icmp_code), (0, 0, 0));
        assert!(layout.kfree_skbaddr > 0 && layout.retrans_skaddr > 0, "{layout:?}");
    }
}
