//! `rxvisiond` configuration: versioned TOML, parsed, then validated.
//!
//! The annotated default lives in `firmware-cfg/rxvisiond.toml` and is
//! compiled in: `rxvisiond print-default-config` prints it, and a test keeps
//! the two identical. Unknown keys and bad values are errors that name the
//! key's path (`model.cpu_threads`); nothing in a configuration needs the
//! network.
//!
//! Parsing ([`RawConfig`], serde with `deny_unknown_fields`) and validation
//! ([`validate`], a pure function) are separate steps, so every problem of a
//! file is reported at once and the rest of the daemon only ever sees a
//! [`Config`] whose values are known to be usable.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::camera::PixelFormat;
use rxvision_models::engine::{EngineOptions, EnginePreference};
use rxvision_models::preprocess::ImageLimits;
use rxvision_synth::scene::NATIVE_PX_PER_MM;
use serde::Deserialize;

/// The configuration layout this build reads.
pub const CONFIG_VERSION: u32 = 1;

/// The annotated default configuration.
pub const DEFAULT_CONFIG: &str = include_str!("../../firmware-cfg/rxvisiond.toml");

/// One problem with a configuration, at a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// Dotted key path, e.g. `model.cpu_threads`.
    pub path: String,
    /// What is wrong, in words.
    pub problem: String,
}

impl std::fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.path, self.problem)
    }
}

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has an unknown key or a wrongly typed value.
    #[error("{file}: {problem}")]
    Parse {
        /// The file.
        file: String,
        /// The problem, with its key path.
        problem: ConfigProblem,
    },
    /// Values are out of range or inconsistent.
    #[error("{file}: {}", .problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid {
        /// The file.
        file: String,
        /// Every problem found.
        problems: Vec<ConfigProblem>,
    },
}

/// The file as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Layout version; must be [`CONFIG_VERSION`].
    pub version: u32,
    /// This appliance.
    pub device: RawDevice,
    /// The model and the engines.
    pub model: RawModel,
    /// Where frames come from.
    pub camera: RawCamera,
    /// The local API.
    pub api: RawApi,
    /// The audit log.
    pub audit: RawAudit,
    /// Limits on pictures (added after version 1: optional, with defaults).
    #[serde(default)]
    pub images: RawImages,
    /// Telemetry windows and the outbox (added after version 1: optional, off by default).
    #[serde(default)]
    pub telemetry: RawTelemetry,
    /// Signed model updates (added after version 1: optional, off by default).
    #[serde(default)]
    pub updates: RawUpdates,
}

/// `[updates]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawUpdates {
    /// Fetch and install the model signed metadata assigns to this device.
    pub enabled: bool,
    /// The fleet's HTTP base URL (`http://fleet:8490`); the repository is under `/tuf/`.
    pub repository: String,
    /// The pinned `root.json` (from `rxfleet keys init`).
    pub root_file: String,
    /// Seconds between checks when no hint arrives.
    pub poll_interval_seconds: u64,
    /// Starts a new model may take before the daemon goes back to the previous one.
    pub max_starts: u32,
    /// Seconds a new model must serve before it is kept for good.
    pub healthy_after_seconds: u64,
}

impl Default for RawUpdates {
    fn default() -> RawUpdates {
        RawUpdates {
            enabled: false,
            repository: String::new(),
            root_file: String::new(),
            poll_interval_seconds: 3600,
            max_starts: 3,
            healthy_after_seconds: 120,
        }
    }
}

/// `[telemetry]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTelemetry {
    /// Collect telemetry windows into the outbox.
    pub enabled: bool,
    /// Length of a window, seconds.
    pub window_seconds: u64,
    /// The outbox's budget, bytes.
    pub outbox_budget_bytes: u64,
    /// Messages sent ahead of the fleet's acknowledgement.
    pub max_in_flight: u32,
    /// The fleet's broker: `mqtts://host:port` (or `mqtt://` on loopback); empty: no link.
    pub broker: String,
    /// File holding the device's broker password (mode 0600); empty when `password_credential` is used.
    pub password_file: String,
    /// systemd credential holding it; empty when `password_file` is used.
    pub password_credential: String,
    /// The CA certificate (PEM) the broker's certificate is checked against (`mqtts://`).
    pub ca_file: String,
    /// Seconds sent messages may wait for the fleet's ack before they are sent again.
    pub ack_timeout_seconds: u64,
    /// The device's client certificate (PEM), when the broker asks for one.
    pub client_cert_file: String,
    /// Its private key (PEM, mode 0600).
    pub client_key_file: String,
}

