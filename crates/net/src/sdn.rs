//! Ferry's overlay hooks: VXLAN forwarding-database (FDB) entries programmed over a raw
//! `NETLINK_ROUTE` socket (no shelling out), and [`in_netns`], which runs a closure on a thread
//! moved into a named network namespace.
//!
//! Each host has a Linux bridge with a `nolearning` VXLAN device enslaved to it. Ferry points
//! every remote container MAC at the VTEP (IPv4 address) of the host that currently runs the
//! container ([`Fdb::set`]) and keeps one all-zero-MAC entry per remote host so broadcast and
//! unknown-unicast traffic is flooded to every host ([`Fdb::add_flood`]).
//!
//! An [`Fdb`] talks to the kernel of the network namespace of the thread that called
//! [`Fdb::open`]; it can afterwards be used from any thread.

use std::ffi::CString;
use std::fmt;
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Mutex;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub(crate) mod nl;

/// Directory where `ip netns add NAME` bind-mounts named network namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

// rtnetlink / neighbour constants (linux/rtnetlink.h, linux/neighbour.h).
const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;
const RTM_GETNEIGH: u16 = 30;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const NUD_PERMANENT: u16 = 0x80;
const NTF_SELF: u8 = 0x02;
const AF_BRIDGE: u8 = 7;
/// Size of `struct ndmsg`.
const NDMSG_LEN: usize = 12;

/// A 48-bit Ethernet MAC address.
///
/// Displays as lowercase colon-separated hex (`02:fe:0a:e8:00:0a`) and parses from the same
/// form (hex digits in either case). Serializes as that string.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Mac(pub [u8; 6]);

impl Mac {
    /// The all-zero MAC `00:00:00:00:00:00`, which a VXLAN FDB uses for flood (default) entries.
    pub const ZERO: Mac = Mac([0; 6]);

    /// Whether this is the all-zero MAC.
    pub fn is_zero(&self) -> bool {
        self.0 == [0; 6]
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mac({self})")
    }
}

/// Why a string is not a MAC address (see [`Mac`]'s `FromStr`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid MAC address {input:?}: {reason}; expected six colon-separated two-digit hex \
     octets such as 02:fe:0a:e8:00:0a"
)]
pub struct ParseMacError {
    /// The rejected input.
    pub input: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FromStr for Mac {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason: String| ParseMacError {
            input: s.to_owned(),
            reason,
        };
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(err(format!(
                "found {} colon-separated groups instead of 6",
                parts.len()
            )));
        }
        let mut out = [0u8; 6];
        for (i, (part, byte)) in parts.iter().zip(out.iter_mut()).enumerate() {
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(err(format!(
                    "group {} ({part:?}) is not two hex digits",
                    i + 1
                )));
            }
            *byte = u8::from_str_radix(part, 16)
                .map_err(|e| err(format!("group {} ({part:?}): {e}", i + 1)))?;
        }
        Ok(Mac(out))
    }
}

impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let s = String::deserialize(deserializer)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// One VXLAN FDB entry: frames for `mac` are encapsulated towards the VTEP `dst`.
///
/// A [`Mac::ZERO`] entry is a flood entry (one per remote host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FdbEntry {
    /// Destination MAC (all-zero for flood entries).
    pub mac: Mac,
    /// Remote VTEP IPv4 address.
    pub dst: Ipv4Addr,
}

