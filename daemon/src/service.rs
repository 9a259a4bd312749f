//! `rxvisiond run`: the appliance service.
//!
//! Assembles the parts from a validated [`Config`] — audit log (its key from
//! a file or systemd credential), model bundle and engines, frame source, API
//! key — binds the listener and serves the API until SIGTERM or Ctrl-C. On
//! shutdown it stops accepting connections, lets requests in flight finish
//! (bounded by [`DRAIN_LIMIT`]), flushes the audit log and returns. Nothing
//! here needs the network beyond the local listener.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::api::{router, AppState};
use crate::audit::{AuditLog, KeyRing};
use crate::camera::{DirSource, FrameSource, SyntheticSource};
use crate::classify::Classifier;
use crate::config::{CameraConfig, Config};
use crate::scan::Scanner;
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
    let scanner = Scanner::new(Arc::new(classifier), Arc::new(audit));
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
        on_listening(addr);
        tracing::info!(%addr, "serving the local API");
        let app = router(state.clone(), config.api.max_body_bytes);
        tokio::spawn(enforce_retention(state.clone(), config.audit.retention));
        let shutting_down = state.clone();
        let server = axum::serve(listener, app).with_graceful_shutdown(async move {
            shutdown_signal().await;
            shutting_down.shutting_down.store(true, Ordering::Release);
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
    // Every acknowledged record was flushed when it was written; this makes
    // sure nothing else (feedback in the last instant) is left in memory.
    let (next_seq, _) = state.scanner.audit().head();
    tracing::info!(records = next_seq, "audit log closed");
    Ok(())
}

/// How often the retention policy is applied (and once at start).
pub const RETENTION_INTERVAL: Duration = Duration::from_secs(6 * 3600);

/// Prunes audit records older than `retention`, now and every
/// [`RETENTION_INTERVAL`]; each pruning leaves a signed checkpoint and an
/// audit record of its own. A failure is logged as an error (a person must
/// look: the store may be damaged) and retried next time.
async fn enforce_retention(state: Arc<AppState>, retention: Duration) {
    let mut ticks = tokio::time::interval(RETENTION_INTERVAL);
    loop {
        ticks.tick().await;
        let state = state.clone();
        let outcome = tokio::task::spawn_blocking(move || {
            let now_ms =
                std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
            let cutoff = now_ms.saturating_sub(retention.as_millis() as u64);
            state.scanner.audit().prune(cutoff, "retention-policy")
        })
        .await;
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
