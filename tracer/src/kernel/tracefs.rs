//! Tracepoint record layouts from tracefs: the `format` file of each tracepoint podtrace
//! attaches to.

use std::{collections::HashMap, path::Path};

use anyhow::{Context as _, Result, bail};

use crate::preflight;

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

/// The formats of the tracepoints podtrace uses; `None` where this kernel has none readable,
/// which disables that source instead of failing the trace.
#[derive(Debug, Default)]
pub struct TracepointFormats {
    pub kfree_skb: Option<TracepointFormat>,
    pub tcp_retransmit_skb: Option<TracepointFormat>,
    pub icmp_send: Option<TracepointFormat>,
}

impl TracepointFormats {
    pub fn read() -> Result<Self> {
        preflight::ensure_tracefs()?;
        let tracefs = Path::new(TRACEFS);
        let read = |category: &str, name: &str| match TracepointFormat::read(tracefs, category, name) {
            Ok(format) => Some(format),
            Err(err) => {
                log::info!("{category}:{name} unavailable: {err:#}");
                None
            }
        };
        Ok(Self {
            kfree_skb: read("skb", "kfree_skb"),
            tcp_retransmit_skb: read("tcp", "tcp_retransmit_skb"),
            icmp_send: read("icmp", "icmp_send"),
        })
    }
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
}
