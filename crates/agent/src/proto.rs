//! The agent-to-agent protocol over QUIC (ALPN `ferry/1`, mutual TLS).
//!
//! Every request opens its own bidirectional stream: one framed JSON [`PeerRequest`], then for
//! some requests file trees (see `transfer::tree`), then the sender finishes its side and reads
//! one framed [`PeerResponse`].

use ferry_api::{ContainerInfo, ContainerSpec};
use serde::{Deserialize, Serialize};

/// Protocol version.
pub const PROTO_VERSION: u32 = 3;
/// Oldest version a peer answers: 3 changed [`PeerResponse::BaseMissing`] (ids stream after
/// the frame), which version 2 cannot read.
pub const MIN_PROTO_VERSION: u32 = 3;

/// Most page hashes one [`PeerRequest::HeldPages`] may carry (16 GiB of memory).
pub const MAX_HASHES: u64 = 1 << 22;
/// Pages in one [`PeerRequest::VerifyPages`] or [`PeerRequest::CorrectPages`] at most.
pub const MAX_VERIFY_PAGES: u64 = 4096;

fn lazy_unknown() -> Option<String> {
    Some("the destination does not say whether it can restore lazily".into())
}

fn default_restore_deadline_ms() -> u64 {
    120_000
}

/// A request from one agent to another.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum PeerRequest {
    /// Can you take container `name`? (CRIU, runc, free space, name unused.)
    Preflight {
        /// Protocol version of the sender.
        version: u32,
        /// Container name.
        name: String,
        /// The memory its checkpoint carries, bytes (0: unknown).
        #[serde(default)]
        memory_bytes: u64,
        /// Pre-copy: the memory also passes through the destination's page store.
        #[serde(default)]
        pre_copy: bool,
    },
    /// Containers you run (for name and address uniqueness).
    List,
    /// Prepare to receive `spec` for job `job`: namespace, bundle, packet hold. The root
    /// filesystem follows as a tree.
    Prepare {
        /// Job id.
        job: String,
        /// The container.
        spec: Box<ContainerSpec>,
        /// Pre-copy: the memory its rounds bring, bytes; the page store grows by that much
        /// for the job when it is fuller.
        #[serde(default)]
        memory_bytes: u64,
        /// The restore will be lazy (pre-copy with page placement): the destination starts
        /// its `runc restore` ahead in that mode.
        #[serde(default)]
        restore_lazily: bool,
        /// What the container's first process holds as descriptors 0, 1 and 2 (runc's
        /// `descriptors.json`: `/dev/null`, `pipe:[inode]`): a runc restore started ahead reads
        /// them before the images come.
        #[serde(default)]
        descriptors: Option<Vec<String>>,
        /// The container's fencing token in etcd (the revision of its record the source
        /// read at the preflight): the destination's commit moves the record only if it is
        /// unchanged. Absent without etcd.
        #[serde(default)]
        fence: Option<i64>,
    },
    /// Point `mac` at `host`'s VTEP in your overlay (`None`: forget it).
    Route {
        /// Container MAC.
        mac: String,
        /// Host where it lives now.
        host: Option<String>,
    },
    /// CRIU images follow as a tree, then the root filesystem's final diff as a tree.
    Images {
        /// Job id.
        job: String,
        /// Test hook: damage the images so that the restore fails.
        corrupt: bool,
        /// Test hook: flip one byte in one page of the memory workload, so the restore
        /// succeeds with damaged memory.
        #[serde(default)]
        corrupt_page: bool,
        /// Test hook: add a stray file to the root here after the final diff.
        #[serde(default)]
        corrupt_rootfs: bool,
        /// [`shared_fs::Snapshot::digest`] of the source's root filesystem at the freeze: the
        /// destination's copy must match it once the final diff is applied.
        #[serde(default)]
        rootfs_digest: Option<String>,
    },
    /// Pre-copy: which of these pages do you hold? `count` blake3 page hashes (32 bytes
    /// each, raw) follow the message; the answer is [`PeerResponse::Held`].
    HeldPages {
        /// Job id.
        job: String,
        /// Number of hashes that follow (at most [`MAX_HASHES`]).
        count: u64,
    },
    /// Pre-copy: a page stream (`transfer::pages`) follows; keep the pages for `job`.
    Pages {
        /// Job id.
        job: String,
    },
    /// Pre-copy: a file-tree diff of the root filesystem follows; apply it.
    RootfsRound {
        /// Job id.
        job: String,
    },
    /// Do you hold base tree `tree` (the tree and every chunk it uses)? Answer:
    /// [`PeerResponse::BaseHeld`].
    BaseHave {
        /// Tree id.
        tree: String,
    },
    /// Tree `tree`'s bytes follow (`len`, at most `shared_fs::store::MAX_TREE_BYTES`). Answer:
    /// [`PeerResponse::BaseMissing`] followed by the raw 32-byte ids of the chunks it uses
    /// that you lack (a list of any length streams; no frame carries it).
    BaseTree {
        /// Tree id (the blake3 of the bytes).
        tree: String,
        /// Their length.
        len: u64,
    },
    /// The chunks of tree `tree` you said you lack follow: per chunk its 32-byte blake3, a
    /// big-endian u32 length (at most `shared_fs::store::CHUNK_MAX`) and the bytes. Store
    /// them and the tree.
    BaseChunks {
        /// Tree id.
        tree: String,
        /// Chunks that follow.
        count: u64,
    },
    /// Final dump: the stream carries CRIU's page-server conversation through
    /// `precopy::relay` from here on (no JSON answer). Write the pages of `job` into its
    /// images directory.
    DumpPages {
        /// Job id.
        job: String,
    },
    /// Restore the container of `job` from the received images.
    Restore {
        /// Job id.
        job: String,
        /// Test hook: sleep this long before restoring (refused unless fault hooks are allowed).
        #[serde(default)]
        pause_ms: u64,
        /// Kill the restore (and remove the copy) if it takes longer than this.
        #[serde(default = "default_restore_deadline_ms")]
        deadline_ms: u64,
        /// Restore lazily: the images leave out lazy memory, which a `criu lazy-pages` daemon
        /// fills from this host's page store (where [`PeerRequest::PageMap`] placed it) while
        /// the container runs.
        #[serde(default)]
        lazy: bool,
        /// The images request was sent just before this one, whose answer the source does not
        /// wait for: the restore waits until the images are here (and fails if they failed).
        #[serde(default)]
        after_images: bool,
        /// The final dump's pages were relayed to this host's page server and the source did
        /// not wait for its close: the restore waits until the page server has written them
        /// (and fails if it did not).
        #[serde(default)]
        after_pages: bool,
    },
    /// Pre-copy with lazy restore: `count` location records (`transfer::lists::Location`)
    /// follow, saying which page of the store is at which address of which process. Every
    /// page they name must already be in the store (sent or held for this job).
    PageMap {
        /// Job id.
        job: String,
        /// Records that follow.
        count: u64,
        /// A page stream (`transfer::pages`) follows the records: pages they name that the
        /// destination may lack, stored before the records are placed (one round trip for
        /// pages and places).
        #[serde(default)]
        with_pages: bool,
    },
    /// Answer when the lazy restore of `job` has filled in all its memory (or failed):
    /// [`PeerResponse::Filled`].
    FillWait {
        /// Job id.
        job: String,
    },
    /// Integrity check of a lazy restore: `count` location records follow, the hashes of the
    /// source's frozen copy (sequence numbers unused). Compare them with the pages the
    /// destination restores: [`PeerResponse::Verified`]. A mismatched page not yet given to
    /// the container is held back until [`PeerRequest::CorrectPages`] brings it.
    VerifyPages {
        /// Job id.
        job: String,
        /// Records that follow (at most [`MAX_VERIFY_PAGES`] pages in all).
        count: u64,
        /// The check has no more pages after these.
        #[serde(default)]
        done: bool,
    },
    /// The frozen copy's contents of pages [`PeerResponse::Verified`] asked for: `count`
    /// location records follow, then the pages they name, 4096 bytes each, in order.
    CorrectPages {
        /// Job id.
        job: String,
        /// Records that follow (at most [`MAX_VERIFY_PAGES`] pages in all).
        count: u64,
    },
    /// Sent by a lazy restore's destination to its source: `nr_pages` pages (at most 1024)
    /// of process `pid` (container namespace) from `vaddr`, read from the frozen copy. The
    /// answer is [`PeerResponse::Fetched`] followed by the pages, 4096 bytes each.
    FetchPages {
        /// Job id.
        job: String,
        /// Process, as the container numbers it.
        pid: u32,
        /// First page's address.
        vaddr: u64,
        /// Pages.
        nr_pages: u64,
    },
    /// Commit point passed: release held packets, announce the container, own it.
    Commit {
        /// Job id.
        job: String,
        /// Sent by a restarted source that may or may not have sent the commit before: a job
        /// not restored here yet is aborted (answered `Aborted`) instead of waited for.
        #[serde(default)]
        recovered: bool,
    },
    /// After the commit of `job`, which moved container `name` here: what its old host kept of
    /// its output; `bytes` bytes of log records (`ferry_runtime::console`) follow.
    Logs {
        /// Job id.
        job: String,
        /// Container name.
        name: String,
        /// Bytes that follow (at most `console::HISTORY_CAP`).
        bytes: u64,
    },
    /// Forget `job`: remove everything it created here.
    Abort {
        /// Job id.
        job: String,
    },
}

