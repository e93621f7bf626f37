//! `cargo xtask image`: an OCI image of podtrace for a privileged debug pod. The static (musl)
//! binary alone, `FROM scratch`: no shell, no libc, no registry needed to build it.

use std::{fs, process::Command};

use anyhow::{Context as _, Result, bail};
use serde_json::Value;

use crate::{setup::step, workspace};

const MUSL_TARGET: &str = "x86_64-unknown-linux-musl";

/// Builds the image and its archive; returns the tag.
pub fn build() -> Result<String> {
    step("cargo", &["build", "--release", "--package", "tracer", "--bin", "podtrace", "--target", MUSL_TARGET])?;
    let binary = workspace().join("target").join(MUSL_TARGET).join("release/podtrace");
    let context = workspace().join("target/image");
    fs::create_dir_all(&context).with_context(|| format!("creating {}", context.display()))?;
    let image_binary = context.join("podtrace");
    fs::copy(&binary, &image_binary).with_context(|| format!("copying {}", binary.display()))?;
    // Symbols are of no use in the image; they are half the binary.
    step("strip", &["--strip-all", &image_binary.to_string_lossy()])?;
    let version = tracer_version()?;
    fs::write(context.join("Containerfile"), containerfile(&version)).context("writing the Containerfile")?;
    // The tag the debug-pod manifest and the kubectl plugin use.
    let tag = format!("podtrace:{version}");
    let context_arg = context.to_string_lossy().into_owned();
    step("podman", &["build", "--quiet", "--tag", &tag, &context_arg])?;
    let archive = workspace().join("target").join(format!("podtrace-{version}.oci.tar"));
    // podman refuses to overwrite an archive.
    let _ = fs::remove_file(&archive);
    step("podman", &["save", "--quiet", "--format", "oci-archive", "--output", &archive.to_string_lossy(), &tag])?;
    let image_bytes = podman_image_size(&tag)?;
    println!(
        "xtask: image {tag}: {:.1} MB; OCI archive {} ({:.1} MB)",
        image_bytes as f64 / 1e6,
        archive.display(),
        fs::metadata(&archive).map(|m| m.len()).unwrap_or(0) as f64 / 1e6
    );
    Ok(tag)
}

fn containerfile(version: &str) -> String {
    format!(
        "# Written by `cargo xtask image`.\n\
         FROM scratch\n\
         LABEL org.opencontainers.image.title=\"podtrace\" org.opencontainers.image.version=\"{version}\" \\\n      \
         org.opencontainers.image.description=\"eBPF packet path tracer for Kubernetes nodes\"\n\
         COPY podtrace /podtrace\n\
         ENTRYPOINT [\"/podtrace\"]\n\
         CMD [\"--help\"]\n"
    )
}

fn podman_image_size(tag: &str) -> Result<u64> {
    let output =
        Command::new("podman").args(["image", "inspect", "--format", "{{.Size}}", tag]).output().context("running podman image inspect")?;
    if !output.status.success() {
        bail!("podman image inspect {tag}: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    String::from_utf8_lossy(&output.stdout).trim().parse().context("parsing the image size")
}

/// The version in tracer's Cargo.toml, from cargo metadata.
fn tracer_version() -> Result<String> {
    let output = Command::new("cargo")
        .args(["metadata", "--format-version", "1", "--no-deps", "--manifest-path"])
        .arg(workspace().join("Cargo.toml"))
        .output()
        .context("running cargo metadata")?;
    let metadata: Value = serde_json::from_slice(&output.stdout).context("parsing cargo metadata")?;
    metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|package| package["name"] == "tracer")
        .and_then(|package| package["version"].as_str())
        .map(str::to_string)
        .context("tracer's version is not in cargo metadata")
}
