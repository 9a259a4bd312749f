//! The appliance's updater: signed, staged, reversible updates of the model
//! and of the daemon itself.
//!
//! - [`fetch`] — the fleet's TUF repository through tough (pinned root,
//!   persisted trusted metadata, expiry enforced) and resumable, bounded,
//!   hash-checked target downloads.
//! - [`slots`] — the A/B slots, the trial after a switch, and the automatic
//!   return to the previous slot after a crash loop.
//! - [`release`] — daemon releases: the launcher that starts an installed
//!   release, and the checks a new binary passes before the switch.
//!
//! [`Updater::check`] is one pass: refresh the signed metadata, take the
//! target signed metadata assigns to this device's cohort bucket
//! ([`rxvision_protocol::updates::assigned`]) — of kind `model`, then of kind
//! `daemon` named for this machine's architecture — refuse a lower version
//! than the one running unless that target is an explicit rollback order,
//! download it, write it to the inactive slot, verify it there, then switch
//! slots atomically and ask the service to restart into it. A model bundle
//! is verified with the appliances' loader, the security scan, the engines
//! prepared as the service prepares them and the bundle's self-test against
//! ONNX Runtime's outputs on the CPU engine; a daemon release as
//! [`release::verify`] says. Nothing is switched unless every step passed.
//! Every outcome that matters is an audit record of kind `model_change`
//! (`details.event`: `model_installed`, `model_rejected`, `selftest_failed`,
//! `model_rolled_back`, `daemon_installed`, `daemon_rejected`,
//! `daemon_rolled_back`), which the telemetry worker turns into the fleet
//! event of the same name, exactly once.

pub mod fetch;
pub mod release;
pub mod slots;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use rxvision_models::bundle::Bundle;
use rxvision_models::engine::{EngineOptions, Engines, TractEngine};
use rxvision_protocol::updates::{assigned, cohort_bucket, TargetInfo, TargetKind};

use crate::audit::{AuditEvent, AuditLog, RecordKind};
use fetch::{FetchError, RepositoryConfig};
use slots::{Installed, SlotStore};

/// `[updates]`, validated.
#[derive(Debug, Clone)]
pub struct UpdatesConfig {
    /// The repository and the pinned root.
    pub repository: RepositoryConfig,
    /// How often to check without a hint.
    pub poll_interval: Duration,
    /// Starts of the daemon a new model may take before it is given up.
    pub max_starts: u32,
    /// How long a new model must serve before its trial ends.
    pub healthy_after: Duration,
}

/// The event names of `model_change` audit records (and fleet events).
pub mod event {
    /// A new model was switched to.
    pub const INSTALLED: &str = "model_installed";
    /// A target was refused (metadata, download, version or bundle checks).
    pub const REJECTED: &str = "model_rejected";
    /// A bundle failed its self-test on this appliance.
    pub const SELFTEST_FAILED: &str = "selftest_failed";
    /// The daemon went back to the previous model.
    pub const ROLLED_BACK: &str = "model_rolled_back";
    /// A daemon release was switched to.
    pub const DAEMON_INSTALLED: &str = "daemon_installed";
    /// A daemon release was refused (metadata, download, version or its checks).
    pub const DAEMON_REJECTED: &str = "daemon_rejected";
    /// The launcher went back to the previous daemon.
    pub const DAEMON_ROLLED_BACK: &str = "daemon_rolled_back";
}

/// What an install is of: the model or the daemon itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Artifact {
    Model,
    Daemon,
}

impl Artifact {
    fn installed(self) -> &'static str {
        match self {
            Artifact::Model => event::INSTALLED,
            Artifact::Daemon => event::DAEMON_INSTALLED,
        }
    }

    fn rejected(self) -> &'static str {
        match self {
            Artifact::Model => event::REJECTED,
            Artifact::Daemon => event::DAEMON_REJECTED,
        }
    }
}

/// Records a model change in the audit log (the fleet hears of it from there).
pub fn record(audit: &AuditLog, event: &str, details: serde_json::Value) {
    let mut record = AuditEvent::new(RecordKind::ModelChange);
    let mut object = details.as_object().cloned().unwrap_or_default();
    object.insert("event".into(), event.into());
    record.details = serde_json::Value::Object(object);
    if let Err(e) = audit.append(record) {
        tracing::error!(event, error = %e, "a model change could not be recorded");
    }
}

/// What one check did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Checked {
    /// The assigned version runs already (or nothing is assigned).
    UpToDate,
    /// The repository could not be reached; nothing changed.
    Unreachable(String),
    /// Refused (signed metadata, the target, its version or its bundle); nothing changed.
    Refused(String),
    /// Switched to this version: the service must restart into it.
    Installed(String),
}

