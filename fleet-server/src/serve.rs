//! `rxfleet serve`: the whole fleet server in one process.
//!
//! It opens the database (running its migrations), starts and supervises
//! the managed broker when configured, competes for the leader lease and,
//! while it leads, runs the ingest; every replica serves the API, the
//! dashboard and `/metrics`. Replicas share nothing but the database (and
//! an external broker): any number may run, one leads.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::api::{self, AppState};
use crate::broker::{BrokerStats, Supervisor};
use crate::config::FleetConfig;
use crate::db::Db;
use crate::ingest::{self, IngestStats};
use crate::lease::{self, Fence};

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The state directory could not be made.
    #[error("state directory {path}: {source}")]
    StateDir {
        /// The directory.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The database could not be opened.
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
    /// The managed broker could not start.
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
    /// The HTTP listener could not be opened.
    #[error("http.listen {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The TLS certificate or key could not be used.
    #[error("http TLS: {0}")]
    Tls(String),
}

/// What `rxfleet serve` runs, for the command and for tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parts {
    /// Serve HTTP (the API, the dashboard, /metrics).
    pub http: bool,
}

/// Runs the fleet server until `stop` resolves.
pub async fn serve(
    config: FleetConfig,
    parts: Parts,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    std::fs::create_dir_all(&config.state_dir)
        .map_err(|source| ServeError::StateDir { path: config.state_dir.display().to_string(), source })?;
    let db = Db::open(&config.database).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        stop.await;
        let _ = stop_tx.send(true);
    });

    let broker_stats = Arc::new(BrokerStats::default());
    let broker_task = match &config.broker.managed {
        Some(managed) => {
            let supervisor = Supervisor::prepare(&config, db.clone(), broker_stats.clone()).await?;
            let child = supervisor.start().await?;
            eprintln!(
                "rxfleet: MQTT broker (managed Mosquitto, pid {}) on mqtt://{}{}",
                child.id().unwrap_or_default(),
                managed.listen,
                managed.tls.as_ref().map(|t| format!(" and mqtts://{}", t.0)).unwrap_or_default()
            );
            Some(tokio::spawn(supervisor.supervise(child, stop_rx.clone())))
        }
        None => {
            eprintln!("rxfleet: MQTT broker (external) at {}:{}", config.broker.host, config.broker.port);
            None
        }
    };
    eprintln!("rxfleet: appliances are given {}", config.broker.device_url);

    let ingest_stats = Arc::new(IngestStats::default());
    let leader = Arc::new(AtomicBool::new(false));
    // The publisher counts signed targets changes; the ingest hints devices at each.
    let (hints_tx, hints_rx) = watch::channel(0_u64);
    let replica = lease::replica_id();
    let leading = tokio::spawn(lead(
        config.clone(),
        db.clone(),
        replica.clone(),
        ingest_stats.clone(),
        leader.clone(),
        hints_rx,
        stop_rx.clone(),
    ));

    let publisher =
        tokio::spawn(publish_while_leading(config.clone(), db.clone(), leader.clone(), hints_tx, stop_rx.clone()));

    let http = if parts.http {
        let state = AppState::new(config.clone(), db.clone(), ingest_stats, broker_stats, leader, replica);
        let listener = tokio::net::TcpListener::bind(config.http.listen)
            .await
            .map_err(|source| ServeError::Listen { addr: config.http.listen, source })?;
        let addr = listener.local_addr().map_err(|source| ServeError::Listen { addr: config.http.listen, source })?;
        let scheme = if config.http.tls.is_some() { "https" } else { "http" };
        eprintln!(
            "rxfleet: dashboard {scheme}://{addr}/  API {scheme}://{addr}/api/v1/  metrics {scheme}://{addr}/metrics"
        );
        Some(api::serve_http(listener, config.http.tls.clone(), state, stop_rx.clone()).await?)
    } else {
        None
    };
    eprintln!("rxfleet: state in {}, database {}", config.state_dir.display(), redact(&config.database.url));

    let mut stop_wait = stop_rx.clone();
    let _ = stop_wait.wait_for(|s| *s).await;
    if let Some(http) = http {
        let _ = http.await;
    }
    let _ = leading.await;
    let _ = publisher.await;
    if let Some(task) = broker_task {
        let _ = task.await;
    }
    db.close().await;
    Ok(())
}

