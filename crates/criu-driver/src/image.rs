//! Reading CRIU's `pagemap-<pid>.img` images: which memory of a process a dump wrote, and which
//! it left lazy (to be served by a page server while the restored process runs).
//!
//! An image is `u32 IMG_COMMON_MAGIC`, `u32 PAGEMAP_MAGIC`, then protobuf messages, each after
//! its `u32` length (host byte order): one `pagemap_head { pages_id }`, then `pagemap_entry
//! { vaddr, compat_nr_pages, in_parent, flags, nr_pages }` in address order
//! (`images/pagemap.proto`).

use std::path::{Path, PathBuf};

use crate::page_server::PageFlags;
use crate::rpc::{fields, last_bytes, last_varint};

/// `IMG_COMMON_MAGIC`.
pub const IMG_COMMON_MAGIC: u32 = 0x5456_4319;
/// `PAGEMAP_MAGIC`.
pub const PAGEMAP_MAGIC: u32 = 0x5608_4025;
/// The largest pagemap image read (a pagemap of 64 MiB describes far more memory than a host has).
pub const MAX_PAGEMAP_BYTES: u64 = 64 << 20;

/// Why an image could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file could not be read.
    #[error("reading {}: {source}", path.display())]
    Io {
        /// The image.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file is not a pagemap image, or is damaged.
    #[error("{} is not a valid pagemap image: {why}", path.display())]
    Invalid {
        /// The image.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
}

/// One `pagemap_entry`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PagemapEntry {
    /// First page's address at dump time.
    pub vaddr: u64,
    /// Pages in the entry.
    pub nr_pages: u64,
    /// `PE_*` flags (old images without flags read as their meaning: PRESENT or PARENT).
    pub flags: u32,
}

impl PagemapEntry {
    /// Whether the dump left these pages out, for a page server to serve: `PE_LAZY` without
    /// `PE_PRESENT` (a lazy dump's lazy memory).
    pub fn is_lazy_only(&self) -> bool {
        let f = PageFlags::new(self.flags & 7).unwrap_or(PageFlags::PRESENT);
        f.contains(PageFlags::LAZY) && !f.contains(PageFlags::PRESENT)
    }

    /// The end address.
    pub fn end(&self) -> u64 {
        self.vaddr.saturating_add(
            self.nr_pages
                .saturating_mul(crate::page_server::PAGE_SIZE as u64),
        )
    }
}

/// The host-order `u32` at byte `i` of `bytes`, if it is all there.
fn u32_at(bytes: &[u8], i: usize) -> Option<u32> {
    bytes
        .get(i..i + 4)
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

/// Parses a pagemap image; returns `pages_id` and the entries.
pub fn parse_pagemap(bytes: &[u8]) -> Result<(u32, Vec<PagemapEntry>), String> {
    let mut i = 0;
    match u32_at(bytes, 0) {
        Some(IMG_COMMON_MAGIC) => i += 4,
        Some(PAGEMAP_MAGIC) => {}
        Some(m) => return Err(format!("magic {m:#x}")),
        None => return Err("too short".into()),
    }
    if u32_at(bytes, i) != Some(PAGEMAP_MAGIC) {
        return Err(format!("magic {:#x?}, not PAGEMAP_MAGIC", u32_at(bytes, i)));
    }
    i += 4;
    let mut head = None;
    let mut entries = vec![];
    while i < bytes.len() {
        let len = u32_at(bytes, i).ok_or("a truncated length")? as usize;
        i += 4;
        let msg = bytes
            .get(i..i.checked_add(len).ok_or("a length past the end")?)
            .ok_or("a truncated message")?;
        i += len;
        let fs = fields(msg).ok_or("a malformed message")?;
        let get = |n: u64| last_varint(&fs, n);
        if head.is_none() {
            head = Some(get(1).ok_or("no pages_id in the head")? as u32);
            continue;
        }
        let vaddr = get(1).ok_or("an entry without vaddr")?;
        let nr_pages = match get(5) {
            Some(n) => n,
            None => get(2).ok_or("an entry without nr_pages")?,
        };
        let flags = match get(4) {
            Some(f) => f as u32,
            None if get(3).unwrap_or(0) != 0 => PageFlags::PARENT.bits(),
            None => PageFlags::PRESENT.bits(),
        };
        if vaddr % crate::page_server::PAGE_SIZE as u64 != 0 || nr_pages == 0 {
            return Err(format!("an entry at {vaddr:#x} of {nr_pages} pages"));
        }
        entries.push(PagemapEntry {
            vaddr,
            nr_pages,
            flags,
        });
    }
    Ok((head.ok_or("no head")?, entries))
}

/// The process pagemaps of a dump in `dir` (`pagemap-<pid>.img`, not shared memory's), as
/// (pid in the container's namespace, entries).
pub fn read_pagemaps(dir: &Path) -> Result<Vec<(u32, Vec<PagemapEntry>)>, ImageError> {
    let mut out = vec![];
    for (pid, path, bytes) in read_images(dir, "pagemap-", MAX_PAGEMAP_BYTES)? {
        let (_, entries) =
            parse_pagemap(&bytes).map_err(|why| ImageError::Invalid { path, why })?;
        out.push((pid, entries));
    }
    Ok(out)
}

/// `CORE_MAGIC`.
pub const CORE_MAGIC: u32 = 0x5505_3847;
/// The largest core image read.
pub const MAX_CORE_BYTES: u64 = 1 << 20;

/// What a thread's core image says about memory the kernel writes for it while CRIU dumps
/// it: its registered restartable-sequences area (`thread_core.rseq_entry`: the CPU it runs
/// on, written whenever it returns to user space, CRIU's parasite included) and its stack
/// pointer (an interrupted system call writes its results, such as the time a sleep had
/// left, into the caller's frame just above it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThreadCore {
    /// Thread id in the container's namespace.
    pub tid: u32,
    /// Address and size of its `struct rseq`, if it registered one.
    pub rseq: Option<(u64, u32)>,
    /// Its stack pointer (x86-64 `thread_info.gpregs.sp`), if the image has one.
    pub sp: Option<u64>,
}

