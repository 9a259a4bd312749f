//! The HTTP API under `/api/v1`, the dashboard at `/` and `/metrics`.
//!
//! Every API route but the OpenAPI document needs `Authorization: Bearer
//! TOKEN` ([`crate::tokens`]); a missing, unknown or revoked token is 401,
//! a role too low for the route is 403, and a token reads only within its
//! scope (out of scope looks like absent: 404). Errors are JSON,
//! `{"error": {"code", "message"}}`, with the stable codes of [`Code`].
//! Lists are paged (`limit` ≤ 500, an opaque `cursor`) and time ranges are
//! at most [`MAX_RANGE_MS`], so a 10,000-device fleet answers fast. The
//! OpenAPI document is generated from the handlers (utoipa) and served at
//! `/api/v1/openapi.json`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{FromRequestParts, MatchedPath, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{IntoParams, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::broker::BrokerStats;
use crate::config::FleetConfig;
use crate::db::{Db, DbError};
use crate::devices::{
    AttentionCounts, Device, DeviceCounts, DeviceQuery, DeviceSort, RegistryError, Scope, VersionCount,
};
use crate::ingest::IngestStats;
use crate::metrics::LatencyHistograms;
use crate::now_ms;
use crate::rollup::{Aggregate, Counts, HOUR_MS};
use crate::serve::ServeError;
use crate::tokens::{Caller, Role, TokenInfo};

/// The longest time range a telemetry query may cover (92 days).
pub const MAX_RANGE_MS: i64 = 92 * 24 * HOUR_MS;

/// The default time range: the last 24 hours.
pub const DEFAULT_RANGE_MS: i64 = 24 * HOUR_MS;

/// The most rows one page holds.
pub const MAX_PAGE: i64 = 500;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub(crate) config: Arc<FleetConfig>,
    pub(crate) db: Db,
    pub(crate) ingest: Arc<IngestStats>,
    pub(crate) broker: Arc<BrokerStats>,
    pub(crate) leader: Arc<AtomicBool>,
    pub(crate) replica: Arc<String>,
    pub(crate) latency: Arc<Mutex<LatencyHistograms>>,
}

impl AppState {
    /// The state of one replica's HTTP server.
    pub fn new(
        config: FleetConfig,
        db: Db,
        ingest: Arc<IngestStats>,
        broker: Arc<BrokerStats>,
        leader: Arc<AtomicBool>,
        replica: String,
    ) -> AppState {
        AppState {
            config: Arc::new(config),
            db,
            ingest,
            broker,
            leader,
            replica: Arc::new(replica),
            latency: Arc::new(Mutex::new(LatencyHistograms::default())),
        }
    }
}

/// Stable error codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Code {
    /// No token, or not a valid one.
    Unauthorized,
    /// The token's role or scope does not allow this.
    Forbidden,
    /// No such thing (or not within the token's scope).
    NotFound,
    /// A parameter or body is wrong.
    BadRequest,
    /// The time range is longer than the API allows.
    RangeTooLong,
    /// It exists already, or its state forbids the change.
    Conflict,
    /// The server failed (the database …); try again.
    Internal,
}

/// The error body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    /// The error.
    pub error: ErrorDetail,
}

/// An error's code and words.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, for programs.
    pub code: Code,
    /// For people.
    pub message: String,
}

/// An API error.
#[derive(Debug)]
pub struct ApiError(StatusCode, Code, String);

