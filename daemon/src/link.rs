//! The MQTT link to the fleet: sends the outbox, takes the fleet's acks.
//!
//! One task owns a rumqttc client. On every connection it registers the
//! last will (an offline [`Status`], retained), subscribes to its own `ack`
//! and `desired`, publishes its retained online status, and then sends the
//! outbox in order within its in-flight window; every `ack` that arrives
//! removes what it covers (durably) and lets the next messages go. A lost
//! connection is normal: the outbox keeps everything, the task waits
//! ([`Backoff`]: exponential with jitter, 0.25 s to 60 s) and connects
//! again, and the outbox starts over at the oldest unacknowledged message.
//! A broker can also accept a message and then lose it (a crash without
//! persistence): when sent messages wait longer than the ack timeout, they
//! are sent again (the fleet deduplicates by `seq`).
//! Scans, the audit log and the counter page never wait for the network.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS, TlsConfiguration, Transport};
use rxvision_protocol::topic::{self, Channel};
use rxvision_protocol::{decode_on, encode, Ack, Status};

use crate::audit::now_ms;
use crate::outbox::{AckOutcome, MessageKind, Outbox};
use crate::telemetry::finalize;

/// How often a connected appliance republishes its retained status (outbox
/// depth and age, engine, audit head), so the fleet's view stays current.
pub const STATUS_REFRESH: Duration = Duration::from_secs(60);

/// Where the link connects and how it proves who it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkConfig {
    /// Broker host.
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// The CA to check the broker against (TLS); `None`: plain TCP (loopback, tests).
    pub ca_pem: Option<Vec<u8>>,
    /// The device's client certificate and key (PEM), when the broker asks for one.
    pub client_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// The device's password (its username is its device id).
    pub password: String,
    /// How long sent messages may wait for the fleet's `ack` before they are sent again.
    pub ack_timeout: Duration,
    /// MQTT keep-alive: a silent connection is found dead within about 1.5 times this.
    pub keep_alive: Duration,
}

/// The link's state, for status and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum LinkState {
    /// Not connected (yet, or any more).
    Down = 0,
    /// Connected to the broker.
    Up = 1,
}

/// The link's state, shared with the API.
#[derive(Debug, Default)]
pub struct LinkStatus(AtomicU8);

impl LinkStatus {
    /// The state now.
    pub fn get(&self) -> LinkState {
        if self.0.load(Ordering::Relaxed) == LinkState::Up as u8 {
            LinkState::Up
        } else {
            LinkState::Down
        }
    }

    fn set(&self, state: LinkState) {
        self.0.store(state as u8, Ordering::Relaxed);
    }
}

/// Reconnection delays: doubling from `min` to `max`, each with up to 50 %
/// random jitter taken off (so many appliances losing one broker do not
/// return in step); a successful connection starts again at `min`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Delays between `min` and `max`.
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff { min, max, next: min }
    }

    /// The delay after a failure; `jitter` in `0.0..=1.0` (random in use).
    pub fn failed(&mut self, jitter: f64) -> Duration {
        let delay = self.next.mul_f64(1.0 - 0.5 * jitter.clamp(0.0, 1.0));
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// A connection succeeded.
    pub fn connected(&mut self) {
        self.next = self.min;
    }
}

fn jitter() -> f64 {
    let mut byte = [0u8; 1];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut byte);
    f64::from(byte[0]) / 255.0
}

/// Publishes what the outbox allows now; stops when the client's queue is full.
fn pump(client: &AsyncClient, outbox: &Outbox, device_id: &str) {
    loop {
        match outbox.next_to_send(finalize) {
            Ok(Some((seq, kind, payload))) => {
                let channel = match kind {
                    MessageKind::Window => Channel::Telemetry,
                    MessageKind::Event => Channel::Events,
                };
                let Ok(name) = topic::topic(device_id, channel) else { return };
                if client.try_publish(name, QoS::AtLeastOnce, false, payload).is_err() {
                    return; // the client's queue is full: the next event pumps again
                }
                outbox.sent(seq);
            }
            Ok(None) => return,
            Err(e) => {
                tracing::error!(error = %e, "an outbox message cannot be sent");
                return;
            }
        }
    }
}

/// [`pump`], and when that starts a wait for an ack (none was awaited
/// before), the ack timeout counts from now: a link idle for longer than
/// the timeout must not resend a message the moment it is sent.
fn pump_timed(client: &AsyncClient, outbox: &Outbox, device_id: &str, waiting_since: &mut tokio::time::Instant) {
    let was_waiting = outbox.awaiting_ack();
    pump(client, outbox, device_id);
    if !was_waiting && outbox.awaiting_ack() {
        *waiting_since = tokio::time::Instant::now();
    }
}

