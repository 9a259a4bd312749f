//! The device registry and what the fleet knows of each device.
//!
//! `rxfleet devices add` registers a device at a site and creates its
//! broker account: a random password, shown once, of which only the
//! Mosquitto password-file hash (PBKDF2-SHA512, the `$7$` format
//! `mosquitto_passwd` writes) is stored. Retiring a device removes its
//! account from the broker's password file (the managed broker reloads it
//! and drops the device's connection). Every change is a fleet event with
//! who made it.
//!
//! A device's view joins the registry with what the ingest learnt from its
//! status and windows: online state, versions, engine, outbox backlog,
//! audit chain, and why it needs attention. Devices the ingest heard from
//! without a registration (an external broker with its own accounts) are
//! listed too, without a site.

use base64::Engine as _;
use ring::rand::SecureRandom;
use serde::Serialize;
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::db::{Db, DbError, Tx};

/// Account names that are never device ids.
pub const RESERVED_PREFIX: &str = "rxfleet-";

/// Why a registry change was refused.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The id or site is not acceptable.
    #[error("{0}")]
    Invalid(String),
    /// A device with this id is registered already.
    #[error("device {0:?} is already registered")]
    Exists(String),
    /// No such device.
    #[error("no device {0:?}")]
    NotFound(String),
    /// It is retired already.
    #[error("device {0:?} is retired")]
    Retired(String),
    /// The fleet's CA could not issue a certificate.
    #[error("the fleet's CA: {0}")]
    Ca(String),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for RegistryError {
    fn from(e: sqlx::Error) -> RegistryError {
        RegistryError::Db(DbError::Sql(e))
    }
}

/// A site name: 1-64 letters, digits, '-', '_' or '.' (it appears in
/// topics of nothing, but in URLs, metrics labels and file names).
pub fn check_site(site: &str) -> Result<(), RegistryError> {
    if rxvision_protocol::topic::valid_device_id(site) {
        Ok(())
    } else {
        Err(RegistryError::Invalid(format!("{site:?} is not a site name (1-64 letters, digits, '-', '_' or '.')")))
    }
}

/// A device to register.
#[derive(Debug, Clone)]
pub struct NewDevice {
    /// Its id.
    pub device_id: String,
    /// Its site.
    pub site: String,
    /// Its broker password (only the hash is stored).
    pub password: String,
    /// The serial of the client certificate issued to it, if any.
    pub cert_serial: Option<String>,
}

/// A device id the registry accepts: the protocol's id rule, and not the fleet's own names.
pub fn check_device_id(id: &str) -> Result<(), RegistryError> {
    if !rxvision_protocol::topic::valid_device_id(id) {
        return Err(RegistryError::Invalid(format!(
            "{id:?} is not a device id (1-64 letters, digits, '-', '_' or '.')"
        )));
    }
    if id.starts_with(RESERVED_PREFIX) {
        return Err(RegistryError::Invalid(format!("{id:?}: ids starting {RESERVED_PREFIX:?} are the fleet's own")));
    }
    Ok(())
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    ring::rand::SystemRandom::new().fill(&mut bytes).expect("the system RNG works");
    bytes
}

/// A fresh device id for `site`: the site and 8 random hex digits.
pub fn new_device_id(site: &str) -> String {
    let suffix: String = random_bytes::<4>().iter().map(|b| format!("{b:02x}")).collect();
    let prefix: String = site.chars().take(55).collect();
    format!("{prefix}-{suffix}")
}

/// A new broker password: 192 random bits, URL-safe base64.
pub fn new_password() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<24>())
}

/// Mosquitto's password-file hash of `password` (`$7$`: PBKDF2-HMAC-SHA512,
/// 101 iterations, a 12-byte salt, as `mosquitto_passwd` writes it).
pub fn mosquitto_hash(password: &str, salt: &[u8]) -> String {
    const ITERATIONS: u32 = 101;
    let mut hash = [0u8; 64];
    ring::pbkdf2::derive(
        ring::pbkdf2::PBKDF2_HMAC_SHA512,
        std::num::NonZeroU32::new(ITERATIONS).expect("non-zero"),
        salt,
        password.as_bytes(),
        &mut hash,
    );
    let b64 = base64::engine::general_purpose::STANDARD;
    format!("$7${ITERATIONS}${}${}", b64.encode(salt), b64.encode(hash))
}