/// An answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum PeerResponse {
    /// Done; `bytes` received for it.
    Ok {
        /// Bytes the request carried.
        bytes: u64,
    },
    /// Answer to [`PeerRequest::HeldPages`]: one bit per hash asked, in order (bit `i % 8` of
    /// byte `i / 8`), set when the page is held; hex-encoded.
    Held {
        /// The bitmap, hex.
        bitmap: String,
    },
    /// Preflight answer.
    Preflight {
        /// CRIU version there.
        criu: String,
        /// runc version there.
        runc: String,
        /// Free bytes in the agent's state directory.
        free_bytes: u64,
        /// Pages in its page store (0: a pre-copy need not ask which pages it holds).
        #[serde(default)]
        pages_held: u64,
        /// Why it cannot restore lazily (`None`: it can).
        #[serde(default = "lazy_unknown")]
        no_lazy_restore: Option<String>,
        /// Free bytes where CRIU's images go there (a tmpfs, usually smaller than the state
        /// directory's disk); `None` from agents that do not tell.
        #[serde(default)]
        images_free_bytes: Option<u64>,
        /// The longest memory mapping its lazy restore can serve (`None`: any).
        #[serde(default)]
        lazy_max_mapping_bytes: Option<u64>,
        /// The instruction-set flags its CPU offers containers (`None`: it does not tell).
        #[serde(default)]
        cpu_flags: Option<Vec<String>>,
    },
    /// Answer to [`PeerRequest::BaseHave`].
    BaseHeld {
        /// The tree and all its chunks are here.
        held: bool,
    },
    /// Answer to [`PeerRequest::BaseTree`]: `count` chunks to send, their raw 32-byte ids
    /// right after this frame.
    BaseMissing {
        /// How many ids follow.
        count: u64,
    },
    /// Containers there.
    List {
        /// The containers.
        containers: Vec<ContainerInfo>,
    },
    /// Answer to [`PeerRequest::Commit`]: the job is not (or no longer) here and was never
    /// committed here (its copy timed out, was aborted or removed at a restart): the source
    /// keeps its container.
    Aborted {
        /// Job id.
        job: String,
    },
    /// Answer to [`PeerRequest::FillWait`]: every lazy page was copied in.
    Filled {
        /// Pages the lazy-pages daemon asked for and got from the page store.
        pages: u64,
        /// Its requests.
        requests: u64,
        /// Milliseconds from the end of the restore to the last page.
        fill_ms: u64,
        /// What the integrity check found here (the destination's count is authoritative:
        /// it alone knows which pages the container had used).
        #[serde(default)]
        integrity: Option<migrate_core::IntegrityReport>,
        /// Pages fetched from the source's frozen copy (post-copy).
        #[serde(default)]
        fetched_pages: u64,
        /// Of them, pages a fault of the container asked for.
        #[serde(default)]
        fetched_on_fault: u64,
    },
    /// Answer to [`PeerRequest::VerifyPages`].
    Verified {
        /// Pages compared.
        checked: u64,
        /// (pid, address) of mismatched pages not yet given to the container: send them with
        /// [`PeerRequest::CorrectPages`].
        correct: Vec<(u32, u64)>,
        /// Mismatched pages the container already had: too late to correct.
        stale: u64,
    },
    /// Answer to [`PeerRequest::CorrectPages`].
    Corrected {
        /// Pages replaced before the container used them.
        corrected: u64,
        /// Pages that arrived after the container had used the stale copy.
        stale: u64,
    },
    /// Answer to [`PeerRequest::FetchPages`]: this many pages follow.
    Fetched {
        /// Pages that follow.
        nr_pages: u64,
    },
    /// Refused or failed.
    Error {
        /// What kind of failure: the requester decides from this, never from the message.
        #[serde(default)]
        code: ErrorCode,
        /// Whether the same request may succeed if sent again later.
        #[serde(default)]
        retryable: bool,
        /// What failed, with the value, and what to do.
        message: String,
    },
}

