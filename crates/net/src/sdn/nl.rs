//! Netlink plumbing shared by [`Fdb`](super::Fdb) and the packet hold: the socket through
//! `nix`, messages framed here. `netlink-packet-core` 0.8 does not read the extended ACK (the
//! kernel's own words on why it refused a request, which Ferry's errors quote), and
//! `netlink-packet-netfilter` 0.2 has no nfnetlink_queue messages, so neither is used.

use std::io;
use std::mem;
use std::os::fd::{AsRawFd, OwnedFd};

use nix::errno::Errno;
use nix::sys::socket::{
    bind, recv, sendto, socket, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol,
    SockType,
};

pub(crate) const NLMSG_HDRLEN: usize = 16;
pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;
pub(crate) const NLM_F_REQUEST: u16 = 0x01;
pub(crate) const NLM_F_MULTI: u16 = 0x02;
pub(crate) const NLM_F_ACK: u16 = 0x04;
pub(crate) const NLM_F_DUMP_INTR: u16 = 0x10;
pub(crate) const NLM_F_REPLACE: u16 = 0x100;
pub(crate) const NLM_F_CAPPED: u16 = 0x100;
pub(crate) const NLM_F_ACK_TLVS: u16 = 0x200;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
pub(crate) const NLM_F_CREATE: u16 = 0x400;
pub(crate) const NLM_F_APPEND: u16 = 0x800;
const NLMSGERR_ATTR_MSG: u16 = 1;

/// Rounds up to netlink's 4-byte alignment.
pub(crate) const fn align(len: usize) -> usize {
    (len + 3) & !3
}

fn u16_at(buf: &[u8], off: usize) -> Option<u16> {
    let b = buf.get(off..off + 2)?;
    Some(u16::from_ne_bytes([b[0], b[1]]))
}

pub(crate) fn u32_at(buf: &[u8], off: usize) -> Option<u32> {
    let b = buf.get(off..off + 4)?;
    Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// Builds one netlink message: header, fixed family header, then attributes.
pub(crate) struct MsgBuilder {
    buf: Vec<u8>,
}

impl MsgBuilder {
    pub(crate) fn new(msg_type: u16, flags: u16, seq: u32) -> Self {
        let mut buf = Vec::with_capacity(64);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_len, patched in finish()
        buf.extend_from_slice(&msg_type.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // nlmsg_pid: kernel
        MsgBuilder { buf }
    }

    /// Appends raw bytes (the family header), padded to alignment.
    pub(crate) fn raw(mut self, bytes: &[u8]) -> Self {
        self.buf.extend_from_slice(bytes);
        self.buf.resize(align(self.buf.len()), 0);
        self
    }

    /// Appends one attribute, padded to alignment.
    pub(crate) fn attr(mut self, attr_type: u16, data: &[u8]) -> Self {
        // Attribute payloads here are a few bytes; saturate rather than panic.
        let len = u16::try_from(4 + data.len()).unwrap_or(u16::MAX);
        self.buf.extend_from_slice(&len.to_ne_bytes());
        self.buf.extend_from_slice(&attr_type.to_ne_bytes());
        self.buf.extend_from_slice(data);
        self.buf.resize(align(self.buf.len()), 0);
        self
    }

    /// Patches the length and returns the encoded message.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.buf.len()).unwrap_or(u32::MAX);
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// One parsed netlink message header plus its payload.
pub(crate) struct Msg<'a> {
    pub(crate) msg_type: u16,
    pub(crate) flags: u16,
    pub(crate) seq: u32,
    pub(crate) payload: &'a [u8],
}

/// Splits a received datagram into messages; `Err` describes a malformed header.
pub(crate) fn messages(buf: &[u8]) -> Result<Vec<Msg<'_>>, String> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDRLEN <= buf.len() {
        let len = u32_at(buf, off).unwrap_or(0) as usize;
        if len < NLMSG_HDRLEN || off + len > buf.len() {
            return Err(format!(
                "message at offset {off} has length {len}, datagram has {} bytes",
                buf.len()
            ));
        }
        out.push(Msg {
            msg_type: u16_at(buf, off + 4).unwrap_or(0),
            flags: u16_at(buf, off + 6).unwrap_or(0),
            seq: u32_at(buf, off + 8).unwrap_or(0),
            payload: &buf[off + NLMSG_HDRLEN..off + len],
        });
        off += align(len);
    }
    Ok(out)
}

/// Iterates `(type, data)` attributes in `buf`, stopping at the first malformed one.
pub(crate) fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut off = 0;
    std::iter::from_fn(move || {
        let len = u16_at(buf, off)? as usize;
        let ty = u16_at(buf, off + 2)? & 0x3fff; // strip NLA_F_NESTED / NLA_F_NET_BYTEORDER
        if len < 4 || off + len > buf.len() {
            return None;
        }
        let data = &buf[off + 4..off + len];
        off += align(len);
        Some((ty, data))
    })
}

/// A parsed `NLMSG_ERROR` payload: `errno` is positive (0 for a plain ACK).
pub(crate) struct ErrorMsg {
    pub(crate) errno: i32,
    /// The kernel's extended-ACK message, if any.
    pub(crate) ext_msg: Option<String>,
}