/// A hash of `password` with a fresh salt.
pub fn hash_password(password: &str) -> String {
    mosquitto_hash(password, &random_bytes::<12>())
}

/// A device's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// Its retained status says online.
    Online,
    /// Its last will (or a clean goodbye) said offline.
    Offline,
    /// Retired: its credentials no longer work.
    Retired,
    /// Registered, never heard from.
    NeverSeen,
}

/// Why a device needs attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Attention {
    /// Offline.
    Offline,
    /// Messages wait in its outbox beyond the configured limits.
    Backlog,
    /// Its GPU failed and the CPU answers.
    Fallbacks,
    /// Its audit chain was found rewritten and nobody reviewed it yet.
    ChainRewritten,
}

/// Limits beyond which an outbox backlog needs attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BacklogLimits {
    /// Messages waiting.
    pub messages: i64,
    /// Age of the oldest, seconds.
    pub age_s: i64,
}

/// A device's audit chain as the fleet knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct AuditChain {
    /// The latest reported next sequence number.
    pub next_seq: Option<i64>,
    /// The latest reported head (SHA-256 hex).
    pub head: Option<String>,
    /// When a rewrite was last found (fleet clock, Unix ms).
    pub rewritten_ms: Option<i64>,
    /// An operator reviewed the latest rewrite.
    pub reviewed: bool,
}

/// A device as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct Device {
    /// Its id.
    pub device_id: String,
    /// Its site (none: heard from but not registered).
    pub site: Option<String>,
    /// Its state.
    pub state: DeviceState,
    /// First message, Unix ms.
    pub first_seen_ms: Option<i64>,
    /// Latest message, Unix ms.
    pub last_seen_ms: Option<i64>,
    /// Registered, Unix ms.
    pub registered_ms: Option<i64>,
    /// Retired, Unix ms.
    pub retired_ms: Option<i64>,
    /// `rxvisiond`'s version (latest status).
    pub daemon_version: Option<String>,
    /// The model answering (latest status).
    pub model_version: Option<String>,
    /// `cpu` or `gpu` (latest status).
    pub engine: Option<String>,
    /// Messages waiting in its outbox (latest status).
    pub outbox_depth: Option<i64>,
    /// Age of the oldest of them now, ms (estimated from the latest status).
    pub outbox_oldest_unacked_ms: Option<i64>,
    /// Every message up to this `seq` is committed.
    pub acked_seq: i64,
    /// Its audit chain.
    pub audit_chain: AuditChain,
    /// Why it needs attention (empty: it does not).
    pub attention: Vec<Attention>,
}

/// The columns of [`device_view_sql`], then `state`.
const VIEW_COLUMNS: &str = "device_id, site, registered_ms, retired_ms, first_seen_ms, last_seen_ms, online, \
     daemon_version, model_version, engine, gpu_degraded, engine_fallbacks, outbox_depth, \
     outbox_oldest_unacked_s, status_received_ms, acked_seq, chain_rewritten_ms, chain_reviewed_ms";

