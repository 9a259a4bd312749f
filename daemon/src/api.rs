//! The local API, versioned under `/v1`, for the pharmacy system and the
//! counter page.
//!
//! | route | what |
//! |---|---|
//! | `POST /v1/verify` | `{expected_ndc?, operator_id, rx_ref?, image?}` (image: base64 JPEG/PNG; absent: take a frame from the camera) → the scan's result with its `audit_seq` |
//! | `POST /v1/feedback` | `{audit_seq, confirmed: true}` or `{audit_seq, correct_ndc}`, with `operator_id` → `{audit_seq}` of the feedback record |
//! | `GET /v1/status` | model, engine, camera, audit chain head and store state, uptime |
//! | `GET /v1/health` | 200 while scans can be answered; 503 while shutting down or after a failed audit write |
//! | `GET /metrics` | Prometheus text |
//! | `GET /` | the counter page (asks once for the API key, keeps it in the browser) |
//! | `GET /v1/frame` | the camera's current picture (JPEG/PNG); a verification without an image uses it if it is under 3 s old |
//! | `GET /v1/reference/{ndc}` | a rendered reference picture of a formulary product (JPEG) |
//!
//! `/v1/*` needs the API key (`Authorization: Bearer KEY` or `X-Api-Key:
//! KEY`); `/metrics` and `/v1/health` do not, for monitoring on loopback.
//! Every error is `{"error": {"code", "message"}}` with a stable code (one
//! place: [`ApiError`]); causes are logged, not sent. Before a guarded
//! handler runs, one middleware (`guard`) checks the key from the headers, takes a scan slot
//! for `/v1/verify` (`busy`, 503 with `Retry-After`, when none is free; the
//! body is read and dropped first, so the client gets the answer) and
//! reads the body within the configured time (408) and size (413).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use rxvision_counter::analysis::{AnalysisError, ScanRequest};
use rxvision_models::formulary::{Face, Formulary};
use rxvision_synth::scene::{render_sample, SceneOptions};
use serde::Deserialize;
use serde_json::json;

use crate::audit::{now_ms, AuditEvent, RecordKind, StoreHealth};
use crate::camera::{CameraError, FrameSource};
use crate::scan::{ScanError, Scanner};
use crate::telemetry::{Observation, TelemetryService};

/// Every error the API answers, in one place: its HTTP status, its stable
/// `code` and the message a person reads. Internal causes are logged where
/// they happen, never sent.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No or a wrong API key.
    #[error("missing or wrong API key")]
    Unauthorized,
    /// The body is not the JSON the endpoint takes.
    #[error("{0}")]
    MalformedRequest(String),
    /// The body is over `api.max_body_bytes`.
    #[error("the request body is too large")]
    BodyTooLarge,
    /// The body was not sent within `api.request_timeout_ms`.
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    /// The body is not declared as JSON.
    #[error("send the request body as JSON (Content-Type: application/json)")]
    NotJson,
    /// A field is empty, too long or has control characters.
    #[error("{field} must be 1-{max} printable characters")]
    InvalidField {
        /// The field.
        field: &'static str,
        /// Its longest allowed length.
        max: usize,
    },
    /// `image` is not base64.
    #[error("image is not base64: {0}")]
    BadImageEncoding(String),
    /// Neither an image nor a camera.
    #[error("no camera is configured: send the picture as \"image\"")]
    NoCamera,
    /// The camera gave no frame.
    #[error("{0}")]
    CameraUnavailable(String),
    /// The audit record could not be written: no answer may be given.
    #[error("the audit log cannot be written; no answer can be given")]
    AuditUnavailable,
    /// An audit record could not be read.
    #[error("the audit record cannot be read")]
    AuditUnreadable,
    /// Every engine failed.
    #[error("the model could not run")]
    InferenceFailed,
    /// As many scans as allowed are running.
    #[error("the counter is busy with other scans; try again in a second")]
    Busy,
    /// The daemon is stopping.
    #[error("the daemon is shutting down")]
    ShuttingDown,
    /// No such route.
    #[error("no such endpoint (the API lives under /v1)")]
    NotFound,
    /// A reference picture of a product the formulary does not have.
    #[error("{0} is not in the installed formulary")]
    UnknownProduct(String),
    /// The reference picture could not be drawn.
    #[error("the reference picture could not be drawn")]
    RenderFailed,
    /// Feedback must either confirm or correct.
    #[error("send either \"confirmed\": true or \"correct_ndc\", not both")]
    InvalidFeedback,
    /// Feedback about a record that is not a verification.
    #[error("audit record {0} is not a verification")]
    NotAVerification(u64),
    /// Feedback about a record that does not exist.
    #[error("there is no audit record {0}")]
    UnknownAuditSeq(u64),
    /// A task was interrupted (a bug, or the runtime stopping).
    #[error("the request was interrupted")]
    Internal,
}

