//! `rxvisiond run`: the appliance service.
//!
//! Assembles the parts from a validated [`Config`] — audit log (its key from
//! a file or systemd credential), model bundle and engines, frame source, API
//! key — binds the listener and serves the API until SIGTERM or Ctrl-C. On
//! shutdown it stops accepting connections, lets requests in flight finish
//! (bounded by [`DRAIN_LIMIT`]), flushes the audit log and returns. Nothing
//! here needs the network beyond the local listener.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::api::{router, AppState};
use crate::audit::{AuditLog, KeyRing};
use crate::camera::{DirSource, FrameSource, LiveCamera, SyntheticSource};
use crate::classify::Classifier;
use crate::config::{CameraConfig, Config};
use crate::control;
use crate::counter::size::SizeCue;
use crate::scan::{CounterPath, Scanner};
use rxvision_models::synth::formulary::Formulary;

/// How long requests in flight may take to finish after SIGTERM.
pub const DRAIN_LIMIT: Duration = Duration::from_secs(10);

/// Why the service could not start (each maps to a clear message and exit code).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Keys, store, bundle or listener could not be set up.
    #[error("{0}")]
    Setup(String),
}

fn setup<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> StartError + '_ {
    move |e| StartError::Setup(format!("{what}: {e}"))
}

/// Builds the service's state from `config`.
pub fn assemble(config: &Config) -> Result<AppState, StartError> {
    let key_path = config.audit.key_path().map_err(StartError::Setup)?;
    let keys = KeyRing::load(&key_path, &config.audit.previous_key_files).map_err(setup("audit key"))?;
    let audit = AuditLog::open(&config.audit.dir, keys).map_err(setup("audit log"))?;
    let roots: Vec<PathBuf> = config.bundle_dirs.clone();
    let classifier = Classifier::open(config.bundle.as_deref(), &roots, config.engine).map_err(setup("model"))?;
    tracing::info!(model = %classifier.bundle(), engine = %classifier.engines().choice(), "model ready");
    let camera: Option<Box<dyn FrameSource>> = match &config.camera {
        CameraConfig::None => None,
        CameraConfig::V4l2 { device, format, resolution } => {
            Some(Box::new(LiveCamera::v4l2(device, *format, *resolution)))
        }
        CameraConfig::Dir { dir, looping } => Some(Box::new(DirSource::new(dir, *looping))),
        CameraConfig::Synthetic { formulary, products, seed, resolution: [w, h] } => Some(Box::new(
            SyntheticSource::new(formulary, products, *seed, *w as usize, *h as usize).map_err(setup("camera"))?,
        )),
    };
    let api_key = config.api.load_key().map_err(StartError::Setup)?;
    let formulary = match Formulary::load(&config.formulary) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(error = %e, "no formulary: the counter page shows no reference pictures");
            None
        }
    };
    let mut path = CounterPath::new(Arc::new(classifier));
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
    Ok(AppState::new(scanner, camera, api_key, config.device_id.clone(), formulary))
}

/// Runs the service until SIGTERM or Ctrl-C. `on_listening` is told the bound
/// address (useful with port 0).
pub fn run(config: Config, on_listening: impl FnOnce(SocketAddr)) -> Result<(), StartError> {
    let state = Arc::new(assemble(&config)?);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(setup("async runtime"))?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.api.listen).await.map_err(setup("listen"))?;
        let addr = listener.local_addr().map_err(setup("listen"))?;
        let (stop_control, control_stopped) = tokio::sync::oneshot::channel::<()>();
        start_control_socket(&config.state_dir, &state, control_stopped);
        on_listening(addr);
        tracing::info!(%addr, "serving the local API");
        let app = router(state.clone(), config.api.max_body_bytes);
        tokio::spawn(enforce_retention(state.scanner.shared_audit(), config.audit.retention, wall_clock_ms));
        let shutting_down = state.clone();
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            shutdown_signal().await;
            shutting_down.shutting_down.store(true, Ordering::Release);
            let _ = stop_control.send(());
            tracing::info!("shutting down: finishing requests in flight");
        });
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        let serving = tokio::spawn(async move {
            let result = server.await;
            let _ = done_tx.send(());
            result
        });
        // Once the signal arrived, bound the drain.
        let _ = done_rx.await;
        match tokio::time::timeout(DRAIN_LIMIT, serving).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "server error"),
            Ok(Err(e)) => tracing::error!(error = %e, "server task failed"),
            Err(_) => tracing::warn!("requests still in flight after {DRAIN_LIMIT:?}; exiting anyway"),
        }
        Ok::<(), StartError>(())
    })?;
    let _ = std::fs::remove_file(control::socket_path(&config.state_dir));
    // Every acknowledged record was flushed when it was written; this makes
    // sure nothing else (feedback in the last instant) is left in memory.
    let (next_seq, _) = state.scanner.audit().head();
    tracing::info!(records = next_seq, "audit log closed");
    Ok(())
}

