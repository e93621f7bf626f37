//! `cargo xtask vm`: the privileged test suite inside QEMU on Debian's 6.1 and 6.12 kernels.
//!
//! Each kernel is a Debian package (`apt-get download`), extracted into a cache outside the
//! repository. The initramfs is built on the fly: busybox, the statically linked (musl)
//! podtrace and test binaries, the tools the tests call with their shared libraries, and the
//! kernel's own modules (veth, vxlan, bridge, bonding, cls_bpf, netfilter). The VM runs the
//! suite and reports each test binary's exit status on the serial console.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    io::{BufRead as _, BufReader},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{setup::step, workspace};

/// The Debian meta packages that name each kernel line's current image.
const KERNELS: &[(&str, &str)] = &[("6.1", "linux-image-cloud-amd64"), ("6.12", "linux-image-6.12-cloud-amd64")];

/// Modules the lab and podtrace need; their dependencies are added from modules.dep.
const MODULES: &[&str] = &[
    "veth",
    "vxlan",
    "bridge",
    "bonding",
    "sch_ingress",
    "cls_bpf",
    "nf_tables",
    "nft_compat",
    "nft_chain_nat",
    "nf_nat",
    "nf_conntrack",
    "xt_nat",
    "xt_tcpudp",
    "xt_conntrack",
    "ip_tables",
    "iptable_filter",
    "iptable_nat",
    "nf_reject_ipv4",
    "nft_reject_ipv4",
    "xt_MASQUERADE",
];

/// Host programs the tests call, copied with their shared libraries.
const TOOLS: &[&str] = &[
    "/usr/bin/ip",
    "/usr/sbin/tc",
    "/usr/sbin/bridge",
    "/usr/sbin/ethtool",
    "/usr/bin/tcpdump",
    "/usr/bin/ping",
    "/usr/sbin/bpftool",
    "/usr/bin/setpriv",
    "/usr/sbin/xtables-nft-multi",
    "/usr/bin/python3.11",
    "/usr/sbin/sysctl",
];

/// Serial-console markers the init script prints.
const RESULT_MARK: &str = "PODTRACE-VM-EXIT";
const DONE_MARK: &str = "PODTRACE-VM-DONE";

pub fn run(kernels: &[String], filter: &[String]) -> Result<()> {
    let selected: Vec<(&str, &str)> = if kernels.iter().any(|k| k == "all") {
        KERNELS.to_vec()
    } else {
        kernels
            .iter()
            .map(|k| {
                KERNELS.iter().find(|(name, _)| name == k).copied().with_context(|| format!("unknown kernel {k}: use 6.1, 6.12 or all"))
            })
            .collect::<Result<_>>()?
    };
    let binaries = build_static()?;
    let mut failures = Vec::new();
    for (line, meta) in selected {
        let kernel = fetch_kernel(meta)?;
        println!("xtask: VM kernel {line}: package {} version {}", kernel.package, kernel.version);
        let initramfs = build_initramfs(&kernel, &binaries, filter)?;
        match boot(&kernel, &initramfs) {
            Ok(()) => println!("xtask: VM kernel {line} ({}): all test binaries passed", kernel.release),
            Err(err) => {
                println!("xtask: VM kernel {line} ({}): {err:#}", kernel.release);
                failures.push(format!("{line}: {err:#}"));
            }
        }
    }
    if !failures.is_empty() {
        bail!("VM tests failed: {}", failures.join("; "));
    }
    Ok(())
}

struct StaticBinaries {
    podtrace: PathBuf,
    tests: Vec<(String, PathBuf)>,
}

/// podtrace and the test binaries, linked statically against musl so the VM needs no libc
/// of theirs.
fn build_static() -> Result<StaticBinaries> {
    const TARGET: &str = "x86_64-unknown-linux-musl";
    step("cargo", &["build", "--package", "tracer", "--target", TARGET])?;
    println!("xtask: cargo test --no-run --target {TARGET} (tracer, podtrace-tests)");
    let output = Command::new("cargo")
        .args(["test", "--no-run", "--target", TARGET, "--package", "tracer", "--package", "podtrace-tests", "--message-format=json"])
        .stderr(Stdio::inherit())
        .output()
        .context("building the test binaries")?;
    if !output.status.success() {
        bail!("building the static test binaries failed");
    }
    let mut tests = Vec::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else { continue };
        let (Some(executable), Some(name)) = (message["executable"].as_str(), message["target"]["name"].as_str()) else {
            continue;
        };
        let kinds = message["target"]["kind"].as_array().cloned().unwrap_or_default();
        // Integration tests, and the tracer library's unit tests (they read the running
        // kernel's BTF and tracefs); the empty unit-test harnesses of the others are skipped.
        if kinds.iter().any(|k| k == "test") || name == "tracer" && kinds.iter().any(|k| k == "lib") {
            tests.push((
                if kinds.iter().any(|k| k == "lib") { "tracer-unit".to_string() } else { name.to_string() },
                PathBuf::from(executable),
            ));
        }
    }
    tests.sort();
    tests.dedup_by(|a, b| a.0 == b.0);
    Ok(StaticBinaries { podtrace: workspace().join("target").join(TARGET).join("debug/podtrace"), tests })
}

