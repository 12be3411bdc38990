//! Types of the agent's HTTP/JSON API (documented in docs/api.md).

use std::net::{Ipv4Addr, Ipv6Addr};

use migrate_core::{Phase, Report, State};
use serde::{Deserialize, Serialize};

/// API version prefix of every route.
pub const API_PREFIX: &str = "/v1";

/// What a container is, independent of the host it runs on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ContainerSpec {
    /// Unique name.
    pub name: String,
    /// Overlay IPv4 address; stays the same across migrations.
    pub ip: Ipv4Addr,
    /// Overlay MAC, derived from the IP; stays the same across migrations.
    pub mac: String,
    /// Prefix length of the overlay network.
    pub prefix_len: u8,
    /// Overlay IPv6 address: the IPv4 address in the last 32 bits of fd00:f3::/64
    /// ([`ipv6_for_ip`], on [`OVERLAY6_PREFIX_LEN`]); stays the same across migrations. None
    /// (left out): a host without IPv6, or a container made before Ferry gave containers IPv6,
    /// which keeps IPv6 off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<Ipv6Addr>,
    /// Command and arguments run inside the container.
    pub args: Vec<String>,
    /// The image its root filesystem's base layer comes from (none: a root filesystem of its
    /// own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageRef>,
    /// How its process runs (environment, directory, user, capabilities), resolved at
    /// creation from the request and the image's config.
    #[serde(default)]
    pub process: ProcessSpec,
    /// Its memory and CPU limits.
    #[serde(default)]
    pub resources: Resources,
    /// Ports published on its host's underlay address (and, after it moves, on every host it
    /// left, for a while: see `redirect_ttl_s`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub published: Vec<Published>,
}

/// A TCP port of a container published on its host's underlay address (`ferry run --publish
/// HOSTPORT:PORT`): connections to `HOST:host_port` reach the container's `port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Published {
    /// The port on the host's underlay address.
    pub host_port: u16,
    /// The container's port.
    pub port: u16,
}

impl std::str::FromStr for Published {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("invalid published port {s:?}: expected HOSTPORT:PORT, such as 8080:80");
        let (h, c) = s.split_once(':').ok_or_else(bad)?;
        let p = Published {
            host_port: h.parse().map_err(|_| bad())?,
            port: c.parse().map_err(|_| bad())?,
        };
        if p.host_port == 0 || p.port == 0 {
            return Err(bad());
        }
        Ok(p)
    }
}

/// Docker's default `PATH`.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Docker's default capability set.
pub const DEFAULT_CAPS: [&str; 14] = [
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_RAW",
    "CAP_SYS_CHROOT",
    "CAP_MKNOD",
    "CAP_AUDIT_WRITE",
    "CAP_SETFCAP",
];

/// How a container's process runs. A spec saved before these fields existed reads as root in
/// `/` with `PATH` and `HOME` set and Docker's capabilities.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ProcessSpec {
    /// Environment, `KEY=VALUE` each.
    pub env: Vec<String>,
    /// Working directory (absolute).
    pub cwd: String,
    /// User id.
    pub uid: u32,
    /// Group id.
    pub gid: u32,
    /// Supplementary groups.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub additional_gids: Vec<u32>,
    /// Capabilities (bounding, effective and permitted sets), `CAP_` names.
    pub capabilities: Vec<String>,
}

impl Default for ProcessSpec {
    fn default() -> Self {
        ProcessSpec {
            env: vec![format!("PATH={DEFAULT_PATH}"), "HOME=/".into()],
            cwd: "/".into(),
            uid: 0,
            gid: 0,
            additional_gids: vec![],
            capabilities: DEFAULT_CAPS.iter().map(|c| c.to_string()).collect(),
        }
    }
}

/// A container's limits (none: unlimited).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Resources {
    /// Memory limit, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// CPU limit, thousandths of a core (1500: one and a half cores).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millis: Option<u64>,
}