/// Errors from the SDN hooks.
#[derive(Debug, thiserror::Error)]
pub enum SdnError {
    /// The named device does not exist in the caller's network namespace.
    #[error(
        "network device {dev:?} not found in this network namespace: create it first \
         (ip link add {dev} type vxlan id VNI dstport 4789 nolearning) or run Ferry inside the \
         host's network namespace"
    )]
    DeviceNotFound {
        /// The device name that was looked up.
        dev: String,
    },
    /// The device name cannot be a Linux interface name.
    #[error("invalid network device name {dev:?}: {reason}; use the name shown by `ip link`")]
    InvalidDeviceName {
        /// The rejected name.
        dev: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A netlink socket operation failed.
    #[error(
        "netlink socket {op} failed for device {dev:?}: {source}; Ferry needs CAP_NET_ADMIN \
         in the host's network namespace"
    )]
    Socket {
        /// Device the socket was used for.
        dev: String,
        /// The failing operation (`socket`, `bind`, `send`, `recv`, ...).
        op: &'static str,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The kernel answered a request with a non-zero error.
    #[error(
        "kernel rejected {request} for {what} on device {dev:?}: errno {errno} ({reason}); \
         check that {dev:?} is a VXLAN device and the values are valid"
    )]
    Kernel {
        /// The rtnetlink request (`RTM_NEWNEIGH`, ...).
        request: &'static str,
        /// The device the request was for.
        dev: String,
        /// The entry the request was about (`02:..:0a -> 10.0.0.2`, ...).
        what: String,
        /// The positive errno the kernel returned.
        errno: i32,
        /// Description of the errno, plus the kernel's extended-ACK message if any.
        reason: String,
    },
    /// The kernel sent something this module cannot parse.
    #[error(
        "malformed netlink reply for device {dev:?}: {detail}; this is a bug in Ferry or an \
         unsupported kernel, please report it"
    )]
    MalformedReply {
        /// The device the request was for.
        dev: String,
        /// What was wrong.
        detail: String,
    },
    /// A network namespace name is not a plain file name under `/run/netns`.
    #[error(
        "invalid network namespace name {name:?}: it must be a non-empty file name under \
         /run/netns without '/', NUL, '.' or '..'"
    )]
    InvalidNetnsName {
        /// The rejected name.
        name: String,
    },
    /// The named network namespace could not be opened.
    #[error(
        "cannot open network namespace {name:?} at {}: {source}; create it with `ip netns add \
         {name}`", path.display()
    )]
    NetnsOpen {
        /// The namespace name.
        name: String,
        /// The path that was opened.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `setns(2)` into the named network namespace failed.
    #[error(
        "setns(CLONE_NEWNET) into network namespace {name:?} failed: {source}; Ferry needs \
         CAP_SYS_ADMIN to enter network namespaces"
    )]
    Setns {
        /// The namespace name.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The helper thread for a network namespace could not be spawned.
    #[error(
        "cannot spawn a thread for network namespace {name:?}: {source}; check process limits"
    )]
    ThreadSpawn {
        /// The namespace name.
        name: String,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The closure run inside a network namespace panicked.
    #[error(
        "the closure run inside network namespace {name:?} panicked; see the panic message \
         above"
    )]
    ThreadPanicked {
        /// The namespace name.
        name: String,
    },
}

/// `RTM_NEWLINK` (linux/rtnetlink.h) and the size of `struct ifinfomsg`.
const RTM_NEWLINK: u16 = 16;
const IFINFOMSG_LEN: usize = 16;

