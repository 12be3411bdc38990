//! The agent's HTTP/JSON API on a Unix socket (see docs/api.md).

use std::convert::Infallible;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, MethodRouter};
use axum::{Json, Router};
use ferry_api::{
    ContainerDeleted, ContainerInfo, CreateContainer, DirtyRate, HostInfo, JobEventKind, JobInfo,
    MigrateRequest, PageStoreInfo, PagesForgotten, ResolveAnswer, ResolveRequest,
};
use schemars::JsonSchema;

use super::{lock, Agent};

mod errors;
mod openapi;
mod tls;

pub(crate) use errors::ApiFailure;
pub(crate) use errors::JsonBody;
use errors::QueryArgs;
pub use openapi::openapi;

type ApiResult<T> = std::result::Result<T, ApiFailure>;

/// Every route of the API: method and path (`{name}` is one path segment). docs/api.md and
/// docs/openapi.json describe each ([`openapi`] generates the latter; its tests check that it
/// documents every route and nothing else, and that the committed file is what it generates).
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/v1/host"),
    ("GET", "/v1/containers"),
    ("POST", "/v1/containers"),
    ("GET", "/v1/containers/{name}"),
    ("DELETE", "/v1/containers/{name}"),
    ("POST", "/v1/containers/{name}/migrate"),
    ("POST", "/v1/containers/{name}/stop"),
    ("POST", "/v1/containers/{name}/start"),
    ("POST", "/v1/containers/{name}/exec"),
    ("GET", "/v1/containers/{name}/logs"),
    ("GET", "/v1/containers/{name}/dirty-rate"),
    ("GET", "/v1/pages"),
    ("DELETE", "/v1/pages"),
    ("GET", "/v1/images"),
    ("POST", "/v1/images"),
    ("POST", "/v1/images/gc"),
    ("DELETE", "/v1/images/{name}"),
    ("GET", "/v1/jobs"),
    ("GET", "/v1/jobs/{id}"),
    ("POST", "/v1/jobs/{id}/cancel"),
    ("POST", "/v1/jobs/{id}/resolve"),
    ("GET", "/v1/jobs/{id}/events"),
    ("GET", "/v1/metrics"),
];

/// The handler of one route of [`ROUTES`].
fn handler(method: &str, path: &str) -> MethodRouter<Arc<Agent>> {
    use super::images;
    match (method, path) {
        ("GET", "/v1/host") => get(host),
        ("GET", "/v1/containers") => get(list),
        ("POST", "/v1/containers") => post(create),
        ("GET", "/v1/containers/{name}") => get(one),
        ("DELETE", "/v1/containers/{name}") => delete(remove),
        ("POST", "/v1/containers/{name}/migrate") => post(migrate),
        ("POST", "/v1/containers/{name}/stop") => post(stop),
        ("POST", "/v1/containers/{name}/start") => post(start),
        ("POST", "/v1/containers/{name}/exec") => post(exec),
        ("GET", "/v1/containers/{name}/logs") => get(logs),
        ("GET", "/v1/containers/{name}/dirty-rate") => get(dirty_rate),
        ("GET", "/v1/pages") => get(pages_info),
        ("DELETE", "/v1/pages") => delete(forget_pages),
        ("GET", "/v1/images") => get(images::list),
        ("POST", "/v1/images") => post(images::import),
        ("POST", "/v1/images/gc") => post(images::gc),
        ("DELETE", "/v1/images/{name}") => delete(images::remove),
        ("GET", "/v1/jobs") => get(jobs),
        ("GET", "/v1/jobs/{id}") => get(job),
        ("POST", "/v1/jobs/{id}/cancel") => post(cancel),
        ("POST", "/v1/jobs/{id}/resolve") => post(resolve),
        ("GET", "/v1/jobs/{id}/events") => get(events),
        ("GET", "/v1/metrics") => get(super::metrics::serve),
        _ => unreachable!("route {method} {path} has no handler"),
    }
}

