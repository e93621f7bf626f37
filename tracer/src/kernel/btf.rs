//! Reads struct member offsets and enum names from the running kernel's BTF.
//!
//! `struct sk_buff` and `enum skb_drop_reason` change between kernel versions, so the kernel
//! programs get their offsets from here at load time instead of compiling one kernel's
//! numbers in. The format is the kernel's (Documentation/bpf/btf.rst): a header, a type
//! section and a string section.

use std::{collections::HashMap, path::Path};

use anyhow::{Context as _, Result, bail};

const BTF_MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_ENUM64: u32 = 19;

#[derive(Clone, Debug)]
struct Member {
    name: u32,
    type_id: u32,
    bit_offset: u32,
}

#[derive(Clone, Debug)]
enum Type {
    Composite { name: u32, size: u32, members: Vec<Member> },
    Enum { name: u32, values: Vec<(u32, i64)> },
    Other,
}

pub struct KernelBtf {
    types: Vec<Type>,
    strings: Vec<u8>,
    by_name: HashMap<String, Vec<u32>>,
}

impl KernelBtf {
    pub fn from_file(path: &Path) -> Result<Self> {
        let data = std::fs::read(path).with_context(|| format!("reading BTF from {}", path.display()))?;
        Self::parse(&data).with_context(|| format!("parsing BTF from {}", path.display()))
    }

    pub fn parse(data: &[u8]) -> Result<Self> {
        let mut btf = Self { types: vec![Type::Other], strings: Vec::new(), by_name: HashMap::new() };
        btf.append(data)?;
        Ok(btf)
    }

    /// Adds a kernel module's BTF (`/sys/kernel/btf/<module>`), which is split BTF on top of
    /// vmlinux': its type ids continue vmlinux' and its string offsets continue vmlinux' string
    /// section, so both sections are appended to ours. A struct a module defines (conntrack's,
    /// where `nf_conntrack` is a module) is then found like vmlinux' own.
    pub fn add_module(&mut self, path: &Path) -> Result<()> {
        let data = std::fs::read(path).with_context(|| format!("reading BTF from {}", path.display()))?;
        self.append(&data).with_context(|| format!("parsing BTF from {}", path.display()))
    }

    fn append(&mut self, data: &[u8]) -> Result<()> {
        let bytes = Bytes(data);
        if bytes.u16_at(0)? != BTF_MAGIC {
            bail!("not little-endian BTF (bad magic)");
        }
        let header_len = bytes.u32_at(4)? as usize;
        let type_off = header_len + bytes.u32_at(8)? as usize;
        let type_len = bytes.u32_at(12)? as usize;
        let str_off = header_len + bytes.u32_at(16)? as usize;
        let str_len = bytes.u32_at(20)? as usize;
        let strings = data.get(str_off..str_off + str_len).context("BTF string section out of bounds")?;
        // Type ids start at 1 (id 0 is void), a split BTF's after its base's; its string
        // offsets past the base's strings index its own section, so the sections concatenate.
        let mut pos = type_off;
        while pos < type_off + type_len {
            let (ty, next) = bytes.type_at(pos)?;
            self.types.push(ty);
            pos = next;
        }
        self.strings.extend_from_slice(strings);
        self.by_name = self.names();
        Ok(())
    }

    /// Type ids of the named structs, unions and enums, by name.
    fn names(&self) -> HashMap<String, Vec<u32>> {
        let mut by_name: HashMap<String, Vec<u32>> = HashMap::new();
        for (id, ty) in self.types.iter().enumerate() {
            let name = match ty {
                Type::Composite { name, .. } | Type::Enum { name, .. } => *name,
                Type::Other => continue,
            };
            if name != 0 {
                by_name.entry(self.string(name).to_string()).or_default().push(id as u32);
            }
        }
        by_name
    }

