//! The control socket: `rxvisiond audit verify|export|prune` against a
//! running daemon.
//!
//! sled lets one process hold the audit store, and the service holds it for
//! as long as it runs. So the service also listens on a Unix socket,
//! `<state_dir>/control.sock` (mode 0600, in a 0700 state directory), and the
//! `audit` commands given `--config` go through it when it answers. Whoever
//! can reach the socket could read the store and its key file anyway; the
//! socket adds no new access. It is never on the network.
//!
//! The protocol is HTTP/1.1 over the socket (axum serves it, hyper's client
//! talks to it):
//!
//! | request | answer |
//! |---|---|
//! | `GET /audit/verify` | the [`VerifyReport`] as JSON |
//! | `POST /audit/export` `{from_ms, to_ms, operator}` | the records as JSON lines, then one [`EXPORT_END`] or [`EXPORT_ERROR`] line |
//! | `POST /audit/prune` `{before_ms, operator}` | the [`PruneSummary`] as JSON |
//!
//! Errors are `{"error": "..."}` with a 4xx/5xx status. An export streams
//! (a year of records never sits in memory) and always ends with its own
//! marker line, so a client can tell a complete export from a cut one.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::audit::{AuditLog, ExportSummary, PruneSummary, VerifyReport};

/// The socket's file name inside the state directory.
pub const SOCKET_NAME: &str = "control.sock";
/// The key of the line that ends a complete export.
pub const EXPORT_END: &str = "rxvision_export_end";
/// The key of the line that ends a failed export.
pub const EXPORT_ERROR: &str = "rxvision_export_error";

/// The control socket of the daemon whose state lives in `state_dir`.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join(SOCKET_NAME)
}

/// An export request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportRequest {
    /// First millisecond included.
    pub from_ms: u64,
    /// First millisecond excluded.
    pub to_ms: u64,
    /// Who exports (recorded).
    pub operator: String,
}

/// A pruning request.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneRequest {
    /// Records written before this millisecond are removed.
    pub before_ms: u64,
    /// Who prunes (recorded).
    pub operator: String,
}

// ------------------------------------------------------------------ server

/// The control routes over the daemon's audit log.
pub fn router(audit: Arc<AuditLog>) -> Router {
    Router::new()
        .route("/audit/verify", get(verify))
        .route("/audit/export", post(export))
        .route("/audit/prune", post(prune))
        .with_state(audit)
}

fn failure(status: StatusCode, message: impl std::fmt::Display) -> Response {
    (status, Json(json!({ "error": message.to_string() }))).into_response()
}

async fn verify(State(audit): State<Arc<AuditLog>>) -> Response {
    match tokio::task::spawn_blocking(move || audit.verify()).await {
        Ok(Ok(report)) => Json(report).into_response(),
        Ok(Err(e)) => failure(StatusCode::INTERNAL_SERVER_ERROR, e),
        Err(e) => failure(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn prune(State(audit): State<Arc<AuditLog>>, Json(request): Json<PruneRequest>) -> Response {
    if request.operator.trim().is_empty() {
        return failure(StatusCode::BAD_REQUEST, "operator must not be empty");
    }
    match tokio::task::spawn_blocking(move || audit.prune(request.before_ms, &request.operator)).await {
        Ok(Ok(summary)) => Json(summary).into_response(),
        Ok(Err(e)) => failure(StatusCode::CONFLICT, e),
        Err(e) => failure(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// Sends what the export writes, in chunks, to the response body.
struct ChunkSender {
    buffer: Vec<u8>,
    tx: tokio::sync::mpsc::Sender<Bytes>,
}

const CHUNK: usize = 64 * 1024;

impl Write for ChunkSender {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(data);
        if self.buffer.len() >= CHUNK {
            self.flush()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buffer));
        self.tx
            .blocking_send(chunk)
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away"))
    }
}

async fn export(State(audit): State<Arc<AuditLog>>, Json(request): Json<ExportRequest>) -> Response {
    if request.operator.trim().is_empty() {
        return failure(StatusCode::BAD_REQUEST, "operator must not be empty");
    }
    if request.from_ms >= request.to_ms {
        return failure(StatusCode::BAD_REQUEST, "from_ms must be before to_ms");
    }
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    tokio::task::spawn_blocking(move || {
        let mut out = ChunkSender { buffer: Vec::with_capacity(CHUNK), tx };
        let end = match audit.export(request.from_ms, request.to_ms, &request.operator, &mut out) {
            Ok(summary) => json!({ EXPORT_END: summary }),
            Err(e) => json!({ EXPORT_ERROR: e.to_string() }),
        };
        let _ = writeln!(out, "{end}").and_then(|()| out.flush());
    });
    let stream = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx).map(|c| c.map(Ok::<_, std::io::Error>)));
    ([(axum::http::header::CONTENT_TYPE, "application/jsonl")], Body::from_stream(stream)).into_response()
}

/// Serves the control routes on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: tokio::net::UnixListener,
    audit: Arc<AuditLog>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(audit)).with_graceful_shutdown(shutdown).await
}