/// Every device (registered, or heard from) with its state and attention
/// flags as columns; `$1` is now (Unix ms), `$2` and `$3` the backlog limits.
fn device_view_sql() -> String {
    let joined = "SELECT r.device_id, r.site, r.created_ms AS registered_ms, r.retired_ms, d.first_seen_ms, \
         d.last_seen_ms, d.online, d.daemon_version, d.model_version, d.engine, d.gpu_degraded, d.engine_fallbacks, \
         d.outbox_depth, d.outbox_oldest_unacked_s, d.status_received_ms, d.acked_seq, d.chain_rewritten_ms, \
         d.chain_reviewed_ms \
         FROM device_registry r LEFT JOIN devices d ON d.device_id = r.device_id \
         UNION ALL \
         SELECT d.device_id, NULL, NULL, NULL, d.first_seen_ms, d.last_seen_ms, d.online, d.daemon_version, \
         d.model_version, d.engine, d.gpu_degraded, d.engine_fallbacks, d.outbox_depth, d.outbox_oldest_unacked_s, \
         d.status_received_ms, d.acked_seq, d.chain_rewritten_ms, d.chain_reviewed_ms FROM devices d \
         WHERE NOT EXISTS (SELECT 1 FROM device_registry r WHERE r.device_id = d.device_id)";
    let state = "CASE WHEN retired_ms IS NOT NULL THEN 'retired' WHEN first_seen_ms IS NULL THEN 'never_seen' \
         WHEN online = 1 THEN 'online' ELSE 'offline' END";
    let age = "CASE WHEN COALESCE(outbox_depth, 0) > 0 \
         THEN outbox_oldest_unacked_s * 1000 + ($1 - status_received_ms) ELSE NULL END";
    let live = "retired_ms IS NULL";
    format!(
        "SELECT {VIEW_COLUMNS}, state, backlog_age_ms, \
           CASE WHEN {live} AND state = 'offline' THEN 1 ELSE 0 END AS a_offline, \
           CASE WHEN {live} AND (COALESCE(outbox_depth, 0) >= $2 OR COALESCE(backlog_age_ms, 0) >= $3 * 1000) \
             THEN 1 ELSE 0 END AS a_backlog, \
           CASE WHEN {live} AND (COALESCE(gpu_degraded, 0) = 1 OR COALESCE(engine_fallbacks, 0) > 0) \
             THEN 1 ELSE 0 END AS a_fallbacks, \
           CASE WHEN chain_rewritten_ms IS NOT NULL AND \
             (chain_reviewed_ms IS NULL OR chain_reviewed_ms < chain_rewritten_ms) THEN 1 ELSE 0 END AS a_chain \
         FROM (SELECT {VIEW_COLUMNS}, {state} AS state, {age} AS backlog_age_ms FROM ({joined}) j) v"
    )
}

fn device_from_row(row: &AnyRow) -> Device {
    let state = match row.get::<String, _>("state").as_str() {
        "retired" => DeviceState::Retired,
        "never_seen" => DeviceState::NeverSeen,
        "online" => DeviceState::Online,
        _ => DeviceState::Offline,
    };
    let flag = |name: &str| row.get::<i64, _>(name) == 1;
    let attention = [
        ("a_offline", Attention::Offline),
        ("a_backlog", Attention::Backlog),
        ("a_fallbacks", Attention::Fallbacks),
        ("a_chain", Attention::ChainRewritten),
    ]
    .into_iter()
    .filter(|(column, _)| flag(column))
    .map(|(_, reason)| reason)
    .collect();
    let rewritten_ms: Option<i64> = row.get("chain_rewritten_ms");
    let reviewed_ms: Option<i64> = row.get("chain_reviewed_ms");
    Device {
        device_id: row.get("device_id"),
        site: row.get("site"),
        state,
        first_seen_ms: row.get("first_seen_ms"),
        last_seen_ms: row.get("last_seen_ms"),
        registered_ms: row.get("registered_ms"),
        retired_ms: row.get("retired_ms"),
        daemon_version: row.get("daemon_version"),
        model_version: row.get("model_version"),
        engine: row.get("engine"),
        outbox_depth: row.get("outbox_depth"),
        outbox_oldest_unacked_ms: row.get("backlog_age_ms"),
        acked_seq: row.get::<Option<i64>, _>("acked_seq").unwrap_or(0),
        audit_chain: AuditChain {
            next_seq: None,
            head: None,
            rewritten_ms,
            reviewed: matches!((rewritten_ms, reviewed_ms), (Some(w), Some(r)) if r >= w),
        },
        attention,
    }
}

