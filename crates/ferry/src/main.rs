//! `ferry`: live migration of Linux containers between hosts.

// A binary: `pub` marks what modules share, nothing is exported.
#![allow(unreachable_pub)]
#![forbid(unsafe_code)]

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Ferry moves running containers between hosts, keeping their IP and TCP connections.
#[derive(Parser)]
#[command(name = "ferry", version, about)]
struct Cli {
    /// Directory of the local lab's files.
    #[arg(long, global = true, default_value = ferry_lab::lab::LAB_DIR)]
    lab_dir: PathBuf,
    /// Reach the agents over TCP with mutual TLS as this cluster file says (the operator's
    /// certificate and each host's API address; see docs/deploy.md), not the local lab's
    /// sockets; also FERRY_CLUSTER.
    #[arg(long, global = true)]
    cluster: Option<PathBuf>,
    /// Log filter (e.g. `info`, `ferry=debug`); also FERRY_LOG.
    #[arg(long, global = true)]
    log: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The local lab: hosts as network namespaces on one machine.
    Lab {
        #[command(subcommand)]
        cmd: LabCmd,
    },
    /// Certificates for a cluster: its CA, a host's, an operator's.
    Pki {
        #[command(subcommand)]
        cmd: PkiCmd,
    },
    /// Run the agent of one host.
    Agent {
        /// Agent configuration (JSON).
        #[arg(long)]
        config: PathBuf,
    },
    /// Start a container on a host.
    Run {
        /// Host to run on.
        #[arg(long)]
        on: String,
        /// Container name.
        #[arg(long)]
        name: String,
        /// Overlay address (allocated when absent).
        #[arg(long)]
        ip: Option<std::net::Ipv4Addr>,
        /// Run from this image of the host's store: an overlay root whose base is shared by
        /// every container using the image (`ferry image import`). Without a command, the
        /// image's entrypoint and command run, with its environment, directory and user.
        #[arg(long)]
        image: Option<String>,
        /// Environment variable `KEY=VALUE` (or `KEY`: its value here), over the image's;
        /// repeat for more.
        #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Working directory (default: the image's, else /).
        #[arg(long, short = 'w')]
        workdir: Option<String>,
        /// User: name, uid, name:group or uid:gid (default: the image's, else root).
        #[arg(long, short = 'u')]
        user: Option<String>,
        /// Replaces the image's entrypoint (and drops its command); "" clears it.
        #[arg(long)]
        entrypoint: Option<String>,
        /// Capability added to Docker's default set (NET_ADMIN, SYS_PTRACE, ALL); repeat for more.
        #[arg(long = "cap-add", value_name = "CAP")]
        cap_add: Vec<String>,
        /// Capability removed from it (NET_RAW, ALL); repeat for more.
        #[arg(long = "cap-drop", value_name = "CAP")]
        cap_drop: Vec<String>,
        /// Memory limit: bytes, or with a unit (512m, 2g).
        #[arg(long, short = 'm', value_parser = parse_size)]
        memory: Option<u64>,
        /// CPU limit in cores (1.5).
        #[arg(long)]
        cpus: Option<f64>,
        /// Publish a TCP port on the host's underlay address: HOSTPORT:PORT (repeat for
        /// more). After the container moves, the old host forwards it there for a while.
        #[arg(long, short = 'p')]
        publish: Vec<ferry_api::Published>,
        /// Command and arguments (default: the image's).
        #[arg(last = true)]
        cmd: Vec<String>,
    },
    /// The hosts' image stores: import, list, remove, collect.
    Image {
        #[command(subcommand)]
        cmd: ImageCmd,
    },
    /// List containers on every host.
    Ps {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop a container (TERM, then KILL after --timeout-s); it keeps its name, address and
    /// root, and `ferry start` runs it again.
    Stop {
        /// Container name.
        name: String,
        /// Seconds between TERM and KILL.
        #[arg(long, default_value_t = 10)]
        timeout_s: u64,
    },
    /// Run a stopped container again.
    Start {
        /// Container name.
        name: String,
    },
    /// Run a command in a running container (no terminal, no input); its output and exit code
    /// are this command's.
    Exec {
        /// Container name.
        name: String,
        /// Environment variable `KEY=VALUE` added to the container's; repeat for more.
        #[arg(long = "env", short = 'e', value_name = "KEY=VALUE")]
        env: Vec<String>,
        /// Working directory (default: the container's).
        #[arg(long, short = 'w')]
        workdir: Option<String>,
        /// Kill the command after this many seconds (exit code 124).
        #[arg(long, default_value_t = 60)]
        timeout_s: u64,
        /// Command and arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Print a container's output (stdout and stderr), kept across its moves.
    Logs {
        /// Container name.
        name: String,
        /// Only the last N lines.
        #[arg(long, short = 'n')]
        tail: Option<usize>,
        /// Keep printing what the container writes, until it stops or leaves its host.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Prefix each line with the time its host read it (RFC 3339, UTC).
        #[arg(long, short = 't')]
        timestamps: bool,
    },
    /// Reads a container's output into its log; the agent starts one per container.
    #[command(name = "console-shim", hide = true)]
    ConsoleShim {
        /// The container's log directory.
        #[arg(long)]
        dir: PathBuf,
        /// Size at which a log file is started again.
        #[arg(long, default_value_t = ferry_runtime::console::DEFAULT_MAX_BYTES)]
        max_bytes: u64,
        /// Run as the shim that stays (the first one starts it and ends).
        #[arg(long)]
        detached: bool,
    },
    /// Stop and remove a container.
    Rm {
        /// Container name.
        name: String,
    },
    /// Live-migrate a container to another host.
    Migrate(cli::migrate::MigrateArgs),
    /// Move every container off a host (before maintenance, say): destinations chosen by
    /// the free memory and CPU load each agent reports, memory-heavy containers kept apart,
    /// refused before anything moves when the other hosts lack room. Exit code 0 when all
    /// moved, 2 when some stayed.
    Drain {
        /// The host to empty.
        host: String,
        /// Most migrations at a time.
        #[arg(long, default_value_t = 2)]
        parallel: usize,
        /// Move with stop-and-copy (all memory while frozen) instead of pre-copy (memory
        /// copied while the containers run, the shortest freeze).
        #[arg(long)]
        stop_copy: bool,
        /// Containers with at least this much memory (MiB) are kept apart.
        #[arg(long, default_value_t = 512)]
        heavy_mib: u64,
        /// Memory each destination keeps free after its new containers (MiB).
        #[arg(long, default_value_t = 256)]
        reserve_mib: u64,
        /// Print the plan only; nothing moves.
        #[arg(long)]
        dry_run: bool,
        /// Print the drain's report as JSON on stdout (progress stays on stderr).
        #[arg(long)]
        json: bool,
    },
    /// Measure how fast a container writes its memory (dirty pages per second).
    DirtyRate {
        /// Container name.
        name: String,
        /// Measuring interval, ms.
        #[arg(long, default_value_t = 1000)]
        ms: u64,
        /// Throttle the container's CPU by this percent while measuring (what pre-copy's
        /// auto-converge would do), then lift it.
        #[arg(long, default_value_t = 0)]
        throttle: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show a migration job: a summary, or with --wait its progress to the end (exit code 0
    /// moved, 2 rolled back, 1 failed).
    Job {
        /// Job id.
        id: String,
        /// Follow the job to its end.
        #[arg(long)]
        wait: bool,
        /// Print the job as JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the migration jobs of every host, newest first.
    Jobs {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a migration job (before its commit point).
    Cancel {
        /// Job id.
        id: String,
    },
    /// Settle by hand a migration whose destination cannot say whether it committed (its
    /// host is gone): the container stays frozen at the source until the destination answers
    /// or this command says what happened.
    #[command(group(clap::ArgGroup::new("outcome").required(true).args(["resume_here", "committed"])))]
    Resolve {
        /// Job id (the source's log names it).
        id: String,
        /// The destination is gone for good and never runs the container: it runs on at the
        /// source. If the destination committed and comes back, two copies run.
        #[arg(long)]
        resume_here: bool,
        /// The destination runs the container: the source removes its frozen copy.
        #[arg(long)]
        committed: bool,
    },
    /// Measure an echo container from a client: gaps, errors, round trips.
    Probe {
        /// Echo server address.
        #[arg(long)]
        target: std::net::SocketAddr,
        /// Milliseconds between requests.
        #[arg(long, default_value_t = 1.0)]
        interval_ms: f64,
        /// Stop after this many seconds.
        #[arg(long)]
        duration_s: Option<f64>,
        /// Stop when this file appears.
        #[arg(long)]
        stop_file: Option<PathBuf>,
        /// Gaps above this many ms count as time above threshold.
        #[arg(long, default_value_t = 20.0)]
        threshold_ms: f64,
        /// Include every sample in the report.
        #[arg(long)]
        series: bool,
        /// After stopping, wait up to this many seconds for answers still due.
        #[arg(long, default_value_t = 5.0)]
        drain_s: f64,
    },
    /// Benchmark: a matrix of scenarios in a fresh lab, Ferry and the hand-made baseline side by
    /// side under a 1 ms probe; writes JSON, a Markdown table and SVG charts.
    Bench {
        /// The quick matrix (about 3 min): echo, echo next to 120 processes, and 256 MiB of
        /// memory dirtied at 0 and 50 MiB/s, on an unshaped and a 1 Gbit/s link, in stop-copy
        /// and pre-copy mode.
        #[arg(long)]
        quick: bool,
        /// Memory workload sizes in MiB (default 256,1024,4096; those that fit in memory).
        #[arg(long, value_delimiter = ',')]
        sizes_mib: Option<Vec<u64>>,
        /// Memory workload dirty rates in MiB/s (default 0,50).
        #[arg(long, value_delimiter = ',')]
        dirty_mib_s: Option<Vec<f64>>,
        /// Underlay link rates (default unshaped,1gbit).
        #[arg(long, value_delimiter = ',')]
        link_rates: Option<Vec<String>>,
        /// Ferry migration modes (default stop-copy,pre-copy).
        #[arg(long, value_delimiter = ',', value_enum)]
        modes: Option<Vec<ferry_lab::bench::Mode>>,
        /// Leave out the echo container.
        #[arg(long)]
        no_echo: bool,
        /// Scenarios of the echo server next to this many sleeping processes (default 120;
        /// 0 for none).
        #[arg(long, value_delimiter = ',')]
        processes: Option<Vec<u32>>,
        /// Leave out the hand-made baseline.
        #[arg(long)]
        no_baseline: bool,
        /// Probe request interval, ms.
        #[arg(long, default_value_t = 1.0)]
        interval_ms: f64,
        /// Output directory (results.json, results.md, charts/).
        #[arg(long, default_value = "bench-results")]
        out: PathBuf,
        /// Leave the lab up afterwards.
        #[arg(long)]
        keep: bool,
    },
    /// Bring up a lab, migrate an echo container there and back under a live client, report.
    Demo {
        /// Print one JSON document.
        #[arg(long)]
        json: bool,
        /// Leave the lab up afterwards.
        #[arg(long)]
        keep: bool,
        /// Skip the hand-made runc baseline.
        #[arg(long)]
        no_baseline: bool,
    },
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Import a root filesystem directory or an OCI image layout into a host's store. Content
    /// is stored once per host, however many images share it.
    Import {
        /// Host whose store receives it.
        #[arg(long)]
        on: String,
        /// Name of the image (letters, digits, `._-:/@`).
        #[arg(long)]
        name: String,
        /// For an OCI layout with several images: the one to import (its ref name).
        #[arg(long = "ref")]
        oci_ref: Option<String>,
        /// A root filesystem directory, an OCI image layout directory, or an OCI layout
        /// archive (`docker save` since Docker 25, `skopeo copy ... oci-archive:`).
        path: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List the images of every host (or one).
    Ls {
        /// Only this host.
        #[arg(long)]
        on: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Remove an image's name from a host (its content goes at the next gc).
    Rm {
        /// Host.
        #[arg(long)]
        on: String,
        /// Image name.
        name: String,
    },
    /// Remove the content no image and no container of a host uses.
    Gc {
        /// Host.
        #[arg(long)]
        on: String,
    },
}

/// `ferry pki`: certificates for a cluster.
#[derive(Subcommand)]
enum PkiCmd {
    /// Create the cluster's CA (ca.pem, ca.key) in DIR; an existing one is kept.
    Init {
        /// Where the CA lives (keep ca.key there, readable by root only).
        #[arg(long, default_value = "/etc/ferry/pki")]
        dir: PathBuf,
        /// The CA's name.
        #[arg(long, default_value = "ferry cluster CA")]
        name: String,
    },
    /// Issue HOST.pem and HOST.key for a host's agent (peers and API), signed by the CA.
    Issue {
        /// The host's name, as agents and the cluster file call it (a DNS name).
        host: String,
        /// An address of the host (its underlay address, where its API listens); repeat for
        /// more.
        #[arg(long = "ip", value_name = "ADDR")]
        ips: Vec<std::net::IpAddr>,
        /// The CA's directory.
        #[arg(long, default_value = "/etc/ferry/pki")]
        dir: PathBuf,
        /// Where to write the certificate and key (default: the CA's directory).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Issue NAME.pem and NAME.key for an operator (a person or an orchestrator): the agents'
    /// API over TCP serves it, not hosts' certificates.
    Operator {
        /// The operator's name.
        name: String,
        /// The CA's directory.
        #[arg(long, default_value = "/etc/ferry/pki")]
        dir: PathBuf,
        /// Where to write the certificate and key (default: the CA's directory).
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
enum LabCmd {
    /// Create hosts h1..hN and client, the overlay, certificates, and start the agents.
    Up {
        /// Number of container hosts.
        #[arg(long, default_value_t = 2)]
        hosts: usize,
        /// Limit every host's underlay link to this rate (tc token bucket), e.g. `1gbit`,
        /// `100mbit`; unshaped when absent.
        #[arg(long)]
        link_rate: Option<ferry_lab::lab::LinkRate>,
        /// What serves lazy restores' page faults on every host (`lazy_daemon` in the agent
        /// config): `agent` or `criu`.
        #[arg(long, default_value_t)]
        lazy_daemon: ferry_agent::config::LazyDaemon,
        /// Keep the cluster's state in a real three-member etcd cluster inside the lab
        /// (Debian's etcd-server; mutual TLS with the lab's CA): hosts register under leases,
        /// containers and addresses are claimed there, and every agent programs its overlay
        /// from the routes in it.
        #[arg(long)]
        etcd: bool,
    },
    /// Change the underlay links' rate limit of a running lab (`none` removes it).
    Shape {
        /// Rate such as `1gbit` or `100mbit`, or `none`.
        rate: String,
    },
    /// Remove everything the lab created.
    Down,
    /// Write the lab's workload root filesystem (busybox, ferry-workload and its libraries)
    /// to DIR, e.g. to import it as an image (`ferry image import`).
    Rootfs {
        /// Directory to create (must not exist).
        dir: PathBuf,
    },
    /// Start a lab host's agent again (after it was stopped or died).
    StartAgent {
        /// Host name.
        host: String,
    },
    /// Start a member of the lab's etcd cluster again (`lab up --etcd`; after it was stopped).
    StartEtcd {
        /// Member name (`etcd1`, `etcd2`, `etcd3`).
        member: String,
    },
    /// Run etcdctl against the lab's etcd cluster (`lab up --etcd`), with the operator's
    /// certificate: `ferry lab etcdctl -- get --prefix /ferry/routes/`.
    Etcdctl {
        /// etcdctl's arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Run a command inside a lab host.
    Exec {
        /// Host name.
        host: String,
        /// Command and arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
}

/// A size in bytes: a number with an optional unit `b`, `k`, `m`, `g` (powers of 1024, as
/// `docker run --memory`).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mult) = match t.trim_end_matches('b').chars().last() {
        Some('k') => (&t[..t.find('k').unwrap_or(t.len())], 1u64 << 10),
        Some('m') => (&t[..t.find('m').unwrap_or(t.len())], 1 << 20),
        Some('g') => (&t[..t.find('g').unwrap_or(t.len())], 1 << 30),
        _ => (t.trim_end_matches('b'), 1),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (512m, 2g, 1048576)"))?;
    if !(n.is_finite() && n > 0.0) || n * mult as f64 > u64::MAX as f64 / 2.0 {
        return Err(format!("{s:?} is not a size (512m, 2g, 1048576)"));
    }
    Ok((n * mult as f64).round() as u64)
}

fn main() -> ExitCode {
    // A command line that does not parse exits 1, like any other error: 2 means that a
    // migration rolled back.
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(u8::from(e.use_stderr()));
        }
    };
    let filter = cli
        .log
        .clone()
        .or_else(|| std::env::var("FERRY_LOG").ok())
        .unwrap_or_else(|| {
            if matches!(cli.cmd, Cmd::Agent { .. }) {
                "info".into()
            } else {
                "warn".into()
            }
        });
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .init();
    match cli::dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn sizes_parse_as_docker_reads_them() {
        use super::parse_size;
        assert_eq!(parse_size("512m"), Ok(512 << 20));
        assert_eq!(parse_size("2g"), Ok(2 << 30));
        assert_eq!(parse_size("2GB"), Ok(2 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("1.5g"), Ok(3 << 29));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        for bad in ["", "m", "-1m", "lots", "1t"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
