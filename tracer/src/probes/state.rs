//! What podtrace leaves on a node while it runs, so that several runs (several people
//! debugging one node) never undo each other's work, and what a killed run left can be told
//! from what a live one still uses.
//!
//! Under `/run/podtrace` (a hostPath in the debug pod, so runs in pods and on the node see
//! one another):
//! - `lock`: held exclusively while a run sweeps, attaches or detaches, so those steps of two
//!   runs never interleave;
//! - `owner-<pid>-<start time>`: one per run, locked for the run's whole life. The kernel
//!   releases the lock when the process dies, even by SIGKILL, so a lock that can be taken
//!   means the owner is gone (and a reused pid has another start time);
//! - `filters-<netns inode>`: each cls_bpf filter a run attached, with its owner;
//! - `clsact-<netns inode>`: the clsact qdiscs podtrace created, removed by whichever run
//!   finds them unused. Files are per network namespace because ifindexes and names repeat
//!   across namespaces.

use std::{
    collections::BTreeSet,
    fs::{self, File, OpenOptions, TryLockError},
    io::ErrorKind,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};

use crate::node::netns;

const STATE_DIR: &str = "/run/podtrace";

fn state_dir() -> Result<&'static Path> {
    let dir = Path::new(STATE_DIR);
    fs::create_dir_all(dir).with_context(|| format!("creating {STATE_DIR}"))?;
    Ok(dir)
}

/// The exclusive lock on podtrace's state; released when dropped.
pub struct StateLock {
    _file: File,
}

impl StateLock {
    pub fn acquire() -> Result<Self> {
        let path = state_dir()?.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        file.lock().with_context(|| format!("locking {}", path.display()))?;
        Ok(Self { _file: file })
    }
}

/// This run, as the owner of what it attaches: its lock file stays locked while it lives.
pub struct Owner {
    pub id: String,
    path: PathBuf,
    _lock: File,
}

impl Owner {
    pub fn register() -> Result<Self> {
        let id = format!("{}-{}", std::process::id(), own_start_time()?);
        let path = state_dir()?.join(format!("owner-{id}"));
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        match file.try_lock() {
            Ok(()) => Ok(Self { id, path, _lock: file }),
            Err(TryLockError::WouldBlock) => bail!("{} is locked by another process", path.display()),
            Err(TryLockError::Error(err)) => Err(err).with_context(|| format!("locking {}", path.display())),
        }
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// Whether the run `id` is still alive; removes the lock file of a dead one.
pub fn owner_alive(id: &str) -> bool {
    let Ok(dir) = state_dir() else { return false };
    let path = dir.join(format!("owner-{id}"));
    let Ok(file) = File::open(&path) else { return false };
    match file.try_lock() {
        Err(TryLockError::WouldBlock) => true,
        _ => {
            let _ = fs::remove_file(&path);
            false
        }
    }
}

/// The runs alive now; owner files of runs that are gone (killed before they could remove
/// their own) are removed on the way.
pub fn live_owners() -> Result<Vec<String>> {
    let mut alive = Vec::new();
    for entry in fs::read_dir(state_dir()?).context("listing the state directory")?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(id) = name.strip_prefix("owner-")
            && owner_alive(id)
        {
            alive.push(id.to_string());
        }
    }
    Ok(alive)
}

/// The process start time in clock ticks since boot, which tells a reused pid from the run
/// that had it.
fn own_start_time() -> Result<u64> {
    start_time(&fs::read_to_string("/proc/self/stat").context("reading /proc/self/stat")?)
}

/// Field 22 of a `/proc/<pid>/stat` line.
fn start_time(stat: &str) -> Result<u64> {
    // The command name (field 2) may hold spaces and parentheses: count from its end.
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).context("unexpected /proc/<pid>/stat")?;
    after_name.split_whitespace().nth(19).context("no start time in /proc/<pid>/stat")?.parse().context("parsing the start time")
}

/// A cls_bpf filter attached by a run.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct FilterRecord {
    pub owner: String,
    pub ifindex: u32,
    pub ifname: String,
    pub ingress: bool,
    pub priority: u16,
    pub handle: u32,
}

