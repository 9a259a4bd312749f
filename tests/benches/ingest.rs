//! Ingest throughput: the time to drain a reconnect backlog (every simulated
//! appliance a day offline) through a real Mosquitto into the fleet's
//! database, on SQLite and on PostgreSQL, next to the raw broker throughput
//! for messages of the same size measured in the same run (one QoS 1
//! publisher to one QoS 1 subscriber through the same broker, rumqttc as the
//! appliances and the ingest use it).
//!
//! `cargo bench -p rxvision-tests --bench ingest`; sizes from the
//! environment: `RXVISION_BENCH_DEVICES` (default 1000),
//! `RXVISION_BENCH_WINDOWS` (default 1440: a day of one-minute windows).

#![allow(missing_docs)]

#[allow(dead_code)]
#[path = "../tests/broker.rs"]
mod broker;
#[allow(dead_code, unused_imports)]
#[path = "../tests/fleet.rs"]
mod fleet;
#[path = "raw_broker.rs"]
mod raw_broker;

use std::io::BufRead;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fleet::{binary, broker_for, database_urls, sim_devices, Ingest, INGEST, SIM_PASSWORD as PASSWORD};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn main() {
    if !broker::tools_present("ingest benchmark") {
        return;
    }
    let devices = env("RXVISION_BENCH_DEVICES", 1000) as usize;
    let windows = env("RXVISION_BENCH_WINDOWS", 1440);
    let dir = tempfile::tempdir().unwrap();
    let state = if std::path::Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let ids = sim_devices("bench", devices, 50);
    println!("ingest benchmark: {devices} devices x {windows} windows offline, then reconnecting");
    for (backend, url) in database_urls(dir.path(), "bench") {
        let run = dir.path().join(&backend);
        std::fs::create_dir_all(&run).unwrap();
        let broker = broker_for("bench", devices, 50);
        let ingest = Ingest::start(&run, broker.port, &url);
        let mut sim = Command::new(binary("rxvision-fleet-sim"))
            .args(["--broker", &format!("mqtt://127.0.0.1:{}", broker.port), "--password", PASSWORD])
            .args(["--prefix", "bench", "--sites", "50", "--devices", &devices.to_string()])
            .args(["--windows", &windows.to_string(), "--interval-ms", "0", "--offline", &format!("0..{windows}")])
            .args(["--events-every", "0", "--ack-timeout-secs", "30", "--drain-timeout-secs", "3600"])
            .arg("--state-dir")
            .arg(state.path().join(&backend))
            .arg("--report")
            .arg(run.join("report.json"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let started = Instant::now();
        let mut drained = None;
        for line in std::io::BufReader::new(sim.stdout.take().unwrap()).lines().map_while(Result::ok) {
            if line.contains("queued") {
                println!("  [{backend}] backlog built in {:.1} s: {line}", started.elapsed().as_secs_f64());
            }
            if let Some(rest) = line.strip_prefix("rxvision-fleet-sim: drained ") {
                let messages: f64 = rest.split(' ').next().unwrap().parse().unwrap();
                let seconds: f64 = rest.rsplit(" in ").next().unwrap().trim_end_matches(" s").parse().unwrap();
                drained = Some((messages, seconds));
            }
        }
        assert!(sim.wait().unwrap().success(), "{backend}: the backlog did not drain");
        let (messages, seconds) = drained.expect("the simulator reports its drain");
        let fleet = ingest.devices();
        let stored: i64 = fleet.values().map(|d| d["base_windows"].as_i64().unwrap()).sum();
        assert_eq!(stored as u64, devices as u64 * windows, "{backend}: every window stored");
        let report: serde_json::Value =
            serde_json::from_slice(&std::fs::read(run.join("report.json")).unwrap()).unwrap();
        let report = report.as_object().unwrap();
        let total_bytes: u64 = report.values().map(|d| d["window_bytes"].as_u64().unwrap()).sum();
        let size = (total_bytes / (devices as u64 * windows)) as usize;
        let raw = raw_broker::raw_broker_rate(
            broker.port,
            INGEST,
            (&ids[0], PASSWORD),
            &ids[0],
            (messages as usize).min(100_000),
            size,
        );
        let rate = messages / seconds;
        println!(
            "  [{backend}] drained {messages:.0} messages of ~{size} bytes in {seconds:.1} s: {rate:.0} messages/s; raw broker {raw:.0} messages/s; ingest/raw {:.2}",
            rate / raw
        );
        drop(ingest);
        drop(broker);
        std::thread::sleep(Duration::from_millis(200));
    }
}
