//! The ingest: every device's status, telemetry and events from the broker
//! into the fleet's database, and the end-to-end `ack` back.
//!
//! One MQTT session (a fixed client id, `clean_session = false`, manual
//! PUBACKs): the broker keeps what arrives while the ingest is away, and a
//! message is PUBACKed only after the transaction holding it committed, so
//! neither a crash of the ingest nor a database outage loses one. Messages
//! are taken in batches ([`crate::config::IngestConfig`]); each batch is
//! classified (bad payloads are counted by device, channel and reason, logged
//! with the device id, and dropped), committed in one transaction
//! ([`Db::commit`]), and then every device that sent numbered messages gets
//! an `ack` of its highest contiguous committed `seq`, replays included (the
//! device may have missed the last ack). A failed commit is retried with
//! backoff, holding the batch and its PUBACKs; the broker's in-flight limit
//! stops the flow meanwhile.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, Publish, QoS, TlsConfiguration, Transport};
use rxvision_protocol::topic::{self, Channel};
use rxvision_protocol::{encode, Ack, PROTOCOL_VERSION};
use tokio::sync::mpsc;

use crate::classify::{classify, Incoming, Rejected};
use crate::config::FleetConfig;
use crate::db::{Committed, Db, DbError};
use crate::lease::Fence;

/// The largest MQTT packet the ingest reads. Above the broker's own limit
/// (`packaging/mosquitto/rxvision.conf`: 300,000 bytes), so whatever the
/// broker lets through reaches the classifier and is counted, never a
/// client error that would make the broker redeliver it for ever.
pub const MAX_PACKET: usize = 1 << 20;

/// Counters since start (logged, and for tests and metrics).
#[derive(Debug, Default)]
pub struct IngestStats {
    /// Messages stored.
    pub stored: AtomicU64,
    /// Replays of stored messages.
    pub duplicates: AtomicU64,
    /// Statuses applied.
    pub statuses: AtomicU64,
    /// Payloads refused.
    pub rejected: AtomicU64,
    /// Batches committed.
    pub batches: AtomicU64,
    /// Commits that failed (and were retried).
    pub commit_failures: AtomicU64,
}

/// Why the ingest could not start.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// The broker password or CA could not be read.
    #[error("broker credentials: {0}")]
    Credentials(String),
}

fn mqtt_options(config: &FleetConfig) -> Result<MqttOptions, IngestError> {
    let broker = &config.broker;
    let mut options = MqttOptions::new(broker.client_id.clone(), broker.host.clone(), broker.port);
    if let Some(password) = broker.password.read().map_err(IngestError::Credentials)? {
        options.set_credentials(broker.username.clone(), password);
    }
    options.set_keep_alive(Duration::from_secs(30));
    options.set_clean_session(false);
    options.set_manual_acks(true);
    options.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    options.set_inflight(1000);
    if broker.tls {
        let ca_file = broker.ca_file.as_ref().expect("a checked configuration names a CA for mqtts");
        let ca = std::fs::read(ca_file)
            .map_err(|e| IngestError::Credentials(format!("CA file {}: {e}", ca_file.display())))?;
        options.set_transport(Transport::Tls(TlsConfiguration::Simple { ca, alpn: None, client_auth: None }));
    }
    Ok(options)
}

