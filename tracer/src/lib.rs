//! podtrace: follows a pod's packets hop by hop through a Kubernetes node.
//!
//! Each module has one job: `discovery` finds the path (netlink), `attach` loads and attaches
//! the kernel programs, `decode` reads their events, `correlate` links a packet's sightings
//! across hops, `findings` says what is wrong, `report` renders the result, and `preflight`
//! checks the machine before anything is touched.

use std::fmt;

use serde::Serialize;

pub mod attach;
pub mod correlate;
pub mod decode;
pub mod discovery;
pub mod findings;
pub mod kernel_btf;
pub mod layout;
pub mod netns;
pub mod preflight;
pub mod report;
pub mod symbols;
pub mod trace;

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