/// What a token may read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Everything.
    Fleet,
    /// One site's devices.
    Site(String),
    /// One device.
    Device(String),
}

impl Scope {
    /// Parses `fleet`, `site:S` or `device:D`.
    pub fn parse(text: &str) -> Result<Scope, String> {
        if text == "fleet" {
            return Ok(Scope::Fleet);
        }
        let bad = || format!("{text:?} is not a scope (fleet, site:SITE or device:ID)");
        let (kind, name) = text.split_once(':').ok_or_else(bad)?;
        if !rxvision_protocol::topic::valid_device_id(name) {
            return Err(bad());
        }
        match kind {
            "site" => Ok(Scope::Site(name.to_string())),
            "device" => Ok(Scope::Device(name.to_string())),
            _ => Err(bad()),
        }
    }

    /// Whether the scope covers a device at `site`.
    pub fn covers(&self, device_id: &str, site: Option<&str>) -> bool {
        match self {
            Scope::Fleet => true,
            Scope::Site(s) => site == Some(s.as_str()),
            Scope::Device(d) => d == device_id,
        }
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Fleet => write!(f, "fleet"),
            Scope::Site(s) => write!(f, "site:{s}"),
            Scope::Device(d) => write!(f, "device:{d}"),
        }
    }
}

/// How to sort a device list.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeviceSort {
    /// By id.
    #[default]
    DeviceId,
    /// By site, then id.
    Site,
    /// By the latest message.
    LastSeen,
    /// By outbox depth.
    Backlog,
}

/// A filtered, sorted page of devices.
#[derive(Debug, Clone, Default)]
pub struct DeviceQuery {
    /// Only this site.
    pub site: Option<String>,
    /// Only this state, or `attention`.
    pub state: Option<String>,
    /// Only ids containing this.
    pub id_contains: Option<String>,
    /// Sort key.
    pub sort: DeviceSort,
    /// Descending.
    pub descending: bool,
    /// Rows to skip.
    pub offset: i64,
    /// Rows to return.
    pub limit: i64,
}

/// Devices by state, and by why they need attention.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct DeviceCounts {
    /// Every device.
    pub total: i64,
    /// Online.
    pub online: i64,
    /// Offline.
    pub offline: i64,
    /// Retired.
    pub retired: i64,
    /// Registered, never heard from.
    pub never_seen: i64,
    /// Needing attention for any reason.
    pub attention: i64,
}

/// Devices needing attention, by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct AttentionCounts {
    /// Offline.
    pub offline: i64,
    /// Outbox backlog.
    pub backlog: i64,
    /// Engine fallbacks.
    pub fallbacks: i64,
    /// Audit chain rewritten, not reviewed.
    pub chain_rewritten: i64,
}

/// How many live devices run a combination of versions and engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct VersionCount {
    /// Model version.
    pub model_version: Option<String>,
    /// `rxvisiond` version.
    pub daemon_version: Option<String>,
    /// Engine.
    pub engine: Option<String>,
    /// Devices.
    pub devices: i64,
}

fn scope_filter(scope: &Scope, first_param: usize) -> (String, Option<String>) {
    match scope {
        Scope::Fleet => (String::new(), None),
        Scope::Site(s) => (format!(" AND site = ${first_param}"), Some(s.clone())),
        Scope::Device(d) => (format!(" AND device_id = ${first_param}"), Some(d.clone())),
    }
}