pub(crate) async fn serve(agent: Arc<Agent>) -> Result<()> {
    let sock = agent.cfg.api_socket.clone();
    if let Some(dir) = sock.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(&sock);
    // Root only, whatever the umask: bound under a temporary name, made 0600, then renamed into
    // place, so that nobody can connect while it has another mode.
    let staged = sock.with_extension(format!("sock.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&staged);
    let listener = tokio::net::UnixListener::bind(&staged)
        .with_context(|| format!("binding the API socket {}", staged.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("making {} root-only", staged.display()))?;
    }
    std::fs::rename(&staged, &sock)
        .with_context(|| format!("moving the API socket to {}", sock.display()))?;
    let mut app = Router::new();
    for (method, path) in ROUTES {
        app = app.route(path, handler(method, path));
    }
    let app = app
        .fallback(errors::no_route)
        .layer(axum::middleware::from_fn(errors::json_errors))
        .layer(axum::extract::DefaultBodyLimit::max(errors::MAX_BODY_BYTES));
    let local = axum::serve(listener, app.clone().with_state(Arc::clone(&agent)));
    let Some(addr) = agent.cfg.api_listen else {
        local.await?;
        return Ok(());
    };
    let tcp = tls::bind(addr, &agent.cfg.tls_files()).await?;
    let remote = axum::serve(
        tcp,
        app.layer(axum::middleware::from_fn(tls::operators_only))
            .with_state(agent)
            .into_make_service_with_connect_info::<tls::ApiPeer>(),
    );
    use std::future::IntoFuture;
    tokio::try_join!(local.into_future(), remote.into_future())?;
    Ok(())
}

/// `GET /v1/pages`: the page store's size.
async fn pages_info(State(a): State<Arc<Agent>>) -> Json<PageStoreInfo> {
    let (pages, cap) = a.page_store_stats().await;
    Json(PageStoreInfo {
        pages: pages as u64,
        max_pages: cap as u64,
    })
}

/// `DELETE /v1/pages`: forgets every page no running migration relies on.
async fn forget_pages(State(a): State<Arc<Agent>>) -> Json<PagesForgotten> {
    let (forgotten, kept) = a.forget_pages().await;
    Json(PagesForgotten {
        forgotten: forgotten as u64,
        kept: kept as u64,
    })
}

async fn host(State(a): State<Arc<Agent>>) -> Json<HostInfo> {
    Json(HostInfo {
        host: a.cfg.host.clone(),
        underlay_ip: a.cfg.underlay_ip,
        criu: a.criu.as_ref().ok().map(|c| c.version.to_string()),
        criu_error: a.criu.as_ref().err().cloned(),
        peers: a.peer_names(),
        targets: a.target_names(),
        cgroups: ferry_runtime::cgroup::Cgroups::host()
            .host_hierarchy()
            .to_string(),
        mem_available_bytes: ferry_runtime::util::mem_available_bytes().unwrap_or(0),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get() as u32),
        load1: crate::cluster::load_x100() as f64 / 100.0,
        containers: crate::lock(&a.containers).len() as u32,
    })
}

async fn list(State(a): State<Arc<Agent>>) -> Json<Vec<ContainerInfo>> {
    let a2 = Arc::clone(&a);
    Json(
        tokio::task::spawn_blocking(move || a2.list())
            .await
            .unwrap_or_default(),
    )
}

async fn one(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> ApiResult<Json<ContainerInfo>> {
    let rec = lock(&a.containers).get(&name).cloned();
    match rec {
        Some(r) => {
            let a2 = Arc::clone(&a);
            tokio::task::spawn_blocking(move || a2.container_info(&r))
                .await
                .map(Json)
                .map_err(|e| ApiFailure::internal(e.to_string()))
        }
        None => Err(ApiFailure::unknown_container(&name, &a.cfg.host)),
    }
}

/// The query string of `GET /v1/containers/{name}/dirty-rate`.
#[derive(serde::Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct DirtyRateQuery {
    /// Measuring interval, ms.
    #[serde(default = "DirtyRateQuery::default_ms")]
    #[schemars(range(min = 10, max = 60_000))]
    ms: u64,
    /// Throttle the container's CPU while measuring by this percentage of what it used just
    /// before (pre-copy's auto-converge), lifted afterwards; 0: not throttled.
    #[serde(default)]
    #[schemars(range(max = 99))]
    throttle: u32,
}

impl DirtyRateQuery {
    fn default_ms() -> u64 {
        1000
    }
}

async fn dirty_rate(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
    QueryArgs(q): QueryArgs<DirtyRateQuery>,
) -> ApiResult<Json<DirtyRate>> {
    let ms = q.ms;
    if !(10..=60_000).contains(&ms) {
        return Err(ApiFailure::bad_request(format!(
            "ms must be between 10 and 60000, got {ms}"
        )));
    }
    let throttle = q.throttle;
    if throttle > 99 {
        return Err(ApiFailure::bad_request(format!(
            "throttle must be between 0 and 99 percent, got {throttle}"
        )));
    }
    let rec = lock(&a.containers).get(&name).cloned();
    let Some(rec) = rec else {
        return Err(ApiFailure::unknown_container(&name, &a.cfg.host));
    };
    if rec.migrating {
        return Err(ApiFailure::conflict(format!(
            "container {name:?} is migrating: measure its dirty rate before or after"
        )));
    }
    let host = a.cfg.host.clone();
    tokio::task::spawn_blocking(move || {
        super::dirty::measure(&host, &name, std::time::Duration::from_millis(ms), throttle)
    })
    .await
    .map_err(|e| ApiFailure::internal(e.to_string()))?
    .map(Json)
    .map_err(|e| ApiFailure::internal(format!("{e:#}")))
}

async fn create(
    State(a): State<Arc<Agent>>,
    JsonBody(req): JsonBody<CreateContainer>,
) -> ApiResult<(StatusCode, Json<ContainerInfo>)> {
    let info = a.create(req).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn remove(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> ApiResult<Json<ContainerDeleted>> {
    a.delete(&name).await?;
    Ok(Json(ContainerDeleted { deleted: name }))
}

/// The query string of `POST /v1/containers/{name}/stop`.
#[derive(serde::Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct StopQuery {
    /// Seconds between TERM to the container's init and KILL to every process.
    #[serde(default = "StopQuery::default_timeout_s")]
    #[schemars(range(max = 3600))]
    timeout_s: u64,
}

impl StopQuery {
    fn default_timeout_s() -> u64 {
        10
    }
}

/// `POST /v1/containers/{name}/stop?timeout_s=N`: TERM, and KILL after N s (default 10).
async fn stop(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
    QueryArgs(q): QueryArgs<StopQuery>,
) -> ApiResult<Json<ContainerInfo>> {
    let grace = q.timeout_s;
    if grace > 3600 {
        return Err(ApiFailure::bad_request(format!(
            "timeout_s must be between 0 and 3600, got {grace}"
        )));
    }
    Ok(Json(
        a.stop(&name, std::time::Duration::from_secs(grace)).await?,
    ))
}

/// `POST /v1/containers/{name}/start`: runs a stopped container again.
async fn start(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> ApiResult<Json<ContainerInfo>> {
    Ok(Json(a.start(&name).await?))
}

/// The query string of `GET /v1/containers/{name}/logs`.
#[derive(serde::Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct LogsQuery {
    /// Only the last this many lines (all when absent).
    #[serde(default)]
    tail: Option<usize>,
    /// Keep the answer open and send new lines as the container writes them, until it
    /// stops, leaves this host, or the client goes.
    #[serde(default)]
    follow: bool,
}

/// `GET /v1/containers/{name}/logs[?tail=N][&follow=true]`: newline-delimited
/// [`ferry_api::LogRecord`]s, oldest first.
async fn logs(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
    QueryArgs(q): QueryArgs<LogsQuery>,
) -> ApiResult<Response> {
    let body = a.logs(&name, q.tail, q.follow).await?;
    Ok(Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(body)
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

/// `POST /v1/containers/{name}/exec`: runs a command in the container.
async fn exec(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<ferry_api::ExecRequest>,
) -> ApiResult<Json<ferry_api::ExecResult>> {
    Ok(Json(a.exec(&name, req).await?))
}

async fn migrate(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<MigrateRequest>,
) -> ApiResult<(StatusCode, Json<JobInfo>)> {
    let job = super::source::start(&a, &name, req)?;
    Ok((StatusCode::ACCEPTED, Json(job.info())))
}

/// `GET /v1/jobs`: this host's jobs, newest first.
async fn jobs(State(a): State<Arc<Agent>>) -> Json<Vec<JobInfo>> {
    let mut all: Vec<_> = lock(&a.jobs)
        .values()
        .map(|j| (j.started, j.info()))
        .collect();
    all.sort_by(|x, y| y.0.cmp(&x.0).then_with(|| y.1.id.cmp(&x.1.id)));
    let all = all.into_iter().map(|(_, info)| info).collect();
    Json(all)
}

fn find_job(a: &Agent, id: &str) -> ApiResult<Arc<super::Job>> {
    lock(&a.jobs)
        .get(id)
        .cloned()
        .ok_or_else(|| ApiFailure::unknown_job(id))
}

async fn job(State(a): State<Arc<Agent>>, Path(id): Path<String>) -> ApiResult<Json<JobInfo>> {
    Ok(Json(find_job(&a, &id)?.info()))
}

async fn cancel(State(a): State<Arc<Agent>>, Path(id): Path<String>) -> ApiResult<Json<JobInfo>> {
    let job = find_job(&a, &id)?;
    let info = job.info();
    if info.state.past_commit_point() {
        return Err(ApiFailure::conflict(format!(
            "too late to cancel job {id}: the destination restored the container and decides the commit now \
             (if it is gone for good, `ferry resolve {id} --resume-here` runs the container on at the source)"
        )));
    }
    if info.state.is_terminal() {
        return Err(ApiFailure::conflict(format!(
            "job {id} already ended ({})",
            info.state.name()
        )));
    }
    job.cancel.store(true, std::sync::atomic::Ordering::SeqCst);
    job.cancel_notify.notify_waiters();
    Ok(Json(job.info()))
}

/// Settles a job whose destination cannot answer about the commit (see
/// `ferry_api::Resolution`).
async fn resolve(
    State(a): State<Arc<Agent>>,
    Path(id): Path<String>,
    JsonBody(req): JsonBody<ResolveRequest>,
) -> ApiResult<Json<ResolveAnswer>> {
    if let Some(answer) = a.resolve_by_hand(&id, req.outcome) {
        return Ok(Json(answer));
    }
    match lock(&a.jobs).get(&id) {
        Some(job) => Err(ApiFailure::conflict(format!(
            "job {id} is not waiting for its destination's answer about the commit (state {}); \
             only such a job can be settled by hand",
            job.info().state.name()
        ))),
        None => Err(ApiFailure::unknown_job(&id)),
    }
}

/// Newline-delimited JSON: every event so far, then new ones until the job ends.
async fn events(State(a): State<Arc<Agent>>, Path(id): Path<String>) -> ApiResult<Response> {
    use futures_util::StreamExt;
    use tokio::sync::broadcast::error::RecvError;
    let job = find_job(&a, &id)?;
    // Subscribe before copying the history so that no event falls between the two.
    let rx = job.tx.subscribe();
    let past = lock(&job.history).clone();
    let next_seq = past.len() as u64;
    let finished = past.iter().any(is_finished);
    let head = futures_util::stream::iter(past.into_iter().map(line));
    let tail =
        futures_util::stream::unfold((rx, next_seq, finished), |(mut rx, seq, done)| async move {
            if done {
                return None;
            }
            loop {
                match rx.recv().await {
                    Ok(ev) if ev.seq < seq => continue,
                    Ok(ev) => {
                        let done = is_finished(&ev);
                        let seq = ev.seq + 1;
                        return Some((line(ev), (rx, seq, done)));
                    }
                    Err(RecvError::Lagged(_)) => continue,
                    Err(RecvError::Closed) => return None,
                }
            }
        });
    Ok(Response::builder()
        .header("content-type", "application/x-ndjson")
        .body(Body::from_stream(head.chain(tail)))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response()))
}

fn is_finished(ev: &ferry_api::JobEvent) -> bool {
    matches!(ev.kind, JobEventKind::Finished { .. })
}

fn line(ev: ferry_api::JobEvent) -> Result<String, Infallible> {
    let mut s = serde_json::to_string(&ev).unwrap_or_default();
    s.push('\n');
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query<T: serde::de::DeserializeOwned>(q: &str) -> Option<T> {
        let uri = format!("http://agent/v1{q}").parse().expect("a URI");
        axum::extract::Query::<T>::try_from_uri(&uri)
            .ok()
            .map(|q| q.0)
    }

    #[test]
    fn query_strings_take_their_defaults_and_refuse_unknown_names() {
        let d = query::<DirtyRateQuery>("").unwrap();
        assert_eq!((d.ms, d.throttle), (1000, 0));
        let d = query::<DirtyRateQuery>("?ms=50&throttle=20").unwrap();
        assert_eq!((d.ms, d.throttle), (50, 20));
        assert!(query::<DirtyRateQuery>("?ms=soon").is_none());
        assert!(query::<DirtyRateQuery>("?interval=5").is_none());
        assert_eq!(query::<StopQuery>("").unwrap().timeout_s, 10);
        assert_eq!(query::<StopQuery>("?timeout_s=0").unwrap().timeout_s, 0);
        assert!(query::<StopQuery>("?timeout=5").is_none());
    }
}