impl FilterRecord {
    fn line(&self) -> String {
        let direction = if self.ingress { "ingress" } else { "egress" };
        format!("{} {} {} {direction} {} {}\n", self.owner, self.ifindex, self.ifname, self.priority, self.handle)
    }

    fn parse(line: &str) -> Option<Self> {
        let words: Vec<&str> = line.split_whitespace().collect();
        let [owner, ifindex, ifname, direction, priority, handle] = words.as_slice() else { return None };
        Some(Self {
            owner: owner.to_string(),
            ifindex: ifindex.parse().ok()?,
            ifname: ifname.to_string(),
            ingress: *direction == "ingress",
            priority: priority.parse().ok()?,
            handle: handle.parse().ok()?,
        })
    }
}

/// A per-namespace set of lines; read and written under the state lock.
struct Records {
    path: PathBuf,
}

impl Records {
    fn of(kind: &str) -> Result<Self> {
        Ok(Self { path: state_dir()?.join(format!("{kind}-{}", netns::own_inode()?)) })
    }

    fn read(&self) -> Result<BTreeSet<String>> {
        match fs::read_to_string(&self.path) {
            Ok(text) => Ok(text.lines().filter(|line| !line.is_empty()).map(str::to_owned).collect()),
            Err(err) if err.kind() == ErrorKind::NotFound => Ok(BTreeSet::new()),
            Err(err) => Err(err).with_context(|| format!("reading {}", self.path.display())),
        }
    }

    fn write(&self, lines: &BTreeSet<String>) -> Result<()> {
        if lines.is_empty() {
            return match fs::remove_file(&self.path) {
                Err(err) if err.kind() != ErrorKind::NotFound => Err(err).with_context(|| format!("removing {}", self.path.display())),
                _ => Ok(()),
            };
        }
        let text: String = lines.iter().map(|line| format!("{line}\n")).collect();
        fs::write(&self.path, text).with_context(|| format!("writing {}", self.path.display()))
    }
}

pub fn recorded_filters() -> Result<Vec<FilterRecord>> {
    Ok(Records::of("filters")?.read()?.iter().filter_map(|line| FilterRecord::parse(line)).collect())
}

pub fn record_filter(record: &FilterRecord) -> Result<()> {
    let records = Records::of("filters")?;
    let mut lines = records.read()?;
    lines.insert(record.line().trim_end().to_string());
    records.write(&lines)
}

pub fn forget_filters(removed: &[FilterRecord]) -> Result<()> {
    let records = Records::of("filters")?;
    let mut lines = records.read()?;
    for record in removed {
        lines.remove(record.line().trim_end());
    }
    records.write(&lines)
}

pub fn recorded_clsact() -> Result<BTreeSet<String>> {
    Records::of("clsact")?.read()
}

pub fn record_clsact(ifname: &str) -> Result<()> {
    let records = Records::of("clsact")?;
    let mut lines = records.read()?;
    lines.insert(ifname.to_string());
    records.write(&lines)
}

pub fn forget_clsact(removed: &BTreeSet<String>) -> Result<()> {
    let records = Records::of("clsact")?;
    let mut lines = records.read()?;
    lines.retain(|ifname| !removed.contains(ifname));
    records.write(&lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filter_records_round_trip() {
        let record =
            FilterRecord { owner: "123-456".into(), ifindex: 7, ifname: "cni0".into(), ingress: false, priority: 49151, handle: 1 };
        assert_eq!(FilterRecord::parse(&record.line()), Some(record));
        assert_eq!(FilterRecord::parse("garbage line"), None);
    }

    #[test]
    fn start_time_is_read_past_a_command_name_with_spaces() {
        let stat = "4242 (a (b) c) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 12345 67 18446744073709551615";
        assert_eq!(start_time(stat).unwrap(), 987654);
        assert!(own_start_time().unwrap() > 0);
    }

    #[test]
    fn a_live_owner_is_alive_and_a_released_one_is_not() {
        let owner = Owner::register().unwrap();
        let id = owner.id.clone();
        // The lock is per open file description: another open of the file cannot take it.
        assert!(owner_alive(&id));
        drop(owner);
        assert!(!owner_alive(&id));
    }
}
