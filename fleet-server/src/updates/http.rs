//! The TUF repository over HTTP, read-only and without authentication (every
//! byte is signed or hashed by signed metadata):
//!
//! - `GET /tuf/metadata/<name>`: `N.root.json`, `N.targets.json`,
//!   `N.snapshot.json`, `timestamp.json` (and `root.json`, the newest root,
//!   for people) from the database;
//! - `GET /tuf/targets/<sha256>.<target>`: a registered artifact, streamed,
//!   with single byte ranges (`Range: bytes=N-` or `N-M`) so that an
//!   interrupted download resumes.

use std::io::SeekFrom;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::api::AppState;
use crate::registry::artifact_path;

/// `/tuf/metadata/{name}` and `/tuf/targets/{file}`.
pub fn routes() -> Router<AppState> {
    Router::new().route("/tuf/metadata/{name}", get(metadata)).route("/tuf/targets/{file}", get(target))
}

fn plain(status: StatusCode, text: impl Into<String>) -> Response {
    (status, [(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text.into()).into_response()
}

async fn metadata(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    match state.db.tuf_file(&name).await {
        Ok(Some(body)) => {
            ([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-cache")], body).into_response()
        }
        Ok(None) => plain(StatusCode::NOT_FOUND, format!("no metadata {name}")),
        Err(e) => {
            tracing::warn!(error = %e, "serving TUF metadata");
            plain(StatusCode::SERVICE_UNAVAILABLE, "the database is unavailable")
        }
    }
}

/// A single byte range of a file of `len` bytes: `(start, end_inclusive)`;
/// `Err` for a range the file cannot satisfy, `Ok(None)` for none (or one
/// this server does not honour, such as several ranges: then the whole file).
fn byte_range(headers: &HeaderMap, len: u64) -> Result<Option<(u64, u64)>, ()> {
    let Some(value) = headers.get(header::RANGE).and_then(|v| v.to_str().ok()) else { return Ok(None) };
    let Some(spec) = value.strip_prefix("bytes=") else { return Ok(None) };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((start, end)) = spec.split_once('-') else { return Ok(None) };
    let (start, end) = match (start.trim().parse::<u64>(), end.trim()) {
        (Ok(s), "") => (s, len.saturating_sub(1)),
        (Ok(s), e) => match e.parse::<u64>() {
            Ok(e) => (s, e.min(len.saturating_sub(1))),
            Err(_) => return Ok(None),
        },
        // A suffix range (`-N`): the last N bytes.
        (Err(_), e) if start.trim().is_empty() => match e.parse::<u64>() {
            Ok(n) if n > 0 => (len.saturating_sub(n), len.saturating_sub(1)),
            _ => return Err(()),
        },
        _ => return Ok(None),
    };
    if start >= len || start > end {
        return Err(());
    }
    Ok(Some((start, end)))
}

async fn target(State(state): State<AppState>, Path(file): Path<String>, headers: HeaderMap) -> Response {
    let sha256 = match state.db.artifact_for(&file).await {
        Ok(Some(sha256)) => sha256,
        Ok(None) => return plain(StatusCode::NOT_FOUND, format!("no target {file}")),
        Err(e) => {
            tracing::warn!(error = %e, "serving a TUF target");
            return plain(StatusCode::SERVICE_UNAVAILABLE, "the database is unavailable");
        }
    };
    let path = artifact_path(&state.config.updates.artifacts_dir, &sha256);
    let mut opened = match tokio::fs::File::open(&path).await {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "a registered artifact cannot be read");
            return plain(StatusCode::INTERNAL_SERVER_ERROR, "the artifact is missing on this replica");
        }
    };
    let len = match opened.metadata().await {
        Ok(m) => m.len(),
        Err(_) => return plain(StatusCode::INTERNAL_SERVER_ERROR, "the artifact cannot be read"),
    };
    let range = match byte_range(&headers, len) {
        Ok(r) => r,
        Err(()) => {
            let mut response = plain(StatusCode::RANGE_NOT_SATISFIABLE, "range not satisfiable");
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{len}")) {
                response.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return response;
        }
    };
    let (status, start, count) = match range {
        Some((start, end)) => (StatusCode::PARTIAL_CONTENT, start, end - start + 1),
        None => (StatusCode::OK, 0, len),
    };
    if start > 0 && opened.seek(SeekFrom::Start(start)).await.is_err() {
        return plain(StatusCode::INTERNAL_SERVER_ERROR, "the artifact cannot be read");
    }
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(opened.take(count)));
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(count));
    if status == StatusCode::PARTIAL_CONTENT {
        if let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{}/{len}", start + count - 1)) {
            h.insert(header::CONTENT_RANGE, v);
        }
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(value: &str, len: u64) -> Result<Option<(u64, u64)>, ()> {
        let mut headers = HeaderMap::new();
        headers.insert(header::RANGE, HeaderValue::from_str(value).unwrap());
        byte_range(&headers, len)
    }

    #[test]
    fn byte_ranges() {
        assert_eq!(byte_range(&HeaderMap::new(), 10), Ok(None));
        assert_eq!(range("bytes=4-", 10), Ok(Some((4, 9))));
        assert_eq!(range("bytes=0-3", 10), Ok(Some((0, 3))));
        assert_eq!(range("bytes=5-100", 10), Ok(Some((5, 9))));
        assert_eq!(range("bytes=-3", 10), Ok(Some((7, 9))));
        assert_eq!(range("bytes=10-", 10), Err(()));
        assert_eq!(range("bytes=6-2", 10), Err(()));
        assert_eq!(range("bytes=0-1,4-5", 10), Ok(None), "several ranges: the whole file");
        assert_eq!(range("items=0-1", 10), Ok(None));
    }
}