impl ApiError {
    fn new(code: Code, message: impl Into<String>) -> ApiError {
        let status = match code {
            Code::Unauthorized => StatusCode::UNAUTHORIZED,
            Code::Forbidden => StatusCode::FORBIDDEN,
            Code::NotFound => StatusCode::NOT_FOUND,
            Code::BadRequest | Code::RangeTooLong => StatusCode::BAD_REQUEST,
            Code::Conflict => StatusCode::CONFLICT,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, code, message.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response =
            (self.0, Json(ErrorBody { error: ErrorDetail { code: self.1, message: self.2 } })).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> ApiError {
        tracing::error!(error = %e, "API request failed");
        ApiError::new(Code::Internal, "the fleet's database failed; try again")
    }
}

impl From<crate::registry::ModelError> for ApiError {
    fn from(e: crate::registry::ModelError) -> ApiError {
        use crate::registry::ModelError;
        match e {
            ModelError::NotFound(_) => ApiError::new(Code::NotFound, e.to_string()),
            ModelError::Bundle { .. } | ModelError::Scan { .. } => ApiError::new(Code::BadRequest, e.to_string()),
            ModelError::Conflict(_) => ApiError::new(Code::Conflict, e.to_string()),
            ModelError::Io { .. } => {
                tracing::error!(error = %e, "the registry's files");
                ApiError::new(Code::Internal, e.to_string())
            }
            ModelError::Db(e) => e.into(),
        }
    }
}

impl From<crate::releases::ReleaseError> for ApiError {
    fn from(e: crate::releases::ReleaseError) -> ApiError {
        use crate::releases::ReleaseError;
        match e {
            ReleaseError::NotFound(_) => ApiError::new(Code::NotFound, e.to_string()),
            ReleaseError::NotARelease { .. } => ApiError::new(Code::BadRequest, e.to_string()),
            ReleaseError::Refused(_) => ApiError::new(Code::Conflict, e.to_string()),
            ReleaseError::Io { .. } => {
                tracing::error!(error = %e, "the release files");
                ApiError::new(Code::Internal, e.to_string())
            }
            ReleaseError::Db(e) => e.into(),
        }
    }
}

impl From<crate::rollout::store::RolloutError> for ApiError {
    fn from(e: crate::rollout::store::RolloutError) -> ApiError {
        use crate::rollout::store::RolloutError;
        match e {
            RolloutError::Invalid(m) => ApiError::new(Code::BadRequest, m),
            RolloutError::NotFound(_) => ApiError::new(Code::NotFound, e.to_string()),
            RolloutError::Conflict(m) => ApiError::new(Code::Conflict, m),
            RolloutError::Db(e) => e.into(),
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> ApiError {
        match e {
            RegistryError::Invalid(m) => ApiError::new(Code::BadRequest, m),
            RegistryError::NotFound(_) => ApiError::new(Code::NotFound, e.to_string()),
            RegistryError::Exists(_) | RegistryError::Retired(_) => ApiError::new(Code::Conflict, e.to_string()),
            RegistryError::Ca(m) => {
                tracing::error!(error = %m, "the fleet's CA failed");
                ApiError::new(Code::Internal, format!("the fleet's CA: {m}"))
            }
            RegistryError::Db(e) => e.into(),
        }
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Query parameters; a malformed one is a JSON `bad_request`, not axum's text.
pub struct ApiQuery<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<ApiQuery<T>, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(ApiQuery(value)),
            Err(e) => Err(ApiError::new(Code::BadRequest, e.body_text())),
        }
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Caller, ApiError> {
        let header = parts.headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or_default();
        let Some(token) = header.strip_prefix("Bearer ").map(str::trim).filter(|t| !t.is_empty()) else {
            return Err(ApiError::new(Code::Unauthorized, "send Authorization: Bearer TOKEN (rxfleet tokens create)"));
        };
        state
            .db
            .authenticate(token)
            .await?
            .ok_or_else(|| ApiError::new(Code::Unauthorized, "the token is not valid (unknown or revoked)"))
    }
}

fn require(caller: &Caller, role: Role) -> Result<(), ApiError> {
    if caller.role >= role {
        Ok(())
    } else {
        Err(ApiError::new(
            Code::Forbidden,
            format!("this needs the {} role; token {:?} is {}", role.as_str(), caller.name, caller.role.as_str()),
        ))
    }
}

fn require_fleet(caller: &Caller) -> Result<(), ApiError> {
    if caller.scope == Scope::Fleet {
        Ok(())
    } else {
        Err(ApiError::new(Code::Forbidden, format!("token {:?} reads only {}", caller.name, caller.scope)))
    }
}

/// A time range (Unix ms); default: the last 24 hours.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RangeParams {
    /// Start (inclusive), Unix ms. Default: 24 hours before `to_ms`.
    pub from_ms: Option<i64>,
    /// End (exclusive), Unix ms. Default: now.
    pub to_ms: Option<i64>,
}

impl RangeParams {
    fn resolve(&self) -> Result<(i64, i64), ApiError> {
        let to = self.to_ms.unwrap_or_else(now_ms);
        let from = self.from_ms.unwrap_or(to - DEFAULT_RANGE_MS);
        if from >= to {
            return Err(ApiError::new(Code::BadRequest, "from_ms must be before to_ms"));
        }
        if to - from > MAX_RANGE_MS {
            return Err(ApiError::new(
                Code::RangeTooLong,
                format!("a range is at most {} days", MAX_RANGE_MS / 86_400_000),
            ));
        }
        Ok((from, to))
    }
}

/// Who the token is.
#[derive(Debug, Serialize, ToSchema)]
pub struct WhoAmI {
    /// The token's name.
    pub name: String,
    /// Its role.
    pub role: Role,
    /// What it may read.
    pub scope: String,
}

#[utoipa::path(get, path = "/whoami", tag = "fleet", responses(
    (status = 200, body = WhoAmI), (status = 401, body = ErrorBody)), security(("bearer" = [])))]
async fn whoami(caller: Caller) -> ApiResult<WhoAmI> {
    Ok(Json(WhoAmI { name: caller.name, role: caller.role, scope: caller.scope.to_string() }))
}

/// The fleet at a glance.
#[derive(Debug, Serialize, ToSchema)]
pub struct FleetSummary {
    /// Start of the range, Unix ms.
    pub from_ms: i64,
    /// End of the range, Unix ms.
    pub to_ms: i64,
    /// Devices by state.
    pub devices: DeviceCounts,
    /// Live devices by versions and engine.
    pub versions: Vec<VersionCount>,
    /// Devices needing attention, by reason.
    pub attention: AttentionCounts,
    /// Telemetry over the range.
    pub telemetry: Aggregate,
    /// The replica that answered, and whether it leads the background work.
    pub replica: ReplicaInfo,
}