/// The image a container runs from: its root filesystem is an overlay whose read-only lower
/// layer is the image's tree, materialized once per host, and whose upper layer is the
/// container's own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ImageRef {
    /// The image's name on the host it was started on.
    pub name: String,
    /// Its tree (blake3 of the tree's manifest): what the base layer holds, on every host.
    pub tree: String,
    /// How its author meant it to run (an OCI image's config), so that a host it reaches by
    /// a migration names it with that config too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<shared_fs::oci::ImageConfig>,
}

/// `POST /v1/containers`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct CreateContainer {
    /// Unique name (letters, digits, `-`, `_`; at most 32).
    pub name: String,
    /// Overlay address; allocated by the agent when absent.
    #[serde(default)]
    pub ip: Option<Ipv4Addr>,
    /// Command and arguments (empty: the image's, after its entrypoint).
    #[serde(default)]
    pub args: Vec<String>,
    /// Run from this image of the host's store (`ferry image ls`); none: a root filesystem
    /// with Ferry's workload binary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Replaces the image's entrypoint (and drops its command); `[]` clears it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// `KEY=VALUE` each, over the image's environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Working directory (default: the image's, else `/`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// `user`, `uid`, `user:group` or `uid:gid` (default: the image's, else root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Capabilities added to Docker's default set (`NET_ADMIN`, `CAP_SYS_PTRACE`, `ALL`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_add: Vec<String>,
    /// Capabilities removed from it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cap_drop: Vec<String>,
    /// Memory limit, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// CPU limit, cores (`1.5`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<f64>,
    /// TCP ports to publish on the host's underlay address.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub publish: Vec<Published>,
}

/// A container as listed by `GET /v1/containers`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ContainerInfo {
    /// Its spec.
    #[serde(flatten)]
    pub spec: ContainerSpec,
    /// The host it runs on.
    pub host: String,
    /// `running`, `paused` or `stopped` (as runc reports it), or `migrating`.
    pub state: String,
    /// Init process id in the host's PID namespace, while running.
    pub pid: Option<u32>,
    /// Resident memory of its processes, bytes (what a checkpoint of it carries), while
    /// running.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
}

/// Test-only fault injection for a migration (used by Ferry's fault tests).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct FaultHooks {
    /// Sleep this long at the start of the transfer phase (the container is frozen), so a test
    /// can cut the link, kill a peer or cancel during the transfer.
    #[serde(default)]
    pub pause_in_transfer_ms: u64,
    /// Damage the received images at the destination so that CRIU's restore fails for real.
    #[serde(default)]
    pub corrupt_images: bool,
    /// Flip one byte in one page of the memory workload (`ferry-workload mem`) inside the
    /// received images at the destination: the restore succeeds and the workload must notice.
    #[serde(default)]
    pub corrupt_memory_page: bool,
    /// Sleep this long after the restore was confirmed, before the commit is sent, so a test
    /// can cut the link right after the commit point.
    #[serde(default)]
    pub pause_before_commit_ms: u64,
    /// Add a stray file to the container's root at the destination after the final diff, so
    /// that its copy no longer matches the source's at the freeze and the migration rolls back.
    #[serde(default)]
    pub corrupt_rootfs: bool,
    /// Sleep this long in the dump, with the container frozen (stop-and-copy), so a test can
    /// kill the source agent there.
    #[serde(default)]
    pub pause_in_dump_ms: u64,
    /// Sleep this long at the destination before its restore, so a test can kill an agent
    /// while the restore runs.
    #[serde(default)]
    pub pause_in_restore_ms: u64,
    /// Sleep this long after the destination confirmed the commit, before the source cleans
    /// up, so a test can kill an agent right after the commit.
    #[serde(default)]
    pub pause_after_commit_ms: u64,
    /// Sleep [`FaultHooks::pause_in_phase_ms`] at the start of this phase (a cancel ends the
    /// sleep), so a test can act while the migration is in any phase.
    #[serde(default)]
    pub pause_in_phase: Option<migrate_core::Phase>,
    /// See [`FaultHooks::pause_in_phase`].
    #[serde(default)]
    pub pause_in_phase_ms: u64,
    /// Leave one page written since the last pre-copy round out of the final dump (a write
    /// the dirty tracking missed), so that a lazy restore's integrity check must find it.
    #[serde(default)]
    pub hide_dirty_page: bool,
    /// Pre-copy's main dirty-page tracking method refuses the first N processes, as if it
    /// could not attach to them: they are tracked by page hashes instead.
    #[serde(default)]
    pub refuse_tracking: u32,
}

