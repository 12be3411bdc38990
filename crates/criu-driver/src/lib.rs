//! Finding and checking CRIU, the checkpoint/restore engine Ferry drives.
//!
//! Ferry needs CRIU >= 4.2 on this generation of kernels (older releases fail `criu check` or
//! cannot dump TCP sockets). This crate locates the binary, parses its version and runs
//! `criu check`, turning every failure into an error that says what to do.

#![forbid(unsafe_code)]

pub mod image;
pub mod page_server;
pub mod rpc;
pub mod swrk_proxy;

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};

/// The oldest CRIU release Ferry accepts.
pub const MIN_VERSION: CriuVersion = CriuVersion {
    major: 4,
    minor: 2,
    patch: 0,
};

/// A CRIU release number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CriuVersion {
    /// Major release.
    pub major: u32,
    /// Minor release.
    pub minor: u32,
    /// Patch level (0 when CRIU prints none).
    pub patch: u32,
}

impl fmt::Display for CriuVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// Why CRIU cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum CriuError {
    /// No `criu` binary on PATH or in the usual places.
    #[error("CRIU not found (looked for `criu` on PATH, /usr/local/sbin and /usr/sbin): run scripts/setup.sh to build CRIU >= {MIN_VERSION}")]
    NotFound,
    /// The binary could not be started.
    #[error("could not run {path}: {source}")]
    Exec {
        /// The binary.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// `criu --version` printed something Ferry does not understand.
    #[error("cannot read CRIU's version from {output:?}")]
    UnparsableVersion {
        /// What CRIU printed.
        output: String,
    },
    /// CRIU is older than Ferry supports.
    #[error("CRIU {found} at {path} is older than {MIN_VERSION}, which Ferry needs on this kernel: run scripts/setup.sh to build a newer one")]
    TooOld {
        /// The binary.
        path: PathBuf,
        /// Its version.
        found: CriuVersion,
    },
    /// `criu check` failed: the kernel or the binary lacks something.
    #[error("`criu check` failed for {path} (CRIU {version}): {excerpt}")]
    CheckFailed {
        /// The binary.
        path: PathBuf,
        /// Its version.
        version: CriuVersion,
        /// The last lines CRIU printed.
        excerpt: String,
    },
}

/// A CRIU installation that passed the version check.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Criu {
    /// Path of the binary.
    pub path: PathBuf,
    /// Its version.
    pub version: CriuVersion,
}

/// What a CRIU binary built with Ferry's patch (`scripts/criu/lazy-pages-elsewhere.patch`)
/// carries, followed by the patch's version.
pub const FERRY_PATCH_MARK: &[u8] = b"ferry-criu-patch-";

impl Criu {
    /// The version of Ferry's patch this CRIU was built with (0: none). Version 1 keeps lazy
    /// pages out of lazy dumps; version 2 also lets the lazy-pages daemon serve mappings of
    /// 2 GiB or more ([`LAZY_MAPPING_LIMIT`] without it).
    pub fn ferry_patch(&self) -> u32 {
        let Ok(bin) = std::fs::read(&self.path) else {
            return 0;
        };
        let Some(at) = bin
            .windows(FERRY_PATCH_MARK.len())
            .position(|w| w == FERRY_PATCH_MARK)
        else {
            // Version 1 named only its variable.
            let v1 = b"CRIU_LAZY_PAGES_ELSEWHERE";
            return u32::from(bin.windows(v1.len()).any(|w| w == v1));
        };
        let digits: Vec<u8> = bin[at + FERRY_PATCH_MARK.len()..]
            .iter()
            .take(4)
            .take_while(|b| b.is_ascii_digit())
            .copied()
            .collect();
        std::str::from_utf8(&digits)
            .ok()
            .and_then(|d| d.parse().ok())
            .unwrap_or(0)
    }
}

/// The longest mapping the lazy-pages daemon of an upstream CRIU (up to 4.2 at least) can
/// serve: it sizes its buffer by the longest lazy range in an `int`, which wraps at 2 GiB.
pub const LAZY_MAPPING_LIMIT: u64 = (1 << 31) - 4096;

/// Parses the output of `criu --version` (`Version: 4.2.1` or `Version: 4.2`).
pub fn parse_version(output: &str) -> Result<CriuVersion, CriuError> {
    let bad = || CriuError::UnparsableVersion {
        output: output.trim().chars().take(200).collect(),
    };
    let line = output
        .lines()
        .find_map(|l| l.trim().strip_prefix("Version:"))
        .ok_or_else(bad)?;
    let mut parts = line.trim().split('.');
    let mut next = |required: bool| -> Result<u32, CriuError> {
        match parts.next() {
            Some(p) => {
                let digits: String = p.chars().take_while(|c| c.is_ascii_digit()).collect();
                digits.parse().map_err(|_| bad())
            }
            None if required => Err(bad()),
            None => Ok(0),
        }
    };
    Ok(CriuVersion {
        major: next(true)?,
        minor: next(true)?,
        patch: next(false)?,
    })
}

