//! `rxfleet`'s configuration: TOML with every key defaulted (the annotated
//! default is `firmware-cfg/rxfleet.toml`, embedded), unknown keys refused
//! with their path, and every problem of a file reported at once.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::devices::BacklogLimits;
use crate::gates::GateLimits;
use crate::lease::LeaseConfig;
use crate::updates::repo::Lifetimes;
use rxvision_models::engine::EnginePreference;

/// The annotated default configuration (`rxfleet print-default-config`).
pub const DEFAULT_CONFIG: &str = include_str!("../../firmware-cfg/rxfleet.toml");

/// Why a configuration cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not TOML, an unknown key or a value of the wrong type.
    #[error("{file}: {key}: {problem}")]
    Parse {
        /// The file.
        file: String,
        /// The key's path (`broker.url`).
        key: String,
        /// What is wrong.
        problem: String,
    },
    /// Values out of range or inconsistent (all of them).
    #[error("{file}: {}", .problems.join("; "))]
    Invalid {
        /// The file.
        file: String,
        /// `key: problem`, one per problem.
        problems: Vec<String>,
    },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    fleet: RawFleet,
    http: RawHttp,
    database: RawDatabase,
    broker: RawBroker,
    ingest: RawIngest,
    lease: RawLease,
    attention: RawAttention,
    updates: RawUpdates,
    gates: RawGates,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawHttp {
    listen: String,
    tls_cert_file: String,
    tls_key_file: String,
}

