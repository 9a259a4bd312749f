//! `rxvision-fleet-sim`: many simulated appliances speaking the real
//! protocol to a real broker, each with the daemon's own outbox (sled, in
//! its own directory) and MQTT link.
//!
//! Each device produces telemetry windows of a simulated length at an
//! accelerated pace (`--interval-ms` of real time per window), with a
//! configurable scan volume, verdict mix and feature drift, an event every
//! `--events-every` windows, and optional outages (its link stopped for a
//! range of windows). When every device has produced `--windows` windows,
//! the simulator waits until every outbox is empty (acknowledged by the
//! fleet) or `--drain-timeout-secs` passes, and writes a report of what each
//! device produced, so a test can compare the fleet's totals with the
//! appliances' own counts. Exit status 0: everything acknowledged; 3: not
//! drained in time.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use rxvision_daemon::link::{self, LinkConfig, LinkStatus};
use rxvision_daemon::outbox::{MessageKind, Outbox};
use rxvision_daemon::telemetry::collector::{merge_windows, stored_event, stored_window};
use rxvision_protocol::{
    feature_bounds, ChainHead, EngineState, Event, EventKind, Feedback, Histogram, ModelRef, OutboxLosses, OutboxState,
    Status, Telemetry, Window, CONFIDENCE_BOUNDS, LATENCY_BOUNDS_MS, PROTOCOL_VERSION,
};

#[derive(Parser, Debug, Clone)]
#[command(name = "rxvision-fleet-sim", about = "Simulated RxVision appliances for fleet tests and benchmarks")]
struct Args {
    /// The broker: mqtt://host:port.
    #[arg(long)]
    broker: String,
    /// Number of devices.
    #[arg(long, default_value_t = 10)]
    devices: usize,
    /// Number of sites they are spread over (round robin).
    #[arg(long, default_value_t = 1)]
    sites: usize,
    /// Device ids are `{prefix}-s{site}-c{n}`.
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// Every device's broker password (unless --passwords names the device).
    #[arg(long, default_value = "")]
    password: String,
    /// A JSON object of device id → broker password (devices provisioned
    /// one by one with `rxfleet devices add`).
    #[arg(long)]
    passwords: Option<PathBuf>,
    /// Where the devices' outboxes live (one directory each).
    #[arg(long)]
    state_dir: PathBuf,
    /// Windows each device produces.
    #[arg(long, default_value_t = 20)]
    windows: u64,
    /// Real milliseconds between two windows of a device (0: as fast as the outbox takes them).
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// Simulated length of a window, seconds.
    #[arg(long, default_value_t = 60)]
    window_seconds: u64,
    /// Mean scans per window.
    #[arg(long, default_value_t = 20)]
    scans_per_window: u64,
    /// Verdict shares: MATCH,UNCERTAIN,MISMATCH,BAD_IMAGE,NO_PILL (normalised).
    #[arg(long, default_value = "0.85,0.10,0.01,0.03,0.01")]
    mix: String,
    /// Feature drift: 0 none, 1 strong (brighter, bluer crops).
    #[arg(long, default_value_t = 0.0)]
    drift: f64,
    /// An event every this many windows (0: none).
    #[arg(long, default_value_t = 10)]
    events_every: u64,
    /// Windows during which every device is offline (link stopped), as `A..B`.
    #[arg(long)]
    offline: Option<String>,
    /// Outbox budget per device, bytes.
    #[arg(long, default_value_t = 64 << 20)]
    budget: u64,
    /// Seconds a sent message waits for the fleet's ack before it is resent.
    #[arg(long, default_value_t = 5)]
    ack_timeout_secs: u64,
    /// MQTT keep-alive, seconds.
    #[arg(long, default_value_t = 5)]
    keep_alive_secs: u64,
    /// How long to wait for every outbox to empty after the last window.
    #[arg(long, default_value_t = 120)]
    drain_timeout_secs: u64,
    /// Stamp windows from now on (with --interval-ms equal to
    /// --window-seconds × 1000: real time, for demos), rather than ending now.
    #[arg(long)]
    live: bool,
    /// Where to write the report (JSON).
    #[arg(long)]
    report: Option<PathBuf>,
}