impl Default for RawTelemetry {
    fn default() -> RawTelemetry {
        RawTelemetry {
            enabled: false,
            window_seconds: 60,
            outbox_budget_bytes: 64 << 20,
            max_in_flight: 32,
            broker: String::new(),
            password_file: String::new(),
            password_credential: String::new(),
            ca_file: String::new(),
            ack_timeout_seconds: 30,
            client_cert_file: String::new(),
            client_key_file: String::new(),
        }
    }
}

/// The validated `[telemetry]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TelemetryConfig {
    /// Collect windows.
    pub enabled: bool,
    /// Length of a window.
    pub window: Duration,
    /// The outbox's budget, bytes.
    pub outbox_budget_bytes: u64,
    /// Messages sent ahead of the fleet's acknowledgement.
    pub max_in_flight: usize,
    /// The fleet's broker, when a link is configured.
    pub broker: Option<BrokerConfig>,
}

/// Where the link connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerConfig {
    /// Host name or address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// The CA file for TLS (`mqtts://`); `None` for plain `mqtt://`.
    pub ca_file: Option<PathBuf>,
    /// Where the device's password comes from.
    pub password: KeySource,
    /// How long sent messages wait for the fleet's ack before they are sent again.
    pub ack_timeout: Duration,
    /// The client certificate and key files, when the broker asks for a certificate.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl BrokerConfig {
    /// The link's configuration: reads the password (refusing a file group
    /// or others can access) and the CA.
    pub fn load(&self) -> Result<crate::link::LinkConfig, String> {
        use std::os::unix::fs::PermissionsExt;
        let path = &resolve_key(&self.password, "telemetry.password_credential")?;
        let mode = std::fs::metadata(path)
            .map_err(|e| format!("broker password {}: {e}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(format!(
                "broker password {}: mode {:04o} gives group or others access; run `chmod 600` on it",
                path.display(),
                mode & 0o7777
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("broker password {}: {e}", path.display()))?;
        let password = text.lines().next().unwrap_or_default().trim().to_string();
        if password.is_empty() {
            return Err(format!("broker password {}: the first line is empty", path.display()));
        }
        let client_pem = match &self.client_cert {
            Some((cert, key)) => {
                let key_mode = std::fs::metadata(key)
                    .map_err(|e| format!("client key {}: {e}", key.display()))?
                    .permissions()
                    .mode();
                if key_mode & 0o077 != 0 {
                    return Err(format!(
                        "client key {}: mode {:04o} gives group or others access; run `chmod 600` on it",
                        key.display(),
                        key_mode & 0o7777
                    ));
                }
                let read = |path: &PathBuf| std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()));
                Some((read(cert)?, read(key)?))
            }
            None => None,
        };
        let ca_pem = match &self.ca_file {
            Some(ca) => Some(std::fs::read(ca).map_err(|e| format!("broker CA {}: {e}", ca.display()))?),
            None => None,
        };
        Ok(crate::link::LinkConfig {
            host: self.host.clone(),
            port: self.port,
            ca_pem,
            client_pem,
            password,
            ack_timeout: self.ack_timeout,
            keep_alive: Duration::from_secs(30),
        })
    }
}

/// `[images]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawImages {
    /// Largest picture, in pixels (width × height).
    pub max_pixels: u64,
    /// Longest side, in pixels.
    pub max_side: u32,
    /// Shortest side, in pixels.
    pub min_side: u32,
}

impl Default for RawImages {
    fn default() -> RawImages {
        let limits = ImageLimits::default();
        RawImages { max_pixels: limits.max_pixels, max_side: limits.max_side, min_side: limits.min_side }
    }
}

fn default_max_concurrent_scans() -> u32 {
    2
}

fn default_request_timeout_ms() -> u64 {
    10_000
}

