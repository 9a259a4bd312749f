//! Audit log benchmark: durable appends per second (`fdatasync`ed and
//! anchored before `append` returns) with 1, 4 and 16 concurrent writers
//! sharing syncs, and verification speed, next to SQLite (WAL,
//! `synchronous=FULL`, one transaction per insert, one connection per
//! writer) inserting records of the same size with the same writer counts
//! in the same run.
//!
//! `cargo bench -p rxvision-daemon --bench audit`
//!
//! Budgets (design brief): append ≥ 5,000 records/s durable, verify ≥
//! 100,000 records/s.

use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

#[path = "sqlite_peer.rs"]
mod sqlite_peer;
use sqlite_peer::sqlite_peer;

use rxvision_daemon::audit::{AuditEvent, AuditKey, AuditLog, AuditOptions, KeyRing, RankedClass, RecordKind};

fn event(i: u64) -> AuditEvent {
    let mut e = AuditEvent::new(RecordKind::Verification);
    e.operator = Some("tech-1".into());
    e.rx_ref = Some(format!("RX-{i:08}"));
    e.image_sha256 = Some(format!("{i:064x}"));
    e.model_version = Some("1.0.0".into());
    e.engine = Some("cpu".into());
    e.top_k = (0..3).map(|k| RankedClass { ndc: format!("00093-00{k}8-01"), prob: 0.3 }).collect();
    e.verdict = Some("MATCH".into());
    e.latency_ms = Some(12.5);
    e
}

/// Durable appends per second with `writers` threads on one log.
fn appends(dir: &Path, writers: u64, n: u64, keys: KeyRing) -> f64 {
    let options = AuditOptions { anchor: Some(dir.join(format!("anchor-{writers}"))), ..AuditOptions::default() };
    let log = Arc::new(AuditLog::open_with(&dir.join(format!("log-{writers}")), keys, options).unwrap());
    let t = Instant::now();
    let threads: Vec<_> = (0..writers)
        .map(|w| {
            let log = log.clone();
            std::thread::spawn(move || {
                for i in 0..n / writers {
                    log.append(event(w * n + i)).unwrap();
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().unwrap();
    }
    (n / writers * writers) as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let n: u64 = std::env::var("RXVISION_BENCH_RECORDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3200);
    let dir = tempfile::tempdir().unwrap();
    let keys = || KeyRing::new(AuditKey::from_master(&[42; 32]));
    let ours: Vec<(u64, f64)> = [1, 4, 16].iter().map(|&w| (w, appends(dir.path(), w, n, keys()))).collect();

    // Verification over a larger chain.
    let big = AuditLog::open(&dir.path().join("big"), keys()).unwrap();
    let verify_n = n.max(20_000);
    for i in 0..verify_n {
        big.append(event(i)).unwrap();
    }
    let t = Instant::now();
    let report = big.verify().unwrap();
    let verify = report.checked as f64 / t.elapsed().as_secs_f64();
    assert!(report.tamper.is_none());

    drop(big);
    let record_bytes = {
        let db = sled::open(dir.path().join("big")).unwrap();
        db.open_tree("records").unwrap().get(0u64.to_be_bytes()).unwrap().unwrap().len()
    };
    println!("audit record: {record_bytes} bytes stored (header + AES-256-GCM of the JSON)");
    println!("{:<40} {:>14} {:>14} {:>8}", "durable appends", "ours/s", "SQLite/s", "ratio");
    for (writers, rate) in &ours {
        match sqlite_peer(dir.path(), *writers, n, record_bytes) {
            Ok(peer) => {
                println!("{:<40} {:>14.0} {:>14.0} {:>7.2}x", format!("{writers} writer(s)"), rate, peer, rate / peer)
            }
            Err(why) => println!("{:<40} {:>14.0}   SQLite not measured: {why}", format!("{writers} writer(s)"), rate),
        }
    }
    println!("{:<40} {:>14.0}", format!("verify (tag + chain), {verify_n} records"), verify);
    println!("budgets: append >= 5,000/s with 16 writers, verify >= 100,000/s");
}