/// What one device produced (its own counts).
#[derive(Debug, Default, Clone, serde::Serialize)]
struct Produced {
    windows: u64,
    scans: u64,
    events: u64,
    /// Bytes of the windows as stored (before merging).
    window_bytes: u64,
    verdicts: BTreeMap<String, u64>,
    outbox_depth: u64,
    merged_windows: u64,
    dropped_windows: u64,
    dropped_events: u64,
}

const VERDICTS: [&str; 5] = ["MATCH", "UNCERTAIN", "MISMATCH", "BAD_IMAGE", "NO_PILL"];
const CLASSES: [&str; 4] = ["00093-0058-01", "00378-0208-01", "00591-0405-01", "68180-0517-01"];

/// A small deterministic generator (xorshift64*), seeded per device.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn chain_head(device: &str, next_seq: u64) -> ChainHead {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (device, next_seq).hash(&mut hasher);
    ChainHead { next_seq, head: format!("{:016x}", hasher.finish()).repeat(4) }
}

struct Device {
    id: String,
    outbox: Arc<Outbox>,
    audit_next: std::sync::Mutex<u64>,
    /// The device's simulated clock: the end of its latest window.
    clock_ms: std::sync::atomic::AtomicU64,
}

impl Device {
    fn status(&self, online: bool) -> Status {
        let (depth, bytes, oldest, acked) = self.outbox.depth();
        Status {
            v: PROTOCOL_VERSION,
            device_id: self.id.clone(),
            online,
            time_ms: self.clock_ms.load(std::sync::atomic::Ordering::SeqCst),
            daemon_version: Some(env!("CARGO_PKG_VERSION").into()),
            model: Some(ModelRef { name: "pillnet".into(), version: "0.4.0".into() }),
            engine: Some(EngineState {
                active: "cpu".into(),
                choice: "simulated".into(),
                gpu_degraded: false,
                fallbacks: 0,
            }),
            outbox: Some(OutboxState {
                depth: depth as u64,
                bytes,
                oldest_unacked_s: oldest.map_or(0, |o| now_ms().saturating_sub(o) / 1000),
                acked_seq: acked,
            }),
            audit: Some(chain_head(&self.id, *self.audit_next.lock().unwrap())),
        }
    }
}

fn make_window(args: &Args, device: &Device, index: u64, start_ms: u64, mix: &[f64], rng: &mut Rng) -> Telemetry {
    let scans = (args.scans_per_window as f64 * (0.5 + rng.unit())).round() as u64;
    let mut verdicts = BTreeMap::new();
    let mut classes = BTreeMap::new();
    let mut latency = Histogram::new(&LATENCY_BOUNDS_MS);
    let mut confidence = Histogram::new(&CONFIDENCE_BOUNDS);
    let mut features: BTreeMap<String, Histogram> =
        feature_bounds().into_iter().map(|(name, bounds)| (name.to_string(), Histogram::new(&bounds))).collect();
    for _ in 0..scans {
        let draw = rng.unit();
        let mut acc = 0.0;
        let verdict = VERDICTS
            .iter()
            .zip(mix)
            .find(|(_, share)| {
                acc += **share;
                draw < acc
            })
            .map_or(VERDICTS[0], |(v, _)| *v);
        *verdicts.entry(verdict.to_string()).or_insert(0) += 1;
        latency.observe(8.0 + 10.0 * rng.unit());
        if verdict != "BAD_IMAGE" && verdict != "NO_PILL" {
            confidence.observe(0.9 + 0.1 * rng.unit());
            *classes.entry(CLASSES[(rng.next() % 4) as usize].to_string()).or_insert(0) += 1;
            for (name, histogram) in features.iter_mut() {
                let base = match name.as_str() {
                    "brightness" | "mean_r" | "mean_g" => 140.0 + 60.0 * args.drift,
                    "mean_b" => 120.0 + 90.0 * args.drift,
                    "aspect_ratio" => 1.3,
                    "blur" => 300.0,
                    "contrast" => 30.0,
                    _ => 5.0,
                };
                histogram.observe(base * (0.8 + 0.4 * rng.unit()));
            }
        }
    }
    let losses = device.outbox.losses();
    let mut audit_next = device.audit_next.lock().unwrap();
    *audit_next += scans;
    Telemetry {
        v: PROTOCOL_VERSION,
        device_id: device.id.clone(),
        seq: 0,
        window: Window { start_ms, end_ms: start_ms + args.window_seconds * 1000, windows: 1 },
        model_version: "0.4.0".into(),
        engine: "cpu".into(),
        scans,
        verdicts,
        refusals: BTreeMap::new(),
        latency_ms: latency,
        confidence,
        classes,
        features,
        feedback: Feedback::default(),
        engine_fallbacks: 0,
        operators: BTreeMap::from([(format!("op-{:08x}", index % 3), scans)]),
        audit: chain_head(&device.id, *audit_next),
        outbox: OutboxLosses {
            merged_windows: losses.merged_windows,
            dropped_windows: losses.dropped_windows,
            dropped_events: losses.dropped_events,
        },
    }
}