/// `POST /v1/containers/{name}/migrate`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// Destination host name.
    pub to: String,
    /// How memory moves: `stop-copy` (all of it while frozen) or `pre-copy` (rounds while the
    /// container runs, then only what changed while frozen).
    #[serde(default)]
    pub mode: MigrateMode,
    /// Pre-copy settings (downtime budget, round limit, auto-converge); defaults when absent.
    /// Only with `mode: pre-copy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precopy: Option<migrate_core::PrecopyPolicy>,
    /// How long each phase may take before the migration rolls back.
    #[serde(default)]
    pub deadlines: Deadlines,
    /// Fault injection for tests.
    #[serde(default)]
    pub faults: FaultHooks,
    /// Move even to a destination whose CPU lacks instruction sets the source's has (a
    /// program that uses one dies with SIGILL there); the report warns.
    #[serde(default)]
    pub ignore_cpu_features: bool,
    /// Webhooks this migration calls (besides the source host's `hooks`): see [`Hook`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<Hook>,
}

/// How long the phases of a migration may take. A phase past its deadline fails, which rolls
/// the migration back (the container thawed at the source); the commands under it (runc, CRIU)
/// are killed. Transfers are not bounded in total time, only by progress: QUIC closes a
/// connection that carries nothing for its idle timeout.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Deadlines {
    /// The checkpoint (CRIU's dump, the container frozen), seconds.
    #[serde(default = "default_dump_s")]
    pub dump_s: f64,
    /// The restore at the destination, seconds.
    #[serde(default = "default_restore_s")]
    pub restore_s: f64,
    /// Every other request to the destination that moves no bulk data (preflight, redirect,
    /// abort), seconds.
    #[serde(default = "default_request_s")]
    pub request_s: f64,
}

fn default_dump_s() -> f64 {
    120.0
}

fn default_restore_s() -> f64 {
    120.0
}

fn default_request_s() -> f64 {
    15.0
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines {
            dump_s: default_dump_s(),
            restore_s: default_restore_s(),
            request_s: default_request_s(),
        }
    }
}

impl Deadlines {
    /// Checks that every deadline is a positive number of seconds, at most a day.
    pub fn validate(&self) -> Result<(), String> {
        for (name, v) in [
            ("dump_s", self.dump_s),
            ("restore_s", self.restore_s),
            ("request_s", self.request_s),
        ] {
            if !(v.is_finite() && v > 0.0 && v <= 86_400.0) {
                return Err(format!(
                    "deadlines.{name} is {v}: give seconds between 0 and 86400"
                ));
            }
        }
        Ok(())
    }

    /// [`Deadlines::dump_s`] as a duration.
    pub fn dump(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.dump_s)
    }

    /// [`Deadlines::restore_s`] as a duration.
    pub fn restore(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.restore_s)
    }

    /// [`Deadlines::request_s`] as a duration.
    pub fn request(&self) -> std::time::Duration {
        std::time::Duration::from_secs_f64(self.request_s)
    }
}

/// How a migration moves memory.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "kebab-case")]
pub enum MigrateMode {
    /// Freeze, dump everything, send it, restore.
    #[default]
    StopCopy,
    /// Copy memory and root filesystem changes in rounds while the container runs, then
    /// freeze and send only what changed since the last round.
    PreCopy,
}

impl MigrateMode {
    /// The name used in the API and the report.
    pub fn as_str(self) -> &'static str {
        match self {
            MigrateMode::StopCopy => "stop-copy",
            MigrateMode::PreCopy => "pre-copy",
        }
    }
}

