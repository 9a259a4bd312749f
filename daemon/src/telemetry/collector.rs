//! Collecting windows while the counter works, and storing them in the
//! outbox when they end.
//!
//! The request handlers hand each answered scan and each piece of feedback
//! to a [`Collector`] (a bounded channel: a full channel drops the
//! observation and counts it, a scan never waits for telemetry). A
//! [`WindowWorker`] thread owns the current [`WindowCounts`]: it computes
//! the drift features from the pill crops, and at the end of every window
//! (and when the service stops) stores the window in the [`Outbox`] and
//! applies the outbox's budget. Windows are stored without their `seq`
//! ([`stored_window`], [`stored_event`]); [`finalize`] gives them one when
//! they are first sent, and [`merge_windows`] is the budget's merge.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rxvision_counter::analysis::Analysis;
use rxvision_protocol::{ChainHead, Event, OutboxLosses, Telemetry};

use crate::audit::{now_ms, AuditLog};
use crate::outbox::{MessageKind, Outbox};
use crate::telemetry::window::{WindowCounts, WindowEnd};
use rxvision_models::classify::Classifier;

/// Observations waiting for the worker at most.
const QUEUE: usize = 1024;

/// Something the counter did that telemetry counts.
#[derive(Debug)]
pub enum Observation {
    /// An answered scan, with the keyed hash of its operator.
    Scan {
        /// The analysis (with the pill crops for the drift features).
        analysis: Box<Analysis>,
        /// Keyed hash of the operator id.
        operator: String,
    },
    /// A pharmacist confirmed or corrected an answer of class `class`.
    Feedback {
        /// The NDC the counter answered.
        class: String,
        /// Confirmed (else corrected).
        confirmed: bool,
    },
}

/// The handlers' end: hands observations to the worker without waiting.
#[derive(Debug)]
pub struct Collector {
    sender: SyncSender<Observation>,
    dropped: AtomicU64,
}

