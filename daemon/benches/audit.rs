//! Audit log benchmark: durable appends per second (one writer, and four
//! writers sharing flushes) and verification speed, next to SQLite doing a
//! durable insert of a record of the same size in the same run.
//!
//! `cargo bench -p rxvision-daemon --bench audit`
//!
//! Budgets (design brief): append ≥ 5,000 records/s durable, verify ≥
//! 100,000 records/s.

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use rxvision_daemon::audit::{AuditEvent, AuditKey, AuditLog, KeyRing, RankedClass, RecordKind};

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

fn sqlite_peer(dir: &Path, n: u64, bytes: usize) -> Result<f64, String> {
    let python = std::env::var("RXVISION_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = format!(
        r#"
import os, sqlite3, time
db = sqlite3.connect(os.path.join({dir:?}, "peer.sqlite"), isolation_level=None)
db.execute("PRAGMA journal_mode=WAL"); db.execute("PRAGMA synchronous=FULL")
db.execute("CREATE TABLE audit (seq INTEGER PRIMARY KEY, value BLOB)")
blob = os.urandom({bytes})
t = time.perf_counter()
for i in range({n}):
    db.execute("INSERT INTO audit VALUES (?, ?)", (i, blob))
print({n} / (time.perf_counter() - t))
"#,
        dir = dir.display().to_string()
    );
    let out = Command::new(python).arg("-c").arg(script).output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().map_err(|e| format!("{e}"))
}

fn main() {
    let n: u64 = std::env::var("RXVISION_BENCH_RECORDS").ok().and_then(|v| v.parse().ok()).unwrap_or(3000);
    let dir = tempfile::tempdir().unwrap();
    let keys = || KeyRing::new(AuditKey::from_master(&[42; 32]));

    let log = Arc::new(AuditLog::open(&dir.path().join("single"), keys()).unwrap());
    let t = Instant::now();
    for i in 0..n {
        log.append(event(i)).unwrap();
    }
    let single = n as f64 / t.elapsed().as_secs_f64();

    let shared = Arc::new(AuditLog::open(&dir.path().join("shared"), keys()).unwrap());
    let t = Instant::now();
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let log = shared.clone();
            std::thread::spawn(move || {
                for i in 0..n / 4 {
                    log.append(event(w * n + i)).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let four = (n / 4 * 4) as f64 / t.elapsed().as_secs_f64();

    // Verification over a larger chain (appends without waiting are not the point here).
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
    println!("{:<52} {:>12}", "measure", "records/s");
    println!("{:<52} {:>12.0}", "append, durable, 1 writer", single);
    println!("{:<52} {:>12.0}", "append, durable, 4 writers (shared flushes)", four);
    println!("{:<52} {:>12.0}", format!("verify (tag + chain), {verify_n} records"), verify);
    match sqlite_peer(dir.path(), n, record_bytes) {
        Ok(rate) => println!(
            "{:<52} {:>12.0}   (append 1 writer / SQLite = {:.2}x)",
            "peer: SQLite WAL synchronous=FULL insert, 1 writer",
            rate,
            single / rate
        ),
        Err(why) => println!("peer: SQLite not measured: {why}"),
    }
    println!("budgets: append >= 5,000/s, verify >= 100,000/s");
}