/// A job as returned by `GET /v1/jobs/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct JobInfo {
    /// Job id.
    pub id: String,
    /// Current state of the migration.
    pub state: State,
    /// The report so far (final once `state` is terminal).
    pub report: Report,
}

/// One entry of the event stream `GET /v1/jobs/{id}/events` (newline-delimited JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct JobEvent {
    /// Sequence number from 0.
    pub seq: u64,
    /// Milliseconds since the job started.
    pub t_ms: f64,
    /// What happened.
    #[serde(flatten)]
    pub kind: JobEventKind,
}

/// What a job event says.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum JobEventKind {
    /// A phase began.
    PhaseStarted {
        /// Which.
        phase: Phase,
    },
    /// A phase ended.
    PhaseDone {
        /// Which.
        phase: Phase,
        /// How long it took, ms.
        duration_ms: f64,
        /// Bytes sent during it.
        bytes: u64,
    },
    /// A phase failed; a rollback follows if before the commit point.
    PhaseFailed {
        /// Which.
        phase: Phase,
        /// Why.
        error: String,
    },
    /// About every second while a phase runs for longer: the bytes the phase has sent to the
    /// destination so far (all of the link's traffic to it), and for a pre-copy round the
    /// bytes it set out to send.
    Progress {
        /// Which.
        phase: Phase,
        /// Since the phase started, ms.
        elapsed_ms: f64,
        /// Bytes sent on the link since the phase started.
        bytes: u64,
        /// A pre-copy round: the memory it sends, bytes (in the first round, the distinct
        /// pages the destination lacks once it was asked; else every page of the round, before
        /// deduplication).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        planned_bytes: Option<u64>,
    },
    /// A pre-copy round ended (right after its `phase_done`): what it sent, what the container
    /// dirtied meanwhile, the estimate and what the policy decided.
    Round {
        /// The round, as the report lists it.
        round: migrate_core::RoundReport,
    },
    /// The destination confirmed the restore: the source will not run again.
    Committed,
    /// The job ended; `report` is final.
    Finished {
        /// The final report.
        report: Box<Report>,
    },
}

/// What an operator asserts about a job whose destination cannot say whether it committed
/// (it is gone, or unreachable for good). Until then the container stays frozen at the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum Resolution {
    /// The destination runs the container: the source removes its frozen copy.
    Committed,
    /// The destination will never run it (its host is gone for good): the container runs on
    /// at the source. If the destination committed and comes back, two copies run.
    ResumeHere,
}

/// `POST /v1/jobs/{id}/resolve`: settles a job waiting for its destination's answer about
/// the commit.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ResolveRequest {
    /// What the operator knows of the destination.
    pub outcome: Resolution,
}

/// Answer to [`ResolveRequest`].
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ResolveAnswer {
    /// The job.
    pub job: String,
    /// Its container.
    pub container: String,
    /// The destination that did not answer.
    pub destination: String,
    /// The outcome applied.
    pub outcome: Resolution,
}

/// Body of every error response.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ApiError {
    /// Stable machine-readable code, e.g. `unknown_container`.
    pub code: String,
    /// What failed, with the value, and what to do.
    pub message: String,
}

/// Answer to `DELETE /v1/containers/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ContainerDeleted {
    /// The container removed.
    pub deleted: String,
}

/// Which of a container's output streams a [`LogRecord`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "lowercase")]
pub enum LogStream {
    /// The container's standard output.
    Stdout,
    /// The container's standard error.
    Stderr,
}

/// One line of a container's output, as `GET /v1/containers/{name}/logs` answers it (one JSON
/// object per line) and as the host keeps it (Docker's `json-file` format).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct LogRecord {
    /// When the host read it, RFC 3339 in UTC with nanoseconds.
    pub time: String,
    /// The stream it was written to.
    pub stream: LogStream,
    /// The text, with its newline; a line longer than 16 KiB or left unfinished comes in
    /// pieces without one. Bytes that are not UTF-8 read as U+FFFD.
    pub log: String,
}

