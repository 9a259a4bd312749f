//! `rxvisiond run`: the appliance service.
//!
//! [`assemble`] builds the parts from a validated [`Config`] — audit log
//! (its key from a file or systemd credential, its chain-head anchor in the
//! state directory), model bundle and engines, frame source, API key, image
//! limits. [`serve`] serves the API on a listener the caller bound until a
//! shutdown future resolves or the audit store is lost; every background
//! task (control socket, retention, the audit watch) stops with it, so the
//! service runs in-process in tests and later tasks plug in the same way.
//! [`run`] is the command: runtime, bind, control socket, SIGTERM / Ctrl-C,
//! [`serve`]. On shutdown it stops accepting connections, lets requests in
//! flight finish (bounded by [`DRAIN_LIMIT`]) and returns. Nothing here
//! needs the network beyond the local listener.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::api::{router, ApiLimits, AppState, UpdatesHandle};
use crate::audit::{now_ms, AuditError, AuditLog, AuditOptions, KeyError, KeyRing, StoreHealth};
use crate::camera::{DirSource, FrameSource, LiveCamera, SyntheticSource};
use crate::config::{CameraConfig, Config};
use crate::control;
use crate::outbox::{MessageKind, Outbox, OutboxError};
use crate::scan::Scanner;
use crate::telemetry::{stored_event, TelemetryService};
use crate::updates::slots::SlotStore;
use rxvision_counter::analysis::CounterPath;
use rxvision_counter::size::SizeCue;
use rxvision_models::classify::{Classifier, ClassifyError};

/// How long requests in flight may take to finish after SIGTERM.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// How often the service looks at the audit store's health.
const AUDIT_WATCH: Duration = Duration::from_millis(250);

/// The chain-head anchor's file in the state directory.
pub fn anchor_path(state_dir: &Path) -> PathBuf {
    state_dir.join("audit-anchor")
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The audit key could not be loaded.
    #[error("audit key: {0}")]
    AuditKey(#[from] KeyError),
    /// The audit store could not be opened, or was refused.
    #[error("audit log: {0}")]
    Audit(#[from] AuditError),
    /// The model bundle or its engines.
    #[error("model: {0}")]
    Model(#[from] ClassifyError),
    /// The camera could not be set up.
    #[error("camera: {0}")]
    Camera(String),
    /// The telemetry outbox could not be opened.
    #[error("telemetry: {0}")]
    Outbox(#[from] OutboxError),
    /// A key named by the configuration cannot be used.
    #[error("{0}")]
    Key(String),
    /// The listener or the async runtime.
    #[error("{what}: {source}")]
    Io {
        /// What was being set up.
        what: &'static str,
        /// The cause.
        source: std::io::Error,
    },
}

impl StartError {
    /// The process exit code (see `main.rs`): 65 bad bundle, 66 audit store
    /// refused (an operator must act), 69 engine unavailable, else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            StartError::Model(e) => e.exit_code(),
            StartError::Audit(AuditError::Refused { .. }) => 66,
            _ => 1,
        }
    }
}

/// Why a running service stopped other than by a signal.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The audit store failed and could not be reopened: exit non-zero so
    /// that systemd restarts the service on a fresh store handle.
    #[error("the audit store is lost: {0}")]
    AuditLost(String),
    /// The listener failed.
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
}

impl ServeError {
    /// The process exit code: 74 (I/O error) for a lost store, else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            ServeError::AuditLost(_) => 74,
            ServeError::Io(_) => 1,
        }
    }
}

/// The audit options the service opens its store with.
pub fn audit_options(config: &Config) -> AuditOptions {
    AuditOptions {
        create: true,
        anchor: Some(anchor_path(&config.state_dir)),
        accept: None,
        retention_floor: config.audit.retention,
        ..AuditOptions::default()
    }
}