const COUNT_COLUMNS: &str = "COUNT(*), \
    CAST(COALESCE(SUM(CASE WHEN state = 'online' THEN 1 ELSE 0 END), 0) AS BIGINT), \
    CAST(COALESCE(SUM(CASE WHEN state = 'offline' THEN 1 ELSE 0 END), 0) AS BIGINT), \
    CAST(COALESCE(SUM(CASE WHEN state = 'retired' THEN 1 ELSE 0 END), 0) AS BIGINT), \
    CAST(COALESCE(SUM(CASE WHEN state = 'never_seen' THEN 1 ELSE 0 END), 0) AS BIGINT), \
    CAST(COALESCE(SUM(CASE WHEN a_offline + a_backlog + a_fallbacks + a_chain > 0 THEN 1 ELSE 0 END), 0) AS BIGINT), \
    CAST(COALESCE(SUM(a_offline), 0) AS BIGINT), CAST(COALESCE(SUM(a_backlog), 0) AS BIGINT), \
    CAST(COALESCE(SUM(a_fallbacks), 0) AS BIGINT), CAST(COALESCE(SUM(a_chain), 0) AS BIGINT)";

fn counts_from_row(row: &AnyRow, first: usize) -> (DeviceCounts, AttentionCounts) {
    let n = |k: usize| row.get::<i64, _>(first + k);
    (
        DeviceCounts { total: n(0), online: n(1), offline: n(2), retired: n(3), never_seen: n(4), attention: n(5) },
        AttentionCounts { offline: n(6), backlog: n(7), fallbacks: n(8), chain_rewritten: n(9) },
    )
}

impl Db {
    /// Registers a device at `site` (with the serial of the client
    /// certificate issued to it, if any) and returns its broker password
    /// (shown once; only its hash is kept).
    pub async fn add_device(
        &self,
        device_id: &str,
        site: &str,
        cert_serial: Option<&str>,
        actor: &str,
        now_ms: i64,
    ) -> Result<String, RegistryError> {
        let device = NewDevice {
            device_id: device_id.to_string(),
            site: site.to_string(),
            password: new_password(),
            cert_serial: cert_serial.map(str::to_string),
        };
        self.add_devices(std::slice::from_ref(&device), actor, now_ms).await?;
        Ok(device.password)
    }

