//! The fleet under load: `rxfleet serve` (external Mosquitto, SQLite then
//! PostgreSQL) with N appliances each sending one telemetry window a
//! minute: the sustained ingest rate, the ack latency (publish → the
//! fleet's ack covering it), the fleet's and the broker's CPU and memory,
//! the API's and dashboard's p95 under that load, then a reconnect backlog
//! (every device sends B queued windows at once) and its drain time, next
//! to the raw broker throughput for messages of the same size in the same
//! run.
//!
//! `cargo bench -p rxvision-tests --bench fleet_load`; from the environment:
//! `RXVISION_BENCH_DEVICES` (default 10000), `RXVISION_BENCH_CONNECTIONS`
//! (default: one per device; fewer: the devices' traffic shares that many
//! connections of a benchmark account allowed on every device's topics —
//! how 100,000 devices fit a machine's 20,000 file descriptors),
//! `RXVISION_BENCH_SECONDS` (steady phase, default 120),
//! `RXVISION_BENCH_BACKLOG` (windows per device queued offline, default 30).

#![allow(missing_docs)]

#[allow(dead_code)]
#[path = "../tests/broker.rs"]
mod broker;
#[allow(dead_code, unused_imports)]
#[path = "../tests/fleet.rs"]
mod fleet;
#[allow(dead_code, unused_imports)]
#[path = "raw_broker.rs"]
mod raw_broker;

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use rxvision_protocol::{
    encode, feature_bounds, Ack, ChainHead, Feedback, Histogram, OutboxLosses, Status, Telemetry, Window,
    CONFIDENCE_BOUNDS, LATENCY_BOUNDS_MS, PROTOCOL_VERSION,
};

const PASSWORD: &str = "bench-device-secret";
const LOADGEN: &str = "rxbench-loadgen";

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// A realistic window (~2 KB: verdicts, histograms, drift features).
fn window(device: &str, seq: u64, end_ms: u64) -> Vec<u8> {
    let mut latency = Histogram::new(&LATENCY_BOUNDS_MS);
    let mut confidence = Histogram::new(&CONFIDENCE_BOUNDS);
    for k in 0..20u64 {
        latency.observe(8.0 + (k % 7) as f64);
        confidence.observe(0.9 + (k % 9) as f64 * 0.01);
    }
    let features = feature_bounds()
        .into_iter()
        .map(|(name, bounds)| {
            let mut h = Histogram::new(&bounds);
            for k in 0..20 {
                h.observe(bounds[k % bounds.len()]);
            }
            (name.to_string(), h)
        })
        .collect();
    let head: String = format!("{:016x}", seq.wrapping_mul(0x9E37_79B9_7F4A_7C15)).repeat(4);
    let telemetry = Telemetry {
        v: PROTOCOL_VERSION,
        device_id: device.to_string(),
        seq,
        window: Window { start_ms: end_ms - 60_000, end_ms, windows: 1 },
        model_version: "0.4.0".into(),
        engine: "cpu".into(),
        scans: 20,
        verdicts: BTreeMap::from([("MATCH".into(), 17), ("UNCERTAIN".into(), 2), ("BAD_IMAGE".into(), 1)]),
        refusals: BTreeMap::from([("blurred".into(), 1)]),
        latency_ms: latency,
        confidence,
        classes: BTreeMap::from([("00008-0841-81".into(), 12), ("00069-4210-30".into(), 7)]),
        features,
        feedback: Feedback { confirmed: BTreeMap::from([("MATCH".into(), 1)]), corrected: BTreeMap::new() },
        engine_fallbacks: 0,
        operators: BTreeMap::from([("a1b2c3d4".into(), 20)]),
        audit: ChainHead { next_seq: seq * 20, head },
        outbox: OutboxLosses::default(),
    };
    encode(&telemetry).unwrap()
}

/// What the load generator measures.
#[derive(Default)]
struct Tracker {
    /// Per device: seq → when it was published.
    pending: Mutex<HashMap<String, BTreeMap<u64, Instant>>>,
    /// Ack latencies, ms.
    latencies: Mutex<Vec<f64>>,
    /// Per device: the highest seq sent.
    last: Mutex<HashMap<String, u64>>,
    /// Per device: since when it waits for an ack without progress (the
    /// appliance's link sends everything unacknowledged again after the ack
    /// timeout without progress).
    waiting_since: Mutex<HashMap<String, Instant>>,
    acked: AtomicU64,
    sent: AtomicU64,
}