/// Builds the service's state from `config`.
pub fn assemble(config: &Config) -> Result<AppState, StartError> {
    let key_path = config.audit.key_path().map_err(StartError::Key)?;
    let keys = KeyRing::load(&key_path, &config.audit.previous_key_files)?;
    let audit = AuditLog::open_with(&config.audit.dir, keys, audit_options(config))?;
    let roots: Vec<PathBuf> = config.bundle_dirs.clone();
    // An installed model (A/B slot) runs in place of the configured one.
    let slot_store = SlotStore::new(&config.state_dir.join("models"));
    let max_starts = config.updates.as_ref().map_or(3, |u| u.max_starts);
    let classifier = match crate::updates::choose_at_start(&slot_store, max_starts, &audit) {
        Some(installed) => match Classifier::open(Some(&installed), &roots, config.engine) {
            Ok(classifier) => classifier,
            Err(e) => {
                tracing::error!(bundle = %installed.display(), error = %e, "the installed model does not load: going back");
                let previous = crate::updates::roll_back_after_load_failure(&slot_store, &audit, &e.to_string());
                Classifier::open(previous.as_deref().or(config.bundle.as_deref()), &roots, config.engine)?
            }
        },
        None => Classifier::open(config.bundle.as_deref(), &roots, config.engine)?,
    };
    tracing::info!(model = %classifier.bundle(), engine = %classifier.engines().choice(), "model ready");
    let camera: Option<Box<dyn FrameSource>> = match &config.camera {
        CameraConfig::None => None,
        CameraConfig::V4l2 { device, format, resolution } => {
            Some(Box::new(LiveCamera::v4l2(device, *format, *resolution)))
        }
        CameraConfig::Dir { dir, looping } => Some(Box::new(DirSource::new(dir, *looping))),
        CameraConfig::Synthetic { formulary, products, seed, resolution: [w, h] } => Some(Box::new(
            SyntheticSource::new(formulary, products, *seed, *w as usize, *h as usize).map_err(StartError::Camera)?,
        )),
    };
    let api_key = config.api.load_key().map_err(StartError::Key)?;
    let formulary = match rxvision_synth::load_formulary(&config.formulary) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(error = %e, "no formulary: the counter page shows no reference pictures");
            None
        }
    };
    let classifier = Arc::new(classifier);
    let mut path = CounterPath::new(classifier.clone()).with_image_limits(config.images);
    match (config.px_per_mm, &formulary) {
        (Some(scale), Some(formulary)) => {
            let cue = SizeCue::from_formulary(scale, &path.classifier().bundle().labels, formulary);
            tracing::info!(px_per_mm = scale, classes_with_size = cue.known(), "size cue on");
            path = path.with_size_cue(cue);
        }
        (None, _) => tracing::info!("size cue off: camera.px_per_mm is not set"),
        (Some(_), None) => tracing::warn!("size cue off: no formulary to take product sizes from"),
    }
    let scanner = Scanner::with_path(path, Arc::new(audit));
    let limits = ApiLimits {
        max_body_bytes: config.api.max_body_bytes,
        max_concurrent_scans: config.api.max_concurrent_scans,
        request_timeout: config.api.request_timeout,
    };
    let healthy_after = config.updates.as_ref().map_or(Duration::from_secs(120), |u| u.healthy_after);
    let release_store = crate::updates::release::store(&config.state_dir);
    crate::updates::release::report_pending(&release_store, scanner.audit());
    let mut state = AppState::new(scanner, camera, api_key, config.device_id.clone(), formulary, limits)
        .with_slots(vec![slot_store, release_store], healthy_after);
    if let Some(updates) = &config.updates {
        let appliance = crate::updates::Appliance {
            device_id: config.device_id.clone(),
            state_dir: config.state_dir.clone(),
            engine: config.engine,
            model_version: classifier.bundle().manifest.version.to_string(),
            model_bundle: classifier.bundle().source.clone(),
            daemon_version: crate::daemon_version().to_string(),
            config_file: config.file.clone(),
        };
        let updater = crate::updates::Updater::new(updates.clone(), appliance, state.scanner.shared_audit());
        state = state
            .with_updates(UpdatesHandle { updater: Arc::new(updater), hint: Arc::new(tokio::sync::Notify::new()) });
    }
    if !config.telemetry.enabled {
        return Ok(state);
    }
    let outbox = Outbox::open(&config.state_dir.join("outbox"), config.telemetry.max_in_flight)?;
    tracing::info!(depth = outbox.depth().0, "telemetry on: windows go to the outbox");
    let details = serde_json::json!({
        "daemon_version": crate::daemon_version(),
        "model": classifier.bundle().manifest.name,
        "model_version": classifier.bundle().manifest.version.to_string(),
        "engine": classifier.engines().choice().to_string(),
    });
    let started = rxvision_protocol::Event {
        v: rxvision_protocol::PROTOCOL_VERSION,
        device_id: config.device_id.clone(),
        seq: 0,
        time_ms: now_ms(),
        kind: rxvision_protocol::EventKind::DaemonStarted,
        details: details.as_object().cloned().unwrap_or_default(),
    };
    outbox.push(MessageKind::Event, started.time_ms, &stored_event(&started))?;
    let telemetry = TelemetryService::new(
        &config.device_id,
        config.telemetry.window,
        config.telemetry.outbox_budget_bytes,
        Arc::new(outbox),
        state.scanner.shared_audit(),
        classifier,
    );
    let telemetry = match &config.telemetry.broker {
        Some(broker) => telemetry.with_link(broker.load().map_err(StartError::Key)?),
        None => telemetry,
    };
    Ok(state.with_telemetry(telemetry))
}