impl ErrorMsg {
    /// `strerror` of the errno plus the extended-ACK message.
    pub(crate) fn reason(&self) -> String {
        let base = io::Error::from_raw_os_error(self.errno).to_string();
        match &self.ext_msg {
            Some(m) => format!("{base}: {m}"),
            None => base,
        }
    }
}

/// Parses the payload of an `NLMSG_ERROR` message whose header flags are `flags`.
pub(crate) fn parse_error(flags: u16, payload: &[u8]) -> Option<ErrorMsg> {
    let error = u32_at(payload, 0)? as i32;
    let orig_len = u32_at(payload, 4)? as usize;
    let mut tlv_off = 4 + NLMSG_HDRLEN;
    if flags & NLM_F_CAPPED == 0 {
        tlv_off = 4 + align(orig_len.max(NLMSG_HDRLEN));
    }
    let mut ext_msg = None;
    if flags & NLM_F_ACK_TLVS != 0 {
        if let Some(tlvs) = payload.get(tlv_off..) {
            for (ty, data) in attrs(tlvs) {
                if ty == NLMSGERR_ATTR_MSG {
                    let s = data.split(|b| *b == 0).next().unwrap_or_default();
                    ext_msg = Some(String::from_utf8_lossy(s).into_owned());
                }
            }
        }
    }
    Some(ErrorMsg {
        errno: error.saturating_neg(),
        ext_msg,
    })
}

/// A raw netlink socket bound to a kernel-assigned port id.
pub(crate) struct Socket {
    fd: OwnedFd,
}

/// The kernel's end of every netlink socket (port id 0).
fn kernel_addr() -> NetlinkAddr {
    NetlinkAddr::new(0, 0)
}

impl Socket {
    /// Opens and binds a netlink socket of `protocol` in the calling thread's network
    /// namespace. Returns the failing operation's name with the error.
    pub(crate) fn open(protocol: SockProtocol) -> Result<Self, (&'static str, io::Error)> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            protocol,
        )
        .map_err(|e| ("socket", e.into()))?;
        bind(fd.as_raw_fd(), &kernel_addr()).map_err(|e| ("bind", e.into()))?;
        Ok(Socket { fd })
    }

    /// Sets an integer socket option (netlink's own options, which `nix` does not name).
    pub(crate) fn set_opt(
        &self,
        level: libc::c_int,
        name: libc::c_int,
        value: libc::c_int,
    ) -> io::Result<()> {
        // SAFETY: `value` is a live c_int and the length passed matches its size.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                level,
                name,
                (&value as *const libc::c_int).cast(),
                mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// Asks for extended ACKs (kernel error strings) and capped ACK payloads; best effort.
    pub(crate) fn enable_ext_ack(&self) {
        let _ = self.set_opt(libc::SOL_NETLINK, libc::NETLINK_EXT_ACK, 1);
        let _ = self.set_opt(libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1);
    }

    /// Sends one datagram (one or more messages) to the kernel.
    pub(crate) fn send(&self, buf: &[u8]) -> io::Result<()> {
        loop {
            match sendto(self.fd.as_raw_fd(), buf, &kernel_addr(), MsgFlags::empty()) {
                Err(Errno::EINTR) => continue,
                r => return r.map(drop).map_err(io::Error::from),
            }
        }
    }

    /// Receives one datagram into `buf`; `nonblocking` uses `MSG_DONTWAIT` (then
    /// `WouldBlock` means nothing is pending). A datagram larger than `buf` is an error.
    pub(crate) fn recv(&self, buf: &mut [u8], nonblocking: bool) -> io::Result<usize> {
        let mut flags = MsgFlags::MSG_TRUNC;
        if nonblocking {
            flags |= MsgFlags::MSG_DONTWAIT;
        }
        loop {
            // With MSG_TRUNC the datagram's real length comes back, even when longer.
            let n = match recv(self.fd.as_raw_fd(), buf, flags) {
                Err(Errno::EINTR) => continue,
                r => r.map_err(io::Error::from)?,
            };
            if n > buf.len() {
                return Err(io::Error::other(format!(
                    "netlink datagram of {n} bytes truncated to {} bytes",
                    buf.len()
                )));
            }
            return Ok(n);
        }
    }

    /// Waits up to `timeout_ms` until this socket or `wake` is readable; returns whether
    /// the socket is (the caller drains `wake` itself).
    pub(crate) fn poll_readable_or(
        &self,
        wake: std::os::fd::BorrowedFd<'_>,
        timeout_ms: libc::c_int,
    ) -> io::Result<bool> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use std::os::fd::AsFd;
        let mut pfds = [
            PollFd::new(self.fd.as_fd(), PollFlags::POLLIN),
            PollFd::new(wake, PollFlags::POLLIN),
        ];
        let timeout = PollTimeout::try_from(timeout_ms).unwrap_or(PollTimeout::MAX);
        match poll(&mut pfds, timeout) {
            Ok(_) => Ok(pfds[0].revents().is_some_and(|r| !r.is_empty())),
            Err(nix::errno::Errno::EINTR) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }
}