/// A replica.
#[derive(Debug, Serialize, ToSchema)]
pub struct ReplicaInfo {
    /// Its id.
    pub id: String,
    /// It holds the leader lease (runs the ingest).
    pub leader: bool,
}

#[utoipa::path(get, path = "/fleet", tag = "fleet", params(RangeParams), responses(
    (status = 200, body = FleetSummary), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)),
    security(("bearer" = [])))]
async fn fleet(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(range): ApiQuery<RangeParams>,
) -> ApiResult<FleetSummary> {
    require_fleet(&caller)?;
    let (from, to) = range.resolve()?;
    let (devices, attention, versions) =
        state.db.device_counts(&Scope::Fleet, now_ms(), state.config.attention).await?;
    let mut total = Counts::default();
    for hour in state.db.hourly("fleet", from, to).await? {
        total.add(&hour.counts);
    }
    Ok(Json(FleetSummary {
        from_ms: from,
        to_ms: to,
        devices,
        versions,
        attention,
        telemetry: total.summary(),
        replica: ReplicaInfo {
            id: state.replica.to_string(),
            leader: state.leader.load(std::sync::atomic::Ordering::Relaxed),
        },
    }))
}

/// One hour of telemetry.
#[derive(Debug, Serialize, ToSchema)]
pub struct Bucket {
    /// The hour's start, Unix ms.
    pub start_ms: i64,
    /// Its end, Unix ms.
    pub end_ms: i64,
    /// Its figures.
    #[serde(flatten)]
    pub aggregate: Aggregate,
}

/// Telemetry of a scope over a range: the total and hourly buckets (hours with data only).
#[derive(Debug, Serialize, ToSchema)]
pub struct TelemetryReport {
    /// `fleet`, `site:S` or `device:D`.
    pub scope: String,
    /// Start, Unix ms.
    pub from_ms: i64,
    /// End, Unix ms.
    pub to_ms: i64,
    /// Over the whole range (hours overlapping it).
    pub total: Aggregate,
    /// Per hour.
    pub series: Vec<Bucket>,
}

async fn telemetry(state: &AppState, scope: String, range: &RangeParams) -> ApiResult<TelemetryReport> {
    let (from, to) = range.resolve()?;
    // Hours overlapping the range.
    let first_hour = from - from.rem_euclid(HOUR_MS);
    let hours = state.db.hourly(&scope, first_hour, to).await?;
    let mut total = Counts::default();
    let series = hours
        .iter()
        .map(|h| {
            total.add(&h.counts);
            Bucket { start_ms: h.hour_ms, end_ms: h.hour_ms + HOUR_MS, aggregate: h.counts.summary() }
        })
        .collect();
    Ok(Json(TelemetryReport { scope, from_ms: from, to_ms: to, total: total.summary(), series }))
}

#[utoipa::path(get, path = "/fleet/telemetry", tag = "telemetry", params(RangeParams), responses(
    (status = 200, body = TelemetryReport), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
    (status = 403, body = ErrorBody)), security(("bearer" = [])))]
async fn fleet_telemetry(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(range): ApiQuery<RangeParams>,
) -> ApiResult<TelemetryReport> {
    require_fleet(&caller)?;
    telemetry(&state, "fleet".into(), &range).await
}