impl ApiError {
    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        use ApiError::*;
        match self {
            Unauthorized => StatusCode::UNAUTHORIZED,
            MalformedRequest(_)
            | InvalidField { .. }
            | BadImageEncoding(_)
            | NoCamera
            | InvalidFeedback
            | NotAVerification(_) => StatusCode::BAD_REQUEST,
            BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            NotJson => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            NotFound | UnknownProduct(_) | UnknownAuditSeq(_) => StatusCode::NOT_FOUND,
            CameraUnavailable(_) | AuditUnavailable | Busy | ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            AuditUnreadable | InferenceFailed | RenderFailed | Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable code clients branch on.
    pub fn code(&self) -> &'static str {
        use ApiError::*;
        match self {
            Unauthorized => "unauthorized",
            MalformedRequest(_) => "malformed_request",
            BodyTooLarge => "body_too_large",
            RequestTimeout => "request_timeout",
            NotJson => "not_json",
            InvalidField { .. } => "invalid_field",
            BadImageEncoding(_) => "bad_image_encoding",
            NoCamera => "no_camera",
            CameraUnavailable(_) => "camera_unavailable",
            AuditUnavailable => "audit_unavailable",
            AuditUnreadable => "audit_unreadable",
            InferenceFailed => "inference_failed",
            Busy => "busy",
            ShuttingDown => "shutting_down",
            NotFound => "not_found",
            UnknownProduct(_) => "unknown_product",
            RenderFailed => "render_failed",
            InvalidFeedback => "invalid_feedback",
            NotAVerification(_) => "not_a_verification",
            UnknownAuditSeq(_) => "unknown_audit_seq",
            Internal => "internal",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = Json(json!({ "error": { "code": self.code(), "message": self.to_string() } }));
        let mut response = (self.status(), body).into_response();
        if matches!(self, ApiError::Busy) {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> ApiError {
        match rejection {
            JsonRejection::BytesRejection(_) => ApiError::BodyTooLarge,
            JsonRejection::MissingJsonContentType(_) => ApiError::NotJson,
            other => ApiError::MalformedRequest(other.body_text()),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    model_version: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EngineLabels {
    engine: String,
}

/// The daemon's Prometheus metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    predictions: Family<OutcomeLabels, Counter>,
    latency: Histogram,
    engine: Family<EngineLabels, Gauge>,
    fallbacks: Gauge,
    camera_up: Gauge,
    audit_chain_length: Gauge,
    audit_store_up: Gauge,
    scans_in_flight: Gauge,
    outbox_messages: Gauge,
    outbox_oldest_unacked: Gauge,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::default();
        let predictions = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "rxvision_predictions",
            "Verifications answered, by model version and verdict",
            predictions.clone(),
        );
        let latency = Histogram::new([0.005, 0.01, 0.02, 0.03, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]);
        registry.register("rxvision_prediction_latency_seconds", "Frame to verdict", latency.clone());
        let engine = Family::<EngineLabels, Gauge>::default();
        registry.register("rxvision_engine", "1 for the engine answering requests", engine.clone());
        let fallbacks = Gauge::default();
        registry.register(
            "rxvision_engine_fallbacks",
            "Requests the CPU answered after a GPU failure (total)",
            fallbacks.clone(),
        );
        let camera_up = Gauge::default();
        registry.register(
            "rxvision_camera_up",
            "1 if the camera delivers frames (a live camera: now; a replay or renderer: at the last request)",
            camera_up.clone(),
        );
        let audit_chain_length = Gauge::default();
        registry.register(
            "rxvision_audit_chain_length",
            "Records in the audit chain (next sequence number)",
            audit_chain_length.clone(),
        );
        let audit_store_up = Gauge::default();
        registry.register(
            "rxvision_audit_store_up",
            "1 while the audit store's last write was durable; 0 after a failed write until one succeeds",
            audit_store_up.clone(),
        );
        let scans_in_flight = Gauge::default();
        registry.register(
            "rxvision_scans_in_flight",
            "Scans holding one of the api.max_concurrent_scans slots (receiving their picture or running)",
            scans_in_flight.clone(),
        );
        let outbox_messages = Gauge::default();
        registry.register(
            "rxvision_outbox_messages",
            "Telemetry messages waiting for the fleet's acknowledgement",
            outbox_messages.clone(),
        );
        let outbox_oldest_unacked = Gauge::default();
        registry.register(
            "rxvision_outbox_oldest_unacked_seconds",
            "Age of the oldest telemetry message not yet acknowledged by the fleet",
            outbox_oldest_unacked.clone(),
        );
        Metrics {
            registry,
            predictions,
            latency,
            engine,
            fallbacks,
            camera_up,
            audit_chain_length,
            audit_store_up,
            scans_in_flight,
            outbox_messages,
            outbox_oldest_unacked,
        }
    }
}

/// Everything the handlers share.
pub struct AppState {
    /// The counter path.
    pub scanner: Scanner,
    /// The camera, when one is configured.
    pub camera: Option<Mutex<Box<dyn FrameSource>>>,
    /// The pharmacy system's key.
    pub api_key: String,
    /// The appliance id.
    pub device_id: String,
    /// Set once shutdown begins: new scans are refused.
    pub shutting_down: AtomicBool,
    /// Product attributes for reference pictures, when a formulary is installed.
    pub formulary: Option<Formulary>,
    /// Body size, scan concurrency and body timeout.
    pub limits: ApiLimits,
    /// Telemetry windows and their outbox, when `[telemetry]` is enabled.
    pub telemetry: Option<TelemetryService>,
    /// The updater, when `[updates]` is enabled.
    pub updates: Option<UpdatesHandle>,
    /// The model and release slots and how long a new model's or release's trial lasts.
    pub slots: Option<(Vec<crate::updates::slots::SlotStore>, std::time::Duration)>,
    /// Told when a new model or release was installed: the service stops and `run` restarts it.
    pub restart: Arc<tokio::sync::Notify>,
    /// Set when the service stopped to restart into a new model or release.
    pub restart_requested: AtomicBool,
    /// One permit per scan allowed to run at once.
    scans: Arc<tokio::sync::Semaphore>,
    metrics: Metrics,
    started: Instant,
    /// The last picture shown on the counter page: what the pharmacist saw is what is verified.
    preview: Mutex<Option<(Instant, Vec<u8>)>>,
    references: Mutex<HashMap<String, Vec<u8>>>,
}

/// The updater and the hint the fleet's `desired` message gives it.
#[derive(Debug, Clone)]
pub struct UpdatesHandle {
    /// The updater.
    pub updater: Arc<crate::updates::Updater>,
    /// Notified when the fleet hints that metadata changed.
    pub hint: Arc<tokio::sync::Notify>,
}

/// What one request may cost.
#[derive(Debug, Clone, Copy)]
pub struct ApiLimits {
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Scans running at once; more are answered `busy`.
    pub max_concurrent_scans: usize,
    /// Time a client has to send its body.
    pub request_timeout: std::time::Duration,
}

impl Default for ApiLimits {
    fn default() -> ApiLimits {
        ApiLimits {
            max_body_bytes: 16 << 20,
            max_concurrent_scans: 2,
            request_timeout: std::time::Duration::from_secs(10),
        }
    }
}

/// How long a previewed frame stands in for a new one.
const PREVIEW_FRESH: std::time::Duration = std::time::Duration::from_secs(3);

impl AppState {
    /// Assembles the shared state.
    pub fn new(
        scanner: Scanner,
        camera: Option<Box<dyn FrameSource>>,
        api_key: String,
        device_id: String,
        formulary: Option<Formulary>,
        limits: ApiLimits,
    ) -> AppState {
        let metrics = Metrics::new();
        metrics.camera_up.set(i64::from(camera.is_some()));
        AppState {
            scanner,
            camera: camera.map(Mutex::new),
            api_key,
            device_id,
            shutting_down: AtomicBool::new(false),
            formulary,
            limits,
            telemetry: None,
            updates: None,
            slots: None,
            restart: Arc::new(tokio::sync::Notify::new()),
            restart_requested: AtomicBool::new(false),
            scans: Arc::new(tokio::sync::Semaphore::new(limits.max_concurrent_scans)),
            metrics,
            started: Instant::now(),
            preview: Mutex::new(None),
            references: Mutex::new(HashMap::new()),
        }
    }
}

impl AppState {
    /// Checks for signed model updates.
    pub fn with_updates(mut self, updates: UpdatesHandle) -> AppState {
        self.updates = Some(updates);
        self
    }

    /// Keeps a new model's (or release's) trial until it has served `healthy_after`.
    pub fn with_slots(
        mut self,
        stores: Vec<crate::updates::slots::SlotStore>,
        healthy_after: std::time::Duration,
    ) -> AppState {
        self.slots = Some((stores, healthy_after));
        self
    }

    /// Counts scans and feedback into telemetry windows.
    pub fn with_telemetry(mut self, telemetry: TelemetryService) -> AppState {
        self.telemetry = Some(telemetry);
        self
    }

    /// The device's state as the fleet's retained status carries it.
    pub fn device_status(&self) -> rxvision_protocol::Status {
        let classifier = self.scanner.classifier();
        let manifest = &classifier.bundle().manifest;
        let engines = classifier.engines();
        let (next_seq, head) = self.scanner.audit().head();
        let outbox = self.telemetry.as_ref().map(|t| {
            let (depth, bytes, oldest, acked) = t.outbox.depth();
            rxvision_protocol::OutboxState {
                depth: depth as u64,
                bytes,
                oldest_unacked_s: oldest.map_or(0, |t| now_ms().saturating_sub(t) / 1000),
                acked_seq: acked,
            }
        });
        rxvision_protocol::Status {
            v: rxvision_protocol::PROTOCOL_VERSION,
            device_id: self.device_id.clone(),
            online: true,
            time_ms: now_ms(),
            daemon_version: Some(crate::daemon_version().to_string()),
            model: Some(rxvision_protocol::ModelRef {
                name: manifest.name.clone(),
                version: manifest.version.to_string(),
            }),
            engine: Some(rxvision_protocol::EngineState {
                active: engines.active().to_string(),
                choice: engines.choice().to_string().chars().take(512).collect(),
                gpu_degraded: engines.gpu_degraded(),
                fallbacks: engines.fallbacks(),
            }),
            outbox,
            audit: Some(rxvision_protocol::ChainHead {
                next_seq,
                head: head.iter().map(|b| format!("{b:02x}")).collect(),
            }),
        }
    }
}

/// The API's routes over `state`.
pub fn router(state: Arc<AppState>) -> Router {
    let guarded = Router::new()
        .route("/v1/verify", post(verify))
        .route("/v1/feedback", post(feedback))
        .route("/v1/status", get(status))
        .route("/v1/frame", get(frame))
        .route("/v1/reference/{ndc}", get(reference))
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), guard));
    Router::new()
        .merge(guarded)
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics))
        .route("/", get(page))
        .fallback(|| async { ApiError::NotFound })
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .with_state(state)
}