    /// Registers devices in one transaction: all of them, or (an id taken,
    /// or not acceptable) none. Each is a `device_added` event.
    pub async fn add_devices(&self, devices: &[NewDevice], actor: &str, now_ms: i64) -> Result<(), RegistryError> {
        for device in devices {
            check_site(&device.site)?;
            check_device_id(&device.device_id)?;
        }
        let mut tx = self.begin_write().await?;
        for device in devices {
            let inserted = sqlx::query(
                "INSERT INTO device_registry (device_id, site, created_ms, created_by, password_hash, cert_serial) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (device_id) DO NOTHING",
            )
            .bind(&device.device_id)
            .bind(&device.site)
            .bind(now_ms)
            .bind(actor)
            .bind(hash_password(&device.password))
            .bind(device.cert_serial.clone())
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if inserted == 0 {
                return Err(RegistryError::Exists(device.device_id.clone()));
            }
            let details = serde_json::json!({ "site": device.site });
            record_change(&mut tx, now_ms, actor, "device_added", Some(&device.device_id), details).await?;
        }
        bump_registry(&mut tx).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Which of `ids` are registered (retired ones included).
    pub async fn registered(&self, ids: &[String]) -> Result<Vec<String>, RegistryError> {
        let mut found = Vec::new();
        for chunk in ids.chunks(500) {
            let list: Vec<String> = (1..=chunk.len()).map(|k| format!("${k}")).collect();
            let sql = format!("SELECT device_id FROM device_registry WHERE device_id IN ({})", list.join(", "));
            let mut query = sqlx::query(&sql);
            for id in chunk {
                query = query.bind(id);
            }
            found.extend(query.fetch_all(&self.pool).await?.iter().map(|r| r.get::<String, _>(0)));
        }
        found.sort();
        Ok(found)
    }

    /// Retires a device: its broker account goes at the broker's next reload.
    pub async fn retire_device(&self, device_id: &str, actor: &str, now_ms: i64) -> Result<(), RegistryError> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query("SELECT retired_ms FROM device_registry WHERE device_id = $1")
            .bind(device_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| RegistryError::NotFound(device_id.to_string()))?;
        if row.get::<Option<i64>, _>(0).is_some() {
            return Err(RegistryError::Retired(device_id.to_string()));
        }
        sqlx::query("UPDATE device_registry SET retired_ms = $2, retired_by = $3 WHERE device_id = $1")
            .bind(device_id)
            .bind(now_ms)
            .bind(actor)
            .execute(&mut *tx)
            .await?;
        bump_registry(&mut tx).await?;
        record_change(&mut tx, now_ms, actor, "device_retired", Some(device_id), serde_json::json!({})).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Marks the device's latest audit chain rewrite reviewed.
    pub async fn review_chain(&self, device_id: &str, actor: &str, now_ms: i64) -> Result<(), RegistryError> {
        let mut tx = self.begin_write().await?;
        let row = sqlx::query("SELECT chain_rewritten_ms, chain_epoch FROM devices WHERE device_id = $1")
            .bind(device_id)
            .fetch_optional(&mut *tx)
            .await?;
        let Some(rewritten_ms) = row.as_ref().and_then(|r| r.get::<Option<i64>, _>(0)) else {
            return Err(RegistryError::Invalid(format!("device {device_id:?} has no audit chain rewrite to review")));
        };
        sqlx::query("UPDATE devices SET chain_reviewed_ms = $2, chain_reviewed_by = $3 WHERE device_id = $1")
            .bind(device_id)
            .bind(now_ms.max(rewritten_ms))
            .bind(actor)
            .execute(&mut *tx)
            .await?;
        let epoch = row.as_ref().map_or(0, |r| r.get::<i64, _>(1));
        let details = serde_json::json!({ "rewritten_ms": rewritten_ms, "chain_epoch": epoch });
        record_change(&mut tx, now_ms, actor, "audit_chain_reviewed", Some(device_id), details).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Moves whenever a device is added or retired.
    pub async fn registry_generation(&self) -> Result<i64, DbError> {
        Ok(sqlx::query("SELECT value FROM fleet_counters WHERE name = 'registry_generation'")
            .fetch_one(&self.pool)
            .await?
            .get(0))
    }

    /// The broker accounts of every live (not retired) registered device:
    /// (device id, password hash), by id.
    pub async fn broker_accounts(&self) -> Result<Vec<(String, String)>, DbError> {
        let rows = sqlx::query(
            "SELECT device_id, password_hash FROM device_registry WHERE retired_ms IS NULL ORDER BY device_id",
        )
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// One device, with its latest audit chain head.
    pub async fn device(&self, device_id: &str, now_ms: i64, limits: BacklogLimits) -> Result<Option<Device>, DbError> {
        let sql = format!("SELECT * FROM ({}) x WHERE device_id = $4", device_view_sql());
        let Some(row) = sqlx::query(&sql)
            .bind(now_ms)
            .bind(limits.messages)
            .bind(limits.age_s)
            .bind(device_id)
            .fetch_optional(&self.pool)
            .await?
        else {
            return Ok(None);
        };
        let mut device = device_from_row(&row);
        if let Some(head) = sqlx::query(
            "SELECT h.next_seq, h.head FROM audit_heads h JOIN devices d ON d.device_id = h.device_id \
             AND d.chain_epoch = h.chain_epoch WHERE h.device_id = $1 ORDER BY h.next_seq DESC LIMIT 1",
        )
        .bind(device_id)
        .fetch_optional(&self.pool)
        .await?
        {
            device.audit_chain.next_seq = Some(head.get(0));
            device.audit_chain.head = Some(head.get(1));
        }
        Ok(Some(device))
    }

    /// A page of devices within `scope`, and how many match in all.
    pub async fn device_page(
        &self,
        scope: &Scope,
        query: &DeviceQuery,
        now_ms: i64,
        limits: BacklogLimits,
    ) -> Result<(Vec<Device>, i64), DbError> {
        let (scope_sql, scope_value) = scope_filter(scope, 4);
        let mut filters = scope_sql;
        let mut values: Vec<String> = scope_value.into_iter().collect();
        let mut next = 4 + values.len();
        if let Some(site) = &query.site {
            filters.push_str(&format!(" AND site = ${next}"));
            values.push(site.clone());
            next += 1;
        }
        if let Some(state) = &query.state {
            if state == "attention" {
                filters.push_str(" AND a_offline + a_backlog + a_fallbacks + a_chain > 0");
            } else {
                filters.push_str(&format!(" AND state = ${next}"));
                values.push(state.clone());
                next += 1;
            }
        }
        if let Some(needle) = query.id_contains.as_deref().filter(|n| !n.is_empty()) {
            // Ids hold no LIKE wildcards but '_': escape it.
            filters.push_str(&format!(" AND device_id LIKE ${next} ESCAPE '!'"));
            values.push(format!("%{}%", needle.replace('!', "!!").replace('%', "!%").replace('_', "!_")));
        }
        let keys: &[&str] = match query.sort {
            DeviceSort::DeviceId => &["device_id"],
            DeviceSort::Site => &["site", "device_id"],
            DeviceSort::LastSeen => &["COALESCE(last_seen_ms, 0)", "device_id"],
            DeviceSort::Backlog => &["COALESCE(outbox_depth, 0)", "device_id"],
        };
        let direction = if query.descending { "DESC" } else { "ASC" };
        let order: Vec<String> = keys.iter().map(|c| format!("{c} {direction}")).collect();
        let view = device_view_sql();
        let page_sql = format!(
            "SELECT * FROM ({view}) x WHERE 1 = 1{filters} ORDER BY {} LIMIT {} OFFSET {}",
            order.join(", "),
            query.limit.clamp(1, 10_000),
            query.offset.max(0)
        );
        let count_sql = format!("SELECT COUNT(*) FROM ({view}) x WHERE 1 = 1{filters}");
        fn bind_all<'q>(
            sql: &'q str,
            now_ms: i64,
            limits: BacklogLimits,
            values: &[String],
        ) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
            let mut q = sqlx::query(sql).bind(now_ms).bind(limits.messages).bind(limits.age_s);
            for v in values {
                q = q.bind(v.clone());
            }
            q
        }
        let rows = bind_all(&page_sql, now_ms, limits, &values).fetch_all(&self.pool).await?;
        let total: i64 = bind_all(&count_sql, now_ms, limits, &values).fetch_one(&self.pool).await?.get(0);
        Ok((rows.iter().map(device_from_row).collect(), total))
    }

    /// Devices within `scope` by state and attention, and the live devices'
    /// versions and engines.
    pub async fn device_counts(
        &self,
        scope: &Scope,
        now_ms: i64,
        limits: BacklogLimits,
    ) -> Result<(DeviceCounts, AttentionCounts, Vec<VersionCount>), DbError> {
        let (filter, value) = scope_filter(scope, 4);
        let view = device_view_sql();
        let counts_sql = format!("SELECT {COUNT_COLUMNS} FROM ({view}) x WHERE 1 = 1{filter}");
        let versions_sql = format!(
            "SELECT model_version, daemon_version, engine, COUNT(*) FROM ({view}) x \
             WHERE state <> 'retired'{filter} GROUP BY model_version, daemon_version, engine \
             ORDER BY COUNT(*) DESC, model_version"
        );
        let row = view_query(&counts_sql, now_ms, limits, value.as_deref()).fetch_one(&self.pool).await?;
        let (counts, attention) = counts_from_row(&row, 0);
        let versions = view_query(&versions_sql, now_ms, limits, value.as_deref())
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| VersionCount {
                model_version: r.get(0),
                daemon_version: r.get(1),
                engine: r.get(2),
                devices: r.get(3),
            })
            .collect();
        Ok((counts, attention, versions))
    }