/// Sets device `dev` of the calling thread's network namespace up or down (`RTM_NEWLINK`
/// changing `IFF_UP` only), in-process: in the freeze, where `ip link set` cost a fork and an
/// exec (2-4 ms).
pub fn set_link_up(dev: &str, up: bool) -> Result<(), SdnError> {
    let cname = CString::new(dev).map_err(|_| SdnError::InvalidDeviceName {
        dev: dev.to_owned(),
        reason: "it contains a NUL byte",
    })?;
    let ifindex = nix::net::if_::if_nametoindex(cname.as_c_str()).unwrap_or(0);
    if ifindex == 0 {
        return Err(SdnError::DeviceNotFound {
            dev: dev.to_owned(),
        });
    }
    let socket_err = |op, source| SdnError::Socket {
        dev: dev.to_owned(),
        op,
        source,
    };
    let sock = nl::Socket::open(nix::sys::socket::SockProtocol::NetlinkRoute)
        .map_err(|(op, e)| socket_err(op, e))?;
    sock.enable_ext_ack();
    let mut ifi = [0u8; IFINFOMSG_LEN];
    ifi[0] = libc::AF_UNSPEC as u8;
    ifi[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
    let flag = libc::IFF_UP as u32;
    ifi[8..12].copy_from_slice(&(if up { flag } else { 0 }).to_ne_bytes());
    ifi[12..16].copy_from_slice(&flag.to_ne_bytes());
    let seq = 1;
    let msg = nl::MsgBuilder::new(RTM_NEWLINK, nl::NLM_F_REQUEST | nl::NLM_F_ACK, seq)
        .raw(&ifi)
        .finish();
    sock.send(&msg).map_err(|e| socket_err("send", e))?;
    let mut buf = vec![0u8; 8 * 1024];
    loop {
        let n = sock
            .recv(&mut buf, false)
            .map_err(|e| socket_err("recv", e))?;
        let msgs = nl::messages(&buf[..n]).map_err(|detail| SdnError::MalformedReply {
            dev: dev.to_owned(),
            detail,
        })?;
        for m in msgs {
            if m.msg_type != nl::NLMSG_ERROR || m.seq != seq {
                continue;
            }
            let err =
                nl::parse_error(m.flags, m.payload).ok_or_else(|| SdnError::MalformedReply {
                    dev: dev.to_owned(),
                    detail: "short NLMSG_ERROR for RTM_NEWLINK".into(),
                })?;
            return match err.errno {
                0 => Ok(()),
                errno => Err(SdnError::Kernel {
                    request: "RTM_NEWLINK",
                    dev: dev.to_owned(),
                    what: format!("link {}", if up { "up" } else { "down" }),
                    errno,
                    reason: err.reason(),
                }),
            };
        }
    }
}

/// Path of the named network namespace under [`NETNS_RUN_DIR`], after validating the name.
pub fn netns_path(name: &str) -> Result<PathBuf, SdnError> {
    if name.is_empty() || name == "." || name == ".." || name.contains('/') || name.contains('\0') {
        return Err(SdnError::InvalidNetnsName {
            name: name.to_owned(),
        });
    }
    Ok(PathBuf::from(NETNS_RUN_DIR).join(name))
}

/// Runs `f` on a fresh thread moved (`setns(CLONE_NEWNET)`) into the network namespace
/// `/run/netns/NAME` and returns its result.
///
/// The calling thread's namespace is untouched. Sockets created inside `f` stay bound to the
/// namespace and may be returned and used from any thread. Blocks until `f` returns.
pub fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T, SdnError> {
    let path = netns_path(name)?;
    let file = File::open(&path).map_err(|source| SdnError::NetnsOpen {
        name: name.to_owned(),
        path: path.clone(),
        source,
    })?;
    std::thread::scope(|scope| {
        let handle = std::thread::Builder::new()
            .name(format!("netns-{name}"))
            .spawn_scoped(scope, move || {
                // Only this (new) thread changes namespace.
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                    SdnError::Setns {
                        name: name.to_owned(),
                        source: e.into(),
                    }
                })?;
                drop(file);
                tracing::trace!(netns = name, "thread entered network namespace");
                Ok(f())
            })
            .map_err(|source| SdnError::ThreadSpawn {
                name: name.to_owned(),
                source,
            })?;
        handle.join().map_err(|_| SdnError::ThreadPanicked {
            name: name.to_owned(),
        })?
    })
}

/// State behind the [`Fdb`] mutex: the socket and the next sequence number.
struct Conn {
    sock: nl::Socket,
    seq: u32,
}

/// The forwarding database of one VXLAN device, programmed over rtnetlink.
///
/// Bound to the network namespace of the thread that called [`Fdb::open`]. Safe to share
/// between threads; requests are serialized.
pub struct Fdb {
    dev: String,
    ifindex: u32,
    conn: Mutex<Conn>,
}

impl fmt::Debug for Fdb {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Fdb")
            .field("dev", &self.dev)
            .field("ifindex", &self.ifindex)
            .finish_non_exhaustive()
    }
}