/// What [`serve`] needs besides the API's listener and the state.
#[derive(Debug)]
pub struct ServeOptions {
    /// The control socket, bound (see [`control::bind`]), and the file to
    /// remove on the way out; `None`: no control socket.
    pub control: Option<(tokio::net::UnixListener, PathBuf)>,
    /// The audit retention period.
    pub retention: Duration,
}

/// Serves the API on `listener` until `shutdown` resolves or the audit
/// store is lost. Every background task (control socket, retention, the
/// audit watch) stops with it. On the way out, scans in flight may finish
/// (bounded by [`DRAIN_LIMIT`]).
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    options: ServeOptions,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    let (stop_tx, stop) = watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let stop_windows = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let windows = state.telemetry.as_ref().and_then(|t| t.start(stop_windows.clone()));
    let hint = state.updates.as_ref().map_or_else(|| Arc::new(tokio::sync::Notify::new()), |u| u.hint.clone());
    if let Some(telemetry) = &state.telemetry {
        if let Some(link) = telemetry.link.clone() {
            let for_status = state.clone();
            tasks.spawn(crate::link::run(
                link,
                state.device_id.clone(),
                telemetry.outbox.clone(),
                telemetry.link_state.clone(),
                move || for_status.device_status(),
                hint.clone(),
                stopped(stop.clone()),
            ));
        }
    }
    if let Some(updates) = &state.updates {
        let (updater, restart) = (updates.updater.clone(), state.restart.clone());
        tasks.spawn(crate::updates::run(updater, hint, restart, stopped(stop.clone())));
    }
    if let Some((stores, healthy_after)) = &state.slots {
        for store in stores {
            tasks.spawn(crate::updates::confirm_after(store.clone(), *healthy_after));
        }
    }
    let control_file = options.control.as_ref().map(|(_, path)| path.clone());
    if let Some((listener, _)) = options.control {
        let audit = state.scanner.shared_audit();
        let stop = stopped(stop.clone());
        tasks.spawn(async move {
            if let Err(e) = control::serve(listener, audit, stop).await {
                tracing::error!(error = %e, "control socket failed");
            }
        });
    }
    tasks.spawn(enforce_retention(state.scanner.shared_audit(), options.retention, now_ms, stopped(stop.clone())));
    let lost = Arc::new(std::sync::Mutex::new(None::<String>));
    let audit = state.scanner.shared_audit();
    let lost_reason = lost.clone();
    let audit_lost = async move {
        let mut ticks = tokio::time::interval(AUDIT_WATCH);
        loop {
            ticks.tick().await;
            if let StoreHealth::Lost { error } = audit.health() {
                tracing::error!(error = %error, "the audit store is lost; stopping so that the service is restarted");
                *lost_reason.lock().unwrap_or_else(|p| p.into_inner()) = Some(error);
                return;
            }
        }
    };
    let shutting_down = state.clone();
    let restart = state.restart.clone();
    let app = router(state.clone());
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        tokio::select! {
            () = shutdown => tracing::info!("shutting down: finishing requests in flight"),
            () = audit_lost => {}
            () = restart.notified() => {
                tracing::info!("a new model was installed: finishing requests in flight, then restarting");
                shutting_down.restart_requested.store(true, Ordering::Release);
            }
        }
        shutting_down.shutting_down.store(true, Ordering::Release);
        let _ = stop_tx.send(true);
    });
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let mut stop_for_drain = stop.clone();
    let serving = tokio::spawn(async move {
        let result = server.await;
        let _ = done_tx.send(());
        result
    });
    // Once the signal arrived, bound the drain.
    tokio::select! {
        _ = done_rx => {}
        _ = stop_for_drain.wait_for(|stopped| *stopped) => {}
    }
    let result = match tokio::time::timeout(DRAIN_LIMIT, serving).await {
        Ok(Ok(result)) => result.map_err(ServeError::from),
        Ok(Err(e)) => {
            tracing::error!(error = %e, "server task failed");
            Ok(())
        }
        Err(_) => {
            tracing::warn!("requests still in flight after {DRAIN_LIMIT:?}; exiting anyway");
            Ok(())
        }
    };
    tasks.abort_all();
    if let Some(worker) = windows {
        // The window in progress goes to the outbox before the process ends.
        stop_windows.store(true, Ordering::Release);
        let _ = tokio::task::spawn_blocking(move || worker.join()).await;
    }
    while tasks.join_next().await.is_some() {}
    if let Some(path) = control_file {
        let _ = std::fs::remove_file(path);
    }
    let (next_seq, _) = state.scanner.audit().head();
    tracing::info!(records = next_seq, "audit log closed");
    let lost = lost.lock().unwrap_or_else(|p| p.into_inner()).take();
    match lost {
        Some(error) => Err(ServeError::AuditLost(error)),
        None => result,
    }
}

