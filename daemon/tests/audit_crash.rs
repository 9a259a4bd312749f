//! Durability under `kill -9`: a writer process appends audit records as fast
//! as it can and prints each sequence number once `append` has returned (the
//! moment the API will answer). It is killed with SIGKILL at a random moment,
//! again and again; after every kill the store must hold every acknowledged
//! record and the chain must verify.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rxvision_daemon::audit::{AuditEvent, AuditKey, AuditLog, KeyRing, RecordKind};

const CHILD_ENV: &str = "RXVISION_AUDIT_CRASH_CHILD_DIR";

fn keys() -> KeyRing {
    KeyRing::new(AuditKey::from_master(&[77; 32]))
}

/// The writer. Runs only when the parent test starts this binary with the
/// environment variable set; as a normal test it returns at once.
#[test]
fn crash_writer_child() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else { return };
    let log = AuditLog::open(Path::new(&dir), keys()).unwrap();
    let mut out = std::io::stdout().lock();
    for i in 0.. {
        let mut event = AuditEvent::new(RecordKind::Verification);
        event.rx_ref = Some(format!("RX-{i}"));
        event.verdict = Some("MATCH".into());
        let appended = log.append(event).unwrap();
        std::io::Write::write_all(&mut out, format!("ACK {}\n", appended.seq).as_bytes()).unwrap();
        std::io::Write::flush(&mut out).unwrap();
    }
}

#[test]
fn every_acknowledged_record_survives_sigkill_and_the_chain_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let rounds = 12;
    let mut total_acked = 0;
    for round in 0..rounds {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "audit_crash::crash_writer_child", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let reader = std::thread::spawn(move || {
            BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
                .filter_map(|l| l.strip_prefix("ACK ").and_then(|s| s.parse::<u64>().ok()))
                .max()
        });
        // Kill at a different moment each round (some before the first ack).
        let delay = Duration::from_millis(20 + (round * 37 % 160) as u64);
        let started = Instant::now();
        while started.elapsed() < delay {
            std::thread::sleep(Duration::from_millis(2));
        }
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        let last_acked = reader.join().unwrap();

        let log = AuditLog::open(dir.path(), keys()).unwrap();
        let report = log.verify().unwrap();
        assert!(report.tamper.is_none(), "round {round}: {:?}", report.tamper);
        if let Some(acked) = last_acked {
            let last = report.last_seq.expect("acknowledged records exist");
            assert!(last >= acked, "round {round}: record {acked} was acknowledged but the store ends at {last}");
            total_acked += 1;
        }
        println!(
            "round {round}: killed after {delay:?}, last ack {last_acked:?}, store holds {} records",
            report.checked
        );
    }
    assert!(total_acked >= rounds / 2, "the writer rarely got to acknowledge anything; the test proves little");
}