#[utoipa::path(get, path = "/sites/{site}/telemetry", tag = "telemetry", params(("site" = String, Path), RangeParams),
    responses((status = 200, body = TelemetryReport), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
    (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn site_telemetry(
    State(state): State<AppState>,
    caller: Caller,
    Path(site): Path<String>,
    ApiQuery(range): ApiQuery<RangeParams>,
) -> ApiResult<TelemetryReport> {
    match &caller.scope {
        Scope::Fleet => {}
        Scope::Site(s) if *s == site => {}
        _ => return Err(ApiError::new(Code::NotFound, format!("no site {site:?}"))),
    }
    telemetry(&state, format!("site:{site}"), &range).await
}

/// Finds a device within the caller's scope.
async fn scoped_device(state: &AppState, caller: &Caller, device_id: &str) -> Result<Device, ApiError> {
    let device = state.db.device(device_id, now_ms(), state.config.attention).await?;
    match device {
        Some(d) if caller.scope.covers(&d.device_id, d.site.as_deref()) => Ok(d),
        _ => Err(ApiError::new(Code::NotFound, format!("no device {device_id:?}"))),
    }
}

#[utoipa::path(get, path = "/devices/{device_id}/telemetry", tag = "telemetry",
    params(("device_id" = String, Path), RangeParams), responses((status = 200, body = TelemetryReport),
    (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn device_telemetry(
    State(state): State<AppState>,
    caller: Caller,
    Path(device_id): Path<String>,
    ApiQuery(range): ApiQuery<RangeParams>,
) -> ApiResult<TelemetryReport> {
    let device = scoped_device(&state, &caller, &device_id).await?;
    telemetry(&state, format!("device:{}", device.device_id), &range).await
}

/// A site with its devices and telemetry over the range.
#[derive(Debug, Serialize, ToSchema)]
pub struct SiteRow {
    /// The site.
    pub site: String,
    /// Its devices.
    pub devices: i64,
    /// Online.
    pub online: i64,
    /// Offline.
    pub offline: i64,
    /// Retired.
    pub retired: i64,
    /// Registered, never heard from.
    pub never_seen: i64,
    /// Needing attention.
    pub attention: i64,
    /// Scans over the range.
    pub scans: i64,
    /// MATCH share.
    pub match_rate: Option<f64>,
    /// UNCERTAIN share.
    pub uncertain_rate: Option<f64>,
    /// Feedback accuracy.
    pub accuracy: Option<f64>,
    /// Feedback samples behind it.
    pub feedback_samples: i64,
    /// Latency p95, ms.
    pub latency_p95_ms: Option<f64>,
}

/// Every site (within the token's scope).
#[derive(Debug, Serialize, ToSchema)]
pub struct SiteList {
    /// Start, Unix ms.
    pub from_ms: i64,
    /// End, Unix ms.
    pub to_ms: i64,
    /// The sites, by name.
    pub items: Vec<SiteRow>,
}

#[utoipa::path(get, path = "/sites", tag = "fleet", params(RangeParams), responses(
    (status = 200, body = SiteList), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn sites(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(range): ApiQuery<RangeParams>,
) -> ApiResult<SiteList> {
    let (from, to) = range.resolve()?;
    if let Scope::Device(_) = caller.scope {
        return Err(ApiError::new(Code::Forbidden, format!("token {:?} reads only {}", caller.name, caller.scope)));
    }
    let first_hour = from - from.rem_euclid(HOUR_MS);
    let mut telemetry = state.db.scopes_summed("site:", first_hour, to).await?;
    let counts = state.db.site_device_counts(&caller.scope, now_ms(), state.config.attention).await?;
    let items = counts
        .into_iter()
        .map(|(site, c)| {
            let t = telemetry.remove(&site).unwrap_or_default();
            let a = t.summary();
            SiteRow {
                site,
                devices: c.total,
                online: c.online,
                offline: c.offline,
                retired: c.retired,
                never_seen: c.never_seen,
                attention: c.attention,
                scans: a.scans,
                match_rate: a.match_rate,
                uncertain_rate: a.uncertain_rate,
                accuracy: a.accuracy,
                feedback_samples: a.feedback_confirmed + a.feedback_corrected,
                latency_p95_ms: a.latency_p95_ms,
            }
        })
        .collect();
    Ok(Json(SiteList { from_ms: from, to_ms: to, items }))
}

/// Filters, order and page of a device list.
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct DeviceListParams {
    /// Only this site.
    pub site: Option<String>,
    /// Only this state (`online`, `offline`, `retired`, `never_seen`) or `attention`.
    pub state: Option<String>,
    /// Only ids containing this.
    pub q: Option<String>,
    /// `device_id` (default), `site`, `last_seen` or `backlog`.
    pub sort: Option<DeviceSort>,
    /// `asc` (default) or `desc`.
    pub order: Option<String>,
    /// Rows per page, 1-500 (default 100).
    pub limit: Option<i64>,
    /// From the previous page's `next_cursor`.
    pub cursor: Option<String>,
}

/// A page of devices.
#[derive(Debug, Serialize, ToSchema)]
pub struct DevicePage {
    /// The devices.
    pub items: Vec<Device>,
    /// Pass as `cursor` for the next page; `null` on the last.
    pub next_cursor: Option<String>,
    /// Devices matching in all.
    pub total: i64,
}

#[utoipa::path(get, path = "/devices", tag = "devices", params(DeviceListParams), responses(
    (status = 200, body = DevicePage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn list_devices(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(p): ApiQuery<DeviceListParams>,
) -> ApiResult<DevicePage> {
    let limit = p.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::new(Code::BadRequest, format!("limit must be 1-{MAX_PAGE}")));
    }
    if let Some(s) = &p.state {
        if !["online", "offline", "retired", "never_seen", "attention"].contains(&s.as_str()) {
            return Err(ApiError::new(
                Code::BadRequest,
                format!("state {s:?}: online, offline, retired, never_seen or attention"),
            ));
        }
    }
    let descending = match p.order.as_deref() {
        None | Some("asc") => false,
        Some("desc") => true,
        Some(o) => return Err(ApiError::new(Code::BadRequest, format!("order {o:?}: asc or desc"))),
    };
    let offset = match &p.cursor {
        None => 0,
        Some(c) => c
            .strip_prefix("o")
            .and_then(|n| n.parse::<i64>().ok())
            .filter(|n| *n >= 0)
            .ok_or_else(|| ApiError::new(Code::BadRequest, "cursor: not one this API gave"))?,
    };
    let query = DeviceQuery {
        site: p.site,
        state: p.state,
        id_contains: p.q,
        sort: p.sort.unwrap_or_default(),
        descending,
        offset,
        limit,
    };
    let (items, total) = state.db.device_page(&caller.scope, &query, now_ms(), state.config.attention).await?;
    let next_cursor = (offset + limit < total).then(|| format!("o{}", offset + limit));
    Ok(Json(DevicePage { items, next_cursor, total }))
}

#[utoipa::path(get, path = "/devices/{device_id}", tag = "devices", params(("device_id" = String, Path)), responses(
    (status = 200, body = Device), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody)),
    security(("bearer" = [])))]
