//! Other TC programs, standing in for a CNI's (Cilium's, Calico's), that podtrace must leave
//! undisturbed: a packet counter and a filter that drops one UDP port. Assembled from raw BPF
//! instructions and loaded with the bpf(2) syscall, so they share nothing with podtrace's
//! own loader, then attached with `tc` (cls_bpf, direct action) from a bpffs pin.

use std::{ffi::CString, os::fd::RawFd};

use anyhow::{Context as _, Result, bail};

use crate::lab::run;

const BPF_MAP_CREATE: i64 = 0;
const BPF_MAP_LOOKUP_ELEM: i64 = 1;
const BPF_PROG_LOAD: i64 = 5;
const BPF_OBJ_PIN: i64 = 6;
const BPF_MAP_TYPE_ARRAY: u32 = 2;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

/// Where fixtures are pinned: a bpffs outside /sys, which `ip netns exec` remounts.
pub const PIN_DIR: &str = "/run/podtrace-fixtures";

#[repr(C)]
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn { code, regs: (src << 4) | dst, off, imm }
}

const MOV64_REG: u8 = 0xbf;
const MOV64_IMM: u8 = 0xb7;
const ADD64_IMM: u8 = 0x07;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
const JEQ_IMM: u8 = 0x15;
const JNE_IMM: u8 = 0x55;
const LDX_B: u8 = 0x71;
const LDX_H: u8 = 0x69;
const LDX_W: u8 = 0x61;
const ST_W: u8 = 0x62;
const ATOMIC_DW: u8 = 0xdb;
const LD_IMM64: u8 = 0x18;
const PSEUDO_MAP_FD: u8 = 1;
const HELPER_MAP_LOOKUP: i32 = 1;
const HELPER_SKB_LOAD_BYTES: i32 = 26;
const TC_ACT_UNSPEC: i32 = -1;
const TC_ACT_SHOT: i32 = 2;
/// `__sk_buff.protocol`, network order: ETH_P_IP reads as 0x0008.
const SKB_PROTOCOL: i16 = 16;
const ETH_P_IP_BE: i32 = 0x0008;

fn bpf(cmd: i64, attr: &mut [u64]) -> Result<i64> {
    // SAFETY: attr is a zero-padded bpf_attr of the size passed.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), std::mem::size_of_val(attr)) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("bpf command {cmd}"));
    }
    Ok(ret)
}

fn load(name: &str, insns: &[Insn]) -> Result<RawFd> {
    let license = CString::new("GPL")?;
    let mut log = vec![0u8; 65536];
    let mut attr = [0u64; 16];
    // bpf_attr for BPF_PROG_LOAD: prog_type, insn_cnt, insns, license, log_level, log_size, log_buf.
    attr[0] = u64::from(BPF_PROG_TYPE_SCHED_CLS) | ((insns.len() as u64) << 32);
    attr[1] = insns.as_ptr() as u64;
    attr[2] = license.as_ptr() as u64;
    attr[3] = 1 | ((log.len() as u64) << 32);
    attr[4] = log.as_mut_ptr() as u64;
    match bpf(BPF_PROG_LOAD, &mut attr) {
        Ok(fd) => Ok(fd as RawFd),
        Err(err) => {
            let log = String::from_utf8_lossy(&log);
            bail!("loading fixture {name}: {err:#}\n{}", log.trim_end_matches('\0'))
        }
    }
}

fn pin(fd: RawFd, path: &str) -> Result<()> {
    let path_c = CString::new(path)?;
    let mut attr = [0u64; 4];
    attr[0] = path_c.as_ptr() as u64;
    attr[1] = fd as u64;
    bpf(BPF_OBJ_PIN, &mut attr).with_context(|| format!("pinning {path}"))?;
    Ok(())
}

fn ensure_pin_dir() -> Result<()> {
    std::fs::create_dir_all(PIN_DIR).context("creating the fixture pin directory")?;
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    if !mounts.lines().any(|l| l.split_whitespace().nth(1) == Some(PIN_DIR)) {
        run(&["mount", "-t", "bpf", "bpf", PIN_DIR])?;
    }
    Ok(())
}

/// A counter of IPv4 packets, readable with `count()`.
pub struct Counter {
    map_fd: RawFd,
    pub pin: String,
}