    /// Every site within `scope` with its devices by state and attention.
    pub async fn site_device_counts(
        &self,
        scope: &Scope,
        now_ms: i64,
        limits: BacklogLimits,
    ) -> Result<Vec<(String, DeviceCounts)>, DbError> {
        let (filter, value) = scope_filter(scope, 4);
        let sql = format!(
            "SELECT site, {COUNT_COLUMNS} FROM ({}) x WHERE site IS NOT NULL{filter} GROUP BY site ORDER BY site",
            device_view_sql()
        );
        let rows = view_query(&sql, now_ms, limits, value.as_deref()).fetch_all(&self.pool).await?;
        Ok(rows.iter().map(|r| (r.get(0), counts_from_row(r, 1).0)).collect())
    }

    /// The site a device is registered at.
    pub async fn device_site(&self, device_id: &str) -> Result<Option<String>, DbError> {
        Ok(sqlx::query("SELECT site FROM device_registry WHERE device_id = $1")
            .bind(device_id)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| r.get(0)))
    }
}

/// A query over [`device_view_sql`] with its parameters (and a scope's value) bound.
fn view_query<'q>(
    sql: &'q str,
    now_ms: i64,
    limits: BacklogLimits,
    value: Option<&str>,
) -> sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments<'q>> {
    let query = sqlx::query(sql).bind(now_ms).bind(limits.messages).bind(limits.age_s);
    match value {
        Some(v) => query.bind(v.to_string()),
        None => query,
    }
}