/// Resolves once `stop` turns true (or its sender is gone).
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// Why `rxvisiond run` ended.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// It could not start.
    #[error("cannot start: {0}")]
    Start(#[from] StartError),
    /// It stopped on a failure.
    #[error("{0}")]
    Serve(#[from] ServeError),
}

impl RunError {
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        match self {
            RunError::Start(e) => e.exit_code(),
            RunError::Serve(e) => e.exit_code(),
        }
    }
}

/// `rxvisiond run`: assembles the service from `config`, binds its address
/// and serves until SIGTERM or Ctrl-C. `on_listening` is told the bound
/// address (useful with port 0).
pub fn run(config: Config, on_listening: impl FnOnce(SocketAddr)) -> Result<Stopped, RunError> {
    let state = Arc::new(assemble(&config)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|source| StartError::Io { what: "async runtime", source })?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.api.listen)
            .await
            .map_err(|source| StartError::Io { what: "listen", source })?;
        let addr = listener.local_addr().map_err(|source| StartError::Io { what: "listen", source })?;
        let control = bind_control_socket(&config.state_dir);
        on_listening(addr);
        tracing::info!(%addr, "serving the local API");
        let options = ServeOptions { control, retention: config.audit.retention };
        serve(listener, state.clone(), options, shutdown_signal()).await?;
        Ok(if state.restart_requested.load(Ordering::Acquire) { Stopped::Restart } else { Stopped::Signal })
    })
}

/// Why `rxvisiond run` returned without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// SIGTERM or Ctrl-C.
    Signal,
    /// A new model was installed: the process must start again (`main`
    /// executes itself anew once everything is closed).
    Restart,
}

/// Binds the control socket (`audit` commands while the daemon holds the
/// store). A socket that cannot be bound is logged, not fatal: the counter
/// keeps verifying, and the `audit` commands say the store is in use.
fn bind_control_socket(state_dir: &Path) -> Option<(tokio::net::UnixListener, PathBuf)> {
    let path = control::socket_path(state_dir);
    match control::bind(state_dir) {
        Ok(listener) => Some((listener, path)),
        Err(e) => {
            tracing::error!(error = %e, socket = %path.display(), "no control socket: `rxvisiond audit` cannot reach this daemon");
            None
        }
    }
}

/// How often the retention policy is applied (and once at start).
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(6 * 3600);

