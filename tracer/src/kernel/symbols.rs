//! Kernel addresses to function names, through aya's reading of /proc/kallsyms.

use std::collections::BTreeMap;

use anyhow::{Context as _, Result};

pub struct KernelSymbols {
    /// Symbols by start address.
    symbols: BTreeMap<u64, String>,
}

impl KernelSymbols {
    pub fn load() -> Result<Self> {
        Ok(Self::new(aya::util::kernel_symbols().context("reading /proc/kallsyms")?))
    }

    /// kallsyms shows every address as 0 to a process that may not see them; those, and the
    /// `[module]` suffix of module symbols, are dropped here.
    pub fn new(mut symbols: BTreeMap<u64, String>) -> Self {
        symbols.remove(&0);
        for name in symbols.values_mut() {
            if let Some(bare) = name.split_whitespace().next()
                && bare.len() < name.len()
            {
                *name = bare.to_string();
            }
        }
        Self { symbols }
    }

    /// `function+0xoffset`, or the bare address when no symbol covers it (or kallsyms hides
    /// addresses from this process).
    pub fn resolve(&self, address: u64) -> String {
        match self.symbols.range(..=address).next_back() {
            Some((start, name)) => format!("{name}+{:#x}", address - start),
            None => format!("{address:#x}"),
        }
    }

    /// Just the function name, for grouping.
    pub fn function(&self, address: u64) -> String {
        let resolved = self.resolve(address);
        resolved.split('+').next().unwrap_or(&resolved).to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_to_the_enclosing_function() {
        let symbols = KernelSymbols::new(BTreeMap::from([
            (0xffffffff81000000, "_stext".to_string()),
            (0xffffffff81200000, "nf_hook_slow".to_string()),
            (0xffffffff81200400, "ip_forward".to_string()),
            (0xffffffffc0000000, "br_forward\t[bridge]".to_string()),
            (0, "hidden".to_string()),
        ]));
        assert_eq!(symbols.resolve(0xffffffff81200010), "nf_hook_slow+0x10");
        assert_eq!(symbols.function(0xffffffff81200400), "ip_forward");
        assert_eq!(symbols.function(0xffffffffc0000010), "br_forward");
        assert_eq!(symbols.resolve(0x10), "0x10");
    }
}