/// What kind of failure a [`PeerResponse::Error`] reports.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Malformed, out of bounds, or in a protocol version this peer does not speak.
    BadRequest,
    /// The job belongs to another peer, or a fault hook is asked of a host that refuses them.
    Forbidden,
    /// No such job (it expired, was aborted or never came) or page here.
    NotFound,
    /// Clashes with what this host holds: a container of that name or address, a job already
    /// received.
    Conflict,
    /// This host lacks the room (memory, disk, page store) for it.
    NoRoom,
    /// This host cannot do it at all: it runs no containers, or its CRIU or runc is unusable.
    Unavailable,
    /// Briefly unable (a limit on work in progress): the same request may succeed later.
    Busy,
    /// The work itself failed here (CRIU, runc, I/O, a check of what arrived).
    #[default]
    Failed,
    /// A code this agent does not know (a newer peer's).
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// Whether a request refused with this code may succeed if sent again later.
    pub fn retryable(self) -> bool {
        matches!(self, ErrorCode::Busy)
    }
}

/// A failure with its [`ErrorCode`], raised where a peer's request is handled; the answer
/// carries the code ([`PeerResponse::error`]). Any other error is answered as
/// [`ErrorCode::Failed`].
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// What kind of failure.
    pub code: ErrorCode,
    /// What failed, with the value, and what to do.
    pub message: String,
}

