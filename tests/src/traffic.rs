//! Bounded, deterministic traffic between lab pods. Every client has a timeout, and only
//! addresses inside the lab's own namespaces are ever targeted.

use std::{
    io::{BufRead as _, BufReader},
    net::{IpAddr, Ipv4Addr},
    process::{Child, Command, Output, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::lab::KUBERNETES_SERVICE_NAME;

/// `ping -c count -s size` from a namespace; returns ping's output whether or not replies came.
pub fn ping(ns: &str, dst: impl Into<IpAddr>, count: u32, size: u32) -> Result<Output> {
    let dst: IpAddr = dst.into();
    Command::new("ip")
        .args(["netns", "exec", ns, "ping", "-n", "-c", &count.to_string(), "-s", &size.to_string()])
        .args(["-i", "0.2", "-W", "1", &dst.to_string()])
        .output()
        .context("running ping")
}

/// Received-reply count from ping's summary line.
pub fn ping_received(output: &Output) -> u32 {
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find(|line| line.contains("received"))
        .and_then(|line| line.split(',').nth(1))
        .and_then(|part| part.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// A server process in a pod that is killed when dropped.
pub struct Server {
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A tcpdump on `ifname` in `ns` that puts the interface in promiscuous mode (no `-p`), as a
/// user debugging beside podtrace would, discarding what it captures; killed when dropped.
pub fn promiscuous_capture(ns: &str, ifname: &str) -> Result<Server> {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "tcpdump", "-n", "-i", ifname, "-w", "/dev/null"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting tcpdump")?;
    let stderr = child.stderr.take().context("tcpdump stderr")?;
    let mut line = String::new();
    BufReader::new(stderr).read_line(&mut line).context("waiting for tcpdump")?;
    if !line.contains("listening on") {
        let _ = child.kill();
        bail!("tcpdump on {ifname} in {ns} did not start: {line:?}");
    }
    Ok(Server { child })
}

fn python(ns: &str, script: &str, args: &[String]) -> Result<Command> {
    let mut command = Command::new("ip");
    command.args(["netns", "exec", ns, "python3", "-c", script]).args(args);
    Ok(command)
}

/// Starts a server script and waits for its "ready" line.
fn start_server(ns: &str, script: &str, args: &[String]) -> Result<Server> {
    let mut child = python(ns, script, args)?
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting a server")?;
    let stdout = child.stdout.take().context("server stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).context("waiting for the server")?;
    if line.trim() != "ready" {
        let _ = child.kill();
        bail!("server did not start: {line:?}");
    }
    Ok(Server { child })
}

const TCP_SINK: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((host, port)); s.listen(8)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.settimeout(30)
    total = 0
    try:
        while True:
            b = c.recv(65536)
            if not b: break
            total += len(b)
        c.sendall(str(total).encode())
    except OSError:
        pass
    c.close()
"#;

const TCP_SEND: &str = r#"
import socket, sys
host, port, size, chunk, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
s = socket.create_connection((host, port), timeout=timeout)
sent = 0
while sent < size:
    n = min(chunk, size - sent); s.sendall(b"x" * n); sent += n
s.shutdown(socket.SHUT_WR)
print(s.recv(64).decode())
"#;

/// Accepts connections, reads the first bytes and closes each abortively (SO_LINGER 0), so the
/// kernel resets it: a server that drops its clients mid-connection.
const TCP_RESETTER: &str = r#"
import socket, struct, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(8)
print("ready", flush=True)
while True:
    c, _ = s.accept(); c.settimeout(5)
    try:
        c.recv(64)
    except OSError:
        pass
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); c.close()
"#;

/// Connects, sends a few bytes, and either waits for the server to end the connection or
/// closes it abortively itself (SO_LINGER 0): a client that gives up. Prints what happened.
const TCP_ABORT: &str = r#"
import socket, struct, sys, time
host, port, wait = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "wait"
s = socket.create_connection((host, port), timeout=3)
s.sendall(b"hello")
if wait:
    try:
        print("closed" if s.recv(64) == b"" else "data")
    except ConnectionResetError:
        print("reset")
else:
    time.sleep(0.2)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)); s.close()
    print("aborted")
"#;

const UDP_ECHO: &str = r#"
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM); s.bind((host, port))
print("ready", flush=True)
while True:
    b, a = s.recvfrom(65536); s.sendto(b, a)
"#;

/// With "connect", the socket is connected, as resolvers' are: the kernel then delivers it
/// only datagrams from the address it sent to.
const UDP_SEND: &str = r#"
import socket, sys, time
host, port, count, size, connect = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5] == "connect"
s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(1.0)
if connect:
    s.connect((host, port))
got = 0
for i in range(count):
    s.sendto(bytes([i % 256]) * size, (host, port))
    try:
        s.recvfrom(65536); got += 1
    except OSError:
        pass
    time.sleep(0.05)
print(got)
"#;

/// Sends `count` A queries for `name` (one per timeout) and prints a line per answered query:
/// `answer` and the addresses of its A records.
const DNS_QUERY: &str = r#"
import socket, sys, struct
server, name, count, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.settimeout(timeout)
qname = b"".join(bytes([len(p)]) + p for p in name.encode().split(b".")) + b"\x00"
for i in range(count):
    s.sendto(struct.pack(">HHHHHH", 0x1000 + i, 0x0100, 1, 0, 0, 0) + qname + b"\x00\x01\x00\x01", (server, 53))
    try:
        r, _ = s.recvfrom(512)
    except OSError:
        continue
    if r[:2] != struct.pack(">H", 0x1000 + i):
        continue
    addresses, at = [], 12 + len(qname) + 4
    for _ in range(struct.unpack(">H", r[6:8])[0]):
        # The owner name: a compression pointer (2 bytes) or labels.
        if r[at] & 0xc0:
            at += 2
        else:
            while r[at]: at += r[at] + 1
            at += 1
        rtype, _, _, length = struct.unpack(">HHIH", r[at:at + 10]); at += 10
        if rtype == 1 and length == 4:
            addresses.append(socket.inet_ntoa(r[at:at + 4]))
        at += length
    print("answer", *addresses, flush=True)
"#;

/// Turns TSO, GSO and GRO on or off on `ifname` in `ns`: on, TCP hands the stack buffers of
/// many segments, as on a real node.
pub fn set_offloads(ns: &str, ifname: &str, on: bool) -> Result<()> {
    let state = if on { "on" } else { "off" };
    let output = Command::new("ip")
        .args(["netns", "exec", ns, "ethtool", "-K", ifname, "tso", state, "gso", state, "gro", state])
        .output()
        .context("running ethtool")?;
    if !output.status.success() {
        bail!("ethtool -K {ifname} offloads {state} in {ns}: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

/// A TCP server on every IPv4 address of the namespace.
pub fn tcp_sink(ns: &str, port: u16) -> Result<Server> {
    tcp_sink_on(ns, Ipv4Addr::UNSPECIFIED.into(), port)
}

/// A TCP server on `address` (`::` for every IPv6 address).
pub fn tcp_sink_on(ns: &str, address: IpAddr, port: u16) -> Result<Server> {
    start_server(ns, TCP_SINK, &[address.to_string(), port.to_string()])
}

/// Sends `bytes` in `chunk`-byte writes; returns the byte count the server acknowledged.
pub fn tcp_send(ns: &str, dst: impl Into<IpAddr>, port: u16, bytes: usize, chunk: usize, timeout: Duration) -> Result<Output> {
    let dst: IpAddr = dst.into();
    let args = [dst.to_string(), port.to_string(), bytes.to_string(), chunk.to_string(), timeout.as_secs_f64().to_string()];
    python(ns, TCP_SEND, &args)?.output().context("running the TCP client")
}

/// A server that resets every connection after reading its first bytes.
pub fn tcp_resetter(ns: &str, port: u16) -> Result<Server> {
    start_server(ns, TCP_RESETTER, &[port.to_string()])
}

/// Connects and sends a few bytes; then, with `wait`, waits for the server to end the
/// connection ("reset" when it reset it), else resets it itself ("aborted").
pub fn tcp_abort(ns: &str, dst: Ipv4Addr, port: u16, wait: bool) -> Result<String> {
    let args = [dst.to_string(), port.to_string(), if wait { "wait" } else { "abort" }.to_string()];
    let output = python(ns, TCP_ABORT, &args)?.output().context("running the aborting TCP client")?;
    if !output.status.success() {
        bail!("the aborting TCP client failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
}

/// A UDP echo server on every IPv4 address of the namespace.
pub fn udp_echo(ns: &str, port: u16) -> Result<Server> {
    udp_echo_on(ns, Ipv4Addr::UNSPECIFIED.into(), port)
}

/// A UDP echo server on `address` (`::` for every IPv6 address).
pub fn udp_echo_on(ns: &str, address: IpAddr, port: u16) -> Result<Server> {
    start_server(ns, UDP_ECHO, &[address.to_string(), port.to_string()])
}

/// Sends `count` datagrams of `size` bytes, each waiting up to 1 s for its echo; returns how
/// many echoes came back.
pub fn udp_send(ns: &str, dst: impl Into<IpAddr>, port: u16, count: u32, size: usize) -> Result<u32> {
    udp_client(ns, dst.into(), port, count, size, "unconnected")
}

/// `udp_send` from a connected socket, which takes echoes only from `dst` itself.
pub fn udp_send_connected(ns: &str, dst: impl Into<IpAddr>, port: u16, count: u32, size: usize) -> Result<u32> {
    udp_client(ns, dst.into(), port, count, size, "connect")
}

fn udp_client(ns: &str, dst: IpAddr, port: u16, count: u32, size: usize, mode: &str) -> Result<u32> {
    let args = [dst.to_string(), port.to_string(), count.to_string(), size.to_string(), mode.to_string()];
    let output = python(ns, UDP_SEND, &args)?.output().context("running the UDP client")?;
    String::from_utf8_lossy(&output.stdout).trim().parse().context("parsing the UDP client's count")
}

/// Sends `count` A queries for the `kubernetes` Service's name to `server`, each waiting up to
/// `timeout`; returns the A records of each answered query.
fn dns_answers(ns: &str, server: Ipv4Addr, count: u32, timeout: Duration) -> Result<Vec<Vec<Ipv4Addr>>> {
    let args = [server.to_string(), KUBERNETES_SERVICE_NAME.to_string(), count.to_string(), timeout.as_secs_f64().to_string()];
    let output = python(ns, DNS_QUERY, &args)?.output().context("running the DNS client")?;
    if !output.status.success() {
        bail!("the DNS client failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr).trim());
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| {
            line.split_whitespace()
                .skip(1)
                .map(|address| address.parse().with_context(|| format!("parsing the DNS answer {line:?}")))
                .collect()
        })
        .collect()
}

/// Sends `count` DNS queries to `server`; returns how many were answered.
pub fn dns_query(ns: &str, server: Ipv4Addr, count: u32, timeout: Duration) -> Result<u32> {
    Ok(dns_answers(ns, server, count, timeout)?.len() as u32)
}

/// Resolves the `kubernetes` Service's name through `server`, as a pod's resolver does with
/// cluster DNS; returns the A records of the answer, and fails when no answer came.
pub fn dns_lookup(ns: &str, server: Ipv4Addr, timeout: Duration) -> Result<Vec<Ipv4Addr>> {
    dns_answers(ns, server, 1, timeout)?.into_iter().next().with_context(|| format!("no answer from {server} within {timeout:?}"))
}
