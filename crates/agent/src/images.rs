//! The host's image store (`shared_fs::Store` under `<state_dir>/store`): import, list, remove,
//! garbage collection.

use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use shared_fs::store::{GcStats, ImageRecord, ImportStats, Usage};
use shared_fs::FsError;
use tracing::info;

use super::http::ApiFailure;
use super::Agent;

/// `POST /v1/images`: import a root filesystem directory or an OCI image layout found on the
/// agent's host.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImportImage {
    /// The image's name (letters, digits, `._-:/@`).
    pub name: String,
    /// A directory: a root filesystem, or an OCI image layout (it has an `oci-layout` file).
    pub path: PathBuf,
    /// For an OCI layout listing several images: which (`org.opencontainers.image.ref.name`).
    #[serde(default)]
    pub oci_ref: Option<String>,
}

/// What an import did.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Imported {
    /// The image as named.
    pub image: ImageRecord,
    /// `rootfs`, `oci` or `oci-archive`.
    pub format: String,
    /// Chunks and bytes found, and how many were new to this host.
    pub stats: ImportStats,
}

/// `GET /v1/images`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ImageList {
    /// The host.
    pub host: String,
    /// Every image.
    pub images: Vec<ImageRecord>,
    /// What the store holds.
    pub usage: Usage,
}

/// Maps a store error to an API answer.
pub(crate) fn failure(e: FsError) -> ApiFailure {
    match &e {
        FsError::Missing { what: "image", id } => ApiFailure::not_found(
            "unknown_image",
            format!("unknown image {id:?}: `ferry image ls` lists images"),
        ),
        FsError::InvalidImageName { .. }
        | FsError::InvalidPath { .. }
        | FsError::InvalidTree { .. }
        | FsError::Oci { .. }
        | FsError::NonUtf8 { .. }
        | FsError::TooLarge { .. }
        | FsError::TotalTooLarge { .. }
        | FsError::TooManyEntries { .. }
        | FsError::BadHardlink { .. }
        | FsError::ChunkMismatch { .. } => ApiFailure::bad_request(e.to_string()),
        _ => ApiFailure::internal(e.to_string()),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, FsError> + Send + 'static,
) -> Result<T, ApiFailure> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiFailure::internal(e.to_string()))?
        .map_err(failure)
}

/// `GET /v1/images`.
pub(crate) async fn list(State(a): State<Arc<Agent>>) -> Result<Json<ImageList>, ApiFailure> {
    let (store, host) = (Arc::clone(&a.store), a.cfg.host.clone());
    blocking(move || {
        Ok(ImageList {
            host,
            images: store.images()?,
            usage: store.usage()?,
        })
    })
    .await
    .map(Json)
}

/// `POST /v1/images`.
pub(crate) async fn import(
    State(a): State<Arc<Agent>>,
    super::http::JsonBody(req): super::http::JsonBody<ImportImage>,
) -> Result<(StatusCode, Json<Imported>), ApiFailure> {
    shared_fs::store::check_image_name(&req.name).map_err(failure)?;
    if !req.path.is_absolute() {
        return Err(ApiFailure::bad_request(format!(
            "image path {} must be absolute (the agent resolves it on its host)",
            req.path.display()
        )));
    }
    if !req.path.is_dir() && !req.path.is_file() {
        return Err(ApiFailure::bad_request(format!(
            "nothing at {} on {}; give a root filesystem directory, an OCI image layout, or an \
             OCI layout archive (.tar, .tar.gz)",
            req.path.display(),
            a.cfg.host
        )));
    }
    let store = Arc::clone(&a.store);
    let r = req.clone();
    let t = std::time::Instant::now();
    let out = blocking(move || {
        let (tree, format, stats, config) = if r.path.is_file() {
            let (tree, info) =
                shared_fs::oci::import_oci_archive(&store, &r.path, r.oci_ref.as_deref())?;
            (tree, "oci-archive", info.stats, info.config)
        } else if r.path.join("oci-layout").is_file() {
            let (tree, info) = shared_fs::oci::import_oci(&store, &r.path, r.oci_ref.as_deref())?;
            (tree, "oci", info.stats, info.config)
        } else {
            let (tree, stats) = store.import_dir(&r.path)?;
            (tree, "rootfs", stats, None)
        };
        let source = format!("{format}:{}", r.path.display());
        let image = store.tag(&r.name, &tree, &source, config)?;
        Ok(Imported {
            image,
            format: format.into(),
            stats,
        })
    })
    .await?;
    info!(image = %out.image.name, tree = %out.image.tree, format = %out.format,
        bytes = out.stats.bytes, new_bytes = out.stats.new_bytes, ms = ferry_runtime::util::ms(t.elapsed()), "image imported");
    Ok((StatusCode::CREATED, Json(out)))
}

/// `DELETE /v1/images/{name}`: the name goes; the content at the next gc if nothing uses it.
pub(crate) async fn remove(
    State(a): State<Arc<Agent>>,
    Path(name): Path<String>,
) -> Result<Json<ImageRecord>, ApiFailure> {
    let store = Arc::clone(&a.store);
    let rec = blocking(move || store.remove_image(&name)).await?;
    info!(image = %rec.name, "image removed");
    Ok(Json(rec))
}

/// `POST /v1/images/gc`: removes trees, layers and chunks no image and no container here uses.
pub(crate) async fn gc(State(a): State<Arc<Agent>>) -> Result<Json<GcStats>, ApiFailure> {
    let store = Arc::clone(&a.store);
    let agent = Arc::clone(&a);
    let s = blocking(move || store.gc_with(|| (agent.trees_in_use(), agent.pending_base_chunks())))
        .await?;
    info!(
        chunks = s.chunks,
        bytes = s.chunk_bytes,
        trees = s.trees,
        layers = s.layers,
        "image store collected"
    );
    Ok(Json(s))
}

impl Agent {
    /// Trees the containers on this host run from, and the bases of incoming migrations (gc
    /// keeps them, named or not).
    pub(crate) fn trees_in_use(&self) -> Vec<String> {
        let mut trees: Vec<String> = super::lock(&self.containers)
            .values()
            .filter_map(|c| c.spec.image.as_ref().map(|i| i.tree.clone()))
            .collect();
        trees.extend(super::lock(&self.incoming_bases).values().cloned());
        trees
    }
}