/// Runs the ingest until `stop` resolves: the batch in hand is committed
/// (or left to the broker's redelivery) first. When `hints` changes (the
/// signed targets changed), every live device gets a retained `desired`
/// hint to refresh its update metadata now.
///
/// With a `fence`, every commit first checks that this replica still holds
/// the leader lease; when it does not, the ingest stops with the batch
/// uncommitted (the broker redelivers it to the new leader).
pub async fn run(
    config: FleetConfig,
    db: Db,
    stats: Arc<IngestStats>,
    fence: Option<Fence>,
    mut hints: tokio::sync::watch::Receiver<u64>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), IngestError> {
    let options = mqtt_options(&config)?;
    let (client, mut events) = AsyncClient::new(options, 20_000);
    // Unbounded, so the poller never waits on the committer: while it polls,
    // the broker's PUBACKs for our acks free the client's in-flight window
    // and the committer's requests drain. With a bounded channel the two
    // waited on each other under load (the committer on the full request
    // queue, the poller on the full batch channel) and the ingest stopped.
    // What arrives is bounded by the broker's in-flight window for this
    // session (unacknowledged messages: max_inflight_messages).
    let (batches_tx, mut batches_rx) = mpsc::unbounded_channel::<Publish>();
    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        stop.await;
        let _ = stop_tx.send(true);
    });

    let poller_client = client.clone();
    let mut poller_stop = stop_rx.clone();
    let broker = format!("{}:{}", config.broker.host, config.broker.port);
    let poller = tokio::spawn(async move {
        let mut delay = Duration::from_millis(250);
        loop {
            let event = tokio::select! {
                _ = poller_stop.changed() => return,
                event = events.poll() => event,
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    tracing::info!(%broker, "ingest connected to the broker");
                    delay = Duration::from_millis(250);
                    for channel in [Channel::Status, Channel::Telemetry, Channel::Events] {
                        let _ = poller_client.try_subscribe(topic::all_devices(channel), QoS::AtLeastOnce);
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    if batches_tx.send(publish).is_err() {
                        return;
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) {
                        tracing::error!("the broker refused a subscription: check the ingest account's ACL");
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, %broker, "broker connection lost; retrying in {delay:?}");
                    tokio::select! {
                        _ = poller_stop.changed() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    });

    let mut last_report = tokio::time::Instant::now();
    // Where the time of the last report period went: waiting for messages,
    // committing, handing acks and PUBACKs to the client.
    let (mut waiting, mut committing, mut acking) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let (mut batches, mut messages) = (0_u64, 0_u64);
    loop {
        let wait_started = tokio::time::Instant::now();
        let first = tokio::select! {
            _ = stop_rx.changed() => break,
            first = batches_rx.recv() => match first { Some(p) => p, None => break },
            changed = hints.changed() => {
                if changed.is_ok() {
                    hint_devices(&client, &db).await;
                }
                continue;
            }
        };
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + config.ingest.batch_wait;
        while batch.len() < config.ingest.batch_max {
            match tokio::time::timeout_at(deadline, batches_rx.recv()).await {
                Ok(Some(p)) => batch.push(p),
                _ => break,
            }
        }
        let commit_started = tokio::time::Instant::now();
        waiting += commit_started - wait_started;
        let (accepted, rejected) = classify_batch(&batch);
        let Some(committed) = commit_with_retry(&db, fence.as_ref(), &accepted, &rejected, &stats, &mut stop_rx).await
        else {
            break; // stopping with the batch uncommitted: the broker redelivers it
        };
        record(&stats, &committed);
        let ack_started = tokio::time::Instant::now();
        committing += ack_started - commit_started;
        for (device, seq) in &committed.acks {
            let ack = Ack { v: PROTOCOL_VERSION, device_id: device.clone(), seq: *seq };
            if let (Ok(name), Ok(payload)) = (topic::topic(device, Channel::Ack), encode(&ack)) {
                let _ = client.publish(name, QoS::AtLeastOnce, false, payload).await;
            }
        }
        for publish in &batch {
            let _ = client.ack(publish).await;
        }
        acking += ack_started.elapsed();
        batches += 1;
        messages += batch.len() as u64;
        if last_report.elapsed() >= Duration::from_secs(60) {
            last_report = tokio::time::Instant::now();
            tracing::info!(
                stored = stats.stored.load(Ordering::Relaxed),
                duplicates = stats.duplicates.load(Ordering::Relaxed),
                rejected = stats.rejected.load(Ordering::Relaxed),
                batches,
                messages,
                waiting_ms = waiting.as_millis(),
                committing_ms = committing.as_millis(),
                acking_ms = acking.as_millis(),
                "ingest totals (the last three: time of the last period)"
            );
            (waiting, committing, acking) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
            (batches, messages) = (0, 0);
        }
    }
    // Let the last acks and PUBACKs go out, then leave the session to the broker.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), poller).await;
    Ok(())
}

fn classify_batch(batch: &[Publish]) -> (Vec<Incoming>, Vec<Rejected>) {
    let mut accepted = Vec::with_capacity(batch.len());
    let mut rejected = Vec::new();
    for publish in batch {
        match classify(&publish.topic, &publish.payload) {
            Ok(message) => accepted.push(message),
            Err(refusal) => {
                tracing::warn!(
                    device = %refusal.device_id,
                    channel = %refusal.channel,
                    reason = refusal.reason.as_str(),
                    error = %refusal.error,
                    "payload refused"
                );
                rejected.push(refusal);
            }
        }
    }
    (accepted, rejected)
}

async fn commit_with_retry(
    db: &Db,
    fence: Option<&Fence>,
    accepted: &[Incoming],
    rejected: &[Rejected],
    stats: &IngestStats,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Option<Committed> {
    let mut delay = Duration::from_millis(250);
    loop {
        match db.commit_fenced(fence, accepted, rejected, u64::try_from(crate::now_ms()).unwrap_or(0)).await {
            Ok(committed) => return Some(committed),
            Err(DbError::LeaseLost) => {
                tracing::warn!("this replica lost the leader lease: the ingest stops");
                return None;
            }
            Err(e) => {
                stats.commit_failures.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "a batch could not be committed; retrying in {delay:?}");
                tokio::select! {
                    _ = stop.changed() => return None,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
    }
}

fn record(stats: &IngestStats, committed: &Committed) {
    stats.stored.fetch_add(committed.stored, Ordering::Relaxed);
    stats.duplicates.fetch_add(committed.duplicates, Ordering::Relaxed);
    stats.statuses.fetch_add(committed.statuses, Ordering::Relaxed);
    stats.rejected.fetch_add(committed.rejected, Ordering::Relaxed);
    stats.batches.fetch_add(1, Ordering::Relaxed);
}

/// A retained `desired` hint to every registered, live device: signed
/// targets changed, refresh now (what to install stays signed metadata's).
async fn hint_devices(client: &AsyncClient, db: &Db) {
    let devices = match db.broker_accounts().await {
        Ok(devices) => devices,
        Err(e) => return tracing::warn!(error = %e, "cannot list devices to hint at an update"),
    };
    let issued_ms = u64::try_from(crate::now_ms()).unwrap_or(0);
    for (device_id, _) in &devices {
        let hint = rxvision_protocol::Desired {
            v: PROTOCOL_VERSION,
            device_id: device_id.clone(),
            fetch_updates: true,
            issued_ms,
        };
        if let (Ok(name), Ok(payload)) = (topic::topic(device_id, Channel::Desired), encode(&hint)) {
            let _ = client.publish(name, QoS::AtLeastOnce, true, payload).await;
        }
    }
    tracing::info!(devices = devices.len(), "update hints sent");
}