impl Collector {
    /// Hands `observation` over; if the worker is 1,024 observations behind, it is
    /// dropped and counted instead.
    pub fn observe(&self, observation: Observation) {
        if self.sender.try_send(observation).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Observations dropped because the worker was behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// The worker's end: turns observations into windows in the outbox.
pub struct WindowWorker {
    receiver: Receiver<Observation>,
    device_id: String,
    window: Duration,
    budget: u64,
    outbox: Arc<Outbox>,
    audit: Arc<AuditLog>,
    classifier: Arc<Classifier>,
}

impl WindowWorker {
    /// Runs until `stop` is set (then stores the window in progress, if it
    /// counted anything) or every collector is gone.
    pub fn run(self, stop: Arc<AtomicBool>) {
        let mut counts = WindowCounts::new(now_ms());
        let mut fallbacks_at_start = self.classifier.engines().fallbacks();
        let mut ends = Instant::now() + self.window;
        loop {
            let wait = ends.saturating_duration_since(Instant::now()).min(Duration::from_millis(200));
            match self.receiver.recv_timeout(wait) {
                Ok(Observation::Scan { analysis, operator }) => counts.add_scan(&analysis, &operator),
                Ok(Observation::Feedback { class, confirmed }) => counts.add_feedback(&class, confirmed),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.store(counts, fallbacks_at_start);
                    return;
                }
            }
            let stopping = stop.load(Ordering::Acquire);
            if Instant::now() >= ends || stopping {
                let fallbacks = self.classifier.engines().fallbacks();
                if !stopping || counts.scans() > 0 {
                    self.store(counts, fallbacks_at_start);
                }
                if stopping {
                    return;
                }
                counts = WindowCounts::new(now_ms());
                fallbacks_at_start = fallbacks;
                ends += self.window;
            }
        }
    }

    /// Stores a finished window and keeps the outbox within its budget.
    fn store(&self, counts: WindowCounts, fallbacks_at_start: u64) {
        let (next_seq, head) = self.audit.head();
        let losses = self.outbox.losses();
        let end = WindowEnd {
            device_id: self.device_id.clone(),
            seq: 0,
            end_ms: now_ms(),
            model_version: self.classifier.bundle().manifest.version.to_string(),
            engine: self.classifier.engines().active().to_string(),
            engine_fallbacks: self.classifier.engines().fallbacks().saturating_sub(fallbacks_at_start),
            audit: ChainHead { next_seq, head: head.iter().map(|b| format!("{b:02x}")).collect() },
            outbox: OutboxLosses {
                merged_windows: losses.merged_windows,
                dropped_windows: losses.dropped_windows,
                dropped_events: losses.dropped_events,
            },
        };
        let telemetry = counts.finish(end);
        let stored = stored_window(&telemetry);
        let outcome = self
            .outbox
            .push(MessageKind::Window, telemetry.window.start_ms, &stored)
            .and_then(|_| self.outbox.enforce_budget(self.budget, merge_windows));
        match outcome {
            Ok(steps) if !steps.is_empty() => {
                tracing::warn!(steps = steps.len(), losses = ?self.outbox.losses(), "telemetry outbox over budget: old windows merged or dropped")
            }
            Ok(_) => {}
            Err(e) => tracing::error!(error = %e, "a telemetry window could not be stored"),
        }
    }
}

/// A window as the outbox stores it (its `seq` is given when it is first sent).
pub fn stored_window(telemetry: &Telemetry) -> Vec<u8> {
    serde_json::to_vec(telemetry).expect("telemetry serialises")
}

/// An event as the outbox stores it (its `seq` is given when it is first sent).
pub fn stored_event(event: &Event) -> Vec<u8> {
    serde_json::to_vec(event).expect("events serialise")
}

/// A stored message with its `seq`, as published (validated): a window on
/// the telemetry topic, an event on the events topic.
pub fn finalize(kind: MessageKind, seq: u64, stored: &[u8]) -> Result<Vec<u8>, String> {
    match kind {
        MessageKind::Window => {
            let mut telemetry: Telemetry = serde_json::from_slice(stored).map_err(|e| e.to_string())?;
            telemetry.seq = seq;
            rxvision_protocol::encode(&telemetry).map_err(|e| e.to_string())
        }
        MessageKind::Event => {
            let mut event: Event = serde_json::from_slice(stored).map_err(|e| e.to_string())?;
            event.seq = seq;
            rxvision_protocol::encode(&event).map_err(|e| e.to_string())
        }
    }
}

/// The budget's merge of two stored windows (the earlier first).
pub fn merge_windows(earlier: &[u8], later: &[u8]) -> Result<Vec<u8>, String> {
    let mut merged: Telemetry = serde_json::from_slice(earlier).map_err(|e| e.to_string())?;
    let later: Telemetry = serde_json::from_slice(later).map_err(|e| e.to_string())?;
    merged.merge(&later)?;
    Ok(stored_window(&merged))
}

/// Telemetry as the service holds it: the collector the handlers use, the
/// outbox (for status and metrics) and the worker until the service starts it.
pub struct TelemetryService {
    /// Where handlers hand observations.
    pub collector: Collector,
    /// The outbox the windows go to.
    pub outbox: Arc<Outbox>,
    /// The link to the fleet's broker, when one is configured.
    pub link: Option<crate::link::LinkConfig>,
    /// The link's state (down until it connects; down for good without a link).
    pub link_state: Arc<crate::link::LinkStatus>,
    worker: std::sync::Mutex<Option<WindowWorker>>,
}

impl TelemetryService {
    /// Telemetry for `device_id`: windows of length `window` into `outbox`,
    /// kept within `budget` bytes.
    pub fn new(
        device_id: &str,
        window: Duration,
        budget: u64,
        outbox: Arc<Outbox>,
        audit: Arc<AuditLog>,
        classifier: Arc<Classifier>,
    ) -> TelemetryService {
        let (sender, receiver) = std::sync::mpsc::sync_channel(QUEUE);
        let worker = WindowWorker {
            receiver,
            device_id: device_id.to_string(),
            window,
            budget,
            outbox: outbox.clone(),
            audit,
            classifier,
        };
        TelemetryService {
            collector: Collector { sender, dropped: AtomicU64::new(0) },
            outbox,
            link: None,
            link_state: Arc::default(),
            worker: std::sync::Mutex::new(Some(worker)),
        }
    }

    /// Sends the outbox to the fleet over `link`.
    pub fn with_link(mut self, link: crate::link::LinkConfig) -> TelemetryService {
        self.link = Some(link);
        self
    }

    /// Starts the worker on its own thread (once); it stops, storing the
    /// window in progress, when `stop` is set.
    pub fn start(&self, stop: Arc<AtomicBool>) -> Option<std::thread::JoinHandle<()>> {
        let worker = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take()?;
        std::thread::Builder::new().name("telemetry-windows".into()).spawn(move || worker.run(stop)).ok()
    }
}

impl std::fmt::Debug for TelemetryService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TelemetryService").field("outbox", &self.outbox).finish_non_exhaustive()
    }
}