impl Tracker {
    fn sent(&self, device: &str, seq: u64) {
        let mut pending = self.pending.lock().unwrap();
        let seqs = pending.entry(device.to_string()).or_default();
        if seqs.is_empty() {
            self.waiting_since.lock().unwrap().insert(device.to_string(), Instant::now());
        }
        seqs.insert(seq, Instant::now());
        self.last.lock().unwrap().insert(device.to_string(), seq);
        self.sent.fetch_add(1, Ordering::Relaxed);
    }

    fn ack(&self, payload: &[u8]) {
        let Ok(ack) = serde_json::from_slice::<Ack>(payload) else { return };
        let now = Instant::now();
        let mut pending = self.pending.lock().unwrap();
        let Some(seqs) = pending.get_mut(&ack.device_id) else { return };
        let done: Vec<u64> = seqs.range(..=ack.seq).map(|(s, _)| *s).collect();
        if !done.is_empty() {
            self.waiting_since.lock().unwrap().insert(ack.device_id.clone(), now);
        }
        let mut latencies = self.latencies.lock().unwrap();
        for seq in done {
            let sent = seqs.remove(&seq).unwrap();
            latencies.push(now.duration_since(sent).as_secs_f64() * 1000.0);
            self.acked.fetch_add(1, Ordering::Relaxed);
        }
    }
}

fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[((values.len() as f64 * q) as usize).min(values.len() - 1)]
}

/// CPU seconds and resident MB of a process.
fn usage(pid: u32) -> (f64, f64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    let ticks: f64 = fields.get(11).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        + fields.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    (ticks / 100.0, rss_kb / 1024.0)
}

/// The devices' connections: one per device (its own account), or fewer
/// of the benchmark account.
struct Loadgen {
    clients: Vec<AsyncClient>,
    /// Device ids by connection.
    devices: Vec<Vec<String>>,
}

async fn connect(port: u16, connections: usize, ids: &[String], tracker: Arc<Tracker>) -> Loadgen {
    let per_device = connections == ids.len();
    let mut clients = Vec::new();
    let mut devices: Vec<Vec<String>> = vec![Vec::new(); connections];
    for (n, id) in ids.iter().enumerate() {
        devices[n % connections].push(id.clone());
    }
    for (c, own) in devices.iter().enumerate() {
        let (user, client_id) = if per_device {
            (own[0].clone(), format!("rxvisiond-{}", own[0]))
        } else {
            (LOADGEN.into(), format!("bench-{c}"))
        };
        let mut options = MqttOptions::new(client_id, "127.0.0.1", port);
        options.set_credentials(user, if per_device { PASSWORD } else { PASSWORD });
        options.set_keep_alive(Duration::from_secs(60));
        options.set_max_packet_size(1 << 20, 1 << 20);
        options.set_inflight(100);
        let (client, mut events) = AsyncClient::new(options, 1000);
        let ack_topic = if per_device { format!("rxv/v1/dev/{}/ack", own[0]) } else { "rxv/v1/dev/+/ack".into() };
        if per_device || c == 0 {
            client.subscribe(ack_topic, QoS::AtLeastOnce).await.unwrap();
        }
        let tracker = tracker.clone();
        tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => tracker.ack(&p.payload),
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
                }
            }
        });
        for id in own {
            let status = Status { time_ms: now_ms(), ..Status::last_will(id, now_ms()) };
            let status = Status { online: true, ..status };
            client
                .publish(format!("rxv/v1/dev/{id}/status"), QoS::AtLeastOnce, true, encode(&status).unwrap())
                .await
                .unwrap();
        }
        clients.push(client);
        if c % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Loadgen { clients, devices }
}

/// One API request: its latency in ms and its body (HTTP/1.1, its own connection).
fn get(addr: SocketAddr, path: &str, token: &str) -> (f64, String) {
    let started = Instant::now();
    let mut stream = TcpStream::connect(addr).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    let text = String::from_utf8_lossy(&response).to_string();
    assert!(text.starts_with("HTTP/1.1 200"), "{path}: {}", &text[..300.min(text.len())]);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (started.elapsed().as_secs_f64() * 1000.0, body)
}

