//! Builds the `KernelLayout` the tracepoint programs read kernel memory with: struct member
//! offsets from BTF, tracepoint record offsets from tracefs.

use std::{collections::HashMap, path::Path};

use anyhow::{Context as _, Result, bail};
use tracer_common::KernelLayout;

use crate::kernel_btf::KernelBtf;

pub const TRACEFS: &str = "/sys/kernel/tracing";

/// Field offsets of one tracepoint's record, from its tracefs `format` file.
#[derive(Debug)]
pub struct TracepointFormat {
    pub name: String,
    fields: HashMap<String, u32>,
}

impl TracepointFormat {
    pub fn read(tracefs: &Path, category: &str, name: &str) -> Result<Self> {
        let path = tracefs.join("events").join(category).join(name).join("format");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&format!("{category}:{name}"), &text)
    }

    /// Parses lines like `field:void * skbaddr; offset:8; size:8; signed:0;` (tab-separated).
    pub fn parse(name: &str, text: &str) -> Result<Self> {
        let mut fields = HashMap::new();
        for line in text.lines() {
            let mut parts = line.trim().split(';').map(str::trim);
            let (Some(decl), Some(offset)) = (parts.next(), parts.next()) else { continue };
            let (Some(decl), Some(offset)) = (decl.strip_prefix("field:"), offset.strip_prefix("offset:")) else {
                continue;
            };
            // The field name is the last word, without an array suffix.
            let field = decl.rsplit([' ', '*']).next().unwrap_or(decl);
            let field = field.split('[').next().unwrap_or(field);
            fields.insert(field.to_string(), offset.parse().with_context(|| format!("{name}: bad offset in {line:?}"))?);
        }
        if fields.is_empty() {
            bail!("{name}: no fields in the tracepoint format");
        }
        Ok(Self { name: name.to_string(), fields })
    }

    pub fn offset(&self, field: &str) -> Result<u32> {
        self.fields.get(field).copied().with_context(|| format!("tracepoint {} has no field {field} on this kernel", self.name))
    }
}

/// Struct offsets from BTF plus, for each tracepoint whose format is available, its record
/// offsets. Missing tracepoints leave their offsets at zero; their programs are not attached.
pub fn build(
    btf: &KernelBtf,
    kfree_skb: Option<&TracepointFormat>,
    retransmit: Option<&TracepointFormat>,
    icmp_send: Option<&TracepointFormat>,
) -> Result<KernelLayout> {
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
        ..Default::default()
    };
    if let Some(format) = kfree_skb {
        layout.kfree_skbaddr = format.offset("skbaddr")?;
        layout.kfree_location = format.offset("location")?;
        layout.kfree_reason = format.offset("reason")?;
    }
    if let Some(format) = retransmit {
        layout.retrans_skbaddr = format.offset("skbaddr")?;
        layout.retrans_skaddr = format.offset("skaddr")?;
        layout.retrans_state = format.offset("state")?;
        layout.retrans_family = format.offset("family")?;
        layout.retrans_sport = format.offset("sport")?;
        layout.retrans_dport = format.offset("dport")?;
        layout.retrans_saddr = format.offset("saddr")?;
        layout.retrans_daddr = format.offset("daddr")?;
        layout.retrans_saddr_v6 = format.offset("saddr_v6")?;
        layout.retrans_daddr_v6 = format.offset("daddr_v6")?;
    }
    if let Some(format) = icmp_send {
        layout.icmp_skbaddr = format.offset("skbaddr")?;
        layout.icmp_type = format.offset("type")?;
        layout.icmp_code = format.offset("code")?;
    }
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KFREE_6_1: &str = "name: kfree_skb
ID: 1414
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:void * location;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned short protocol;\toffset:24;\tsize:2;\tsigned:0;
\tfield:enum skb_drop_reason reason;\toffset:28;\tsize:4;\tsigned:0;

print fmt: \"skbaddr=%p\"";

    #[test]
    fn parses_tracefs_formats_of_different_kernels() {
        // 6.1 has no rx_sk, so `reason` sits 8 bytes earlier than on 6.11+.
        let format = TracepointFormat::parse("skb:kfree_skb", KFREE_6_1).unwrap();
        assert_eq!(format.offset("skbaddr").unwrap(), 8);
        assert_eq!(format.offset("reason").unwrap(), 28);
        assert!(format.offset("rx_sk").unwrap_err().to_string().contains("no field rx_sk"));

        let arrays = "format:\n\tfield:__u8 saddr_v6[16];\toffset:42;\tsize:16;\tsigned:0;\n";
        assert_eq!(TracepointFormat::parse("t", arrays).unwrap().offset("saddr_v6").unwrap(), 42);
        assert!(TracepointFormat::parse("t", "nothing here").is_err());
    }

    #[test]
    fn running_kernel_layout() {
        let btf = KernelBtf::from_file(Path::new("/sys/kernel/btf/vmlinux")).unwrap();
        crate::preflight::ensure_tracefs().unwrap();
        let tracefs = Path::new(TRACEFS);
        let kfree = TracepointFormat::read(tracefs, "skb", "kfree_skb").unwrap();
        let retransmit = TracepointFormat::read(tracefs, "tcp", "tcp_retransmit_skb").unwrap();
        let layout = build(&btf, Some(&kfree), Some(&retransmit), None).unwrap();
        assert!(layout.skb_len > 0 && layout.skb_head > layout.skb_len);
        assert_eq!(layout.kfree_skbaddr, 8);
        assert!(layout.kfree_reason > layout.kfree_location);
        assert_eq!(layout.icmp_type, 0);
    }
}