/// Binds the control socket in `state_dir` (mode 0600). A leftover socket
/// file of a crashed daemon is replaced: this process holds the audit store's
/// lock, so no other daemon can be using it.
pub fn bind(state_dir: &Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let path = socket_path(state_dir);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

// ------------------------------------------------------------------ client

/// A connection to a running daemon's control socket.
#[derive(Debug)]
pub struct Client {
    runtime: tokio::runtime::Runtime,
    socket: PathBuf,
}

/// Why the daemon could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Nothing answers on the socket (no daemon, or a stale socket file).
    #[error("no daemon answers on {0}")]
    NotRunning(String),
    /// The daemon answered with an error.
    #[error("{0}")]
    Refused(String),
    /// Writing the export failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

type Connection = hyper::client::conn::http1::SendRequest<http_body_util::Full<Bytes>>;

impl Client {
    /// Connects to the daemon's socket in `state_dir`, if one answers.
    pub fn connect(state_dir: &Path) -> Result<Client, ClientError> {
        let socket = socket_path(state_dir);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        let client = Client { runtime, socket };
        client.runtime.block_on(client.open())?;
        Ok(client)
    }

    /// The socket this client talks to.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    async fn open(&self) -> Result<Connection, ClientError> {
        let not_running = |_| ClientError::NotRunning(self.socket.display().to_string());
        let stream = tokio::net::UnixStream::connect(&self.socket).await.map_err(not_running)?;
        let (sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| ClientError::NotRunning(format!("{}: {e}", self.socket.display())))?;
        tokio::spawn(connection);
        Ok(sender)
    }

    async fn send(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let mut sender = self.open().await?;
        let request = hyper::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "rxvisiond")
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ClientError::Refused(e.to_string()))?;
        let response = sender.send_request(request).await.map_err(|e| ClientError::Refused(e.to_string()))?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let bytes = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let message = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["error"].as_str().map(str::to_string))
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).into_owned());
        Err(ClientError::Refused(format!("the daemon refused ({status}): {message}")))
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> Result<T, ClientError> {
        let response = self.send(method, path, body).await?;
        let bytes = response.into_body().collect().await.map_err(|e| ClientError::Refused(e.to_string()))?.to_bytes();
        serde_json::from_slice(&bytes).map_err(|e| ClientError::Refused(format!("unreadable answer: {e}")))
    }

    /// `audit verify` in the daemon.
    pub fn verify(&self) -> Result<VerifyReport, ClientError> {
        self.runtime.block_on(self.json("GET", "/audit/verify", None))
    }

    /// `audit prune` in the daemon.
    pub fn prune(&self, request: &PruneRequest) -> Result<PruneSummary, ClientError> {
        let body = serde_json::to_string(request).expect("requests serialise");
        self.runtime.block_on(self.json("POST", "/audit/prune", Some(body)))
    }

    /// `audit export` in the daemon: the records go to `out`, the summary is returned.
    pub fn export(&self, request: &ExportRequest, out: &mut dyn Write) -> Result<ExportSummary, ClientError> {
        let body = serde_json::to_string(request).expect("requests serialise");
        self.runtime.block_on(async {
            let mut response = self.send("POST", "/audit/export", Some(body)).await?.into_body();
            let mut pending: Vec<u8> = Vec::new();
            while let Some(frame) = response.frame().await {
                let frame = frame.map_err(|e| ClientError::Refused(format!("the export was cut: {e}")))?;
                let Some(data) = frame.data_ref() else { continue };
                pending.extend_from_slice(data);
                // Write every complete line but the last seen so far: it may be the end marker.
                if let Some(cut) = pending.iter().rposition(|&b| b == b'\n') {
                    let rest = pending.split_off(cut + 1);
                    let lines = std::mem::replace(&mut pending, rest);
                    let (done, last) = split_last_line(&lines);
                    out.write_all(done)?;
                    pending.splice(0..0, last.iter().copied());
                }
            }
            let last = String::from_utf8_lossy(&pending);
            let end: serde_json::Value = serde_json::from_str(last.trim())
                .map_err(|_| ClientError::Refused("the export was cut before its end marker".into()))?;
            if let Some(summary) = end.get(EXPORT_END) {
                out.flush()?;
                return serde_json::from_value(summary.clone())
                    .map_err(|e| ClientError::Refused(format!("unreadable export summary: {e}")));
            }
            if let Some(error) = end.get(EXPORT_ERROR) {
                return Err(ClientError::Refused(error.as_str().unwrap_or_default().to_string()));
            }
            // The last line was a record: the marker never came.
            Err(ClientError::Refused("the export was cut before its end marker".into()))
        })
    }
}

/// Splits `lines` (ending in `\n`) into all lines but the last, and the last.
fn split_last_line(lines: &[u8]) -> (&[u8], &[u8]) {
    let body = &lines[..lines.len() - 1];
    match body.iter().rposition(|&b| b == b'\n') {
        Some(i) => lines.split_at(i + 1),
        None => (&[], lines),
    }
}