/// A database URL without its password.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or_default();
            format!("{}{user}{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// Competes for the leader lease; while this replica holds it, the ingest
/// runs (fenced by the lease's term).
async fn lead(
    config: FleetConfig,
    db: Db,
    replica: String,
    stats: Arc<IngestStats>,
    leader: Arc<AtomicBool>,
    hints: watch::Receiver<u64>,
    mut stop: watch::Receiver<bool>,
) {
    let mut running: Option<(i64, watch::Sender<bool>, JoinHandle<()>)> = None;
    let mut last_renewed = tokio::time::Instant::now();
    loop {
        let held = match db.acquire_lease(lease::LEADER, &replica, config.lease.ttl).await {
            Ok(held) => {
                if held.is_some() {
                    last_renewed = tokio::time::Instant::now();
                }
                held
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot renew the leader lease");
                // Until the lease could have expired, this replica still leads.
                running.as_ref().filter(|_| last_renewed.elapsed() < config.lease.ttl).map(|r| r.0)
            }
        };
        if let Some((term, _, task)) = &running {
            if held != Some(*term) || task.is_finished() {
                let (term, stop_ingest, task) = running.take().expect("checked above");
                if held != Some(term) {
                    tracing::warn!(term, "no longer the leader: stopping the ingest");
                }
                let _ = stop_ingest.send(true);
                let _ = task.await;
                leader.store(false, Ordering::Relaxed);
            }
        }
        if let (Some(term), None) = (held, &running) {
            tracing::info!(term, replica, "leading: starting the ingest");
            eprintln!("rxfleet: this replica leads (term {term}): ingest running");
            let fence = Fence { name: lease::LEADER.into(), holder: replica.clone(), term };
            let (stop_ingest, stop_ingest_rx) = watch::channel(false);
            let task = tokio::spawn(run_ingest(
                config.clone(),
                db.clone(),
                stats.clone(),
                fence,
                hints.clone(),
                stop_ingest_rx,
            ));
            running = Some((term, stop_ingest, task));
            leader.store(true, Ordering::Relaxed);
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            () = tokio::time::sleep(config.lease.renew) => {}
        }
    }
    if let Some((_, stop_ingest, task)) = running {
        let _ = stop_ingest.send(true);
        let _ = task.await;
        let _ = db.release_lease(lease::LEADER, &replica).await;
    }
    leader.store(false, Ordering::Relaxed);
}

/// While this replica leads: judges the active rollout every
/// `judge_interval`, and keeps the TUF repository listing what the registry
/// and the rollout want (a stage's move is signed within a publish interval),
/// and fresh.
async fn publish_while_leading(
    config: FleetConfig,
    db: Db,
    leader: Arc<AtomicBool>,
    hints: watch::Sender<u64>,
    mut stop: watch::Receiver<bool>,
) {
    let mut last_error: Option<String> = None;
    let mut judged = tokio::time::Instant::now();
    loop {
        if leader.load(Ordering::Relaxed) && judged.elapsed() >= config.updates.judge_interval {
            judged = tokio::time::Instant::now();
            match db.judge_active_rollout(crate::now_ms()).await {
                Ok(Some(decision)) => {
                    tracing::info!(stage = decision.stage, outcome = ?decision.outcome, "rollout judged")
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "cannot judge the active rollout"),
            }
            match db.judge_deploying_release(crate::now_ms()).await {
                Ok(Some(reason)) => tracing::warn!(%reason, "daemon release halted"),
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "cannot judge the deploying daemon release"),
            }
        }
        if leader.load(Ordering::Relaxed) {
            match crate::updates::publish(&config, &db).await {
                Ok(plan) => {
                    if plan.any() {
                        tracing::info!(
                            targets = plan.targets,
                            snapshot = plan.snapshot,
                            timestamp = plan.timestamp,
                            "TUF repository signed"
                        );
                    }
                    if plan.targets {
                        hints.send_modify(|n| *n += 1);
                    }
                    last_error = None;
                }
                Err(e) => {
                    // Once per distinct failure, not every tick.
                    if last_error.as_deref() != Some(e.as_str()) {
                        tracing::error!(error = %e, "cannot publish the TUF repository");
                        eprintln!("rxfleet: cannot publish the TUF repository: {e}");
                    }
                    last_error = Some(e);
                }
            }
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => break,
            () = tokio::time::sleep(config.updates.publish_interval) => {}
        }
    }
}

async fn run_ingest(
    config: FleetConfig,
    db: Db,
    stats: Arc<IngestStats>,
    fence: Fence,
    hints: watch::Receiver<u64>,
    mut stop: watch::Receiver<bool>,
) {
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    if let Err(e) = ingest::run(config, db, stats, Some(fence), hints, stopped).await {
        tracing::error!(error = %e, "the ingest could not start");
        // Retried at the next renewal: the task has finished.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn database_passwords_are_not_printed() {
        assert_eq!(super::redact("postgres://u:secret@h:5432/db"), "postgres://u@h:5432/db");
        assert_eq!(super::redact("sqlite:///x/fleet.db"), "sqlite:///x/fleet.db");
    }
}