/// A [`Refusal`] as an error to return from a request's handler.
pub fn refuse(code: ErrorCode, message: impl Into<String>) -> anyhow::Error {
    Refusal {
        code,
        message: message.into(),
    }
    .into()
}

/// A peer's error answer as its requester sees it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{host}: {message}")]
pub struct PeerError {
    /// The peer that answered.
    pub host: String,
    /// What kind of failure.
    pub code: ErrorCode,
    /// Whether the same request may succeed if sent again later.
    pub retryable: bool,
    /// The peer's message.
    pub message: String,
}

impl PeerError {
    /// The [`PeerError`] in `e`'s chain, if a peer's answer caused it.
    pub fn of(e: &anyhow::Error) -> Option<&PeerError> {
        e.chain().find_map(|c| c.downcast_ref::<PeerError>())
    }
}

impl PeerResponse {
    /// The answer to a request whose handling failed with `e`: the code of the first
    /// [`Refusal`] in its chain, else [`ErrorCode::Failed`]; the message is the whole chain.
    pub fn error(e: &anyhow::Error) -> PeerResponse {
        let code = e
            .chain()
            .find_map(|c| c.downcast_ref::<Refusal>())
            .map_or(ErrorCode::Failed, |r| r.code);
        PeerResponse::Error {
            code,
            retryable: code.retryable(),
            message: format!("{e:#}"),
        }
    }

