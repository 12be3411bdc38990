//! The few pieces of CRIU's RPC protocol (`images/rpc.proto`, protobuf over a SOCK_SEQPACKET
//! socket, "swrk" mode) that Ferry speaks itself.

use crate::CriuVersion;

/// `criu_req_type.VERSION`.
pub const REQ_VERSION: u64 = 10;

/// Reads a protobuf varint; returns (value, bytes used).
fn varint(buf: &[u8]) -> Option<(u64, usize)> {
    let mut v: u64 = 0;
    for (i, b) in buf.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// The `type` (field 1) of an encoded `criu_req`, if the bytes hold one.
pub fn request_type(buf: &[u8]) -> Option<u64> {
    let mut i = 0;
    while i < buf.len() {
        let (key, n) = varint(&buf[i..])?;
        i += n;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                let (v, n) = varint(&buf[i..])?;
                i += n;
                if field == 1 {
                    return Some(v);
                }
            }
            2 => {
                let (len, n) = varint(&buf[i..])?;
                i = i.checked_add(n)?.checked_add(usize::try_from(len).ok()?)?;
            }
            1 => i = i.checked_add(8)?,
            5 => i = i.checked_add(4)?,
            _ => return None,
        }
    }
    None
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
mod tests {
    use super::*;

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