fn parse_range(text: &str) -> Result<(u64, u64), String> {
    let (a, b) = text.split_once("..").ok_or_else(|| format!("--offline {text:?}: not A..B"))?;
    Ok((a.parse().map_err(|_| format!("--offline {text:?}"))?, b.parse().map_err(|_| format!("--offline {text:?}"))?))
}

async fn run(args: Args) -> Result<bool, String> {
    let rest = args.broker.strip_prefix("mqtt://").ok_or("--broker must be mqtt://host:port")?;
    let (host, port) = rest.rsplit_once(':').ok_or("--broker names no port")?;
    let port: u16 = port.parse().map_err(|_| "--broker port")?;
    let mut mix: Vec<f64> = args.mix.split(',').map(|s| s.trim().parse::<f64>().unwrap_or(0.0)).collect();
    mix.resize(VERDICTS.len(), 0.0);
    let total: f64 = mix.iter().sum();
    if total <= 0.0 {
        return Err("--mix sums to zero".into());
    }
    mix.iter_mut().for_each(|m| *m /= total);
    let offline = args.offline.as_deref().map(parse_range).transpose()?;
    let passwords: std::collections::HashMap<String, String> = match &args.passwords {
        None => Default::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?
        }
    };
    let link_config = LinkConfig {
        host: host.to_string(),
        port,
        ca_pem: None,
        client_pem: None,
        password: args.password.clone(),
        ack_timeout: Duration::from_secs(args.ack_timeout_secs),
        keep_alive: Duration::from_secs(args.keep_alive_secs),
    };
    // The simulated span ends now (a backlog looks as old as it is), or,
    // live, starts now (windows stamped as they are produced).
    let start_ms =
        if args.live { now_ms() } else { now_ms().saturating_sub(args.windows * args.window_seconds * 1000) };
    let mut producers = Vec::new();
    let mut devices = Vec::new();
    // Devices offline at the end start their links together, once every
    // backlog is in place (the drain starts at one moment, for benchmarks).
    let backlog_ready = Arc::new(tokio::sync::Barrier::new(args.devices + 1));
    for n in 0..args.devices {
        let id = format!("{}-s{:03}-c{:05}", args.prefix, n % args.sites.max(1), n);
        let outbox = Outbox::open(&args.state_dir.join(&id), 32).map_err(|e| format!("{id}: {e}"))?;
        let device = Arc::new(Device {
            id,
            outbox: Arc::new(outbox),
            audit_next: std::sync::Mutex::new(1),
            clock_ms: start_ms.into(),
        });
        devices.push(device.clone());
        let args = args.clone();
        let mix = mix.clone();
        let mut link_config = link_config.clone();
        if let Some(password) = passwords.get(&device.id) {
            link_config.password = password.clone();
        }
        let backlog_ready = backlog_ready.clone();
        producers.push(tokio::spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (n as u64 + 1).wrapping_mul(0x1000_0000_01B3));
            let mut produced = Produced::default();
            let mut link: Option<(tokio::task::JoinHandle<()>, tokio::sync::oneshot::Sender<()>)> = None;
            let start_link = |device: &Arc<Device>| {
                let (tx, rx) = tokio::sync::oneshot::channel::<()>();
                let status_device = device.clone();
                let handle = tokio::spawn(link::run(
                    link_config.clone(),
                    device.id.clone(),
                    device.outbox.clone(),
                    Arc::new(LinkStatus::default()),
                    move || status_device.status(true),
                    Arc::new(tokio::sync::Notify::new()),
                    async move {
                        let _ = rx.await;
                    },
                ));
                (handle, tx)
            };
            for index in 0..args.windows {
                let should_be_online = offline.is_none_or(|(a, b)| !(a..b).contains(&index));
                match (&link, should_be_online) {
                    (None, true) => link = Some(start_link(&device)),
                    (Some(_), false) => {
                        let (handle, tx) = link.take().expect("checked");
                        let _ = tx.send(());
                        let _ = handle.await;
                    }
                    _ => {}
                }
                let window =
                    make_window(&args, &device, index, start_ms + index * args.window_seconds * 1000, &mix, &mut rng);
                device.clock_ms.store(window.window.end_ms, std::sync::atomic::Ordering::SeqCst);
                produced.windows += 1;
                produced.scans += window.scans;
                for (verdict, count) in &window.verdicts {
                    *produced.verdicts.entry(verdict.clone()).or_insert(0) += count;
                }
                let outbox = device.outbox.clone();
                let budget = args.budget;
                let stored = stored_window(&window);
                produced.window_bytes += stored.len() as u64;
                let window_start = window.window.start_ms;
                let event = (args.events_every > 0 && (index + 1) % args.events_every == 0).then(|| Event {
                    v: PROTOCOL_VERSION,
                    device_id: device.id.clone(),
                    seq: 0,
                    time_ms: window.window.end_ms,
                    kind: EventKind::EngineFallback,
                    details: serde_json::Map::from_iter([("window".to_string(), serde_json::json!(index))]),
                });
                produced.events += u64::from(event.is_some());
                let queued = tokio::task::spawn_blocking(move || {
                    outbox.push(MessageKind::Window, window_start, &stored)?;
                    if let Some(event) = event {
                        outbox.push(MessageKind::Event, window_start, &stored_event(&event))?;
                    }
                    outbox.enforce_budget(budget, merge_windows)
                })
                .await
                .expect("the outbox task runs")
                .map_err(|e| format!("{}: {e}", device.id));
                if let Err(e) = queued {
                    // Leave the barrier to the others, then report.
                    backlog_ready.wait().await;
                    return Err(e);
                }
                if args.interval_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(args.interval_ms)).await;
                }
            }
            backlog_ready.wait().await;
            if link.is_none() {
                link = Some(start_link(&device));
            }
            Ok::<_, String>((produced, link))
        }));
    }
    backlog_ready.wait().await;
    let backlog: usize = devices.iter().map(|d| d.outbox.depth().0).sum();
    let drain_started = tokio::time::Instant::now();
    println!("rxvision-fleet-sim: {backlog} messages queued; draining");
    let mut results = Vec::new();
    for producer in producers {
        results.push(producer.await.map_err(|e| e.to_string())??);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.drain_timeout_secs);
    let drained = loop {
        let pending: usize = devices.iter().map(|d| d.outbox.depth().0).sum();
        if pending == 0 {
            break true;
        }
        if tokio::time::Instant::now() >= deadline {
            eprintln!("rxvision-fleet-sim: {pending} messages still unacknowledged after the drain timeout");
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "rxvision-fleet-sim: drained {backlog} messages from {} devices in {:.3} s",
        devices.len(),
        drain_started.elapsed().as_secs_f64()
    );
    let mut report = BTreeMap::new();
    for (device, (mut produced, link)) in devices.iter().zip(results) {
        let losses = device.outbox.losses();
        produced.outbox_depth = device.outbox.depth().0 as u64;
        produced.merged_windows = losses.merged_windows;
        produced.dropped_windows = losses.dropped_windows;
        produced.dropped_events = losses.dropped_events;
        report.insert(device.id.clone(), produced);
        if let Some((handle, tx)) = link {
            let _ = tx.send(());
            let _ = handle.await;
        }
    }
    let text = serde_json::to_string_pretty(&report).expect("a report serialises");
    match &args.report {
        Some(path) => std::fs::write(path, text).map_err(|e| format!("{}: {e}", path.display()))?,
        None => println!("{text}"),
    }
    Ok(drained)
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime starts");
    match runtime.block_on(run(args)) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::from(3),
        Err(e) => {
            eprintln!("rxvision-fleet-sim: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
