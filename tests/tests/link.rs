//! An appliance (`rxvisiond run`) and a real Mosquitto with the shipped
//! ACL: the daemon's outbox reaches the fleet's ingest account through the
//! broker, every payload is a valid protocol message, the retained status
//! says online, and the fleet's `ack` empties the outbox.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use rxvision_protocol::{decode, Event, EventKind, Status, Telemetry};

use crate::broker::Broker;

const API_KEY: &str = "link-test-api-key-0123";
const DEVICE: (&str, &str) = ("counter-test", "device-secret-1");
const INGEST: (&str, &str) = ("rxfleet-ingest", "ingest-secret-1");

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// `target/<profile>/rxvisiond`, built by `cargo build --workspace` (scripts/test does).
fn rxvisiond() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let binary = exe.parent().and_then(Path::parent).unwrap().join("rxvisiond");
    assert!(binary.exists(), "{} is missing: build the workspace first (cargo build --workspace)", binary.display());
    binary
}

fn secret(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

struct Daemon {
    child: Child,
    addr: SocketAddr,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_daemon(dir: &Path, broker_port: u16) -> Daemon {
    start_daemon_to(dir, &format!("mqtt://127.0.0.1:{broker_port}"), None, None)
}

fn start_daemon_to(dir: &Path, broker: &str, ca_file: Option<&Path>, client: Option<(&Path, &Path)>) -> Daemon {
    start_daemon_with(dir, broker, ca_file, client, &[])
}

/// [`start_daemon_to`] with more edits of the test configuration (`(from, to)` text replacements).
fn start_daemon_edited(dir: &Path, broker: &str, edits: &[(&str, &str)]) -> Daemon {
    start_daemon_with(dir, broker, None, None, edits)
}

fn start_daemon_with(
    dir: &Path,
    broker: &str,
    ca_file: Option<&Path>,
    client: Option<(&Path, &Path)>,
    edits: &[(&str, &str)],
) -> Daemon {
    let fixture = workspace().join("models/bundles/fixture-cnn/0.1.0");
    secret(&dir.join("audit.key"), &"cd".repeat(32));
    secret(&dir.join("api.key"), API_KEY);
    secret(&dir.join("broker.password"), DEVICE.1);
    let p = |path: &Path| format!("{:?}", path.display().to_string());
    let config = std::fs::read_to_string(workspace().join("firmware-cfg/rxvisiond.toml"))
        .unwrap()
        .replace("id = \"unprovisioned\"", &format!("id = \"{}\"", DEVICE.0))
        .replace("state_dir = \"/var/lib/rxvision\"", &format!("state_dir = {}", p(dir)))
        .replace("bundle = \"\"", &format!("bundle = {}", p(&fixture)))
        .replace("engine = \"auto\"", "engine = \"cpu\"")
        .replace("listen = \"127.0.0.1:8470\"", "listen = \"127.0.0.1:0\"")
        .replace("api_key_file = \"\"", &format!("api_key_file = {}", p(&dir.join("api.key"))))
        .replace("api_key_credential = \"api-key\"", "api_key_credential = \"\"")
        .replace("dir = \"/var/lib/rxvision/audit\"", &format!("dir = {}", p(&dir.join("audit"))))
        .replace("\nkey_file = \"\"", &format!("\nkey_file = {}", p(&dir.join("audit.key"))))
        .replace("\nkey_credential = \"audit-key\"", "\nkey_credential = \"\"")
        .replace("enabled = false\n# Length of a window", "enabled = true\n# Length of a window")
        .replace("window_seconds = 60", "window_seconds = 1")
        .replace("broker = \"\"", &format!("broker = \"{broker}\""))
        .replace("ca_file = \"\"", &format!("ca_file = {}", ca_file.map_or("\"\"".to_string(), p)))
        .replace(
            "client_cert_file = \"\"",
            &format!("client_cert_file = {}", client.map_or("\"\"".to_string(), |c| p(c.0))),
        )
        .replace(
            "client_key_file = \"\"",
            &format!("client_key_file = {}", client.map_or("\"\"".to_string(), |c| p(c.1))),
        )
        .replace("password_file = \"\"", &format!("password_file = {}", p(&dir.join("broker.password"))))
        .replace("ack_timeout_seconds = 30", "ack_timeout_seconds = 2");
    let config = edits.iter().fold(config, |config, (from, to)| {
        assert!(config.contains(from), "the test configuration has {from:?}");
        config.replace(from, to)
    });
    let path = dir.join("rxvisiond.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(rxvisiond())
        .args(["run", "--config", path.to_str().unwrap()])
        .env("RXVISION_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.trim().strip_prefix("rxvisiond: listening on http://").unwrap_or_else(|| panic!("{line:?}"));
    Daemon { child, addr: addr.parse().unwrap() }
}

fn http(addr: SocketAddr, method: &str, path: &str, body: Option<&str>) -> serde_json::Value {
    let mut stream = TcpStream::connect(addr).unwrap();
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer {API_KEY}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    serde_json::from_str(body).unwrap_or(serde_json::Value::Null)
}

/// Runs mosquitto_sub as the ingest with a persistent session `session`.
fn ingest_session(broker: &Broker, session: &str, extra: &[&str]) -> String {
    let output = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-u", INGEST.0, "-P", INGEST.1])
        .args(["-V", "mqttv311", "-i", session, "-c", "-q", "1", "-v"])
        .args(["-t", "rxv/v1/dev/+/events", "-t", "rxv/v1/dev/+/telemetry"])
        .args(extra)
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout).to_string()
}

/// One scan of the fixture's picture through the API.
fn scan(d: &Daemon) {
    let frame =
        std::fs::read(workspace().join("models/bundles/fixture-cnn/0.1.0/selftest/c00_white_round.png")).unwrap();
    let image = base64::engine::general_purpose::STANDARD.encode(frame);
    let answer =
        http(d.addr, "POST", "/v1/verify", Some(&format!("{{\"operator_id\":\"tech-1\",\"image\":\"{image}\"}}")));
    assert!(answer["audit_seq"].is_u64(), "the scan was not answered: {answer}");
}

/// Polls the daemon's status until `done` says so (at most 30 s).
fn wait_for(d: &Daemon, what: &str, done: impl Fn(&serde_json::Value) -> bool) {
    let started = Instant::now();
    loop {
        let status = http(d.addr, "GET", "/v1/status", None);
        if done(&status) {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "{what} never happened: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_outbox_reaches_the_fleet_through_the_broker_and_acks_empty_it() {
    if !crate::broker::tools_present("the_outbox_reaches_the_fleet_through_the_broker_and_acks_empty_it") {
        return;
    }
    let broker = Broker::start(&[INGEST, DEVICE]);
    // The ingest's persistent session exists before the device speaks: the
    // broker queues what arrives while it is away.
    ingest_session(&broker, "ingest-test", &["-W", "1"]);
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon(dir.path(), broker.port);
    for _ in 0..2 {
        scan(&d);
    }
    // Wait until the daemon has sent its start event and a window with the scans.
    let started = Instant::now();
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(30) {
        let status = http(d.addr, "GET", "/v1/status", None);
        if status["telemetry"]["link"] == "up" && status["telemetry"]["outbox"]["depth"].as_u64() >= Some(2) {
            sent = status["telemetry"]["outbox"]["depth"].as_u64().unwrap();
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(sent >= 2, "the link never came up with the messages queued");
    let received = ingest_session(&broker, "ingest-test", &["-C", "2", "-W", "10"]);
    let lines: Vec<(&str, &str)> = received.lines().filter_map(|l| l.split_once(' ')).collect();
    assert_eq!(lines.len(), 2, "{received}");
    assert_eq!(lines[0].0, "rxv/v1/dev/counter-test/events");
    let event: Event = decode(lines[0].1.as_bytes()).unwrap();
    assert_eq!((event.seq, event.kind), (1, EventKind::DaemonStarted));
    assert_eq!(lines[1].0, "rxv/v1/dev/counter-test/telemetry");
    let window: Telemetry = decode(lines[1].1.as_bytes()).unwrap();
    assert_eq!(window.seq, 2);
    // The retained status says the device is online, with its outbox.
    let (_, status) = broker.first_message(INGEST.0, INGEST.1, "rxv/v1/dev/counter-test/status");
    let status: Status = decode(status.as_bytes()).unwrap();
    assert!(status.online && status.outbox.is_some(), "{status:?}");
    // The fleet acknowledges seq 2: the daemon forgets both messages, durably.
    let ack = format!("{{\"v\":1,\"device_id\":\"{}\",\"seq\":2}}", DEVICE.0);
    let published = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-u", INGEST.0, "-P", INGEST.1])
        .args(["-q", "1", "-t", "rxv/v1/dev/counter-test/ack", "-m", &ack])
        .status()
        .unwrap();
    assert!(published.success());
    let started = Instant::now();
    loop {
        let status = http(d.addr, "GET", "/v1/status", None);
        if status["telemetry"]["outbox"]["acked_seq"] == 2 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the ack never arrived: {status}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The appliance's link waits the ack timeout for each message after a
/// quiet spell: the timeout counted from the last ack, so a window sent
/// after a longer gap than the timeout (60 s windows, 30 s timeout in the
/// field) was sent twice at once whenever the fleet took over half a second
/// to acknowledge it, doubling the load just when the fleet was slow.
#[test]
fn after_a_quiet_spell_a_message_waits_its_ack_timeout_before_it_is_sent_again() {
    if !crate::broker::tools_present("after_a_quiet_spell_a_message_waits_its_ack_timeout_before_it_is_sent_again") {
        return;
    }
    let broker = Broker::start(&[INGEST, DEVICE]);
    // A fleet that acknowledges every message a second after it arrives
    // (slower than the link's half-second tick, faster than the 2 s timeout).
    let mut fleet = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-u", INGEST.0, "-P", INGEST.1])
        .args(["-V", "mqttv311", "-i", "slow-fleet", "-q", "1", "-v"])
        .args(["-t", "rxv/v1/dev/+/telemetry", "-t", "rxv/v1/dev/+/events"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let deliveries: Arc<Mutex<Vec<u64>>> = Arc::default();
    let reader = {
        let (stdout, deliveries, port) = (fleet.stdout.take().unwrap(), deliveries.clone(), broker.port);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Some((topic, payload)) = line.split_once(' ') else { continue };
                let seq = if topic.ends_with("/telemetry") {
                    let window: Telemetry = decode(payload.as_bytes()).unwrap();
                    deliveries.lock().unwrap().push(window.seq);
                    window.seq
                } else {
                    decode::<Event>(payload.as_bytes()).unwrap().seq
                };
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_secs(1));
                    let ack = format!("{{\"v\":1,\"device_id\":\"{}\",\"seq\":{seq}}}", DEVICE.0);
                    let _ = Command::new("mosquitto_pub")
                        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-u", INGEST.0, "-P", INGEST.1])
                        .args(["-q", "1", "-t", "rxv/v1/dev/counter-test/ack", "-m", &ack])
                        .status();
                });
            }
        })
    };
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon_edited(
        dir.path(),
        &format!("mqtt://127.0.0.1:{}", broker.port),
        &[("window_seconds = 1", "window_seconds = 4")],
    );
    // Three windows, each after a quiet spell of about 3 s.
    for _ in 0..3 {
        scan(&d);
        std::thread::sleep(Duration::from_secs(4));
    }
    std::thread::sleep(Duration::from_secs(2));
    fleet.kill().unwrap();
    fleet.wait().unwrap();
    reader.join().unwrap();
    let deliveries = deliveries.lock().unwrap();
    assert!(deliveries.len() >= 2, "windows reached the fleet: {deliveries:?}");
    let mut unique = deliveries.clone();
    unique.dedup();
    assert_eq!(*deliveries, unique, "a window was sent again before its ack timeout");
}

#[test]
fn a_broker_killed_and_restarted_under_load_loses_nothing_and_counts_nothing_twice() {
    if !crate::broker::tools_present("a_broker_killed_and_restarted_under_load_loses_nothing_and_counts_nothing_twice")
    {
        return;
    }
    let mut broker = Broker::start(&[INGEST, DEVICE]);
    ingest_session(&broker, "ingest-fault", &["-W", "1"]);
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon(dir.path(), broker.port);
    wait_for(&d, "the link coming up", |s| s["telemetry"]["link"] == "up");
    scan(&d);
    scan(&d);
    broker.kill();
    wait_for(&d, "the link going down", |s| s["telemetry"]["link"] == "down");
    // Offline is normal: scans are answered, and counted in the outbox.
    scan(&d);
    scan(&d);
    broker.restart();
    // The broker lost its sessions and queues with its process: the fleet
    // subscribes again, and whatever it has not acknowledged the daemon sends
    // again once the ack timeout (2 s here) passes.
    ingest_session(&broker, "ingest-fault", &["-W", "1"]);
    wait_for(&d, "the link coming back", |s| s["telemetry"]["link"] == "up");
    // The fleet reads until the four scans are there; replays (the broker lost
    // its queue, the daemon sent again) are told apart by seq.
    let mut windows = std::collections::BTreeMap::<u64, Telemetry>::new();
    let mut events = std::collections::BTreeMap::<u64, Event>::new();
    let started = Instant::now();
    let complete = |windows: &std::collections::BTreeMap<u64, Telemetry>,
                    events: &std::collections::BTreeMap<u64, Event>| {
        let seqs: Vec<u64> = windows.keys().chain(events.keys()).copied().collect();
        let highest = seqs.iter().max().copied().unwrap_or(0);
        windows.values().map(|w| w.scans).sum::<u64>() >= 4 && seqs.len() as u64 == highest
    };
    while !complete(&windows, &events) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "missing: windows {:?}, events {:?}",
            windows.keys(),
            events.keys()
        );
        for line in ingest_session(&broker, "ingest-fault", &["-W", "1"]).lines() {
            let (topic, payload) = line.split_once(' ').unwrap();
            if topic.ends_with("/telemetry") {
                let window: Telemetry = decode(payload.as_bytes()).unwrap();
                if let Some(before) = windows.insert(window.seq, window.clone()) {
                    assert_eq!(before, window, "seq {} named two different windows", window.seq);
                }
            } else {
                let event: Event = decode(payload.as_bytes()).unwrap();
                events.insert(event.seq, event);
            }
        }
    }
    assert_eq!(windows.values().map(|w| w.scans).sum::<u64>(), 4, "every scan counted exactly once");
    // No gaps below the highest seq received.
    let highest = windows.keys().chain(events.keys()).max().copied().unwrap();
    let seqs: std::collections::BTreeSet<u64> = windows.keys().chain(events.keys()).copied().collect();
    assert_eq!(seqs, (1..=highest).collect(), "a seq is missing");
}

#[test]
fn the_link_speaks_tls_to_a_broker_its_ca_vouches_for() {
    if !crate::broker::tools_present("the_link_speaks_tls_to_a_broker_its_ca_vouches_for") {
        return;
    }
    let broker = Broker::start_tls(&[INGEST, DEVICE]);
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon_to(dir.path(), &format!("mqtts://localhost:{}", broker.port), Some(&broker.ca_file()), None);
    wait_for(&d, "the TLS link coming up", |s| s["telemetry"]["link"] == "up");
    drop(d);
    // Another CA: the daemon refuses the broker and stays down (and keeps working).
    let other = tempfile::tempdir().unwrap();
    crate::broker::make_ca(other.path(), "other-ca", "/CN=someone else");
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon_to(
        dir.path(),
        &format!("mqtts://localhost:{}", broker.port),
        Some(&other.path().join("other-ca.crt")),
        None,
    );
    std::thread::sleep(Duration::from_secs(2));
    let status = http(d.addr, "GET", "/v1/status", None);
    assert_eq!(status["telemetry"]["link"], "down", "{status}");
    scan(&d);
}

#[test]
fn a_broker_that_asks_for_client_certificates_gets_the_devices() {
    if !crate::broker::tools_present("a_broker_that_asks_for_client_certificates_gets_the_devices") {
        return;
    }
    let broker = Broker::start_tls_with_client_certificates(&[INGEST, DEVICE]);
    let (cert, key) = broker.client_certificate(DEVICE.0);
    let address = format!("mqtts://localhost:{}", broker.port);
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon_to(dir.path(), &address, Some(&broker.ca_file()), Some((&cert, &key)));
    wait_for(&d, "the link with a client certificate coming up", |s| s["telemetry"]["link"] == "up");
    drop(d);
    // Without one, the broker refuses the device.
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon_to(dir.path(), &address, Some(&broker.ca_file()), None);
    std::thread::sleep(Duration::from_secs(2));
    let status = http(d.addr, "GET", "/v1/status", None);
    assert_eq!(status["telemetry"]["link"], "down", "{status}");
}

/// An appliance killed with SIGKILL between windows, then one whose audit
/// store is restored from an older copy, against the real ingest: every
/// scan it answered reaches the fleet's database exactly once, and the
/// fleet flags the restored chain.
#[test]
fn a_killed_appliance_loses_no_scan_and_a_restored_audit_store_is_flagged() {
    if !crate::broker::tools_present("a_killed_appliance_loses_no_scan_and_a_restored_audit_store_is_flagged") {
        return;
    }
    use crate::fleet::Ingest;
    let broker = Broker::start(&[INGEST, DEVICE]);
    let fleet_dir = tempfile::tempdir().unwrap();
    let ingest =
        Ingest::start(fleet_dir.path(), broker.port, &format!("sqlite://{}/fleet.db", fleet_dir.path().display()));
    let fleet_scans = || ingest.devices().get(DEVICE.0).map_or(0, |d| d["scans"].as_i64().unwrap());
    let wait_for_fleet = |what: &str, done: &dyn Fn() -> bool| {
        let started = Instant::now();
        while !done() {
            assert!(started.elapsed() < Duration::from_secs(40), "the fleet never saw {what}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let mut d = start_daemon(dir.path(), broker.port);
    wait_for(&d, "the link coming up", |s| s["telemetry"]["link"] == "up");
    for _ in 0..3 {
        scan(&d);
    }
    // SIGKILL right after answering: the window holding these scans was never stored.
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    d = start_daemon(dir.path(), broker.port);
    scan(&d);
    scan(&d);
    wait_for_fleet("five scans", &|| fleet_scans() >= 5);
    wait_for(&d, "the outbox emptying", |s| s["telemetry"]["outbox"]["depth"] == 0);
    assert_eq!(fleet_scans(), 5, "every scan answered reached the fleet once");

    // A copy of the store (daemon stopped), two more scans, then the copy restored.
    drop(d);
    let backup = tempfile::tempdir().unwrap();
    let copy = |from: &Path, to: &Path| {
        let out = Command::new("cp").arg("-a").arg(from).arg(to).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    copy(&dir.path().join("audit"), backup.path());
    copy(&dir.path().join("audit-anchor"), backup.path());
    d = start_daemon(dir.path(), broker.port);
    scan(&d);
    scan(&d);
    wait_for_fleet("seven scans", &|| fleet_scans() >= 7);
    drop(d);
    std::fs::remove_dir_all(dir.path().join("audit")).unwrap();
    copy(&backup.path().join("audit"), dir.path());
    copy(&backup.path().join("audit-anchor"), dir.path());
    d = start_daemon(dir.path(), broker.port);
    scan(&d);
    let flagged = || {
        ingest.query(&["events"]).as_array().unwrap().iter().any(|e| {
            e["kind"] == "audit_chain_rewritten" && e["device_id"] == DEVICE.0 && e["details"]["how"] == "shorter"
        })
    };
    wait_for_fleet("the restored chain flagged", &flagged);
    wait_for_fleet("the scan after the restore", &|| fleet_scans() >= 8);
    wait_for(&d, "the outbox emptying", |s| s["telemetry"]["outbox"]["depth"] == 0);
    assert_eq!(fleet_scans(), 8, "the restored store's new scan counted once, nothing recounted");
    assert_eq!(ingest.devices()[DEVICE.0]["chain_rewrites"], 1);
}

/// The whole path over TLS: an appliance and the fleet's ingest both check
/// the broker's certificate against the fleet's CA.
#[test]
fn an_appliance_reaches_the_ingest_through_a_tls_broker() {
    if !crate::broker::tools_present("an_appliance_reaches_the_ingest_through_a_tls_broker") {
        return;
    }
    use crate::fleet::Ingest;
    let broker = Broker::start_tls(&[INGEST, DEVICE]);
    let address = format!("mqtts://localhost:{}", broker.port);
    let fleet_dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/fleet.db", fleet_dir.path().display());
    let ingest = Ingest::start_to(fleet_dir.path(), &address, Some(&broker.ca_file()), &url);
    let dir = tempfile::tempdir().unwrap();
    let d = start_daemon_to(dir.path(), &address, Some(&broker.ca_file()), None);
    scan(&d);
    scan(&d);
    let started = Instant::now();
    while ingest.devices().get(DEVICE.0).map_or(0, |d| d["scans"].as_i64().unwrap()) < 2 {
        assert!(started.elapsed() < Duration::from_secs(30), "the scans never reached the fleet over TLS");
        std::thread::sleep(Duration::from_millis(200));
    }
    wait_for(&d, "the outbox emptying", |s| s["telemetry"]["outbox"]["depth"] == 0);
    assert_eq!(ingest.devices()[DEVICE.0]["online"], true, "the retained status arrived");
}
