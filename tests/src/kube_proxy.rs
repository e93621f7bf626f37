//! Services the way kube-proxy's iptables mode writes them into a node's `nat` table:
//! `PREROUTING`/`OUTPUT` → `KUBE-SERVICES` → `KUBE-SVC-<hash>` → `KUBE-SEP-<hash>` (DNAT to the
//! endpoint), with the `KUBE-MARK-MASQ`/`KUBE-POSTROUTING` masquerade mark, and a NodePort's
//! `KUBE-NODEPORTS` → `KUBE-EXT-<hash>` (marked for masquerading) → the same `KUBE-SVC-…`, loaded
//! with `iptables-restore --noflush` as kube-proxy does.

use std::{
    fmt::Write as _,
    io::Write as _,
    net::{Ipv4Addr, SocketAddrV4},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::lab::run;

/// The pod network kube-proxy is told about (`--cluster-cidr`): traffic to a Service from
/// outside it is masqueraded.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";

/// One port of a Service with its one endpoint.
pub struct ServicePort<'a> {
    /// `namespace/name:port-name`, as kube-proxy names it in chain hashes and comments.
    pub name: &'a str,
    /// `udp` or `tcp`.
    pub protocol: &'a str,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    /// The Service's NodePort on this port, if it is exposed as one.
    pub node_port: Option<u16>,
    pub endpoint: SocketAddrV4,
}

/// The `iptables-restore` input kube-proxy writes for `ports`.
pub fn restore_input(ports: &[ServicePort]) -> Result<String> {
    let mut chains =
        ["KUBE-SERVICES", "KUBE-NODEPORTS", "KUBE-POSTROUTING", "KUBE-MARK-MASQ"].into_iter().map(String::from).collect::<Vec<_>>();
    let mut rules = vec![
        r#"-A PREROUTING -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#.to_string(),
        r#"-A OUTPUT -m comment --comment "kubernetes service portals" -j KUBE-SERVICES"#.to_string(),
        r#"-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING"#.to_string(),
        "-A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000".to_string(),
        "-A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN".to_string(),
        "-A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0".to_string(),
        r#"-A KUBE-POSTROUTING -m comment --comment "kubernetes service traffic requiring SNAT" -j MASQUERADE --random-fully"#.to_string(),
    ];
    service_rules(ports, &mut chains, &mut rules)?;
    // Last in KUBE-SERVICES: what no cluster IP took, addressed to the node itself.
    rules.push(
        r#"-A KUBE-SERVICES -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"#
            .to_string(),
    );
    nat_input(&chains, &rules)
}

/// The `iptables-restore --noflush` input that adds `ports` to a node whose kube-proxy chains
/// exist: only the new Services' own chains are declared (a declared chain is flushed), and
/// their jumps are appended to `KUBE-SERVICES`.
fn added_input(ports: &[ServicePort]) -> Result<String> {
    let (mut chains, mut rules) = (Vec::new(), Vec::new());
    service_rules(ports, &mut chains, &mut rules)?;
    nat_input(&chains, &rules)
}

/// Each port's `KUBE-SVC-…` and `KUBE-SEP-…` chains and rules, and its jump from `KUBE-SERVICES`;
/// for a NodePort, its `KUBE-EXT-…` chain and its jump from `KUBE-NODEPORTS`.
fn service_rules(ports: &[ServicePort], chains: &mut Vec<String>, rules: &mut Vec<String>) -> Result<()> {
    for port in ports {
        let ServicePort { name, protocol, cluster_ip, port: service_port, node_port, endpoint } = port;
        let hash = chain_hash(&format!("{name}{protocol}"))?;
        let service = format!("KUBE-SVC-{hash}");
        let endpoint_chain = format!("KUBE-SEP-{}", chain_hash(&format!("{name}{protocol}{endpoint}"))?);
        let matches =
            format!("-d {cluster_ip}/32 -p {protocol} -m comment --comment \"{name} cluster IP\" -m {protocol} --dport {service_port}");
        rules.push(format!("-A KUBE-SERVICES {matches} -j {service}"));
        rules.push(format!("-A {service} ! -s {CLUSTER_CIDR} {matches} -j KUBE-MARK-MASQ"));
        rules.push(format!("-A {service} -m comment --comment \"{name} -> {endpoint}\" -j {endpoint_chain}"));
        // Hairpin: the endpoint reaching itself through the Service is masqueraded.
        rules.push(format!("-A {endpoint_chain} -s {}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ", endpoint.ip()));
        rules.push(format!(
            "-A {endpoint_chain} -p {protocol} -m comment --comment \"{name}\" -m {protocol} -j DNAT --to-destination {endpoint}"
        ));
        if let Some(node_port) = node_port {
            let external = format!("KUBE-EXT-{hash}");
            rules.push(format!(
                "-A KUBE-NODEPORTS -p {protocol} -m comment --comment \"{name}\" -m {protocol} --dport {node_port} -j {external}"
            ));
            rules.push(format!(
                "-A {external} -m comment --comment \"masquerade traffic for {name} external destinations\" -j KUBE-MARK-MASQ"
            ));
            rules.push(format!("-A {external} -j {service}"));
            chains.push(external);
        }
        chains.extend([service, endpoint_chain]);
    }
    Ok(())
}

/// A `nat` table transaction declaring `chains` and appending `rules`.
fn nat_input(chains: &[String], rules: &[String]) -> Result<String> {
    let mut input = String::from("*nat\n");
    for chain in chains {
        writeln!(input, ":{chain} - [0:0]")?;
    }
    for rule in rules {
        writeln!(input, "{rule}")?;
    }
    input.push_str("COMMIT\n");
    Ok(input)
}

