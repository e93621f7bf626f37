//! Debian's cloud kernels, newest of each line, fetched through a private apt configuration.
//!
//! The system's own apt sources are never touched: a sources list of our own, naming the same
//! mirror as the system's sources for other suites (bullseye for 5.10, trixie and
//! trixie-backports for 7.x), with lists and downloads in the cache outside the repository.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, bail};

use crate::setup::step;

/// Every suite the kernel matrix draws from.
const SUITES: &[&str] = &["bullseye", "bookworm", "bookworm-updates", "trixie", "trixie-backports"];
const SECURITY_SUITES: &[&str] = &["bullseye-security", "bookworm-security", "trixie-security"];
const KEYRING: &str = "/usr/share/keyrings/debian-archive-keyring.gpg";
/// Package lists older than this are refreshed.
const LISTS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

pub struct Kernel {
    pub package: String,
    pub version: String,
    pub release: String,
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
}

pub fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache"));
    base.join("podtrace-vm")
}

/// apt-get and apt-cache with our own sources, lists, cache and an empty dpkg status.
struct PrivateApt {
    options: Vec<String>,
}

impl PrivateApt {
    fn open() -> Result<Self> {
        let dir = cache_dir().join("apt");
        for sub in ["lists/partial", "cache/archives/partial"] {
            fs::create_dir_all(dir.join(sub)).with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let sources = dir.join("sources.list");
        let (archive, security) = system_mirrors()?;
        let mut text = String::from("# Written by `cargo xtask vm`: the system's mirror, other suites.\n");
        for suite in SUITES {
            text.push_str(&format!("deb [signed-by={KEYRING}] {archive} {suite} main\n"));
        }
        for suite in SECURITY_SUITES.iter().filter(|_| security.is_some()) {
            text.push_str(&format!("deb [signed-by={KEYRING}] {} {suite} main\n", security.as_deref().unwrap_or_default()));
        }
        let changed = fs::read_to_string(&sources).ok().as_deref() != Some(text.as_str());
        fs::write(&sources, &text).with_context(|| format!("writing {}", sources.display()))?;
        let path = |sub: &str| dir.join(sub).to_string_lossy().into_owned();
        let apt = Self {
            options: [
                format!("Dir::Etc::SourceList={}", sources.display()),
                "Dir::Etc::SourceParts=/dev/null".to_string(),
                format!("Dir::State::Lists={}", path("lists")),
                format!("Dir::Cache={}", path("cache")),
                "Dir::State::status=/dev/null".to_string(),
            ]
            .into_iter()
            .flat_map(|option| ["-o".to_string(), option])
            .collect(),
        };
        let stamp = dir.join("lists/updated");
        let fresh = fs::metadata(&stamp)
            .and_then(|m| m.modified())
            .is_ok_and(|t| SystemTime::now().duration_since(t).unwrap_or(Duration::MAX) < LISTS_MAX_AGE);
        if changed || !fresh {
            let mut args: Vec<&str> = apt.options.iter().map(String::as_str).collect();
            args.extend(["update", "-qq"]);
            step("apt-get", &args)?;
            fs::write(&stamp, "").context("stamping the package lists")?;
        }
        Ok(apt)
    }

    fn query(&self, program: &str, args: &[&str]) -> Result<String> {
        let output = Command::new(program).args(&self.options).args(args).output().with_context(|| format!("running {program}"))?;
        if !output.status.success() {
            bail!("{program} {} failed: {}", args.join(" "), String::from_utf8_lossy(&output.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    fn field(&self, package: &str, field: &str) -> Result<String> {
        let show = self.query("apt-cache", &["show", "--no-all-versions", package])?;
        show.lines()
            .find_map(|line| line.strip_prefix(&format!("{field}: ")))
            .map(str::to_string)
            .with_context(|| format!("{package} has no {field}"))
    }

    /// The newest `<prefix>…-cloud-amd64` image package, by Debian version order.
    fn newest_image(&self, prefix: &str) -> Result<String> {
        let names = self.query("apt-cache", &["pkgnames", prefix])?;
        let mut newest: Option<(String, String)> = None;
        for name in names.lines().filter(|name| name.ends_with("-cloud-amd64")) {
            let version = self.field(name, "Version")?;
            let newer = match &newest {
                None => true,
                Some((_, best)) => Command::new("dpkg").args(["--compare-versions", &version, "gt", best]).status()?.success(),
            };
            if newer {
                newest = Some((name.to_string(), version));
            }
        }
        newest.map(|(name, _)| name).with_context(|| format!("no {prefix}…-cloud-amd64 package in {}", SUITES.join(", ")))
    }

    fn download(&self, package: &str, dir: &Path) -> Result<PathBuf> {
        let mut args: Vec<&str> = self.options.iter().map(String::as_str).collect();
        args.extend(["download", package]);
        println!("xtask: apt-get download {package}");
        let status = Command::new("apt-get").args(&args).current_dir(dir).status().context("running apt-get download")?;
        if !status.success() {
            bail!("apt-get download {package} failed ({status})");
        }
        fs::read_dir(dir)?
            .flatten()
            .map(|entry| entry.path())
            .find(|path| path.file_name().is_some_and(|n| n.to_string_lossy().starts_with(&format!("{package}_"))))
            .with_context(|| format!("{package}: downloaded .deb not found"))
    }
}

/// The archive and security mirror URIs of the system's own Debian sources (deb822 or
/// one-line format), so that the private configuration uses the mirror this machine uses.
fn system_mirrors() -> Result<(String, Option<String>)> {
    let mut texts = Vec::new();
    if let Ok(text) = fs::read_to_string("/etc/apt/sources.list") {
        texts.push(text);
    }
    for entry in fs::read_dir("/etc/apt/sources.list.d").into_iter().flatten().flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "sources" || e == "list") {
            texts.push(fs::read_to_string(&path).unwrap_or_default());
        }
    }
    let mut archive = None;
    let mut security = None;
    for text in &texts {
        for (uri, suites) in source_entries(text) {
            if !suites.iter().any(|suite| suite.starts_with("bookworm") || suite.starts_with("trixie") || suite.starts_with("bullseye")) {
                continue;
            }
            let slot = if suites.iter().any(|suite| suite.ends_with("-security")) { &mut security } else { &mut archive };
            slot.get_or_insert(uri);
        }
    }
    Ok((archive.context("no Debian archive in the system's apt sources to take the mirror from")?, security))
}

/// (URI, suites) of each entry, from deb822 stanzas and one-line `deb` entries.
fn source_entries(text: &str) -> Vec<(String, Vec<String>)> {
    let mut entries = Vec::new();
    for stanza in text.split("\n\n") {
        let value = |key: &str| stanza.lines().find_map(|line| line.strip_prefix(key)).map(str::trim);
        if let (Some(uris), Some(suites)) = (value("URIs:"), value("Suites:")) {
            let suites: Vec<String> = suites.split_whitespace().map(str::to_string).collect();
            for uri in uris.split_whitespace() {
                entries.push((uri.to_string(), suites.clone()));
            }
        }
    }
    for line in text.lines().map(str::trim).filter(|line| line.starts_with("deb ")) {
        let words: Vec<&str> = line.split_whitespace().skip(1).filter(|word| !word.starts_with('[') && !word.ends_with(']')).collect();
        if let [uri, suite, ..] = words.as_slice() {
            entries.push((uri.to_string(), vec![suite.to_string()]));
        }
    }
    entries
}

/// Downloads and extracts the newest cloud kernel whose package name starts with `prefix`.
/// Newer Debian kernels come split: the image package is a meta package over
/// `linux-binary-<version>` (the kernel) and `linux-modules-<version>`.
pub fn fetch(prefix: &str) -> Result<Kernel> {
    let apt = PrivateApt::open()?;
    let package = apt.newest_image(prefix)?;
    let version = apt.field(&package, "Version")?;
    let depends = apt.field(&package, "Depends").unwrap_or_default();
    let split_parts: Vec<String> = depends
        .split(',')
        .filter_map(|dep| dep.split_whitespace().next())
        .filter(|dep| dep.starts_with("linux-binary-") || dep.starts_with("linux-modules-"))
        .map(str::to_string)
        .collect();
    let parts = if split_parts.is_empty() { vec![package.clone()] } else { split_parts };
    let dir = cache_dir().join(&package);
    let tree = dir.join("tree");
    let done = dir.join("extracted");
    if !done.exists() {
        fs::create_dir_all(&dir)?;
        for part in &parts {
            let deb = apt.download(part, &dir)?;
            step("dpkg-deb", &["-x", deb.to_str().context("path")?, tree.to_str().context("path")?])?;
        }
        fs::write(&done, "").context("marking the kernel extracted")?;
    }
    let (release, vmlinuz, modules) = locate(&tree)?;
    Ok(Kernel { package, version, release, vmlinuz, modules })
}

/// The release, the kernel image and the module tree. Older packages put the image in
/// `/boot` and modules in `/lib/modules`; newer ones keep modules (and, when split, the image
/// too) under `/usr/lib/modules/<release>`.
fn locate(tree: &Path) -> Result<(String, PathBuf, PathBuf)> {
    let boot_image = fs::read_dir(tree.join("boot"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|entry| entry.path())
        .find(|path| path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")));
    let (release, vmlinuz) = match boot_image {
        Some(vmlinuz) => (vmlinuz.file_name().unwrap_or_default().to_string_lossy().trim_start_matches("vmlinuz-").to_string(), vmlinuz),
        None => {
            let modules_root = tree.join("usr/lib/modules");
            let dir = fs::read_dir(&modules_root)
                .with_context(|| format!("no /boot/vmlinuz-* and no {} in the packages", modules_root.display()))?
                .flatten()
                .map(|entry| entry.path())
                .find(|path| path.join("vmlinuz").exists())
                .context("no usr/lib/modules/<release>/vmlinuz in the packages")?;
            (dir.file_name().unwrap_or_default().to_string_lossy().into_owned(), dir.join("vmlinuz"))
        }
    };
    let legacy = tree.join("lib/modules").join(&release);
    let merged = tree.join("usr/lib/modules").join(&release);
    let modules = if legacy.join("kernel").exists() || !merged.exists() { legacy } else { merged.clone() };
    // depmod -b looks under <base>/lib/modules.
    let link = tree.join("lib/modules").join(&release);
    if modules == merged && !link.exists() {
        fs::create_dir_all(tree.join("lib/modules"))?;
        std::os::unix::fs::symlink(&merged, &link).with_context(|| format!("linking {}", link.display()))?;
    }
    depmod(tree, &release, &modules)?;
    Ok((release, vmlinuz, modules))
}

/// The packages leave modules.dep to depmod at install time.
fn depmod(tree: &Path, release: &str, modules: &Path) -> Result<()> {
    if !modules.join("modules.dep").exists() {
        step("depmod", &["-b", tree.to_str().context("path")?, release])?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirrors_from_deb822_and_one_line_sources() {
        let deb822 = "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n\n\
                      Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\nComponents: main\n";
        assert_eq!(
            source_entries(deb822),
            vec![
                ("http://mirror.example/debian".to_string(), vec!["bookworm".to_string(), "bookworm-updates".to_string()]),
                ("http://mirror.example/debian-security".to_string(), vec!["bookworm-security".to_string()]),
            ]
        );
        let one_line = "deb [arch=amd64] http://other.example/debian bookworm main\n# deb http://x y z\n";
        assert_eq!(source_entries(one_line), vec![("http://other.example/debian".to_string(), vec!["bookworm".to_string()])]);
    }
}
