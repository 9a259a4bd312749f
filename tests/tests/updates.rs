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
