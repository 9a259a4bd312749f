//! The fleet's ingest (`rxfleet ingest`) with simulated appliances
//! (`rxvision-fleet-sim`: the daemon's own outbox and link) through a real
//! Mosquitto with the shipped ACL, into SQLite and PostgreSQL: every fault
//! ends with the fleet's totals equal to the appliances' own counts.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::broker::{tools_present, Broker};

pub const INGEST: (&str, &str) = ("rxfleet-ingest", "ingest-secret-1");
pub const SIM_PASSWORD: &str = "sim-device-secret";

/// `target/<profile>/<name>`, built by `cargo build --workspace`.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let binary = exe.parent().and_then(Path::parent).unwrap().join(name);
    assert!(binary.exists(), "{} is missing: build the workspace first (cargo build --workspace)", binary.display());
    binary
}

/// The fleet's database for a test: SQLite in `dir`, or a fresh PostgreSQL
/// database on 127.0.0.1:5432 (dropped first if an earlier run left it).
pub fn database_urls(dir: &Path, test: &str) -> Vec<(String, String)> {
    let mut urls = vec![("sqlite".to_string(), format!("sqlite://{}/fleet.db", dir.display()))];
    let name = format!("rxfleet_sys_{test}");
    let psql = |sql: &str| {
        Command::new("psql").args(["-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-Atc", sql]).output()
    };
    match psql(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")) {
        Ok(out) if out.status.success() => {
            let created = psql(&format!("CREATE DATABASE {name}")).unwrap();
            assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
            urls.push(("postgres".into(), format!("postgres://postgres@127.0.0.1:5432/{name}")));
        }
        other => {
            let why = match other {
                Ok(out) => String::from_utf8_lossy(&out.stderr).to_string(),
                Err(e) => e.to_string(),
            };
            assert!(
                std::env::var_os("RXVISION_REQUIRE_REFERENCES").is_none(),
                "PostgreSQL on 127.0.0.1:5432 is required here: {why}"
            );
            eprintln!("SKIPPED the PostgreSQL half of {test}: {why}");
        }
    }
    urls
}

/// Terminates every connection the ingest holds to PostgreSQL database
/// `url` (what a database restart does to its clients).
fn terminate_postgres_connections(url: &str) {
    let name = url.rsplit('/').next().unwrap();
    let out = Command::new("psql")
        .args(["-h", "127.0.0.1", "-U", "postgres", "-d", "test", "-Atc"])
        .arg(format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE datname = '{name}' AND application_name = 'rxfleet'"
        ))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("terminated {} PostgreSQL connections of the ingest", String::from_utf8_lossy(&out.stdout).trim());
}

/// A running `rxfleet ingest`; killed (SIGKILL) when dropped.
pub struct Ingest {
    child: Child,
    pub config: PathBuf,
    failed_commits: Arc<std::sync::atomic::AtomicUsize>,
}

impl Drop for Ingest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Ingest {
    /// Writes a configuration in `dir` for the broker on `port` and database `url`, and starts the ingest.
    pub fn start(dir: &Path, port: u16, url: &str) -> Ingest {
        Ingest::start_to(dir, &format!("mqtt://127.0.0.1:{port}"), None, url)
    }