/// How an error from the kernel is treated by [`Fdb::request`].
#[derive(Clone, Copy)]
enum Tolerate {
    Nothing,
    Errno(i32),
}

impl Fdb {
    /// Opens the FDB of VXLAN device `vxlan_dev` in the calling thread's network namespace.
    ///
    /// Fails with [`SdnError::DeviceNotFound`] if no such device exists there.
    pub fn open(vxlan_dev: &str) -> Result<Self, SdnError> {
        let invalid = |reason| SdnError::InvalidDeviceName {
            dev: vxlan_dev.to_owned(),
            reason,
        };
        if vxlan_dev.is_empty() {
            return Err(invalid("it is empty"));
        }
        if vxlan_dev.len() >= libc::IFNAMSIZ {
            return Err(invalid("it is longer than 15 bytes"));
        }
        let cname = CString::new(vxlan_dev).map_err(|_| invalid("it contains a NUL byte"))?;
        let ifindex = nix::net::if_::if_nametoindex(cname.as_c_str()).unwrap_or(0);
        if ifindex == 0 {
            return Err(SdnError::DeviceNotFound {
                dev: vxlan_dev.to_owned(),
            });
        }
        let sock = nl::Socket::open(nix::sys::socket::SockProtocol::NetlinkRoute).map_err(
            |(op, source)| SdnError::Socket {
                dev: vxlan_dev.to_owned(),
                op,
                source,
            },
        )?;
        sock.enable_ext_ack();
        tracing::debug!(dev = vxlan_dev, ifindex, "opened VXLAN FDB");
        Ok(Fdb {
            dev: vxlan_dev.to_owned(),
            ifindex,
            conn: Mutex::new(Conn { sock, seq: 1 }),
        })
    }

    /// The device name given to [`Fdb::open`].
    pub fn device(&self) -> &str {
        &self.dev
    }

    /// The device's interface index, resolved at [`Fdb::open`].
    pub fn ifindex(&self) -> u32 {
        self.ifindex
    }

    /// Points `mac` at the VTEP `dst`, replacing any existing entry for `mac`
    /// (`RTM_NEWNEIGH` with `NLM_F_CREATE | NLM_F_REPLACE`).
    pub fn set(&self, mac: Mac, dst: Ipv4Addr) -> Result<(), SdnError> {
        self.request(
            "RTM_NEWNEIGH",
            RTM_NEWNEIGH,
            nl::NLM_F_CREATE | nl::NLM_F_REPLACE,
            mac,
            Some(dst),
            Tolerate::Nothing,
        )?;
        tracing::info!(dev = %self.dev, %mac, %dst, "FDB entry set");
        Ok(())
    }

    /// Removes every entry for `mac` (all its destinations). Succeeds if there is none.
    pub fn remove(&self, mac: Mac) -> Result<(), SdnError> {
        let existed = self.delete(mac, None)?;
        tracing::info!(dev = %self.dev, %mac, existed, "FDB entry removed");
        Ok(())
    }

    /// `RTM_DELNEIGH` of `mac` (towards `dst` only, if given); whether it existed.
    fn delete(&self, mac: Mac, dst: Option<Ipv4Addr>) -> Result<bool, SdnError> {
        self.request(
            "RTM_DELNEIGH",
            RTM_DELNEIGH,
            0,
            mac,
            dst,
            Tolerate::Errno(libc::ENOENT),
        )
    }

    /// Appends an all-zero-MAC flood entry towards the VTEP `dst`
    /// (`RTM_NEWNEIGH` with `NLM_F_CREATE | NLM_F_APPEND`). Succeeds if it already exists.
    pub fn add_flood(&self, dst: Ipv4Addr) -> Result<(), SdnError> {
        let created = self.request(
            "RTM_NEWNEIGH",
            RTM_NEWNEIGH,
            nl::NLM_F_CREATE | nl::NLM_F_APPEND,
            Mac::ZERO,
            Some(dst),
            Tolerate::Errno(libc::EEXIST),
        )?;
        tracing::info!(dev = %self.dev, %dst, created, "FDB flood entry added");
        Ok(())
    }

