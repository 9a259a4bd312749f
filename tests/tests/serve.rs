//! `rxfleet serve`: one command runs a fleet (managed Mosquitto, ingest,
//! API, dashboard, metrics); devices provisioned with `devices add`;
//! tokens, roles and scopes; retirement at the broker; leader failover
//! between replicas; the OpenAPI document; the dashboard in headless
//! Chromium; `promtool check metrics` on a live scrape.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::{json, Value};

use crate::broker::tools_present;
use crate::fleet::{
    assert_totals_match, binary, broker_for, database_urls, finish_sim, sim_devices, INGEST, SIM_PASSWORD,
};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One HTTP/1.1 exchange on its own connection (`Connection: close`): (status, body).
pub(crate) fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    let body = body.unwrap_or("");
    if method != "GET" {
        request.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes())?;
    // Read the head, then the body by its Content-Length (chromedriver
    // leaves the connection open), or to the end.
    let mut response = Vec::new();
    let mut chunk = [0u8; 65536];
    let split = loop {
        if let Some(split) = response.windows(4).position(|w| w == b"\r\n\r\n") {
            break split;
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break response.len();
        }
        response.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&response[..split]).to_string();
    let length = head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("content-length").then(|| value.trim().parse::<usize>().ok()).flatten()
    });
    loop {
        if length.is_some_and(|n| response.len() >= split + 4 + n) {
            break;
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        response.extend_from_slice(&chunk[..n]);
    }
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let mut body = response.get(split + 4..).unwrap_or_default().to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    Ok((status, body))
}

/// The body of a chunked response.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    while let Some(end) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&raw[..end]).split(';').next().unwrap().trim(), 16)
            .unwrap_or(0);
        if size == 0 {
            break;
        }
        body.extend_from_slice(&raw[end + 2..end + 2 + size]);
        raw = &raw[end + 2 + size + 2..];
    }
    body
}

/// An API call whose answer is JSON.
fn api(addr: SocketAddr, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let body = body.map(|b| b.to_string());
    let (status, bytes) = try_http(addr, method, path, token, body.as_deref()).unwrap();
    let value =
        serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
    (status, value)
}

/// A running `rxfleet serve`; killed (SIGKILL) when dropped.
pub(crate) struct Fleet {
    child: Child,
    config: Option<PathBuf>,
    env: Vec<(String, String)>,
    pub(crate) http: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Drop for Fleet {
    /// SIGTERM (it stops its managed broker), SIGKILL after 10 s.
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let started = Instant::now();
        while self.child.try_wait().ok().flatten().is_none() && started.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Fleet {
    /// Starts `rxfleet serve` (with `config`, or none) and waits until it serves HTTP.
    pub(crate) fn start(name: &str, config: Option<&Path>, env: &[(&str, &str)]) -> Fleet {
        let mut command = Command::new(binary("rxfleet"));
        command.arg("serve");
        if let Some(config) = config {
            command.arg("--config").arg(config);
        }
        command.env_remove("STATE_DIRECTORY").env("RUST_LOG", "info");
        for (k, v) in env {
            command.env(k, v);
        }
        let mut child = command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let log: Arc<Mutex<Vec<String>>> = Arc::default();
        let (tx, rx) = std::sync::mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        let (lines, name) = (log.clone(), name.to_string());
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[{name}] {line}");
                let address = line
                    .strip_prefix("rxfleet: dashboard http://")
                    .or(line.strip_prefix("rxfleet: dashboard https://"));
                if let Some(rest) = address {
                    let _ = tx.send(rest.split('/').next().unwrap().to_string());
                }
                lines.lock().unwrap().push(line);
            }
        });
        let http = rx.recv_timeout(Duration::from_secs(30)).expect("rxfleet serve prints its address").parse().unwrap();
        Fleet {
            child,
            config: config.map(Path::to_path_buf),
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            http,
            log,
        }
    }

    /// Waits until the log has a line containing `needle`.
    pub(crate) fn wait_log(&self, needle: &str, within: Duration) {
        let started = Instant::now();
        while !self.log.lock().unwrap().iter().any(|l| l.contains(needle)) {
            assert!(started.elapsed() < within, "no log line with {needle:?} within {within:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `rxfleet ARGS` with this fleet's configuration: (success, stdout, stderr).
    pub(crate) fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let mut command = Command::new(binary("rxfleet"));
        command.args(args).env_remove("STATE_DIRECTORY");
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        for (k, v) in &self.env {
            command.env(k, v);
        }
        let out = command.output().unwrap();
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
    }

    pub(crate) fn cli_ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.cli(args);
        assert!(ok, "rxfleet {args:?}: {err}");
        out
    }

    fn token(&self, role: &str, name: &str, scope: &str) -> String {
        self.cli_ok(&["tokens", "create", "--role", role, "--name", name, "--scope", scope]).trim().to_string()
    }

    /// Provisions the simulator's devices (`devices add --json`) at sites
    /// `pharmacy-SSS`, and writes their passwords for `--passwords`.
    fn provision(&self, devices: &[String], passwords: &Path) {
        let mut map = serde_json::Map::new();
        for id in devices {
            let site = format!("pharmacy-{}", &id.split("-s").nth(1).unwrap()[..3]);
            let out: Value =
                serde_json::from_str(&self.cli_ok(&["devices", "add", "--site", &site, "--id", id, "--json"])).unwrap();
            assert_eq!(out["device_id"], id.as_str());
            assert!(out["config"].as_str().unwrap().contains(&format!("id = {id:?}")), "{out}");
            map.insert(id.clone(), out["password"].clone());
        }
        std::fs::write(passwords, Value::Object(map).to_string()).unwrap();
    }

    /// The ingest's per-device totals (`devices stats`).
    fn stats(&self) -> BTreeMap<String, Value> {
        let out: Value = serde_json::from_str(&self.cli_ok(&["devices", "stats", "--json"])).unwrap();
        out.as_array().unwrap().iter().map(|d| (d["device_id"].as_str().unwrap().to_string(), d.clone())).collect()
    }

    /// `kill -9`: no goodbye, no lease released.
    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// Runs the simulator against `broker` with provisioned `passwords` until its outboxes drain.
fn run_sim(dir: &Path, broker: &str, prefix: &str, passwords: Option<&Path>, extra: &[&str]) -> Child {
    let mut command = Command::new(binary("rxvision-fleet-sim"));
    command.args(["--broker", broker, "--prefix", prefix]).arg("--state-dir").arg(dir.join("devices"));
    match passwords {
        Some(p) => command.arg("--passwords").arg(p),
        None => command.args(["--password", SIM_PASSWORD]),
    };
    command.arg("--report").arg(dir.join("report.json")).args(extra).spawn().unwrap()
}

/// `promtool check metrics` on a scrape: None when promtool is missing (and allowed to be).
fn promtool_check_metrics(scrape: &[u8]) -> Option<String> {
    if Command::new("promtool").arg("--version").output().is_err() {
        assert!(
            std::env::var_os("RXVISION_REQUIRE_REFERENCES").is_none(),
            "promtool is required here (scripts/setup-system installs Debian's prometheus)"
        );
        eprintln!("SKIPPED promtool check metrics: promtool is not installed");
        return None;
    }
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(scrape).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool check metrics: {said}");
    Some(said)
}

/// The value of the sample `name{labels}` summed over every label set containing `with`.
fn metric_sum(scrape: &str, name: &str, with: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| l.contains(with))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum()
}