/// Prunes audit records older than `retention`, now and every
/// [`RETENTION_INTERVAL`], until `stop` resolves; each pruning leaves a
/// signed checkpoint and an audit record of its own. The cut-off is the
/// earlier of "`retention` before the wall clock" and "`retention` before
/// the newest record", so a clock set years ahead removes nothing the log
/// itself does not show to be old. A failure is logged as an error (a person
/// must look: the store may be damaged) and retried next time. `now_ms` is
/// the wall clock (Unix milliseconds), a parameter so a test can move it.
async fn enforce_retention(
    audit: Arc<AuditLog>,
    retention: Duration,
    now_ms: fn() -> u64,
    stop: impl Future<Output = ()> + Send + 'static,
) {
    let prune_loop = async move {
        let mut ticks = tokio::time::interval(RETENTION_INTERVAL);
        loop {
            ticks.tick().await;
            let audit = audit.clone();
            let by_clock = now_ms().saturating_sub(retention.as_millis() as u64);
            let by_log = audit.newest_time_ms().saturating_sub(retention.as_millis() as u64);
            let cutoff = by_clock.min(by_log);
            if cutoff == 0 {
                continue;
            }
            let outcome = tokio::task::spawn_blocking(move || audit.prune(cutoff, "retention-policy")).await;
            match outcome {
                Ok(Ok(summary)) if summary.removed > 0 => {
                    tracing::info!(removed = summary.removed, audit_seq = ?summary.audit_seq, "audit retention applied")
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::error!(error = %e, "audit retention failed"),
                Err(e) => tracing::error!(error = %e, "audit retention task failed"),
            }
        }
    };
    tokio::select! {
        () = prune_loop => {}
        () = stop => {}
    }
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the service");
                let _ = ctrl_c.await;
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{AuditEvent, AuditKey, RecordKind};
    use std::sync::atomic::AtomicU64;

    /// The test's wall clock: real time plus however far the test moved it.
    static SHIFT_MS: AtomicU64 = AtomicU64::new(0);
    fn shifted_clock() -> u64 {
        now_ms() + SHIFT_MS.load(Ordering::SeqCst)
    }

    #[tokio::test(start_paused = true)]
    async fn retention_runs_at_start_and_every_six_hours() {
        let dir = tempfile::tempdir().unwrap();
        let retention = Duration::from_secs(30 * 86_400);
        let options =
            AuditOptions { retention_floor: retention, clock: Arc::new(shifted_clock), ..AuditOptions::default() };
        let audit =
            Arc::new(AuditLog::open_with(dir.path(), KeyRing::new(AuditKey::from_master(&[7; 32])), options).unwrap());
        for _ in 0..3 {
            audit.append(AuditEvent::new(RecordKind::Verification)).unwrap();
        }
        let (stop_tx, stop) = watch::channel(false);
        let task = tokio::spawn(enforce_retention(audit.clone(), retention, shifted_clock, stopped(stop)));
        // Let the tick at start run (and its blocking pruning finish).
        let settle = || async {
            for _ in 0..50 {
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        settle().await;
        assert_eq!(audit.head().0, 3, "nothing is old at start: no pruning, no record");

        // A month and a day later (wall clock) the clock alone prunes nothing:
        // the newest record is still young.
        SHIFT_MS.store((retention + Duration::from_secs(86_400)).as_millis() as u64, Ordering::SeqCst);
        tokio::time::advance(RETENTION_INTERVAL).await;
        settle().await;
        assert_eq!(audit.head().0, 3, "a clock that moved on alone prunes nothing");

        // Once a record is written a month and a day after the first three, they are old.
        audit.append(AuditEvent::new(RecordKind::Verification)).unwrap();
        tokio::time::advance(RETENTION_INTERVAL - Duration::from_secs(1)).await;
        settle().await;
        assert_eq!(audit.head().0, 4, "not before the interval has passed");
        tokio::time::advance(Duration::from_secs(1)).await;
        settle().await;
        let report = audit.verify().unwrap();
        assert_eq!(report.pruned, 3, "{report:?}");
        assert!(report.tamper.is_none(), "{report:?}");
        assert_eq!(audit.head().0, 5, "the pruning is itself recorded");

        stop_tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), task).await.expect("the task stops on the signal").unwrap();
    }
}