    /// Removes the all-zero-MAC flood entry towards `dst` only, leaving the other remote
    /// hosts' flood entries alone. Succeeds if there is none.
    pub fn remove_flood(&self, dst: Ipv4Addr) -> Result<(), SdnError> {
        let existed = self.delete(Mac::ZERO, Some(dst))?;
        tracing::info!(dev = %self.dev, %dst, existed, "FDB flood entry removed");
        Ok(())
    }

    /// Lists this device's entries that have an IPv4 destination, in kernel order
    /// (a MAC with several destinations, such as the flood MAC, appears once per destination).
    pub fn entries(&self) -> Result<Vec<FdbEntry>, SdnError> {
        const ATTEMPTS: usize = 3;
        let mut last_interrupted = false;
        for _ in 0..ATTEMPTS {
            let (entries, interrupted) = self.dump()?;
            if !interrupted {
                return Ok(entries);
            }
            last_interrupted = interrupted;
            tracing::debug!(dev = %self.dev, "FDB dump interrupted by a concurrent change; retrying");
        }
        Err(SdnError::MalformedReply {
            dev: self.dev.clone(),
            detail: format!(
                "neighbour dump was interrupted (NLM_F_DUMP_INTR={last_interrupted}) {ATTEMPTS} \
                 times in a row by concurrent FDB changes; retry later"
            ),
        })
    }

