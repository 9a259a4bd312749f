//! One scan at the counter: the counter path's analysis (decode → quality
//! gate → pill localisation → crop → engine → verdict, `rxvision-counter`'s
//! [`CounterPath::analyse`], no I/O) → durable audit record → answer.
//!
//! [`Scanner::scan`] is the only place the analysis and the audit log are
//! wired together. The audit record is appended (and flushed) before the
//! result exists, so nothing can answer a scan that has no record —
//! including scans that end in `NO_PILL` or `BAD_IMAGE`.

use std::sync::Arc;

use ring::digest::{digest, SHA256};
use rxvision_counter::analysis::{Analysis, AnalysisError, CounterPath, ScanRequest};
use rxvision_models::classify::Classifier;
use serde::Serialize;

use crate::audit::{AuditError, AuditEvent, AuditLog, RankedClass, RecordKind};

/// Pills described one by one in a scan's audit record; a tray with more is
/// summarised (counts by verdict), so that a record stays within the audit
/// log's size limit.
pub const MAX_PILLS_RECORDED: usize = 16;

/// The answer to a scan: the analysis and the audit record that holds it.
#[derive(Debug, Clone, Serialize)]
pub struct ScanResult {
    /// What the counter path concluded.
    #[serde(flatten)]
    pub analysis: Analysis,
    /// The audit record of this scan.
    pub audit_seq: u64,
}

impl std::ops::Deref for ScanResult {
    type Target = Analysis;
    fn deref(&self) -> &Analysis {
        &self.analysis
    }
}

/// Why a scan has no answer at all. (A bad picture is an answer: `BAD_IMAGE`.)
#[derive(Debug, thiserror::Error)]
pub enum ScanError {
    /// The audit record could not be written, so no answer may be given.
    #[error("the audit record could not be written: {0}")]
    Audit(#[from] AuditError),
    /// The counter path could not analyse the frame (the engines failed on
    /// the CPU too).
    #[error(transparent)]
    Analysis(#[from] AnalysisError),
}

/// The counter path of one appliance: every analysis is recorded in the
/// audit log before it becomes an answer.
#[derive(Debug)]
pub struct Scanner {
    path: CounterPath,
    audit: Arc<AuditLog>,
}

impl Scanner {
    /// A scanner answering with `classifier` and recording into `audit`.
    pub fn new(classifier: Arc<Classifier>, audit: Arc<AuditLog>) -> Scanner {
        Scanner::with_path(CounterPath::new(classifier), audit)
    }

    /// A scanner answering through `path` and recording into `audit`.
    pub fn with_path(path: CounterPath, audit: Arc<AuditLog>) -> Scanner {
        Scanner { path, audit }
    }

    /// The classifier (model, engines).
    pub fn classifier(&self) -> &Classifier {
        self.path.classifier()
    }

    /// The audit log.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The audit log, shared (for the control socket).
    pub fn shared_audit(&self) -> Arc<AuditLog> {
        self.audit.clone()
    }

    /// Verifies the pills in one encoded frame and records the scan.
    pub fn scan(&self, request: &ScanRequest, frame: &[u8]) -> Result<ScanResult, ScanError> {
        let analysis = self.path.analyse(request, frame)?;
        let audit_seq = self.record(request, frame, &analysis)?;
        Ok(ScanResult { analysis, audit_seq })
    }

    fn record(&self, request: &ScanRequest, frame: &[u8], result: &Analysis) -> Result<u64, AuditError> {
        Ok(self.audit.append(verification_event(request, frame, result))?.seq)
    }
}

/// The audit record of one answered scan. It holds everything telemetry
/// counts (verdict, refusal codes, latency, every recorded pill's classes),
/// so windows are counted from the durable log.
pub fn verification_event(request: &ScanRequest, frame: &[u8], result: &Analysis) -> AuditEvent {
    let mut event = AuditEvent::new(RecordKind::Verification);
    event.operator = Some(request.operator_id.clone());
    event.rx_ref = request.rx_ref.clone();
    event.image_sha256 = Some(digest(&SHA256, frame).as_ref().iter().map(|b| format!("{b:02x}")).collect());
    event.model_version = Some(result.model_version.clone());
    event.engine = Some(result.engine.clone());
    event.top_k = result
        .pills
        .first()
        .map(|p| p.top_k.iter().map(|r| RankedClass { ndc: r.ndc.clone(), prob: r.prob }).collect())
        .unwrap_or_default();
    event.verdict = Some(result.verdict.as_str().to_string());
    event.latency_ms = Some(result.latency_ms);
    event.details = serde_json::json!({
        "expected_ndc": request.expected_ndc,
        "count": result.count,
        "partial": result.partial,
        "reason": result.reason,
        "refusal": result.refusal,
        "pills": result.pills.iter().take(MAX_PILLS_RECORDED).map(|p| serde_json::json!({
            "verdict": p.verdict, "box": p.region, "refusal": p.refusal,
            "top_k": p.top_k.iter().map(|r| serde_json::json!({"ndc": r.ndc, "prob": r.prob})).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    });
    if result.pills.len() > MAX_PILLS_RECORDED {
        let mut by_verdict = std::collections::BTreeMap::<&str, usize>::new();
        for pill in &result.pills[MAX_PILLS_RECORDED..] {
            *by_verdict.entry(pill.verdict.as_str()).or_default() += 1;
        }
        event.details["more_pills"] = serde_json::json!(by_verdict);
    }
    event
}