/// `[camera]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCamera {
    /// `none`, `v4l2`, `dir` or `synthetic`.
    pub source: String,
    /// Device node for `v4l2` (`/dev/video0`, or a stable `/dev/v4l/by-id/…` name).
    pub device: String,
    /// Pixel format for `v4l2`: `mjpeg` or `yuyv`.
    pub format: String,
    /// Folder for `dir`.
    pub dir: String,
    /// Replay in a loop.
    #[serde(rename = "loop")]
    pub looping: bool,
    /// Frame size for `v4l2` and `synthetic`.
    pub resolution: [u32; 2],
    /// The camera's scale at the tray, pixels per millimetre (0: unknown).
    pub px_per_mm: f32,
    /// Products for `synthetic` (empty: all).
    pub products: Vec<String>,
    /// Seed for `synthetic`.
    pub seed: u64,
}

/// `[api]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawApi {
    /// Socket address to listen on.
    pub listen: String,
    /// API key file; empty when `api_key_credential` is used.
    pub api_key_file: String,
    /// systemd credential holding the API key; empty when `api_key_file` is used.
    pub api_key_credential: String,
    /// Largest accepted request body.
    pub max_body_bytes: u64,
    /// Scans running at once; more are answered 503 `busy` (added after version 1: optional).
    #[serde(default = "default_max_concurrent_scans")]
    pub max_concurrent_scans: u32,
    /// Time a client has to send its request body (added after version 1: optional).
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
}

/// `[device]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDevice {
    /// Appliance id, as provisioned (letters, digits, `-`, `_`, `.`).
    pub id: String,
    /// Where the daemon keeps its state.
    pub state_dir: PathBuf,
}

/// `[model]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    /// A bundle to use; empty: the newest under `bundle_dirs`.
    pub bundle: String,
    /// Where bundles are looked for, in order.
    pub bundle_dirs: Vec<PathBuf>,
    /// Product attributes for reference pictures and the synthetic camera.
    pub formulary: PathBuf,
    /// `auto`, `gpu` or `cpu`.
    pub engine: String,
    /// CPU engine threads.
    pub cpu_threads: u32,
    /// Watchdog on one GPU request before it falls back to the CPU.
    pub gpu_timeout_ms: u64,
}

/// `[audit]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    /// The audit store directory.
    pub dir: PathBuf,
    /// Active key file; empty when `key_credential` is used.
    pub key_file: String,
    /// Name of a systemd credential holding the active key; empty when `key_file` is used.
    pub key_credential: String,
    /// Older keys still needed to read records written before a rotation.
    pub previous_key_files: Vec<PathBuf>,
    /// Records older than this many days are pruned (keeping a signed checkpoint).
    pub retention_days: u32,
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from (`None`: parsed from text).
    pub file: Option<PathBuf>,
    /// Appliance id.
    pub device_id: String,
    /// State directory.
    pub state_dir: PathBuf,
    /// Explicit bundle, if any.
    pub bundle: Option<PathBuf>,
    /// Bundle search roots.
    pub bundle_dirs: Vec<PathBuf>,
    /// The formulary (reference pictures, synthetic camera).
    pub formulary: PathBuf,
    /// Engine selection and limits.
    pub engine: EngineOptions,
    /// Where frames come from when a request has no image.
    pub camera: CameraConfig,
    /// The counter camera's scale at the tray (pixels per millimetre), when
    /// known: configured, or the renderer's own for the synthetic camera.
    /// It turns on the size cue (uploads are assumed to come from the same camera).
    pub px_per_mm: Option<f32>,
    /// The local API.
    pub api: ApiConfig,
    /// Audit store and keys.
    pub audit: AuditConfig,
    /// Limits every picture is checked against before it is decoded.
    pub images: ImageLimits,
    /// Telemetry windows and the outbox.
    pub telemetry: TelemetryConfig,
    /// Signed model updates, when enabled.
    pub updates: Option<crate::updates::UpdatesConfig>,
}

/// The validated `[camera]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CameraConfig {
    /// Every request uploads its image.
    None,
    /// A USB/UVC camera through V4L2.
    V4l2 {
        /// The device node (symlinks are followed at every open).
        device: PathBuf,
        /// The pixel format asked for.
        format: PixelFormat,
        /// Frame width and height asked for.
        resolution: [u32; 2],
    },
    /// Replay a folder's images.
    Dir {
        /// The folder.
        dir: PathBuf,
        /// Start again after the last file.
        looping: bool,
    },
    /// Rendered photos of formulary products.
    Synthetic {
        /// The formulary.
        formulary: PathBuf,
        /// NDCs to show in turn (empty: all).
        products: Vec<String>,
        /// Seed of the sequence.
        seed: u64,
        /// Frame width and height.
        resolution: [u32; 2],
    },
}