/// Moves the registry generation (in the change's transaction).
async fn bump_registry(tx: &mut Tx<'_>) -> Result<(), DbError> {
    sqlx::query("UPDATE fleet_counters SET value = value + 1 WHERE name = 'registry_generation'")
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Records a change as a fleet event with its actor (in the change's transaction).
pub(crate) async fn record_change(
    tx: &mut Tx<'_>,
    now_ms: i64,
    actor: &str,
    kind: &str,
    device_id: Option<&str>,
    details: serde_json::Value,
) -> Result<(), DbError> {
    sqlx::query("INSERT INTO fleet_events (time_ms, device_id, kind, details, actor) VALUES ($1, $2, $3, $4, $5)")
        .bind(now_ms)
        .bind(device_id.map(str::to_string))
        .bind(kind)
        .bind(details.to_string())
        .bind(actor)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_is_the_one_mosquitto_passwd_writes() {
        // `mosquitto_passwd -c -b pw alice secret` (Mosquitto 2.0.11) wrote:
        let line = "$7$101$7E0hOUEAYOYu5kD1$r33y8yr/4vRp8dEUMCCilt/amQmKhtWHld422rbyfhhvDfhP8Pqc+ikOZFDmZqReG7dBlCzQIgSN6H70oj9Nsg==";
        let salt = base64::engine::general_purpose::STANDARD.decode("7E0hOUEAYOYu5kD1").unwrap();
        assert_eq!(mosquitto_hash("secret", &salt), line);
        assert_ne!(mosquitto_hash("secret2", &salt), line);
    }

    #[test]
    fn passwords_are_long_and_fresh() {
        let (a, b) = (new_password(), new_password());
        assert_eq!(a.len(), 32);
        assert_ne!(a, b);
        assert_ne!(hash_password(&a), hash_password(&a), "a fresh salt each time");
    }

    #[test]
    fn ids_and_scopes_are_checked() {
        assert!(check_device_id("pharmacy-12.counter_1").is_ok());
        assert!(check_device_id("rxfleet-ingest").is_err());
        assert!(check_device_id("a/b").is_err());
        assert!(check_site("").is_err());
        assert_eq!(Scope::parse("site:s1").unwrap(), Scope::Site("s1".into()));
        assert_eq!(Scope::parse("fleet").unwrap().to_string(), "fleet");
        assert!(Scope::parse("site:").is_err() && Scope::parse("town:x").is_err() && Scope::parse("x").is_err());
        assert!(Scope::Site("s1".into()).covers("d", Some("s1")));
        assert!(!Scope::Site("s1".into()).covers("d", None));
        assert!(!Scope::Device("d".into()).covers("e", Some("s1")));
    }
}