/// A webhook an orchestrator gives a migration (`MigrateRequest.hooks`) or a host gives every
/// migration from it (the agent's `hooks`): the source agent POSTs a [`HookCall`] to `url` at
/// each of `events`. A `pre_migrate` hook may veto the migration (see [`HookAnswer`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct Hook {
    /// `http://host:port/path` (plain HTTP: put the receiver on a trusted network or
    /// loopback).
    pub url: String,
    /// When to call it (default: at every event).
    #[serde(default = "Hook::all_events")]
    pub events: Vec<HookEvent>,
    /// How long a call may take, ms (default 5000, at most 60000). A `pre_migrate` hook that
    /// does not answer in time vetoes the migration.
    #[serde(default = "Hook::default_timeout_ms")]
    pub timeout_ms: u64,
}

impl Hook {
    fn all_events() -> Vec<HookEvent> {
        vec![
            HookEvent::PreMigrate,
            HookEvent::Committed,
            HookEvent::RolledBack,
            HookEvent::Finished,
        ]
    }
    fn default_timeout_ms() -> u64 {
        5000
    }

    /// Why this hook cannot be used, if it cannot.
    pub fn check(&self) -> Result<(), String> {
        let rest = self
            .url
            .strip_prefix("http://")
            .ok_or_else(|| format!("hook url {:?}: only http:// URLs are called", self.url))?;
        let authority = rest.split('/').next().unwrap_or_default();
        if authority.is_empty() || self.url.len() > 2048 {
            return Err(format!("hook url {:?} names no host", self.url));
        }
        if !(1..=60_000).contains(&self.timeout_ms) {
            return Err(format!(
                "hook timeout_ms must be between 1 and 60000, got {}",
                self.timeout_ms
            ));
        }
        Ok(())
    }
}

/// When a [`Hook`] is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum HookEvent {
    /// Before anything moves: the hook may veto the migration.
    PreMigrate,
    /// The commit point passed: the destination owns the container.
    Committed,
    /// The migration rolled back: the container runs on at the source.
    RolledBack,
    /// The job ended, whatever its outcome (the report is final).
    Finished,
}

/// The body of a hook's call.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct HookCall {
    /// Why it is called.
    pub event: HookEvent,
    /// The host calling (the source).
    pub host: String,
    /// The job: id, state and report so far.
    pub job: JobInfo,
}

/// What a `pre_migrate` hook may answer: any 2xx allows the migration unless its body is this
/// with `allow: false`; any other status vetoes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct HookAnswer {
    /// Whether the migration may go on (default true).
    #[serde(default = "yes")]
    pub allow: bool,
    /// Why not, for the job's error.
    #[serde(default)]
    pub reason: Option<String>,
}

fn yes() -> bool {
    true
}

/// `GET /v1/pages`: the memory pages this host keeps by content hash (pre-copied pages of
/// incoming jobs, pages of containers that left or passed through).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PageStoreInfo {
    /// Pages held.
    pub pages: u64,
    /// The most it holds.
    pub max_pages: u64,
}

/// Answer to `DELETE /v1/pages`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct PagesForgotten {
    /// Pages forgotten.
    pub forgotten: u64,
    /// Pages kept because a running migration relies on them.
    pub kept: u64,
}

/// `GET /v1/containers/{name}/dirty-rate?ms=N[&throttle=P]`: how fast a container writes its
/// memory, measured over N ms with the best dirty-page tracking method of the host, optionally
/// with its CPU throttled by P percent (what pre-copy's auto-converge would do).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DirtyRate {
    /// Container name.
    pub container: String,
    /// Host it runs on.
    pub host: String,
    /// Tracking method (`uffd-wp`, `soft-dirty` or `page-hash`).
    pub method: String,
    /// Processes tracked.
    pub processes: usize,
    /// Measuring interval, ms.
    pub interval_ms: f64,
    /// Pages written during the interval.
    pub dirty_pages: u64,
    /// Pages of mappings created during the interval.
    pub new_mapping_pages: u64,
    /// Written pages per second, in MiB/s.
    pub mib_per_s: f64,
    /// CPU throttle in force while measuring, percent of the container's CPU time (0: none).
    #[serde(default)]
    pub throttle_pct: u32,
    /// CPU cores the container was allowed while throttled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_cores: Option<f64>,
}