    /// Like [`Ingest::start`], to broker URL `broker` (`mqtts://` with the CA file `ca`).
    pub fn start_to(dir: &Path, broker: &str, ca: Option<&Path>, url: &str) -> Ingest {
        let password = dir.join("ingest.password");
        std::fs::write(&password, INGEST.1).unwrap();
        std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600)).unwrap();
        let config = dir.join("rxfleet.toml");
        std::fs::write(
            &config,
            format!(
                "[fleet]\nstate_dir = {:?}\n[database]\nurl = {url:?}\n[broker]\nmode = \"external\"\nurl = {broker:?}\n\
                 password_file = {:?}\nca_file = {:?}\nclient_id = \"rxfleet-ingest-{}\"\n[ingest]\nbatch_wait_ms = 10\n",
                dir.display().to_string(),
                password.display().to_string(),
                ca.map(|c| c.display().to_string()).unwrap_or_default(),
                std::process::id(),
            ),
        )
        .unwrap();
        Ingest::launch(config)
    }

    fn launch(config: PathBuf) -> Ingest {
        let mut child = Command::new(binary("rxfleet"))
            .args(["ingest", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let failed_commits: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let failed = failed_commits.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[ingest] {line}");
                if line.contains("ingest connected to the broker") {
                    let _ = tx.send(());
                }
                if line.contains("could not be committed") {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(30)).expect("the ingest connects to the broker");
        Ingest { child, config, failed_commits }
    }

    /// `kill -9`, then a new ingest with the same configuration.
    pub fn kill_and_restart(&mut self) {
        self.kill();
        self.relaunch();
    }

    /// `kill -9`: its broker session stays, and the broker queues for it.
    pub fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// A new ingest with the same configuration (and session).
    pub fn relaunch(&mut self) {
        *self = Ingest::launch(self.config.clone());
    }

    /// Batches whose commit failed (and was retried), as the ingest logged them.
    pub fn failed_commits(&self) -> usize {
        self.failed_commits.load(Ordering::SeqCst)
    }

    /// Whether it still runs.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// `rxfleet <args> --config <config> --json`, parsed.
    pub fn query(&self, args: &[&str]) -> Value {
        let out = Command::new(binary("rxfleet"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .arg("--json")
            .output()
            .unwrap();
        assert!(out.status.success(), "rxfleet {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The fleet's devices by id.
    pub fn devices(&self) -> BTreeMap<String, Value> {
        let devices = self.query(&["devices", "stats"]);
        devices.as_array().unwrap().iter().map(|d| (d["device_id"].as_str().unwrap().to_string(), d.clone())).collect()
    }
}

/// The simulator's device ids (`{prefix}-s{site}-c{n}`).
pub fn sim_devices(prefix: &str, n: usize, sites: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}-s{:03}-c{i:05}", i % sites)).collect()
}

/// A broker with the ingest's account and one for each simulated device.
pub fn broker_for(prefix: &str, n: usize, sites: usize) -> Broker {
    let devices = sim_devices(prefix, n, sites);
    let mut accounts: Vec<(&str, &str)> = vec![INGEST];
    accounts.extend(devices.iter().map(|d| (d.as_str(), SIM_PASSWORD)));
    Broker::start(&accounts)
}

/// Runs the simulator in the background; its report lands in `dir/report.json`.
fn start_sim(dir: &Path, port: u16, prefix: &str, extra: &[&str]) -> Child {
    Command::new(binary("rxvision-fleet-sim"))
        .args(["--broker", &format!("mqtt://127.0.0.1:{port}"), "--password", SIM_PASSWORD, "--prefix", prefix])
        .arg("--state-dir")
        .arg(dir.join("devices"))
        .arg("--report")
        .arg(dir.join("report.json"))
        .args(extra)
        .spawn()
        .unwrap()
}

pub fn finish_sim(mut sim: Child, dir: &Path) -> BTreeMap<String, Value> {
    let deadline = Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Some(status) = sim.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = sim.kill();
            panic!("the simulator did not finish");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "the simulator's outboxes did not drain: {status}");
    serde_json::from_slice(&std::fs::read(dir.join("report.json")).unwrap()).unwrap()
}

/// Every device's own counts equal the fleet's: windows (base windows),
/// scans, events; and the fleet acknowledged every seq the device gave out.
pub fn assert_totals_match(report: &BTreeMap<String, Value>, fleet: &BTreeMap<String, Value>, label: &str) {
    assert_eq!(report.keys().collect::<Vec<_>>(), fleet.keys().collect::<Vec<_>>(), "{label}: devices");
    for (id, own) in report {
        let f = &fleet[id];
        assert_eq!(own["outbox_depth"], 0, "{label} {id}: outbox not empty");
        assert_eq!(f["base_windows"], own["windows"], "{label} {id}: windows");
        assert_eq!(f["scans"], own["scans"], "{label} {id}: scans");
        assert_eq!(f["events"], own["events"], "{label} {id}: events");
        let messages = f["windows"].as_i64().unwrap() + f["events"].as_i64().unwrap();
        assert_eq!(f["acked_seq"].as_i64().unwrap(), messages, "{label} {id}: every stored message acked, no gaps");
    }
}

#[test]
fn a_simulated_fleet_lands_exactly_once_through_broker_ingest_and_database_restarts() {
    if !tools_present("a_simulated_fleet_lands_exactly_once") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (backend, url) in database_urls(dir.path(), "faults") {
        let run = dir.path().join(&backend);
        std::fs::create_dir_all(&run).unwrap();
        let prefix = format!("f{backend}");
        let mut broker = broker_for(&prefix, 4, 2);
        let mut ingest = Ingest::start(&run, broker.port, &url);
        let sim = start_sim(
            &run,
            broker.port,
            &prefix,
            &[
                "--devices",
                "4",
                "--sites",
                "2",
                "--windows",
                "80",
                "--interval-ms",
                "60",
                "--ack-timeout-secs",
                "2",
                "--keep-alive-secs",
                "2",
            ],
        );
        std::thread::sleep(Duration::from_millis(1200));
        eprintln!("[{backend}] broker stopped under load");
        broker.kill();
        std::thread::sleep(Duration::from_millis(800));
        broker.restart();
        std::thread::sleep(Duration::from_millis(1200));
        eprintln!("[{backend}] ingest killed (SIGKILL)");
        ingest.kill_and_restart();
        std::thread::sleep(Duration::from_millis(800));
        if backend == "postgres" {
            eprintln!("[{backend}] database connections terminated");
            terminate_postgres_connections(&url);
        }
        let report = finish_sim(sim, &run);
        let fleet = ingest.devices();
        assert_totals_match(&report, &fleet, &backend);
        let windows: u64 = report.values().map(|d| d["windows"].as_u64().unwrap()).sum();
        assert_eq!(windows, 4 * 80);
        assert!(ingest.running(), "{backend}: the ingest survived");
        let events = ingest.query(&["events"]);
        assert_eq!(events, serde_json::json!([]), "{backend}: no audit chain was rewritten");
    }
}

/// A PostgreSQL server of the test's own (`initdb` in a temporary
/// directory, a free port), so a test can restart it under load; stopped
/// when dropped. `None` (and why) when PostgreSQL's server programs are not
/// installed; where they must be (CI), that fails the test.
struct OwnPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl OwnPostgres {
    fn start(test: &str) -> Option<OwnPostgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql").ok().and_then(|versions| {
            versions.filter_map(Result::ok).map(|v| v.path().join("bin")).filter(|b| b.join("pg_ctl").exists()).max()
        });
        let Some(bin) = bin else {
            assert!(
                std::env::var_os("RXVISION_REQUIRE_REFERENCES").is_none(),
                "PostgreSQL's server programs (/usr/lib/postgresql/*/bin) are required here"
            );
            eprintln!("SKIPPED {test}: PostgreSQL's server programs are not installed");
            return None;
        };
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let pg = OwnPostgres { dir, bin, port };
        if nix_root() {
            let out = Command::new("chown").args(["-R", "postgres:postgres"]).arg(pg.dir.path()).output().unwrap();
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        }
        let data = pg.dir.path().join("data");
        pg.run("initdb", &["-D", data.to_str().unwrap(), "-A", "trust", "-U", "postgres", "--no-sync"]);
        pg.ctl(&[
            "start",
            "-o",
            &format!("-p {} -k {} -c listen_addresses=127.0.0.1", pg.port, pg.dir.path().display()),
        ]);
        let created = Command::new("psql")
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &pg.port.to_string(),
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-c",
                "CREATE DATABASE fleet",
            ])
            .output()
            .unwrap();
        assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
        Some(pg)
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/fleet", self.port)
    }

    /// Runs one of PostgreSQL's programs as the `postgres` user (when root).
    fn run(&self, program: &str, args: &[&str]) {
        let binary = self.bin.join(program);
        let out = if nix_root() {
            Command::new("runuser").args(["-u", "postgres", "--"]).arg(&binary).args(args).output().unwrap()
        } else {
            Command::new(&binary).args(args).output().unwrap()
        };
        assert!(
            out.status.success(),
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn ctl(&self, args: &[&str]) {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("postgres.log");
        let mut all = vec!["-D", data.to_str().unwrap(), "-l", log.to_str().unwrap(), "-w"];
        all.extend_from_slice(args);
        self.run("pg_ctl", &all);
    }

    /// A fast shutdown (clients disconnected, in-flight transactions rolled
    /// back), `down` without a database, then a start.
    fn restart(&self, down: Duration) {
        self.ctl(&["-m", "fast", "stop"]);
        std::thread::sleep(down);
        self.ctl(&[
            "start",
            "-o",
            &format!("-p {} -k {} -c listen_addresses=127.0.0.1", self.port, self.dir.path().display()),
        ]);
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let binary = self.bin.join("pg_ctl");
        let args = ["-D", data.to_str().unwrap(), "-m", "immediate", "stop"];
        let _ = if nix_root() {
            Command::new("runuser").args(["-u", "postgres", "--"]).arg(&binary).args(args).output()
        } else {
            Command::new(&binary).args(args).output()
        };
    }
}

fn nix_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[test]
fn the_fleet_database_restarted_under_load_loses_nothing() {
    if !tools_present("the_fleet_database_restarted_under_load_loses_nothing") {
        return;
    }
    let Some(postgres) = OwnPostgres::start("the_fleet_database_restarted_under_load_loses_nothing") else { return };
    let dir = tempfile::tempdir().unwrap();
    let broker = broker_for("pgr", 3, 1);
    let ingest = Ingest::start(dir.path(), broker.port, &postgres.url());
    let sim = start_sim(
        dir.path(),
        broker.port,
        "pgr",
        &[
            "--devices",
            "3",
            "--windows",
            "80",
            "--interval-ms",
            "50",
            "--ack-timeout-secs",
            "2",
            "--keep-alive-secs",
            "2",
        ],
    );
    std::thread::sleep(Duration::from_millis(1500));
    eprintln!("PostgreSQL restarting under load");
    postgres.restart(Duration::from_secs(4));
    let report = finish_sim(sim, dir.path());
    assert_totals_match(&report, &ingest.devices(), "postgres restart");
    assert!(ingest.failed_commits() > 0, "the ingest met the database down (the fault was exercised)");
}

/// A TCP proxy between the appliances and the broker that can pass
/// traffic, drop every connection, or black-hole it (keep the sockets, move
/// nothing) — faults a real network produces and a broker cannot.
struct Proxy {
    port: u16,
    mode: Arc<AtomicU8>,
    streams: Arc<Mutex<Vec<TcpStream>>>,
}

const PASS: u8 = 0;
const BLACKHOLE: u8 = 1;

impl Proxy {
    fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = Arc::new(AtomicU8::new(PASS));
        let streams: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let (m, s) = (mode.clone(), streams.clone());
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else { continue };
                s.lock().unwrap().extend([client.try_clone().unwrap(), server.try_clone().unwrap()]);
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    let m = m.clone();
                    std::thread::spawn(move || {
                        let mut buf = [0u8; 16384];
                        loop {
                            let n = match from.read(&mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            // Black-holed bytes vanish; the sockets stay open.
                            if m.load(Ordering::SeqCst) == BLACKHOLE {
                                continue;
                            }
                            if to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(std::net::Shutdown::Both);
                    });
                }
            }
        });
        Proxy { port, mode, streams }
    }

    /// Closes every connection through the proxy (new ones still pass).
    fn drop_connections(&self) {
        for stream in self.streams.lock().unwrap().drain(..) {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    fn set(&self, mode: u8) {
        self.mode.store(mode, Ordering::SeqCst);
    }
}

#[test]
fn network_cuts_that_drop_or_black_hole_traffic_lose_nothing() {
    if !tools_present("network_cuts_that_drop_or_black_hole_traffic_lose_nothing") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/fleet.db", dir.path().display());
    let broker = broker_for("net", 3, 1);
    let ingest = Ingest::start(dir.path(), broker.port, &url);
    let proxy = Proxy::start(broker.port);
    let sim = start_sim(
        dir.path(),
        proxy.port,
        "net",
        &[
            "--devices",
            "3",
            "--windows",
            "120",
            "--interval-ms",
            "50",
            "--ack-timeout-secs",
            "2",
            "--keep-alive-secs",
            "1",
        ],
    );
    std::thread::sleep(Duration::from_millis(1000));
    eprintln!("proxy: every connection dropped");
    proxy.drop_connections();
    std::thread::sleep(Duration::from_millis(1500));
    eprintln!("proxy: black hole");
    proxy.set(BLACKHOLE);
    std::thread::sleep(Duration::from_millis(4000));
    eprintln!("proxy: passing again");
    proxy.set(PASS);
    proxy.drop_connections();
    let report = finish_sim(sim, dir.path());
    assert_totals_match(&report, &ingest.devices(), "proxy");
}

#[test]
fn a_week_offline_drains_in_order_with_the_budget_policy_counted() {
    if !tools_present("a_week_offline_drains_in_order_with_the_budget_policy_counted") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (backend, url) in database_urls(dir.path(), "week") {
        let run = dir.path().join(&backend);
        std::fs::create_dir_all(&run).unwrap();
        week_offline(&run, &url, &backend);
    }
}

/// A week offline, into the database at `url`, with `dir` for the fleet's files.
fn week_offline(dir: &Path, url: &str, backend: &str) {
    // The simulated appliances' outboxes on tmpfs where there is one: a week of windows is 10,080 synced appends each.
    let devices_dir = if Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let mut broker = broker_for("week", 2, 1);
    let ingest = Ingest::start(dir, broker.port, url);
    broker.kill();
    // A week of one-minute windows while the broker is down; a 4 MB budget
    // holds about a third of them, so old windows are merged.
    let week = (7 * 24 * 60).to_string();
    let mut sim = Command::new(binary("rxvision-fleet-sim"));
    sim.args([
        "--broker",
        &format!("mqtt://127.0.0.1:{}", broker.port),
        "--password",
        SIM_PASSWORD,
        "--prefix",
        "week",
    ])
    .args(["--devices", "2", "--windows", &week, "--interval-ms", "0", "--offline", &format!("0..{week}")])
    .args(["--budget", "4000000", "--scans-per-window", "4", "--events-every", "1440", "--drain-timeout-secs", "200"])
    .arg("--state-dir")
    .arg(devices_dir.path())
    .arg("--report")
    .arg(dir.join("report.json"));
    let started = Instant::now();
    let sim = sim.spawn().unwrap();
    // The broker comes back while the devices are still offline.
    std::thread::sleep(Duration::from_secs(2));
    broker.restart();
    let report = finish_sim(sim, dir);
    eprintln!("a week of windows for 2 devices produced and drained in {:.1} s", started.elapsed().as_secs_f64());
    let fleet = ingest.devices();
    for (id, own) in &report {
        let f = &fleet[id];
        assert!(own["merged_windows"].as_u64().unwrap() > 0, "{id}: the budget policy was exercised: {own}");
        assert_eq!(own["dropped_events"], 0, "{id}: no event dropped");
        // Each window carries the losses counted before it was written; the
        // merges its own arrival caused travel with the next window.
        let reported = f["outbox_losses"][0].as_u64().unwrap();
        let merged = own["merged_windows"].as_u64().unwrap();
        assert!(
            reported > 0 && reported <= merged && merged - reported < 50,
            "{id}: merges reported upstream: {reported} of {merged}"
        );
        assert_eq!(f["outbox_losses"][2], 0);
        assert!(f["windows"].as_i64().unwrap() < f["base_windows"].as_i64().unwrap(), "{id}: coarser windows arrived");
        eprintln!(
            "{id}: {} base windows in {} messages, {} merges",
            f["base_windows"], f["windows"], own["merged_windows"]
        );
    }
    assert_totals_match(&report, &fleet, backend);
}

#[test]
fn bad_payloads_from_an_outside_client_are_counted_and_the_ingest_keeps_going() {
    if !tools_present("bad_payloads_from_an_outside_client_are_counted_and_the_ingest_keeps_going") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (backend, url) in database_urls(dir.path(), "bad_payloads") {
        let run = dir.path().join(&backend);
        std::fs::create_dir_all(&run).unwrap();
        bad_payloads(&run, &url);
    }
}

/// Bad payloads into an ingest on the database at `url`, with `dir` for its files.
fn bad_payloads(dir: &Path, url: &str) {
    let device = ("counter-bad", "bad-secret");
    let mut broker = Broker::start(&[INGEST, device]);
    let mut ingest = Ingest::start(dir, broker.port, url);
    let golden: Value = serde_json::from_slice(
        &std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../protocol/tests/golden/telemetry.json")).unwrap(),
    )
    .unwrap();
    let mut valid = golden.clone();
    valid["device_id"] = device.0.into();
    valid["seq"] = 1.into();
    let valid = serde_json::to_string(&valid).unwrap();
    let mut wrong_version = serde_json::from_str::<Value>(&valid).unwrap();
    wrong_version["v"] = 2.into();
    let mut other_device = serde_json::from_str::<Value>(&valid).unwrap();
    other_device["device_id"] = "counter-victim".into();
    let topic = format!("rxv/v1/dev/{}/telemetry", device.0);
    let big = "x".repeat(290_000);
    let bad: Vec<(&str, String)> = vec![
        ("garbage", "\u{1}\u{2}not json at all".into()),
        ("truncated", valid[..valid.len() / 2].to_string()),
        ("over the protocol's limit", format!("{{\"pad\":\"{big}\"}}")),
        ("wrong version", wrong_version.to_string()),
        ("another device's id", other_device.to_string()),
    ];
    let publish = |payload: &[u8]| {
        let file = dir.join("payload");
        std::fs::write(&file, payload).unwrap();
        Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-u", device.0, "-P", device.1])
            .args(["-V", "mqttv311", "-q", "1", "-t", &topic, "-f"])
            .arg(&file)
            .output()
            .unwrap()
    };
    for (what, payload) in &bad {
        let out = publish(payload.as_bytes());
        assert!(out.status.success(), "{what}: {}", String::from_utf8_lossy(&out.stderr));
    }
    // 10 MB: the broker refuses it before it reaches the fleet (max_packet_size).
    let _ = publish(&vec![b'x'; 10 << 20]);
    // Then a valid window: stored and acknowledged.
    let (ack_out, ack) = {
        let sub = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-u", device.0, "-P", device.1])
            .args(["-t", &format!("rxv/v1/dev/{}/ack", device.0), "-C", "1", "-W", "20"])
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let out = publish(valid.as_bytes());
        assert!(out.status.success());
        let out = sub.wait_with_output().unwrap();
        (out.status, String::from_utf8_lossy(&out.stdout).to_string())
    };
    assert!(ack_out.success(), "no ack for the valid window");
    let ack: Value = serde_json::from_str(ack.trim()).unwrap();
    assert_eq!(ack["seq"], 1);
    assert!(ingest.running(), "the ingest survived every bad payload");
    let counts: BTreeMap<String, i64> = ingest
        .query(&["rejects"])
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["reason"].as_str().unwrap().to_string(), r["count"].as_i64().unwrap()))
        .collect();
    assert_eq!(
        counts,
        BTreeMap::from([
            ("malformed".to_string(), 2),
            ("too_large".to_string(), 1),
            ("version".to_string(), 1),
            ("wrong_device".to_string(), 1)
        ])
    );
    let fleet = ingest.devices();
    assert_eq!(fleet.keys().collect::<Vec<_>>(), [device.0], "nothing stored for the victim");
    assert_eq!(fleet[device.0]["windows"], 1);
    broker.kill();
}

