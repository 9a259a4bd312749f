//! The payloads, one type per channel, all JSON with a `v` field.
//!
//! Device → fleet messages that must not be lost ([`Telemetry`], [`Event`])
//! carry the device's `seq`: one counter per device over both channels,
//! starting at 1, incremented by one for every message the device's outbox
//! accepts. The fleet commits them, deduplicates replays by `(device_id,
//! seq)`, and answers with an [`Ack`] of the highest `seq` below which it
//! holds everything. [`Status`] is state, not history: the broker keeps the
//! newest one (retained), and the last will is an offline [`Status`].
//!
//! Every struct denies unknown fields: a new field is a new protocol version,
//! so an old fleet refuses (and counts) what it cannot understand instead of
//! silently dropping part of it. Only an event's `details` is free-form.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::topic::{valid_device_id, Channel};

/// Entries a count map may have (classes, reasons, operators …).
pub const MAX_MAP_ENTRIES: usize = 1024;
/// Longest key of a count map, and longest short text field.
pub const MAX_TEXT: usize = 128;
/// Most buckets a histogram may have.
pub const MAX_BUCKETS: usize = 64;

/// A payload of this protocol: what [`crate::decode`] and [`crate::encode`] work on.
pub trait Message: Serialize + serde::de::DeserializeOwned {
    /// The channel it travels on.
    const CHANNEL: Channel;
    /// The device it is from or for.
    fn device_id(&self) -> &str;
    /// Its protocol version.
    fn version(&self) -> u32;
    /// Checks ranges and shapes serde cannot; the error says what is wrong.
    fn validate(&self) -> Result<(), String>;
}

/// Implements [`Message`] for a payload struct with `v` and `device_id`
/// fields, its channel and its validation function.
macro_rules! message {
    ($ty:ty, $channel:expr, $validate:ident) => {
        impl Message for $ty {
            const CHANNEL: Channel = $channel;
            fn device_id(&self) -> &str {
                &self.device_id
            }
            fn version(&self) -> u32 {
                self.v
            }
            fn validate(&self) -> Result<(), String> {
                $validate(self)
            }
        }
    };
}

/// Counts of values in buckets: `counts[i]` holds values `<= bounds[i]` (and
/// above the previous bound); the last count holds values above every bound.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Histogram {
    /// Upper bounds, finite and strictly ascending.
    pub bounds: Vec<f64>,
    /// One count per bound, then the overflow count.
    pub counts: Vec<u64>,
    /// Sum of the observed values (for the mean).
    pub sum: f64,
}

impl Histogram {
    /// An empty histogram over `bounds`.
    pub fn new(bounds: &[f64]) -> Histogram {
        Histogram { bounds: bounds.to_vec(), counts: vec![0; bounds.len() + 1], sum: 0.0 }
    }

    /// Counts one value (non-finite values are ignored).
    pub fn observe(&mut self, value: f64) {
        if !value.is_finite() {
            return;
        }
        let bucket = self.bounds.iter().position(|&b| value <= b).unwrap_or(self.bounds.len());
        self.counts[bucket] += 1;
        self.sum += value;
    }

    /// How many values were counted.
    pub fn total(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Adds `other`'s counts (for merging windows); the bounds must be equal.
    pub fn merge(&mut self, other: &Histogram) -> Result<(), String> {
        if self.bounds != other.bounds {
            return Err("histograms with different bounds cannot be merged".into());
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.sum += other.sum;
        Ok(())
    }

    fn validate(&self, name: &str) -> Result<(), String> {
        if self.bounds.len() > MAX_BUCKETS {
            return Err(format!("{name}: more than {MAX_BUCKETS} buckets"));
        }
        if self.counts.len() != self.bounds.len() + 1 {
            return Err(format!(
                "{name}: {} counts for {} bounds (need one more)",
                self.counts.len(),
                self.bounds.len()
            ));
        }
        if !self.bounds.iter().all(|b| b.is_finite()) || self.bounds.windows(2).any(|w| w[0] >= w[1]) {
            return Err(format!("{name}: bounds must be finite and strictly ascending"));
        }
        if !self.sum.is_finite() {
            return Err(format!("{name}: sum is not finite"));
        }
        Ok(())
    }
}

/// Bucket bounds of the latency histogram, milliseconds.
pub const LATENCY_BOUNDS_MS: [f64; 12] = [2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0];

/// Bucket bounds of the confidence histogram (top-1 probability).
pub const CONFIDENCE_BOUNDS: [f64; 10] = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.999];

/// The drift features a window carries, with their bucket bounds (the fleet
/// compares these histograms with the model's reference profile, binned alike).
pub fn feature_bounds() -> Vec<(&'static str, Vec<f64>)> {
    let levels: Vec<f64> = (1..16).map(|i| f64::from(i) * 16.0).collect();
    vec![
        ("aspect_ratio", vec![1.05, 1.1, 1.2, 1.35, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0]),
        ("mean_r", levels.clone()),
        ("mean_g", levels.clone()),
        ("mean_b", levels.clone()),
        ("brightness", levels),
        ("blur", vec![1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0]),
        ("contrast", vec![4.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 96.0]),
        ("entropy", (1..16).map(|i| f64::from(i) * 0.5).collect()),
    ]
}

/// The audit chain's head as the device reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChainHead {
    /// The next audit sequence number (records `0..next_seq` exist or were pruned).
    pub next_seq: u64,
    /// SHA-256 (64 lowercase hex digits) of record `next_seq - 1`.
    pub head: String,
}

