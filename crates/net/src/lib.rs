//! Ferry's overlay network, the part of the SDN that lives on each host: the VXLAN FDB entries
//! that say which host a container's MAC lives on (`sdn`, over rtnetlink), and the packet hold
//! that keeps a container's packets queued at the destination while it is frozen (`hold`, over
//! nfnetlink_queue). The agent's API types are in `ferry-api`.

pub mod hold;
pub mod sdn;
