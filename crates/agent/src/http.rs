//! The agent's HTTP/JSON API on a Unix socket (see docs/api.md).

use std::convert::Infallible;
use std::sync::Arc;

use anyhow::{Context, Result};
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ferry_api::{
    ApiError, ContainerInfo, CreateContainer, DirtyRate, HostInfo, JobEventKind, JobInfo,
    MigrateRequest, ResolveAnswer, ResolveRequest,
};

use super::{lock, Agent};

/// An API error: status plus body.
#[derive(Debug)]
pub(crate) struct ApiFailure {
    status: StatusCode,
    body: ApiError,
}

impl ApiFailure {
    fn new(status: StatusCode, code: &str, message: String) -> Self {
        ApiFailure {
            status,
            body: ApiError {
                code: code.into(),
                message,
            },
        }
    }
    pub(crate) fn bad_request(m: String) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", m)
    }
    pub(crate) fn not_found(code: &str, m: String) -> Self {
        Self::new(StatusCode::NOT_FOUND, code, m)
    }
    pub(crate) fn conflict(m: String) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", m)
    }
    /// A peer needed for the answer cannot be reached (503, retry later).
    pub(crate) fn unavailable(m: String) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "peer_unavailable", m)
    }
    pub(crate) fn internal(m: String) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", m)
    }
    pub(crate) fn unknown_host(m: String) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "unknown_host", m)
    }
    pub(crate) fn unknown_container(name: &str, host: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "unknown_container",
            format!("unknown container {name:?} on {host}: `ferry ps` lists containers"),
        )
    }
    fn unknown_job(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "unknown_job",
            format!("unknown job {id:?}"),
        )
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

type ApiResult<T> = std::result::Result<T, ApiFailure>;

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
    let app = Router::new()
        .route("/v1/host", get(host))
        .route("/v1/containers", get(list).post(create))
        .route("/v1/containers/{name}", get(one).delete(delete))
        .route("/v1/containers/{name}/migrate", post(migrate))
        .route("/v1/containers/{name}/dirty-rate", get(dirty_rate))
        .route("/v1/pages", get(pages_info).delete(forget_pages))
        .route(
            "/v1/images",
            get(super::images::list).post(super::images::import),
        )
        .route("/v1/images/gc", post(super::images::gc))
        .route(
            "/v1/images/{name}",
            axum::routing::delete(super::images::remove),
        )
        .route("/v1/jobs", get(jobs))
        .route("/v1/jobs/{id}", get(job))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .route("/v1/jobs/{id}/resolve", post(resolve))
        .route("/v1/jobs/{id}/events", get(events))
        .with_state(agent);
    axum::serve(listener, app).await?;
    Ok(())
}

/// `GET /v1/pages`: the page store's size.
async fn pages_info(State(a): State<Arc<Agent>>) -> Json<serde_json::Value> {
    let (pages, cap) = a.page_store_stats().await;
    Json(serde_json::json!({ "pages": pages, "max_pages": cap }))
}

/// `DELETE /v1/pages`: forgets every page no running migration relies on.
async fn forget_pages(State(a): State<Arc<Agent>>) -> Json<serde_json::Value> {
    let (forgotten, kept) = a.forget_pages().await;
    Json(serde_json::json!({ "forgotten": forgotten, "kept": kept }))
}

async fn host(State(a): State<Arc<Agent>>) -> Json<HostInfo> {
    Json(HostInfo {
        host: a.cfg.host.clone(),
        underlay_ip: a.cfg.underlay_ip,
        criu: a.criu.as_ref().ok().map(|c| c.version.to_string()),
        criu_error: a.criu.as_ref().err().cloned(),
        peers: a.peer_names(),
        cgroups: ferry_runtime::cgroup::Cgroups::host()
            .host_hierarchy()
            .to_string(),
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

#[derive(serde::Deserialize)]
struct DirtyRateQuery {
    ms: Option<u64>,
    throttle: Option<u32>,
}

async fn dirty_rate(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
    Query(q): Query<DirtyRateQuery>,
) -> ApiResult<Json<DirtyRate>> {
    let ms = q.ms.unwrap_or(1000);
    if !(10..=60_000).contains(&ms) {
        return Err(ApiFailure::bad_request(format!(
            "ms must be between 10 and 60000, got {ms}"
        )));
    }
    let throttle = q.throttle.unwrap_or(0);
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
    Json(req): Json<CreateContainer>,
) -> ApiResult<(StatusCode, Json<ContainerInfo>)> {
    let info = a.create(req).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

async fn delete(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    a.delete(&name).await?;
    Ok(Json(serde_json::json!({"deleted": name})))
}

async fn migrate(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
    Json(req): Json<MigrateRequest>,
) -> ApiResult<(StatusCode, Json<JobInfo>)> {
    let job = super::source::start(&a, &name, req)?;
    Ok((StatusCode::ACCEPTED, Json(job.info())))
}

async fn jobs(State(a): State<Arc<Agent>>) -> Json<Vec<JobInfo>> {
    Json(lock(&a.jobs).values().map(|j| j.info()).collect())
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
            "job {id} already ended ({:?})",
            info.state
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
    Json(req): Json<ResolveRequest>,
) -> ApiResult<Json<ResolveAnswer>> {
    if let Some(answer) = a.resolve_by_hand(&id, req.outcome) {
        return Ok(Json(answer));
    }
    match lock(&a.jobs).get(&id) {
        Some(job) => Err(ApiFailure::conflict(format!(
            "job {id} is not waiting for its destination's answer about the commit (state {:?}); \
             only such a job can be settled by hand",
            job.info().state
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