impl ChainHead {
    fn validate(&self) -> Result<(), String> {
        if self.head.len() != 64 || !self.head.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err("audit.head must be 64 lowercase hex digits".into());
        }
        Ok(())
    }
}

/// The time a telemetry window covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Window {
    /// Start, Unix milliseconds (inclusive).
    pub start_ms: u64,
    /// End, Unix milliseconds (exclusive).
    pub end_ms: u64,
    /// How many windows of the configured length this one holds (more than 1
    /// after the outbox merged old windows to stay within its budget).
    pub windows: u32,
}

/// Pharmacist feedback in a window, by the class the counter answered.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Feedback {
    /// Answers a pharmacist confirmed.
    pub confirmed: BTreeMap<String, u64>,
    /// Answers a pharmacist corrected.
    pub corrected: BTreeMap<String, u64>,
}

/// What the device's outbox had to give up, cumulative since it was created
/// (the fleet takes the differences): nothing is lost silently.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxLosses {
    /// Windows merged into coarser ones.
    pub merged_windows: u64,
    /// Windows dropped after merging could free no more space.
    pub dropped_windows: u64,
    /// Events dropped (only when the budget is full of events).
    pub dropped_events: u64,
}

/// One telemetry window (`rxv/v1/dev/{id}/telemetry`). Counts cover the
/// window only; no prescription reference or operator id appears in clear.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Telemetry {
    /// Protocol version.
    pub v: u32,
    /// The device.
    pub device_id: String,
    /// The device's message sequence number.
    pub seq: u64,
    /// The time covered.
    pub window: Window,
    /// Model version that answered (at the window's end).
    pub model_version: String,
    /// Engine that answered (`cpu` / `gpu`, at the window's end).
    pub engine: String,
    /// Scans answered.
    pub scans: u64,
    /// Scans by verdict (`MATCH`, `MISMATCH`, `UNCERTAIN`, `IDENTIFIED`, `NO_PILL`, `BAD_IMAGE`).
    pub verdicts: BTreeMap<String, u64>,
    /// Scans refused before the model, by reason code (`too_dark`, `blurred`, `too_small` …).
    pub refusals: BTreeMap<String, u64>,
    /// Frame-to-verdict latency, milliseconds.
    pub latency_ms: Histogram,
    /// Top-1 probability of every identified pill.
    pub confidence: Histogram,
    /// Pills by the class the model answered (NDC).
    pub classes: BTreeMap<String, u64>,
    /// Drift features of the pill crops (`aspect_ratio`, `mean_r`, `mean_g`,
    /// `mean_b`, `brightness`, `blur`, `contrast`, `entropy`).
    pub features: BTreeMap<String, Histogram>,
    /// Pharmacist feedback.
    pub feedback: Feedback,
    /// Requests the CPU answered after a GPU failure.
    pub engine_fallbacks: u64,
    /// Scans by operator, keyed by a keyed hash of the operator id (never the id).
    pub operators: BTreeMap<String, u64>,
    /// The audit chain's head at the window's end.
    pub audit: ChainHead,
    /// What the outbox gave up so far.
    pub outbox: OutboxLosses,
}

fn add_counts(into: &mut BTreeMap<String, u64>, from: &BTreeMap<String, u64>) {
    for (key, n) in from {
        *into.entry(key.clone()).or_default() += n;
    }
}

