//! Signed updates end to end on a live `rxfleet serve`: the TUF repository
//! it publishes is read by the reference Python client (python-tuf's
//! ngclient), given only the pinned root.json and the two URLs; keys rotate
//! under it; a tampered artifact is refused by it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::broker::tools_present;
use crate::serve::{free_port, Fleet};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The project's Python with python-tuf, or why there is none.
fn tuf_python(test: &str) -> Option<PathBuf> {
    let python =
        std::env::var_os("RXVISION_PYTHON").map(PathBuf::from).unwrap_or_else(|| workspace().join(".venv/bin/python"));
    let ok = Command::new(&python)
        .args(["-c", "import tuf.ngclient, cryptography"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        let why = format!("no Python with python-tuf at {} (run scripts/setup-python)", python.display());
        assert!(std::env::var_os("RXVISION_REQUIRE_REFERENCES").is_none(), "{why}");
        eprintln!("SKIPPED {test}: {why}");
        return None;
    }
    Some(python)
}

/// Runs the reference client with `work` as its trusted state: Ok(report) or Err(its refusal).
fn reference_client(python: &Path, root_json: &Path, base: &str, work: &Path) -> Result<Value, String> {
    let out = Command::new(python)
        .arg(workspace().join("tests/reference/tuf_client.py"))
        .arg(root_json)
        .arg(format!("{base}/tuf/metadata/"))
        .arg(format!("{base}/tuf/targets/"))
        .arg(work)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).unwrap())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into())
    }
}