async fn get_device(State(state): State<AppState>, caller: Caller, Path(device_id): Path<String>) -> ApiResult<Device> {
    Ok(Json(scoped_device(&state, &caller, &device_id).await?))
}

/// A device to register.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDevice {
    /// Its site.
    pub site: String,
    /// Its id (default: the site and 8 random hex digits).
    pub device_id: Option<String>,
}

/// A registered device's credentials (the password is shown only here).
#[derive(Debug, Serialize, ToSchema)]
pub struct Provisioned {
    /// Its id.
    pub device_id: String,
    /// Its site.
    pub site: String,
    /// Its broker password: write it to the appliance's password file (mode 0600).
    pub password: String,
    /// The `[device]` and `[telemetry]` sections of its `rxvisiond.toml`.
    pub config: String,
    /// Its client certificate (PEM), when the fleet has a CA.
    pub client_certificate: Option<String>,
    /// The certificate's private key (PEM; mode 0600 on the appliance).
    pub client_key: Option<String>,
}

#[utoipa::path(post, path = "/devices", tag = "devices", request_body = NewDevice, responses(
    (status = 201, body = Provisioned), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
    (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn add_device(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<NewDevice>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<Provisioned>), ApiError> {
    require(&caller, Role::Admin)?;
    let Json(body) = body.map_err(|e| ApiError::new(Code::BadRequest, e.body_text()))?;
    let registered = crate::provision::register(
        &state.config,
        &state.db,
        body.device_id.as_deref(),
        &body.site,
        &caller.actor(),
        now_ms(),
    )
    .await?;
    let (cert, key) = crate::provision::DEFAULT_CLIENT_FILES;
    let client = registered.certificate.as_ref().map(|_| (std::path::Path::new(cert), std::path::Path::new(key)));
    let config = crate::provision::appliance_config(
        &state.config,
        &registered.device_id,
        &body.site,
        std::path::Path::new(crate::provision::DEFAULT_PASSWORD_FILE),
        client,
    );
    Ok((
        StatusCode::CREATED,
        Json(Provisioned {
            device_id: registered.device_id,
            site: body.site,
            password: registered.password,
            config,
            client_certificate: registered.certificate.as_ref().map(|c| c.cert_pem.clone()),
            client_key: registered.certificate.map(|c| c.key_pem),
        }),
    ))
}

/// The outcome of a change.
#[derive(Debug, Serialize, ToSchema)]
pub struct Done {
    /// Always true.
    pub ok: bool,
}

#[utoipa::path(post, path = "/devices/{device_id}/retire", tag = "devices", params(("device_id" = String, Path)),
    responses((status = 200, body = Done), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn retire_device(
    State(state): State<AppState>,
    caller: Caller,
    Path(device_id): Path<String>,
) -> ApiResult<Done> {
    require(&caller, Role::Admin)?;
    state.db.retire_device(&device_id, &caller.actor(), now_ms()).await?;
    Ok(Json(Done { ok: true }))
}

#[utoipa::path(post, path = "/devices/{device_id}/chain-review", tag = "devices", params(("device_id" = String, Path)),
    responses((status = 200, body = Done), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
    (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn review_chain(State(state): State<AppState>, caller: Caller, Path(device_id): Path<String>) -> ApiResult<Done> {
    require(&caller, Role::Operator)?;
    let device = scoped_device(&state, &caller, &device_id).await?;
    state.db.review_chain(&device.device_id, &caller.actor(), now_ms()).await?;
    Ok(Json(Done { ok: true }))
}

/// Filters and page of the event list (newest first).
#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct EventParams {
    /// Only this device's.
    pub device_id: Option<String>,
    /// Only this kind (`audit_chain_rewritten`, `device_added`, `token_created` …).
    pub kind: Option<String>,
    /// Rows per page, 1-500 (default 100).
    pub limit: Option<i64>,
    /// From the previous page's `next_cursor`.
    pub cursor: Option<String>,
}

/// An event: something the fleet raised, or a change and who made it.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventRow {
    /// Its id (ascending in time).
    pub id: i64,
    /// When, Unix ms (the fleet's clock).
    pub time_ms: i64,
    /// The device, if about one.
    pub device_id: Option<String>,
    /// What.
    pub kind: String,
    /// Who made the change (`token:NAME`, `cli:USER`); null for what the fleet raised.
    pub actor: Option<String>,
    /// Details.
    #[schema(value_type = Object)]
    pub details: serde_json::Value,
}

/// A page of events.
#[derive(Debug, Serialize, ToSchema)]
pub struct EventPage {
    /// The events, newest first.
    pub items: Vec<EventRow>,
    /// Pass as `cursor` for older ones; `null` at the oldest.
    pub next_cursor: Option<String>,
}

#[utoipa::path(get, path = "/events", tag = "fleet", params(EventParams), responses(
    (status = 200, body = EventPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody)),
    security(("bearer" = [])))]
