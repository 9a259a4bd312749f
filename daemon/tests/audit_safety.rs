//! The audit log's safety rules: nonces never repeat after a restore, the
//! chain is anchored outside the store, time never goes backwards, and
//! pruning is held to the retention floor and runs one at a time.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rxvision_daemon::audit::{
    Acceptance, AuditError, AuditEvent, AuditKey, AuditLog, AuditOptions, KeyRing, RecordKind,
};

use crate::audit::raw_open;

fn ring() -> KeyRing {
    KeyRing::new(AuditKey::from_master(&[9; 32]))
}

fn event(i: u64) -> AuditEvent {
    let mut event = AuditEvent::new(RecordKind::Verification);
    event.operator = Some("tech-1".into());
    event.rx_ref = Some(format!("RX-{i}"));
    event.verdict = Some("MATCH".into());
    event
}

const DAY_MS: u64 = 86_400_000;
/// 2026-11-30T00:00:00Z.
const NOW_MS: u64 = 1_795_996_800_000;

/// A settable wall clock.
#[derive(Clone)]
struct FakeClock(Arc<AtomicU64>);

impl FakeClock {
    fn at(ms: u64) -> FakeClock {
        FakeClock(Arc::new(AtomicU64::new(ms)))
    }
    fn set(&self, ms: u64) {
        self.0.store(ms, Ordering::SeqCst);
    }
    fn options(&self, anchor: Option<PathBuf>, retention_days: u64) -> AuditOptions {
        let clock = self.0.clone();
        AuditOptions {
            anchor,
            retention_floor: Duration::from_millis(retention_days * DAY_MS),
            clock: Arc::new(move || clock.load(Ordering::SeqCst)),
            ..AuditOptions::default()
        }
    }
}

fn anchored(dir: &Path) -> AuditOptions {
    AuditOptions { anchor: Some(dir.join("audit-anchor")), ..AuditOptions::default() }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The nonces (bytes 16..28 of every stored value) of a closed store.
fn nonces(store: &Path) -> Vec<[u8; 12]> {
    let db = raw_open(store);
    let records = db.open_tree("records").unwrap();
    records.iter().map(|e| e.unwrap().1[16..28].try_into().unwrap()).collect()
}

#[test]
fn a_restored_backup_is_refused_until_accepted_and_never_reuses_a_nonce() {
    let dir = tempfile::tempdir().unwrap();
    let (store, backup) = (dir.path().join("audit"), dir.path().join("backup"));
    {
        let log = AuditLog::open_with(&store, ring(), anchored(dir.path())).unwrap();
        for i in 0..3 {
            log.append(event(i)).unwrap();
        }
    }
    copy_dir(&store, &backup);
    {
        let log = AuditLog::open_with(&store, ring(), anchored(dir.path())).unwrap();
        for i in 3..6 {
            log.append(event(i)).unwrap();
        }
    }
    let before_restore = nonces(&store);
    // Restore the backup: three records shorter than the anchor.
    std::fs::remove_dir_all(&store).unwrap();
    copy_dir(&backup, &store);
    match AuditLog::open_with(&store, ring(), anchored(dir.path())) {
        Err(AuditError::Refused { reason, .. }) => {
            assert!(reason.contains("confirmed records up to 5"), "{reason}")
        }
        other => panic!("a shorter store must be refused, got {other:?}"),
    }
    // An operator accepts it: the acceptance is the next record, then scans go on.
    let accept = AuditOptions {
        accept: Some(Acceptance { operator: "officer-1".into(), reason: "restored from backup".into() }),
        ..anchored(dir.path())
    };
    {
        let log = AuditLog::open_with(&store, ring(), accept).unwrap();
        let record = log.get(3).unwrap().unwrap();
        assert_eq!(record.kind, RecordKind::StoreAccepted);
        assert_eq!(record.details["anchor"]["next_seq"], 6, "{:?}", record.details);
        log.append(event(100)).unwrap();
        log.append(event(101)).unwrap();
        assert!(log.verify().unwrap().tamper.is_none());
    }
    // Sequence numbers 3..5 now name other records than before the restore,
    // but no (key, nonce) pair was used twice.
    let after = nonces(&store);
    for (seq, nonce) in after.iter().enumerate().skip(3) {
        assert!(!before_restore.contains(nonce), "record {seq} reuses a nonce of the lost records");
    }
    // The accepted store opens as usual from now on.
    drop(AuditLog::open_with(&store, ring(), anchored(dir.path())).unwrap());
}

#[test]
fn a_forked_or_missing_store_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("audit");
    {
        let log = AuditLog::open_with(&store, ring(), anchored(dir.path())).unwrap();
        for i in 0..4 {
            log.append(event(i)).unwrap();
        }
    }
    // Another store of the same length: same sequence numbers, other records.
    let other = dir.path().join("other");
    {
        let log = AuditLog::open(&other, ring()).unwrap();
        for i in 10..14 {
            log.append(event(i)).unwrap();
        }
    }
    std::fs::rename(&store, dir.path().join("original")).unwrap();
    std::fs::rename(&other, &store).unwrap();
    match AuditLog::open_with(&store, ring(), anchored(dir.path())) {
        Err(AuditError::Refused { reason, .. }) => assert!(reason.contains("forked"), "{reason}"),
        other => panic!("a forked store must be refused, got {other:?}"),
    }
    // A deleted store is not silently recreated.
    std::fs::remove_dir_all(&store).unwrap();
    match AuditLog::open_with(&store, ring(), anchored(dir.path())) {
        Err(AuditError::Refused { reason, .. }) => assert!(reason.contains("missing"), "{reason}"),
        other => panic!("a missing store must be refused, got {other:?}"),
    }
    assert!(!store.exists(), "the refused store was not created");
    // The original, put back, is accepted without anyone's say.
    std::fs::rename(dir.path().join("original"), &store).unwrap();
    let log = AuditLog::open_with(&store, ring(), anchored(dir.path())).unwrap();
    assert_eq!(log.head().0, 4);
}