/// The updater of one appliance.
pub struct Updater {
    config: UpdatesConfig,
    device_id: String,
    store: SlotStore,
    releases: SlotStore,
    audit: Arc<AuditLog>,
    engine: EngineOptions,
    /// The model running now: its version and where it was loaded from.
    running: String,
    running_bundle: PathBuf,
    /// This daemon's version and its configuration file (a new release is checked against both).
    daemon_version: String,
    config_file: Option<PathBuf>,
    /// The last refusal reported of each artifact (model, daemon), so a
    /// repeated one is not reported at every check.
    last_refusal: [std::sync::Mutex<Option<String>>; 2],
}

impl std::fmt::Debug for Updater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Updater")
            .field("device_id", &self.device_id)
            .field("running", &self.running)
            .field("daemon_version", &self.daemon_version)
            .finish()
    }
}

fn version(text: &str) -> Option<semver::Version> {
    semver::Version::parse(text).ok()
}

/// What an updater is told about the appliance it runs on.
#[derive(Debug, Clone)]
pub struct Appliance {
    /// Its id (its cohort bucket follows).
    pub device_id: String,
    /// `<state_dir>` (model slots under `models/`, release slots under `daemon/`).
    pub state_dir: PathBuf,
    /// The engine options the service runs with.
    pub engine: EngineOptions,
    /// The model version running.
    pub model_version: String,
    /// Where the running model was loaded from.
    pub model_bundle: PathBuf,
    /// This daemon's version.
    pub daemon_version: String,
    /// The configuration file the service was started with (`None`: releases
    /// cannot be checked against it and are refused).
    pub config_file: Option<PathBuf>,
}

impl Updater {
    /// An updater for `appliance`.
    pub fn new(config: UpdatesConfig, appliance: Appliance, audit: Arc<AuditLog>) -> Updater {
        Updater {
            config,
            device_id: appliance.device_id,
            store: SlotStore::new(&appliance.state_dir.join("models")),
            releases: release::store(&appliance.state_dir),
            audit,
            engine: appliance.engine,
            running: appliance.model_version,
            running_bundle: appliance.model_bundle,
            daemon_version: appliance.daemon_version,
            config_file: appliance.config_file,
            last_refusal: Default::default(),
        }
    }

    /// How often to check.
    pub fn poll_interval(&self) -> Duration {
        self.config.poll_interval
    }

    fn refuse(&self, artifact: Artifact, event: &str, why: String, details: serde_json::Value) -> Checked {
        let mut last = self.last_refusal[artifact as usize].lock().unwrap_or_else(|p| p.into_inner());
        if last.as_deref() != Some(why.as_str()) {
            tracing::warn!(reason = %why, "update refused");
            let mut details = details.as_object().cloned().unwrap_or_default();
            details.insert("reason".into(), why.clone().into());
            record(&self.audit, event, serde_json::Value::Object(details));
            *last = Some(why.clone());
        }
        Checked::Refused(why)
    }

    /// One pass (see the module's docs): the model first, then the daemon.
    pub async fn check(&self) -> Checked {
        let repo = match fetch::refresh(&self.config.repository).await {
            Ok(repo) => repo,
            Err(FetchError::Network(why)) => return Checked::Unreachable(why),
            Err(FetchError::Refused(why)) => {
                let why = format!("signed metadata refused: {why}");
                return self.refuse(Artifact::Model, event::REJECTED, why, serde_json::json!({}));
            }
        };
        let mut targets = Vec::new();
        for (name, target) in repo.all_targets() {
            match TargetInfo::from_custom(&target.custom) {
                Some(Ok(info)) => targets.push((name.raw().to_string(), info, target.clone())),
                Some(Err(e)) => {
                    tracing::warn!(target = name.raw(), error = %e, "a target's rxvision fields are malformed")
                }
                None => {}
            }
        }
        let model = self.install_assigned(&targets, Artifact::Model).await;
        if matches!(model, Checked::Installed(_)) {
            return model;
        }
        match self.install_assigned(&targets, Artifact::Daemon).await {
            Checked::UpToDate => model,
            daemon => daemon,
        }
    }