async fn events(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(p): ApiQuery<EventParams>,
) -> ApiResult<EventPage> {
    let limit = p.limit.unwrap_or(100);
    if !(1..=MAX_PAGE).contains(&limit) {
        return Err(ApiError::new(Code::BadRequest, format!("limit must be 1-{MAX_PAGE}")));
    }
    let before = match &p.cursor {
        None => i64::MAX,
        Some(c) => c
            .strip_prefix("e")
            .and_then(|n| n.parse::<i64>().ok())
            .ok_or_else(|| ApiError::new(Code::BadRequest, "cursor: not one this API gave"))?,
    };
    let (device, site) = match &caller.scope {
        Scope::Fleet => (p.device_id.clone(), None),
        Scope::Site(s) => (p.device_id.clone(), Some(s.clone())),
        Scope::Device(d) => {
            if p.device_id.as_ref().is_some_and(|asked| asked != d) {
                return Ok(Json(EventPage { items: Vec::new(), next_cursor: None }));
            }
            (Some(d.clone()), None)
        }
    };
    let rows = state.db.event_page(device.as_deref(), site.as_deref(), p.kind.as_deref(), before, limit).await?;
    let next_cursor = (rows.len() as i64 == limit).then(|| format!("e{}", rows.last().map_or(0, |r| r.0)));
    let items = rows
        .into_iter()
        .map(|(id, time_ms, device_id, kind, actor, details)| EventRow {
            id,
            time_ms,
            device_id,
            kind,
            actor,
            details: serde_json::from_str(&details).unwrap_or(serde_json::Value::Null),
        })
        .collect();
    Ok(Json(EventPage { items, next_cursor }))
}

/// A token to create.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    /// Its name (unique).
    pub name: String,
    /// Its role.
    pub role: Role,
    /// `fleet` (default), `site:S` or `device:D`.
    pub scope: Option<String>,
}

/// A created token: the only time it is shown.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedToken {
    /// The token: send it as `Authorization: Bearer TOKEN`.
    pub token: String,
    /// What it is.
    pub info: TokenInfo,
}

#[utoipa::path(get, path = "/tokens", tag = "tokens", responses((status = 200, body = Vec<TokenInfo>),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody)), security(("bearer" = [])))]
async fn list_tokens(State(state): State<AppState>, caller: Caller) -> ApiResult<Vec<TokenInfo>> {
    require(&caller, Role::Admin)?;
    Ok(Json(state.db.tokens().await?))
}

#[utoipa::path(post, path = "/tokens", tag = "tokens", request_body = NewToken, responses(
    (status = 201, body = CreatedToken), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
    (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn create_token(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<NewToken>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<CreatedToken>), ApiError> {
    require(&caller, Role::Admin)?;
    let Json(body) = body.map_err(|e| ApiError::new(Code::BadRequest, e.body_text()))?;
    let scope =
        Scope::parse(body.scope.as_deref().unwrap_or("fleet")).map_err(|e| ApiError::new(Code::BadRequest, e))?;
    let (info, token) = state.db.create_token(&body.name, body.role, &scope, &caller.actor(), now_ms()).await?;
    Ok((StatusCode::CREATED, Json(CreatedToken { token, info })))
}

#[utoipa::path(delete, path = "/tokens/{name}", tag = "tokens", params(("name" = String, Path)), responses(
    (status = 200, body = Done), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
    (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn revoke_token(State(state): State<AppState>, caller: Caller, Path(name): Path<String>) -> ApiResult<Done> {
    require(&caller, Role::Admin)?;
    state.db.revoke_token(&name, &caller.actor(), now_ms()).await?;
    Ok(Json(Done { ok: true }))
}

#[utoipa::path(get, path = "/models", tag = "updates", responses(
    (status = 200, body = Vec<crate::registry::ModelVersion>), (status = 401, body = ErrorBody),
    (status = 403, body = ErrorBody)), security(("bearer" = [])))]
async fn list_models(State(state): State<AppState>, caller: Caller) -> ApiResult<Vec<crate::registry::ModelVersion>> {
    require_fleet(&caller)?;
    Ok(Json(state.db.models().await?))
}

