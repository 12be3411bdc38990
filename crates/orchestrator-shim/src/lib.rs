//! Ferry's seams towards the outside world: the agent's HTTP/JSON API types and job events
//! (`api`), the software-defined-network hooks that move a container's overlay identity
//! (`sdn`: VXLAN FDB entries over netlink) and the packet hold that keeps a container's inbound
//! packets queued at the destination while it is frozen (`hold`).

pub mod api;
pub mod hold;
pub mod sdn;