fn main() {
    if !broker::tools_present("fleet load benchmark") {
        return;
    }
    let devices = env("RXVISION_BENCH_DEVICES", 10_000) as usize;
    let connections = env("RXVISION_BENCH_CONNECTIONS", devices as u64).clamp(1, devices as u64) as usize;
    let seconds = env("RXVISION_BENCH_SECONDS", 120);
    let backlog = env("RXVISION_BENCH_BACKLOG", 30);
    let ids: Vec<String> = (0..devices).map(|n| format!("load-s{:04}-c{n:06}", n % 2000)).collect();
    let hash = rxvision_fleet::devices::hash_password(PASSWORD);
    let mut passwd =
        format!("{}:{}\n{LOADGEN}:{hash}\n", fleet::INGEST.0, rxvision_fleet::devices::hash_password(fleet::INGEST.1));
    if connections == devices {
        for id in &ids {
            passwd.push_str(&format!("{id}:{hash}\n"));
        }
    }
    let loadgen_acl = format!(
        "user {LOADGEN}\ntopic write rxv/v1/dev/+/status\ntopic write rxv/v1/dev/+/telemetry\ntopic read rxv/v1/dev/+/ack\n"
    );
    println!(
        "fleet load benchmark: {devices} devices over {connections} connections, one window a minute each for {seconds} s, then {backlog} queued windows each"
    );
    let dir = tempfile::tempdir().unwrap();
    for (backend, url) in fleet::database_urls(dir.path(), "load") {
        let run = dir.path().join(&backend);
        std::fs::create_dir_all(&run).unwrap();
        let broker = broker::Broker::start_with_passwd(&passwd, &loadgen_acl);
        let password_file = run.join("ingest.password");
        std::fs::write(&password_file, fleet::INGEST.1).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&password_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = run.join("rxfleet.toml");
        std::fs::write(
            &config,
            format!(
                "[fleet]\nstate_dir = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n[database]\nurl = {url:?}\nmax_connections = 8\n\
                 [broker]\nmode = \"external\"\nurl = \"mqtt://127.0.0.1:{}\"\npassword_file = {:?}\n\
                 client_id = \"rxfleet-load-{}\"\n",
                run.display().to_string(),
                broker.port,
                password_file.display().to_string(),
                std::process::id()
            ),
        )
        .unwrap();
        // Every device registered at its pharmacy, as an installer onboards a chain.
        let csv = run.join("devices.csv");
        let rows: Vec<String> = ids.iter().map(|id| format!("{},{id}", &id[..10])).collect();
        std::fs::write(&csv, format!("site,device_id\n{}\n", rows.join("\n"))).unwrap();
        let started = Instant::now();
        let import = std::process::Command::new(fleet::binary("rxfleet"))
            .args(["devices", "import", "--config"])
            .arg(&config)
            .arg(&csv)
            .arg("--out")
            .arg(run.join("devices"))
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(import.success(), "{backend}: devices import");
        println!(
            "  [{backend}] {devices} devices registered at {} sites by `rxfleet devices import` in {:.1} s",
            devices.min(2000),
            started.elapsed().as_secs_f64()
        );
        let mut serve = std::process::Command::new(fleet::binary("rxfleet"))
            .args(["serve", "--config"])
            .arg(&config)
            .env("RUST_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = serve.stderr.take().unwrap();
        let log_path = std::env::temp_dir().join(format!("rxfleet-load-{backend}.log"));
        println!("  [{backend}] rxfleet's log: {}", log_path.display());
        std::thread::spawn(move || {
            use std::io::BufRead;
            let mut log = std::fs::File::create(log_path).unwrap();
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = writeln!(log, "{line}");
                if let Some(rest) = line.strip_prefix("rxfleet: dashboard http://") {
                    let _ = tx.send(rest.split('/').next().unwrap().to_string());
                }
            }
        });
        let http: SocketAddr = rx.recv_timeout(Duration::from_secs(30)).unwrap().parse().unwrap();
        let token = {
            let out = std::process::Command::new(fleet::binary("rxfleet"))
                .args(["tokens", "create", "--role", "admin", "--name", "bench", "--config"])
                .arg(&config)
                .output()
                .unwrap();
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        };

        let runtime = tokio::runtime::Runtime::new().unwrap();
        let tracker = Arc::new(Tracker::default());
        let started = Instant::now();
        let load = runtime.block_on(connect(broker.port, connections, &ids, tracker.clone()));
        println!("  [{backend}] {connections} connections up in {:.1} s", started.elapsed().as_secs_f64());
        // Every device's status reaches the fleet before the clock starts.
        loop {
            let (_, body) = get(http, "/api/v1/fleet", &token);
            let summary: serde_json::Value = serde_json::from_str(&body).unwrap();
            if summary["devices"]["online"].as_u64() == Some(devices as u64) {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(600),
                "the fleet does not see every device online: {summary}"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        println!(
            "  [{backend}] the fleet sees {devices} devices online after {:.1} s",
            started.elapsed().as_secs_f64()
        );

        // Steady: every device one window a minute, spread evenly.
        let stop = Arc::new(AtomicBool::new(false));
        let api_samples: Arc<Mutex<BTreeMap<&'static str, Vec<f64>>>> = Arc::default();
        let api_thread = {
            let (stop, samples, token) = (stop.clone(), api_samples.clone(), token.clone());
            let some_device = ids[devices / 2].clone();
            std::thread::spawn(move || {
                let paths: [(&'static str, String); 6] = [
                    ("dashboard /", "/".into()),
                    ("fleet", "/api/v1/fleet".into()),
                    ("sites", "/api/v1/sites".into()),
                    ("devices page", "/api/v1/devices?limit=100&sort=backlog&order=desc".into()),
                    ("device", format!("/api/v1/devices/{some_device}")),
                    ("device telemetry", format!("/api/v1/devices/{some_device}/telemetry")),
                ];
                while !stop.load(Ordering::Relaxed) {
                    for (name, path) in &paths {
                        let (ms, _) = get(http, path, &token);
                        samples.lock().unwrap().entry(name).or_default().push(ms);
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            })
        };
        let (fleet_cpu0, _) = usage(serve.id());
        let (broker_cpu0, _) = usage(broker.pid());
        let steady = Instant::now();
        runtime.block_on(async {
            let mut tasks = Vec::new();
            for (client, own) in load.clients.iter().zip(&load.devices) {
                let (client, own, tracker) = (client.clone(), own.clone(), tracker.clone());
                tasks.push(tokio::spawn(async move {
                    // A connection's devices take turns within the minute, from
                    // an offset stable per connection; device j's k-th window
                    // goes at offset + j·slot + k minutes, until the deadline.
                    let slot_ms = 60_000 / own.len().max(1) as u64;
                    let offset = rand_offset(&own[0]) % slot_ms.max(1);
                    let start = tokio::time::Instant::now();
                    let deadline = start + Duration::from_secs(seconds);
                    'minutes: for k in 0u64.. {
                        let seq = k + 1;
                        for (j, id) in own.iter().enumerate() {
                            let at = start + Duration::from_millis(offset + j as u64 * slot_ms + k * 60_000);
                            if at >= deadline {
                                break 'minutes;
                            }
                            tokio::time::sleep_until(at).await;
                            tracker.sent(id, seq);
                            let payload = window(id, seq, now_ms());
                            let _ = client
                                .publish(format!("rxv/v1/dev/{id}/telemetry"), QoS::AtLeastOnce, false, payload)
                                .await;
                        }
                    }
                }));
            }
            for task in tasks {
                let _ = task.await;
            }
        });
        let elapsed = steady.elapsed().as_secs_f64();
        // Let the last acks arrive.
        let wait = Instant::now();
        while tracker.acked.load(Ordering::Relaxed) < tracker.sent.load(Ordering::Relaxed)
            && wait.elapsed() < Duration::from_secs(60)
        {
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, Ordering::Relaxed);
        api_thread.join().unwrap();
        let (fleet_cpu1, fleet_rss) = usage(serve.id());
        let (broker_cpu1, broker_rss) = usage(broker.pid());
        let sent = tracker.sent.load(Ordering::Relaxed);
        let acked = tracker.acked.load(Ordering::Relaxed);
        let mut latencies = std::mem::take(&mut *tracker.latencies.lock().unwrap());
        println!(
            "  [{backend}] steady: {sent} windows in {elapsed:.0} s = {:.0} windows/s sent, {acked} acked; ack latency p50 {:.0} ms p95 {:.0} ms; rxfleet {:.2} cores {:.0} MB RSS, mosquitto {:.2} cores {:.0} MB",
            sent as f64 / elapsed,
            percentile(&mut latencies, 0.5),
            percentile(&mut latencies, 0.95),
            (fleet_cpu1 - fleet_cpu0) / elapsed,
            fleet_rss,
            (broker_cpu1 - broker_cpu0) / elapsed,
            broker_rss
        );
        for (name, samples) in api_samples.lock().unwrap().iter_mut() {
            println!(
                "  [{backend}] API under load: {name:<16} p50 {:.1} ms p95 {:.1} ms ({} requests)",
                percentile(samples, 0.5),
                percentile(samples, 0.95),
                samples.len()
            );
        }
        assert_eq!(acked, sent, "{backend}: every window acknowledged");

        // Reconnect backlog: every device sends its queued windows at once.
        let last = tracker.last.lock().unwrap().clone();
        let drain = Instant::now();
        let before = tracker.acked.load(Ordering::Relaxed);
        runtime.block_on(async {
            let mut tasks = Vec::new();
            for (client, own) in load.clients.iter().zip(&load.devices) {
                let (client, own, tracker) = (client.clone(), own.clone(), tracker.clone());
                let next: Vec<u64> = own.iter().map(|id| last.get(id).copied().unwrap_or(0) + 1).collect();
                tasks.push(tokio::spawn(async move {
                    for k in 0..backlog {
                        for (id, first) in own.iter().zip(&next) {
                            let seq = first + k;
                            tracker.sent(id, seq);
                            let payload = window(id, seq, now_ms() - (backlog - k) * 60_000);
                            let _ = client
                                .publish(format!("rxv/v1/dev/{id}/telemetry"), QoS::AtLeastOnce, false, payload)
                                .await;
                        }
                    }
                }));
            }
            for task in tasks {
                let _ = task.await;
            }
        });
        let total = devices as u64 * backlog;
        let wait = Instant::now();
        let mut resent = 0;
        let mut last_resend = Instant::now();
        while tracker.acked.load(Ordering::Relaxed) - before < total && wait.elapsed() < Duration::from_secs(1800) {
            std::thread::sleep(Duration::from_millis(100));
            // As the appliance's link does: a device that waited longer than
            // the ack timeout without progress sends everything again (a broker
            // may drop messages: Mosquitto drops QoS 1 messages beyond a
            // subscriber's max_queued_messages).
            if last_resend.elapsed() >= Duration::from_secs(1) {
                last_resend = Instant::now();
                resent += runtime.block_on(resend_overdue(&load, &tracker));
            }
        }
        let drained = tracker.acked.load(Ordering::Relaxed) - before;
        let seconds_drain = drain.elapsed().as_secs_f64();
        let size = window(&ids[0], 1, now_ms()).len();
        let raw = raw_broker::raw_broker_rate(broker.port, fleet::INGEST, (LOADGEN, PASSWORD), &ids[0], 50_000, size);
        println!(
            "  [{backend}] reconnect backlog: {drained} of {total} windows acked in {seconds_drain:.1} s = {:.0} windows/s ({resent} sent again after {ACK_TIMEOUT:?} without progress); raw broker {raw:.0} messages/s; ratio {:.2}",
            drained as f64 / seconds_drain,
            drained as f64 / seconds_drain / raw
        );
        assert_eq!(drained, total, "{backend}: the backlog drained");
        let _ = serve.kill();
        let _ = serve.wait();
        drop(broker);
    }
}

/// The appliances' default ack timeout (`[telemetry] ack_timeout_seconds`).
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// Sends again, as the appliance's link does, every window of a device that
/// waited longer than the ack timeout without any progress; returns how many.
async fn resend_overdue(load: &Loadgen, tracker: &Tracker) -> u64 {
    let overdue: Vec<(usize, String, u64)> = {
        let pending = tracker.pending.lock().unwrap();
        let mut waiting = tracker.waiting_since.lock().unwrap();
        let mut overdue = Vec::new();
        for (c, own) in load.devices.iter().enumerate() {
            for id in own {
                let Some(seqs) = pending.get(id).filter(|s| !s.is_empty()) else { continue };
                let since = waiting.entry(id.clone()).or_insert_with(Instant::now);
                if since.elapsed() >= ACK_TIMEOUT {
                    *since = Instant::now();
                    overdue.extend(seqs.keys().map(|seq| (c, id.clone(), *seq)));
                }
            }
        }
        overdue
    };
    for (c, id, seq) in &overdue {
        let payload = window(id, *seq, now_ms());
        let _ = load.clients[*c].publish(format!("rxv/v1/dev/{id}/telemetry"), QoS::AtLeastOnce, false, payload).await;
    }
    overdue.len() as u64
}

/// A spread of start offsets within the first minute, stable per device.
fn rand_offset(id: &str) -> u64 {
    id.bytes().fold(17u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b))) % 60_000
}
