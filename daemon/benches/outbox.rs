//! Outbox benchmark: durable appends of telemetry windows per second (each
//! synced before `push` returns, with the budget policy applied), and the
//! drain rate (a `seq` given and synced per message, removal synced per
//! acknowledgement of the in-flight window, as the link does), next to
//! SQLite (WAL, `synchronous=FULL`, one transaction per insert) inserting
//! records of the same size in the same run.
//!
//! `cargo bench -p rxvision-daemon --bench outbox`

#![allow(missing_docs)]

#[path = "sqlite_peer.rs"]
mod sqlite_peer;

use std::time::Instant;

use rxvision_daemon::outbox::{MessageKind, Outbox};
use rxvision_daemon::telemetry::{finalize, merge_windows};

const WINDOWS: u64 = 3000;
const IN_FLIGHT: usize = 32;

fn main() {
    let golden =
        std::fs::read(concat!(env!("CARGO_MANIFEST_DIR"), "/../protocol/tests/golden/telemetry.json")).unwrap();
    let window: serde_json::Value = serde_json::from_slice(&golden).unwrap();
    let payload = serde_json::to_vec(&window).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let outbox = Outbox::open(&dir.path().join("outbox"), IN_FLIGHT).unwrap();
    let started = Instant::now();
    for i in 0..WINDOWS {
        outbox.push(MessageKind::Window, i, &payload).unwrap();
        outbox.enforce_budget(64 << 20, merge_windows).unwrap();
    }
    let appends = WINDOWS as f64 / started.elapsed().as_secs_f64();
    let started = Instant::now();
    outbox.connected();
    let mut drained = 0;
    while drained < WINDOWS {
        let mut highest = 0;
        while let Some((seq, _, _)) = outbox.next_to_send(finalize).unwrap() {
            outbox.sent(seq);
            highest = seq;
        }
        outbox.ack(highest).unwrap();
        drained = highest;
    }
    let drain = WINDOWS as f64 / started.elapsed().as_secs_f64();
    assert_eq!(outbox.depth().0, 0, "everything acknowledged");
    println!("outbox: {WINDOWS} windows of {} bytes", payload.len());
    match sqlite_peer::sqlite_peer(dir.path(), 1, WINDOWS, payload.len()) {
        Ok(peer) => {
            println!(
                "  append {appends:.0} windows/s durable; SQLite {peer:.0} inserts/s; ratio {:.2}",
                appends / peer
            );
            println!(
                "  drain  {drain:.0} windows/s ({IN_FLIGHT} in flight per ack); ratio to SQLite inserts {:.2}",
                drain / peer
            );
        }
        Err(e) => {
            println!("  append {appends:.0} windows/s durable; drain {drain:.0} windows/s");
            println!("  (no SQLite peer: {e})");
        }
    }
}