#[test]
fn rxfleet_prints_its_default_configuration_and_names_a_wrong_key() {
    let dir = tempfile::tempdir().unwrap();
    let printed = Command::new(binary("rxfleet")).arg("print-default-config").output().unwrap();
    assert!(printed.status.success());
    let default = dir.path().join("default.toml");
    std::fs::write(&default, &printed.stdout).unwrap();
    let checked = Command::new(binary("rxfleet")).args(["config", "check", "--config"]).arg(&default).output().unwrap();
    assert!(checked.status.success(), "{}", String::from_utf8_lossy(&checked.stderr));
    let wrong = dir.path().join("wrong.toml");
    std::fs::write(&wrong, "[broker]\nurl = \"mqtt://127.0.0.1:1883\"\npasword_file = \"/etc/x\"\n").unwrap();
    let refused = Command::new(binary("rxfleet")).args(["config", "check", "--config"]).arg(&wrong).output().unwrap();
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("broker.pasword_file"), "{said}");
    // A database URL it cannot use is refused at start with the reason, and nothing is created.
    let bad_db = dir.path().join("bad-db.toml");
    std::fs::write(&bad_db, "[database]\nurl = \"postgres://nobody@127.0.0.1:1/none\"\n").unwrap();
    let out = Command::new(binary("rxfleet")).args(["migrate", "--config"]).arg(&bad_db).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("database"), "{}", String::from_utf8_lossy(&out.stderr));
}