#[test]
fn a_store_is_never_created_where_none_is_expected() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nonexistent");
    let options = AuditOptions { create: false, ..AuditOptions::default() };
    assert!(matches!(AuditLog::open_with(&missing, ring(), options), Err(AuditError::NoStore(_))));
    assert!(!missing.exists());
}

#[test]
fn records_beyond_the_anchor_are_marked_unanswered() {
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("audit");
    let anchor = dir.path().join("audit-anchor");
    {
        let log = AuditLog::open_with(&store, ring(), anchored(dir.path())).unwrap();
        log.append(event(0)).unwrap();
        log.append(event(1)).unwrap();
    }
    // Records 2 and 3 reach the store but the daemon stops before confirming
    // them (an anchor that lags is what such a stop leaves behind).
    let lagging = std::fs::read(&anchor).unwrap();
    {
        let log = AuditLog::open_with(&store, ring(), anchored(dir.path())).unwrap();
        log.append(event(2)).unwrap();
        log.append(event(3)).unwrap();
    }
    std::fs::write(&anchor, lagging).unwrap();
    let log = AuditLog::open_with(&store, ring(), anchored(dir.path())).unwrap();
    let next = log.append(event(4)).unwrap();
    assert_eq!(next.seq, 5, "the notice comes first");
    let notice = log.get(4).unwrap().unwrap();
    assert_eq!(notice.kind, RecordKind::Unanswered);
    assert_eq!((notice.details["first_seq"].as_u64(), notice.details["last_seq"].as_u64()), (Some(2), Some(3)));
    assert!(log.verify().unwrap().tamper.is_none());
}

#[test]
fn record_times_never_go_backwards_and_a_clock_jump_is_recorded_once() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::at(NOW_MS);
    let log = AuditLog::open_with(dir.path(), ring(), clock.options(None, 30)).unwrap();
    log.append(event(0)).unwrap();
    for (label, wall) in [("one day back", NOW_MS - DAY_MS), ("1970", 0)] {
        clock.set(wall);
        let first = log.append(event(1)).unwrap();
        let second = log.append(event(2)).unwrap();
        let records: Vec<_> = (first.seq - 1..=second.seq).map(|s| log.get(s).unwrap().unwrap()).collect();
        let jumps = records.iter().filter(|r| r.kind == RecordKind::ClockJump).count();
        assert!(jumps <= 1, "{label}: one notice per jump, got {jumps}");
        for r in &records {
            assert!(r.time_ms >= NOW_MS, "{label}: record {} stamped {} (before the last record)", r.seq, r.time);
        }
    }
    // One jump was noticed: 1970, while still behind, is the same jump.
    let all: Vec<_> = (0..log.head().0).map(|s| log.get(s).unwrap().unwrap()).collect();
    let jumps: Vec<_> = all.iter().filter(|r| r.kind == RecordKind::ClockJump).collect();
    assert_eq!(jumps.len(), 1, "{:?}", all.iter().map(|r| r.kind).collect::<Vec<_>>());
    assert!(jumps[0].details["behind_ms"].as_u64().unwrap() >= DAY_MS);
    // The clock catches up: times follow it again, and a new jump is noticed again.
    clock.set(NOW_MS + DAY_MS);
    let caught_up = log.append(event(3)).unwrap();
    assert_eq!(log.get(caught_up.seq).unwrap().unwrap().time_ms, NOW_MS + DAY_MS);
    clock.set(NOW_MS);
    let again = log.append(event(4)).unwrap();
    assert_eq!(log.get(again.seq - 1).unwrap().unwrap().kind, RecordKind::ClockJump);
    assert!(log.verify().unwrap().tamper.is_none());
}