    /// Installs what signed metadata assigns this device of `artifact`'s kind.
    async fn install_assigned(
        &self,
        targets: &[(String, TargetInfo, tough::schema::Target)],
        artifact: Artifact,
    ) -> Checked {
        let (kind, running, store) = match artifact {
            Artifact::Model => (TargetKind::Model, &self.running, &self.store),
            Artifact::Daemon => (TargetKind::Daemon, &self.daemon_version, &self.releases),
        };
        let release_name = release::target_name();
        let candidates = targets
            .iter()
            .filter(|(_, info, _)| artifact == Artifact::Model || info.name == release_name)
            .map(|(n, i, _)| (n.as_str(), i));
        let Some((name, info)) = assigned(candidates, kind, cohort_bucket(&self.device_id)) else {
            return Checked::UpToDate;
        };
        let (name, info) = (name.to_string(), info.clone());
        let target = targets.iter().find(|(n, ..)| *n == name).map(|(.., t)| t.clone()).expect("assigned from these");
        let sha256: String = target.hashes.sha256.iter().map(|b| format!("{b:02x}")).collect();
        let details = serde_json::json!({"version": info.version, "target": name, "running": running});
        let rejected = artifact.rejected();
        let (Some(wanted), Some(current)) = (version(&info.version), version(running)) else {
            return self.refuse(
                artifact,
                rejected,
                format!("{name}: version {:?} is not a version", info.version),
                details,
            );
        };
        if wanted == current {
            // A refusal reported before is reported again if it recurs.
            *self.last_refusal[artifact as usize].lock().unwrap_or_else(|p| p.into_inner()) = None;
            return Checked::UpToDate;
        }
        if wanted < current && !info.rollback {
            return self.refuse(
                artifact,
                rejected,
                format!("{name}: {wanted} is lower than the running {current} and not an explicit rollback order"),
                details,
            );
        }
        let mut slots = match store.load() {
            Ok(s) => s,
            Err(e) => return self.refuse(artifact, rejected, e.to_string(), details),
        };
        if slots.given_up.contains(&sha256) {
            // Already reported when it was given up (`*_rolled_back`).
            let why = format!("{name}: given up here after it failed (crash loop or load failure)");
            tracing::info!(reason = %why, "update not installed");
            return Checked::Refused(why);
        }
        if artifact == Artifact::Daemon && wanted < current && slots.active.is_none() {
            // An ordered return below the packaged daemon: the package runs when no slot is active.
            let why = format!("{name}: {wanted} is below the packaged daemon {current}, which cannot be replaced");
            return self.refuse(artifact, rejected, why, details);
        }
        let downloads = store.downloads();
        let file = match fetch::download(&self.config.repository, &name, target.length, &sha256, &downloads).await {
            Ok(file) => file,
            Err(FetchError::Network(why)) => return Checked::Unreachable(why),
            Err(FetchError::Refused(why)) => return self.refuse(artifact, rejected, why, details),
        };
        let slot = slots.inactive();
        let written = match store.write_bundle(slot, &file) {
            Ok(path) => path,
            Err(e) => return Checked::Unreachable(e.to_string()),
        };
        let expected = info.version.clone();
        let verified = match artifact {
            Artifact::Model => {
                let engine = self.engine;
                tokio::task::spawn_blocking(move || verify(&written, &expected, engine))
                    .await
                    .unwrap_or_else(|e| Err((event::REJECTED, format!("verification crashed: {e}"))))
            }
            Artifact::Daemon => match &self.config_file {
                None => Err((event::DAEMON_REJECTED, "the service runs without a configuration file".into())),
                Some(config_file) => release::verify(&written, &expected, config_file, &self.running_bundle)
                    .await
                    .map_err(|why| (event::DAEMON_REJECTED, why)),
            },
        };
        if let Err((kind, why)) = verified {
            return self.refuse(artifact, kind, format!("{name}: {why}"), details);
        }
        let previous = slots.active.as_ref().map(|a| a.version.clone()).unwrap_or_else(|| running.clone());
        slots.switch(Installed { slot, version: info.version.clone(), sha256: sha256.clone() }, crate::audit::now_ms());
        if let Err(e) = store.save(&slots) {
            return self.refuse(artifact, rejected, e.to_string(), details);
        }
        let _ = std::fs::remove_file(&file);
        record(
            &self.audit,
            artifact.installed(),
            serde_json::json!({
                "version": info.version, "previous": previous, "slot": slot.dir_name(), "sha256": sha256,
                "rollback": info.rollback,
            }),
        );
        tracing::info!(version = %info.version, slot = slot.dir_name(), ?artifact, "installed: restarting into it");
        Checked::Installed(info.version)
    }
}

