//! The API's one error shape: every non-2xx answer is `{"code", "message"}` JSON (see
//! docs/api.md, "Errors"). Handlers answer with [`ApiFailure`]; request bodies and queries
//! are read by [`JsonBody`] and [`QueryArgs`], whose failures take the same shape; and
//! [`json_errors`] rewrites whatever else answers an error without a JSON body (an unknown
//! route, a wrong method, a rejection of axum's own) into it.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::{header, request::Parts, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use ferry_api::ApiError;
use serde::de::DeserializeOwned;

/// The largest request body the API reads (a container's create request with its whole
/// environment fits many times over).
pub(crate) const MAX_BODY_BYTES: usize = 1 << 20;

/// An API error: status plus body.
#[derive(Debug)]
pub(crate) struct ApiFailure {
    status: StatusCode,
    body: ApiError,
}

impl ApiFailure {
    pub(crate) fn new(status: StatusCode, code: &str, message: String) -> Self {
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
    pub(crate) fn unknown_job(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "unknown_job",
            format!("unknown job {id:?}: `ferry jobs` lists jobs"),
        )
    }
}

impl IntoResponse for ApiFailure {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

/// A JSON request body, whatever its content type says (`curl -d` sends a form's), read up to
/// [`MAX_BODY_BYTES`]. Unknown fields are refused by the types themselves
/// (`deny_unknown_fields`); a field that does not parse is named by its path.
pub(crate) struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiFailure;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                too_large()
            } else {
                ApiFailure::bad_request(format!("reading the request body: {}", e.body_text()))
            }
        })?;
        parse_body(&bytes).map(JsonBody)
    }
}

fn too_large() -> ApiFailure {
    ApiFailure::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "body_too_large",
        format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
    )
}

/// Parses a request body: 400 `invalid_json` when it is not JSON at all, 400 `bad_request`
/// naming the field when it is JSON of the wrong shape.
pub(crate) fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiFailure> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiFailure::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            "the request body is empty: this endpoint takes a JSON object (docs/api.md)".into(),
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        body_error(&path, e.into_inner())
    })?;
    de.end().map_err(|e| body_error(".", e))?;
    Ok(value)
}

fn body_error(path: &str, e: serde_json::Error) -> ApiFailure {
    match e.classify() {
        serde_json::error::Category::Data if path == "." => {
            ApiFailure::bad_request(format!("the request body: {e}"))
        }
        // serde names an unknown field itself.
        serde_json::error::Category::Data if e.to_string().starts_with("unknown field") => {
            ApiFailure::bad_request(format!("the request body: {e}"))
        }
        serde_json::error::Category::Data => {
            ApiFailure::bad_request(format!("field `{path}`: {e}"))
        }
        _ => ApiFailure::new(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("the request body is not valid JSON: {e}"),
        ),
    }
}

/// A query string, with the API's error shape when it does not parse.
pub(crate) struct QueryArgs<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for QueryArgs<T> {
    type Rejection = ApiFailure;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| QueryArgs(q.0))
            .map_err(|e| ApiFailure::bad_request(format!("the query string: {}", e.body_text())))
    }
}

/// Answers a path no route serves.
pub(crate) async fn no_route(req: Request) -> ApiFailure {
    ApiFailure::not_found(
        "not_found",
        format!(
            "no endpoint {} {}: docs/api.md lists the endpoints",
            req.method(),
            req.uri().path()
        ),
    )
}

/// The code of an error status that no handler chose (axum's own answers).
fn code_for(status: StatusCode) -> &'static str {
    match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "body_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    }
}

/// Middleware: an error answer without a JSON body becomes `{"code", "message"}`, its message
/// the text axum gave (or, for a wrong method, the methods the path takes).
pub(crate) async fn json_errors(req: Request, next: Next) -> Response {
    let (method, path) = (req.method().clone(), req.uri().path().to_string());
    let res = next.run(req).await;
    let status = res.status();
    let is_json = res
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return res;
    }
    let (parts, body) = res.into_parts();
    let text = axum::body::to_bytes(body, 64 << 10)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let message = if status == StatusCode::METHOD_NOT_ALLOWED {
        let allowed: Vec<&str> = super::ROUTES
            .iter()
            .filter(|(_, pattern)| path_matches(pattern, &path))
            .map(|(m, _)| *m)
            .collect();
        format!(
            "{method} is not allowed on {path}; it takes {}",
            allowed.join(", ")
        )
    } else if text.is_empty() {
        format!(
            "{method} {path}: {}",
            status.canonical_reason().unwrap_or("error")
        )
    } else {
        text
    };
    let mut out = ApiFailure::new(status, code_for(status), message).into_response();
    if let Some(allow) = parts.headers.get(header::ALLOW) {
        out.headers_mut().insert(header::ALLOW, allow.clone());
    }
    out
}

/// Whether a request path matches a route pattern (`{name}` matches one segment).
fn path_matches(pattern: &str, path: &str) -> bool {
    let (mut p, mut q) = (pattern.split('/'), path.split('/'));
    loop {
        match (p.next(), q.next()) {
            (None, None) => return true,
            (Some(a), Some(b)) if a.starts_with('{') || a == b => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_patterns_match_one_segment_per_parameter() {
        assert!(path_matches("/v1/jobs/{id}", "/v1/jobs/h1-x-1"));
        assert!(!path_matches("/v1/jobs/{id}", "/v1/jobs/h1-x-1/cancel"));
        assert!(!path_matches("/v1/jobs/{id}", "/v1/jobs"));
        assert!(path_matches("/v1/host", "/v1/host"));
    }

    #[test]
    fn bodies_that_are_not_json_or_of_the_wrong_shape_say_which() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct R {
            to: String,
            n: Option<u32>,
        }
        let e = parse_body::<R>(b"{bad").unwrap_err();
        assert_eq!(e.body.code, "invalid_json");
        let e = parse_body::<R>(b"  ").unwrap_err();
        assert_eq!(e.body.code, "invalid_json");
        let e = parse_body::<R>(br#"{"to":"h2","mod":1}"#).unwrap_err();
        assert_eq!(e.body.code, "bad_request");
        assert!(
            e.body.message.contains("unknown field `mod`"),
            "{}",
            e.body.message
        );
        let e = parse_body::<R>(br#"{"to":"h2","n":"x"}"#).unwrap_err();
        assert!(
            e.body.message.starts_with("field `n`:"),
            "{}",
            e.body.message
        );
        let e = parse_body::<R>(br#"{"to":"h2"} {}"#).unwrap_err();
        assert_eq!(e.status, StatusCode::BAD_REQUEST);
        assert!(parse_body::<R>(br#"{"to":"h2"}"#).is_ok());
    }
}