impl Telemetry {
    /// Folds the `later` window into this one (the device's outbox merges old
    /// windows when its budget is exceeded): counts and histograms add, the
    /// time span covers both, versions, engine, audit head and outbox losses
    /// are the later window's. Histograms with other bounds cannot be merged.
    pub fn merge(&mut self, later: &Telemetry) -> Result<(), String> {
        if later.device_id != self.device_id {
            return Err("windows of different devices".into());
        }
        let mut merged = self.clone();
        merged.latency_ms.merge(&later.latency_ms)?;
        merged.confidence.merge(&later.confidence)?;
        for (name, histogram) in &later.features {
            match merged.features.get_mut(name) {
                Some(mine) => mine.merge(histogram)?,
                None => {
                    merged.features.insert(name.clone(), histogram.clone());
                }
            }
        }
        merged.window = Window {
            start_ms: self.window.start_ms.min(later.window.start_ms),
            end_ms: self.window.end_ms.max(later.window.end_ms),
            windows: self.window.windows.saturating_add(later.window.windows),
        };
        merged.scans += later.scans;
        add_counts(&mut merged.verdicts, &later.verdicts);
        add_counts(&mut merged.refusals, &later.refusals);
        add_counts(&mut merged.classes, &later.classes);
        add_counts(&mut merged.feedback.confirmed, &later.feedback.confirmed);
        add_counts(&mut merged.feedback.corrected, &later.feedback.corrected);
        add_counts(&mut merged.operators, &later.operators);
        merged.engine_fallbacks += later.engine_fallbacks;
        merged.model_version = later.model_version.clone();
        merged.engine = later.engine.clone();
        merged.audit = later.audit.clone();
        merged.outbox = later.outbox.clone();
        merged.seq = later.seq;
        *self = merged;
        Ok(())
    }
}

fn check_text(name: &str, value: &str) -> Result<(), String> {
    if value.is_empty() || value.len() > MAX_TEXT || value.chars().any(char::is_control) {
        return Err(format!("{name} must be 1-{MAX_TEXT} printable characters"));
    }
    Ok(())
}

fn check_counts(name: &str, map: &BTreeMap<String, u64>) -> Result<(), String> {
    if map.len() > MAX_MAP_ENTRIES {
        return Err(format!("{name}: more than {MAX_MAP_ENTRIES} entries"));
    }
    map.keys().try_for_each(|k| check_text(&format!("{name} key"), k))
}

fn check_device(device_id: &str) -> Result<(), String> {
    if valid_device_id(device_id) {
        Ok(())
    } else {
        Err("device_id must be 1-64 letters, digits, '-', '_' or '.'".into())
    }
}

message!(Telemetry, Channel::Telemetry, validate_telemetry);

fn validate_telemetry(m: &Telemetry) -> Result<(), String> {
    check_device(&m.device_id)?;
    if m.seq == 0 {
        return Err("seq starts at 1".into());
    }
    if m.window.end_ms <= m.window.start_ms || m.window.windows == 0 {
        return Err("window must end after it starts and hold at least one window".into());
    }
    check_text("model_version", &m.model_version)?;
    check_text("engine", &m.engine)?;
    for (name, map) in [
        ("verdicts", &m.verdicts),
        ("refusals", &m.refusals),
        ("classes", &m.classes),
        ("feedback.confirmed", &m.feedback.confirmed),
        ("feedback.corrected", &m.feedback.corrected),
        ("operators", &m.operators),
    ] {
        check_counts(name, map)?;
    }
    m.latency_ms.validate("latency_ms")?;
    m.confidence.validate("confidence")?;
    if m.features.len() > MAX_MAP_ENTRIES {
        return Err(format!("features: more than {MAX_MAP_ENTRIES} entries"));
    }
    for (name, histogram) in &m.features {
        check_text("features key", name)?;
        histogram.validate(&format!("features.{name}"))?;
    }
    m.audit.validate()
}

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// The daemon started (details: daemon and model versions, engine choice).
    DaemonStarted,
    /// A model bundle was installed and is answering.
    ModelInstalled,
    /// A model bundle was refused (details: why).
    ModelRejected,
    /// The device went back to the previous model.
    ModelRolledBack,
    /// A GPU failure moved the engine to the CPU.
    EngineFallback,
    /// A bundle's self-test failed on an engine.
    SelftestFailed,
    /// An operator accepted an audit store that did not continue the chain.
    AuditStoreAccepted,
    /// The wall clock was found behind the last audit record.
    ClockJump,
    /// The audit store failed (details: the error; the service restarts).
    AuditStoreFailed,
    /// The outbox merged or dropped messages to stay within its budget.
    OutboxOverflow,
    /// A daemon release was installed; the daemon restarts into it (details: version, previous).
    DaemonInstalled,
    /// A daemon release was refused (details: version, why).
    DaemonRejected,
    /// The device went back to the previous daemon (details: from, to, reason).
    DaemonRolledBack,
}