#[cfg(test)]
mod tests {
    use super::split_last_line;

    #[test]
    fn the_last_line_is_held_back() {
        assert_eq!(split_last_line(b"a\nb\nc\n"), (&b"a\nb\n"[..], &b"c\n"[..]));
        assert_eq!(split_last_line(b"c\n"), (&b""[..], &b"c\n"[..]));
    }
}

/// Where the `audit` commands work: in the running daemon, which holds the
/// store's lock, through its control socket; or on the store directly.
#[derive(Debug)]
pub enum AuditAccess {
    /// A daemon answers on the control socket.
    Daemon(Client),
    /// The store itself (no daemon holds it).
    Local(Box<AuditLog>),
}

/// Why the `audit` commands cannot reach the log.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The configuration is unreadable or invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A key file is unusable.
    #[error("{0}")]
    Key(String),
    /// The control socket answered with an error.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A daemon holds the store (for `accept-store`, which needs it stopped).
    #[error("the daemon is running (it answers on {0}); stop it before accepting a store")]
    Running(PathBuf),
    /// The store cannot be opened (missing, refused, in use …).
    #[error("{0} (with --config, the audit commands go through a running daemon's control socket)")]
    Audit(#[from] crate::audit::AuditError),
}

impl AuditAccess {
    /// The daemon of `config` if one answers, else its store, anchor and
    /// retention floor as the daemon would open them (never creating a store).
    pub fn from_config(config: &Path, extra_keys: &[PathBuf]) -> Result<AuditAccess, AccessError> {
        let config = crate::config::load(config)?;
        match Client::connect(&config.state_dir) {
            Ok(client) => return Ok(AuditAccess::Daemon(client)),
            Err(ClientError::NotRunning(_)) => {}
            Err(e) => return Err(e.into()),
        }
        let key = config.audit.key_path().map_err(AccessError::Key)?;
        let mut previous = config.audit.previous_key_files.clone();
        previous.extend(extra_keys.iter().cloned());
        let keys = crate::audit::KeyRing::load(&key, &previous).map_err(|e| AccessError::Key(e.to_string()))?;
        let options = crate::audit::AuditOptions { create: false, ..crate::service::audit_options(&config) };
        Ok(AuditAccess::Local(Box::new(AuditLog::open_with(&config.audit.dir, keys, options)?)))
    }

    /// A store directory with its keys (a copy examined anywhere: no anchor).
    pub fn from_dir(dir: &Path, key: &Path, previous: &[PathBuf]) -> Result<AuditAccess, AccessError> {
        let keys = crate::audit::KeyRing::load(key, previous).map_err(|e| AccessError::Key(e.to_string()))?;
        let options = crate::audit::AuditOptions { create: false, ..crate::audit::AuditOptions::default() };
        Ok(AuditAccess::Local(Box::new(AuditLog::open_with(dir, keys, options)?)))
    }

    /// `audit verify`.
    pub fn verify(&self) -> Result<VerifyReport, AccessError> {
        match self {
            AuditAccess::Daemon(client) => Ok(client.verify()?),
            AuditAccess::Local(log) => Ok(log.verify()?),
        }
    }

    /// `audit export`: records to `out`, the summary returned.
    pub fn export(
        &self,
        from_ms: u64,
        to_ms: u64,
        operator: &str,
        out: &mut dyn Write,
    ) -> Result<ExportSummary, AccessError> {
        match self {
            AuditAccess::Daemon(client) => {
                Ok(client.export(&ExportRequest { from_ms, to_ms, operator: operator.to_string() }, out)?)
            }
            AuditAccess::Local(log) => Ok(log.export(from_ms, to_ms, operator, out)?),
        }
    }

    /// `audit prune`.
    pub fn prune(&self, before_ms: u64, operator: &str) -> Result<PruneSummary, AccessError> {
        match self {
            AuditAccess::Daemon(client) => {
                Ok(client.prune(&PruneRequest { before_ms, operator: operator.to_string() })?)
            }
            AuditAccess::Local(log) => Ok(log.prune(before_ms, operator)?),
        }
    }
}

/// `audit accept-store`: opens the store of `config` accepting that it does
/// not continue the anchored chain; the acceptance is its newest record.
/// Refused while a daemon answers (it holds the store).
pub fn accept_store(config: &Path, acceptance: crate::audit::Acceptance) -> Result<AuditLog, AccessError> {
    let config = crate::config::load(config)?;
    if let Ok(client) = Client::connect(&config.state_dir) {
        return Err(AccessError::Running(client.socket().to_path_buf()));
    }
    let key = config.audit.key_path().map_err(AccessError::Key)?;
    let keys = crate::audit::KeyRing::load(&key, &config.audit.previous_key_files)
        .map_err(|e| AccessError::Key(e.to_string()))?;
    let options = crate::audit::AuditOptions { accept: Some(acceptance), ..crate::service::audit_options(&config) };
    Ok(AuditLog::open_with(&config.audit.dir, keys, options)?)
}