    fn string(&self, offset: u32) -> &str {
        let start = offset as usize;
        let Some(rest) = self.strings.get(start..) else { return "" };
        let end = rest.iter().position(|b| *b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or("")
    }

    fn composite(&self, name: &str) -> Result<(u32, &[Member])> {
        self.by_name
            .get(name)
            .into_iter()
            .flatten()
            .find_map(|id| match &self.types[*id as usize] {
                // Forward declarations have no members; skip to the definition.
                Type::Composite { size, members, .. } if !members.is_empty() => Some((*size, members.as_slice())),
                _ => None,
            })
            .with_context(|| format!("struct {name} not found in the kernel BTF"))
    }

    /// Byte size of `struct name`.
    pub fn size_of(&self, name: &str) -> Result<u32> {
        Ok(self.composite(name)?.0)
    }

    /// Byte offset of `field` in `struct name`, looking through anonymous unions and structs.
    /// A dotted path (`__sk_common.skc_net`) descends into named members.
    pub fn offset_of(&self, name: &str, field: &str) -> Result<u32> {
        let mut members = self.composite(name)?.1;
        let mut offset = 0;
        let mut parts = field.split('.').peekable();
        while let Some(part) = parts.next() {
            let (bits, type_id) =
                self.find_member(members, part).with_context(|| format!("{name} has no member {field} in the kernel BTF"))?;
            offset += bits;
            if parts.peek().is_some() {
                members = self.members_of(type_id).with_context(|| format!("{name}.{part} is not a struct"))?;
            }
        }
        if offset % 8 != 0 {
            bail!("{name}.{field} is a bitfield");
        }
        Ok(offset / 8)
    }

    fn find_member(&self, members: &[Member], name: &str) -> Option<(u32, u32)> {
        for member in members {
            if member.name != 0 && self.string(member.name) == name {
                return Some((member.bit_offset, member.type_id));
            }
            if member.name == 0
                && let Some(inner) = self.members_of(member.type_id)
                && let Some((bits, type_id)) = self.find_member(inner, name)
            {
                return Some((member.bit_offset + bits, type_id));
            }
        }
        None
    }

    /// Members of a struct or union, following typedefs and qualifiers is not needed for the
    /// anonymous members the kernel uses, which refer to the composite directly.
    fn members_of(&self, type_id: u32) -> Option<&[Member]> {
        match self.types.get(type_id as usize)? {
            Type::Composite { members, .. } => Some(members),
            _ => None,
        }
    }

    /// Enumerator names by value, e.g. `enum skb_drop_reason` with its `SKB_DROP_REASON_`
    /// prefix removed.
    pub fn enum_values(&self, name: &str, strip_prefix: &str) -> Result<HashMap<i64, String>> {
        let values = self
            .by_name
            .get(name)
            .into_iter()
            .flatten()
            .find_map(|id| match &self.types[*id as usize] {
                Type::Enum { values, .. } => Some(values),
                _ => None,
            })
            .with_context(|| format!("enum {name} not found in the kernel BTF"))?;
        Ok(values
            .iter()
            .map(|(name, value)| {
                let name = self.string(*name);
                (*value, name.strip_prefix(strip_prefix).unwrap_or(name).to_string())
            })
            .collect())
    }
}

/// The raw BTF data, read little-endian with bounds checks.
struct Bytes<'d>(&'d [u8]);