/// Parses a core image (`core-<tid>.img`): the thread's stack pointer, if the image has one
/// (x86-64).
pub fn parse_core_sp(bytes: &[u8]) -> Result<Option<u64>, String> {
    let msg = core_message(bytes)?;
    let Some(info) = submessage(msg, 2)? else {
        return Ok(None);
    };
    let Some(regs) = submessage(info, 2)? else {
        return Ok(None);
    };
    Ok(last_varint(&fields(regs).ok_or("malformed registers")?, 20))
}

/// The last occurrence of embedded message field `n` of `buf`.
fn submessage(buf: &[u8], n: u64) -> Result<Option<&[u8]>, String> {
    Ok(last_bytes(&fields(buf).ok_or("a malformed message")?, n))
}

/// The `core_entry` message of a core image.
fn core_message(bytes: &[u8]) -> Result<&[u8], String> {
    if u32_at(bytes, 0) != Some(IMG_COMMON_MAGIC) || u32_at(bytes, 4) != Some(CORE_MAGIC) {
        return Err(format!(
            "magic {:#x?} {:#x?}",
            u32_at(bytes, 0),
            u32_at(bytes, 4)
        ));
    }
    let len = u32_at(bytes, 8).ok_or("a truncated length")? as usize;
    bytes
        .get(12..12usize.checked_add(len).ok_or("a length past the end")?)
        .ok_or_else(|| "a truncated message".to_string())
}

/// Parses a core image (`core-<tid>.img`): the thread's rseq area, if it registered one.
pub fn parse_core_rseq(bytes: &[u8]) -> Result<Option<(u64, u32)>, String> {
    let msg = core_message(bytes)?;
    let Some(thread_core) = submessage(msg, 5)? else {
        return Ok(None);
    };
    let Some(rseq) = submessage(thread_core, 15)? else {
        return Ok(None);
    };
    let fs = fields(rseq).ok_or("a malformed rseq_entry")?;
    let get = |n: u64| last_varint(&fs, n);
    match (get(1), get(2)) {
        (Some(0), _) | (None, _) => Ok(None),
        (Some(p), Some(size)) if size > 0 && size <= 4096 => Ok(Some((p, size as u32))),
        (Some(p), size) => Err(format!("an rseq area at {p:#x} of size {size:?}")),
    }
}

/// The threads of a dump in `dir` (`core-<tid>.img`).
pub fn read_thread_cores(dir: &Path) -> Result<Vec<ThreadCore>, ImageError> {
    let mut out = vec![];
    for (tid, path, bytes) in read_images(dir, "core-", MAX_CORE_BYTES)? {
        let invalid = |why| ImageError::Invalid {
            path: path.clone(),
            why,
        };
        let rseq = parse_core_rseq(&bytes).map_err(invalid)?;
        let sp = parse_core_sp(&bytes).map_err(invalid)?;
        out.push(ThreadCore { tid, rseq, sp });
    }
    Ok(out)
}