/// `POST /v1/containers/{name}/exec`: a command to run in a running container, as its
/// process runs (user, environment, capabilities), without a terminal or input.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(deny_unknown_fields)]
pub struct ExecRequest {
    /// The command and its arguments.
    pub args: Vec<String>,
    /// `KEY=VALUE` entries added to the container's environment.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    /// Working directory (absolute; default: the container's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Killed after this many seconds (default 60, at most 3600).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
}

/// What `POST /v1/containers/{name}/exec` ran.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ExecResult {
    /// The exit code (128 + N for signal N); null when the command outlived its timeout and
    /// was killed.
    pub exit_code: Option<i32>,
    /// Standard output (lossy UTF-8), at most 1 MiB.
    pub stdout: String,
    /// Standard error (lossy UTF-8), at most 1 MiB.
    pub stderr: String,
    /// Whether an output said more than 1 MiB (the rest was dropped).
    pub truncated: bool,
    /// The command had ended by its timeout, but a process it left in the background kept its
    /// output open until then (redirect such a process's output: `cmd > /dev/null 2>&1 &`).
    #[serde(default)]
    pub output_held_open: bool,
}

/// `GET /v1/host`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct HostInfo {
    /// Host name.
    pub host: String,
    /// Underlay address.
    pub underlay_ip: Ipv4Addr,
    /// CRIU version, if usable.
    pub criu: Option<String>,
    /// Why CRIU is not usable, if it is not.
    pub criu_error: Option<String>,
    /// Peers this agent knows.
    pub peers: Vec<String>,
    /// The peers a container here can migrate to (those that run containers).
    #[serde(default)]
    pub targets: Vec<String>,
    /// The cgroup hierarchy containers get here (`cgroup v1`, `cgroup v2 (unified)`).
    #[serde(default)]
    pub cgroups: String,
    /// Memory the kernel can give without swapping (`MemAvailable`), bytes: what
    /// `ferry drain` places containers by.
    #[serde(default)]
    pub mem_available_bytes: u64,
    /// CPUs this host has.
    #[serde(default)]
    pub cpus: u32,
    /// One-minute load average.
    #[serde(default)]
    pub load1: f64,
    /// Containers on this host.
    #[serde(default)]
    pub containers: u32,
}

/// The overlay's IPv6 prefix: a unique local address range (RFC 4193) in which every
/// container's address carries its IPv4 address in the last 32 bits.
pub const OVERLAY6_PREFIX: Ipv6Addr = Ipv6Addr::new(0xfd00, 0xf3, 0, 0, 0, 0, 0, 0);
/// Prefix length of the overlay's IPv6 network (on-link for every container).
pub const OVERLAY6_PREFIX_LEN: u8 = 64;

/// Derives the overlay IPv6 address of a container from its IPv4 address (`10.232.0.10` ->
/// `fd00:f3::ae8:a`): as unique and as stable as the IPv4 address, with no allocation of its
/// own.
pub fn ipv6_for_ip(ip: Ipv4Addr) -> Ipv6Addr {
    let p = OVERLAY6_PREFIX.segments();
    let o = ip.octets();
    Ipv6Addr::new(
        p[0],
        p[1],
        p[2],
        p[3],
        0,
        0,
        u16::from_be_bytes([o[0], o[1]]),
        u16::from_be_bytes([o[2], o[3]]),
    )
}