#[utoipa::path(get, path = "/models/{version}", tag = "updates", params(("version" = String, Path, description = "a version, or the alias production or previous")),
    responses((status = 200, body = crate::registry::ModelVersion), (status = 401, body = ErrorBody),
    (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn get_model(
    State(state): State<AppState>,
    caller: Caller,
    Path(version): Path<String>,
) -> ApiResult<crate::registry::ModelVersion> {
    require_fleet(&caller)?;
    let model = state.db.model(&version).await?;
    Ok(Json(model.ok_or_else(|| ApiError::new(Code::NotFound, format!("no model version {version}")))?))
}

/// A rollout with its latest decisions.
#[derive(Debug, Serialize, ToSchema)]
pub struct RolloutView {
    /// The rollout.
    pub rollout: crate::rollout::store::Rollout,
    /// Its judgements, newest first (at most 50), each with every metric's
    /// counts, ratio, interval and evidence (`rollout::stage::Decision`).
    #[schema(value_type = Vec<Object>)]
    pub decisions: Vec<crate::rollout::stage::Decision>,
}

#[utoipa::path(get, path = "/rollouts", tag = "updates", responses(
    (status = 200, body = Vec<crate::rollout::store::Rollout>), (status = 401, body = ErrorBody),
    (status = 403, body = ErrorBody)), security(("bearer" = [])))]
async fn list_rollouts(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Vec<crate::rollout::store::Rollout>> {
    require_fleet(&caller)?;
    Ok(Json(state.db.rollouts(100).await?))
}

async fn rollout_view(state: &AppState, id: i64) -> ApiResult<RolloutView> {
    let rollout =
        state.db.rollout(id).await?.ok_or_else(|| ApiError::new(Code::NotFound, format!("no rollout {id}")))?;
    let decisions = state.db.rollout_decisions(id, 50).await?;
    Ok(Json(RolloutView { rollout, decisions }))
}

#[utoipa::path(get, path = "/rollouts/{id}", tag = "updates", params(("id" = i64, Path)), responses(
    (status = 200, body = RolloutView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
    (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)), security(("bearer" = [])))]
async fn get_rollout(State(state): State<AppState>, caller: Caller, Path(id): Path<String>) -> ApiResult<RolloutView> {
    require_fleet(&caller)?;
    let id =
        id.parse::<i64>().map_err(|_| ApiError::new(Code::BadRequest, format!("{id:?} is not a rollout number")))?;
    rollout_view(&state, id).await
}

/// Starts a rollout.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewRollout {
    /// A validated model version above production.
    pub version: String,
    /// The plan (the keys of a plan file; default: the defaults).
    #[schema(value_type = Option<Object>)]
    pub plan: Option<crate::rollout::stage::Plan>,
}

#[utoipa::path(post, path = "/rollouts", tag = "updates", request_body = NewRollout, responses(
    (status = 201, body = crate::rollout::store::Rollout), (status = 400, body = ErrorBody),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
async fn start_rollout(
    State(state): State<AppState>,
    caller: Caller,
    body: Result<Json<NewRollout>, axum::extract::rejection::JsonRejection>,
) -> Result<(StatusCode, Json<crate::rollout::store::Rollout>), ApiError> {
    require(&caller, Role::Admin)?;
    let Json(body) = body.map_err(|e| ApiError::new(Code::BadRequest, e.body_text()))?;
    let plan = body.plan.unwrap_or_default();
    let started = state.db.start_model_rollout(&body.version, &plan, &caller.actor(), now_ms()).await?;
    Ok((StatusCode::CREATED, Json(started)))
}

#[utoipa::path(post, path = "/rollouts/{id}/{action}", tag = "updates",
    params(("id" = i64, Path), ("action" = String, Path, description = "pause (operator), resume, approve or abort (admin)")),
    responses((status = 200, body = RolloutView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
    (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
async fn command_rollout(
    State(state): State<AppState>,
    caller: Caller,
    Path((id, action)): Path<(String, String)>,
) -> ApiResult<RolloutView> {
    use crate::rollout::store::AdminCommand;
    let id =
        id.parse::<i64>().map_err(|_| ApiError::new(Code::BadRequest, format!("{id:?} is not a rollout number")))?;
    let (command, role) = match action.as_str() {
        "pause" => (AdminCommand::Pause, Role::Operator),
        "resume" => (AdminCommand::Resume, Role::Admin),
        "approve" => (AdminCommand::Approve, Role::Admin),
        "abort" => (AdminCommand::Abort, Role::Admin),
        other => return Err(ApiError::new(Code::BadRequest, format!("{other:?}: pause, resume, approve or abort"))),
    };
    require(&caller, role)?;
    require_fleet(&caller)?;
    state.db.command_rollout(id, command, &caller.actor(), now_ms()).await?;
    rollout_view(&state, id).await
}

#[utoipa::path(get, path = "/releases", tag = "updates", responses(
    (status = 200, body = Vec<crate::releases::DaemonRelease>), (status = 401, body = ErrorBody),
    (status = 403, body = ErrorBody)), security(("bearer" = [])))]
async fn list_releases(
    State(state): State<AppState>,
    caller: Caller,
) -> ApiResult<Vec<crate::releases::DaemonRelease>> {
    require_fleet(&caller)?;
    Ok(Json(state.db.releases().await?))
}

/// `POST /releases/{version}/deploy`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DeployRelease {
    /// The share of devices (1..=100; a stage only grows; 100 makes it production).
    pub percent: u32,
}