impl Counter {
    pub fn load(name: &str) -> Result<Self> {
        ensure_pin_dir()?;
        let mut attr = [0u64; 8];
        // map_type, key_size, value_size, max_entries
        attr[0] = u64::from(BPF_MAP_TYPE_ARRAY) | (4 << 32);
        attr[1] = 8 | (1 << 32);
        let map_fd = bpf(BPF_MAP_CREATE, &mut attr).context("creating the counter map")? as RawFd;
        let program = [
            insn(LDX_W, 2, 1, SKB_PROTOCOL, 0),
            insn(JNE_IMM, 2, 0, 9, ETH_P_IP_BE),
            insn(ST_W, 10, 0, -4, 0),
            insn(MOV64_REG, 2, 10, 0, 0),
            insn(ADD64_IMM, 2, 0, 0, -4),
            insn(LD_IMM64, 1, PSEUDO_MAP_FD, 0, map_fd),
            insn(0, 0, 0, 0, 0),
            insn(CALL, 0, 0, 0, HELPER_MAP_LOOKUP),
            insn(JEQ_IMM, 0, 0, 2, 0),
            insn(MOV64_IMM, 1, 0, 0, 1),
            insn(ATOMIC_DW, 0, 1, 0, 0),
            insn(MOV64_IMM, 0, 0, 0, TC_ACT_UNSPEC),
            insn(EXIT, 0, 0, 0, 0),
        ];
        let fd = load("counter", &program)?;
        let pin = format!("{PIN_DIR}/{name}");
        let _ = std::fs::remove_file(&pin);
        pin_and_close(fd, &pin)?;
        Ok(Self { map_fd, pin })
    }

    pub fn count(&self) -> Result<u64> {
        let key = 0u32;
        let mut value = 0u64;
        let mut attr = [0u64; 4];
        attr[0] = self.map_fd as u64;
        attr[1] = &key as *const u32 as u64;
        attr[2] = &mut value as *mut u64 as u64;
        bpf(BPF_MAP_LOOKUP_ELEM, &mut attr).context("reading the counter")?;
        Ok(value)
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pin);
        // SAFETY: our own fd.
        unsafe { libc::close(self.map_fd) };
    }
}

/// Drops IPv4 UDP packets to `port` (Ethernet frames without IP options).
pub struct PortDropper {
    pub pin: String,
}

impl PortDropper {
    pub fn load(name: &str, port: u16) -> Result<Self> {
        ensure_pin_dir()?;
        let port_as_read = i32::from(u16::from_ne_bytes(port.to_be_bytes()));
        let load_bytes = |offset: i32, len: i32| {
            [
                insn(MOV64_REG, 1, 6, 0, 0),
                insn(MOV64_IMM, 2, 0, 0, offset),
                insn(MOV64_REG, 3, 10, 0, 0),
                insn(ADD64_IMM, 3, 0, 0, -8),
                insn(MOV64_IMM, 4, 0, 0, len),
                insn(CALL, 0, 0, 0, HELPER_SKB_LOAD_BYTES),
            ]
        };
        let mut program = vec![insn(MOV64_REG, 6, 1, 0, 0)];
        // IP protocol byte: 14 (Ethernet) + 9.
        program.extend(load_bytes(23, 1));
        program.push(insn(JNE_IMM, 0, 0, 13, 0));
        program.push(insn(LDX_B, 0, 10, -8, 0));
        program.push(insn(JNE_IMM, 0, 0, 11, 17));
        // UDP destination port: 14 + 20 + 2.
        program.extend(load_bytes(36, 2));
        program.push(insn(JNE_IMM, 0, 0, 4, 0));
        program.push(insn(LDX_H, 0, 10, -8, 0));
        program.push(insn(JNE_IMM, 0, 0, 2, port_as_read));
        program.push(insn(MOV64_IMM, 0, 0, 0, TC_ACT_SHOT));
        program.push(insn(EXIT, 0, 0, 0, 0));
        program.push(insn(MOV64_IMM, 0, 0, 0, TC_ACT_UNSPEC));
        program.push(insn(EXIT, 0, 0, 0, 0));
        let fd = load("port-dropper", &program)?;
        let pin = format!("{PIN_DIR}/{name}");
        let _ = std::fs::remove_file(&pin);
        pin_and_close(fd, &pin)?;
        Ok(Self { pin })
    }
}

impl Drop for PortDropper {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.pin);
    }
}

fn pin_and_close(fd: RawFd, path: &str) -> Result<()> {
    let pinned = pin(fd, path);
    // SAFETY: our own fd; the pin keeps the program alive.
    unsafe { libc::close(fd) };
    pinned
}

/// `tc filter add dev IF DIR pref N bpf da pinned PIN` in `ns`.
pub fn attach(ns: &str, ifname: &str, direction: &str, pref: u16, pin: &str) -> Result<()> {
    let _ = run(&["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", ifname, "clsact"]);
    run(&[
        "ip",
        "netns",
        "exec",
        ns,
        "tc",
        "filter",
        "add",
        "dev",
        ifname,
        direction,
        "pref",
        &pref.to_string(),
        "bpf",
        "da",
        "pinned",
        pin,
    ])
    .map(drop)
}