/// Something that happened on a device (`rxv/v1/dev/{id}/events`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Protocol version.
    pub v: u32,
    /// The device.
    pub device_id: String,
    /// The device's message sequence number.
    pub seq: u64,
    /// When it happened, Unix milliseconds (the device's clock).
    pub time_ms: u64,
    /// What happened.
    pub kind: EventKind,
    /// Kind-specific details (a JSON object; free-form).
    #[serde(default)]
    pub details: serde_json::Map<String, serde_json::Value>,
}

message!(Event, Channel::Events, validate_event);

fn validate_event(m: &Event) -> Result<(), String> {
    check_device(&m.device_id)?;
    if m.seq == 0 {
        return Err("seq starts at 1".into());
    }
    if m.details.len() > 64 {
        return Err("details: more than 64 fields".into());
    }
    Ok(())
}

/// The model a device runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelRef {
    /// Bundle name.
    pub name: String,
    /// Bundle version (semver).
    pub version: String,
}

/// The device's engine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EngineState {
    /// `cpu` or `gpu`: the engine answering now.
    pub active: String,
    /// Why it was chosen (the selector's words).
    pub choice: String,
    /// A GPU failed and requests go to the CPU.
    pub gpu_degraded: bool,
    /// Requests the CPU answered after a GPU failure, since start.
    pub fallbacks: u64,
}

/// The device's outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboxState {
    /// Messages waiting for the fleet's acknowledgement.
    pub depth: u64,
    /// Their size in bytes.
    pub bytes: u64,
    /// Age of the oldest of them, seconds (0 when empty).
    pub oldest_unacked_s: u64,
    /// The highest `seq` the fleet acknowledged.
    pub acked_seq: u64,
}

/// The device's state (`rxv/v1/dev/{id}/status`, retained). The last will
/// registered at connect is `{"v", "device_id", "online": false, "time_ms"}`
/// with every optional part absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Status {
    /// Protocol version.
    pub v: u32,
    /// The device.
    pub device_id: String,
    /// Whether the device is connected (false: its last will, or a clean goodbye).
    pub online: bool,
    /// When the device wrote this status, Unix milliseconds (the device's
    /// clock; for a last will: when it connected).
    pub time_ms: u64,
    /// `rxvisiond`'s version.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daemon_version: Option<String>,
    /// The model answering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<ModelRef>,
    /// The engine answering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub engine: Option<EngineState>,
    /// The outbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outbox: Option<OutboxState>,
    /// The audit chain's head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit: Option<ChainHead>,
}

impl Status {
    /// The last will of `device_id`, registered when it connects at `time_ms`.
    pub fn last_will(device_id: &str, time_ms: u64) -> Status {
        Status {
            v: crate::PROTOCOL_VERSION,
            device_id: device_id.to_string(),
            online: false,
            time_ms,
            daemon_version: None,
            model: None,
            engine: None,
            outbox: None,
            audit: None,
        }
    }
}

message!(Status, Channel::Status, validate_status);

fn validate_status(m: &Status) -> Result<(), String> {
    check_device(&m.device_id)?;
    if let Some(version) = &m.daemon_version {
        check_text("daemon_version", version)?;
    }
    if let Some(model) = &m.model {
        check_text("model.name", &model.name)?;
        check_text("model.version", &model.version)?;
    }
    if let Some(engine) = &m.engine {
        check_text("engine.active", &engine.active)?;
        if engine.choice.len() > 512 {
            return Err("engine.choice: longer than 512 bytes".into());
        }
    }
    m.audit.as_ref().map_or(Ok(()), ChainHead::validate)
}

/// The fleet's acknowledgement (`rxv/v1/dev/{id}/ack`): every message of the
/// device with `seq` up to this one is committed (or refused and recorded)
/// in the fleet's database; the device may forget them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ack {
    /// Protocol version.
    pub v: u32,
    /// The device.
    pub device_id: String,
    /// The highest committed `seq`.
    pub seq: u64,
}

message!(Ack, Channel::Ack, validate_ack);

fn validate_ack(m: &Ack) -> Result<(), String> {
    check_device(&m.device_id)
}

/// A hint from the fleet (`rxv/v1/dev/{id}/desired`, retained): fetch the
/// signed update metadata now rather than at the next scheduled check. It
/// carries no update itself: what to install is only ever what signed
/// metadata says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Desired {
    /// Protocol version.
    pub v: u32,
    /// The device.
    pub device_id: String,
    /// Fetch update metadata now.
    pub fetch_updates: bool,
    /// When the fleet issued the hint, Unix milliseconds (the fleet's clock).
    pub issued_ms: u64,
}

message!(Desired, Channel::Desired, validate_desired);

fn validate_desired(m: &Desired) -> Result<(), String> {
    check_device(&m.device_id)
}