#[test]
fn serve_with_no_configuration_runs_a_fleet_the_dashboard_shows() {
    if !tools_present("serve_with_no_configuration_runs_a_fleet_the_dashboard_shows") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("xdg-state");
    let fleet = Fleet::start("fleet", None, &[("XDG_STATE_HOME", state.to_str().unwrap())]);
    fleet.wait_log("this replica leads", Duration::from_secs(20));
    assert_eq!(fleet.http.to_string(), "127.0.0.1:8490", "the documented default address");
    assert!(state.join("rxfleet/fleet.db").exists(), "state in $XDG_STATE_HOME/rxfleet");
    let passwd = std::fs::read_to_string(state.join("rxfleet/mosquitto/passwd")).unwrap();
    assert!(passwd.starts_with("rxfleet-ingest:$7$101$"), "{passwd}");

    // Six simulated appliances at three sites, provisioned one by one.
    let devices = sim_devices("dash", 6, 3);
    let passwords = dir.path().join("passwords.json");
    fleet.provision(&devices, &passwords);
    let sim = run_sim(
        dir.path(),
        "mqtt://127.0.0.1:18830",
        "dash",
        Some(&passwords),
        &["--devices", "6", "--sites", "3", "--windows", "30", "--interval-ms", "40", "--ack-timeout-secs", "2"],
    );
    let report = finish_sim(sim, dir.path());
    assert_totals_match(&report, &fleet.stats(), "managed broker");
    let scans: i64 = report.values().map(|d| d["scans"].as_i64().unwrap()).sum();

    // The API's fleet view and the metrics agree with what the appliances counted.
    let admin = fleet.token("admin", "dashboard-admin", "fleet");
    let (status, summary) = api(fleet.http, "GET", "/api/v1/fleet", Some(&admin), None);
    assert_eq!(status, 200, "{summary}");
    assert_eq!(summary["devices"]["total"], 6);
    assert_eq!(summary["telemetry"]["scans"], scans, "{summary}");
    assert_eq!(summary["replica"]["leader"], true);
    let (status, sites) = api(fleet.http, "GET", "/api/v1/sites", Some(&admin), None);
    assert_eq!(status, 200);
    let site_scans: i64 = sites["items"].as_array().unwrap().iter().map(|s| s["scans"].as_i64().unwrap()).sum();
    assert_eq!((sites["items"].as_array().unwrap().len(), site_scans), (3, scans), "{sites}");
    let (status, scrape) = try_http(fleet.http, "GET", "/metrics", None, None).unwrap();
    assert_eq!(status, 200);
    if let Some(said) = promtool_check_metrics(&scrape) {
        eprintln!("promtool check metrics: ok {said}");
    }
    let scrape = String::from_utf8(scrape).unwrap();
    assert_eq!(metric_sum(&scrape, "rxvision_predictions_total", ""), scans as f64);
    assert_eq!(metric_sum(&scrape, "rxvision_prediction_latency_seconds_count", ""), scans as f64);
    assert_eq!(metric_sum(&scrape, "rxvision_fleet_leader", ""), 1.0);

    // The dashboard, in headless Chromium.
    let Some(browser) = Browser::start() else { return };
    let base = format!("http://{}", fleet.http);
    browser.log_in(&base, &admin);
    assert_eq!(browser.attr("[data-testid=fleet-devices-total]", "data-value"), "6");
    assert_eq!(browser.attr("[data-testid=fleet-scans]", "data-value"), scans.to_string());
    assert_eq!(browser.count("[data-testid=site-row]"), 3);
    assert!(browser.count("[data-testid=fleet-chart] canvas") >= 1, "the fleet's charts are drawn");
    browser.screenshot("dashboard-fleet.png");
    // Sorting the site table by scans, descending, puts the busiest site first.
    browser.click("[data-testid=sort-scans]");
    browser.click("[data-testid=sort-scans]");
    let busiest = sites["items"].as_array().unwrap().iter().max_by_key(|s| s["scans"].as_i64().unwrap()).unwrap();
    assert_eq!(browser.attr("[data-testid=site-row]", "data-site"), busiest["site"].as_str().unwrap());
    // A device's page with its history.
    browser.go(&format!("{base}/#/device/{}", devices[0]));
    browser.wait_loaded();
    assert_eq!(browser.attr("[data-testid=device-state]", "data-state"), "offline", "the simulator has stopped");
    assert!(browser.count("[data-testid=device-chart] canvas") >= 1);
    browser.screenshot("dashboard-device.png");
}

