//! Collecting windows while the counter works, and storing them in the
//! outbox when they end.
//!
//! **What a window counts comes from the audit log.** At the end of every
//! window (and when the service stops) the [`WindowWorker`] reads the audit
//! records appended since the last stored window (verifications and
//! feedback), counts them into [`WindowCounts`], and stores the window
//! together with the chain position it counted up to, in one outbox
//! transaction ([`Outbox::push_window`]). After a crash, the first window
//! counts the records no stored window counted: every answered scan reaches
//! the fleet exactly once, `kill -9` included.
//!
//! **The drift features come from memory.** The request handlers hand each
//! answered analysis to a [`Collector`] (a bounded channel: a full channel
//! drops it and counts it, a scan never waits for telemetry); the worker
//! computes the features from its pill crops. A scan whose analysis was lost
//! is still counted, without features.
//!
//! Windows are stored without their `seq` ([`stored_window`],
//! [`stored_event`]); [`finalize`] gives them one when they are first sent,
//! and [`merge_windows`] is the budget's merge.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rxvision_counter::analysis::Analysis;
use rxvision_protocol::{ChainHead, Event, EventKind, OutboxLosses, Telemetry, PROTOCOL_VERSION};

use crate::audit::{now_ms, AuditLog, RecordKind};
use crate::outbox::{BudgetAction, MessageKind, Outbox};
use crate::telemetry::window::{WindowCounts, WindowEnd};
use rxvision_models::classify::Classifier;

/// Observations waiting for the worker at most.
const QUEUE: usize = 1024;

