//! The ingest's batch commit alone ([`Db::commit`]), on SQLite and
//! PostgreSQL in the same run: windows committed per second for the two
//! shapes a fleet sends.
//!
//! - backlog: reconnecting appliances empty their outboxes, so a batch holds
//!   a few devices with many consecutive windows each;
//! - steady: every appliance sends one window a minute plus its status
//!   refresh, so a batch holds one window and one status from each of many
//!   devices.
//!
//! `cargo bench -p rxvision-fleet --bench commit`; RXVISION_BENCH_DEVICES
//! (default 1,000) and RXVISION_BENCH_BACKLOG (windows per device, default 30).
//! PostgreSQL is at 127.0.0.1:5432 (database `test`, trust auth); without it
//! the benchmark says so and measures SQLite alone.

use std::time::Instant;

use rxvision_fleet::classify::Incoming;
use rxvision_fleet::config::DatabaseConfig;
use rxvision_fleet::db::Db;
use rxvision_protocol::{ChainHead, Status, Telemetry};

const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const BATCH: usize = 500;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn golden<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let path = format!("{}/../protocol/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_slice(&std::fs::read(path).expect("golden file")).expect("golden JSON")
}

fn device(k: usize) -> String {
    format!("store-{:04}-counter-{}", k / 3, k % 3 + 1)
}

/// Window `seq` of a device whose chain grows by 7 records a window.
fn window(template: &Telemetry, device: &str, seq: u64) -> Incoming {
    let mut w = template.clone();
    w.device_id = device.into();
    w.seq = seq;
    w.window.start_ms = 1_700_000_000_000 + seq * 60_000;
    w.window.end_ms = w.window.start_ms + 60_000;
    w.audit = ChainHead { next_seq: seq * 7, head: format!("{:064x}", seq) };
    Incoming::Telemetry(w)
}

fn status(template: &Status, device: &str, seq: u64) -> Incoming {
    let mut s = template.clone();
    s.device_id = device.into();
    s.time_ms = 1_700_000_000_000 + (seq + 1) * 60_000;
    s.audit = Some(ChainHead { next_seq: seq * 7, head: format!("{:064x}", seq) });
    Incoming::Status(s)
}

async fn measure(url: &str, devices: usize, backlog: usize) -> (f64, f64) {
    let db = Db::open(&DatabaseConfig { url: url.into(), max_connections: 4 }).await.expect("database opens");
    let telemetry: Telemetry = golden("telemetry.json");
    let status_template: Status = golden("status.json");

    // Backlog: device after device, each with its queued windows in order.
    let messages: Vec<Incoming> = (0..devices)
        .flat_map(|k| {
            let id = device(k);
            (1..=backlog as u64).map(move |seq| (id.clone(), seq))
        })
        .map(|(id, seq)| window(&telemetry, &id, seq))
        .collect();
    let start = Instant::now();
    for (n, batch) in messages.chunks(BATCH).enumerate() {
        let committed = db.commit(batch, &[], 1_000 + n as u64).await.expect("commit");
        assert_eq!(committed.stored as usize, batch.len(), "every backlog window is new");
    }
    let backlog_rate = messages.len() as f64 / start.elapsed().as_secs_f64();

    // Steady: one window and one status per device, device after device.
    let next = backlog as u64 + 1;
    let messages: Vec<Incoming> = (0..devices)
        .flat_map(|k| {
            let id = device(k);
            [window(&telemetry, &id, next), status(&status_template, &id, next)]
        })
        .collect();
    let start = Instant::now();
    for (n, batch) in messages.chunks(BATCH).enumerate() {
        let committed = db.commit(batch, &[], 10_000_000 + n as u64).await.expect("commit");
        assert_eq!(committed.stored as usize, batch.len() / 2, "every steady window is new");
    }
    let steady_rate = devices as f64 / start.elapsed().as_secs_f64();
    db.close().await;
    (backlog_rate, steady_rate)
}

#[tokio::main]
async fn main() {
    let devices = env("RXVISION_BENCH_DEVICES", 1_000);
    let backlog = env("RXVISION_BENCH_BACKLOG", 30);
    sqlx::any::install_default_drivers();
    println!("batch commit benchmark: {devices} devices, {backlog} queued windows each, {BATCH} messages a batch");
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut urls = vec![("SQLite", format!("sqlite://{}/fleet.db", dir.path().display()))];
    match <sqlx::AnyConnection as sqlx::Connection>::connect(PG_ADMIN_URL).await {
        Ok(mut admin) => {
            let name = "rxfleet_bench_commit";
            sqlx::Executor::execute(&mut admin, format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)").as_str())
                .await
                .expect("drop the old benchmark database");
            sqlx::Executor::execute(&mut admin, format!("CREATE DATABASE {name}").as_str())
                .await
                .expect("create the benchmark database");
            urls.push(("PostgreSQL", format!("postgres://postgres@127.0.0.1:5432/{name}")));
        }
        Err(e) => println!("PostgreSQL not measured (127.0.0.1:5432 unreachable: {e})"),
    }
    for (name, url) in urls {
        let (backlog_rate, steady_rate) = measure(&url, devices, backlog).await;
        println!(
            "  [{name}] backlog {backlog_rate:.0} windows/s; steady {steady_rate:.0} windows/s (with as many statuses)"
        );
    }
}