impl Bytes<'_> {
    fn u16_at(&self, off: usize) -> Result<u16> {
        Ok(u16::from_le_bytes(self.0.get(off..off + 2).context("BTF truncated")?.try_into()?))
    }

    fn u32_at(&self, off: usize) -> Result<u32> {
        Ok(u32::from_le_bytes(self.0.get(off..off + 4).context("BTF truncated")?.try_into()?))
    }

    /// The type whose 12-byte common header is at `pos`, and where the next type starts.
    fn type_at(&self, pos: usize) -> Result<(Type, usize)> {
        let name = self.u32_at(pos)?;
        let info = self.u32_at(pos + 4)?;
        let vlen = (info & 0xffff) as usize;
        let kind = (info >> 24) & 0x1f;
        let kind_flag = info >> 31 == 1;
        let pos = pos + 12;
        Ok(match kind {
            KIND_STRUCT | KIND_UNION => {
                let mut members = Vec::with_capacity(vlen);
                for base in (0..vlen).map(|i| pos + i * 12) {
                    let offset = self.u32_at(base + 8)?;
                    members.push(Member {
                        name: self.u32_at(base)?,
                        type_id: self.u32_at(base + 4)?,
                        // With kind_flag, the top byte is the bitfield size.
                        bit_offset: if kind_flag { offset & 0x00ff_ffff } else { offset },
                    });
                }
                (Type::Composite { name, size: self.u32_at(pos - 4)?, members }, pos + vlen * 12)
            }
            KIND_ENUM => {
                let mut values = Vec::with_capacity(vlen);
                for base in (0..vlen).map(|i| pos + i * 8) {
                    values.push((self.u32_at(base)?, i64::from(self.u32_at(base + 4)? as i32)));
                }
                (Type::Enum { name, values }, pos + vlen * 8)
            }
            KIND_ENUM64 => {
                let mut values = Vec::with_capacity(vlen);
                for base in (0..vlen).map(|i| pos + i * 12) {
                    let value = u64::from(self.u32_at(base + 4)?) | (u64::from(self.u32_at(base + 8)?) << 32);
                    values.push((self.u32_at(base)?, value as i64));
                }
                (Type::Enum { name, values }, pos + vlen * 12)
            }
            KIND_INT | KIND_VAR | KIND_DECL_TAG => (Type::Other, pos + 4),
            KIND_ARRAY => (Type::Other, pos + 12),
            KIND_FUNC_PROTO => (Type::Other, pos + vlen * 8),
            KIND_DATASEC => (Type::Other, pos + vlen * 12),
            _ => (Type::Other, pos),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_members_and_drop_reasons() {
        // podtrace requires kernel BTF, and so do its tests.
        let btf = KernelBtf::from_file(Path::new("/sys/kernel/btf/vmlinux")).unwrap();
        // `dev` and `sk` sit inside anonymous unions in struct sk_buff.
        let dev = btf.offset_of("sk_buff", "dev").unwrap();
        let len = btf.offset_of("sk_buff", "len").unwrap();
        assert!(dev < len && dev.is_multiple_of(8));
        btf.offset_of("sk_buff", "network_header").unwrap();
        btf.offset_of("sock", "__sk_common.skc_net").unwrap();
        btf.offset_of("net_device", "ifindex").unwrap();
        // The numbers differ between kernels (NOT_SPECIFIED is 2 on 6.18, 1 on 6.1): BTF must
        // agree with the names this kernel's own tracepoint prints. Before 5.17 there are
        // neither: no enum, and no reason in the tracepoint.
        crate::preflight::ensure_tracefs().unwrap();
        let format = std::fs::read_to_string("/sys/kernel/tracing/events/skb/kfree_skb/format").unwrap();
        let printed = printed_drop_reasons(&format);
        match btf.enum_values("skb_drop_reason", "SKB_DROP_REASON_") {
            Ok(reasons) => {
                assert!(printed.len() > 10, "{format}");
                for (value, name) in &printed {
                    assert_eq!(reasons.get(value), Some(name), "drop reason {value}");
                }
                assert!(reasons.values().any(|name| name == "NETFILTER_DROP"));
            }
            Err(_) => assert!(printed.is_empty() && !format.contains("reason"), "a reason field without the enum: {format}"),
        }
        assert!(btf.offset_of("sk_buff", "no_such_field").is_err());
        // A conntrack tuple: two 16-byte addresses, each with its 2-byte port and 2 more bytes.
        assert_eq!(btf.size_of("nf_conntrack_tuple").unwrap(), 40);
        assert!(btf.offset_of("no_such_struct", "x").is_err());
    }

    /// `{ 2, "NOT_SPECIFIED" }` pairs from the tracepoint's print format.
    fn printed_drop_reasons(format: &str) -> Vec<(i64, String)> {
        format
            .split('{')
            .skip(1)
            .filter_map(|part| {
                let (value, rest) = part.split_once(',')?;
                let name = rest.split('"').nth(1)?;
                Some((value.trim().parse().ok()?, name.to_string()))
            })
            .collect()
    }

    #[test]
    fn rejects_garbage() {
        assert!(KernelBtf::parse(&[0u8; 32]).is_err());
        assert!(KernelBtf::parse(&[]).is_err());
    }
}