/// Loads the rules for `ports` into `netns`, keeping what is there (`--noflush`).
pub fn load(netns: &str, ports: &[ServicePort]) -> Result<()> {
    restore(netns, &restore_input(ports)?)
}

/// Adds Services to `netns`, where `load` has written kube-proxy's chains, keeping the others.
pub fn add(netns: &str, ports: &[ServicePort]) -> Result<()> {
    restore(netns, &added_input(ports)?)
}

/// Adds the web Service (`default/web:http`, TCP) exposed as NodePort `node_port`, whose one
/// endpoint is `endpoint`.
pub fn add_web_node_port(netns: &str, node_port: u16, endpoint: SocketAddrV4) -> Result<()> {
    add(
        netns,
        &[ServicePort {
            name: "default/web:http",
            protocol: "tcp",
            cluster_ip: Ipv4Addr::new(10, 96, 0, 80),
            port: 80,
            node_port: Some(node_port),
            endpoint,
        }],
    )
}

pub(crate) fn restore(netns: &str, input: &str) -> Result<()> {
    let what = format!("iptables-restore --noflush in {netns}");
    let mut child = Command::new("ip")
        .args(["netns", "exec", netns, "iptables-restore", "-w", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    child.stdin.take().context("iptables-restore stdin")?.write_all(input.as_bytes())?;
    let output = child.wait_with_output().with_context(|| format!("waiting for {what}"))?;
    if !output.status.success() {
        bail!("{what} failed: {}\ninput:\n{input}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

/// Flushes every `KUBE-*` chain of the `nat` table: the node as it is when kube-proxy is not
/// running there (its jumps stay, leading nowhere).
pub fn flush(netns: &str) -> Result<()> {
    let output = run(&["ip", "netns", "exec", netns, "iptables", "-w", "-t", "nat", "-S"])?;
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        if let Some(chain) = line.strip_prefix("-N ").filter(|chain| chain.starts_with("KUBE-")) {
            run(&["ip", "netns", "exec", netns, "iptables", "-w", "-t", "nat", "-F", chain])?;
        }
    }
    Ok(())
}

/// kube-proxy's chain-name hash: the first 16 characters of base32(sha256(`input`)).
fn chain_hash(input: &str) -> Result<String> {
    // sha256sum, from coreutils or busybox (the VM has only busybox), rather than a crate.
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting sha256sum")?;
    child.stdin.take().context("sha256sum stdin")?.write_all(input.as_bytes())?;
    let output = child.wait_with_output().context("running sha256sum")?;
    let hex = String::from_utf8_lossy(&output.stdout);
    let hex = hex.split_whitespace().next().filter(|hex| hex.len() == 64).with_context(|| format!("sha256sum printed {hex:?}"))?;
    // 16 base32 characters are 80 bits: the first 10 bytes of the digest.
    let mut bits: u128 = 0;
    for index in 0..10 {
        bits = (bits << 8) | u128::from(u8::from_str_radix(&hex[2 * index..2 * index + 2], 16).context("parsing sha256sum's digest")?);
    }
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    Ok((0..16).rev().map(|index| ALPHABET[((bits >> (5 * index)) & 31) as usize] as char).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_services_declare_only_their_own_chains() {
        let port = ServicePort {
            name: "default/web:http",
            protocol: "tcp",
            cluster_ip: Ipv4Addr::new(10, 96, 0, 20),
            port: 80,
            node_port: None,
            endpoint: SocketAddrV4::new(Ipv4Addr::new(10, 244, 0, 3), 8080),
        };
        let input = added_input(&[port]).unwrap();
        let declared: Vec<&str> = input.lines().filter(|line| line.starts_with(':')).collect();
        assert_eq!(declared.len(), 2, "{input}");
        assert!(declared.iter().all(|chain| chain.starts_with(":KUBE-SVC-") || chain.starts_with(":KUBE-SEP-")), "{input}");
        assert!(input.contains("-A KUBE-SERVICES -d 10.96.0.20/32 -p tcp"), "{input}");
        assert!(input.contains("-j DNAT --to-destination 10.244.0.3:8080"), "{input}");
        assert!(!input.contains("PREROUTING") && !input.contains(":KUBE-SERVICES"), "{input}");
    }

    #[test]
    fn chain_hashes_are_kube_proxys() {
        // The chain names every cluster's kube-dns Service gets.
        assert_eq!(chain_hash("kube-system/kube-dns:dnsudp").unwrap(), "TCOU7JCQXEZGVUNU");
        assert_eq!(chain_hash("kube-system/kube-dns:dns-tcptcp").unwrap(), "ERIFXISQEP7F7OF4");
    }

    #[test]
    fn a_node_port_is_masqueraded_then_served_by_its_service_chain() {
        let port = ServicePort {
            name: "default/web:http",
            protocol: "tcp",
            cluster_ip: Ipv4Addr::new(10, 96, 0, 20),
            port: 80,
            node_port: Some(30080),
            endpoint: SocketAddrV4::new(Ipv4Addr::new(10, 244, 1, 3), 8080),
        };
        let input = restore_input(&[port]).unwrap();
        let hash = chain_hash("default/web:httptcp").unwrap();
        for line in [
            format!(":KUBE-EXT-{hash} - [0:0]"),
            format!("-A KUBE-NODEPORTS -p tcp -m comment --comment \"default/web:http\" -m tcp --dport 30080 -j KUBE-EXT-{hash}"),
            format!("-A KUBE-EXT-{hash} -j KUBE-SVC-{hash}"),
        ] {
            assert!(input.lines().any(|l| l == line), "no {line:?} in {input}");
        }
        let last = input.lines().rfind(|l| l.starts_with("-A KUBE-SERVICES")).unwrap();
        assert!(last.ends_with("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS"), "{last}");
    }
}