/// Finds the CRIU binary: `$FERRY_CRIU`, then PATH, then the places setup installs to.
pub fn locate() -> Result<PathBuf, CriuError> {
    if let Some(p) = std::env::var_os("FERRY_CRIU") {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(CriuError::NotFound)
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin"].map(PathBuf::from))
        .map(|d| d.join("criu"))
        .find(|p| p.is_file())
        .ok_or(CriuError::NotFound)
}

/// Checks that the CRIU at `path` is new enough; returns it.
pub fn probe(path: &Path) -> Result<Criu, CriuError> {
    let out = Command::new(path)
        .arg("--version")
        .output()
        .map_err(|source| CriuError::Exec {
            path: path.to_owned(),
            source,
        })?;
    let version = parse_version(&String::from_utf8_lossy(&out.stdout))?;
    if version < MIN_VERSION {
        return Err(CriuError::TooOld {
            path: path.to_owned(),
            found: version,
        });
    }
    Ok(Criu {
        path: path.to_owned(),
        version,
    })
}

impl Criu {
    /// Locates and version-checks CRIU.
    pub fn discover() -> Result<Criu, CriuError> {
        probe(&locate()?)
    }

    /// Runs `criu check`: the kernel has what CRIU needs.
    pub fn check(&self) -> Result<(), CriuError> {
        let out = Command::new(&self.path)
            .arg("check")
            .output()
            .map_err(|source| CriuError::Exec {
                path: self.path.clone(),
                source,
            })?;
        if out.status.success() {
            return Ok(());
        }
        let mut text = String::from_utf8_lossy(&out.stderr).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stdout));
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let excerpt = lines[lines.len().saturating_sub(3)..].join(" | ");
        Err(CriuError::CheckFailed {
            path: self.path.clone(),
            version: self.version,
            excerpt,
        })
    }
}

impl Criu {
    /// Whether CRIU can restore lazily here (`criu check --feature uffd-noncoop`: the kernel's
    /// userfaultfd with fork, remap and unmap events); the error says what is missing.
    pub fn check_lazy_pages(&self) -> Result<(), String> {
        let out = Command::new(&self.path)
            .args(["check", "--feature", "uffd-noncoop"])
            .output()
            .map_err(|e| format!("cannot run {}: {e}", self.path.display()))?;
        if out.status.success() {
            return Ok(());
        }
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        Err(format!(
            "`criu check --feature uffd-noncoop` failed: {}",
            text.lines()
                .rfind(|l| !l.trim().is_empty())
                .unwrap_or("no output")
        ))
    }
}

/// Where CRIU keeps its kernel-feature cache (compiled in).
pub const KDAT_CACHE: &str = "/run/criu.kdat";

impl Criu {
    /// Makes sure CRIU's kernel-feature cache exists.
    ///
    /// CRIU probes the kernel at every start (about 25 ms here) unless it finds its cache in
    /// `/run/criu.kdat`, and it only writes that cache when `/run` is a tmpfs (so that a reboot
    /// into another kernel clears it). On hosts whose `/run` is not a tmpfs the cache never
    /// appears; this runs `criu check` once in a private mount namespace with a tmpfs on `/run`
    /// and installs the cache it wrote. Call it at every agent start, so the cache is always
    /// from the running kernel. Returns whether a cache was written.
    pub fn warm_kdat_cache(&self) -> Result<bool, CriuError> {
        let fs_type = Command::new("stat")
            .args(["-f", "-c", "%T", "/run"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_default();
        if fs_type == "tmpfs" {
            // CRIU manages its cache itself.
            let _ = std::fs::remove_file(KDAT_CACHE);
            return self.check().map(|_| true);
        }
        // A fresh directory only root can enter, under an unpredictable name: nobody can place
        // a link where the cache copy is written.
        let Ok(dir) = tempfile::Builder::new()
            .prefix("ferry-criu-kdat-")
            .tempdir()
        else {
            return Ok(false);
        };
        let tmp = dir.path().join("criu.kdat");
        let script = r#"mount -t tmpfs ferry-kdat /run && "$0" check >/dev/null 2>&1; cp /run/criu.kdat "$1""#;
        let out = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c", script])
            .arg(&self.path)
            .arg(&tmp)
            .output()
            .map_err(|source| CriuError::Exec {
                path: PathBuf::from("unshare"),
                source,
            })?;
        if !out.status.success() || !tmp.is_file() {
            let _ = std::fs::remove_file(&tmp);
            return Ok(false);
        }
        let staged = PathBuf::from(format!("{KDAT_CACHE}.ferry-{}", std::process::id()));
        let r = std::fs::copy(&tmp, &staged).and_then(|_| std::fs::rename(&staged, KDAT_CACHE));
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(&staged);
        Ok(r.is_ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_versions() {
        let v = parse_version("Version: 4.2.1\n").unwrap();
        assert_eq!(
            v,
            CriuVersion {
                major: 4,
                minor: 2,
                patch: 1
            }
        );
        let v = parse_version("Version: 3.17\nGitID: v3.17-1\n").unwrap();
        assert_eq!(v.to_string(), "3.17.0");
        assert!(v < MIN_VERSION);
        assert!(parse_version("criu: unknown").is_err());
        assert!(parse_version("Version: x.y").is_err());
    }

    #[test]
    fn too_old_is_refused() {
        let dir = std::env::temp_dir().join(format!("ferry-criu-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fake = dir.join("criu");
        std::fs::write(&fake, "#!/bin/sh\necho 'Version: 3.17.1'\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
        let err = probe(&fake).unwrap_err();
        assert!(matches!(err, CriuError::TooOld { .. }), "{err}");
        assert!(err.to_string().contains("3.17.1"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
