//! podtrace: follows a pod's packets hop by hop through a Kubernetes node.
//!
//! `follow` is the pipeline, one folder per stage: `kernel` reads the running kernel's
//! layouts, `node` discovers the pod's path, `probes` loads and attaches the kernel programs,
//! `events` decodes and correlates what they report, `diagnosis` turns it into findings, and
//! `report` renders the result. `preflight` checks the machine before anything is touched.

use std::fmt;

use serde::Serialize;

/// `eprintln!` that never panics. After SIGHUP (a dropped SSH or `kubectl exec` session) the
/// terminal is gone and writes to it fail; a trace must still detach and end cleanly.
#[macro_export]
macro_rules! note {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

pub mod diagnosis;
pub mod events;
pub mod follow;
pub mod kernel;
pub mod node;
pub mod preflight;
pub mod probes;
pub mod report;

/// A TC hook.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

impl Direction {
    pub fn opposite(self) -> Self {
        match self {
            Self::Ingress => Self::Egress,
            Self::Egress => Self::Ingress,
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Ingress => "ingress",
            Self::Egress => "egress",
        })
    }
}