/// A window of `device` as an appliance sends it (the protocol's golden
/// example with the device's id, `seq` and a growing chain).
fn window_payload(device: &str, seq: u64) -> Vec<u8> {
    let golden = workspace_path("protocol/tests/golden/telemetry.json");
    let mut window: rxvision_protocol::Telemetry = serde_json::from_slice(&std::fs::read(golden).unwrap()).unwrap();
    window.device_id = device.into();
    window.seq = seq;
    window.window.start_ms = 1_780_000_000_000 + seq * 60_000;
    window.window.end_ms = window.window.start_ms + 60_000;
    window.audit = rxvision_protocol::ChainHead { next_seq: seq * 5, head: format!("{seq:064x}") };
    rxvision_protocol::encode(&window).unwrap()
}

fn workspace_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative)
}

/// Regression: a backlog larger than the ingest client's request queue
/// (20,000), queued by the broker while the ingest was away. With bounded
/// channels the task reading the broker and the committer (publishing acks
/// and PUBACKs) waited on each other, and the ingest stopped reading for
/// good (found by the load benchmark at 3,000 devices x 30 windows).
#[test]
fn a_backlog_beyond_the_ingest_clients_queue_drains() {
    if !tools_present("a_backlog_beyond_the_ingest_clients_queue_drains") {
        return;
    }
    const DEVICES: usize = 3_000;
    const WINDOWS: u64 = 15;
    let (loadgen, secret) = ("rxtest-loadgen", "loadgen-secret-1");
    let hash = rxvision_fleet::devices::hash_password;
    let passwd = format!("{}:{}\n{loadgen}:{}\n", INGEST.0, hash(INGEST.1), hash(secret));
    let broker = Broker::start_with_passwd(&passwd, &format!("user {loadgen}\ntopic write rxv/v1/dev/+/telemetry\n"));
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/fleet.db", dir.path().display());
    let mut ingest = Ingest::start(dir.path(), broker.port, &url);

    let runtime = tokio::runtime::Runtime::new().unwrap();
    let publish = |messages: Vec<(String, Vec<u8>)>| {
        runtime.block_on(async {
            let mut options = rumqttc::MqttOptions::new("rxtest-backlog", "127.0.0.1", broker.port);
            options.set_credentials(loadgen, secret);
            options.set_max_packet_size(1 << 20, 1 << 20);
            options.set_inflight(1000);
            let (client, mut events) = rumqttc::AsyncClient::new(options, 1000);
            let total = messages.len();
            let sender = tokio::spawn(async move {
                for (topic, payload) in messages {
                    client.publish(topic, rumqttc::QoS::AtLeastOnce, false, payload).await.unwrap();
                }
                client
            });
            let mut acked = 0;
            while acked < total {
                match tokio::time::timeout(Duration::from_secs(60), events.poll()).await {
                    Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::PubAck(_)))) => acked += 1,
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => panic!("publishing the backlog: {e}"),
                    Err(_) => panic!("the broker stopped acknowledging at {acked} of {total}"),
                }
            }
            let _ = sender.await.unwrap().disconnect().await;
        });
    };
    // The ingest's session holds its subscription once a probe is stored.
    publish(vec![("rxv/v1/dev/probe/telemetry".into(), window_payload("probe", 1))]);
    let started = Instant::now();
    while ingest.devices().get("probe").map(|d| d["acked_seq"].as_i64()) != Some(Some(1)) {
        assert!(started.elapsed() < Duration::from_secs(30), "the probe window is not stored");
        std::thread::sleep(Duration::from_millis(200));
    }
    ingest.kill();
    let devices: Vec<String> = (0..DEVICES).map(|n| format!("backlog-{n:05}")).collect();
    let mut messages = Vec::new();
    for seq in 1..=WINDOWS {
        for id in &devices {
            messages.push((format!("rxv/v1/dev/{id}/telemetry"), window_payload(id, seq)));
        }
    }
    publish(messages);
    eprintln!("{} windows queued for the ingest's session", DEVICES as u64 * WINDOWS);
    ingest.relaunch();
    let started = Instant::now();
    loop {
        let fleet = ingest.devices();
        let done = devices.iter().filter(|id| fleet.get(*id).and_then(|d| d["acked_seq"].as_u64()) == Some(WINDOWS));
        let done = done.count();
        if done == DEVICES {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "{done} of {DEVICES} devices fully acknowledged after 300 s: the ingest stopped reading"
        );
        assert!(ingest.running(), "the ingest exited");
        std::thread::sleep(Duration::from_secs(2));
    }
    eprintln!("drained in {:.1} s", started.elapsed().as_secs_f64());
}