/// Serves the control socket (`audit` commands while the daemon holds the
/// store) until `stop` fires. A socket that cannot be bound is logged, not
/// fatal: the counter keeps verifying, and the `audit` commands say the
/// store is in use.
fn start_control_socket(state_dir: &Path, state: &AppState, stop: tokio::sync::oneshot::Receiver<()>) {
    let listener = match control::bind(state_dir) {
        Ok(listener) => listener,
        Err(e) => {
            tracing::error!(
                error = %e, socket = %control::socket_path(state_dir).display(),
                "no control socket: `rxvisiond audit` cannot reach this daemon"
            );
            return;
        }
    };
    let audit = state.scanner.shared_audit();
    tokio::spawn(async move {
        if let Err(e) = control::serve(listener, audit, async move {
            let _ = stop.await;
        })
        .await
        {
            tracing::error!(error = %e, "control socket failed");
        }
    });
}

/// How often the retention policy is applied (and once at start).
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(6 * 3600);

/// Prunes audit records older than `retention`, now and every
/// [`RETENTION_INTERVAL`]; each pruning leaves a signed checkpoint and an
/// audit record of its own. A failure is logged as an error (a person must
/// look: the store may be damaged) and retried next time. `now_ms` is the
/// wall clock (Unix milliseconds), a parameter so a test can move it.
async fn enforce_retention(audit: Arc<AuditLog>, retention: Duration, now_ms: fn() -> u64) {
    let mut ticks = tokio::time::interval(RETENTION_INTERVAL);
    loop {
        ticks.tick().await;
        let audit = audit.clone();
        let cutoff = now_ms().saturating_sub(retention.as_millis() as u64);
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
}

fn wall_clock_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
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
        wall_clock_ms() + SHIFT_MS.load(Ordering::SeqCst)
    }

    #[tokio::test(start_paused = true)]
    async fn retention_runs_at_start_and_every_six_hours() {
        let dir = tempfile::tempdir().unwrap();
        let audit = Arc::new(AuditLog::open(dir.path(), KeyRing::new(AuditKey::from_master(&[7; 32]))).unwrap());
        for _ in 0..3 {
            audit.append(AuditEvent::new(RecordKind::Verification)).unwrap();
        }
        let retention = Duration::from_secs(30 * 86_400);
        let task = tokio::spawn(enforce_retention(audit.clone(), retention, shifted_clock));
        // Let the tick at start run (and its blocking pruning finish).
        let settle = || async {
            for _ in 0..50 {
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        settle().await;
        assert_eq!(audit.head().0, 3, "nothing is old at start: no pruning, no record");

        // A month and a day later (wall clock), the next 6-hourly tick prunes.
        SHIFT_MS.store((retention + Duration::from_secs(86_400)).as_millis() as u64, Ordering::SeqCst);
        tokio::time::advance(RETENTION_INTERVAL - Duration::from_secs(1)).await;
        settle().await;
        assert_eq!(audit.head().0, 3, "not before the interval has passed");
        tokio::time::advance(Duration::from_secs(1)).await;
        settle().await;
        let report = audit.verify().unwrap();
        assert_eq!(report.pruned, 3, "{report:?}");
        assert!(report.tamper.is_none(), "{report:?}");
        assert_eq!(audit.head().0, 4, "the pruning is itself recorded");
        task.abort();
    }
}