/// Asks the reference client until `ready` holds for its report (the leader
/// publishes within its interval).
fn until(python: &Path, root_json: &Path, base: &str, work: &Path, ready: impl Fn(&Value) -> bool) -> Value {
    let started = Instant::now();
    loop {
        let result = reference_client(python, root_json, base, work);
        match &result {
            Ok(report) if ready(report) => return report.clone(),
            _ if started.elapsed() > Duration::from_secs(30) => panic!("the repository never got there: {result:?}"),
            _ => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

#[test]
fn the_reference_tuf_client_verifies_the_live_repository_through_rotations_and_refuses_a_tampered_target() {
    let test = "the_reference_tuf_client_verifies_the_live_repository";
    let Some(python) = tuf_python(test) else { return };
    if !tools_present(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let config = dir.path().join("rxfleet.toml");
    std::fs::write(
        &config,
        format!(
            "[fleet]\nstate_dir = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n[broker]\nlisten = \"127.0.0.1:{}\"\n\
             [updates]\npublish_interval_ms = 200\n",
            state.display().to_string(),
            free_port()
        ),
    )
    .unwrap();
    let fleet = Fleet::start("tuf", Some(&config), &[]);
    fleet.wait_log("this replica leads", Duration::from_secs(20));
    let base = format!("http://{}", fleet.http);
    let root_dir = dir.path().join("offline-root");
    let out = fleet.cli_ok(&["keys", "init", "--dir", root_dir.to_str().unwrap()]);
    assert!(out.contains("root version 1 (2 of 3 root keys"), "{out}");
    let root_json = root_dir.join("root.json");

    let pillnet = workspace().join("models/bundles/pillnet/0.4.0");
    let pushed: Value =
        serde_json::from_str(&fleet.cli_ok(&["models", "push", pillnet.to_str().unwrap(), "--production", "--json"]))
            .unwrap();
    assert_eq!(pushed["pushed"]["outcome"], "stored");
    assert!(pushed["gates"].is_null(), "no held-out dataset registered, no gates run");
    let sha256 = pushed["pushed"]["model"]["sha256"].as_str().unwrap().to_string();

    // A client that trusts only root.json refreshes and downloads every target.
    let work = dir.path().join("client");
    let report = until(&python, &root_json, &base, &work, |r| r["files"].as_object().is_some_and(|f| !f.is_empty()));
    let file = &report["files"]["pillnet-0.4.0.tar.gz"];
    assert_eq!(file["sha256"], sha256.as_str(), "{report}");
    assert_eq!(file["custom"]["rxvision"]["cohort_below"], 10_000);
    assert_eq!(file["custom"]["rxvision"]["version"], "0.4.0");
    assert_eq!(report["root"], 1);

    // Online keys rotate: the same client (its trusted state kept) and a new
    // one both follow to root 2 and the metadata signed with the new keys.
    let out = fleet.cli_ok(&["keys", "rotate-online", "--dir", root_dir.to_str().unwrap()]);
    assert!(out.contains("root version 2"), "{out}");
    let before = report["timestamp"].as_u64().unwrap();
    let report = until(&python, &root_json, &base, &work, |r| r["root"] == 2 && r["timestamp"].as_u64() > Some(before));
    assert_eq!(report["files"]["pillnet-0.4.0.tar.gz"]["sha256"], sha256.as_str());
    let fresh = until(&python, &root_json, &base, &dir.path().join("client-2"), |r| r["root"] == 2);
    assert_eq!(fresh["files"], report["files"]);

    // Root keys rotate: a client pinned to the first root walks 1 → 2 → 3.
    let new_root = dir.path().join("offline-root-2");
    let out = fleet.cli_ok(&[
        "keys",
        "rotate-root",
        "--dir",
        root_dir.to_str().unwrap(),
        "--new-dir",
        new_root.to_str().unwrap(),
    ]);
    assert!(out.contains("root version 3"), "{out}");
    let walked = until(&python, &root_json, &base, &dir.path().join("client-3"), |r| r["root"] == 3);
    assert_eq!(walked["files"], report["files"]);

    // A tampered artifact on the server: the reference client refuses it.
    let artifact = state.join("artifacts").join(&sha256);
    let mut bytes = std::fs::read(&artifact).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    std::fs::write(&artifact, &bytes).unwrap();
    let refused = reference_client(&python, &root_json, &base, &dir.path().join("client-4")).unwrap_err();
    assert!(refused.contains("sha256") || refused.contains("hash") || refused.contains("Length"), "{refused}");
    assert!(!dir.path().join("client-4/downloads/pillnet-0.4.0.tar.gz").exists(), "nothing tampered is kept");
}

/// A copy of the shipped model under another version.
fn reversioned_pillnet(dir: &Path, version: &str) -> PathBuf {
    let out = dir.join(format!("pillnet-{version}"));
    let from = workspace().join("models/bundles/pillnet/0.4.0");
    let status = Command::new("cp").arg("-r").arg(&from).arg(&out).status().unwrap();
    assert!(status.success());
    let mut manifest: Value = serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    manifest["version"] = version.into();
    let bytes = serde_json::to_vec_pretty(&manifest).unwrap();
    std::fs::write(out.join("manifest.json"), &bytes).unwrap();
    let sum = rxvision_models::bundle::sha256_hex(&bytes);
    std::fs::write(out.join("manifest.json.sha256"), format!("{sum}  manifest.json\n")).unwrap();
    out
}

/// A device id whose cohort bucket is `in_stage` of the 1 % stage, or not.
fn device_id(prefix: &str, in_stage: bool) -> String {
    (0..)
        .map(|n| format!("{prefix}-{n}"))
        .find(|id| (rxvision_protocol::updates::cohort_bucket(id) < 100) == in_stage)
        .unwrap()
}

const API_KEY: &str = "updates-test-api-key-01";

thread_local! {
    /// Further edits of the appliances' configuration a test asks for.
    static APPLIANCE_EDITS: std::cell::RefCell<Vec<(String, String)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A running `rxvisiond` on a fixed port (it keeps it across its restart into a new model).
struct Appliance {
    child: std::cell::RefCell<std::process::Child>,
    addr: std::net::SocketAddr,
    dir: PathBuf,
}

impl Drop for Appliance {
    fn drop(&mut self) {
        let child = self.child.get_mut();
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Appliance {
    fn start(
        dir: &Path,
        id: &str,
        bundle: &Path,
        fleet: &str,
        root_json: &Path,
        broker: Option<(&str, &str)>,
    ) -> Appliance {
        Appliance::start_polling(dir, id, bundle, fleet, root_json, broker, broker.is_none(), true)
    }

    /// As [`Appliance::start`]; `poll`: check every 10 s whatever the link.
    fn start_polling(
        dir: &Path,
        id: &str,
        bundle: &Path,
        fleet: &str,
        root_json: &Path,
        broker: Option<(&str, &str)>,
        poll: bool,
        wait: bool,
    ) -> Appliance {
        std::fs::create_dir_all(dir).unwrap();
        let secret = |path: &Path, text: &str| {
            std::fs::write(path, text).unwrap();
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
        };
        secret(&dir.join("audit.key"), &"ab".repeat(32));
        secret(&dir.join("api.key"), API_KEY);
        let p = |path: &Path| format!("{:?}", path.display().to_string());
        let port = free_port();
        let mut config = std::fs::read_to_string(workspace().join("firmware-cfg/rxvisiond.toml"))
            .unwrap()
            .replace("id = \"unprovisioned\"", &format!("id = \"{id}\""))
            .replace("state_dir = \"/var/lib/rxvision\"", &format!("state_dir = {}", p(dir)))
            .replace("bundle = \"\"", &format!("bundle = {}", p(bundle)))
            .replace("engine = \"auto\"", "engine = \"cpu\"")
            .replace("listen = \"127.0.0.1:8470\"", &format!("listen = \"127.0.0.1:{port}\""))
            .replace("api_key_file = \"\"", &format!("api_key_file = {}", p(&dir.join("api.key"))))
            .replace("api_key_credential = \"api-key\"", "api_key_credential = \"\"")
            .replace("dir = \"/var/lib/rxvision/audit\"", &format!("dir = {}", p(&dir.join("audit"))))
            .replace("\nkey_file = \"\"", &format!("\nkey_file = {}", p(&dir.join("audit.key"))))
            .replace("\nkey_credential = \"audit-key\"", "\nkey_credential = \"\"")
            .replace("enabled = false\n# The fleet's HTTP address", "enabled = true\n# The fleet's HTTP address")
            .replace("repository = \"\"", &format!("repository = \"{fleet}\""))
            .replace("root_file = \"\"", &format!("root_file = {}", p(root_json)))
            .replace("healthy_after_seconds = 120", "healthy_after_seconds = 3");
        if poll {
            config = config.replace("poll_interval_seconds = 3600", "poll_interval_seconds = 10");
        }
        if let Some((broker, password)) = broker {
            secret(&dir.join("broker.password"), password);
            config = config
                .replace("enabled = false\n# Length of a window", "enabled = true\n# Length of a window")
                .replace("window_seconds = 60", "window_seconds = 1")
                .replace("broker = \"\"", &format!("broker = \"{broker}\""))
                .replace("password_file = \"\"", &format!("password_file = {}", p(&dir.join("broker.password"))));
        }
        for (from, to) in APPLIANCE_EDITS.with(|e| e.borrow().clone()) {
            assert!(config.contains(&from), "the appliance configuration has {from:?}");
            config = config.replace(&from, &to);
        }
        let path = dir.join("rxvisiond.toml");
        std::fs::write(&path, config).unwrap();
        let child = Appliance::spawn(dir);
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let appliance = Appliance { child: std::cell::RefCell::new(child), addr, dir: dir.to_path_buf() };
        if wait {
            appliance.wait_model(|_| true, Duration::from_secs(60));
        }
        appliance
    }

    /// `kill -9`, then the same configuration started again (the port kept).
    fn kill_and_restart(&mut self) {
        let child = self.child.get_mut();
        child.kill().unwrap();
        child.wait().unwrap();
        *child = Appliance::spawn(&self.dir);
    }

    /// `rxvisiond run` on the configuration in `dir`; what it logs is
    /// appended to `dir/rxvisiond.log` (kept across restarts) so that a
    /// failing wait can show it.
    fn spawn(dir: &Path) -> std::process::Child {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(dir.join("rxvisiond.log")).unwrap();
        Command::new(workspace().join("target/debug/rxvisiond"))
            .args(["run", "--config", dir.join("rxvisiond.toml").to_str().unwrap()])
            .env("RXVISION_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap()
    }

    fn pid(&self) -> u32 {
        self.child.borrow().id()
    }

    /// Whether the process is gone, and the end of what it logged.
    fn post_mortem(&self) -> String {
        let exited = self.child.borrow_mut().try_wait().ok().flatten();
        let log = std::fs::read_to_string(self.dir.join("rxvisiond.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        format!("exited: {exited:?}; the end of its log:\n{tail}")
    }

    /// The model version `/v1/status` reports (None while it is not answering).
    fn model(&self) -> Option<String> {
        let (status, body) = crate::serve::try_http(self.addr, "GET", "/v1/status", Some(API_KEY), None).ok()?;
        let value: Value = serde_json::from_slice(&body).ok()?;
        (status == 200).then(|| value["model"]["version"].as_str().map(str::to_string)).flatten()
    }

    fn wait_model(&self, ok: impl Fn(&str) -> bool, within: Duration) -> String {
        let started = Instant::now();
        loop {
            if let Some(version) = self.model().filter(|v| ok(v)) {
                return version;
            }
            if started.elapsed() >= within {
                panic!("the appliance did not get there; it runs {:?}; {}", self.model(), self.post_mortem());
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn slots(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.dir.join("models/slots.json")).unwrap_or_default())
            .unwrap_or(Value::Null)
    }
}

/// A fleet with signing keys, pillnet 0.4.0 in production, a held-out
/// dataset, and pillnet 0.5.0 through its gates (limits an operator chose
/// for the tests: today's shipped model misses the brief's automation
/// budget, issue 17).
struct UpdateFleet {
    fleet: Fleet,
    base: String,
    state: PathBuf,
    root_dir: PathBuf,
    v4: PathBuf,
    v5: PathBuf,
}

impl UpdateFleet {
    fn start(dir: &Path, name: &str, root_keys: &str, threshold: &str, extra: &str) -> UpdateFleet {
        let state = dir.join("state");
        let config = dir.join("rxfleet.toml");
        std::fs::write(
            &config,
            format!(
                "[fleet]\nstate_dir = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n[broker]\nlisten = \"127.0.0.1:{}\"\n\
                 [updates]\npublish_interval_ms = 200\n{extra}[gates]\nmin_automation = 0.0\nmin_top1 = 0.5\n\
                 max_false_match_lookalike = 0.5\nmax_false_match_unknown = 0.5\nmax_p95_ms = 10000.0\n\
                 max_regression_points = 100.0\n",
                state.display().to_string(),
                free_port()
            ),
        )
        .unwrap();
        let fleet = Fleet::start(name, Some(&config), &[]);
        fleet.wait_log("this replica leads", Duration::from_secs(20));
        let base = format!("http://{}", fleet.http);
        let root_dir = dir.join("offline-root");
        fleet.cli_ok(&[
            "keys",
            "init",
            "--dir",
            root_dir.to_str().unwrap(),
            "--root-keys",
            root_keys,
            "--threshold",
            threshold,
        ]);
        let v4 = workspace().join("models/bundles/pillnet/0.4.0");
        fleet.cli_ok(&["models", "push", v4.to_str().unwrap(), "--production"]);
        let holdout = dir.join("holdout");
        let synth = Command::new(workspace().join("target/debug/rxvision-synth"))
            .current_dir(workspace())
            .args([
                "dataset",
                "--out",
                holdout.to_str().unwrap(),
                "--seed",
                "77",
                "--per-class",
                "1",
                "--size",
                "640x480",
            ])
            .args(["--px-per-mm", "9"])
            .output()
            .unwrap();
        assert!(synth.status.success(), "{}", String::from_utf8_lossy(&synth.stderr));
        fleet.cli_ok(&["datasets", "add", holdout.to_str().unwrap(), "--px-per-mm", "9"]);
        let v5 = reversioned_pillnet(dir, "0.5.0");
        let out = fleet.cli_ok(&["models", "push", v5.to_str().unwrap()]);
        assert!(out.contains("PASSED"), "{out}");
        UpdateFleet { fleet, base, state, root_dir, v4, v5 }
    }

    fn root_json(&self) -> PathBuf {
        self.root_dir.join("root.json")
    }

    /// Registers a device; returns the broker URL and its password.
    fn add_device(&self, id: &str) -> (String, String) {
        let added: Value =
            serde_json::from_str(&self.fleet.cli_ok(&["devices", "add", "--site", "upd-site", "--id", id, "--json"]))
                .unwrap();
        let config = added["config"].as_str().unwrap();
        let broker = config.split("broker = \"").nth(1).unwrap().split('"').next().unwrap().to_string();
        (broker, added["password"].as_str().unwrap().to_string())
    }

    /// What the device reported that the fleet stored.
    fn device_events(&self, id: &str) -> Vec<Value> {
        let all: Value = serde_json::from_str(&self.fleet.cli_ok(&["events", "--device", id, "--json"])).unwrap();
        all.as_array().unwrap().iter().filter(|e| e["actor"] == "device").cloned().collect()
    }

    /// Waits until the device reported `kind` with details matching `matches`.
    fn wait_event(&self, id: &str, kind: &str, matches: impl Fn(&Value) -> bool) -> Value {
        let started = Instant::now();
        loop {
            let events = self.device_events(id);
            if let Some(e) = events.iter().find(|e| e["kind"] == kind && matches(&e["details"])) {
                return e.clone();
            }
            assert!(started.elapsed() < Duration::from_secs(60), "no such {kind} from {id}: {events:?}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

#[test]
fn appliances_install_what_signed_metadata_assigns_return_when_ordered_and_refuse_a_lower_version() {
    let test = "appliances_install_what_signed_metadata_assigns";
    if !tools_present(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = UpdateFleet::start(dir.path(), "updates", "1", "1", "");
    let (fleet, base, root_json, v4, v5) = (&f.fleet, f.base.clone(), f.root_json(), f.v4.clone(), f.v5.clone());

    // One appliance in the 1 % stage, one outside it that runs 0.5.0 already.
    let inside = device_id("counter-upd", true);
    let outside = device_id("counter-upd", false);
    let (broker, password) = f.add_device(&inside);
    let a = Appliance::start(&dir.path().join("a"), &inside, &v4, &base, &root_json, Some((&broker, &password)));
    let b = Appliance::start(&dir.path().join("b"), &outside, &v5, &base, &root_json, None);
    assert_eq!(a.model().as_deref(), Some("0.4.0"));

    // Outside the stage, production is assigned without a rollback order: the
    // lower version is refused and 0.5.0 keeps running.
    fleet.cli_ok(&["rollout", "start", "0.5.0"]);
    std::thread::sleep(Duration::from_secs(12));
    assert_eq!(b.model().as_deref(), Some("0.5.0"), "a lower version without a rollback order is refused");
    assert!(b.slots().is_null(), "nothing was installed: {}", b.slots());

    // Inside the stage (checking hourly, so moved by the fleet's hint): the
    // candidate is installed into slot a, the daemon restarts into it (same
    // port), and its trial ends after it served.
    a.wait_model(|v| v == "0.5.0", Duration::from_secs(60));
    let slots = a.slots();
    assert_eq!(slots["active"]["version"], "0.5.0", "{slots}");
    assert_eq!(slots["active"]["slot"], "a");
    std::thread::sleep(Duration::from_secs(5));
    assert!(a.slots()["trial"].is_null(), "the trial ended: {}", a.slots());

    // The fleet hears of the install from the appliance's audit log.
    let installed = f.wait_event(&inside, "model_installed", |d| d["version"] == "0.5.0");
    assert_eq!(
        (installed["details"]["previous"].as_str(), installed["details"]["slot"].as_str()),
        (Some("0.4.0"), Some("a"))
    );

    // Abort: production becomes an explicit rollback order, and the stage's
    // appliance returns to 0.4.0 by itself (into the other slot).
    fleet.cli_ok(&["rollout", "abort"]);
    a.wait_model(|v| v == "0.4.0", Duration::from_secs(60));
    let slots = a.slots();
    assert_eq!(
        (slots["active"]["version"].as_str(), slots["active"]["slot"].as_str()),
        (Some("0.4.0"), Some("b")),
        "{slots}"
    );
    assert_eq!(slots["previous"]["version"], "0.5.0");
    // Outside the stage, the order applies too: 0.5.0 → 0.4.0.
    b.wait_model(|v| v == "0.4.0", Duration::from_secs(60));
}

/// The fleet's SQLite database, for putting forged metadata where the fleet serves it from.
fn fleet_db(state: &Path) -> (tokio::runtime::Runtime, sqlx::SqliteConnection) {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let url = format!("sqlite://{}", state.join("fleet.db").display());
    let conn = runtime.block_on(<sqlx::SqliteConnection as sqlx::Connection>::connect(&url)).unwrap();
    (runtime, conn)
}

fn served(db: &mut (tokio::runtime::Runtime, sqlx::SqliteConnection), name: &str) -> String {
    let (runtime, conn) = db;
    let row: (String,) = runtime
        .block_on(sqlx::query_as("SELECT body FROM tuf_metadata WHERE name = ?").bind(name).fetch_one(&mut *conn))
        .unwrap();
    row.0
}

fn serve_instead(db: &mut (tokio::runtime::Runtime, sqlx::SqliteConnection), name: &str, role: &str, body: &str) {
    let (runtime, conn) = db;
    runtime
        .block_on(
            sqlx::query(
                "INSERT INTO tuf_metadata (name, role, version, expires_ms, body, created_ms) VALUES (?, ?, 0, 0, ?, 0) \
                 ON CONFLICT (name) DO UPDATE SET body = excluded.body",
            )
            .bind(name)
            .bind(role)
            .bind(body)
            .execute(&mut *conn),
        )
        .unwrap();
}

fn remove_served(db: &mut (tokio::runtime::Runtime, sqlx::SqliteConnection), name: &str) {
    let (runtime, conn) = db;
    runtime.block_on(sqlx::query("DELETE FROM tuf_metadata WHERE name = ?").bind(name).execute(&mut *conn)).unwrap();
}

/// Signs `role` with `keys`, as the TUF specification says (Ed25519 over
/// its canonical JSON), whether or not the root lists them.
fn forge<T: serde::Serialize>(role: T, keys: &[&rxvision_fleet::updates::keys::SigningKey]) -> String {
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let mut canonical = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut canonical, olpc_cjson::CanonicalFormatter::new());
    serde::Serialize::serialize(&role, &mut ser).unwrap();
    let mut signed = tough::schema::Signed { signed: role, signatures: Vec::new() };
    for key in keys {
        let sig =
            runtime.block_on(async { key.source().as_sign().await.unwrap().sign(&canonical, &rng).await.unwrap() });
        signed.signatures.push(tough::schema::Signature { keyid: key.id().clone(), sig: sig.into() });
    }
    serde_json::to_string_pretty(&signed).unwrap()
}

#[test]
fn attacks_on_the_repository_are_refused_with_nothing_installed_and_reported() {
    use rxvision_fleet::updates::keys::{read_keys_in, OnlineKeys, SigningKey};
    use tough::schema::{RoleType, Root, Signed, Timestamp};
    let test = "attacks_on_the_repository_are_refused";
    if !tools_present(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = UpdateFleet::start(dir.path(), "attacks", "3", "2", "");
    let id = device_id("counter-att", true);
    let (broker, password) = f.add_device(&id);
    let a = Appliance::start_polling(
        &dir.path().join("a"),
        &id,
        &f.v4,
        &f.base,
        &f.root_json(),
        Some((&broker, &password)),
        true,
        true,
    );
    let model: Value = serde_json::from_str(&f.fleet.cli_ok(&["models", "show", "0.5.0", "--json"])).unwrap();
    let artifact = f.state.join("artifacts").join(model["sha256"].as_str().unwrap());
    let genuine = std::fs::read(&artifact).unwrap();
    let rejected = |needle: &str| {
        let needle = needle.to_string();
        f.wait_event(&id, "model_rejected", move |d| d["reason"].as_str().is_some_and(|r| r.contains(&needle)))
    };
    let nothing_installed = |state: &Value| {
        assert_eq!(a.model().as_deref(), Some("0.4.0"));
        assert_eq!(&a.slots(), state, "the slots did not change");
    };

    // A tampered target (same length, one byte changed).
    let mut tampered = genuine.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x55;
    std::fs::write(&artifact, &tampered).unwrap();
    f.fleet.cli_ok(&["rollout", "start", "0.5.0"]);
    rejected("is not the signed");
    nothing_installed(&Value::Null);

    // A target larger than declared (endless data): cut off at the signed length.
    let mut longer = genuine.clone();
    longer.extend(std::iter::repeat_n(0u8, 1 << 20));
    std::fs::write(&artifact, &longer).unwrap();
    rejected("more than the signed");
    nothing_installed(&Value::Null);

    // The genuine target is installed.
    std::fs::write(&artifact, &genuine).unwrap();
    a.wait_model(|v| v == "0.5.0", Duration::from_secs(60));
    let installed = a.slots();
    let confirmed = |a: &Appliance| {
        assert_eq!(a.model().as_deref(), Some("0.5.0"));
        assert_eq!(a.slots()["active"], installed["active"], "the slots did not change");
    };

    // From here the fleet's signing stops (its online keys are gone), so
    // the leader cannot heal what the attacker serves; the test keeps the
    // timestamp fresh with the genuine key where an attack needs it.
    let mut db = fleet_db(&f.state);
    let old_timestamp = served(&mut db, "timestamp.json");
    let online = OnlineKeys::read(&f.state.join("tuf-keys")).unwrap();
    std::fs::rename(f.state.join("tuf-keys"), f.state.join("tuf-keys.away")).unwrap();
    std::thread::sleep(Duration::from_secs(1)); // a publish under way finishes
    let current: Signed<Timestamp> = serde_json::from_str(&served(&mut db, "timestamp.json")).unwrap();
    let timestamp = |bump: u64, expires_in_s: i64, key: &SigningKey| {
        let mut t = current.signed.clone();
        t.version = t.version.checked_add(bump).unwrap();
        t.expires = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second() + expires_in_s).unwrap();
        forge(t, &[key])
    };
    serve_instead(&mut db, "timestamp.json", "timestamp", &timestamp(1, 3600, &online.timestamp));
    let root: Signed<Root> = serde_json::from_str(&served(&mut db, "1.root.json")).unwrap();
    let root = root.signed;

    // A root rotation signed below the threshold (one of three root keys).
    let root_keys = read_keys_in(&f.root_dir).unwrap();
    let mut forged = root.clone();
    forged.version = std::num::NonZeroU64::new(2).unwrap();
    let role = forged.roles.get_mut(&RoleType::Root).unwrap();
    role.keyids = vec![root_keys[0].id().clone()];
    role.threshold = std::num::NonZeroU64::MIN;
    serve_instead(&mut db, "2.root.json", "root", &forge(forged, &[&root_keys[0]]));
    rejected("threshold of 2 not met for role root");
    confirmed(&a);
    remove_served(&mut db, "2.root.json");

    // Mix-and-match: the snapshot the timestamp names, served with an older snapshot's bytes.
    let snapshot_version = current.signed.meta["snapshot.json"].version;
    let current_snapshot = format!("{snapshot_version}.snapshot.json");
    let genuine_snapshot = served(&mut db, &current_snapshot);
    let older_snapshot = served(&mut db, "1.snapshot.json");
    serve_instead(&mut db, &current_snapshot, "snapshot", &older_snapshot);
    rejected("Hash mismatch");
    confirmed(&a);
    serve_instead(&mut db, &current_snapshot, "snapshot", &genuine_snapshot);

    // A timestamp signed by a key the root does not list.
    let stranger = SigningKey::generate(&dir.path().join("stranger.pem")).unwrap();
    serve_instead(&mut db, "timestamp.json", "timestamp", &timestamp(2, 3600, &stranger));
    rejected("for role timestamp");
    confirmed(&a);

    // Replayed old metadata (a freeze): the first timestamp this device saw, validly signed.
    serve_instead(&mut db, "timestamp.json", "timestamp", &old_timestamp);
    rejected("when we had previously fetched version");
    confirmed(&a);

    // Expired metadata: genuinely signed, newer, but past its expiry.
    serve_instead(&mut db, "timestamp.json", "timestamp", &timestamp(3, -1, &online.timestamp));
    rejected("timestamp metadata is expired");
    confirmed(&a);

    // Signing resumes: the leader renews the repository and the device takes it again.
    std::fs::rename(f.state.join("tuf-keys.away"), f.state.join("tuf-keys")).unwrap();
    let events = f.device_events(&id);
    let refusals = events.iter().filter(|e| e["kind"] == "model_rejected").count();
    assert!(refusals >= 7, "every attack reported: {events:?}");
    confirmed(&a);
}

#[test]
fn a_new_model_that_keeps_the_daemon_from_staying_up_is_given_up_for_the_previous_one() {
    let test = "a_new_model_that_keeps_the_daemon_from_staying_up";
    if !tools_present(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = UpdateFleet::start(dir.path(), "crashloop", "1", "1", "judge_interval_ms = 500\n");
    let id = device_id("counter-crash", true);
    let (broker, password) = f.add_device(&id);
    let device_dir = dir.path().join("a");
    let start = || Appliance::start(&device_dir, &id, &f.v4, &f.base, &f.root_json(), Some((&broker, &password)));
    let mut a = start();
    f.fleet.cli_ok(&["rollout", "start", "0.5.0"]);
    a.wait_model(|v| v == "0.5.0", Duration::from_secs(60));
    assert_eq!(a.slots()["trial"]["starts"], 1, "on trial: {}", a.slots());
    // The new model never serves its 3 s: killed at once and started again,
    // as systemd would after a crash (starts 2 and 3 of at most 3).
    for _ in 0..2 {
        drop(a);
        a = start();
        assert_eq!(a.model().as_deref(), Some("0.5.0"), "still on trial: {}", a.slots());
    }
    drop(a);
    // The fourth start is one too many: back to the configured bundle, by
    // itself, and the bundle is never installed here again.
    let a = start();
    assert_eq!(a.model().as_deref(), Some("0.4.0"));
    let slots = a.slots();
    assert!(slots["active"].is_null() && slots["trial"].is_null(), "{slots}");
    assert_eq!(slots["given_up"].as_array().map(Vec::len), Some(1), "{slots}");
    let back = f.wait_event(&id, "model_rolled_back", |d| d["reason"] == "crash_loop");
    assert_eq!((back["details"]["from"].as_str(), back["details"]["to"].as_str()), (Some("0.5.0"), None));
    // The fleet counts the crash loop against the stage as a veto and halts the rollout.
    let started = Instant::now();
    loop {
        let status: Value =
            serde_json::from_str(&f.fleet.cli_ok(&["rollout", "status", "--id", "1", "--json"])).unwrap();
        if status["rollout"]["state"]["state"] == "halted" {
            assert!(status["rollout"]["state"]["reason"].as_str().unwrap().contains("crash"), "{status}");
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "not halted: {status}");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(a.model().as_deref(), Some("0.4.0"));
}

/// How long an appliance cut off mid-install may take to answer again. A
/// start takes seconds alone, but CI runs this test beside the
/// twenty-appliance rollout test on two cores, where twenty daemons load
/// their models and self-tests at once; the bound is about liveness, not
/// speed (one trial missed 60 s there).
const BACK_WITHIN: Duration = Duration::from_secs(180);

#[test]
fn kill_9_at_any_moment_of_an_install_leaves_a_working_verified_model() {
    let test = "kill_9_at_any_moment_of_an_install";
    if !tools_present(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = UpdateFleet::start(dir.path(), "powerloss", "1", "1", "");
    let id = device_id("counter-power", true);
    f.fleet.cli_ok(&["rollout", "start", "0.5.0"]);
    // An appliance installs at start: power is cut at a different moment of
    // it each time (start, refresh, download, slot write, verification,
    // switch, restart), then it starts again.
    // The cuts must fall both before and after the switch; when that comes
    // depends on the machine, so the trials go on (the cut ever later) until
    // both have been seen, at least 24 of them.
    let mut seen = std::collections::BTreeSet::new();
    let (mut cut_before, mut cut_after) = (0, 0);
    for trial in 0..80u64 {
        if trial >= 24 && cut_before > 0 && cut_after > 0 {
            break;
        }
        let device_dir = dir.path().join(format!("trial-{trial}"));
        let mut a = Appliance::start_polling(&device_dir, &id, &f.v4, &f.base, &f.root_json(), None, true, false);
        std::thread::sleep(Duration::from_millis(25 * trial));
        if a.slots()["active"]["version"] == "0.5.0" {
            cut_after += 1;
        } else {
            cut_before += 1;
        }
        a.kill_and_restart();
        // Whatever the moment, it answers with a verified model …
        let version = a.wait_model(|v| v == "0.4.0" || v == "0.5.0", BACK_WITHIN);
        let slots = a.slots();
        if version == "0.5.0" {
            assert_eq!(slots["active"]["version"], "0.5.0", "trial {trial}: {slots}");
        }
        let partial = std::fs::read_dir(device_dir.join("models/downloads"))
            .map(|d| d.filter_map(Result::ok).any(|e| e.file_name().to_string_lossy().ends_with(".partial")))
            .unwrap_or(false);
        seen.insert((version.clone(), slots["active"].is_null(), partial));
        // … and goes on to the assigned one.
        a.wait_model(|v| v == "0.5.0", BACK_WITHIN);
        assert!(a.slots()["given_up"].is_null(), "trial {trial}: nothing given up: {}", a.slots());
    }
    // A download cut off earlier resumes from its partial file: a partial
    // that is not the target's beginning is caught by the signed hash,
    // removed, and the next check downloads it whole.
    let model: Value = serde_json::from_str(&f.fleet.cli_ok(&["models", "show", "0.5.0", "--json"])).unwrap();
    let sha = model["sha256"].as_str().unwrap();
    let device_dir = dir.path().join("resumed");
    std::fs::create_dir_all(device_dir.join("models/downloads")).unwrap();
    std::fs::write(device_dir.join(format!("models/downloads/{sha}.partial")), vec![7u8; 1000]).unwrap();
    let a = Appliance::start_polling(&device_dir, &id, &f.v4, &f.base, &f.root_json(), None, true, true);
    a.wait_model(|v| v == "0.5.0", BACK_WITHIN);
    // The cuts fell before and after the switch.
    eprintln!(
        "cuts before the switch {cut_before}, after it {cut_after}; after the cut (version, no slot active, a \
         partial download): {seen:?}"
    );
    assert!(cut_before > 0 && cut_after > 0, "cuts before the switch {cut_before}, after it {cut_after}");
}

/// A copy of the shipped model under another version that answers
/// UNCERTAIN far more often (its confidence threshold raised).
fn hesitant_pillnet(dir: &Path, version: &str) -> PathBuf {
    let out = reversioned_pillnet(dir, version);
    let mut manifest: Value = serde_json::from_slice(&std::fs::read(out.join("manifest.json")).unwrap()).unwrap();
    manifest["thresholds"]["min_confidence"] = serde_json::json!(0.9999999);
    let bytes = serde_json::to_vec_pretty(&manifest).unwrap();
    std::fs::write(out.join("manifest.json"), &bytes).unwrap();
    let sum = rxvision_models::bundle::sha256_hex(&bytes);
    std::fs::write(out.join("manifest.json.sha256"), format!("{sum}  manifest.json\n")).unwrap();
    out
}

/// A decision in a line: its outcome, the stage's devices and scans, and
/// each metric's verdict with its counts (stage events/scans against the control's).
fn decision_summary(decision: &Value) -> String {
    let metrics: Vec<String> = decision["metrics"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|m| {
            let t = &m["totals"];
            format!(
                "{} {} {}/{} vs {}/{}",
                m["metric"].as_str().unwrap_or("?"),
                m["verdict"].as_str().unwrap_or("?"),
                t["stage_events"],
                t["stage_exposure"],
                t["control_events"],
                t["control_exposure"]
            )
        })
        .collect();
    format!(
        "{} at stage {} after {} min, devices {}, scans {}; {}",
        decision["outcome"],
        decision["stage"],
        decision["minutes"],
        decision["stage_devices"],
        decision["stage_scans"],
        metrics.join("; ")
    )
}

/// Waits until rollout `id` is in `state` (its status JSON), within `limit`.
fn wait_rollout(f: &UpdateFleet, id: u32, state: &str, limit: Duration) -> Value {
    let started = Instant::now();
    loop {
        let status: Value =
            serde_json::from_str(&f.fleet.cli_ok(&["rollout", "status", "--id", &id.to_string(), "--json"])).unwrap();
        if status["rollout"]["state"]["state"] == state {
            return status;
        }
        let halted_early =
            ["halted", "aborted", "completed"].contains(&status["rollout"]["state"]["state"].as_str().unwrap_or(""));
        assert!(
            !halted_early && started.elapsed() < limit,
            "rollout {id} is not {state}: {}; the newest decision: {}",
            status["rollout"]["state"],
            decision_summary(&status["decisions"][0])
        );
        std::thread::sleep(Duration::from_millis(1000));
    }
}

#[test]
fn staged_rollouts_on_twenty_appliances_pass_halt_and_pause_by_field_evidence() {
    let test = "staged_rollouts_on_twenty_appliances";
    if !tools_present(test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // Judged every second; a worse model may fail the regression gate, which
    // this test lets through so that the field catches it.
    let f = UpdateFleet::start(dir.path(), "stages", "1", "1", "judge_interval_ms = 1000\n");
    let v3 = hesitant_pillnet(dir.path(), "0.6.0");
    let v4 = reversioned_pillnet(dir.path(), "0.7.0");
    for bundle in [&v3, &v4] {
        f.fleet.cli_ok(&["models", "push", bundle.to_str().unwrap()]);
    }
    // Appliances on the synthetic camera; identification scans.
    let formulary = workspace().join("models/formulary/formulary.json");
    APPLIANCE_EDITS.with(|e| {
        *e.borrow_mut() = vec![
            ("source = \"none\"".into(), "source = \"synthetic\"".into()),
            (
                "formulary = \"/usr/share/rxvision/formulary.json\"".into(),
                format!("formulary = {:?}", formulary.display().to_string()),
            ),
        ]
    });
    let appliances: Vec<(String, Appliance)> = (0..20)
        .map(|n| {
            let id = format!("counter-stage-{n:02}");
            let (broker, password) = f.add_device(&id);
            let a = Appliance::start(
                &dir.path().join(&id),
                &id,
                &f.v4,
                &f.base,
                &f.root_json(),
                Some((&broker, &password)),
            );
            (id, a)
        })
        .collect();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let pace = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(50));
    let addrs: Vec<std::net::SocketAddr> = appliances.iter().map(|(_, a)| a.addr).collect();
    let scanner = {
        let (stop, pace) = (stop.clone(), pace.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for addr in &addrs {
                    let body = r#"{"operator_id":"tech-1"}"#;
                    let _ = crate::serve::try_http(*addr, "POST", "/v1/verify", Some(API_KEY), Some(body));
                    std::thread::sleep(Duration::from_millis(pace.load(std::sync::atomic::Ordering::Relaxed)));
                }
            }
        })
    };
    let plan = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let quick = plan(
        "quick.toml",
        "stages = [25, 50, 100]\nsoak_minutes = 1\nmax_stage_minutes = 10\nmin_scans = 100\nmin_devices = 2\n\
         alpha = 0.2\npass_margin = 20.0\noutage_minutes = 5\n",
    );
    let versions = |expected: &str| appliances.iter().filter(|(_, a)| a.model().as_deref() == Some(expected)).count();

    // v1 → v2 through every stage: 25 %, 50 %, then 100 % after an admin's
    // approval. (A loose plan: slow scans are a few percent of scans, the
    // stage's devices have just restarted, and showing such a rate not
    // worse within a tight margin takes thousands of scans a stage; the
    // rollout benchmark measures the statistics.)
    f.fleet.cli_ok(&["rollout", "start", "0.5.0", "--plan", quick.to_str().unwrap()]);
    let awaiting = wait_rollout(&f, 1, "awaiting_approval", Duration::from_secs(900));
    for decision in awaiting["decisions"].as_array().unwrap().iter().filter(|d| d["outcome"]["outcome"] != "continue") {
        eprintln!("[stages] rollout 1 decided {}", decision_summary(decision));
    }
    assert_eq!(awaiting["decisions"][0]["outcome"]["outcome"], "pass", "{awaiting}");
    let passes = f.fleet.cli_ok(&["events"]).lines().filter(|l| l.contains("rollout_stage_passed")).count();
    assert_eq!(passes, 2, "two stages passed");
    f.fleet.cli_ok(&["rollout", "approve"]);
    wait_rollout(&f, 1, "completed", Duration::from_secs(30));
    let started = Instant::now();
    while versions("0.5.0") < 20 {
        assert!(started.elapsed() < Duration::from_secs(120), "{} of 20 on 0.5.0", versions("0.5.0"));
        std::thread::sleep(Duration::from_secs(1));
    }
    let production: Value = serde_json::from_str(&f.fleet.cli_ok(&["models", "show", "production", "--json"])).unwrap();
    assert_eq!(production["version"], "0.5.0");

    // A worse v3 (UNCERTAIN far more often) is halted at its first stage
    // before the soak ends, and its devices return to v2 by themselves.
    let long_soak = plan(
        "long-soak.toml",
        "stages = [25, 50, 100]\nsoak_minutes = 30\nmax_stage_minutes = 60\nmin_scans = 100\nmin_devices = 2\nalpha = 0.1\n",
    );
    f.fleet.cli_ok(&["rollout", "start", "0.6.0", "--plan", long_soak.to_str().unwrap()]);
    let started = Instant::now();
    let halted = wait_rollout(&f, 2, "halted", Duration::from_secs(300));
    assert!(started.elapsed() < Duration::from_secs(30 * 60), "halted before the soak ended");
    let reason = halted["rollout"]["state"]["reason"].as_str().unwrap();
    assert!(reason.contains("uncertain") || reason.contains("automated"), "{reason}");
    let decision = &halted["decisions"][0];
    let uncertain = decision["metrics"].as_array().unwrap().iter().find(|m| m["metric"] == "uncertain").unwrap();
    assert!(
        uncertain["interval"][0].as_f64().unwrap() > 1.0,
        "the stage's UNCERTAIN rate is above the control's: {uncertain}"
    );
    let started = Instant::now();
    while versions("0.5.0") < 20 {
        assert!(started.elapsed() < Duration::from_secs(120), "{} of 20 back on 0.5.0", versions("0.5.0"));
        std::thread::sleep(Duration::from_secs(1));
    }

    // v4 with too little traffic: inconclusive at its cap, paused for a human, not passed.
    pace.store(2_000, std::sync::atomic::Ordering::Relaxed);
    let starved = plan(
        "starved.toml",
        "stages = [25, 50, 100]\nsoak_minutes = 1\nmax_stage_minutes = 2\nmin_scans = 100000\nmin_devices = 2\n",
    );
    f.fleet.cli_ok(&["rollout", "start", "0.7.0", "--plan", starved.to_str().unwrap()]);
    let paused = wait_rollout(&f, 3, "paused", Duration::from_secs(300));
    let reason = paused["rollout"]["state"]["reason"].as_str().unwrap();
    assert!(reason.contains("too little evidence"), "{paused}");
    assert_eq!(paused["rollout"]["percent"], 25, "it stays where it was");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    scanner.join().unwrap();

    // The decisions and their numbers through the API.
    let admin = f.fleet.cli_ok(&["tokens", "create", "--role", "admin", "--name", "stages-admin"]).trim().to_string();
    let (status, body) = crate::serve::try_http(f.fleet.http, "GET", "/api/v1/rollouts/2", Some(&admin), None).unwrap();
    let view: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(status, 200);
    assert_eq!(view["rollout"]["state"]["state"], "halted");
    assert!(view["decisions"][0]["metrics"].as_array().unwrap().len() >= 4, "{view}");

    // … and on the dashboard, where an admin resumes the paused rollout.
    let Some(browser) = crate::serve::Browser::start() else { return };
    let base = format!("http://{}", f.fleet.http);
    browser.log_in(&base, &admin);
    browser.go(&format!("{base}/#/rollouts"));
    browser.wait_loaded();
    assert_eq!(browser.count("[data-testid=rollouts] tr[data-rollout]"), 3);
    assert_eq!(browser.attr("[data-testid=models] tr[data-version='0.5.0'] [data-state]", "data-state"), "production");
    browser.go(&format!("{base}/#/rollout/2"));
    browser.wait_loaded();
    assert_eq!(browser.attr("[data-testid=rollout-state]", "data-state"), "halted");
    assert!(browser.count("[data-testid=decisions] tr[data-outcome='fail']") == 1);
    assert!(browser.count("[data-testid=decisions] tr[data-metric='uncertain']") >= 1);
    browser.screenshot("dashboard-rollout-halted.png");
    browser.go(&format!("{base}/#/rollout/3"));
    browser.wait_loaded();
    assert_eq!(browser.attr("[data-testid=rollout-state]", "data-state"), "paused");
    browser.click("[data-testid=rollout-resume]");
    browser.wait_loaded();
    let resumed: Value = serde_json::from_str(&f.fleet.cli_ok(&["rollout", "status", "--id", "3", "--json"])).unwrap();
    assert_eq!(resumed["rollout"]["state"]["state"], "running", "resumed from the dashboard");
}

/// `target/fixtures/rxvisiond-next` (`scripts/build-release-fixture`): this
/// daemon stamped with the next version; with its version. None (and why) when missing.
fn next_release(test: &str) -> Option<(PathBuf, String)> {
    let path = workspace().join("target/fixtures/rxvisiond-next");
    let version = Command::new(&path).arg("--version").output().ok().filter(|o| o.status.success());
    let Some(output) = version else {
        let why = format!("{} is missing: run scripts/build-release-fixture", path.display());
        assert!(std::env::var_os("RXVISION_REQUIRE_REFERENCES").is_none(), "{why}");
        eprintln!("SKIPPED {test}: {why}");
        return None;
    };
    let text = String::from_utf8(output.stdout).unwrap();
    Some((path, text.trim().strip_prefix("rxvisiond ").unwrap().to_string()))
}

impl Appliance {
    /// The daemon version `/v1/status` reports (None while it is not answering).
    fn daemon(&self) -> Option<String> {
        let (status, body) = crate::serve::try_http(self.addr, "GET", "/v1/status", Some(API_KEY), None).ok()?;
        let value: Value = serde_json::from_slice(&body).ok()?;
        (status == 200).then(|| value["version"].as_str().map(str::to_string)).flatten()
    }

    fn wait_daemon(&self, version: &str, within: Duration) {
        let started = Instant::now();
        while self.daemon().as_deref() != Some(version) {
            assert!(started.elapsed() < within, "the appliance does not run {version}; it runs {:?}", self.daemon());
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The program this appliance's process runs now (it `exec`s releases in place).
    fn program(&self) -> String {
        std::fs::read_link(format!("/proc/{}/exe", self.pid())).unwrap().display().to_string()
    }

    fn release_slots(&self) -> Value {
        serde_json::from_slice(&std::fs::read(self.dir.join("daemon/slots.json")).unwrap_or_default())
            .unwrap_or(Value::Null)
    }
}

fn wait_release(f: &UpdateFleet, version: &str, state: &str) -> Value {
    let started = Instant::now();
    loop {
        let all: Value = serde_json::from_str(&f.fleet.cli_ok(&["releases", "list", "--json"])).unwrap();
        if let Some(release) = all.as_array().unwrap().iter().find(|r| r["version"] == version && r["state"] == state) {
            return release.clone();
        }
        assert!(started.elapsed() < Duration::from_secs(90), "release {version} is not {state}: {all}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn daemon_releases_install_by_themselves_and_a_crash_loop_brings_the_stage_back() {
    let test = "daemon_releases_install_by_themselves";
    if !tools_present(test) {
        return;
    }
    let Some((next, next_version)) = next_release(test) else { return };
    let packaged = workspace().join("target/debug/rxvisiond");
    let out = Command::new(&packaged).arg("--version").output().unwrap();
    let packaged_version =
        String::from_utf8(out.stdout).unwrap().trim().strip_prefix("rxvisiond ").unwrap().to_string();
    let mut parts: Vec<u64> = next_version.split('.').map(|p| p.parse().unwrap()).collect();
    parts[2] += 1;
    let mislabelled = format!("{}.{}.{}", parts[0], parts[1], parts[2]);

    let dir = tempfile::tempdir().unwrap();
    let f = UpdateFleet::start(dir.path(), "releases", "1", "1", "judge_interval_ms = 500\n");
    let fleet = &f.fleet;
    fleet.cli_ok(&["releases", "push", packaged.to_str().unwrap(), "--version", &packaged_version, "--production"]);
    fleet.cli_ok(&["releases", "push", next.to_str().unwrap(), "--version", &next_version]);
    // The same binary under a version it does not print: the appliances find out.
    fleet.cli_ok(&["releases", "push", next.to_str().unwrap(), "--version", &mislabelled]);

    // Two appliances of the 10 % stage: A ends its trials after 3 s, B
    // stays on trial (so that killing it makes a crash loop).
    let ids = [device_id("counter-rel-a", true), device_id("counter-rel-b", true)];
    let start = |n: usize, healthy: &str| {
        APPLIANCE_EDITS.with(|e| {
            *e.borrow_mut() = vec![("healthy_after_seconds = 3".into(), format!("healthy_after_seconds = {healthy}"))]
        });
        let (broker, password) = f.add_device(&ids[n]);
        let dir = dir.path().join(format!("appliance-{n}"));
        let a = Appliance::start(&dir, &ids[n], &f.v4, &f.base, &f.root_json(), Some((&broker, &password)));
        APPLIANCE_EDITS.with(|e| e.borrow_mut().clear());
        a
    };
    let a = start(0, "3");
    let mut b = start(1, "600");
    assert_eq!(a.daemon().as_deref(), Some(packaged_version.as_str()));
    let pids = (a.pid(), b.pid());

    // The mislabelled release is refused by the stage's appliances (the
    // binary runs but says another version), reported, and the fleet halts it.
    fleet.cli_ok(&["releases", "deploy", &mislabelled, "--percent", "10"]);
    let refused = f.wait_event(&ids[0], "daemon_rejected", |d| d["version"] == mislabelled.as_str());
    assert!(refused["details"]["reason"].as_str().unwrap().contains("says"), "{refused}");
    let halted = wait_release(&f, &mislabelled, "halted");
    assert!(halted["state_reason"].as_str().unwrap().contains("refused it"), "{halted}");
    assert!(a.release_slots()["active"].is_null(), "nothing installed: {}", a.release_slots());
    assert_eq!(a.daemon().as_deref(), Some(packaged_version.as_str()));

    // The next release: both install it into slot a, check it, switch and
    // run it in place (same process, the slot's program), moved by the hint.
    fleet.cli_ok(&["releases", "deploy", &next_version, "--percent", "10"]);
    a.wait_daemon(&next_version, Duration::from_secs(120));
    b.wait_daemon(&next_version, Duration::from_secs(120));
    assert_eq!((a.pid(), b.pid()), pids, "restarted in place");
    assert!(a.program().ends_with("daemon/a/rxvisiond"), "{}", a.program());
    let installed = f.wait_event(&ids[0], "daemon_installed", |d| d["version"] == next_version.as_str());
    assert_eq!(installed["details"]["previous"], packaged_version.as_str(), "{installed}");
    std::thread::sleep(Duration::from_secs(5));
    assert!(a.release_slots()["trial"].is_null(), "A's trial ended: {}", a.release_slots());
    assert_eq!(b.release_slots()["trial"]["starts"], 1, "B on trial: {}", b.release_slots());

    // B crashes (killed, started again as systemd would): starts 2 and 3
    // still run the release, the 4th goes back to the packaged daemon by itself.
    for start in 2..=3 {
        b.kill_and_restart();
        b.wait_daemon(&next_version, Duration::from_secs(60));
        assert_eq!(b.release_slots()["trial"]["starts"], start, "{}", b.release_slots());
    }
    b.kill_and_restart();
    b.wait_daemon(&packaged_version, Duration::from_secs(60));
    let slots = b.release_slots();
    assert!(slots["active"].is_null() && slots["given_up"].as_array().map(Vec::len) == Some(1), "{slots}");
    let back = f.wait_event(&ids[1], "daemon_rolled_back", |d| d["reason"] == "crash_loop");
    assert_eq!(
        (back["details"]["from"].as_str(), back["details"]["to"].as_str()),
        (Some(next_version.as_str()), Some(packaged_version.as_str()))
    );

    // The crash loop halts the release; the stage is ordered back, and A
    // (which kept it) returns to the packaged daemon by itself.
    let halted = wait_release(&f, &next_version, "halted");
    assert!(halted["state_reason"].as_str().unwrap().contains("crash loop"), "{halted}");
    a.wait_daemon(&packaged_version, Duration::from_secs(120));
    let returned = f.wait_event(&ids[0], "daemon_installed", |d| d["version"] == packaged_version.as_str());
    assert_eq!(returned["details"]["rollback"], true, "{returned}");
    assert_eq!(a.pid(), pids.0);
    assert!(a.release_slots()["active"].is_null(), "the package runs again: {}", a.release_slots());
    assert_eq!(a.model().as_deref(), Some("0.4.0"), "the model was not touched");

    // The admin sees it through the API and on the dashboard.
    let admin = fleet.cli_ok(&["tokens", "create", "--role", "admin", "--name", "releases-admin"]).trim().to_string();
    let (status, body) = crate::serve::try_http(fleet.http, "GET", "/api/v1/releases", Some(&admin), None).unwrap();
    assert_eq!(status, 200);
    let listed: Value = serde_json::from_slice(&body).unwrap();
    let states: Vec<(&str, &str)> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r["version"].as_str().unwrap(), r["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        vec![
            (mislabelled.as_str(), "halted"),
            (next_version.as_str(), "halted"),
            (packaged_version.as_str(), "production")
        ]
    );
    let Some(browser) = crate::serve::Browser::start() else { return };
    let base = format!("http://{}", fleet.http);
    browser.log_in(&base, &admin);
    browser.go(&format!("{base}/#/rollouts"));
    browser.wait_loaded();
    let row =
        format!("[data-testid=releases] tr[data-release='{next_version}-{}'] [data-state]", std::env::consts::ARCH);
    assert_eq!(browser.attr(&row, "data-state"), "halted");
    assert_eq!(browser.count("[data-testid=releases] tr[data-release]"), 3);
}
