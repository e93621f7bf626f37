//! This node's side of the story, from rtnetlink: which interfaces the pod's packets cross
//! (`discovery`, into the `path` model), the routing tables and policy rules it reads per
//! address family (`routing`), bonds and their slaves (`bond`), what pod bridges do for
//! Services (`bridge`: br_netfilter and hairpin mode), the namespaces that belong to the node
//! (`netns`), and the shared netlink access (`netlink`).

pub mod bond;
pub mod bridge;
pub mod discovery;
pub mod netlink;
pub mod netns;
pub mod path;
mod routing;

pub use discovery::{PathOverrides, discover};
pub use netlink::{LinkDrops, ifindex_of, interfaces, link_drops, with_rtnetlink};
pub use path::{Hop, HopKey, HopKind, Locality, Path, PodEnd};
pub use routing::Family;
