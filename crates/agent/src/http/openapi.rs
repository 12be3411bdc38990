//! The API as an OpenAPI 3.1 document (docs/openapi.json), generated from the types the
//! handlers read and answer, so that the document cannot drift from the code: schemars derives
//! the JSON schemas of those types (the `schema` feature of ferry-api, migrate-core and
//! shared-fs), and [`operation`] says, for each route of [`ROUTES`], which of them it reads and
//! answers, its query string, its success status and the errors it can answer.
//!
//! Request bodies and query strings are described as serde reads them (a field with a default
//! may be left out), answers as serde writes them (a field is required unless it is skipped
//! when empty). A type that reads differently from how it is written gets two schemas, the
//! request's named `<Name>Input`.
//!
//! After changing a route or a type, regenerate the file with
//! `FERRY_UPDATE_OPENAPI=1 cargo test -p ferry-agent openapi`; without the variable that test
//! fails while the committed file differs from what this module generates.

use schemars::generate::SchemaSettings;
use schemars::{JsonSchema, SchemaGenerator};
use serde_json::{json, Map, Value};

use super::errors::MAX_BODY_BYTES;
use super::{DirtyRateQuery, LogsQuery, StopQuery, ROUTES};
use crate::images::{ImageList, ImportImage, Imported};
use ferry_api::{
    ApiError, ContainerDeleted, ContainerInfo, CreateContainer, DirtyRate, ExecRequest, ExecResult,
    HostInfo, JobEvent, JobInfo, LogRecord, MigrateRequest, PageStoreInfo, PagesForgotten,
    ResolveAnswer, ResolveRequest,
};
use shared_fs::store::{GcStats, ImageRecord};

/// Where the schemas are, as `$ref`s name them.
const SCHEMAS: &str = "#/components/schemas/";

/// The OpenAPI document of the agent's API: one path item per route of [`ROUTES`], the
/// schemas of every request and answer under `components.schemas`. Objects' keys are sorted,
/// so that the document is the same whatever order serde_json keeps them in.
pub fn openapi() -> Value {
    let mut schemas = Schemas::new();
    let error = schemas.answer::<ApiError>();
    let mut ops: Vec<(&str, &str, Operation)> = ROUTES
        .iter()
        .map(|&(method, path)| {
            let op = operation(method, path, &mut schemas).unwrap_or_else(|| {
                panic!(
                    "route {method} {path} has no entry in http/openapi.rs: add an arm to `operation`"
                )
            });
            (method, path, op)
        })
        .collect();

    let read = schemas.read.take_definitions(true);
    let write = schemas.write.take_definitions(true);
    let components = merge(read, write, |from, to| {
        for (_, _, op) in &mut ops {
            op.rename_request_ref(from, to);
        }
    });

    let mut paths = Map::new();
    for (method, path, op) in ops {
        let item = paths
            .entry(path.to_string())
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .expect("a path item is an object");
        item.insert(method.to_ascii_lowercase(), op.into_json(path, &error));
    }

    let doc = json!({
        "openapi": "3.1.0",
        "info": {
            "title": "Ferry agent API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "The HTTP/JSON API every Ferry agent serves on its Unix socket \
                (`api_socket` in its config; `/run/ferry/lab/<host>.sock` in the lab), as in \
                docs/api.md. A request body is read as JSON whatever its Content-Type says, up \
                to 1 MiB; an unknown field is refused. Every non-2xx answer is an `ApiError` \
                `{\"code\", \"message\"}`; a path no route serves answers 404 `not_found`. \
                Generated from the agent's types (crates/agent/src/http/openapi.rs).",
            "license": { "name": "Apache-2.0", "identifier": "Apache-2.0" },
        },
        "tags": [
            { "name": "host", "description": "The agent and its host." },
            { "name": "containers", "description": "Containers of this host, and their migrations." },
            { "name": "pages", "description": "The memory pages this host keeps by content hash." },
            { "name": "images", "description": "The host's image store." },
            { "name": "jobs", "description": "Migrations this host runs as their source." },
        ],
        "paths": paths,
        "components": {
            "schemas": components,
            "responses": shared_responses(&error),
        },
    });
    sorted(unlinked(doc))
}

