//! The VM's initramfs: busybox, the static podtrace and test binaries, the tools the tests
//! call with their shared libraries, the kernel's own modules, and an init that runs the suite.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use super::{DONE_MARK, RESULT_MARK, TestRun, kernel::Kernel};
use crate::setup::step;

/// Modules the lab and podtrace need; their dependencies are added from modules.dep.
const MODULES: &[&str] = &[
    "veth",
    "vxlan",
    // Calico's IPIP mode: tunl0 (the host's kernel has no ipip, so it is tested only here).
    "tunnel4",
    "ipip",
    "bridge",
    // Bridged traffic through iptables, as on every kubelet node (and built into the host's
    // kernel); the br-netfilter-off and hairpin-off findings are tested with and without it.
    "br_netfilter",
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
    // Separate modules on older kernels (5.10), built into nf_tables later: iptables-nft's
    // rule counters, REJECT and conntrack expressions.
    "nft_counter",
    "nft_ct",
    "nft_reject",
    "nft_reject_inet",
    "ipt_REJECT",
    // The fingerprint lab queues a DNS burst behind a rate-limited flannel.1.
    "sch_tbf",
    // The lab's occasional-loss rule (length, every nth packet, rate-limited).
    "xt_length",
    "xt_statistic",
    "xt_limit",
    // iptables-nft turns some matches into native expressions of their own module.
    "nft_limit",
    "nft_numgen",
    // kube-proxy's rules: comments on every rule, the masquerade mark, and the NodePorts' jump
    // for traffic addressed to the node (iptables-nft may make it a fib expression).
    "xt_comment",
    "xt_mark",
    "xt_addrtype",
    "nft_fib_ipv4",
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
    // The lab makes pods with the CNI plugins, and serves cluster DNS with dnsmasq.
    "/usr/lib/cni/bridge",
    "/usr/lib/cni/host-local",
    "/usr/lib/cni/loopback",
    "/usr/sbin/dnsmasq",
];

/// The initramfs for `kernel`, whose init runs each of `runs` (a test binary and its name
/// filters) and prints its exit status.
pub fn build(kernel: &Kernel, podtrace: &Path, binaries: &[(String, PathBuf)], runs: &[TestRun]) -> Result<PathBuf> {
    // Built from this checkout's binaries, so kept beside them (not in the shared cache, where
    // a run from another checkout would overwrite it under a running VM).
    let work = podtrace.parent().context("the podtrace binary's directory")?.join("vm");
    let root = work.join("initramfs").join(&kernel.release);
    if root.exists() {
        fs::remove_dir_all(&root)?;
    }
    for dir in ["bin", "sbin", "usr/bin", "usr/sbin", "proc", "sys", "dev", "run", "tmp", "etc", "tests", "lib/modules", "var/run"] {
        fs::create_dir_all(root.join(dir))?;
    }
    copy(Path::new("/bin/busybox"), &root.join("bin/busybox"))?;
    copy(podtrace, &root.join("bin/podtrace"))?;
    for (name, path) in binaries.iter().filter(|(name, _)| runs.iter().any(|run| &run.binary == name)) {
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
    // iptables and iptables-restore (kube-proxy's way of loading Services) are names of the
    // xtables multi-call binary; python3 of python3.11.
    symlink("xtables-nft-multi", &root.join("usr/sbin/iptables"))?;
    symlink("xtables-nft-multi", &root.join("usr/sbin/iptables-restore"))?;
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
    // tcpdump drops to its own user unless told otherwise (-Z root), as Debian's does.
    fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\ntcpdump:x:104:104::/nonexistent:/bin/false\n",
    )?;
    fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\ntcpdump:x:104:\n")?;
    let order = install_modules(kernel, &root)?;
    fs::write(root.join("modules.order"), order.join("\n") + "\n")?;
    let init = init_script(runs);
    fs::write(root.join("init"), init)?;
    fs::set_permissions(root.join("init"), fs::Permissions::from_mode(0o755))?;

    let image = work.join(format!("initramfs-{}.cpio.gz", kernel.release));
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

fn init_script(runs: &[TestRun]) -> String {
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
    for TestRun { binary: name, filters } in runs {
        let filter = filters.iter().map(|f| format!("'{f}'")).collect::<Vec<_>>().join(" ");
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