/// The validated `[api]` section.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Where to listen.
    pub listen: std::net::SocketAddr,
    /// Where the API key comes from.
    pub key: KeySource,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Scans running at once.
    pub max_concurrent_scans: usize,
    /// Time a client has to send its request body.
    pub request_timeout: Duration,
}

impl ApiConfig {
    /// Reads the API key (first line of the file or credential), refusing a
    /// file group or others can access and a key shorter than 16 characters.
    pub fn load_key(&self) -> Result<String, String> {
        let path = resolve_key(&self.key, "api.api_key_credential")?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path)
                .map_err(|e| format!("API key {}: cannot read: {e}", path.display()))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(format!(
                    "API key {}: mode {:04o} gives group or others access; run `chmod 600` on it",
                    path.display(),
                    mode & 0o7777
                ));
            }
        }
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("API key {}: cannot read: {e}", path.display()))?;
        let key = text.lines().next().unwrap_or_default().trim().to_string();
        if key.len() < 16 {
            return Err(format!("API key {}: must be at least 16 characters on its first line", path.display()));
        }
        Ok(key)
    }
}

fn resolve_key(source: &KeySource, credential_key: &str) -> Result<PathBuf, String> {
    match source {
        KeySource::File(path) => Ok(path.clone()),
        KeySource::Credential(name) => std::env::var_os("CREDENTIALS_DIRECTORY")
            .map(|dir| Path::new(&dir).join(name))
            .ok_or_else(|| {
                format!("{credential_key} = {name:?} but $CREDENTIALS_DIRECTORY is not set (not started by systemd with LoadCredential=)")
            }),
    }
}

/// Where the audit key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// A key file.
    File(PathBuf),
    /// A systemd credential name, read from `$CREDENTIALS_DIRECTORY`.
    Credential(String),
}

/// The validated `[audit]` section.
#[derive(Debug, Clone)]
pub struct AuditConfig {
    /// Store directory.
    pub dir: PathBuf,
    /// The active key.
    pub key: KeySource,
    /// Older keys.
    pub previous_key_files: Vec<PathBuf>,
    /// Retention.
    pub retention: Duration,
}

impl AuditConfig {
    /// The active key file's path, resolving a credential through
    /// `$CREDENTIALS_DIRECTORY` as systemd's `LoadCredential=` provides it.
    pub fn key_path(&self) -> Result<PathBuf, String> {
        resolve_key(&self.key, "audit.key_credential")
    }
}

/// Reads, parses and validates a configuration file.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    let mut config = parse(&text, &path.display().to_string())?;
    config.file = Some(path.to_path_buf());
    Ok(config)
}

/// Parses and validates configuration text; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigError> {
    let deserializer = toml::Deserializer::new(text);
    let raw: RawConfig = serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().message().to_string();
        let location = e
            .inner()
            .span()
            .map(|span| {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!(" (line {line})")
            })
            .unwrap_or_default();
        ConfigError::Parse {
            file: file.to_string(),
            problem: ConfigProblem {
                path: if path == "." { "(top level)".into() } else { path },
                problem: format!("{message}{location}"),
            },
        }
    })?;
    validate(raw).map_err(|problems| ConfigError::Invalid { file: file.to_string(), problems })
}