/// The images `<prefix><id>.img` of `dir`, at most `max_bytes` each: (id, path, contents), by
/// id.
fn read_images(
    dir: &Path,
    prefix: &str,
    max_bytes: u64,
) -> Result<Vec<(u32, PathBuf, Vec<u8>)>, ImageError> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| ImageError::Io { path, source }
    };
    let mut out = vec![];
    for e in std::fs::read_dir(dir).map_err(io(dir))? {
        let e = e.map_err(io(dir))?;
        let name = e.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|n| n.strip_suffix(".img"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let path = e.path();
        let len = e.metadata().map_err(io(&path))?.len();
        if len > max_bytes {
            return Err(ImageError::Invalid {
                path,
                why: format!("{len} bytes, more than {max_bytes}"),
            });
        }
        let bytes = std::fs::read(&path).map_err(io(&path))?;
        out.push((id, path, bytes));
    }
    out.sort_by_key(|(id, ..)| *id);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(out: &mut Vec<u8>, fields: &[(u64, u64)]) {
        let mut m = vec![];
        for (n, v) in fields {
            crate::rpc::tests_support::put_varint(&mut m, n << 3);
            crate::rpc::tests_support::put_varint(&mut m, *v);
        }
        out.extend_from_slice(&(m.len() as u32).to_ne_bytes());
        out.extend_from_slice(&m);
    }

    #[test]
    fn reads_a_lazy_dumps_pagemap() {
        let mut img = vec![];
        img.extend_from_slice(&IMG_COMMON_MAGIC.to_ne_bytes());
        img.extend_from_slice(&PAGEMAP_MAGIC.to_ne_bytes());
        msg(&mut img, &[(1, 7)]);
        msg(&mut img, &[(1, 0x1000), (2, 3), (4, 4), (5, 3)]);
        msg(&mut img, &[(1, 0x7000), (2, 2), (4, 2), (5, 2)]);
        msg(&mut img, &[(1, 0x20000), (2, 5)]);
        let (id, e) = parse_pagemap(&img).unwrap();
        assert_eq!(id, 7);
        assert_eq!(e.len(), 3);
        assert!(!e[0].is_lazy_only());
        assert!(e[1].is_lazy_only());
        assert_eq!(e[1].end(), 0x9000);
        assert_eq!(e[2].flags, 4, "no flags: present");
        assert_eq!(e[2].nr_pages, 5, "compat count");
        assert!(parse_pagemap(&img[..img.len() - 1]).is_err());
        assert!(parse_pagemap(&img[4..8]).is_err());
        let mut bad = img.clone();
        bad[0] = 0;
        assert!(parse_pagemap(&bad).is_err());
    }

    fn bytes_field(n: u64, v: &[u8]) -> Vec<u8> {
        let mut m = vec![];
        crate::rpc::tests_support::put_varint(&mut m, n << 3 | 2);
        crate::rpc::tests_support::put_varint(&mut m, v.len() as u64);
        m.extend_from_slice(v);
        m
    }

    #[test]
    fn reads_a_threads_rseq_area_and_stack_pointer_from_its_core_image() {
        let core = |rseq: Option<&[(u64, u64)]>| {
            let mut thread_core = vec![];
            crate::rpc::tests_support::put_varint(&mut thread_core, 1 << 3);
            crate::rpc::tests_support::put_varint(&mut thread_core, 0x1234);
            if let Some(r) = rseq {
                let mut e = vec![];
                for (n, v) in r {
                    crate::rpc::tests_support::put_varint(&mut e, n << 3);
                    crate::rpc::tests_support::put_varint(&mut e, *v);
                }
                thread_core.extend(bytes_field(15, &e));
            }
            let mut m = vec![8, 1]; // mtype = X86_64
            let mut regs = vec![];
            crate::rpc::tests_support::put_varint(&mut regs, 20 << 3);
            crate::rpc::tests_support::put_varint(&mut regs, 0x7ffd_0000_1ff8);
            m.extend(bytes_field(2, &bytes_field(2, &regs)));
            m.extend(bytes_field(5, &thread_core));
            let mut img = vec![];
            img.extend_from_slice(&IMG_COMMON_MAGIC.to_ne_bytes());
            img.extend_from_slice(&CORE_MAGIC.to_ne_bytes());
            img.extend_from_slice(&(m.len() as u32).to_ne_bytes());
            img.extend_from_slice(&m);
            img
        };
        let img = core(Some(&[(1, 0x7f00_0000_1fe0), (2, 32), (3, 0x53053053)]));
        assert_eq!(parse_core_rseq(&img), Ok(Some((0x7f00_0000_1fe0, 32))));
        assert_eq!(parse_core_sp(&img), Ok(Some(0x7ffd_0000_1ff8)));
        assert_eq!(parse_core_rseq(&core(None)), Ok(None), "no rseq registered");
        assert_eq!(parse_core_rseq(&core(Some(&[(1, 0), (2, 0)]))), Ok(None));
        assert!(parse_core_rseq(&core(Some(&[(1, 0x1000), (2, 1 << 20)]))).is_err());
        assert!(parse_core_rseq(&img[..img.len() - 1]).is_err());
        assert!(parse_core_rseq(&img[4..]).is_err());
    }
}
