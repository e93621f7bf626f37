//! Kernel addresses to function names, through /proc/kallsyms.

use std::fs;

use anyhow::{Context as _, Result};

pub struct KernelSymbols {
    /// Text symbols sorted by address.
    symbols: Vec<(u64, String)>,
}

impl KernelSymbols {
    pub fn load() -> Result<Self> {
        let text = fs::read_to_string("/proc/kallsyms").context("reading /proc/kallsyms")?;
        Ok(Self::parse(&text))
    }

    pub fn parse(text: &str) -> Self {
        let mut symbols: Vec<(u64, String)> = text
            .lines()
            .filter_map(|line| {
                let mut parts = line.split_whitespace();
                let address = u64::from_str_radix(parts.next()?, 16).ok()?;
                let kind = parts.next()?;
                let name = parts.next()?;
                (address != 0 && matches!(kind, "t" | "T")).then(|| (address, name.to_string()))
            })
            .collect();
        symbols.sort_unstable();
        Self { symbols }
    }

    /// `function+0xoffset`, or the bare address when no symbol covers it (or kallsyms hides
    /// addresses from this process).
    pub fn resolve(&self, address: u64) -> String {
        let index = self.symbols.partition_point(|(start, _)| *start <= address);
        match index.checked_sub(1).map(|i| &self.symbols[i]) {
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
        let symbols = KernelSymbols::parse(
            "ffffffff81000000 T _stext\nffffffff81200000 t nf_hook_slow\nffffffff81200400 T ip_forward\n0000000000000000 T hidden\nffffffff81300000 D some_data\n",
        );
        assert_eq!(symbols.resolve(0xffffffff81200010), "nf_hook_slow+0x10");
        assert_eq!(symbols.function(0xffffffff81200400), "ip_forward");
        assert_eq!(symbols.resolve(0x10), "0x10");
    }
}