/// A scan's slot among [`ApiLimits::max_concurrent_scans`], held until the
/// scan (which runs on the blocking pool) has finished.
#[derive(Clone)]
struct ScanPermit(#[allow(dead_code)] Arc<tokio::sync::OwnedSemaphorePermit>);

/// Runs before any guarded handler, in this order, so that nothing costly
/// happens for a request that will be refused: the API key (from the
/// headers: the body is not read for a wrong key), a scan slot for
/// `/v1/verify` (`busy` when none is free), then the body, read within
/// [`ApiLimits::request_timeout`] and [`ApiLimits::max_body_bytes`].
async fn guard(
    State(state): State<Arc<AppState>>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Result<Response, ApiError> {
    authorise(&state, request.headers())?;
    if request.uri().path() == "/v1/verify" {
        if state.shutting_down.load(Ordering::Acquire) {
            return Err(ApiError::ShuttingDown);
        }
        let Ok(permit) = state.scans.clone().try_acquire_owned() else {
            // Read and drop what the client is sending (nothing is kept), so
            // that it gets this answer rather than a connection reset by a
            // close with its picture unread.
            let limits = state.limits;
            let _ =
                tokio::time::timeout(limits.request_timeout, discard(request.into_body(), limits.max_body_bytes)).await;
            return Err(ApiError::Busy);
        };
        request.extensions_mut().insert(ScanPermit(Arc::new(permit)));
    }
    let (parts, body) = request.into_parts();
    let bytes = match tokio::time::timeout(
        state.limits.request_timeout,
        axum::body::to_bytes(body, state.limits.max_body_bytes),
    )
    .await
    {
        Err(_) => return Err(ApiError::RequestTimeout),
        Ok(Err(_)) => return Err(ApiError::BodyTooLarge),
        Ok(Ok(bytes)) => bytes,
    };
    Ok(next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await)
}

/// Reads a body to its end (or `limit` bytes), keeping none of it.
async fn discard(body: axum::body::Body, limit: usize) {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut read = 0;
    while let Some(Ok(frame)) = body.frame().await {
        read += frame.data_ref().map_or(0, |d| d.len());
        if read > limit {
            break;
        }
    }
}

fn authorise(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let given = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")))
        .unwrap_or_default();
    let expected = state.api_key.as_bytes();
    // Constant time in the key's length: the comparison reveals nothing but a mismatch.
    let same = given.len() == expected.len() && given.bytes().zip(expected).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
    if same {
        Ok(())
    } else {
        Err(ApiError::Unauthorized)
    }
}

fn check_text(field: &'static str, value: &str, max: usize) -> Result<(), ApiError> {
    if value.trim().is_empty() || value.len() > max || value.chars().any(char::is_control) {
        return Err(ApiError::InvalidField { field, max });
    }
    Ok(())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VerifyBody {
    expected_ndc: Option<String>,
    operator_id: String,
    rx_ref: Option<String>,
    image: Option<String>,
}

async fn verify(
    State(state): State<Arc<AppState>>,
    axum::Extension(permit): axum::Extension<ScanPermit>,
    body: Result<Json<VerifyBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    check_text("operator_id", &body.operator_id, 64)?;
    if let Some(ndc) = &body.expected_ndc {
        check_text("expected_ndc", ndc, 32)?;
    }
    if let Some(rx) = &body.rx_ref {
        check_text("rx_ref", rx, 128)?;
    }
    let request = ScanRequest { expected_ndc: body.expected_ndc, operator_id: body.operator_id, rx_ref: body.rx_ref };
    let state2 = state.clone();
    let result = tokio::task::spawn_blocking(move || {
        let _slot = permit; // held until this scan is done, even if the client has gone
        let frame = match body.image {
            Some(b64) => base64::engine::general_purpose::STANDARD
                .decode(b64.as_bytes())
                .map_err(|e| ApiError::BadImageEncoding(e.to_string()))?,
            None => recent_preview(&state2).map_or_else(|| take_frame(&state2), Ok)?,
        };
        let result = state2.scanner.scan(&request, &frame);
        if let (Ok(answer), Some(telemetry)) = (&result, &state2.telemetry) {
            telemetry.collector.observe(Observation::Scan { analysis: Box::new(answer.analysis.clone()) });
        }
        result.map_err(|e| match e {
            ScanError::Audit(cause) => {
                tracing::error!(error = %cause, "audit record not written; verification refused");
                ApiError::AuditUnavailable
            }
            ScanError::Analysis(AnalysisError::Engine(cause)) => {
                tracing::error!(error = %cause, "inference failed on every engine");
                ApiError::InferenceFailed
            }
        })
    })
    .await
    .map_err(|_| ApiError::Internal)??;
    let m = &state.metrics;
    let outcome = result.verdict.as_str().to_string();
    m.predictions.get_or_create(&OutcomeLabels { model_version: result.model_version.clone(), outcome }).inc();
    m.latency.observe(result.latency_ms / 1e3);
    Ok(Json(result).into_response())
}

fn take_frame(state: &AppState) -> Result<Vec<u8>, ApiError> {
    let Some(camera) = &state.camera else {
        return Err(ApiError::NoCamera);
    };
    let mut camera = camera.lock().unwrap_or_else(|p| p.into_inner());
    match camera.next_frame() {
        Ok(frame) => {
            state.metrics.camera_up.set(1);
            Ok(frame.encoded)
        }
        Err(CameraError::BadFrame { source_name, error, encoded }) => {
            state.metrics.camera_up.set(1);
            // A corrupt frame is still a frame: the scan answers BAD_IMAGE and is audited.
            tracing::warn!(frame = %source_name, error = %error, "camera delivered an unreadable frame");
            Ok(encoded)
        }
        Err(e) => {
            state.metrics.camera_up.set(0);
            tracing::warn!(error = %e, camera = %camera.describe(), "no frame from the camera");
            Err(ApiError::CameraUnavailable(e.to_string()))
        }
    }
}

fn recent_preview(state: &AppState) -> Option<Vec<u8>> {
    let preview = state.preview.lock().unwrap_or_else(|p| p.into_inner()).take()?;
    (preview.0.elapsed() < PREVIEW_FRESH).then_some(preview.1)
}

const PAGE: &str = include_str!("page/index.html");

async fn page() -> Response {
    ([(axum::http::header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response()
}

async fn frame(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let state2 = state.clone();
    let bytes = tokio::task::spawn_blocking(move || take_frame(&state2)).await.map_err(|_| ApiError::Internal)??;
    *state.preview.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), bytes.clone()));
    let mime = if bytes.starts_with(b"\x89PNG") { "image/png" } else { "image/jpeg" };
    Ok(([(axum::http::header::CONTENT_TYPE, mime), (axum::http::header::CACHE_CONTROL, "no-store")], bytes)
        .into_response())
}

async fn reference(
    State(state): State<Arc<AppState>>,
    axum::extract::Path(ndc): axum::extract::Path<String>,
) -> Result<Response, ApiError> {
    let cached = state.references.lock().unwrap_or_else(|p| p.into_inner()).get(&ndc).cloned();
    let jpeg = match cached {
        Some(jpeg) => jpeg,
        None => {
            let product = state
                .formulary
                .as_ref()
                .and_then(|f| f.products.iter().find(|p| p.ndc == ndc))
                .cloned()
                .ok_or_else(|| ApiError::UnknownProduct(ndc.clone()))?;
            let jpeg = tokio::task::spawn_blocking(move || {
                let mut options = SceneOptions::crop(320, 240);
                options.clean = true;
                render_sample(&product, Face::Front, &[], 0, &options).to_jpeg()
            })
            .await
            .map_err(|_| ApiError::Internal)?
            .map_err(|e| {
                tracing::error!(error = %e, "reference picture not rendered");
                ApiError::RenderFailed
            })?;
            state.references.lock().unwrap_or_else(|p| p.into_inner()).insert(ndc, jpeg.clone());
            jpeg
        }
    };
    Ok(([(axum::http::header::CONTENT_TYPE, "image/jpeg")], jpeg).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedbackBody {
    audit_seq: u64,
    confirmed: Option<bool>,
    correct_ndc: Option<String>,
    operator_id: String,
}

async fn feedback(
    State(state): State<Arc<AppState>>,
    body: Result<Json<FeedbackBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    check_text("operator_id", &body.operator_id, 64)?;
    match (&body.confirmed, &body.correct_ndc) {
        (Some(true), None) => {}
        (None, Some(ndc)) => check_text("correct_ndc", ndc, 32)?,
        _ => return Err(ApiError::InvalidFeedback),
    }
    let state2 = state.clone();
    let seq = tokio::task::spawn_blocking(move || {
        let audit = state2.scanner.audit();
        let target = audit.get(body.audit_seq).map_err(|e| {
            tracing::error!(error = %e, "audit record unreadable");
            ApiError::AuditUnreadable
        })?;
        match &target {
            Some(r) if r.kind == RecordKind::Verification => {}
            Some(_) => return Err(ApiError::NotAVerification(body.audit_seq)),
            None => return Err(ApiError::UnknownAuditSeq(body.audit_seq)),
        }
        let mut event = AuditEvent::new(RecordKind::Feedback);
        event.operator = Some(body.operator_id);
        event.details = json!({ "audit_seq": body.audit_seq, "confirmed": body.confirmed.unwrap_or(false), "correct_ndc": body.correct_ndc });
        // Telemetry counts the feedback from this record (the window worker reads the log).
        audit.append(event).map(|a| a.seq).map_err(|e| {
            tracing::error!(error = %e, "feedback not recorded");
            ApiError::AuditUnavailable
        })
    })
    .await
    .map_err(|_| ApiError::Internal)??;
    Ok(Json(json!({ "audit_seq": seq })).into_response())
}

async fn status(State(state): State<Arc<AppState>>) -> Result<Response, ApiError> {
    let classifier = state.scanner.classifier();
    let manifest = &classifier.bundle().manifest;
    let engines = classifier.engines();
    let (next_seq, head) = state.scanner.audit().head();
    let camera = state.camera.as_ref().map(|c| {
        let camera = c.lock().unwrap_or_else(|p| p.into_inner());
        json!({ "source": camera.describe(), "health": camera.health().map(|h| h.to_string()) })
    });
    Ok(Json(json!({
        "device_id": state.device_id,
        "version": crate::daemon_version(),
        "model": { "name": manifest.name, "version": manifest.version.to_string(), "purpose": manifest.purpose },
        "engine": { "active": engines.active(), "choice": engines.choice(), "gpu_degraded": engines.gpu_degraded(), "fallbacks": engines.fallbacks() },
        "camera": camera,
        "audit": {
            "next_seq": next_seq,
            "head": head.iter().map(|b| format!("{b:02x}")).collect::<String>(),
            "store": state.scanner.audit().health(),
        },
        "telemetry": telemetry_status(&state),
        "uptime_s": state.started.elapsed().as_secs(),
    }))
    .into_response())
}

fn telemetry_status(state: &AppState) -> serde_json::Value {
    let Some(telemetry) = &state.telemetry else { return json!({ "enabled": false }) };
    let (depth, bytes, oldest, acked) = telemetry.outbox.depth();
    let losses = telemetry.outbox.losses();
    json!({
        "enabled": true,
        "link": match (&telemetry.link, telemetry.link_state.get()) {
            (None, _) => "not configured",
            (Some(_), crate::link::LinkState::Up) => "up",
            (Some(_), crate::link::LinkState::Down) => "down",
        },
        "outbox": {
            "depth": depth, "bytes": bytes, "acked_seq": acked,
            "oldest_unacked_s": oldest.map_or(0, |t| now_ms().saturating_sub(t) / 1000),
            "merged_windows": losses.merged_windows, "dropped_windows": losses.dropped_windows,
            "dropped_events": losses.dropped_events,
        },
        "dropped_observations": telemetry.collector.dropped(),
    })
}

/// 200 only while scans can be answered: not shutting down, and the audit
/// store's last write was durable. A load balancer or watchdog reads it.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    let store = state.scanner.audit().health();
    let status = if state.shutting_down.load(Ordering::Acquire) {
        "shutting_down"
    } else if store != StoreHealth::Ok {
        "audit_failed"
    } else {
        "ok"
    };
    let code = if status == "ok" { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(json!({ "status": status, "audit": store }))).into_response()
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let m = &state.metrics;
    let engines = state.scanner.classifier().engines();
    for kind in ["cpu", "gpu"] {
        m.engine.get_or_create(&EngineLabels { engine: kind.into() }).set(i64::from(engines.active().as_str() == kind));
    }
    m.fallbacks.set(engines.fallbacks() as i64);
    m.audit_chain_length.set(state.scanner.audit().head().0 as i64);
    m.audit_store_up.set(i64::from(state.scanner.audit().health() == StoreHealth::Ok));
    m.scans_in_flight.set((state.limits.max_concurrent_scans - state.scans.available_permits()) as i64);
    if let Some(telemetry) = &state.telemetry {
        let (depth, _, oldest, _) = telemetry.outbox.depth();
        m.outbox_messages.set(depth as i64);
        m.outbox_oldest_unacked.set(oldest.map_or(0, |t| now_ms().saturating_sub(t) / 1000) as i64);
    }
    // A scan holding the camera knows better; otherwise ask a live camera now.
    if let Some(health) = state.camera.as_ref().and_then(|c| c.try_lock().ok()).and_then(|c| c.health()) {
        m.camera_up.set(i64::from(health.is_up()));
    }
    let mut text = String::new();
    if prometheus_client::encoding::text::encode(&mut text, &m.registry).is_err() {
        return ApiError::Internal.into_response();
    }
    ([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
        .into_response()
}