struct Kernel {
    package: String,
    version: String,
    release: String,
    vmlinuz: PathBuf,
    modules: PathBuf,
}

fn cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cache"));
    base.join("podtrace-vm")
}

/// Downloads and extracts the kernel image package that `meta` currently points at.
fn fetch_kernel(meta: &str) -> Result<Kernel> {
    let package = resolve_meta(meta).or_else(|_| {
        step("apt-get", &["update", "-qq"])?;
        resolve_meta(meta)
    })?;
    let dir = cache_dir().join(&package);
    let tree = dir.join("tree");
    if !tree.join("boot").exists() {
        fs::create_dir_all(&dir)?;
        println!("xtask: apt-get download {package}");
        let status = Command::new("apt-get").args(["download", &package]).current_dir(&dir).status()?;
        if !status.success() {
            bail!("apt-get download {package} failed");
        }
        let deb = fs::read_dir(&dir)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .context("downloaded package not found")?;
        step("dpkg-deb", &["-x", deb.to_str().context("path")?, tree.to_str().context("path")?])?;
    }
    let deb = fs::read_dir(&dir)?.flatten().map(|e| e.path()).find(|p| p.extension().is_some_and(|e| e == "deb"));
    let version = deb
        .and_then(|deb| Command::new("dpkg-deb").args(["-f"]).arg(deb).arg("Version").output().ok())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    let vmlinuz = fs::read_dir(tree.join("boot"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-")))
        .context("no vmlinuz in the package")?;
    let release = vmlinuz.file_name().unwrap().to_string_lossy().trim_start_matches("vmlinuz-").to_string();
    let modules = tree.join("lib/modules").join(&release);
    // The package leaves modules.dep to depmod at install time.
    if !modules.join("modules.dep").exists() {
        step("depmod", &["-b", tree.to_str().context("path")?, &release])?;
    }
    Ok(Kernel { package, version, release, vmlinuz, modules })
}

fn resolve_meta(meta: &str) -> Result<String> {
    let output = Command::new("apt-cache").args(["depends", meta]).output().context("running apt-cache")?;
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| line.trim().strip_prefix("Depends: ").filter(|p| p.starts_with("linux-image-")).map(str::to_string))
        .with_context(|| format!("apt-cache knows no kernel behind {meta}"))
}

fn build_initramfs(kernel: &Kernel, binaries: &StaticBinaries, filter: &[String]) -> Result<PathBuf> {
    let root = cache_dir().join("initramfs").join(&kernel.release);
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    for dir in ["bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "run", "tmp", "etc", "tests", "lib/modules", "var/run"] {
        fs::create_dir_all(root.join(dir))?;
    }
    copy(Path::new("/bin/busybox"), &root.join("bin/busybox"))?;
    copy(&binaries.podtrace, &root.join("bin/podtrace"))?;
    for (name, path) in &binaries.tests {
        copy(path, &root.join("tests").join(name))?;
    }
    let mut libraries = BTreeSet::new();
    for tool in TOOLS {
        copy(Path::new(tool), &root.join(tool.trim_start_matches('/')))?;
        libraries.extend(shared_libraries(tool)?);
    }
    for library in &libraries {
        copy(library, &root.join(library.strip_prefix("/").unwrap_or(library)))?;
    }
    // iptables is a name of the xtables multi-call binary; python3 of python3.11.
    symlink("xtables-nft-multi", &root.join("usr/sbin/iptables"))?;
    symlink("python3.11", &root.join("usr/bin/python3"))?;
    // iptables loads its match and target extensions with dlopen, which ldd cannot see.
    let xtables = Path::new("/usr/lib/x86_64-linux-gnu/xtables");
    fs::create_dir_all(root.join("usr/lib/x86_64-linux-gnu"))?;
    step("cp", &["-r", xtables.to_str().context("path")?, root.join("usr/lib/x86_64-linux-gnu").to_str().context("path")?])?;
    for extension in fs::read_dir(xtables)?.flatten() {
        for library in shared_libraries(extension.path().to_str().context("path")?)? {
            copy(&library, &root.join(library.strip_prefix("/").unwrap_or(&library)))?;
        }
    }
    copy_python_stdlib(&root)?;
    for file in ["/etc/protocols", "/etc/services"] {
        copy(Path::new(file), &root.join(file.trim_start_matches('/')))?;
    }
    fs::write(root.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n")?;
    fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n")?;
    let order = install_modules(kernel, &root)?;
    fs::write(root.join("modules.order"), order.join("\n") + "\n")?;
    let init = init_script(&binaries.tests, filter);
    fs::write(root.join("init"), init)?;
    fs::set_permissions(root.join("init"), fs::Permissions::from_mode(0o755))?;

    let image = cache_dir().join(format!("initramfs-{}.cpio.gz", kernel.release));
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!("find . | cpio -o -H newc --quiet | gzip -1 > '{}'", image.display()))
        .current_dir(&root)
        .status()
        .context("packing the initramfs")?;
    if !status.success() {
        bail!("packing the initramfs failed");
    }
    Ok(image)
}

fn init_script(tests: &[(String, PathBuf)], filter: &[String]) -> String {
    let filter = filter.iter().map(|f| format!("'{f}'")).collect::<Vec<_>>().join(" ");
    let mut script = String::from(
        "#!/bin/busybox sh\n\
         /bin/busybox --install -s /bin\n\
         export PATH=/usr/sbin:/usr/bin:/sbin:/bin PODTRACE_BIN=/bin/podtrace RUST_BACKTRACE=0 HOME=/root\n\
         mount -t proc proc /proc\n\
         mount -t sysfs sys /sys\n\
         mount -t devtmpfs dev /dev\n\
         mount -t tmpfs run /run\n\
         mount -t tmpfs tmp /tmp\n\
         mount -t tracefs tracefs /sys/kernel/tracing\n\
         mount -t bpf bpf /sys/fs/bpf\n\
         for m in $(cat /modules.order); do insmod /lib/modules/$m || echo \"insmod $m failed\"; done\n\
         ip link set lo up\n\
         echo \"PODTRACE-VM kernel $(uname -r)\"\n",
    );
    for (name, _) in tests {
        script.push_str(&format!(
            "echo \"PODTRACE-VM-RUN {name}\"\n/tests/{name} --include-ignored --test-threads=1 {filter}\necho \"{RESULT_MARK} {name} $?\"\n"
        ));
    }
    script.push_str(&format!("echo {DONE_MARK}\npoweroff -f\n"));
    script
}

/// Copies the modules (decompressed, for busybox insmod) and returns them in load order.
fn install_modules(kernel: &Kernel, root: &Path) -> Result<Vec<String>> {
    let dep = fs::read_to_string(kernel.modules.join("modules.dep")).context("reading modules.dep")?;
    let mut deps: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for line in dep.lines() {
        let Some((module, rest)) = line.split_once(':') else { continue };
        deps.insert(module.to_string(), rest.split_whitespace().map(str::to_string).collect());
    }
    let path_of = |name: &str| {
        deps.keys()
            .find(|path| {
                let file = path.rsplit('/').next().unwrap_or(path);
                let stem = file.split(".ko").next().unwrap_or(file);
                stem == name || stem.replace('-', "_") == name
            })
            .cloned()
    };
    let mut order = Vec::new();
    fn visit(module: &str, deps: &BTreeMap<String, Vec<String>>, order: &mut Vec<String>) {
        if order.iter().any(|m| m == module) {
            return;
        }
        for dep in deps.get(module).into_iter().flatten() {
            visit(dep, deps, order);
        }
        order.push(module.to_string());
    }
    for name in MODULES {
        // Built into this kernel when absent from modules.dep.
        if let Some(path) = path_of(name) {
            visit(&path, &deps, &mut order);
        }
    }
    let mut loaded = Vec::new();
    for module in &order {
        let source = kernel.modules.join(module);
        let file = module.rsplit('/').next().unwrap_or(module);
        let plain = file.trim_end_matches(".xz").trim_end_matches(".zst").to_string();
        let target = root.join("lib/modules").join(&plain);
        if file.ends_with(".xz") {
            let output = Command::new("xz").arg("-dc").arg(&source).output().context("running xz")?;
            if !output.status.success() {
                bail!("decompressing {module} failed");
            }
            fs::write(&target, output.stdout)?;
        } else {
            copy(&source, &target)?;
        }
        loaded.push(plain);
    }
    Ok(loaded)
}

fn shared_libraries(binary: &str) -> Result<Vec<PathBuf>> {
    let output = Command::new("ldd").arg(binary).output().context("running ldd")?;
    Ok(String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| line.split_whitespace().find(|word| word.starts_with('/')).map(PathBuf::from))
        .collect())
}