    fn ndmsg(&self) -> [u8; NDMSG_LEN] {
        let mut nd = [0u8; NDMSG_LEN];
        nd[0] = AF_BRIDGE;
        nd[4..8].copy_from_slice(&self.ifindex.to_ne_bytes());
        nd[8..10].copy_from_slice(&NUD_PERMANENT.to_ne_bytes());
        nd[10] = NTF_SELF;
        nd[11] = 0; // ndm_type
        nd
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Conn> {
        // A poisoned lock only means another thread panicked mid-request; the socket is still
        // usable because every request matches its ACK by sequence number.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn socket_err(&self, op: &'static str) -> impl FnOnce(io::Error) -> SdnError + '_ {
        move |source| SdnError::Socket {
            dev: self.dev.clone(),
            op,
            source,
        }
    }

    fn malformed(&self, detail: String) -> SdnError {
        SdnError::MalformedReply {
            dev: self.dev.clone(),
            detail,
        }
    }

    /// Sends one neighbour request with `NLM_F_REQUEST | NLM_F_ACK | extra_flags` and waits for
    /// its ACK. Returns `true` on success, `false` if the tolerated errno came back.
    fn request(
        &self,
        name: &'static str,
        msg_type: u16,
        extra_flags: u16,
        mac: Mac,
        dst: Option<Ipv4Addr>,
        tolerate: Tolerate,
    ) -> Result<bool, SdnError> {
        let what = match dst {
            Some(dst) => format!("{mac} -> {dst}"),
            None => mac.to_string(),
        };
        let mut conn = self.lock();
        conn.seq = conn.seq.wrapping_add(1);
        let seq = conn.seq;
        let mut msg = nl::MsgBuilder::new(
            msg_type,
            nl::NLM_F_REQUEST | nl::NLM_F_ACK | extra_flags,
            seq,
        )
        .raw(&self.ndmsg())
        .attr(NDA_LLADDR, &mac.0);
        if let Some(dst) = dst {
            msg = msg.attr(NDA_DST, &dst.octets());
        }
        conn.sock
            .send(&msg.finish())
            .map_err(self.socket_err("send"))?;
        self.answers(&conn, 16 * 1024, |m| {
            if m.msg_type != nl::NLMSG_ERROR || m.seq != seq {
                return None; // stale reply of an earlier, abandoned request
            }
            let Some(err) = nl::parse_error(m.flags, m.payload) else {
                return Some(Err(self.malformed(format!("short NLMSG_ERROR for {name}"))));
            };
            Some(match err.errno {
                0 => Ok(true),
                e if matches!(tolerate, Tolerate::Errno(t) if t == e) => {
                    tracing::debug!(dev = %self.dev, request = name, what = %what, errno = e, "tolerated kernel error");
                    Ok(false)
                }
                errno => Err(SdnError::Kernel {
                    request: name,
                    dev: self.dev.clone(),
                    what: what.clone(),
                    errno,
                    reason: err.reason(),
                }),
            })
        })
    }

    /// Receives the kernel's answers on `conn` (datagrams of at most `buf_len` bytes) until
    /// `each` settles the request with one of their messages.
    fn answers<R>(
        &self,
        conn: &Conn,
        buf_len: usize,
        mut each: impl FnMut(&nl::Msg<'_>) -> Option<Result<R, SdnError>>,
    ) -> Result<R, SdnError> {
        let mut buf = vec![0u8; buf_len];
        loop {
            let n = conn
                .sock
                .recv(&mut buf, false)
                .map_err(self.socket_err("recv"))?;
            for m in nl::messages(&buf[..n]).map_err(|d| self.malformed(d))? {
                if let Some(r) = each(&m) {
                    return r;
                }
            }
        }
    }

    /// One `RTM_GETNEIGH` dump; returns the entries and whether the dump was interrupted.
    fn dump(&self) -> Result<(Vec<FdbEntry>, bool), SdnError> {
        let mut conn = self.lock();
        conn.seq = conn.seq.wrapping_add(1);
        let seq = conn.seq;
        let mut nd = [0u8; NDMSG_LEN];
        nd[0] = AF_BRIDGE;
        let msg = nl::MsgBuilder::new(RTM_GETNEIGH, nl::NLM_F_REQUEST | nl::NLM_F_DUMP, seq)
            .raw(&nd)
            .finish();
        conn.sock.send(&msg).map_err(self.socket_err("send"))?;
        let mut entries = Vec::new();
        let mut interrupted = false;
        self.answers(&conn, 64 * 1024, |m| {
            if m.seq != seq {
                return None;
            }
            if m.flags & nl::NLM_F_DUMP_INTR != 0 {
                interrupted = true;
            }
            match m.msg_type {
                nl::NLMSG_DONE => return Some(Ok(())),
                nl::NLMSG_ERROR => {
                    let Some(err) = nl::parse_error(m.flags, m.payload) else {
                        return Some(Err(
                            self.malformed("short NLMSG_ERROR for RTM_GETNEIGH".into())
                        ));
                    };
                    if err.errno == 0 {
                        return Some(Ok(()));
                    }
                    return Some(Err(SdnError::Kernel {
                        request: "RTM_GETNEIGH dump",
                        dev: self.dev.clone(),
                        what: "all bridge FDB entries".into(),
                        errno: err.errno,
                        reason: err.reason(),
                    }));
                }
                RTM_NEWNEIGH => {
                    if let Some(entry) = self.parse_neigh(m.payload) {
                        entries.push(entry);
                    }
                }
                _ => {}
            }
            (m.flags & nl::NLM_F_MULTI == 0).then_some(Ok(()))
        })?;
        Ok((entries, interrupted))
    }

    /// Parses one `RTM_NEWNEIGH` dump record; `None` if it is not an IPv4 entry of this device.
    fn parse_neigh(&self, payload: &[u8]) -> Option<FdbEntry> {
        if payload.len() < NDMSG_LEN || payload[0] != AF_BRIDGE {
            return None;
        }
        if nl::u32_at(payload, 4)? != self.ifindex {
            return None;
        }
        let mut mac = None;
        let mut dst = None;
        for (ty, data) in nl::attrs(&payload[nl::align(NDMSG_LEN)..]) {
            match ty {
                NDA_LLADDR => mac = <[u8; 6]>::try_from(data).ok().map(Mac),
                NDA_DST => dst = <[u8; 4]>::try_from(data).ok().map(Ipv4Addr::from),
                _ => {}
            }
        }
        Some(FdbEntry {
            mac: mac?,
            dst: dst?,
        })
    }
}

#[cfg(test)]
mod tests;
