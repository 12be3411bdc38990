//! The few pieces of CRIU's RPC protocol (`images/rpc.proto`, protobuf over a SOCK_SEQPACKET
//! socket, "swrk" mode) that Ferry speaks itself.

use crate::CriuVersion;

/// `criu_req_type.VERSION`.
pub const REQ_VERSION: u64 = 10;

/// Reads a protobuf varint; returns (value, bytes used). `None` past 10 bytes, and for a 10th
/// byte with bits beyond the 64th: Ferry would read another value than CRIU (protobuf-c reads
/// a `bool` as set when any bit of its varint is).
pub(crate) fn varint(buf: &[u8]) -> Option<(u64, usize)> {
    let mut v: u64 = 0;
    for (i, b) in buf.iter().enumerate().take(10) {
        if i == 9 && b & 0x7e != 0 {
            return None;
        }
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The `type` (field 1) of an encoded `criu_req` as CRIU reads it: the last occurrence (as
/// protobuf does), an enum, hence the low 32 bits of its varint. `None` if absent or the
/// message is malformed.
pub fn request_type(buf: &[u8]) -> Option<u64> {
    last_varint(&fields(buf)?, 1).map(|v| u64::from(v as u32))
}

/// `criu_req_type.DUMP`.
pub const REQ_DUMP: u64 = 1;

/// `criu_req_type.RESTORE`.
pub const REQ_RESTORE: u64 = 2;

/// Whether an encoded `criu_resp` is CRIU's final answer to a request of type `req_type`, and
/// if so its `success` (field 2). `None` for a notification (type NOTIFY) or another answer,
/// and for a malformed message; a final answer without `success` is a failure.
pub fn final_response_success(resp: &[u8], req_type: u64) -> Option<bool> {
    if request_type(resp)? != req_type {
        return None;
    }
    let success = last_varint(&fields(resp)?, 2).is_some_and(|v| v != 0);
    Some(success)
}

/// `criu_req_type.NOTIFY`.
pub const REQ_NOTIFY: u64 = 6;

/// The script an encoded `criu_resp` of type NOTIFY announces (`notify.script`, the last
/// occurrence of each); `None` for any other message, one without a script, or a malformed one.
pub fn notify_script(resp: &[u8]) -> Option<&[u8]> {
    if request_type(resp)? != REQ_NOTIFY {
        return None;
    }
    let notify = last_bytes(&fields(resp)?, 5)?;
    last_bytes(&fields(notify)?, 1)
}

/// Whether an encoded `criu_req` is a client's answer to a notification and says the script
/// succeeded (`type` NOTIFY, `notify_success` set).
pub fn notify_answer_success(req: &[u8]) -> Option<bool> {
    if request_type(req)? != REQ_NOTIFY {
        return None;
    }
    Some(last_varint(&fields(req)?, 3).is_some_and(|v| v != 0))
}

/// The `criu_req` a client sends when a notified script succeeded: `type` NOTIFY,
/// `notify_success` true (what runc answers).
pub fn notify_success() -> Vec<u8> {
    let mut out = Vec::with_capacity(4);
    put_varint(&mut out, 1 << 3);
    put_varint(&mut out, REQ_NOTIFY);
    put_varint(&mut out, 3 << 3);
    put_varint(&mut out, 1);
    out
}

/// One field of an encoded protobuf message: number, wire type, and the bytes of the whole
/// field (key included) and of its value.
pub(crate) struct Field<'a> {
    pub(crate) number: u64,
    pub(crate) wire: u64,
    pub(crate) whole: &'a [u8],
    pub(crate) value: &'a [u8],
}

/// Splits an encoded message into its fields; `None` if it is malformed or uses groups.
pub(crate) fn fields(buf: &[u8]) -> Option<Vec<Field<'_>>> {
    let mut out = vec![];
    let mut i = 0;
    while i < buf.len() {
        let start = i;
        let (key, n) = varint(&buf[i..])?;
        i += n;
        let (number, wire) = (key >> 3, key & 7);
        let value_start;
        match wire {
            0 => {
                value_start = i;
                let (_, n) = varint(&buf[i..])?;
                i += n;
            }
            1 | 5 => {
                value_start = i;
                i = i.checked_add(if wire == 1 { 8 } else { 4 })?;
            }
            2 => {
                let (len, n) = varint(&buf[i..])?;
                value_start = i + n;
                i = value_start.checked_add(usize::try_from(len).ok()?)?;
            }
            _ => return None,
        }
        if i > buf.len() {
            return None;
        }
        out.push(Field {
            number,
            wire,
            whole: &buf[start..i],
            value: &buf[value_start..i],
        });
    }
    Some(out)
}

/// The value of the last varint field `number` among `fields` (protobuf reads the last
/// occurrence); `None` if there is none or its varint is malformed.
pub(crate) fn last_varint(fields: &[Field<'_>], number: u64) -> Option<u64> {
    fields
        .iter()
        .rev()
        .find(|f| f.number == number && f.wire == 0)
        .and_then(|f| varint(f.value))
        .map(|v| v.0)
}

/// The bytes of the last length-delimited field `number` among `fields`; `None` if there is
/// none.
pub(crate) fn last_bytes<'a>(fields: &[Field<'a>], number: u64) -> Option<&'a [u8]> {
    fields
        .iter()
        .rev()
        .find(|f| f.number == number && f.wire == 2)
        .map(|f| f.value)
}