/// Checks a written slot: the loader (hashes, graph), the security scan,
/// the engines as the service prepares them (a GPU's own self-test
/// included), and the self-test on the CPU engine. `Err((event, why))`.
pub fn verify(
    path: &std::path::Path,
    expected_version: &str,
    engine: EngineOptions,
) -> Result<(), (&'static str, String)> {
    let bundle = Bundle::load(path).map_err(|e| (event::REJECTED, e.to_string()))?;
    if bundle.manifest.version.to_string() != expected_version {
        return Err((
            event::REJECTED,
            format!("the bundle says version {}, signed metadata {expected_version}", bundle.manifest.version),
        ));
    }
    rxvision_models::scan::scan(&bundle).map_err(|findings| (event::REJECTED, findings.join("; ")))?;
    Engines::select(&bundle, engine).map_err(|e| (event::SELFTEST_FAILED, e.to_string()))?;
    let cpu = TractEngine::prepare(&bundle, engine.cpu_threads).map_err(|e| (event::SELFTEST_FAILED, e.to_string()))?;
    let report = rxvision_models::selftest::run(&bundle, &cpu).map_err(|e| (event::SELFTEST_FAILED, e.to_string()))?;
    if !report.passed() {
        return Err((event::SELFTEST_FAILED, report.failure_summary()));
    }
    Ok(())
}

/// At start: which installed bundle to load (`None`: the configured one),
/// counting the start against a trial and going back to the previous slot
/// after a crash loop (recorded). A `slots.json` that cannot be read is set
/// aside (renamed `slots.json.unreadable`) and the configured bundle runs:
/// the counter keeps working, and the problem is logged.
pub fn choose_at_start(store: &SlotStore, max_starts: u32, audit: &AuditLog) -> Option<PathBuf> {
    let mut slots = match store.load() {
        Ok(slots) => slots,
        Err(e) => {
            tracing::error!(error = %e, "the model slots cannot be read: running the configured bundle");
            let _ = std::fs::rename(store.state_file(), store.state_file().with_extension("json.unreadable"));
            return None;
        }
    };
    let before = slots.clone();
    let active = match slots.on_start(max_starts) {
        slots::Start::Load(active) => active,
        slots::Start::RolledBack { from, to } => {
            tracing::error!(version = %from.version, "the new model did not survive {max_starts} starts: going back");
            record(
                audit,
                event::ROLLED_BACK,
                serde_json::json!({
                    "from": from.version, "to": to.as_ref().map(|t| t.version.clone()), "reason": "crash_loop",
                }),
            );
            to
        }
    };
    if slots != before {
        if let Err(e) = store.save(&slots) {
            tracing::error!(error = %e, "the model slots cannot be written");
        }
    }
    active.map(|a| store.bundle_path(a.slot))
}

/// The installed bundle failed to load at start: back to the previous slot
/// (recorded); returns what to load now (`None`: the configured bundle).
pub fn roll_back_after_load_failure(store: &SlotStore, audit: &AuditLog, why: &str) -> Option<PathBuf> {
    let mut slots = store.load().unwrap_or_default();
    let (from, to) = slots.roll_back()?;
    if let Err(e) = store.save(&slots) {
        tracing::error!(error = %e, "the model slots cannot be written");
    }
    record(
        audit,
        event::ROLLED_BACK,
        serde_json::json!({"from": from.version, "to": to.as_ref().map(|t| t.version.clone()), "reason": format!("load_failed: {why}")}),
    );
    to.map(|t| store.bundle_path(t.slot))
}

/// Ends a trial once the new model has served `healthy_after` (nothing
/// when no trial runs).
pub async fn confirm_after(store: SlotStore, healthy_after: Duration) {
    if !matches!(store.load(), Ok(slots::Slots { trial: Some(_), .. })) {
        return;
    }
    tokio::time::sleep(healthy_after).await;
    let mut slots = match store.load() {
        Ok(slots) => slots,
        Err(e) => return tracing::error!(error = %e, "the model slots cannot be read"),
    };
    if slots.confirm() {
        match store.save(&slots) {
            Ok(()) => tracing::info!(version = ?slots.active.map(|a| a.version), "the new model is kept"),
            Err(e) => tracing::error!(error = %e, "the model slots cannot be written"),
        }
    }
}

/// Checks now, then every poll interval or at a hint, until a model is
/// installed (then `restart` is told and the loop ends) or `stop` resolves.
pub async fn run(
    updater: Arc<Updater>,
    hint: Arc<tokio::sync::Notify>,
    restart: Arc<tokio::sync::Notify>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    tokio::pin!(stop);
    loop {
        match updater.check().await {
            Checked::Installed(version) => {
                tracing::info!(%version, "restarting into the new model");
                restart.notify_one();
                return;
            }
            Checked::Unreachable(why) => tracing::info!(reason = %why, "update check: the repository is unreachable"),
            Checked::Refused(_) | Checked::UpToDate => {}
        }
        tokio::select! {
            () = &mut stop => return,
            () = hint.notified() => tracing::info!("the fleet hints at an update: checking"),
            () = tokio::time::sleep(updater.poll_interval()) => {}
        }
    }
}