/// The JSON schemas of the API's types, as serde reads them and as it writes them.
struct Schemas {
    /// Request bodies and query strings.
    read: SchemaGenerator,
    /// Answers.
    write: SchemaGenerator,
}

impl Schemas {
    fn new() -> Self {
        let settings = SchemaSettings::draft2020_12().with(|s| {
            s.definitions_path = "/components/schemas".into();
            s.meta_schema = None;
        });
        Schemas {
            read: settings.clone().for_deserialize().into_generator(),
            write: settings.for_serialize().into_generator(),
        }
    }

    /// The schema of a request body (a `$ref`).
    fn body<T: JsonSchema>(&mut self) -> Value {
        self.read.subschema_for::<T>().to_value()
    }

    /// The schema of an answer (a `$ref`, or an array of them).
    fn answer<T: JsonSchema>(&mut self) -> Value {
        self.write.subschema_for::<T>().to_value()
    }

    /// The query parameters a query-string type reads: one per field, with its documentation,
    /// default and range.
    fn query<T: JsonSchema>(&mut self) -> Vec<Value> {
        let schema = T::json_schema(&mut self.read).to_value();
        let required: Vec<&str> = schema["required"]
            .as_array()
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let Some(props) = schema["properties"].as_object() else {
            return vec![];
        };
        props
            .iter()
            .map(|(name, prop)| {
                let mut prop = prop.clone();
                let description = prop
                    .as_object_mut()
                    .and_then(|p| p.remove("description"))
                    .unwrap_or_else(|| json!(""));
                json!({
                    "name": name,
                    "in": "query",
                    "required": required.contains(&name.as_str()),
                    "description": description,
                    "schema": prop,
                })
            })
            .collect()
    }
}

