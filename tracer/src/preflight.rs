//! Checks done before anything is attached, so bad input fails fast and leaves nothing behind.

use std::{fs, net::IpAddr, path::Path};

use anyhow::{Context as _, Result, anyhow, bail};

pub fn parse_pod_ip(text: &str) -> Result<IpAddr> {
    let ip: IpAddr = text.trim().parse().map_err(|err| anyhow!("invalid pod IP {text:?}: {err}"))?;
    if ip.is_unspecified() || ip.is_multicast() || ip.is_loopback() {
        bail!("invalid pod IP {text:?}: not a unicast pod address");
    }
    Ok(ip)
}

/// The protocol number `--proto icmp` means for the followed pods: ICMP for IPv4, ICMPv6 for
/// IPv6. The kernel filter holds one number, so the two families cannot be followed together.
pub fn icmp_protocol(pod_ips: &[IpAddr]) -> Result<u8> {
    match (pod_ips.iter().any(IpAddr::is_ipv4), pod_ips.iter().any(IpAddr::is_ipv6)) {
        (true, true) => {
            bail!("--proto icmp with IPv4 and IPv6 pod IPs: ICMP and ICMPv6 are different protocols; follow each address family separately")
        }
        (false, true) => Ok(tracer_common::IPPROTO_ICMPV6),
        _ => Ok(tracer_common::IPPROTO_ICMP),
    }
}

const CAP_NET_ADMIN: u32 = 12;
const CAP_SYS_ADMIN: u32 = 21;
const CAP_PERFMON: u32 = 38;
const CAP_BPF: u32 = 39;

/// Root, or CAP_BPF + CAP_NET_ADMIN + CAP_PERFMON (CAP_SYS_ADMIN stands in for the first two
/// BPF capabilities, as the kernel allows).
pub fn check_privileges() -> Result<()> {
    let status = fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let effective = status.lines().find_map(|line| line.strip_prefix("CapEff:")).context("no CapEff line in /proc/self/status")?;
    let effective = u64::from_str_radix(effective.trim(), 16).context("parsing CapEff")?;
    let has = |cap: u32| effective & (1u64 << cap) != 0;
    let mut missing = Vec::new();
    if !has(CAP_NET_ADMIN) {
        missing.push("CAP_NET_ADMIN");
    }
    if !has(CAP_BPF) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_BPF");
    }
    if !has(CAP_PERFMON) && !has(CAP_SYS_ADMIN) {
        missing.push("CAP_PERFMON");
    }
    if !missing.is_empty() {
        bail!("missing privileges: run as root or with CAP_BPF, CAP_NET_ADMIN and CAP_PERFMON (lacking {})", missing.join(", "));
    }
    Ok(())
}

/// The kernel's BTF is needed to read its struct layouts and enum names at load time.
pub fn check_btf(path: &Path) -> Result<()> {
    if !path.exists() {
        bail!("no BTF at {}: podtrace needs a kernel built with CONFIG_DEBUG_INFO_BTF (or pass --btf <file>)", path.display());
    }
    Ok(())
}

/// tracefs holds tracepoint formats; it is not mounted on every host, nor inside
/// `ip netns exec`, which remounts /sys.
pub fn ensure_tracefs() -> Result<()> {
    mount_if_missing("/sys/kernel/tracing", "tracefs", "tracefs")
}

fn mount_if_missing(target: &str, fstype: &str, source: &str) -> Result<()> {
    let mounts = fs::read_to_string("/proc/self/mounts").context("reading /proc/self/mounts")?;
    if mounts.lines().any(|line| line.split_whitespace().nth(1) == Some(target)) {
        return Ok(());
    }
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL in constant");
    let (source, target_c, fstype_c) = (c(source), c(target), c(fstype));
    // SAFETY: valid NUL-terminated strings; no data argument.
    let rc = unsafe { libc::mount(source.as_ptr(), target_c.as_ptr(), fstype_c.as_ptr(), 0, std::ptr::null()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("mounting {fstype} at {target}"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_ip_errors_say_what_and_why() {
        assert_eq!(parse_pod_ip("10.244.0.2").unwrap().to_string(), "10.244.0.2");
        assert_eq!(parse_pod_ip("fd00::2").unwrap().to_string(), "fd00::2");
        let err = parse_pod_ip("10.244.0.300").unwrap_err().to_string();
        assert_eq!(err, "invalid pod IP \"10.244.0.300\": invalid IP address syntax");
        assert!(parse_pod_ip("0.0.0.0").unwrap_err().to_string().contains("not a unicast"));
    }

    #[test]
    fn icmp_is_icmpv6_for_ipv6_pods_and_never_both() {
        let v4: IpAddr = "10.244.0.2".parse().unwrap();
        let v6: IpAddr = "fd00:10:244::2".parse().unwrap();
        assert_eq!(icmp_protocol(&[v4]).unwrap(), tracer_common::IPPROTO_ICMP);
        assert_eq!(icmp_protocol(&[v6]).unwrap(), tracer_common::IPPROTO_ICMPV6);
        let err = icmp_protocol(&[v4, v6]).unwrap_err().to_string();
        assert!(err.starts_with("--proto icmp with IPv4 and IPv6 pod IPs"), "{err}");
    }

    #[test]
    fn missing_btf_names_the_file() {
        let err = check_btf(Path::new("/nonexistent/vmlinux")).unwrap_err().to_string();
        assert!(err.starts_with("no BTF at /nonexistent/vmlinux"), "{err}");
    }
}
