use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    // Locate the kernel crate through cargo metadata so the path is not hard-coded twice.
    let metadata = cargo_metadata::MetadataCommand::new().no_deps().exec().context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|package| package.name.as_str() == "tracer-ebpf")
        .ok_or_else(|| anyhow!("tracer-ebpf package not found in the workspace"))?;
    let root_dir = ebpf.manifest_path.parent().ok_or_else(|| anyhow!("tracer-ebpf manifest has no parent directory"))?;
    aya_build::build_ebpf([Package { name: ebpf.name.as_str(), root_dir: root_dir.as_str(), ..Default::default() }], Toolchain::default())
}