#[test]
fn tokens_roles_scopes_audit_events_and_retirement() {
    if !tools_present("tokens_roles_scopes_audit_events_and_retirement") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mqtt = free_port();
    let config = dir.path().join("rxfleet.toml");
    std::fs::write(
        &config,
        format!(
            "[fleet]\nstate_dir = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n[broker]\nlisten = \"127.0.0.1:{mqtt}\"\n",
            dir.path().join("state").display().to_string()
        ),
    )
    .unwrap();
    let fleet = Fleet::start("roles", Some(&config), &[]);
    let addr = fleet.http;
    let admin = fleet.token("admin", "admin-1", "fleet");
    let viewer = fleet.token("viewer", "viewer-1", "fleet");
    let operator = fleet.token("operator", "operator-1", "fleet");

    // Missing, malformed and unknown tokens: 401 with a stable code.
    for token in [None, Some("nonsense"), Some("rxf_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA")] {
        let (status, body) = api(addr, "GET", "/api/v1/devices", token, None);
        assert_eq!((status, body["error"]["code"].as_str()), (401, Some("unauthorized")), "{token:?}: {body}");
    }
    // The admin provisions devices through the API; a viewer and an operator cannot.
    let (status, a1) =
        api(addr, "POST", "/api/v1/devices", Some(&admin), Some(json!({"site": "site-a", "device_id": "a-1"})));
    assert_eq!(status, 201, "{a1}");
    let (status, _) =
        api(addr, "POST", "/api/v1/devices", Some(&admin), Some(json!({"site": "site-a", "device_id": "a-2"})));
    assert_eq!(status, 201);
    let (status, b1) =
        api(addr, "POST", "/api/v1/devices", Some(&admin), Some(json!({"site": "site-b", "device_id": "b-1"})));
    assert_eq!(status, 201);
    for token in [&viewer, &operator] {
        let (status, body) = api(addr, "POST", "/api/v1/devices", Some(token), Some(json!({"site": "site-a"})));
        assert_eq!((status, body["error"]["code"].as_str()), (403, Some("forbidden")), "{body}");
        let (status, _) = api(addr, "POST", "/api/v1/devices/a-1/retire", Some(token), None);
        assert_eq!(status, 403);
        let (status, _) = api(addr, "POST", "/api/v1/tokens", Some(token), Some(json!({"name": "x", "role": "admin"})));
        assert_eq!(status, 403);
        let (status, _) = api(addr, "DELETE", "/api/v1/tokens/admin-1", Some(token), None);
        assert_eq!(status, 403);
    }
    let (status, _) = api(addr, "POST", "/api/v1/devices/a-1/chain-review", Some(&viewer), None);
    assert_eq!(status, 403, "a viewer changes nothing");
    let (status, body) = api(addr, "POST", "/api/v1/devices/a-1/chain-review", Some(&operator), None);
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_request")), "nothing to review: {body}");
    // Bad input: a clear error, nothing created.
    let (status, body) = api(addr, "POST", "/api/v1/devices", Some(&admin), Some(json!({"site": "a/b"})));
    assert_eq!(status, 400, "{body}");
    let (status, body) =
        api(addr, "POST", "/api/v1/devices", Some(&admin), Some(json!({"site": "s", "colour": "red"})));
    assert!(status == 400 && body["error"]["message"].as_str().unwrap().contains("colour"), "{body}");
    let (status, _) =
        api(addr, "POST", "/api/v1/devices", Some(&admin), Some(json!({"site": "site-a", "device_id": "a-1"})));
    assert_eq!(status, 409);
    let (status, body) = api(addr, "GET", "/api/v1/fleet/telemetry?from_ms=0&to_ms=99999999999999", Some(&admin), None);
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("range_too_long")), "{body}");
    let (status, body) = api(addr, "GET", "/api/v1/devices?limit=100000", Some(&admin), None);
    assert_eq!(status, 400, "{body}");
    let (_, all) = api(addr, "GET", "/api/v1/devices", Some(&admin), None);
    assert_eq!(all["total"], 3, "{all}");
    // Every sort, both ways; pages of one follow the cursor to the end.
    for sort in ["device_id", "site", "last_seen", "backlog"] {
        for order in ["asc", "desc"] {
            let (status, page) =
                api(addr, "GET", &format!("/api/v1/devices?sort={sort}&order={order}"), Some(&admin), None);
            assert_eq!((status, page["total"].as_i64()), (200, Some(3)), "{sort} {order}: {page}");
        }
    }
    let (_, page) = api(addr, "GET", "/api/v1/devices?sort=device_id&order=desc&limit=1", Some(&admin), None);
    assert_eq!(page["items"][0]["device_id"], "b-1");
    let mut seen = Vec::new();
    let mut path = "/api/v1/devices?limit=1".to_string();
    loop {
        let (_, page) = api(addr, "GET", &path, Some(&admin), None);
        seen.push(page["items"][0]["device_id"].as_str().unwrap().to_string());
        match page["next_cursor"].as_str() {
            Some(cursor) => path = format!("/api/v1/devices?limit=1&cursor={cursor}"),
            None => break,
        }
    }
    assert_eq!(seen, ["a-1", "a-2", "b-1"]);
    let (status, body) = api(addr, "GET", "/api/v1/devices?sort=colour", Some(&admin), None);
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_request")), "{body}");
    let (status, body) = api(addr, "GET", "/api/v1/fleet?from_ms=yesterday", Some(&admin), None);
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("bad_request")), "{body}");

    // Scopes: a site's token sees its site only; a device's token its device only.
    let site_a = fleet.token("viewer", "site-a-viewer", "site:site-a");
    let device_b = fleet.token("viewer", "b-1-viewer", "device:b-1");
    let (_, seen) = api(addr, "GET", "/api/v1/devices", Some(&site_a), None);
    let ids: Vec<&str> = seen["items"].as_array().unwrap().iter().map(|d| d["device_id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["a-1", "a-2"]);
    let (status, _) = api(addr, "GET", "/api/v1/devices/b-1", Some(&site_a), None);
    assert_eq!(status, 404, "another site's device is not there for a site's token");
    let (status, _) = api(addr, "GET", "/api/v1/devices/a-1", Some(&device_b), None);
    assert_eq!(status, 404, "a device's token cannot read another device");
    let (status, _) = api(addr, "GET", "/api/v1/devices/a-1/telemetry", Some(&device_b), None);
    assert_eq!(status, 404);
    let (status, _) = api(addr, "GET", "/api/v1/sites/site-a/telemetry", Some(&device_b), None);
    assert_eq!(status, 404);
    let (status, _) = api(addr, "GET", "/api/v1/fleet", Some(&site_a), None);
    assert_eq!(status, 403, "fleet-wide figures need a fleet-wide token");
    let (status, own) = api(addr, "GET", "/api/v1/devices/b-1", Some(&device_b), None);
    assert_eq!((status, own["site"].as_str()), (200, Some("site-b")));
    let (_, events) = api(addr, "GET", "/api/v1/events", Some(&device_b), None);
    assert!(events["items"].as_array().unwrap().iter().all(|e| e["device_id"] == "b-1"), "{events}");

    // A revoked token stops working at once.
    let (status, _) = api(addr, "DELETE", "/api/v1/tokens/viewer-1", Some(&admin), None);
    assert_eq!(status, 200);
    let (status, _) = api(addr, "GET", "/api/v1/devices", Some(&viewer), None);
    assert_eq!(status, 401);
    fleet.cli_ok(&["tokens", "revoke", "operator-1"]);
    let (status, _) = api(addr, "GET", "/api/v1/whoami", Some(&operator), None);
    assert_eq!(status, 401);
    let listed: Value = serde_json::from_str(&fleet.cli_ok(&["tokens", "list", "--json"])).unwrap();
    assert!(!listed.to_string().contains(&admin), "tokens are never listed");

    // A device connects with its provisioned password; retired, it is refused.
    let password = a1["password"].as_str().unwrap();
    let publish = |password: &str| {
        Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &mqtt.to_string(), "-u", "a-1", "-P", password, "-i", "a-1-test"])
            .args(["-t", "rxv/v1/dev/a-1/events", "-q", "1", "-m", "{}"])
            .output()
            .unwrap()
    };
    // The broker reloads its accounts within seconds of a change.
    let started = Instant::now();
    while !publish(password).status.success() {
        assert!(started.elapsed() < Duration::from_secs(10), "the provisioned device cannot connect");
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("provisioned device accepted after {:?}", started.elapsed());
    assert!(!publish("wrong").status.success(), "a wrong password is refused");
    let (status, _) = api(addr, "POST", "/api/v1/devices/a-1/retire", Some(&admin), None);
    assert_eq!(status, 200);
    let started = Instant::now();
    loop {
        let out = publish(password);
        if !out.status.success() {
            assert!(String::from_utf8_lossy(&out.stderr).contains("not authorised"), "{out:?}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the retired device still connects");
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("retired device refused after {:?}", started.elapsed());
    let (_, gone) = api(addr, "GET", "/api/v1/devices/a-1", Some(&admin), None);
    assert_eq!(gone["state"], "retired");
    let b1_password = b1["password"].as_str().unwrap();
    let still = Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &mqtt.to_string(), "-u", "b-1", "-P", b1_password])
        .args(["-t", "rxv/v1/dev/b-1/events", "-q", "1", "-m", "{}"])
        .output()
        .unwrap();
    assert!(still.status.success(), "other devices keep working");

    // Every change is an event with who made it.
    let (_, events) = api(addr, "GET", "/api/v1/events?limit=500", Some(&admin), None);
    let changes: Vec<(String, String)> = events["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["kind"].as_str().unwrap().to_string(), e["actor"].as_str().unwrap_or("").to_string()))
        .collect();
    for expected in [
        ("device_added", "token:admin-1"),
        ("device_retired", "token:admin-1"),
        ("token_revoked", "token:admin-1"),
        ("token_created", "cli:"),
        ("token_revoked", "cli:"),
    ] {
        assert!(
            changes.iter().any(|(k, a)| k == expected.0 && a.starts_with(expected.1)),
            "{expected:?} missing from {changes:?}"
        );
    }
    assert_eq!(changes.iter().filter(|(k, _)| k == "device_added").count(), 3);

    // For an external Mosquitto: the registry's live accounts as its password file.
    let ingest_password = dir.path().join("ingest.password");
    std::fs::write(&ingest_password, "ingest-secret\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&ingest_password, std::fs::Permissions::from_mode(0o600)).unwrap();
    let external = dir.path().join("external");
    std::fs::create_dir_all(&external).unwrap();
    let passwd = external.join("passwd");
    let ingest_arg = ingest_password.to_str().unwrap();
    fleet.cli_ok(&["broker", "passwd", "--out", passwd.to_str().unwrap(), "--ingest-password-file", ingest_arg]);
    let text = std::fs::read_to_string(&passwd).unwrap();
    let users: Vec<&str> = text.lines().map(|l| l.split(':').next().unwrap()).collect();
    assert_eq!(users, ["rxfleet-ingest", "a-2", "b-1"], "live devices only: {text}");
    let port = free_port();
    std::fs::write(
        external.join("mosquitto.conf"),
        format!("listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\nuser root\n", passwd.display()),
    )
    .unwrap();
    let mut mosquitto =
        Command::new("mosquitto").arg("-c").arg(external.join("mosquitto.conf")).stderr(Stdio::null()).spawn().unwrap();
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(10), "mosquitto did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let login = |user: &str, password: &str| {
        Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-u", user, "-P", password, "-t", "t", "-m", "x"])
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(login("b-1", b1_password), "a live device logs in to the external broker");
    assert!(login("rxfleet-ingest", "ingest-secret"));
    assert!(!login("a-1", password), "a retired device does not");
    let _ = mosquitto.kill();
    let _ = mosquitto.wait();
}

#[test]
fn the_openapi_document_is_committed_and_every_route_answers_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("rxfleet.toml");
    // No broker is needed to read the API: an external one that is not there.
    std::fs::write(
        &config,
        format!(
            "[fleet]\nstate_dir = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n[broker]\nmode = \"external\"\nurl = \"mqtt://127.0.0.1:{}\"\n",
            dir.path().join("state").display().to_string(),
            free_port()
        ),
    )
    .unwrap();
    let fleet = Fleet::start("openapi", Some(&config), &[]);
    let (status, doc) = api(fleet.http, "GET", "/api/v1/openapi.json", None, None);
    assert_eq!(status, 200);
    let committed_path = workspace().join("docs/openapi.json");
    let pretty = serde_json::to_string_pretty(&doc).unwrap() + "\n";
    if std::env::var_os("RXVISION_UPDATE_OPENAPI").is_some() {
        std::fs::write(&committed_path, &pretty).unwrap();
    }
    let committed = std::fs::read_to_string(&committed_path).unwrap_or_default();
    assert!(
        committed == pretty,
        "docs/openapi.json differs from the served document: review the API change and run this test with RXVISION_UPDATE_OPENAPI=1"
    );

    let admin = fleet.token("admin", "doc-admin", "fleet");
    let (_, added) = api(fleet.http, "POST", "/api/v1/devices", Some(&admin), Some(json!({"site": "doc-site"})));
    let device = added["device_id"].as_str().unwrap().to_string();
    let mut checked = 0;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let concrete = path
                .replace("{device_id}", &device)
                .replace("{site}", "doc-site")
                .replace("{name}", "doc-victim")
                .replace("{version}", "production")
                .replace("{id}", "1")
                .replace("{action}", "pause");
            let body = match (method.as_str(), path.as_str()) {
                ("post", "/devices") => Some(json!({"site": "doc-site"})),
                ("post", "/tokens") => Some(json!({"name": "doc-victim", "role": "viewer"})),
                ("post", "/rollouts") => Some(json!({"version": "9.9.9"})),
                _ => None,
            };
            let (status, answer) =
                api(fleet.http, &method.to_uppercase(), &format!("/api/v1{concrete}"), Some(&admin), body);
            let documented = &operation["responses"];
            assert!(
                documented.get(status.to_string()).is_some(),
                "{method} {path} answered {status}, not documented: {answer}"
            );
            // Without a token: 401, documented too.
            let (status, _) = api(fleet.http, &method.to_uppercase(), &format!("/api/v1{concrete}"), None, None);
            assert_eq!(status, 401, "{method} {path} without a token");
            assert!(documented.get("401").is_some(), "{method} {path}: 401 undocumented");
            checked += 1;
        }
    }
    assert!(checked >= 15, "{checked} operations checked");
    let (status, body) = api(fleet.http, "GET", "/api/v1/no-such-thing", Some(&admin), None);
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("not_found")));
}