/// Derives the overlay MAC of a container from its IP: locally administered, stable.
pub fn mac_for_ip(ip: Ipv4Addr) -> String {
    let o = ip.octets();
    format!("02:fe:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3])
}

/// The overlay a container address must belong to: the subnet of `first` (the first
/// address agents allocate) with `prefix_len`, less the addresses of hosts on it.
#[derive(Debug, Clone)]
pub struct Overlay<'a> {
    pub first: Ipv4Addr,
    pub prefix_len: u8,
    /// Overlay addresses that are not containers' (such as the lab's client host).
    pub reserved: &'a [Ipv4Addr],
}

impl Overlay<'_> {
    /// Why `ip` cannot be a container's address on this overlay: outside its subnet, the
    /// subnet's network or broadcast address, or reserved for a host.
    pub fn check(&self, ip: Ipv4Addr) -> Result<(), String> {
        let bits = u32::from(self.prefix_len.min(32));
        let mask = u32::MAX.checked_shl(32 - bits).unwrap_or(0);
        let net = u32::from(self.first) & mask;
        let broadcast = net | !mask;
        let subnet = format!("{}/{}", Ipv4Addr::from(net), self.prefix_len);
        let a = u32::from(ip);
        if a & mask != net {
            return Err(format!(
                "address {ip} is outside the overlay {subnet}: give an address in it, or none to get a free one"
            ));
        }
        if a == net || a == broadcast {
            return Err(format!(
                "address {ip} is the {} address of the overlay {subnet}, which no container can have",
                if a == net { "network" } else { "broadcast" }
            ));
        }
        if self.reserved.contains(&ip) {
            return Err(format!(
                "address {ip} of the overlay {subnet} belongs to a host, not a container"
            ));
        }
        Ok(())
    }
}

/// Checks a container name: 1-32 of `[A-Za-z0-9_-]`, not starting with `-`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ipv6_address_carries_the_ipv4_one() {
        let a = ipv6_for_ip(Ipv4Addr::new(10, 232, 0, 10));
        assert_eq!(a.to_string(), "fd00:f3::ae8:a");
        assert_ne!(a, ipv6_for_ip(Ipv4Addr::new(10, 232, 0, 11)));
        assert!(a.is_unique_local());
    }

    #[test]
    fn mac_is_stable_and_local() {
        assert_eq!(
            mac_for_ip(Ipv4Addr::new(10, 232, 0, 10)),
            "02:fe:0a:e8:00:0a"
        );
    }

    #[test]
    fn names() {
        assert!(valid_name("echo-1"));
        assert!(!valid_name(""));
        assert!(!valid_name("../x"));
        assert!(!valid_name("-x"));
        assert!(!valid_name(&"a".repeat(33)));
    }

    #[test]
    fn overlay_addresses_are_checked_against_the_subnet_and_its_hosts() {
        let client = Ipv4Addr::new(10, 232, 0, 2);
        let o = Overlay {
            first: Ipv4Addr::new(10, 232, 0, 10),
            prefix_len: 24,
            reserved: &[client],
        };
        assert_eq!(o.check(Ipv4Addr::new(10, 232, 0, 5)), Ok(()));
        assert_eq!(o.check(Ipv4Addr::new(10, 232, 0, 254)), Ok(()));
        for (ip, says) in [
            ("10.232.0.0", "network address"),
            ("10.232.0.255", "broadcast address"),
            ("10.232.1.6", "outside the overlay 10.232.0.0/24"),
            ("10.99.0.5", "outside the overlay 10.232.0.0/24"),
            ("10.232.0.2", "belongs to a host"),
        ] {
            let e = o.check(ip.parse().unwrap()).unwrap_err();
            assert!(e.contains(says) && e.contains(ip), "{ip}: {e}");
        }
        let wide = Overlay {
            first: Ipv4Addr::new(10, 0, 0, 1),
            prefix_len: 8,
            reserved: &[],
        };
        assert!(wide.check(Ipv4Addr::new(10, 200, 3, 4)).is_ok());
        assert!(wide.check(Ipv4Addr::new(10, 255, 255, 255)).is_err());
    }
}