/// What one route reads and answers.
struct Operation {
    id: &'static str,
    summary: &'static str,
    description: &'static str,
    /// Query parameters ([`Schemas::query`]).
    query: Vec<Value>,
    /// The request body's schema, if it takes one.
    body: Option<Value>,
    /// The success status.
    status: u16,
    /// What it answers then.
    answer: Answer,
    /// The error statuses it answers besides 405 and 500 (every route) and 413 (every route
    /// that reads a body), each with the codes it can carry and when.
    errors: Vec<(u16, &'static str)>,
}

/// A success answer.
enum Answer {
    /// `application/json`: a description and a schema.
    Json(&'static str, Value),
    /// `application/x-ndjson`: a stream of values of a schema, one per line.
    NdJson(&'static str, Value),
    /// `text/plain`.
    Text(&'static str),
}

/// The group of a route (one of the document's `tags`): its path's first segment after the
/// version, the agent's own metrics with the host.
fn tag(path: &str) -> &str {
    match path.split('/').nth(2) {
        Some("metrics") | None => "host",
        Some(first) => first,
    }
}

/// Path parameters' descriptions.
fn path_parameter(path: &str, name: &str) -> &'static str {
    match (name, path.split('/').nth(2)) {
        ("name", Some("containers")) => "The container's name.",
        ("name", Some("images")) => "The image's name, percent-encoded (`/` is `%2F`).",
        ("id", Some("jobs")) => "The job's id (`ferry jobs` lists them).",
        _ => "",
    }
}

/// The error answers of a route that reads a JSON body, for the body alone.
const BODY_400: &str = "`invalid_json`: the body is empty or not JSON; `bad_request`: a field \
    that does not exist (`unknown field`) or whose value does not parse (the message names it)";

/// What the route `method path` reads and answers; `None` for a route this module does not
/// know (the document then cannot be built: add an arm).
fn operation(method: &str, path: &str, s: &mut Schemas) -> Option<Operation> {
    use Answer::{Json, NdJson, Text};
    let op = |id, summary, description, status, answer| Operation {
        id,
        summary,
        description,
        query: vec![],
        body: None,
        status,
        answer,
        errors: vec![],
    };
    let unknown_container = (
        404,
        "`unknown_container`: no container of this name on this host",
    );
    let unknown_job = (404, "`unknown_job`: no job of this id on this host");
    Some(match (method, path) {
        ("GET", "/v1/host") => op(
            "getHost",
            "The agent's host",
            "Host name, underlay address, CRIU version (or why CRIU is unusable), peers, the \
             peers a container can migrate to (targets), and the cgroup hierarchy.",
            200,
            Json("The host.", s.answer::<HostInfo>()),
        ),
        ("GET", "/v1/containers") => op(
            "listContainers",
            "List containers",
            "The containers of this host.",
            200,
            Json("Every container here.", s.answer::<Vec<ContainerInfo>>()),
        ),
        ("POST", "/v1/containers") => Operation {
            body: Some(s.body::<CreateContainer>()),
            errors: vec![
                (
                    400,
                    "`invalid_json`, or `bad_request`: an unknown field, a value that does not \
                     parse, no command, an unknown capability, a user the image lacks, a memory \
                     limit below 6 MiB, more CPUs than the host has, an environment entry \
                     without `=`, a relative working directory, an address off the overlay",
                ),
                (
                    404,
                    "`unknown_image`: no image of this name in the host's store",
                ),
                (
                    409,
                    "`conflict`: the name or the address is taken (on any host)",
                ),
                (
                    503,
                    "`peer_unavailable`: a peer did not list its containers, so names and \
                     addresses cannot be checked; retry later",
                ),
            ],
            ..op(
                "createContainer",
                "Create a container",
                "Creates and starts a container here, from an image of the host's store or from \
                 a root filesystem with Ferry's workload binary; its process is resolved as \
                 `docker run` resolves it.",
                201,
                Json(
                    "The container, running (with `image` when run from an image).",
                    s.answer::<ContainerInfo>(),
                ),
            )
        },
        ("GET", "/v1/containers/{name}") => Operation {
            errors: vec![unknown_container],
            ..op(
                "getContainer",
                "One container",
                "The container of this name on this host.",
                200,
                Json("The container.", s.answer::<ContainerInfo>()),
            )
        },
        ("DELETE", "/v1/containers/{name}") => Operation {
            errors: vec![
                unknown_container,
                (409, "`conflict`: the container is migrating"),
            ],
            ..op(
                "deleteContainer",
                "Delete a container",
                "Stops the container and removes it with its root and network.",
                200,
                Json("The name removed.", s.answer::<ContainerDeleted>()),
            )
        },
        ("POST", "/v1/containers/{name}/migrate") => Operation {
            body: Some(s.body::<MigrateRequest>()),
            errors: vec![
                (
                    400,
                    "`invalid_json`, or `bad_request`: an unknown field, a value that does not \
                     parse, a setting out of range (named, with the allowed range), the host \
                     the container runs on, `precopy` without `mode: pre-copy`, pre-copy \
                     without ferry-criu, fault hooks on an agent that does not allow them",
                ),
                unknown_container,
                (
                    409,
                    "`conflict`: the container is already migrating, or is stopped",
                ),
                (
                    422,
                    "`unknown_host`: the destination is not a peer, or runs no containers",
                ),
            ],
            ..op(
                "migrateContainer",
                "Migrate a container",
                "Starts a job that moves the container to another host (stop-and-copy, \
                 pre-copy or post-copy); follow it with the job's events.",
                202,
                Json("The job, just started.", s.answer::<JobInfo>()),
            )
        },
        ("POST", "/v1/containers/{name}/stop") => Operation {
            query: s.query::<StopQuery>(),
            errors: vec![
                (
                    400,
                    "`bad_request`: a query string that does not parse, `timeout_s` out of range",
                ),
                unknown_container,
                (409, "`conflict`: the container is migrating"),
            ],
            ..op(
                "stopContainer",
                "Stop a container",
                "TERM to its init, KILL to every process after `timeout_s`; the container \
                 keeps its name, address, root and network.",
                200,
                Json(
                    "The container, `state` `stopped`.",
                    s.answer::<ContainerInfo>(),
                ),
            )
        },
        ("POST", "/v1/containers/{name}/start") => Operation {
            errors: vec![
                unknown_container,
                (
                    409,
                    "`conflict`: the container runs already, or is migrating",
                ),
            ],
            ..op(
                "startContainer",
                "Start a stopped container",
                "Runs a stopped container again, with the same root, address and process.",
                200,
                Json("The container, running.", s.answer::<ContainerInfo>()),
            )
        },
        ("POST", "/v1/containers/{name}/exec") => Operation {
            body: Some(s.body::<ExecRequest>()),
            errors: vec![
                (
                    400,
                    "`invalid_json`, or `bad_request`: an unknown field, a value that does not \
                     parse, no command, `timeout_s` out of range, an environment entry without \
                     `=`, a relative working directory",
                ),
                unknown_container,
                (409, "`conflict`: the container is stopped, or migrating"),
            ],
            ..op(
                "execInContainer",
                "Run a command in a container",
                "Runs a command in the running container as its process runs (user, \
                 environment, capabilities), without a terminal or input, and waits for its \
                 output to end.",
                200,
                Json(
                    "What the command wrote, and how it ended.",
                    s.answer::<ExecResult>(),
                ),
            )
        },
        ("GET", "/v1/containers/{name}/logs") => Operation {
            query: s.query::<LogsQuery>(),
            errors: vec![
                (
                    400,
                    "`bad_request`: a query string that does not parse, or an unknown field",
                ),
                unknown_container,
            ],
            ..op(
                "getContainerLogs",
                "A container's output",
                "Newline-delimited JSON: what the container wrote to its standard output and \
                 error, a record per line, oldest first, including what earlier hosts kept \
                 before it moved here. With `follow`, new lines follow as they are written \
                 until the container stops or leaves this host.",
                200,
                NdJson("One `LogRecord` per line.", s.answer::<LogRecord>()),
            )
        },
        ("GET", "/v1/containers/{name}/dirty-rate") => Operation {
            query: s.query::<DirtyRateQuery>(),
            errors: vec![
                (
                    400,
                    "`bad_request`: a query string that does not parse, `ms` or `throttle` \
                     out of range",
                ),
                unknown_container,
                (409, "`conflict`: the container is migrating"),
            ],
            ..op(
                "measureDirtyRate",
                "Measure how fast a container writes its memory",
                "Tracks the container's writes over `ms` milliseconds with the host's best \
                 method, optionally with its CPU throttled; leaves no trace in the container.",
                200,
                Json("The rate measured.", s.answer::<DirtyRate>()),
            )
        },
        ("GET", "/v1/pages") => op(
            "getPageStore",
            "The page store's size",
            "Memory pages this host keeps by content hash (pre-copied pages of incoming jobs, \
             pages of containers that left or passed through).",
            200,
            Json(
                "Pages held, and the most held.",
                s.answer::<PageStoreInfo>(),
            ),
        ),
        ("DELETE", "/v1/pages") => op(
            "forgetPages",
            "Empty the page store",
            "Forgets every page no running migration relies on.",
            200,
            Json("Pages forgotten and kept.", s.answer::<PagesForgotten>()),
        ),
        ("GET", "/v1/images") => op(
            "listImages",
            "List images",
            "The images of the host's store, and what the store holds.",
            200,
            Json(
                "Every image, and the store's usage.",
                s.answer::<ImageList>(),
            ),
        ),
        ("POST", "/v1/images") => Operation {
            body: Some(s.body::<ImportImage>()),
            errors: vec![(
                400,
                "`invalid_json`, or `bad_request`: an unknown field, a bad name, a relative \
                 path, nothing at the path, a layout that does not parse or whose blobs do not \
                 match their digests, a tar path with `..`",
            )],
            ..op(
                "importImage",
                "Import an image",
                "Imports a path on the agent's host: a root filesystem directory, an OCI image \
                 layout, or such a layout as a tar archive.",
                201,
                Json(
                    "The image, its format (`rootfs`, `oci`, `oci-archive`) and what was new.",
                    s.answer::<Imported>(),
                ),
            )
        },
        ("POST", "/v1/images/gc") => op(
            "collectImages",
            "Collect the image store's garbage",
            "Removes the chunks, trees and layers no image names and no container on the \
             host runs from.",
            200,
            Json("What was removed.", s.answer::<GcStats>()),
        ),
        ("DELETE", "/v1/images/{name}") => Operation {
            errors: vec![
                (400, "`bad_request`: an invalid image name"),
                (404, "`unknown_image`: no image of this name"),
            ],
            ..op(
                "removeImage",
                "Remove an image",
                "Removes the name; the content stays until a gc finds nothing using it.",
                200,
                Json("The image removed.", s.answer::<ImageRecord>()),
            )
        },
        ("GET", "/v1/jobs") => op(
            "listJobs",
            "List jobs",
            "This host's migration jobs, newest first.",
            200,
            Json("Every job.", s.answer::<Vec<JobInfo>>()),
        ),
        ("GET", "/v1/jobs/{id}") => Operation {
            errors: vec![unknown_job],
            ..op(
                "getJob",
                "One job",
                "The job's state and its report so far.",
                200,
                Json("The job.", s.answer::<JobInfo>()),
            )
        },
        ("POST", "/v1/jobs/{id}/cancel") => Operation {
            errors: vec![
                unknown_job,
                (
                    409,
                    "`conflict`: the job is past its commit point, or has ended",
                ),
            ],
            ..op(
                "cancelJob",
                "Cancel a job",
                "Interrupts the migration in any phase before `committing`; it rolls back.",
                200,
                Json("The job, being cancelled.", s.answer::<JobInfo>()),
            )
        },
        ("POST", "/v1/jobs/{id}/resolve") => Operation {
            body: Some(s.body::<ResolveRequest>()),
            errors: vec![
                (400, BODY_400),
                unknown_job,
                (
                    409,
                    "`conflict`: the job is not waiting for its destination's answer about the \
                     commit",
                ),
            ],
            ..op(
                "resolveJob",
                "Settle a job by hand",
                "Settles a job whose source waits for a destination that does not answer about \
                 the commit (also after a restart of the source): the container resumes here, \
                 or the destination runs it.",
                200,
                Json("The job settled.", s.answer::<ResolveAnswer>()),
            )
        },
        ("GET", "/v1/jobs/{id}/events") => Operation {
            errors: vec![unknown_job],
            ..op(
                "streamJobEvents",
                "Follow a job",
                "Newline-delimited JSON: every event of the job from the first, then new ones \
                 until `finished`.",
                200,
                NdJson("One `JobEvent` per line.", s.answer::<JobEvent>()),
            )
        },
        ("GET", "/v1/metrics") => op(
            "getMetrics",
            "Metrics",
            "The agent's metrics in Prometheus' text format.",
            200,
            Text("Prometheus text exposition format."),
        ),
        _ => return None,
    })
}

impl Operation {
    fn rename_request_ref(&mut self, from: &str, to: &str) {
        for v in self.body.iter_mut().chain(&mut self.query) {
            rename_ref(v, from, to);
        }
    }

    /// The OpenAPI operation object.
    fn into_json(self, path: &str, error: &Value) -> Value {
        let mut parameters: Vec<Value> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{')?.strip_suffix('}'))
            .map(|name| {
                json!({
                    "name": name,
                    "in": "path",
                    "required": true,
                    "description": path_parameter(path, name),
                    "schema": { "type": "string" },
                })
            })
            .collect();
        parameters.extend(self.query);

        let mut responses = Map::new();
        let (media, description, schema) = match self.answer {
            Answer::Json(d, schema) => ("application/json", d, schema),
            Answer::NdJson(d, schema) => ("application/x-ndjson", d, schema),
            Answer::Text(d) => ("text/plain", d, json!({ "type": "string" })),
        };
        responses.insert(
            self.status.to_string(),
            json!({
                "description": description,
                "content": { media: { "schema": schema } },
            }),
        );
        for (status, codes) in &self.errors {
            responses.insert(
                status.to_string(),
                json!({
                    "description": codes,
                    "content": { "application/json": { "schema": error } },
                }),
            );
        }
        let mut shared = vec!["405", "500"];
        if self.body.is_some() {
            shared.push("413");
            responses.entry("400").or_insert_with(|| {
                json!({
                    "description": BODY_400,
                    "content": { "application/json": { "schema": error } },
                })
            });
        }
        for status in shared {
            responses.insert(
                status.into(),
                json!({ "$ref": format!("#/components/responses/{}", shared_name(status)) }),
            );
        }

        let mut op = json!({
            "operationId": self.id,
            "summary": self.summary,
            "description": self.description,
            "tags": [tag(path)],
            "responses": responses,
        });
        if !parameters.is_empty() {
            op["parameters"] = Value::Array(parameters);
        }
        if let Some(schema) = self.body {
            op["requestBody"] = json!({
                "required": true,
                "description": "JSON, whatever the Content-Type says; at most 1 MiB.",
                "content": { "application/json": { "schema": schema } },
            });
        }
        op
    }
}

/// The name in `components.responses` of an error every route (or every route with a body)
/// can answer.
fn shared_name(status: &str) -> &'static str {
    match status {
        "405" => "MethodNotAllowed",
        "413" => "BodyTooLarge",
        _ => "Internal",
    }
}

/// `components.responses`: the errors of [`shared_name`].
fn shared_responses(error: &Value) -> Value {
    let answer = |description: String| {
        json!({
            "description": description,
            "content": { "application/json": { "schema": error } },
        })
    };
    let mut not_allowed = answer(
        "`method_not_allowed`: the path exists, not with this method; the message and the \
         `Allow` header list its methods"
            .into(),
    );
    not_allowed["headers"] = json!({
        "Allow": {
            "description": "The methods the path takes.",
            "schema": { "type": "string" },
        },
    });
    json!({
        shared_name("405"): not_allowed,
        shared_name("413"): answer(format!(
            "`body_too_large`: a body over {MAX_BODY_BYTES} bytes"
        )),
        shared_name("500"): answer("`internal`: the agent failed; the message says where".into()),
    })
}

/// The schemas of both contracts in one namespace: a type the same for both appears once; one
/// that differs appears twice, the request side's as `<Name>Input`, with the request side's
/// `$ref`s to it renamed (`renamed(from, to)` renames those outside the schemas).
fn merge(
    mut read: Map<String, Value>,
    write: Map<String, Value>,
    mut renamed: impl FnMut(&str, &str),
) -> Map<String, Value> {
    loop {
        let differ: Vec<String> = read
            .iter()
            .filter(|(name, schema)| write.get(*name).is_some_and(|w| w != *schema))
            .map(|(name, _)| name.clone())
            .collect();
        if differ.is_empty() {
            break;
        }
        // Renaming one makes the schemas that refer to it differ too: again until none does.
        for name in differ {
            let (from, to) = (format!("{SCHEMAS}{name}"), format!("{SCHEMAS}{name}Input"));
            let schema = read.remove(&name).unwrap_or_default();
            read.insert(format!("{name}Input"), schema);
            for v in read.values_mut() {
                rename_ref(v, &from, &to);
            }
            renamed(&from, &to);
        }
    }
    let mut all = write;
    all.extend(read);
    all
}

/// Points every `$ref` to `from` at `to` instead.
fn rename_ref(v: &mut Value, from: &str, to: &str) {
    match v {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                if key == "$ref" && value.as_str() == Some(from) {
                    *value = Value::String(to.into());
                } else {
                    rename_ref(value, from, to);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|i| rename_ref(i, from, to)),
        _ => {}
    }
}

/// `v` with rustdoc's links in the types' documentation made plain code: "[`Report`]" reads
/// "`Report`", "[`FaultHooks::pause_in_phase`]" "`pause_in_phase`".
fn unlinked(v: Value) -> Value {
    match v {
        Value::String(text) if text.contains("[`") => {
            let mut out = String::with_capacity(text.len());
            let mut rest = text.as_str();
            while let Some(start) = rest.find("[`") {
                let Some(len) = rest[start..].find("`]") else {
                    break;
                };
                let (inner, after) = (&rest[start + 2..start + len], &rest[start + len + 2..]);
                out.push_str(&rest[..start]);
                if after.starts_with('(') || inner.contains('`') {
                    // A Markdown link with its own target, or not a link at all.
                    out.push_str(&rest[start..start + len + 2]);
                } else {
                    out.push('`');
                    out.push_str(inner.rsplit("::").next().unwrap_or(inner));
                    out.push('`');
                }
                rest = after;
            }
            out.push_str(rest);
            Value::String(out)
        }
        Value::Object(map) => {
            Value::Object(map.into_iter().map(|(k, v)| (k, unlinked(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(unlinked).collect()),
        other => other,
    }
}

/// `v` with every object's keys in order (serde_json keeps insertion order when a crate of the
/// build enables its `preserve_order`).
fn sorted(v: Value) -> Value {
    match v {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests;