/// The parts of the standard library the tests' Python snippets (socket, struct, time) and
/// interpreter start-up need.
fn copy_python_stdlib(root: &Path) -> Result<()> {
    let source = Path::new("/usr/lib/python3.11");
    let target = root.join("usr/lib/python3.11");
    fs::create_dir_all(&target)?;
    for entry in fs::read_dir(source)?.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        if path.is_file() && name.ends_with(".py") {
            copy(&path, &target.join(&name))?;
        } else if matches!(name.as_str(), "encodings" | "collections" | "importlib" | "re" | "lib-dynload") {
            step("cp", &["-r", path.to_str().context("path")?, target.to_str().context("path")?])?;
        }
    }
    Ok(())
}

fn copy(from: &Path, to: &Path) -> Result<()> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent)?;
    }
    fs::copy(from, to).with_context(|| format!("copying {} into the initramfs", from.display()))?;
    Ok(())
}

fn symlink(target: &str, link: &Path) -> Result<()> {
    let _ = fs::remove_file(link);
    std::os::unix::fs::symlink(target, link).with_context(|| format!("linking {}", link.display()))
}

/// Boots the kernel under TCG (KVM hangs on these hosts) and checks every test binary's
/// exit status from the console.
///
/// One vCPU: the kernel patches its own text whenever a static key or static call flips
/// (attaching TC programs and tracepoints, ping enabling timestamps), and under multi-vCPU TCG
/// another vCPU can still run the transient int3 after the patch completed, which oopses
/// the kernel ("Oops: int3" in netif_rx_internal, seen once in a dozen suite runs).
fn boot(kernel: &Kernel, initramfs: &Path) -> Result<()> {
    const TIMEOUT: Duration = Duration::from_secs(40 * 60);
    let mut child = Command::new("qemu-system-x86_64")
        .args(["-accel", "tcg", "-m", "2048", "-smp", "1", "-nographic", "-no-reboot", "-kernel"])
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args(["-append", "console=ttyS0 panic=-1 rdinit=/init quiet loglevel=3"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let stdout = child.stdout.take().context("qemu stdout")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let started = Instant::now();
    let mut results = Vec::new();
    let mut done = false;
    let mut booted_kernel = None;
    loop {
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(line) => {
                println!("[vm {}] {line}", kernel.release);
                if let Some(rest) = line.trim().strip_prefix(RESULT_MARK) {
                    let mut parts = rest.split_whitespace();
                    if let (Some(name), Some(code)) = (parts.next(), parts.next()) {
                        results.push((name.to_string(), code.to_string()));
                    }
                } else if line.trim() == DONE_MARK {
                    done = true;
                } else if let Some((_, release)) = line.split_once("PODTRACE-VM kernel ") {
                    // The console may prefix the first line with terminal escapes.
                    booted_kernel = Some(release.trim().to_string());
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if started.elapsed() > TIMEOUT {
            let _ = child.kill();
            bail!("timed out after {} s", TIMEOUT.as_secs());
        }
    }
    let _ = child.wait();
    if booted_kernel.as_deref() != Some(kernel.release.as_str()) {
        bail!("the VM did not report running {}", kernel.release);
    }
    if !done {
        bail!("the VM stopped before the suite finished");
    }
    let failed: Vec<String> = results.iter().filter(|(_, code)| code != "0").map(|(name, code)| format!("{name} (exit {code})")).collect();
    println!("xtask: VM {}: {} test binaries, {} failed", kernel.release, results.len(), failed.len());
    if !failed.is_empty() {
        bail!("failed: {}", failed.join(", "));
    }
    Ok(())
}
