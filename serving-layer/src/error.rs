//! Errors become HTTP responses here and only here: a JSON problem body (RFC 9457) with the
//! status that says whose the fault is. A bad request is 400 with the reason; an unknown view
//! 404; a dependency that is away (storage, a layer behind a seam) 503 with `Retry-After`; a
//! bug 500, whose detail goes to the log, not to the client. [`problem_bodies`] gives the
//! router's own refusals (405, bad path encoding, oversized requests) the same bodies.

use std::fmt;

use axum::extract::Request;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;
use tandem_core::{CoreError, ErrorClass};

/// Seconds a client is told to wait before retrying a 503.
pub const RETRY_AFTER_S: u32 = 5;
/// The longest request target (path and query) accepted.
pub const MAX_URI_LEN: usize = 8 * 1024;
/// The most header bytes accepted.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;

/// The media type of problem bodies.
pub const PROBLEM_JSON: &str = "application/problem+json";

/// An error on its way to becoming a response.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// What the client is told.
    pub detail: String,
    /// The cause, for the log (server errors only).
    pub source: Option<CoreError>,
}

impl ApiError {
    pub fn bad_request(detail: impl Into<String>) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, detail)
    }

    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        ApiError {
            status,
            detail: detail.into(),
            source: None,
        }
    }
}

impl From<CoreError> for ApiError {
    fn from(e: CoreError) -> Self {
        let status = match (&e, e.class()) {
            (CoreError::UnknownView(_), _) => StatusCode::NOT_FOUND,
            (_, ErrorClass::User) => StatusCode::BAD_REQUEST,
            (_, ErrorClass::Unavailable) => StatusCode::SERVICE_UNAVAILABLE,
            (_, ErrorClass::Internal) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            ApiError {
                status,
                detail: match status {
                    StatusCode::SERVICE_UNAVAILABLE => {
                        "storage or a layer behind the API is unavailable; retry later".into()
                    }
                    _ => "the server could not answer; the error is in its log".into(),
                },
                source: Some(e),
            }
        } else {
            ApiError::new(status, e.to_string())
        }
    }
}

/// An error with its chain of causes, for the log.
pub struct Chain<'a>(pub &'a (dyn std::error::Error + 'static));

impl fmt::Display for Chain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Some(e) = &self.source {
            tracing::error!(status = self.status.as_u16(), error = %Chain(e), "request failed");
        }
        problem(self.status, &self.detail)
    }
}

/// A problem response.
pub fn problem(status: StatusCode, detail: &str) -> Response {
    let body = json!({
        "type": "about:blank",
        "title": status.canonical_reason().unwrap_or("error"),
        "status": status.as_u16(),
        "detail": detail,
    });
    let mut resp = (
        status,
        [(header::CONTENT_TYPE, PROBLEM_JSON)],
        body.to_string(),
    )
        .into_response();
    if status == StatusCode::SERVICE_UNAVAILABLE {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
    }
    resp
}

/// Middleware: refuses oversized requests with 414 / 431, and turns every error response the
/// router or an extractor made on its own (405, a path that is not valid UTF-8, a body that is
/// too large) into a problem body. Responses that already are problems pass unchanged.
pub async fn problem_bodies(req: Request, next: Next) -> Response {
    let target = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if target > MAX_URI_LEN {
        return problem(
            StatusCode::URI_TOO_LONG,
            &format!("the request target is longer than {MAX_URI_LEN} bytes"),
        );
    }
    let header_bytes: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if header_bytes > MAX_HEADER_BYTES {
        return problem(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            &format!("the request headers are larger than {MAX_HEADER_BYTES} bytes"),
        );
    }
    let method = req.method().clone();
    let resp = next.run(req).await;
    let status = resp.status();
    let is_problem = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(PROBLEM_JSON.as_bytes()));
    if !(status.is_client_error() || status.is_server_error()) || is_problem {
        return resp;
    }
    let (parts, body) = resp.into_parts();
    let text = axum::body::to_bytes(body, 64 * 1024)
        .await
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .unwrap_or_default();
    let detail = match (status, text.is_empty()) {
        (StatusCode::METHOD_NOT_ALLOWED, _) => {
            format!("{method} is not allowed on this path")
        }
        (_, false) => text,
        (_, true) => status.canonical_reason().unwrap_or("error").to_string(),
    };
    let mut out = problem(status, &detail);
    if let Some(allow) = parts.headers.get(header::ALLOW) {
        out.headers_mut().insert(header::ALLOW, allow.clone());
    }
    out
}
