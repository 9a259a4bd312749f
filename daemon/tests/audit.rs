//! The audit log: durability across reopen, tamper detection, export, pruning, keys.

use std::path::Path;

use rxvision_daemon::audit::{AuditEvent, AuditKey, AuditLog, AuditOptions, KeyRing, RankedClass, RecordKind};

fn ring(seed: u8) -> KeyRing {
    KeyRing::new(AuditKey::from_master(&[seed; 32]))
}

fn verification(i: u64) -> AuditEvent {
    let mut event = AuditEvent::new(RecordKind::Verification);
    event.operator = Some(format!("tech-{}", i % 3));
    event.rx_ref = Some(format!("RX-{i:06}"));
    event.image_sha256 = Some(format!("{i:064x}"));
    event.model_version = Some("0.1.0".into());
    event.engine = Some("cpu".into());
    event.top_k = vec![RankedClass { ndc: "fixture-00".into(), prob: 0.9 }];
    event.verdict = Some("MATCH".into());
    event.latency_ms = Some(4.2);
    event
}

/// A store with `n` verifications, closed again.
fn store_with(dir: &Path, n: u64) {
    let log = AuditLog::open(dir, ring(1)).unwrap();
    for i in 0..n {
        assert_eq!(log.append(verification(i)).unwrap().seq, i);
    }
}

/// Opens a closed store's raw database, waiting for the previous handle's
/// background flusher to let go of the lock.
pub fn raw_open(dir: &Path) -> sled::Db {
    for _ in 0..150 {
        match sled::open(dir) {
            Ok(db) => return db,
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
    sled::open(dir).unwrap()
}

/// Edits the raw records tree of a closed store.
fn tamper(dir: &Path, edit: impl FnOnce(&sled::Tree)) {
    let db = raw_open(dir);
    let records = db.open_tree("records").unwrap();
    edit(&records);
    db.flush().unwrap();
}

fn first_bad(dir: &Path) -> Option<(u64, String)> {
    let log = AuditLog::open(dir, ring(1)).unwrap();
    log.verify().unwrap().tamper.map(|t| (t.seq, t.reason))
}

fn key(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

#[test]
fn records_survive_reopening_and_the_chain_continues() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 5);
    let log = AuditLog::open(dir.path(), ring(1)).unwrap();
    assert_eq!(log.head().0, 5);
    assert_eq!(log.append(verification(5)).unwrap().seq, 5);
    let report = log.verify().unwrap();
    assert_eq!(report.checked, 6);
    assert_eq!((report.first_seq, report.last_seq), (Some(0), Some(5)));
    assert!(report.tamper.is_none());
    assert_eq!(report.head_hash, log.head().1.iter().map(|b| format!("{b:02x}")).collect::<String>());
}

#[test]
fn a_flipped_byte_anywhere_in_a_record_names_that_record() {
    let pristine = tempfile::tempdir().unwrap();
    store_with(pristine.path(), 6);
    let len = raw_open(pristine.path()).open_tree("records").unwrap().get(key(3)).unwrap().unwrap().len();
    for at in [0, 5, 13, 20, 30, 59, 60, len / 2, len - 1] {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(pristine.path(), dir.path());
        tamper(dir.path(), |records| {
            let mut value = records.get(key(3)).unwrap().unwrap().to_vec();
            value[at] ^= 0x10;
            records.insert(key(3), value).unwrap();
        });
        let (seq, reason) = first_bad(dir.path()).unwrap_or_else(|| panic!("flip at byte {at} went unnoticed"));
        assert_eq!(seq, 3, "flip at byte {at}: {reason}");
    }
}

#[test]
fn a_removed_record_is_named() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 6);
    tamper(dir.path(), |records| {
        records.remove(key(2)).unwrap();
    });
    let (seq, reason) = first_bad(dir.path()).unwrap();
    assert_eq!(seq, 2, "{reason}");
    assert!(reason.contains("missing"), "{reason}");
}

#[test]
fn reordered_records_are_named() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 6);
    tamper(dir.path(), |records| {
        let a = records.get(key(3)).unwrap().unwrap();
        let b = records.get(key(4)).unwrap().unwrap();
        records.insert(key(3), b).unwrap();
        records.insert(key(4), a).unwrap();
    });
    let (seq, reason) = first_bad(dir.path()).unwrap();
    assert_eq!(seq, 3, "{reason}");
}

#[test]
fn a_replayed_record_is_named_in_place_or_at_the_end() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 6);
    tamper(dir.path(), |records| {
        let old = records.get(key(1)).unwrap().unwrap();
        records.insert(key(4), old).unwrap();
    });
    assert_eq!(first_bad(dir.path()).unwrap().0, 4);

    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 6);
    tamper(dir.path(), |records| {
        let old = records.get(key(2)).unwrap().unwrap();
        records.insert(key(6), old).unwrap();
    });
    assert_eq!(first_bad(dir.path()).unwrap().0, 6);
}