#[test]
fn leader_failover_by_kill_9_loses_and_doubles_nothing() {
    if !tools_present("leader_failover_by_kill_9_loses_and_doubles_nothing") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    for (backend, url) in database_urls(dir.path(), "failover") {
        let run = dir.path().join(&backend);
        std::fs::create_dir_all(&run).unwrap();
        let prefix = format!("lf{backend}");
        let broker = broker_for(&prefix, 4, 2);
        let password = run.join("ingest.password");
        std::fs::write(&password, INGEST.1).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600)).unwrap();
        let replica = |name: &str| {
            let config = run.join(format!("{name}.toml"));
            std::fs::write(
                &config,
                format!(
                    "[fleet]\nstate_dir = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n[database]\nurl = {url:?}\n\
                     [broker]\nmode = \"external\"\nurl = \"mqtt://127.0.0.1:{}\"\npassword_file = {:?}\n\
                     client_id = \"rxfleet-ingest-{}-{backend}\"\n[lease]\nttl_ms = 3000\nrenew_ms = 1000\n",
                    run.join(name).display().to_string(),
                    broker.port,
                    password.display().to_string(),
                    std::process::id()
                ),
            )
            .unwrap();
            Fleet::start(&format!("{backend}-{name}"), Some(&config), &[])
        };
        let first = replica("r1");
        first.wait_log("this replica leads", Duration::from_secs(20));
        let second = replica("r2");
        let sim = run_sim(
            &run,
            &format!("mqtt://127.0.0.1:{}", broker.port),
            &prefix,
            None,
            &["--devices", "4", "--sites", "2", "--windows", "80", "--interval-ms", "60", "--ack-timeout-secs", "2"],
        );
        std::thread::sleep(Duration::from_millis(1500));
        let (_, metrics) = try_http(second.http, "GET", "/metrics", None, None).unwrap();
        assert!(String::from_utf8_lossy(&metrics).contains("rxvision_fleet_leader 0"), "one leader at a time");
        eprintln!("[{backend}] kill -9 of the leading replica");
        let killed_at = Instant::now();
        first.kill9();
        second.wait_log("this replica leads", Duration::from_secs(20));
        eprintln!("[{backend}] the other replica took over after {:?}", killed_at.elapsed());
        let report = finish_sim(sim, &run);
        assert_totals_match(&report, &second.stats(), &backend);
        let windows: u64 = report.values().map(|d| d["windows"].as_u64().unwrap()).sum();
        assert_eq!(windows, 4 * 80);
    }
}