    /// An [`PeerResponse::Error`] answer from `host` as a [`PeerError`]; any other answer is
    /// unexpected here.
    pub fn into_error(self, host: &str) -> anyhow::Error {
        match self {
            PeerResponse::Error {
                code,
                retryable,
                message,
            } => PeerError {
                host: host.to_string(),
                code,
                retryable,
                message,
            }
            .into(),
            other => anyhow::anyhow!("{host} answered unexpectedly: {other:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn an_answer_carries_the_code_of_the_refusal_in_the_chain() {
        let e = Err::<(), _>(refuse(ErrorCode::Busy, "3 base layers are on their way"))
            .context("receiving base tree abc")
            .unwrap_err();
        match PeerResponse::error(&e) {
            PeerResponse::Error {
                code,
                retryable,
                message,
            } => {
                assert_eq!(code, ErrorCode::Busy);
                assert!(retryable);
                assert_eq!(
                    message,
                    "receiving base tree abc: 3 base layers are on their way"
                );
            }
            other => panic!("{other:?}"),
        }
        // Any other failure is final.
        let e = anyhow::anyhow!("CRIU's restore failed");
        assert!(matches!(
            PeerResponse::error(&e),
            PeerResponse::Error {
                code: ErrorCode::Failed,
                retryable: false,
                ..
            }
        ));
    }

    #[test]
    fn the_requester_sees_the_code_not_only_the_message() {
        let wire = serde_json::to_string(&PeerResponse::error(&refuse(
            ErrorCode::NotFound,
            "no prepared job j1 here",
        )))
        .unwrap();
        let resp: PeerResponse = serde_json::from_str(&wire).unwrap();
        let e = Err::<(), _>(resp.into_error("h2"))
            .context("the restore")
            .unwrap_err();
        let p = PeerError::of(&e).expect("a peer error in the chain");
        assert_eq!(
            (p.host.as_str(), p.code, p.retryable),
            ("h2", ErrorCode::NotFound, false)
        );
        assert_eq!(format!("{e:#}"), "the restore: h2: no prepared job j1 here");
        // A local failure is no peer's answer.
        assert!(PeerError::of(&anyhow::anyhow!("connection lost")).is_none());
        // Any other answer where an error is turned into one is unexpected.
        let e = PeerResponse::Fetched { nr_pages: 1 }.into_error("h2");
        assert!(PeerError::of(&e).is_none());
        assert!(format!("{e}").contains("h2 answered unexpectedly"), "{e}");
    }

    #[test]
    fn answers_of_older_and_newer_peers_are_read() {
        // Before codes: a failure, final.
        let old: PeerResponse =
            serde_json::from_str(r#"{"result":"error","message":"boom"}"#).unwrap();
        assert!(matches!(
            old,
            PeerResponse::Error {
                code: ErrorCode::Failed,
                retryable: false,
                ..
            }
        ));
        // A code this agent does not know keeps the peer's word on retrying.
        let newer: PeerResponse = serde_json::from_str(
            r#"{"result":"error","code":"quota_exceeded","retryable":true,"message":"later"}"#,
        )
        .unwrap();
        assert!(matches!(
            newer,
            PeerResponse::Error {
                code: ErrorCode::Unknown,
                retryable: true,
                ..
            }
        ));
    }
}