fn put_bytes_field(out: &mut Vec<u8>, number: u64, value: &[u8]) {
    put_varint(out, number << 3 | 2);
    put_varint(out, value.len() as u64);
    out.extend_from_slice(value);
}

/// The position of the only `opts` (field 2) among a request's top-level fields. `None` when
/// it is absent or occurs more than once: protobuf merges repeated occurrences of a message
/// field, so CRIU would read fields from all of them (a later one overriding what Ferry read
/// or rewrote in the first). runc sends one; other requests are refused here.
fn single_opts(top: &[Field<'_>]) -> Option<usize> {
    let mut opts = top
        .iter()
        .enumerate()
        .filter(|(_, f)| f.number == 2 && f.wire == 2);
    let (at, _) = opts.next()?;
    opts.next().is_none().then_some(at)
}

/// The request of the top-level fields `top` with its `opts` (the field at `opts_at`) replaced
/// by `new_opts`; every other field is kept byte for byte.
fn with_opts(top: &[Field<'_>], opts_at: usize, new_opts: &[u8]) -> Vec<u8> {
    let kept: usize = top.iter().map(|f| f.whole.len()).sum();
    let mut out = Vec::with_capacity(kept + new_opts.len() + 16);
    for (i, f) in top.iter().enumerate() {
        if i == opts_at {
            put_bytes_field(&mut out, 2, new_opts);
        } else {
            out.extend_from_slice(f.whole);
        }
    }
    out
}

/// Rewrites an encoded DUMP `criu_req` whose options name a page server by address and port
/// (`criu_opts.ps`, field 11) so that CRIU uses the already connected socket `fd` instead
/// (`criu_page_server_info.fd`, field 4). Every other field is kept byte for byte. `None` when
/// the request is not a DUMP (as CRIU reads its type, [`request_type`]), has no page server,
/// has more than one `opts`, or is malformed: then it must be passed on unchanged.
pub fn dump_with_page_server_fd(req: &[u8], fd: i32) -> Option<Vec<u8>> {
    let top = fields(req)?;
    if request_type(req) != Some(REQ_DUMP) || fd < 0 {
        return None;
    }
    let opts_at = single_opts(&top)?;
    let opts = &top[opts_at];
    let opt_fields = fields(opts.value)?;
    if !opt_fields.iter().any(|f| f.number == 11 && f.wire == 2) {
        return None;
    }
    let mut ps = Vec::new();
    put_varint(&mut ps, 4 << 3); // fd, varint
    put_varint(&mut ps, fd as u64);
    let mut new_opts = Vec::with_capacity(opts.value.len());
    for f in &opt_fields {
        if f.number == 11 {
            put_bytes_field(&mut new_opts, 11, &ps);
        } else {
            new_opts.extend_from_slice(f.whole);
        }
    }
    Some(with_opts(&top, opts_at, &new_opts))
}

/// Rewrites an encoded DUMP `criu_req` (as [`dump_with_page_server_fd`] accepts it) into a
/// *lazy* dump whose page server uses the already connected socket `fd`: `lazy_pages` is set,
/// `ps` is dropped, and `config_file` names `config`, a file that must say `ps-socket FD` (over
/// RPC a lazy dump ignores `ps.fd` and would listen on a TCP port of every address; an RPC
/// configuration file is read after the request and may set `ps-socket`). Every other field is
/// kept byte for byte. Returns the new request and the configuration file runc named, if any
/// (its lines must be copied into `config`). `None` when the request is not such a DUMP.
///
/// `log_level` replaces runc's (4, debug: at that level CRIU writes several lines per MiB of
/// memory, about 60 ms per GiB while the container is frozen).
pub fn lazy_dump_with_page_server_fd(
    req: &[u8],
    config: &str,
    log_level: u32,
) -> Option<(Vec<u8>, Option<String>)> {
    dump_with_page_server_fd(req, 0)?;
    let top = fields(req)?;
    let opts_at = single_opts(&top)?;
    let opt_fields = fields(top[opts_at].value)?;
    let mut earlier = None;
    let mut new_opts = Vec::with_capacity(top[opts_at].value.len() + config.len() + 8);
    for f in &opt_fields {
        match f.number {
            opt::PS | opt::LAZY_PAGES | opt::LOG_LEVEL => {}
            opt::CONFIG_FILE => {
                earlier = Some(String::from_utf8(f.value.to_vec()).ok()?);
            }
            _ => new_opts.extend_from_slice(f.whole),
        }
    }
    put_varint(&mut new_opts, opt::LAZY_PAGES << 3);
    put_varint(&mut new_opts, 1);
    put_varint(&mut new_opts, opt::LOG_LEVEL << 3);
    put_varint(&mut new_opts, u64::from(log_level));
    put_bytes_field(&mut new_opts, opt::CONFIG_FILE, config.as_bytes());
    Some((with_opts(&top, opts_at, &new_opts), earlier))
}

/// Field numbers of `criu_opts` that Ferry reads or rewrites.
pub mod opt {
    /// `images_dir_fd` (int32): a descriptor of the *requesting* process (CRIU opens
    /// `/proc/PEER/fd/N`, PEER from `SO_PEERCRED` of the RPC socket).
    pub const IMAGES_DIR_FD: u64 = 1;
    /// `pid` (int32): the task to dump; absent means the requesting process itself.
    pub const PID: u64 = 2;
    /// `log_level` (int32): 0 (nothing) to 4 (debug).
    pub const LOG_LEVEL: u64 = 9;
    /// `log_file` (string), relative to the work directory.
    pub const LOG_FILE: u64 = 10;
    /// `ps` (`criu_page_server_info`).
    pub const PS: u64 = 11;
    /// `work_dir_fd` (int32): like `images_dir_fd`, a descriptor of the requesting process.
    pub const WORK_DIR_FD: u64 = 17;
    /// `lazy_pages` (bool): with it CRIU ignores `ps.fd` and listens itself.
    pub const LAZY_PAGES: u64 = 48;
    /// `status_fd` (int32): a descriptor of the requesting process.
    pub const STATUS_FD: u64 = 49;
    /// `config_file` (string): an RPC configuration file, read after the request's options.
    pub const CONFIG_FILE: u64 = 51;
    /// `pidfd_store_sk` (int32): taken from the requesting process with `pidfd_getfd`.
    pub const PIDFD_STORE_SK: u64 = 62;
}

/// The fields of the `opts` (field 2) of an encoded `criu_req`; `None` if it is malformed or
/// has no options, or more than one `opts` ([`single_opts`]).
fn opts_fields(req: &[u8]) -> Option<Vec<Field<'_>>> {
    let top = fields(req)?;
    fields(top[single_opts(&top)?].value)
}

/// The value of the varint field `number` of the request's `criu_opts` (the last one, as
/// protobuf reads it); `None` if absent or malformed (which includes more than one `opts`).
pub fn opts_varint(req: &[u8], number: u64) -> Option<u64> {
    last_varint(&opts_fields(req)?, number)
}

/// The bytes of the length-delimited field `number` of the request's `criu_opts` (the last
/// one); `None` if absent or malformed.
pub fn opts_bytes(req: &[u8], number: u64) -> Option<&[u8]> {
    last_bytes(&opts_fields(req)?, number)
}

/// An int32 field of the request's `criu_opts` holding a descriptor, read as protobuf reads an
/// int32 (the low 32 bits of the varint, so what CRIU uses): `Some` only for a non-negative
/// value (protobuf encodes negative int32 as 10-byte varints).
pub fn opts_fd(req: &[u8], number: u64) -> Option<i32> {
    opts_varint(req, number)
        .map(|v| v as u32 as i32)
        .filter(|fd| *fd >= 0)
}

/// Sets the varint field `number` of the request's `criu_opts` to `value`, which must already
/// be there: the first occurrence is replaced, later ones dropped, every other field kept byte
/// for byte. `None` if the field is absent or the request is malformed (or has more than one
/// `opts`).
pub fn with_opts_varint(req: &[u8], number: u64, value: u64) -> Option<Vec<u8>> {
    let top = fields(req)?;
    let opts_at = single_opts(&top)?;
    let opt_fields = fields(top[opts_at].value)?;
    if !opt_fields.iter().any(|f| f.number == number && f.wire == 0) {
        return None;
    }
    let mut new_opts = Vec::with_capacity(top[opts_at].value.len() + 8);
    let mut done = false;
    for f in &opt_fields {
        if f.number == number && f.wire == 0 {
            if !done {
                put_varint(&mut new_opts, number << 3);
                put_varint(&mut new_opts, value);
                done = true;
            }
        } else {
            new_opts.extend_from_slice(f.whole);
        }
    }
    Some(with_opts(&top, opts_at, &new_opts))
}

/// Encodes the `criu_resp` CRIU sends for a VERSION request.
pub fn version_response(v: CriuVersion) -> Vec<u8> {
    let mut ver = Vec::new();
    ver.push(0x08); // major_number
    put_varint(&mut ver, u64::from(v.major));
    ver.push(0x10); // minor_number
    put_varint(&mut ver, u64::from(v.minor));
    ver.push(0x20); // sublevel
    put_varint(&mut ver, u64::from(v.patch));
    let mut out = vec![0x08, REQ_VERSION as u8, 0x10, 1]; // type = VERSION, success = true
    out.push(0x52); // version, length-delimited
    put_varint(&mut out, ver.len() as u64);
    out.extend_from_slice(&ver);
    out
}

#[cfg(test)]
pub(crate) mod tests_support {
    pub(crate) use super::put_varint;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_a_final_answer_from_a_notification() {
        // type = DUMP, success = true
        assert_eq!(
            final_response_success(&[0x08, 1, 0x10, 1], REQ_DUMP),
            Some(true)
        );
        // type = RESTORE, success = false; and without success at all
        assert_eq!(
            final_response_success(&[0x08, 2, 0x10, 0], REQ_RESTORE),
            Some(false)
        );
        assert_eq!(final_response_success(&[0x08, 2], REQ_RESTORE), Some(false));
        // A notification (type NOTIFY = 6) is no final answer, nor is another request's.
        assert_eq!(final_response_success(&[0x08, 6, 0x10, 1], REQ_DUMP), None);
        assert_eq!(
            final_response_success(&[0x08, 1, 0x10, 1], REQ_RESTORE),
            None
        );
        assert_eq!(final_response_success(&[0x08], REQ_DUMP), None);
    }

    /// A `criu_resp` notification as CRIU encodes it: type NOTIFY, success, notify { script,
    /// pid }.
    fn notification(script: &str, pid: Option<u64>) -> Vec<u8> {
        let mut notify = vec![];
        put_bytes_field(&mut notify, 1, script.as_bytes());
        if let Some(pid) = pid {
            put_varint(&mut notify, 2 << 3);
            put_varint(&mut notify, pid);
        }
        let mut out = vec![0x08, 6, 0x10, 1];
        put_bytes_field(&mut out, 5, &notify);
        out
    }

    #[test]
    fn reads_a_notification_s_script_and_writes_runc_s_answer() {
        assert_eq!(
            notify_script(&notification("post-restore", Some(4242))),
            Some(&b"post-restore"[..])
        );
        assert_eq!(
            notify_script(&notification("pre-dump", None)),
            Some(&b"pre-dump"[..])
        );
        // A final answer, a notification without a script, garbage.
        assert_eq!(notify_script(&[0x08, 1, 0x10, 1]), None);
        assert_eq!(notify_script(&[0x08, 6, 0x10, 1, 0x2a, 0]), None);
        assert_eq!(notify_script(&[0x08, 6, 0x2a, 0x7f]), None);
        // runc's answer: type NOTIFY, notify_success true.
        let ok = notify_success();
        assert_eq!(ok, [0x08, 6, 0x18, 1]);
        assert_eq!(notify_answer_success(&ok), Some(true));
        assert_eq!(notify_answer_success(&[0x08, 6, 0x18, 0]), Some(false));
        assert_eq!(notify_answer_success(&[0x08, 6]), Some(false));
        assert_eq!(notify_answer_success(&[0x08, 1]), None);
    }

    #[test]
    fn finds_the_request_type() {
        // type = VERSION
        assert_eq!(request_type(&[0x08, 0x0a]), Some(REQ_VERSION));
        // opts first (length-delimited, 3 bytes), then type = RESTORE
        assert_eq!(request_type(&[0x12, 0x03, 1, 2, 3, 0x08, 0x02]), Some(2));
        assert_eq!(request_type(&[]), None);
        assert_eq!(request_type(&[0x12, 0x7f]), None);
        assert_eq!(request_type(&[0xff]), None);
    }

    /// A DUMP request as runc sends it, in the shape of rpc.proto: type, opts (images_dir_fd,
    /// pid, tcp_established, log_file, ps {address, port}, a 64-bit and a 32-bit field), and
    /// notify_success after opts.
    fn dump_request() -> Vec<u8> {
        let mut ps = Vec::new();
        put_bytes_field(&mut ps, 1, b"127.0.0.1");
        ps.extend_from_slice(&[0x10]);
        put_varint(&mut ps, 7000);
        let mut opts = vec![0x08, 0x05, 0x10]; // images_dir_fd = 5, pid = ...
        put_varint(&mut opts, 123_456);
        opts.extend_from_slice(&[0x28, 0x01]); // tcp_established = true
        put_bytes_field(&mut opts, 10, b"dump.log");
        put_bytes_field(&mut opts, 11, &ps);
        opts.extend_from_slice(&[0x79, 1, 2, 3, 4, 5, 6, 7, 8]); // field 15, 64-bit
        opts.extend_from_slice(&[0x85, 0x01, 9, 9, 9, 9]); // field 16, 32-bit
        let mut req = vec![0x08, REQ_DUMP as u8];
        put_bytes_field(&mut req, 2, &opts);
        req.extend_from_slice(&[0x18, 0x01]); // notify_success = true
        req
    }

    #[test]
    fn a_lazy_dump_names_its_config_and_drops_the_page_server_address() {
        let req = dump_request();
        let (lazy, earlier) = lazy_dump_with_page_server_fd(&req, "/w/lazy.conf", 2).unwrap();
        assert_eq!(opts_varint(&lazy, opt::LOG_LEVEL), Some(2));
        assert_eq!(earlier, None);
        assert_eq!(request_type(&lazy), Some(REQ_DUMP));
        assert_eq!(opts_varint(&lazy, opt::LAZY_PAGES), Some(1));
        assert_eq!(
            opts_bytes(&lazy, opt::CONFIG_FILE),
            Some(&b"/w/lazy.conf"[..])
        );
        assert_eq!(opts_bytes(&lazy, opt::PS), None);
        assert_eq!(opts_varint(&lazy, 5), Some(1), "tcp_established kept");
        assert_eq!(opts_bytes(&lazy, opt::LOG_FILE), Some(&b"dump.log"[..]));
        assert!(lazy.ends_with(&[0x18, 0x01]), "notify_success kept");
        // runc's own configuration file is reported, to be copied.
        let mut with_conf = req.clone();
        let top = fields(&req).unwrap();
        let mut opts = top[1].value.to_vec();
        put_bytes_field(&mut opts, opt::CONFIG_FILE, b"/etc/criu/runc.conf");
        with_conf.clear();
        with_conf.extend_from_slice(top[0].whole);
        put_bytes_field(&mut with_conf, 2, &opts);
        let (lazy, earlier) = lazy_dump_with_page_server_fd(&with_conf, "/w/l.conf", 4).unwrap();
        assert_eq!(earlier.as_deref(), Some("/etc/criu/runc.conf"));
        assert_eq!(opts_bytes(&lazy, opt::CONFIG_FILE), Some(&b"/w/l.conf"[..]));
        // Not a dump to a page server: left alone.
        assert!(lazy_dump_with_page_server_fd(&[0x08, 0x02], "/x", 2).is_none());
    }

    #[test]
    fn a_dump_request_gets_the_page_server_socket_and_keeps_everything_else() {
        let req = dump_request();
        let out = dump_with_page_server_fd(&req, 9).unwrap();
        assert_eq!(request_type(&out), Some(REQ_DUMP));
        let top = fields(&out).unwrap();
        assert_eq!(top.len(), 3);
        assert_eq!(top[2].whole, &[0x18, 0x01], "notify_success kept");
        let before = fields(fields(&req).unwrap()[1].value)
            .unwrap()
            .iter()
            .map(|f| (f.number, f.whole.to_vec()))
            .collect::<Vec<_>>();
        let opts = fields(top[1].value).unwrap();
        assert_eq!(opts.len(), before.len());
        for (f, (n, whole)) in opts.iter().zip(&before) {
            assert_eq!(f.number, *n, "field order kept");
            if f.number == 11 {
                // Only the socket: no address, no port.
                assert_eq!(f.value, &[0x20, 0x09]);
            } else {
                assert_eq!(f.whole, &whole[..], "field {n} kept byte for byte");
            }
        }
        // Large fd numbers need a multi-byte varint.
        let out = dump_with_page_server_fd(&req, 300).unwrap();
        let opts = fields(fields(&out).unwrap()[1].value).unwrap();
        let ps = opts.iter().find(|f| f.number == 11).unwrap();
        assert_eq!(ps.value, &[0x20, 0xac, 0x02]);
    }

    #[test]
    fn other_requests_are_left_alone() {
        // Not a dump.
        let mut restore = dump_request();
        restore[1] = 2;
        assert_eq!(dump_with_page_server_fd(&restore, 9), None);
        // A dump without a page server.
        let mut req = vec![0x08, REQ_DUMP as u8];
        put_bytes_field(&mut req, 2, &[0x08, 0x05]);
        assert_eq!(dump_with_page_server_fd(&req, 9), None);
        // Malformed: truncated, a group, a length past the end; and a negative fd.
        let full = dump_request();
        assert_eq!(dump_with_page_server_fd(&full[..full.len() - 3], 9), None);
        assert_eq!(dump_with_page_server_fd(&[0x08, 0x01, 0x13], 9), None);
        assert_eq!(
            dump_with_page_server_fd(&[0x08, 0x01, 0x12, 0x40, 0x08], 9),
            None
        );
        assert_eq!(dump_with_page_server_fd(&full, -1), None);
    }

    #[test]
    fn reads_and_rewrites_option_fields() {
        let req = dump_request();
        assert_eq!(opts_fd(&req, opt::IMAGES_DIR_FD), Some(5));
        assert_eq!(opts_varint(&req, opt::PID), Some(123_456));
        assert_eq!(opts_bytes(&req, opt::LOG_FILE), Some(&b"dump.log"[..]));
        assert_eq!(opts_varint(&req, opt::WORK_DIR_FD), None);
        assert_eq!(opts_varint(&req, opt::LAZY_PAGES), None);

        let out = with_opts_varint(&req, opt::IMAGES_DIR_FD, 300).unwrap();
        assert_eq!(opts_fd(&out, opt::IMAGES_DIR_FD), Some(300));
        assert_eq!(
            out.len(),
            req.len() + 1,
            "one more byte for the larger varint"
        );
        // Everything else is untouched, in order.
        let (a, b) = (opts_fields(&req).unwrap(), opts_fields(&out).unwrap());
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(&b).skip(1) {
            assert_eq!(x.whole, y.whole);
        }
        assert_eq!(fields(&out).unwrap()[2].whole, &[0x18, 0x01]);
        // The page-server rewrite composes with it.
        let both = dump_with_page_server_fd(&out, 9).unwrap();
        assert_eq!(opts_fd(&both, opt::IMAGES_DIR_FD), Some(300));
        assert_eq!(opts_bytes(&both, opt::PS), Some(&[0x20, 0x09][..]));

        // Absent fields are not added; malformed requests are refused.
        assert_eq!(with_opts_varint(&req, opt::WORK_DIR_FD, 7), None);
        assert_eq!(with_opts_varint(&req[..req.len() - 3], opt::PID, 7), None);
        // A negative int32 (images_dir_fd = -1) is not a descriptor.
        let mut neg = vec![0x08, REQ_DUMP as u8];
        let mut opts = vec![0x08];
        put_varint(&mut opts, -1i64 as u64);
        put_bytes_field(&mut neg, 2, &opts);
        assert_eq!(opts_varint(&neg, opt::IMAGES_DIR_FD), Some(u64::MAX));
        assert_eq!(opts_fd(&neg, opt::IMAGES_DIR_FD), None);
    }

    #[test]
    fn version_response_encodes_like_protobuf() {
        let v = CriuVersion {
            major: 4,
            minor: 2,
            patch: 1,
        };
        assert_eq!(
            version_response(v),
            vec![0x08, 0x0a, 0x10, 0x01, 0x52, 0x06, 0x08, 0x04, 0x10, 0x02, 0x20, 0x01]
        );
    }
}