/// A WebDriver session on headless Chromium through chromedriver.
pub(crate) struct Browser {
    driver: Child,
    addr: SocketAddr,
    session: String,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = try_http(self.addr, "DELETE", &format!("/session/{}", self.session), None, None);
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    /// Opens the dashboard at `base` and signs in with `token`.
    pub(crate) fn log_in(&self, base: &str, token: &str) {
        self.go(&format!("{base}/"));
        self.find("[data-testid=login-form]");
        self.type_into("#token", token);
        self.click("#login");
        self.wait_loaded();
    }

    pub(crate) fn start() -> Option<Browser> {
        let found = |exe: &str| Command::new(exe).arg("--version").output().is_ok_and(|o| o.status.success());
        if !found("chromedriver") || !found("chromium") {
            assert!(
                std::env::var("RXVISION_REQUIRE_BROWSER").as_deref() != Ok("1"),
                "chromium and chromedriver are required (scripts/setup-system installs them)"
            );
            eprintln!("SKIPPED: dashboard browser test: chromium or chromedriver is not installed");
            return None;
        }
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let started = Instant::now();
        while try_http(addr, "GET", "/status", None, None).is_err() {
            assert!(started.elapsed() < Duration::from_secs(20), "chromedriver did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--window-size=1400,1000", format!("--user-data-dir={}", profile.path().display())]
        }}}});
        let (status, v) = api(addr, "POST", "/session", None, Some(caps));
        assert_eq!(status, 200, "{v}");
        let session = v["value"]["sessionId"].as_str().unwrap().to_string();
        Some(Browser { driver, addr, session, _profile: profile })
    }

    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let path = format!("/session/{}{path}", self.session);
        let (status, v) = api(self.addr, method, &path, None, (method == "POST").then_some(body));
        assert_eq!(status, 200, "{method} {path}: {v}");
        v["value"].clone()
    }

    pub(crate) fn go(&self, url: &str) {
        self.call("POST", "/url", json!({"url": url}));
    }

    pub(crate) fn find(&self, css: &str) -> String {
        let started = Instant::now();
        loop {
            let path = format!("/session/{}/element", self.session);
            let (status, v) = api(self.addr, "POST", &path, None, Some(json!({"using": "css selector", "value": css})));
            if status == 200 {
                return v["value"][ELEMENT].as_str().unwrap().to_string();
            }
            assert!(started.elapsed() < Duration::from_secs(30), "no element {css}: {v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub(crate) fn click(&self, css: &str) {
        self.call("POST", &format!("/element/{}/click", self.find(css)), json!({}));
    }

    pub(crate) fn type_into(&self, css: &str, text: &str) {
        self.call("POST", &format!("/element/{}/value", self.find(css)), json!({"text": text}));
    }

    pub(crate) fn attr(&self, css: &str, name: &str) -> String {
        let value = self.call("GET", &format!("/element/{}/attribute/{name}", self.find(css)), json!({}));
        value.as_str().unwrap_or_default().to_string()
    }

    pub(crate) fn count(&self, css: &str) -> usize {
        self.call("POST", "/elements", json!({"using": "css selector", "value": css})).as_array().unwrap().len()
    }

    /// Waits until the page says its first render finished.
    pub(crate) fn wait_loaded(&self) {
        let started = Instant::now();
        loop {
            let loaded = self.call(
                "POST",
                "/execute/sync",
                json!({"script": "return document.body.dataset.loaded || ''", "args": []}),
            );
            if loaded == "true" {
                return;
            }
            assert!(started.elapsed() < Duration::from_secs(30), "the page did not finish loading");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Saves a screenshot under `ci-artifacts/` (kept by CI).
    pub(crate) fn screenshot(&self, name: &str) {
        let png = self.call("GET", "/screenshot", json!({}));
        let bytes = base64::engine::general_purpose::STANDARD.decode(png.as_str().unwrap()).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"), "a PNG");
        let dir = workspace().join("ci-artifacts");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
        eprintln!("screenshot: {}", dir.join(name).display());
    }
}

#[test]
fn with_a_fleet_ca_the_tls_listener_wants_the_device_certificate_and_password() {
    if !tools_present("with_a_fleet_ca_the_tls_listener_wants_the_device_certificate_and_password") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = dir.path().join("server-certs");
    std::fs::create_dir_all(&server).unwrap();
    crate::broker::make_certificates(&server);
    let (plain, tls) = (free_port(), free_port());
    let config = dir.path().join("rxfleet.toml");
    std::fs::write(
        &config,
        format!(
            "[fleet]\nstate_dir = {:?}\n[broker]\nlisten = \"127.0.0.1:{plain}\"\n\
             tls_listen = \"127.0.0.1:{tls}\"\ntls_cert_file = {:?}\ntls_key_file = {:?}\n\
             device_url = \"mqtts://localhost:{tls}\"\nca_dir = {:?}\n\
             [http]\nlisten = \"127.0.0.1:0\"\ntls_cert_file = {:?}\ntls_key_file = {:?}\n",
            dir.path().join("state").display().to_string(),
            server.join("server.crt").display().to_string(),
            server.join("server.key").display().to_string(),
            dir.path().join("fleet-ca").display().to_string(),
            server.join("server.crt").display().to_string(),
            server.join("server.key").display().to_string(),
        ),
    )
    .unwrap();
    let init = Command::new(binary("rxfleet")).args(["ca", "init", "--config"]).arg(&config).output().unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let again = Command::new(binary("rxfleet")).args(["ca", "init", "--config"]).arg(&config).output().unwrap();
    assert!(!again.status.success(), "an existing CA is never replaced");
    let fleet = Fleet::start("ca", Some(&config), &[]);
    let appliance = dir.path().join("appliance");
    fleet.cli_ok(&["devices", "add", "--site", "store-7", "--id", "tls-1", "--out", appliance.to_str().unwrap()]);
    let fragment = std::fs::read_to_string(appliance.join("rxvisiond-telemetry.toml")).unwrap();
    assert!(fragment.contains(&format!("broker = \"mqtts://localhost:{tls}\"")), "{fragment}");
    assert!(fragment.contains("client_cert_file") && fragment.contains("client_key_file"), "{fragment}");
    let verified = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(dir.path().join("fleet-ca/ca.crt"))
        .arg(appliance.join("client.crt"))
        .output()
        .unwrap();
    assert!(verified.status.success(), "{}", String::from_utf8_lossy(&verified.stdout));
    let password = std::fs::read_to_string(appliance.join("broker.password")).unwrap();
    let publish = |with_certificate: bool| {
        let mut command = Command::new("mosquitto_pub");
        command.args(["-h", "localhost", "-p", &tls.to_string(), "--cafile"]).arg(server.join("ca.crt"));
        if with_certificate {
            command.arg("--cert").arg(appliance.join("client.crt")).arg("--key").arg(appliance.join("client.key"));
        }
        command
            .args(["-u", "tls-1", "-P", password.trim(), "-t", "rxv/v1/dev/tls-1/events", "-q", "1", "-m", "{}"])
            .output()
            .unwrap()
    };
    let started = Instant::now();
    while !publish(true).status.success() {
        assert!(started.elapsed() < Duration::from_secs(10), "the device with its certificate cannot connect");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!publish(false).status.success(), "without the certificate the TLS listener refuses the device");

    // The API over HTTPS, with the certificate checked against its CA.
    let https = |ca: &Path| {
        let mut client = Command::new("openssl")
            .args(["s_client", "-quiet", "-verify_return_error", "-servername", "localhost", "-CAfile"])
            .arg(ca)
            .arg("-connect")
            .arg(fleet.http.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        client
            .stdin
            .take()
            .unwrap()
            .write_all(b"GET /api/v1/openapi.json HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .unwrap();
        let out = client.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let answer = https(&server.join("ca.crt"));
    assert!(answer.contains(" 200 OK") && answer.contains("RxVision fleet API"), "{answer}");
    let refused = https(&dir.path().join("fleet-ca/ca.crt"));
    assert!(!refused.contains(" 200 OK"), "a client that does not trust the certificate gets nothing");

    // Onboarding many at once: `devices import`, all or nothing.
    let csv = dir.path().join("devices.csv");
    let batch = dir.path().join("batch");
    let import = |text: &str| {
        std::fs::write(&csv, text).unwrap();
        fleet.cli(&["devices", "import", csv.to_str().unwrap(), "--out", batch.to_str().unwrap()])
    };
    let (ok, out, err) = import("site,device_id\nstore-8,tls-2\nstore-9,\n");
    assert!(ok, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[1].starts_with("tls-2,store-8,") && lines[2].starts_with("store-9-"), "{out}");
    let made = lines[2].split(',').next().unwrap();
    for id in ["tls-2", made] {
        let shown = fleet.cli_ok(&["devices", "show", id]);
        assert!(shown.contains("store-"), "{shown}");
        for file in ["rxvisiond-telemetry.toml", "broker.password", "client.crt", "client.key"] {
            assert!(batch.join(id).join(file).exists(), "{id}/{file}");
        }
    }
    // The imported device connects with its own certificate and password (after the broker's reload).
    let password = std::fs::read_to_string(batch.join("tls-2/broker.password")).unwrap();
    let started = Instant::now();
    loop {
        let out = Command::new("mosquitto_pub")
            .args(["-h", "localhost", "-p", &tls.to_string(), "--cafile"])
            .arg(server.join("ca.crt"))
            .arg("--cert")
            .arg(batch.join("tls-2/client.crt"))
            .arg("--key")
            .arg(batch.join("tls-2/client.key"))
            .args(["-u", "tls-2", "-P", password.trim(), "-t", "rxv/v1/dev/tls-2/events", "-q", "1", "-m", "{}"])
            .output()
            .unwrap();
        if out.status.success() {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10), "the imported device cannot connect");
        std::thread::sleep(Duration::from_millis(200));
    }
    // One id taken: nothing registered, no files left.
    let (ok, _, err) = import("site,device_id\nstore-9,tls-3\nstore-8,tls-2\n");
    assert!(!ok && err.contains("registered already: tls-2"), "{err}");
    assert!(!fleet.cli(&["devices", "show", "tls-3"]).0, "tls-3 was not registered");
    assert!(!batch.join("tls-3").exists(), "no files for a refused import");
    // A malformed file names its lines and changes nothing.
    let (ok, _, err) = import("site,device_id\nstore-9,tls-4\nstore 10,tls-5\nstore-9,tls-4,x\n");
    assert!(!ok && err.contains("line 3:") && err.contains("line 4:"), "{err}");
    assert!(!fleet.cli(&["devices", "show", "tls-4"]).0 && !batch.join("tls-4").exists());
}