#[utoipa::path(post, path = "/releases/{version}/deploy", tag = "updates", params(("version" = String, Path)),
    request_body = DeployRelease,
    responses((status = 200, body = Vec<crate::releases::DaemonRelease>), (status = 400, body = ErrorBody),
    (status = 401, body = ErrorBody), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
    (status = 409, body = ErrorBody)), security(("bearer" = [])))]
async fn deploy_release(
    State(state): State<AppState>,
    caller: Caller,
    Path(version): Path<String>,
    body: Result<Json<DeployRelease>, axum::extract::rejection::JsonRejection>,
) -> ApiResult<Vec<crate::releases::DaemonRelease>> {
    require(&caller, Role::Admin)?;
    require_fleet(&caller)?;
    let Json(body) = body.map_err(|e| ApiError::new(Code::BadRequest, e.body_text()))?;
    Ok(Json(state.db.deploy_release(&version, body.percent, &caller.actor(), now_ms()).await?))
}

#[utoipa::path(post, path = "/releases/{version}/halt", tag = "updates", params(("version" = String, Path)),
    responses((status = 200, body = Vec<crate::releases::DaemonRelease>), (status = 401, body = ErrorBody),
    (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("bearer" = [])))]
async fn halt_release(
    State(state): State<AppState>,
    caller: Caller,
    Path(version): Path<String>,
) -> ApiResult<Vec<crate::releases::DaemonRelease>> {
    require(&caller, Role::Operator)?;
    require_fleet(&caller)?;
    let reason = format!("halted by {}", caller.actor());
    Ok(Json(state.db.halt_release(&version, &reason, now_ms()).await?))
}

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

#[derive(OpenApi)]
#[openapi(
    info(title = "RxVision fleet API", description = "Devices, sites, telemetry, events, tokens, models, rollouts and daemon releases of an RxVision fleet."),
    modifiers(&BearerAuth),
    tags((name = "fleet"), (name = "devices"), (name = "telemetry"), (name = "tokens"), (name = "updates"))
)]
struct ApiDoc;

/// The API's routes and their OpenAPI document (paths relative to `/api/v1`).
pub fn api_router() -> (Router<AppState>, utoipa::openapi::OpenApi) {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(whoami))
        .routes(routes!(fleet))
        .routes(routes!(fleet_telemetry))
        .routes(routes!(sites))
        .routes(routes!(site_telemetry))
        .routes(routes!(list_devices, add_device))
        .routes(routes!(get_device))
        .routes(routes!(device_telemetry))
        .routes(routes!(retire_device))
        .routes(routes!(review_chain))
        .routes(routes!(events))
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(revoke_token))
        .routes(routes!(list_models))
        .routes(routes!(get_model))
        .routes(routes!(list_rollouts, start_rollout))
        .routes(routes!(get_rollout))
        .routes(routes!(command_rollout))
        .routes(routes!(list_releases))
        .routes(routes!(deploy_release))
        .routes(routes!(halt_release))
        .split_for_parts()
}

/// The whole HTTP surface: `/api/v1/…`, `/api/v1/openapi.json`, `/metrics`, the dashboard, `/tuf/…`.
pub fn router(state: AppState) -> Router {
    let (api, mut doc) = api_router();
    doc.servers = Some(vec![utoipa::openapi::Server::new("/api/v1")]);
    let doc = Arc::new(doc);
    let api = api
        .route("/openapi.json", axum::routing::get(move || async move { Json(doc.as_ref().clone()) }))
        .fallback(|| async { ApiError::new(Code::NotFound, "no such API route") });
    Router::new()
        .nest("/api/v1", api)
        .route("/metrics", axum::routing::get(crate::metrics::metrics))
        .merge(crate::dashboard::routes())
        .merge(crate::updates::http::routes())
        .layer(axum::middleware::from_fn_with_state(state.clone(), record_latency))
        .with_state(state)
}

/// Times every request by its route (`rxvision_api_request_duration_seconds`).
async fn record_latency(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let route = request.extensions().get::<MatchedPath>().map(|p| p.as_str().to_string());
    let started = Instant::now();
    let response = next.run(request).await;
    if let Some(route) = route {
        if let Ok(mut histograms) = state.latency.lock() {
            histograms.observe(&route, started.elapsed().as_secs_f64());
        }
    }
    response
}

/// Serves HTTP (or HTTPS with the configured certificate) until `stop` changes.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    tls: Option<(PathBuf, PathBuf)>,
    state: AppState,
    mut stop: watch::Receiver<bool>,
) -> Result<JoinHandle<()>, ServeError> {
    let app = router(state);
    match tls {
        None => Ok(tokio::spawn(async move {
            let shutdown = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
                .with_graceful_shutdown(shutdown)
                .await
            {
                tracing::error!(error = %e, "the HTTP server failed");
            }
        })),
        Some((cert, key)) => {
            let acceptor = crate::tls::acceptor(&cert, &key).map_err(ServeError::Tls)?;
            Ok(tokio::spawn(crate::tls::serve(listener, acceptor, app, stop)))
        }
    }
}