/// Runs the link until `stop` resolves. `status` makes the retained online
/// status; a `desired` message from the fleet notifies `hint` (the updater).
pub async fn run(
    config: LinkConfig,
    device_id: String,
    outbox: Arc<Outbox>,
    state: Arc<LinkStatus>,
    status: impl Fn() -> Status + Send + 'static,
    hint: Arc<tokio::sync::Notify>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) {
    tokio::pin!(stop);
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(60));
    let ack_topic = topic::topic(&device_id, Channel::Ack).expect("a validated device id");
    let desired_topic = topic::topic(&device_id, Channel::Desired).expect("a validated device id");
    let status_topic = topic::topic(&device_id, Channel::Status).expect("a validated device id");
    loop {
        let mut options = MqttOptions::new(format!("rxvisiond-{device_id}"), config.host.clone(), config.port);
        options.set_credentials(device_id.clone(), config.password.clone());
        options.set_keep_alive(config.keep_alive);
        options.set_clean_session(true);
        options.set_max_packet_size(Channel::Telemetry.max_payload() + 1024, Channel::Telemetry.max_payload() + 1024);
        let will = encode(&Status::last_will(&device_id, now_ms())).expect("a last will encodes");
        options.set_last_will(LastWill::new(status_topic.clone(), will, QoS::AtLeastOnce, true));
        if let Some(ca) = &config.ca_pem {
            options.set_transport(Transport::Tls(TlsConfiguration::Simple {
                ca: ca.clone(),
                alpn: None,
                client_auth: config.client_pem.clone(),
            }));
        }
        let (client, mut events) = AsyncClient::new(options, 256);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        let mut last_progress = tokio::time::Instant::now();
        let mut last_status = tokio::time::Instant::now();
        let failure = loop {
            tokio::select! {
                () = &mut stop => {
                    let _ = client.try_publish(status_topic.clone(), QoS::AtLeastOnce, true,
                        encode(&Status { online: false, ..status() }).unwrap_or_default());
                    let _ = client.try_disconnect();
                    // Let the goodbye go out (bounded).
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        while events.poll().await.is_ok() {}
                    }).await;
                    state.set(LinkState::Down);
                    outbox.disconnected();
                    return;
                }
                _ = tick.tick() => {
                    if state.get() == LinkState::Up
                        && outbox.awaiting_ack()
                        && last_progress.elapsed() >= config.ack_timeout
                    {
                        tracing::info!(acked = outbox.depth().3, "no ack from the fleet in time: sending again");
                        outbox.rewind();
                        last_progress = tokio::time::Instant::now();
                    }
                    pump_timed(&client, &outbox, &device_id, &mut last_progress);
                    // The retained status keeps the fleet's view of the
                    // outbox and engine current, not just as of the connect.
                    if state.get() == LinkState::Up && last_status.elapsed() >= STATUS_REFRESH {
                        last_status = tokio::time::Instant::now();
                        if let Ok(online) = encode(&status()) {
                            let _ = client.try_publish(status_topic.clone(), QoS::AtLeastOnce, true, online);
                        }
                    }
                }
                event = events.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(_))) => {
                        tracing::info!(broker = %config.host, "fleet link up");
                        backoff.connected();
                        state.set(LinkState::Up);
                        outbox.connected();
                        last_progress = tokio::time::Instant::now();
                        let _ = client.try_subscribe(ack_topic.clone(), QoS::AtLeastOnce);
                        let _ = client.try_subscribe(desired_topic.clone(), QoS::AtLeastOnce);
                        if let Ok(online) = encode(&status()) {
                            let _ = client.try_publish(status_topic.clone(), QoS::AtLeastOnce, true, online);
                        }
                        last_status = tokio::time::Instant::now();
                        pump_timed(&client, &outbox, &device_id, &mut last_progress);
                    }
                    Ok(Event::Incoming(Packet::Publish(message))) if message.topic == ack_topic => {
                        match decode_on::<Ack>(&device_id, &message.payload) {
                            Ok(ack) => match outbox.ack(ack.seq) {
                                Ok(AckOutcome::Ahead { highest }) => tracing::warn!(seq = ack.seq, highest, "an ack above anything sent was ignored"),
                                Ok(AckOutcome::Committed { .. }) => {
                                    last_progress = tokio::time::Instant::now();
                                    pump_timed(&client, &outbox, &device_id, &mut last_progress);
                                }
                                Ok(AckOutcome::Stale) => {}
                                Err(e) => tracing::error!(error = %e, "an ack could not be stored"),
                            },
                            Err(e) => tracing::warn!(error = %e, "a malformed ack was ignored"),
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(message))) if message.topic == desired_topic => {
                        match decode_on::<rxvision_protocol::Desired>(&device_id, &message.payload) {
                            Ok(_) => hint.notify_one(),
                            Err(e) => tracing::warn!(error = %e, "a malformed desired hint was ignored"),
                        }
                    }
                    Ok(_) => {}
                    Err(e) => break e,
                },
            }
        };
        if state.get() == LinkState::Up {
            tracing::warn!(error = %failure, "fleet link down; the outbox keeps everything");
        }
        state.set(LinkState::Down);
        outbox.disconnected();
        let delay = backoff.failed(jitter());
        tokio::select! {
            () = &mut stop => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_its_limit_with_jitter_and_restarts_after_a_connection() {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(2));
        let delays: Vec<u128> = (0..6).map(|_| backoff.failed(0.0).as_millis()).collect();
        assert_eq!(delays, [250, 500, 1000, 2000, 2000, 2000]);
        assert_eq!(backoff.failed(1.0).as_millis(), 1000, "full jitter takes half off");
        backoff.connected();
        assert_eq!(backoff.failed(0.0).as_millis(), 250);
    }
}