#[test]
fn a_record_forged_with_a_valid_layout_but_no_key_fails_authentication() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 3);
    tamper(dir.path(), |records| {
        let mut value = records.get(key(2)).unwrap().unwrap().to_vec();
        let body = value.len() - 60;
        value.truncate(60);
        value.extend(std::iter::repeat_n(0x41, body));
        records.insert(key(2), value).unwrap();
    });
    let (seq, reason) = first_bad(dir.path()).unwrap();
    assert_eq!(seq, 2);
    assert!(reason.contains("authentication failed"), "{reason}");
}

#[test]
fn records_under_a_rotated_key_stay_readable_with_the_old_key_loaded() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 3);
    {
        let log = AuditLog::open(dir.path(), ring(2).with_previous(AuditKey::from_master(&[1; 32]))).unwrap();
        log.append(verification(3)).unwrap();
        assert!(log.verify().unwrap().tamper.is_none());
    }
    let log = AuditLog::open(dir.path(), ring(2)).unwrap();
    let tamper = log.verify().unwrap().tamper.unwrap();
    assert_eq!(tamper.seq, 0);
    assert!(tamper.reason.contains("not loaded"), "{}", tamper.reason);
}

#[test]
fn export_writes_decrypted_jsonl_for_the_range_without_prescription_numbers_and_is_audited() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::open(dir.path(), ring(1)).unwrap();
    for i in 0..4 {
        log.append(verification(i)).unwrap();
    }
    let mut out = Vec::new();
    let summary = log.export(0, u64::MAX, "compliance-1", &mut out).unwrap();
    assert_eq!((summary.count, summary.first_seq, summary.last_seq, summary.audit_seq), (4, Some(0), Some(3), 4));
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.lines().count(), 4);
    assert!(!text.contains("RX-000001"), "prescription references must not appear in clear");
    let first: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert_eq!(first["rx_ref_hmac"], log.pseudonym("RX-000000"));
    assert_eq!(first["verdict"], "MATCH");
    assert_eq!(first["kind"], "verification");

    let mut none = Vec::new();
    assert_eq!(log.export(0, 1, "compliance-1", &mut none).unwrap().count, 0);
    assert!(none.is_empty());
    let mut all = Vec::new();
    log.export(0, u64::MAX, "compliance-1", &mut all).unwrap();
    let kinds: Vec<String> = String::from_utf8(all)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["kind"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(kinds.iter().filter(|k| *k == "export").count(), 2, "{kinds:?}");
}

#[test]
fn export_refuses_a_tampered_chain() {
    let dir = tempfile::tempdir().unwrap();
    store_with(dir.path(), 4);
    tamper(dir.path(), |records| {
        records.remove(key(1)).unwrap();
    });
    let log = AuditLog::open(dir.path(), ring(1)).unwrap();
    let err = log.export(0, u64::MAX, "compliance-1", &mut Vec::new()).unwrap_err();
    assert!(err.to_string().contains("record 1"), "{err}");
}

#[test]
fn pruning_keeps_the_rest_of_the_chain_verifiable_and_a_forged_checkpoint_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    {
        // No retention floor: this test prunes records a few milliseconds old.
        let options = AuditOptions { retention_floor: std::time::Duration::ZERO, ..AuditOptions::default() };
        let log = AuditLog::open_with(dir.path(), ring(1), options).unwrap();
        for i in 0..5 {
            log.append(verification(i)).unwrap();
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        let cutoff = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        std::thread::sleep(std::time::Duration::from_millis(5));
        for i in 5..8 {
            log.append(verification(i)).unwrap();
        }
        let summary = log.prune(cutoff, "admin").unwrap();
        assert_eq!(summary.removed, 5);
        assert_eq!(summary.audit_seq, Some(8));
        let checkpoint = summary.checkpoint.unwrap();
        assert_eq!((checkpoint.through_seq, checkpoint.next_seq, checkpoint.pruned_total), (4, 5, 5));
        let report = log.verify().unwrap();
        assert!(report.tamper.is_none(), "{:?}", report.tamper);
        assert_eq!((report.first_seq, report.last_seq, report.pruned), (Some(5), Some(8), 5));
        // Nothing else is old enough: no change, no record.
        let again = log.prune(cutoff, "admin").unwrap();
        assert_eq!((again.removed, again.audit_seq), (0, None));
        assert_eq!(log.head().0, 9);
    }
    // Reopen: the chain continues after the pruned prefix.
    {
        let log = AuditLog::open(dir.path(), ring(1)).unwrap();
        assert_eq!(log.append(verification(9)).unwrap().seq, 9);
        assert!(log.verify().unwrap().tamper.is_none());
    }
    // Forge the checkpoint to hide more records.
    let db = raw_open(dir.path());
    let meta = db.open_tree("meta").unwrap();
    let mut checkpoint: serde_json::Value = serde_json::from_slice(&meta.get("checkpoint").unwrap().unwrap()).unwrap();
    checkpoint["next_seq"] = 7.into();
    checkpoint["through_seq"] = 6.into();
    meta.insert("checkpoint", serde_json::to_vec(&checkpoint).unwrap()).unwrap();
    db.flush().unwrap();
    drop((meta, db));
    let log = AuditLog::open(dir.path(), ring(1)).unwrap();
    let tamper = log.verify().unwrap().tamper.unwrap();
    assert!(tamper.reason.contains("checkpoint"), "{}", tamper.reason);
}

fn copy_dir(from: &Path, to: &Path) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}