#[test]
fn a_clock_years_ahead_prunes_nothing_the_log_does_not_show_to_be_old() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::at(NOW_MS - 40 * DAY_MS);
    let log = AuditLog::open_with(dir.path(), ring(), clock.options(None, 30)).unwrap();
    for i in 0..5 {
        log.append(event(i)).unwrap();
    }
    clock.set(NOW_MS);
    for i in 5..8 {
        log.append(event(i)).unwrap();
    }
    // The clock jumps 8 years ahead: a manual prune "before now" is held to the
    // floor (30 days before the newest record), named in the error.
    let eight_years = NOW_MS + 8 * 365 * DAY_MS;
    clock.set(eight_years);
    match log.prune(eight_years - 30 * DAY_MS, "officer-1") {
        Err(AuditError::WithinRetention { floor, days, .. }) => {
            assert_eq!(days, 30);
            assert!(floor.starts_with("2026-10-31"), "{floor}");
        }
        other => panic!("expected the retention floor, got {other:?}"),
    }
    assert_eq!(log.head().0, 8, "nothing was written");
    // At the floor, only the 40-day-old records go.
    let summary = log.prune(log.prune_floor_ms(), "officer-1").unwrap();
    assert_eq!(summary.removed, 5);
    let report = log.verify().unwrap();
    assert!(report.tamper.is_none(), "{report:?}");
    assert_eq!((report.pruned, report.first_seq), (5, Some(5)));
}

#[test]
fn concurrent_prunes_never_step_the_checkpoint_back() {
    let dir = tempfile::tempdir().unwrap();
    let clock = FakeClock::at(NOW_MS - 100 * DAY_MS);
    let log = Arc::new(AuditLog::open_with(dir.path(), ring(), clock.options(None, 1)).unwrap());
    for i in 0..60 {
        clock.set(NOW_MS - (100 - i) * DAY_MS);
        log.append(event(i)).unwrap();
    }
    clock.set(NOW_MS);
    log.append(event(99)).unwrap();
    // Many prunings at once with different cut-offs: whatever order they run
    // in, the checkpoint only moves forward and the chain verifies.
    let threads: Vec<_> = (0..8u64)
        .map(|t| {
            let log = log.clone();
            std::thread::spawn(move || {
                let cutoff = NOW_MS - (90 - t * 10) * DAY_MS;
                log.prune(cutoff, "retention-policy").map(|s| s.checkpoint.map(|c| c.through_seq))
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap().unwrap();
    }
    let report = log.verify().unwrap();
    assert!(report.tamper.is_none(), "{report:?}");
    let checkpoint = log.checkpoint().unwrap().unwrap();
    assert_eq!(checkpoint.through_seq, 59, "every record older than the latest cut-off is gone: {checkpoint:?}");
    assert_eq!(checkpoint.pruned_total, 60, "{checkpoint:?}");
}

/// A reader that takes `limit` bytes and then hangs up.
struct HangsUp {
    limit: usize,
    taken: usize,
}

impl std::io::Write for HangsUp {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.taken + buf.len() > self.limit {
            return Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "reader went away"));
        }
        self.taken += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn an_export_is_recorded_before_its_first_record_leaves() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), ring()).unwrap();
    for i in 0..20 {
        log.append(event(i)).unwrap();
    }
    let result = log.export(0, u64::MAX, "officer-1", &mut HangsUp { limit: 300, taken: 0 });
    assert!(result.is_err(), "the export was cut");
    let trace = log.get(20).unwrap().expect("the cut export left its record");
    assert_eq!(trace.kind, RecordKind::Export);
    assert_eq!(trace.operator.as_deref(), Some("officer-1"));
}