/// Something the counter did that telemetry needs from memory.
#[derive(Debug)]
pub enum Observation {
    /// An answered scan's analysis (its pill crops, for the drift features).
    Scan {
        /// The analysis.
        analysis: Box<Analysis>,
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
        // Where the last stored window stopped counting. A new outbox starts
        // at the chain's head; so does one whose mark is beyond the head (the
        // store was restored from an older copy: its records up to the head
        // were counted before, and what it appends from now on is new).
        let mut through = match self.outbox.audit_through() {
            Ok(Some(through)) if through <= self.audit.head().0 => through,
            Ok(_) => {
                let head = self.audit.head().0;
                if let Err(e) = self.outbox.start_audit_mark(head) {
                    tracing::error!(error = %e, "the outbox's audit mark could not be stored");
                }
                head
            }
            Err(e) => {
                tracing::error!(error = %e, "the outbox's audit mark is unreadable; counting from the chain's head");
                self.audit.head().0
            }
        };
        let mut counts = WindowCounts::new(now_ms());
        let mut fallbacks_at_start = self.classifier.engines().fallbacks();
        let mut ends = Instant::now() + self.window;
        loop {
            let wait = ends.saturating_duration_since(Instant::now()).min(Duration::from_millis(200));
            let disconnected = match self.receiver.recv_timeout(wait) {
                Ok(Observation::Scan { analysis }) => {
                    counts.add_features(&analysis);
                    false
                }
                Err(RecvTimeoutError::Timeout) => false,
                Err(RecvTimeoutError::Disconnected) => true,
            };
            let stopping = disconnected || stop.load(Ordering::Acquire);
            if Instant::now() >= ends || stopping {
                let fallbacks = self.classifier.engines().fallbacks();
                let (head, events) = self.count_records(&mut counts, through);
                if !stopping || counts.scans() > 0 || head > through {
                    if self.store(counts, &events, fallbacks_at_start, head) {
                        through = head;
                    }
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

    /// Counts the audit records from `through` to the chain's head into
    /// `counts`; returns the head's sequence number and the events those
    /// records announce (a clock found behind, an accepted store, a model
    /// installed, refused or rolled back), stored.
    fn count_records(&self, counts: &mut WindowCounts, through: u64) -> (u64, Vec<Vec<u8>>) {
        let (head, _) = self.audit.head();
        let mut events = Vec::new();
        for seq in through..head {
            let record = match self.audit.get(seq) {
                Ok(Some(record)) => record,
                Ok(None) => continue, // pruned under the retention policy before it was counted
                Err(e) => {
                    tracing::error!(seq, error = %e, "an audit record could not be read for telemetry");
                    continue;
                }
            };
            match record.kind {
                RecordKind::Verification => {
                    let operator =
                        record.operator.as_deref().map(|o| operator_hash(&self.audit, o)).unwrap_or_default();
                    counts.add_verification(&record, &operator);
                }
                RecordKind::Feedback => {
                    let target = record.details.get("audit_seq").and_then(serde_json::Value::as_u64);
                    let confirmed =
                        record.details.get("confirmed").and_then(serde_json::Value::as_bool).unwrap_or(false);
                    let answered = target
                        .and_then(|t| self.audit.get(t).ok().flatten())
                        .and_then(|r| r.top_k.first().map(|c| c.ndc.clone()));
                    if let Some(class) = answered {
                        counts.add_feedback(&class, confirmed);
                    }
                }
                RecordKind::ClockJump | RecordKind::StoreAccepted | RecordKind::ModelChange => {
                    let kind = match record.kind {
                        RecordKind::ClockJump => EventKind::ClockJump,
                        RecordKind::StoreAccepted => EventKind::AuditStoreAccepted,
                        _ => match record.details.get("event").and_then(serde_json::Value::as_str) {
                            Some(crate::updates::event::INSTALLED) => EventKind::ModelInstalled,
                            Some(crate::updates::event::REJECTED) => EventKind::ModelRejected,
                            Some(crate::updates::event::ROLLED_BACK) => EventKind::ModelRolledBack,
                            Some(crate::updates::event::SELFTEST_FAILED) => EventKind::SelftestFailed,
                            Some(crate::updates::event::DAEMON_INSTALLED) => EventKind::DaemonInstalled,
                            Some(crate::updates::event::DAEMON_REJECTED) => EventKind::DaemonRejected,
                            Some(crate::updates::event::DAEMON_ROLLED_BACK) => EventKind::DaemonRolledBack,
                            _ => continue,
                        },
                    };
                    let mut details = record.details.as_object().cloned().unwrap_or_default();
                    details.insert("audit_seq".into(), record.seq.into());
                    // Operator names stay in the encrypted log.
                    details.remove("operator");
                    let event = Event {
                        v: PROTOCOL_VERSION,
                        device_id: self.device_id.clone(),
                        seq: 0,
                        time_ms: record.time_ms,
                        kind,
                        details,
                    };
                    events.push(stored_event(&event));
                }
                _ => {}
            }
        }
        (head, events)
    }

    /// Stores a finished window that counted the records below `through`,
    /// and keeps the outbox within its budget; false if it was not stored.
    fn store(&self, counts: WindowCounts, events: &[Vec<u8>], fallbacks_at_start: u64, through: u64) -> bool {
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
            .push_window(telemetry.window.start_ms, events, &stored, through)
            .and_then(|_| self.outbox.enforce_budget(self.budget, merge_windows));
        match outcome {
            Ok(steps) if !steps.is_empty() => {
                let losses = self.outbox.losses();
                tracing::warn!(
                    steps = steps.len(),
                    ?losses,
                    "telemetry outbox over budget: old windows merged or dropped"
                );
                if steps.iter().any(|step| matches!(step, BudgetAction::Drop { .. })) {
                    // Something was dropped: say so (merges travel in every window's counts).
                    let event = Event {
                        v: PROTOCOL_VERSION,
                        device_id: self.device_id.clone(),
                        seq: 0,
                        time_ms: now_ms(),
                        kind: EventKind::OutboxOverflow,
                        details: serde_json::json!({
                            "merged_windows": losses.merged_windows,
                            "dropped_windows": losses.dropped_windows,
                            "dropped_events": losses.dropped_events,
                        })
                        .as_object()
                        .cloned()
                        .unwrap_or_default(),
                    };
                    if let Err(e) = self.outbox.push(MessageKind::Event, event.time_ms, &stored_event(&event)) {
                        tracing::error!(error = %e, "the outbox_overflow event could not be stored");
                    }
                }
                true
            }
            Ok(_) => true,
            Err(e) => {
                tracing::error!(error = %e, "a telemetry window could not be stored; its records go into the next");
                false
            }
        }
    }
}

/// The keyed hash telemetry counts an operator under (never the id).
pub fn operator_hash(audit: &AuditLog, operator_id: &str) -> String {
    audit.pseudonym(operator_id).chars().take(16).collect()
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