/// Checks ranges and consistency; returns every problem found.
pub fn validate(raw: RawConfig) -> Result<Config, Vec<ConfigProblem>> {
    let mut problems = Vec::new();
    let mut problem = |path: &str, text: String| problems.push(ConfigProblem { path: path.into(), problem: text });

    if raw.version != CONFIG_VERSION {
        problem("version", format!("{} is not supported (this build reads version {CONFIG_VERSION})", raw.version));
    }
    let id_ok = !raw.device.id.is_empty()
        && raw.device.id.len() <= 64
        && raw.device.id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if !id_ok {
        problem("device.id", "must be 1-64 letters, digits, '-', '_' or '.'".into());
    }
    if !raw.device.state_dir.is_absolute() {
        problem("device.state_dir", "must be an absolute path".into());
    }
    let engine = match raw.model.engine.parse::<EnginePreference>() {
        Ok(e) => e,
        Err(e) => {
            problem("model.engine", e);
            EnginePreference::Auto
        }
    };
    if !(1..=64).contains(&raw.model.cpu_threads) {
        problem("model.cpu_threads", format!("{} is outside 1..=64", raw.model.cpu_threads));
    }
    if !(10..=60_000).contains(&raw.model.gpu_timeout_ms) {
        problem("model.gpu_timeout_ms", format!("{} is outside 10..=60000", raw.model.gpu_timeout_ms));
    }
    if raw.model.bundle_dirs.is_empty() && raw.model.bundle.is_empty() {
        problem("model.bundle_dirs", "must list at least one directory when model.bundle is empty".into());
    }
    if !raw.audit.dir.is_absolute() {
        problem("audit.dir", "must be an absolute path".into());
    }
    let camera = match raw.camera.source.as_str() {
        "none" => CameraConfig::None,
        "dir" if raw.camera.dir.is_empty() => {
            problem("camera.dir", "must name a folder when camera.source = \"dir\"".into());
            CameraConfig::None
        }
        "dir" => CameraConfig::Dir { dir: PathBuf::from(&raw.camera.dir), looping: raw.camera.looping },
        "v4l2" => {
            if !raw.camera.device.starts_with("/dev/") {
                problem("camera.device", format!("{:?} is not a device path under /dev", raw.camera.device));
            }
            let format = match raw.camera.format.as_str() {
                "mjpeg" => PixelFormat::Mjpeg,
                "yuyv" => PixelFormat::Yuyv,
                other => {
                    problem(
                        "camera.format",
                        format!("unknown pixel format {other:?} (expected \"mjpeg\" or \"yuyv\")"),
                    );
                    PixelFormat::Mjpeg
                }
            };
            CameraConfig::V4l2 { device: PathBuf::from(&raw.camera.device), format, resolution: raw.camera.resolution }
        }
        "synthetic" => CameraConfig::Synthetic {
            formulary: raw.model.formulary.clone(),
            products: raw.camera.products.clone(),
            seed: raw.camera.seed,
            resolution: raw.camera.resolution,
        },
        other => {
            problem(
                "camera.source",
                format!("unknown source {other:?} (expected \"none\", \"v4l2\", \"dir\" or \"synthetic\")"),
            );
            CameraConfig::None
        }
    };
    let [w, h] = raw.camera.resolution;
    if !(64..=4096).contains(&w) || !(64..=4096).contains(&h) {
        problem("camera.resolution", format!("{w}x{h} is outside 64..=4096 per side"));
    }
    let scale = raw.camera.px_per_mm;
    let px_per_mm = if scale == 0.0 {
        matches!(camera, CameraConfig::Synthetic { .. }).then_some(NATIVE_PX_PER_MM)
    } else if (1.0..=100.0).contains(&scale) {
        Some(scale)
    } else {
        problem("camera.px_per_mm", format!("{scale} is outside 1..=100 (0: unknown)"));
        None
    };
    let listen = match raw.api.listen.parse::<std::net::SocketAddr>() {
        Ok(addr) => addr,
        Err(e) => {
            problem("api.listen", format!("{:?} is not an address:port ({e})", raw.api.listen));
            std::net::SocketAddr::from(([127, 0, 0, 1], 0))
        }
    };
    if !(1024..=256 * 1024 * 1024).contains(&raw.api.max_body_bytes) {
        problem("api.max_body_bytes", format!("{} is outside 1024..=268435456", raw.api.max_body_bytes));
    }
    let api_key = key_source(
        &mut problem,
        "api.api_key_file",
        &raw.api.api_key_file,
        "api.api_key_credential",
        &raw.api.api_key_credential,
    );
    let key = key_source(
        &mut problem,
        "audit.key_file",
        &raw.audit.key_file,
        "audit.key_credential",
        &raw.audit.key_credential,
    );
    if raw.audit.retention_days == 0 {
        problem("audit.retention_days", "must be at least 1".into());
    }
    if !(1..=64).contains(&raw.api.max_concurrent_scans) {
        problem("api.max_concurrent_scans", format!("{} is outside 1..=64", raw.api.max_concurrent_scans));
    }
    if !(100..=600_000).contains(&raw.api.request_timeout_ms) {
        problem("api.request_timeout_ms", format!("{} is outside 100..=600000", raw.api.request_timeout_ms));
    }
    if !(1..=86_400).contains(&raw.telemetry.window_seconds) {
        problem("telemetry.window_seconds", format!("{} is outside 1..=86400", raw.telemetry.window_seconds));
    }
    if !(1 << 20..=1 << 40).contains(&raw.telemetry.outbox_budget_bytes) {
        problem(
            "telemetry.outbox_budget_bytes",
            format!("{} is outside 1 MiB..=1 TiB", raw.telemetry.outbox_budget_bytes),
        );
    }
    if !(1..=3600).contains(&raw.telemetry.ack_timeout_seconds) {
        problem("telemetry.ack_timeout_seconds", format!("{} is outside 1..=3600", raw.telemetry.ack_timeout_seconds));
    }
    if !(1..=1024).contains(&raw.telemetry.max_in_flight) {
        problem("telemetry.max_in_flight", format!("{} is outside 1..=1024", raw.telemetry.max_in_flight));
    }
    let broker = if raw.telemetry.broker.is_empty() {
        None
    } else {
        let parsed = raw
            .telemetry
            .broker
            .strip_prefix("mqtts://")
            .map(|rest| (true, rest))
            .or_else(|| raw.telemetry.broker.strip_prefix("mqtt://").map(|rest| (false, rest)))
            .and_then(|(tls, rest)| {
                let (host, port) = rest.rsplit_once(':')?;
                Some((tls, host.to_string(), port.parse::<u16>().ok()?))
            })
            .filter(|(_, host, port)| !host.is_empty() && *port != 0);
        match parsed {
            None => {
                problem(
                    "telemetry.broker",
                    format!("{:?} is not mqtts://host:port or mqtt://host:port", raw.telemetry.broker),
                );
                None
            }
            Some((tls, host, port)) => {
                let password = key_source(
                    &mut problem,
                    "telemetry.password_file",
                    &raw.telemetry.password_file,
                    "telemetry.password_credential",
                    &raw.telemetry.password_credential,
                );
                if tls && raw.telemetry.ca_file.is_empty() {
                    problem("telemetry.ca_file", "must name the broker's CA certificate for mqtts://".into());
                }
                Some(BrokerConfig {
                    host,
                    port,
                    ca_file: tls.then(|| PathBuf::from(&raw.telemetry.ca_file)),
                    password,
                    ack_timeout: Duration::from_secs(raw.telemetry.ack_timeout_seconds),
                    client_cert: match (
                        raw.telemetry.client_cert_file.is_empty(),
                        raw.telemetry.client_key_file.is_empty(),
                    ) {
                        (true, true) => None,
                        (false, false) if tls => Some((
                            PathBuf::from(&raw.telemetry.client_cert_file),
                            PathBuf::from(&raw.telemetry.client_key_file),
                        )),
                        (false, false) => {
                            problem("telemetry.client_cert_file", "a client certificate needs mqtts://".into());
                            None
                        }
                        _ => {
                            problem(
                                "telemetry.client_cert_file",
                                "set both client_cert_file and client_key_file, or neither".into(),
                            );
                            None
                        }
                    },
                })
            }
        }
    };
    let ceiling = ImageLimits::default();
    if !(1..=ceiling.max_pixels).contains(&raw.images.max_pixels) {
        problem("images.max_pixels", format!("{} is outside 1..={}", raw.images.max_pixels, ceiling.max_pixels));
    }
    if !(1..=ceiling.max_side).contains(&raw.images.max_side) {
        problem("images.max_side", format!("{} is outside 1..={}", raw.images.max_side, ceiling.max_side));
    }
    if raw.images.min_side == 0 || raw.images.min_side > raw.images.max_side {
        problem("images.min_side", format!("{} is outside 1..=images.max_side", raw.images.min_side));
    }
    let u = &raw.updates;
    let updates = if u.enabled {
        let base = url::Url::parse(&u.repository).ok().filter(|url| url.scheme() == "http" && url.has_host());
        if base.is_none() {
            problem(
                "updates.repository",
                format!("{:?} is not the fleet's http://host:port (updates.enabled is true)", u.repository),
            );
        }
        if u.root_file.is_empty() {
            problem(
                "updates.root_file",
                "must name the pinned root.json from `rxfleet keys init` (updates.enabled is true)".into(),
            );
        }
        if !(10..=7 * 86_400).contains(&u.poll_interval_seconds) {
            problem("updates.poll_interval_seconds", format!("{} is outside 10..=604800", u.poll_interval_seconds));
        }
        if !(1..=100).contains(&u.max_starts) {
            problem("updates.max_starts", format!("{} is outside 1..=100", u.max_starts));
        }
        if !(1..=86_400).contains(&u.healthy_after_seconds) {
            problem("updates.healthy_after_seconds", format!("{} is outside 1..=86400", u.healthy_after_seconds));
        }
        base.map(|mut base| {
            if !base.path().ends_with('/') {
                base.set_path(&format!("{}/", base.path()));
            }
            crate::updates::UpdatesConfig {
                repository: crate::updates::fetch::RepositoryConfig {
                    base,
                    root_file: PathBuf::from(&u.root_file),
                    datastore: raw.device.state_dir.join("tuf"),
                },
                poll_interval: Duration::from_secs(u.poll_interval_seconds),
                max_starts: u.max_starts,
                healthy_after: Duration::from_secs(u.healthy_after_seconds),
            }
        })
    } else {
        None
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(Config {
        file: None,
        updates,
        device_id: raw.device.id,
        state_dir: raw.device.state_dir,
        bundle: (!raw.model.bundle.is_empty()).then(|| PathBuf::from(raw.model.bundle)),
        bundle_dirs: raw.model.bundle_dirs,
        formulary: raw.model.formulary,
        engine: EngineOptions {
            preference: engine,
            cpu_threads: raw.model.cpu_threads as usize,
            gpu_timeout: Duration::from_millis(raw.model.gpu_timeout_ms),
        },
        camera,
        px_per_mm,
        api: ApiConfig {
            listen,
            key: api_key,
            max_body_bytes: raw.api.max_body_bytes as usize,
            max_concurrent_scans: raw.api.max_concurrent_scans as usize,
            request_timeout: Duration::from_millis(raw.api.request_timeout_ms),
        },
        audit: AuditConfig {
            dir: raw.audit.dir,
            key,
            previous_key_files: raw.audit.previous_key_files,
            retention: Duration::from_secs(u64::from(raw.audit.retention_days) * 86_400),
        },
        telemetry: TelemetryConfig {
            enabled: raw.telemetry.enabled,
            window: Duration::from_secs(raw.telemetry.window_seconds),
            outbox_budget_bytes: raw.telemetry.outbox_budget_bytes,
            max_in_flight: raw.telemetry.max_in_flight as usize,
            broker,
        },
        images: ImageLimits {
            max_pixels: raw.images.max_pixels,
            max_side: raw.images.max_side,
            min_side: raw.images.min_side,
        },
    })
}

/// Exactly one of a key file and a credential name.
fn key_source(
    problem: &mut impl FnMut(&str, String),
    file_key: &str,
    file: &str,
    credential_key: &str,
    credential: &str,
) -> KeySource {
    match (file.is_empty(), credential.is_empty()) {
        (false, true) => KeySource::File(PathBuf::from(file)),
        (true, false) => KeySource::Credential(credential.to_string()),
        (true, true) => {
            problem(file_key, format!("set either {file_key} or {credential_key}"));
            KeySource::File(PathBuf::new())
        }
        (false, false) => {
            problem(credential_key, format!("set only one of {file_key} and {credential_key}"));
            KeySource::File(PathBuf::new())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shipped_default_is_valid() {
        let config = parse(DEFAULT_CONFIG, "default").unwrap();
        assert_eq!(config.engine.preference, EnginePreference::Auto);
        assert!(matches!(config.audit.key, KeySource::Credential(_)));
    }

    fn with(old: &str, new: &str) -> String {
        assert!(DEFAULT_CONFIG.contains(old), "default lacks {old:?}");
        DEFAULT_CONFIG.replacen(old, new, 1)
    }

    fn parse_problem(text: &str) -> ConfigProblem {
        match parse(text, "test.toml") {
            Err(ConfigError::Parse { problem, .. }) => problem,
            other => panic!("expected a parse error, got {other:?}"),
        }
    }

    #[test]
    fn a_fleet_broker_needs_a_well_formed_address_a_password_and_for_tls_a_ca() {
        let with_broker = |broker: &str, extra: &str| {
            DEFAULT_CONFIG
                .replace("broker = \"\"", &format!("broker = \"{broker}\""))
                .replace("password_credential = \"\"", &format!("password_credential = \"\"\n{extra}"))
        };
        let problems = |text: &str| match parse(text, "test.toml") {
            Err(ConfigError::Invalid { problems, .. }) => problems.into_iter().map(|p| p.path).collect::<Vec<_>>(),
            other => panic!("expected problems, got {other:?}"),
        };
        assert!(problems(&with_broker("fleet.example:8883", "")).contains(&"telemetry.broker".to_string()));
        let found = problems(&with_broker("mqtts://fleet.example:8883", ""));
        assert!(
            found.contains(&"telemetry.password_file".to_string()) && found.contains(&"telemetry.ca_file".to_string()),
            "{found:?}"
        );
        // A password from a systemd credential, over plain MQTT on loopback: valid.
        let text = with_broker("mqtt://127.0.0.1:1883", "")
            .replace("password_credential = \"\"", "password_credential = \"broker-password\"");
        let config = parse(&text, "test.toml").unwrap();
        let broker = config.telemetry.broker.unwrap();
        assert_eq!((broker.host.as_str(), broker.port), ("127.0.0.1", 1883));
        assert_eq!(broker.password, KeySource::Credential("broker-password".into()));
    }

    #[test]
    fn an_unknown_key_is_named_by_its_path() {
        let p = parse_problem(&with("cpu_threads = 1", "cpu_threads = 1\ncpu_thread = 4"));
        assert_eq!(p.path, "model.cpu_thread");
        assert!(p.problem.contains("unknown field `cpu_thread`"), "{p}");
        assert!(p.problem.contains("line"), "{p}");
        let p = parse_problem(&format!("{DEFAULT_CONFIG}\n[fleet]\nbroker = \"x\"\n"));
        assert!(p.problem.contains("unknown field `fleet`"), "{p}");
        let p = parse_problem(&with("window_seconds = 60", "window_seconds = 60\nbrokers = \"x\""));
        assert_eq!(p.path, "telemetry.brokers");
    }

    #[test]
    fn a_wrongly_typed_value_is_named_by_its_path() {
        let p = parse_problem(&with("cpu_threads = 1", "cpu_threads = \"two\""));
        assert_eq!(p.path, "model.cpu_threads", "{p}");
        let p = parse_problem(&with("retention_days = 2555", "retention_days = -1"));
        assert_eq!(p.path, "audit.retention_days", "{p}");
    }

    #[test]
    fn every_bad_value_is_reported_at_once() {
        let text = with("cpu_threads = 1", "cpu_threads = 0");
        let text = text.replacen("engine = \"auto\"", "engine = \"tpu\"", 1);
        let text = text.replacen("version = 1", "version = 7", 1);
        let text = text.replacen("\nkey_file = \"\"", "\nkey_file = \"/etc/rxvision/audit.key\"", 1);
        match parse(&text, "test.toml") {
            Err(ConfigError::Invalid { problems, .. }) => {
                let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
                assert_eq!(paths, ["version", "model.engine", "model.cpu_threads", "audit.key_credential"]);
            }
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn the_camera_scale_is_configured_implied_by_the_renderer_or_unknown() {
        assert_eq!(parse(DEFAULT_CONFIG, "default").unwrap().px_per_mm, None, "unknown by default");
        let set = parse(&with("px_per_mm = 0.0", "px_per_mm = 11.5"), "t").unwrap();
        assert_eq!(set.px_per_mm, Some(11.5));
        let synthetic = parse(&with("source = \"none\"", "source = \"synthetic\""), "t").unwrap();
        assert_eq!(synthetic.px_per_mm, Some(NATIVE_PX_PER_MM), "the renderer knows its own scale");
        match parse(&with("px_per_mm = 0.0", "px_per_mm = 500.0"), "t") {
            Err(ConfigError::Invalid { problems, .. }) => assert_eq!(problems[0].path, "camera.px_per_mm"),
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn missing_sections_are_named() {
        let p = parse_problem("version = 1\n");
        assert!(p.problem.contains("missing field `device`"), "{p}");
    }
}