impl Default for RawHttp {
    fn default() -> RawHttp {
        RawHttp { listen: "127.0.0.1:8490".into(), tls_cert_file: String::new(), tls_key_file: String::new() }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLease {
    ttl_ms: u64,
    renew_ms: u64,
}

impl Default for RawLease {
    fn default() -> RawLease {
        RawLease { ttl_ms: 6000, renew_ms: 1500 }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawAttention {
    backlog_messages: i64,
    backlog_age_seconds: i64,
}

impl Default for RawAttention {
    fn default() -> RawAttention {
        RawAttention { backlog_messages: 120, backlog_age_seconds: 1800 }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawUpdates {
    keys_dir: String,
    artifacts_dir: String,
    targets_expiry_s: u64,
    snapshot_expiry_s: u64,
    timestamp_expiry_s: u64,
    publish_interval_ms: u64,
    judge_interval_ms: u64,
}

impl Default for RawUpdates {
    fn default() -> RawUpdates {
        let lifetimes = Lifetimes::default();
        RawUpdates {
            keys_dir: String::new(),
            artifacts_dir: String::new(),
            targets_expiry_s: lifetimes.targets.as_secs(),
            snapshot_expiry_s: lifetimes.snapshot.as_secs(),
            timestamp_expiry_s: lifetimes.timestamp.as_secs(),
            publish_interval_ms: 2000,
            judge_interval_ms: 60_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawGates {
    datasets_dir: String,
    engine: String,
    min_top1: f64,
    min_automation: f64,
    max_false_match_lookalike: f64,
    max_false_match_unknown: f64,
    max_regression_points: f64,
    max_p95_ms: f64,
    max_peak_memory_mb: f64,
}

impl Default for RawGates {
    fn default() -> RawGates {
        let l = GateLimits::default();
        RawGates {
            datasets_dir: String::new(),
            engine: "cpu".into(),
            min_top1: l.min_top1,
            min_automation: l.min_automation,
            max_false_match_lookalike: l.max_false_match_lookalike,
            max_false_match_unknown: l.max_false_match_unknown,
            max_regression_points: l.max_regression_points,
            max_p95_ms: l.max_p95_ms,
            max_peak_memory_mb: l.max_peak_memory_mb,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawFleet {
    state_dir: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawDatabase {
    url: String,
    max_connections: u32,
}

impl Default for RawDatabase {
    fn default() -> RawDatabase {
        RawDatabase { url: String::new(), max_connections: 8 }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawBroker {
    mode: String,
    mosquitto: String,
    listen: String,
    tls_listen: String,
    tls_cert_file: String,
    tls_key_file: String,
    device_url: String,
    ca_dir: String,
    url: String,
    username: String,
    password_file: String,
    password_credential: String,
    ca_file: String,
    client_id: String,
}

impl Default for RawBroker {
    fn default() -> RawBroker {
        RawBroker {
            mode: "managed".into(),
            mosquitto: "mosquitto".into(),
            listen: "127.0.0.1:18830".into(),
            tls_listen: String::new(),
            tls_cert_file: String::new(),
            tls_key_file: String::new(),
            device_url: String::new(),
            ca_dir: String::new(),
            url: String::new(),
            username: "rxfleet-ingest".into(),
            password_file: String::new(),
            password_credential: String::new(),
            ca_file: String::new(),
            client_id: "rxfleet-ingest".into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawIngest {
    batch_max: usize,
    batch_wait_ms: u64,
}

impl Default for RawIngest {
    fn default() -> RawIngest {
        RawIngest { batch_max: 500, batch_wait_ms: 20 }
    }
}

/// A checked configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetConfig {
    /// Where the fleet keeps its state.
    pub state_dir: PathBuf,
    /// The API, dashboard and metrics.
    pub http: HttpConfig,
    /// The leader lease.
    pub lease: LeaseConfig,
    /// When a device needs attention.
    pub attention: BacklogLimits,
    /// The database.
    pub database: DatabaseConfig,
    /// The broker the ingest reads.
    pub broker: BrokerConfig,
    /// Batching of the ingest.
    pub ingest: IngestConfig,
    /// The TUF repository and the model registry's files.
    pub updates: UpdatesConfig,
    /// The validation gates.
    pub gates: GatesConfig,
}

/// The validation gates.
#[derive(Debug, Clone, PartialEq)]
pub struct GatesConfig {
    /// Registered held-out datasets, by content hash.
    pub datasets_dir: PathBuf,
    /// The engine the gates measure on.
    pub engine: EnginePreference,
    /// What a model must meet.
    pub limits: GateLimits,
}

/// The TUF repository and the registry's artifacts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdatesConfig {
    /// The online signing keys (targets, snapshot, timestamp).
    pub keys_dir: PathBuf,
    /// Stored bundles, by SHA-256.
    pub artifacts_dir: PathBuf,
    /// How long each role's metadata is valid.
    pub lifetimes: Lifetimes,
    /// How often the leader checks whether the repository must be re-signed.
    pub publish_interval: Duration,
    /// How often the leader judges the active rollout's stage.
    pub judge_interval: Duration,
}

/// The HTTP listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpConfig {
    /// Address and port.
    pub listen: SocketAddr,
    /// TLS certificate chain and key (PEM), when HTTPS.
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// The Mosquitto `rxfleet serve` runs and supervises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManagedBroker {
    /// The `mosquitto` executable.
    pub mosquitto: PathBuf,
    /// The plain MQTT listener (the ingest connects here).
    pub listen: SocketAddr,
    /// The TLS listener with its certificate and key, if any.
    pub tls: Option<(SocketAddr, PathBuf, PathBuf)>,
}

/// The fleet's database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatabaseConfig {
    /// `sqlite://…` or `postgres://…`.
    pub url: String,
    /// Connections in the pool.
    pub max_connections: u32,
}

/// Where a secret comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Secret {
    /// A file (mode 0600), first line.
    File(PathBuf),
    /// A systemd credential, from `$CREDENTIALS_DIRECTORY`.
    Credential(String),
    /// None configured (a broker without authentication: tests on loopback only).
    None,
}

impl Secret {
    /// Reads the secret: the first line, trimmed; a file group or others can
    /// read is refused.
    pub fn read(&self) -> Result<Option<String>, String> {
        use std::os::unix::fs::PermissionsExt;
        let path = match self {
            Secret::None => return Ok(None),
            Secret::File(path) => path.clone(),
            Secret::Credential(name) => std::env::var_os("CREDENTIALS_DIRECTORY")
                .map(|dir| Path::new(&dir).join(name))
                .ok_or_else(|| {
                    format!("credential {name:?} but $CREDENTIALS_DIRECTORY is not set (not started by systemd with LoadCredential=)")
                })?,
        };
        let mode = std::fs::metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(format!(
                "{}: mode {:04o} gives group or others access; run `chmod 600` on it",
                path.display(),
                mode & 0o7777
            ));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let line = text.lines().next().unwrap_or_default().trim();
        if line.is_empty() {
            return Err(format!("{}: the first line is empty", path.display()));
        }
        Ok(Some(line.to_string()))
    }
}

/// The broker the ingest reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    /// Host.
    pub host: String,
    /// Port.
    pub port: u16,
    /// TLS (`mqtts://`).
    pub tls: bool,
    /// The account.
    pub username: String,
    /// Its password.
    pub password: Secret,
    /// The CA file for TLS.
    pub ca_file: Option<PathBuf>,
    /// The MQTT client id (its session is kept while the ingest is away).
    pub client_id: String,
    /// `Some`: `rxfleet serve` runs this broker (the fields above then
    /// point at its plain listener and the generated ingest password).
    pub managed: Option<ManagedBroker>,
    /// The broker URL appliances are given (`devices add`).
    pub device_url: String,
    /// The fleet's CA for appliances' client certificates, if any.
    pub ca_dir: Option<PathBuf>,
}

/// Batching of the ingest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IngestConfig {
    /// Messages per transaction, at most.
    pub batch_max: usize,
    /// How long a batch waits to fill.
    pub batch_wait: Duration,
}

/// Where `rxfleet serve` keeps the managed broker's files.
pub fn managed_broker_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("mosquitto")
}

/// The generated password of the ingest's account at the managed broker.
pub fn managed_ingest_password(state_dir: &Path) -> PathBuf {
    managed_broker_dir(state_dir).join("ingest.password")
}

/// Reads and checks a configuration file; `None`: the embedded defaults.
pub fn load(path: Option<&Path>) -> Result<FleetConfig, ConfigError> {
    match path {
        None => parse(DEFAULT_CONFIG, "(embedded default)"),
        Some(path) => {
            let text =
                std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
            parse(&text, &path.display().to_string())
        }
    }
}

/// Parses and checks configuration text; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<FleetConfig, ConfigError> {
    let raw: RawConfig = serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
        let key = e.path().to_string();
        ConfigError::Parse {
            file: file.to_string(),
            key: if key == "." { "(top level)".into() } else { key },
            problem: e.inner().message().to_string(),
        }
    })?;
    validate(raw).map_err(|problems| ConfigError::Invalid { file: file.to_string(), problems })
}

/// Splits `mqtt://host:port` / `mqtts://host:port` into (tls, host, port).
pub fn parse_broker_url(url: &str) -> Result<(bool, String, u16), String> {
    let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
        (true, rest)
    } else if let Some(rest) = url.strip_prefix("mqtt://") {
        (false, rest)
    } else {
        return Err(format!("{url:?} is not mqtt://host:port or mqtts://host:port"));
    };
    let (host, port) = rest.rsplit_once(':').ok_or_else(|| format!("{url:?} names no port"))?;
    let port: u16 = port.parse().map_err(|_| format!("{url:?}: {port:?} is not a port"))?;
    if host.is_empty() || port == 0 {
        return Err(format!("{url:?} names no host or port 0"));
    }
    Ok((tls, host.trim_start_matches('[').trim_end_matches(']').to_string(), port))
}

/// The state directory when `fleet.state_dir` is empty: systemd's
/// `$STATE_DIRECTORY`, else `$XDG_STATE_HOME/rxfleet`, else
/// `~/.local/state/rxfleet`, else `./rxfleet-state`.
pub fn default_state_dir() -> PathBuf {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from);
    if let Some(dir) = var("STATE_DIRECTORY") {
        // systemd may list several, separated by ':'.
        let first = dir.to_string_lossy().split(':').next().unwrap_or_default().to_string();
        return PathBuf::from(first);
    }
    if let Some(dir) = var("XDG_STATE_HOME") {
        return dir.join("rxfleet");
    }
    match var("HOME") {
        Some(home) => home.join(".local/state/rxfleet"),
        None => PathBuf::from("rxfleet-state"),
    }
}

fn socket(key: &str, text: &str, problems: &mut Vec<String>) -> Option<SocketAddr> {
    match text.parse() {
        Ok(addr) => Some(addr),
        Err(_) => {
            problems.push(format!("{key}: {text:?} is not an address:port (e.g. 127.0.0.1:8490)"));
            None
        }
    }
}

fn unspecified() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

fn validate(raw: RawConfig) -> Result<FleetConfig, Vec<String>> {
    let mut problems = Vec::new();
    let state_dir =
        if raw.fleet.state_dir.is_empty() { default_state_dir() } else { PathBuf::from(&raw.fleet.state_dir) };
    let http_listen = socket("http.listen", &raw.http.listen, &mut problems).unwrap_or_else(unspecified);
    let http_tls = match (raw.http.tls_cert_file.is_empty(), raw.http.tls_key_file.is_empty()) {
        (true, true) => None,
        (false, false) => Some((PathBuf::from(&raw.http.tls_cert_file), PathBuf::from(&raw.http.tls_key_file))),
        _ => {
            problems.push("http.tls_cert_file and http.tls_key_file: set both or neither".into());
            None
        }
    };
    if raw.lease.ttl_ms < 1000 || raw.lease.renew_ms == 0 || raw.lease.renew_ms * 2 > raw.lease.ttl_ms {
        problems.push("lease: ttl_ms must be at least 1000 and at least twice renew_ms".into());
    }
    if raw.attention.backlog_messages < 1 || raw.attention.backlog_age_seconds < 1 {
        problems.push("attention: backlog_messages and backlog_age_seconds must be positive".into());
    }
    let managed = match raw.broker.mode.as_str() {
        "managed" => {
            if !raw.broker.url.is_empty() {
                problems.push(
                    "broker.url: the managed broker's address is broker.listen (url is for mode = \"external\")".into(),
                );
            }
            let listen = socket("broker.listen", &raw.broker.listen, &mut problems).unwrap_or_else(unspecified);
            let tls = if raw.broker.tls_listen.is_empty() {
                None
            } else {
                let addr = socket("broker.tls_listen", &raw.broker.tls_listen, &mut problems);
                if raw.broker.tls_cert_file.is_empty() || raw.broker.tls_key_file.is_empty() {
                    problems.push("broker.tls_listen: needs broker.tls_cert_file and broker.tls_key_file".into());
                }
                addr.map(|a| (a, raw.broker.tls_cert_file.clone().into(), raw.broker.tls_key_file.clone().into()))
            };
            Some(ManagedBroker { mosquitto: raw.broker.mosquitto.clone().into(), listen, tls })
        }
        "external" => {
            if raw.broker.url.is_empty() {
                problems.push("broker.url: mode = \"external\" needs the broker's mqtts://host:port".into());
            }
            None
        }
        other => {
            problems.push(format!("broker.mode: {other:?} is neither \"managed\" nor \"external\""));
            None
        }
    };
    let broker_url = match &managed {
        Some(m) if m.listen.ip().is_unspecified() => format!("mqtt://127.0.0.1:{}", m.listen.port()),
        Some(m) => format!("mqtt://{}", m.listen),
        None => raw.broker.url.clone(),
    };
    let device_url = if !raw.broker.device_url.is_empty() {
        raw.broker.device_url.clone()
    } else {
        match &managed {
            Some(ManagedBroker { tls: Some((addr, ..)), .. }) => format!("mqtts://{addr}"),
            Some(ManagedBroker { listen, .. }) => format!("mqtt://{listen}"),
            None => broker_url.clone(),
        }
    };
    match parse_broker_url(&device_url) {
        Err(e) => problems.push(format!("broker.device_url: {e}")),
        Ok((_, host, _)) if host == "0.0.0.0" || host == "::" => problems
            .push("broker.device_url: the broker listens on every address; name the one appliances reach".into()),
        Ok(_) => {}
    }
    let url = if raw.database.url.is_empty() {
        format!("sqlite://{}", state_dir.join("fleet.db").display())
    } else {
        raw.database.url.clone()
    };
    if !(url.starts_with("sqlite://") || url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        problems.push(format!("database.url: {url:?} is neither sqlite://… nor postgres://…"));
    }
    if !(1..=256).contains(&raw.database.max_connections) {
        problems.push("database.max_connections: must be 1-256".to_string());
    }
    let (tls, host, port) = parse_broker_url(&broker_url).unwrap_or_else(|e| {
        if managed.is_none() && !broker_url.is_empty() {
            problems.push(format!("broker.url: {e}"));
        }
        (false, String::new(), 0)
    });
    let password = if managed.is_some() {
        if !raw.broker.password_file.is_empty() || !raw.broker.password_credential.is_empty() {
            problems.push(
                "broker.password_file: the managed broker's ingest password is generated (mode = \"external\" only)"
                    .into(),
            );
        }
        Secret::File(managed_ingest_password(&state_dir))
    } else {
        match (raw.broker.password_file.is_empty(), raw.broker.password_credential.is_empty()) {
            (true, true) => Secret::None,
            (false, true) => Secret::File(raw.broker.password_file.into()),
            (true, false) => Secret::Credential(raw.broker.password_credential),
            (false, false) => {
                problems.push("broker.password_file and broker.password_credential: set one, not both".into());
                Secret::None
            }
        }
    };
    if tls && raw.broker.ca_file.is_empty() {
        problems.push("broker.ca_file: mqtts:// needs the CA certificate to check the broker against".into());
    }
    if raw.broker.username.is_empty() || raw.broker.client_id.is_empty() {
        problems.push("broker.username and broker.client_id: must not be empty".into());
    }
    if !(1..=10_000).contains(&raw.ingest.batch_max) {
        problems.push("ingest.batch_max: must be 1-10000".into());
    }
    if raw.ingest.batch_wait_ms > 10_000 {
        problems.push("ingest.batch_wait_ms: at most 10000".into());
    }
    let u = &raw.updates;
    if u.timestamp_expiry_s < 10
        || u.snapshot_expiry_s < u.timestamp_expiry_s
        || u.targets_expiry_s < u.timestamp_expiry_s
    {
        problems.push(
            "updates: timestamp_expiry_s must be at least 10, and snapshot_expiry_s and targets_expiry_s at least timestamp_expiry_s".into(),
        );
    }
    if !(100..=u.timestamp_expiry_s.saturating_mul(250)).contains(&u.publish_interval_ms) {
        problems.push("updates.publish_interval_ms: at least 100 and at most a quarter of timestamp_expiry_s".into());
    }
    if !(100..=3_600_000).contains(&u.judge_interval_ms) {
        problems.push("updates.judge_interval_ms: 100 to 3600000".into());
    }
    let g = &raw.gates;
    let engine = g.engine.parse::<EnginePreference>().unwrap_or_else(|_| {
        problems.push(format!("gates.engine: {:?} is not auto, gpu or cpu", g.engine));
        EnginePreference::Cpu
    });
    for (key, value) in [
        ("min_top1", g.min_top1),
        ("min_automation", g.min_automation),
        ("max_false_match_lookalike", g.max_false_match_lookalike),
        ("max_false_match_unknown", g.max_false_match_unknown),
    ] {
        if !(0.0..=1.0).contains(&value) {
            problems.push(format!("gates.{key}: {value} is not a share between 0 and 1"));
        }
    }
    for (key, value) in [
        ("max_regression_points", g.max_regression_points),
        ("max_p95_ms", g.max_p95_ms),
        ("max_peak_memory_mb", g.max_peak_memory_mb),
    ] {
        if !(value.is_finite() && value >= 0.0) {
            problems.push(format!("gates.{key}: {value} must be zero or more"));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    let gates = GatesConfig {
        datasets_dir: if g.datasets_dir.is_empty() {
            state_dir.join("datasets")
        } else {
            PathBuf::from(&g.datasets_dir)
        },
        engine,
        limits: GateLimits {
            min_top1: g.min_top1,
            min_automation: g.min_automation,
            max_false_match_lookalike: g.max_false_match_lookalike,
            max_false_match_unknown: g.max_false_match_unknown,
            max_regression_points: g.max_regression_points,
            max_p95_ms: g.max_p95_ms,
            max_peak_memory_mb: g.max_peak_memory_mb,
        },
    };
    let updates = UpdatesConfig {
        keys_dir: if u.keys_dir.is_empty() { state_dir.join("tuf-keys") } else { PathBuf::from(&u.keys_dir) },
        artifacts_dir: if u.artifacts_dir.is_empty() {
            state_dir.join("artifacts")
        } else {
            PathBuf::from(&u.artifacts_dir)
        },
        lifetimes: Lifetimes {
            targets: Duration::from_secs(u.targets_expiry_s),
            snapshot: Duration::from_secs(u.snapshot_expiry_s),
            timestamp: Duration::from_secs(u.timestamp_expiry_s),
        },
        publish_interval: Duration::from_millis(u.publish_interval_ms),
        judge_interval: Duration::from_millis(u.judge_interval_ms),
    };
    Ok(FleetConfig {
        updates,
        gates,
        http: HttpConfig { listen: http_listen, tls: http_tls },
        lease: LeaseConfig {
            ttl: Duration::from_millis(raw.lease.ttl_ms),
            renew: Duration::from_millis(raw.lease.renew_ms),
        },
        attention: BacklogLimits { messages: raw.attention.backlog_messages, age_s: raw.attention.backlog_age_seconds },
        state_dir,
        database: DatabaseConfig { url, max_connections: raw.database.max_connections },
        broker: BrokerConfig {
            host,
            port,
            tls,
            username: raw.broker.username,
            password,
            ca_file: (!raw.broker.ca_file.is_empty()).then(|| raw.broker.ca_file.into()),
            client_id: raw.broker.client_id,
            managed,
            device_url,
            ca_dir: (!raw.broker.ca_dir.is_empty()).then(|| raw.broker.ca_dir.into()),
        },
        ingest: IngestConfig {
            batch_max: raw.ingest.batch_max,
            batch_wait: Duration::from_millis(raw.ingest.batch_wait_ms),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_annotated_default_is_the_compiled_in_default() {
        let annotated = parse(DEFAULT_CONFIG, "default").unwrap();
        let empty = parse("", "empty").unwrap();
        assert_eq!(annotated, empty);
        assert_eq!(annotated.database.url, format!("sqlite://{}/fleet.db", default_state_dir().display()));
        // Not 1883 (a broker of the machine's own may hold it) and loopback only.
        assert_eq!((annotated.broker.host.as_str(), annotated.broker.port), ("127.0.0.1", 18830));
        assert!(annotated.broker.managed.is_some());
        assert_eq!(annotated.http.listen.to_string(), "127.0.0.1:8490");
    }

    #[test]
    fn an_unknown_key_is_named() {
        let err = parse("[broker]\nurll = \"mqtt://x:1\"\n", "f.toml").unwrap_err().to_string();
        assert!(err.contains("broker.urll") && err.contains("unknown field"), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = parse(
            "[database]\nurl = \"mysql://x\"\n[broker]\nmode = \"external\"\nurl = \"mqtts://h:8883\"\n[ingest]\nbatch_max = 0\n",
            "f.toml",
        )
        .unwrap_err();
        let ConfigError::Invalid { problems, .. } = err else { panic!("{err}") };
        assert_eq!(problems.len(), 3, "{problems:?}");
    }

    #[test]
    fn broker_modes_are_checked() {
        let problems = |text: &str| match parse(text, "f.toml") {
            Err(ConfigError::Invalid { problems, .. }) => problems.join("; "),
            other => panic!("{other:?}"),
        };
        assert!(problems("[broker]\nmode = \"external\"\n").contains("broker.url"));
        assert!(problems("[broker]\nurl = \"mqtt://h:1\"\n").contains("url is for mode"));
        assert!(problems("[broker]\nmode = \"cloud\"\n").contains("broker.mode"));
        assert!(problems("[broker]\ntls_listen = \"0.0.0.0:18883\"\n").contains("tls_cert_file"));
        assert!(problems("[broker]\nlisten = \"0.0.0.0:18830\"\n").contains("broker.device_url"));
        assert!(problems("[http]\ntls_cert_file = \"/c.pem\"\n").contains("both or neither"));
        assert!(problems("[lease]\nttl_ms = 1000\nrenew_ms = 900\n").contains("lease"));
        let external =
            parse("[broker]\nmode = \"external\"\nurl = \"mqtts://b:8883\"\nca_file = \"/ca.pem\"\n", "f").unwrap();
        assert_eq!((external.broker.managed, external.broker.device_url.as_str()), (None, "mqtts://b:8883"));
        let tls = parse(
            "[broker]\ntls_listen = \"0.0.0.0:18883\"\ntls_cert_file = \"/c\"\ntls_key_file = \"/k\"\n\
             device_url = \"mqtts://fleet.example:18883\"\n",
            "f",
        )
        .unwrap();
        assert_eq!(tls.broker.port, 18830, "the ingest uses the plain loopback listener");
    }

    #[test]
    fn broker_urls_parse_and_bad_ones_say_why() {
        assert_eq!(parse_broker_url("mqtts://fleet.example:8883").unwrap(), (true, "fleet.example".into(), 8883));
        assert_eq!(parse_broker_url("mqtt://[::1]:1883").unwrap(), (false, "::1".into(), 1883));
        assert!(parse_broker_url("http://x:1").is_err());
        assert!(parse_broker_url("mqtt://x").is_err());
        assert!(parse_broker_url("mqtt://x:0").is_err());
    }
}
