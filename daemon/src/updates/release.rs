//! Daemon releases: the appliance's own binary, updated through the same
//! signed targets as models (kind `daemon`, name `rxvisiond-<arch>`).
//!
//! The binary systemd starts (`/usr/bin/rxvisiond`, from the package) is the
//! **launcher**: at `rxvisiond run` it reads `<state_dir>/daemon/slots.json`
//! and, when an installed release newer than itself is active, `exec`s it in
//! place (same PID, so systemd sees one service), telling it with
//! [`SLOT_ENV`] and [`LAUNCHER_ENV`]. The launcher never changes, so a
//! release that crashes cannot break the way back: every start systemd makes
//! after a crash (`Restart=on-failure`) passes through the launcher, which
//! counts it against the release's trial, and past `max_starts` starts
//! returns to the previous slot (or to itself) and never runs that release
//! again. A release newer than the package stays in charge until the
//! package itself is upgraded past it; then the slots are cleared.
//!
//! An install writes the inactive slot (mode 0700), then checks the binary
//! before the switch ([`verify`]): it runs and prints the version signed
//! metadata gives it, it accepts this appliance's configuration, and it
//! passes the self-test of the model running now on the CPU engine. After the
//! switch the daemon finishes requests in flight and `exec`s the launcher,
//! which starts the new release.
//!
//! The launcher runs before the audit log is open: what it decides that the
//! fleet must hear of (a crash-loop return) waits in
//! `<state_dir>/daemon/pending-events.json` until the service records it
//! ([`report_pending`]).

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::slots::{Installed, SlotStore, Start};
use crate::audit::AuditLog;

/// Set for a release the launcher started: its slot (`a`, `b`).
pub const SLOT_ENV: &str = "RXVISION_RELEASE_SLOT";
/// Set for a release the launcher started: the launcher's path (a restart `exec`s it).
pub const LAUNCHER_ENV: &str = "RXVISION_LAUNCHER";

/// How long each check of a new binary may take.
const CHECK_TIMEOUT: Duration = Duration::from_secs(120);

/// The release slots under `state_dir`.
pub fn store(state_dir: &Path) -> SlotStore {
    SlotStore::for_releases(&state_dir.join("daemon"))
}

/// The `custom.rxvision.name` of the releases for this machine.
pub fn target_name() -> String {
    format!("rxvisiond-{}", std::env::consts::ARCH)
}

/// What `rxvisiond run` runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    /// This binary.
    This,
    /// An installed release: `exec` it.
    Release(Installed),
}

fn newer(version: &str, than: &str) -> bool {
    match (semver::Version::parse(version), semver::Version::parse(than)) {
        (Ok(a), Ok(b)) => a > b,
        _ => false,
    }
}

/// At `rxvisiond run`: what to run, counting the start against a release's
/// trial (see the module's docs). `own_version` is this binary's version.
pub fn choose_at_start(store: &SlotStore, max_starts: u32, own_version: &str) -> Launch {
    if std::env::var_os(SLOT_ENV).is_some() {
        return Launch::This; // started by the launcher, which counted the start
    }
    let mut slots = match store.load() {
        Ok(slots) => slots,
        Err(e) => {
            tracing::error!(error = %e, "the release slots cannot be read: running the packaged daemon");
            let _ = std::fs::rename(store.state_file(), store.state_file().with_extension("json.unreadable"));
            return Launch::This;
        }
    };
    let before = slots.clone();
    if slots.active.as_ref().is_some_and(|a| !newer(&a.version, own_version)) {
        tracing::info!(
            installed = ?slots.active.as_ref().map(|a| &a.version), packaged = own_version,
            "the packaged daemon is as new as the installed release: the release slots are cleared"
        );
        slots.active = None;
        slots.previous = None;
        slots.trial = None;
    }
    let launch = match slots.on_start(max_starts) {
        Start::Load(active) => active,
        Start::RolledBack { from, to } => {
            tracing::error!(version = %from.version, "the new daemon did not survive {max_starts} starts: going back");
            add_pending(
                store,
                super::event::DAEMON_ROLLED_BACK,
                serde_json::json!({
                    "from": from.version, "to": to.as_ref().map_or(own_version.to_string(), |t| t.version.clone()),
                    "reason": "crash_loop",
                }),
            );
            to
        }
    };
    if slots != before {
        if let Err(e) = store.save(&slots) {
            tracing::error!(error = %e, "the release slots cannot be written");
        }
    }
    match launch {
        Some(installed) if newer(&installed.version, own_version) => Launch::Release(installed),
        _ => Launch::This,
    }
}

/// Whether this process is a release the launcher started that is still on trial.
pub fn running_on_trial(store: &SlotStore) -> bool {
    std::env::var_os(SLOT_ENV).is_some() && store.load().is_ok_and(|slots| slots.trial.is_some())
}

/// `exec`s an installed release in place of this process with the same
/// arguments; returns only when that failed.
pub fn exec(store: &SlotStore, release: &Installed) -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let launcher = match std::env::current_exe() {
        Ok(path) => path,
        Err(e) => return e,
    };
    std::process::Command::new(store.bundle_path(release.slot))
        .args(std::env::args_os().skip(1))
        .env(SLOT_ENV, release.slot.dir_name())
        .env(LAUNCHER_ENV, launcher)
        .exec()
}

/// The release could not be started: back to the previous slot, never again
/// this release (reported when the service runs).
pub fn give_up_after_exec_failure(store: &SlotStore, own_version: &str, why: &str) {
    let mut slots = store.load().unwrap_or_default();
    let Some((from, to)) = slots.roll_back() else { return };
    if let Err(e) = store.save(&slots) {
        tracing::error!(error = %e, "the release slots cannot be written");
    }
    add_pending(
        store,
        super::event::DAEMON_ROLLED_BACK,
        serde_json::json!({
            "from": from.version, "to": to.map_or(own_version.to_string(), |t| t.version),
            "reason": format!("start_failed: {why}"),
        }),
    );
}

/// Restarts the service into what the launcher chooses now: `exec`s the
/// launcher (this binary when it is the launcher) with the same arguments;
/// returns only when that failed.
pub fn restart() -> std::io::Error {
    use std::os::unix::process::CommandExt;
    let launcher = match std::env::var_os(LAUNCHER_ENV) {
        Some(path) => PathBuf::from(path),
        None => match std::env::current_exe() {
            Ok(path) => path,
            Err(e) => return e,
        },
    };
    std::process::Command::new(launcher)
        .args(std::env::args_os().skip(1))
        .env_remove(SLOT_ENV)
        .env_remove(LAUNCHER_ENV)
        .exec()
}

const PENDING_FILE: &str = "pending-events.json";

fn pending_file(store: &SlotStore) -> PathBuf {
    store.dir().join(PENDING_FILE)
}

fn add_pending(store: &SlotStore, event: &str, details: serde_json::Value) {
    let path = pending_file(store);
    let mut pending: Vec<(String, serde_json::Value)> =
        std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
    pending.push((event.to_string(), details));
    let written = store.replace_file(PENDING_FILE, &serde_json::to_vec(&pending).expect("events serialise"));
    if let Err(e) = written {
        tracing::error!(path = %path.display(), error = %e, "an update event cannot be kept for the audit log");
    }
}

/// Records what the launcher decided (see the module's docs) in the audit log.
pub fn report_pending(store: &SlotStore, audit: &AuditLog) {
    let path = pending_file(store);
    let Ok(bytes) = std::fs::read(&path) else { return };
    match serde_json::from_slice::<Vec<(String, serde_json::Value)>>(&bytes) {
        Ok(pending) => {
            for (event, details) in pending {
                super::record(audit, &event, details);
            }
        }
        Err(e) => tracing::error!(path = %path.display(), error = %e, "unreadable update events are dropped"),
    }
    let _ = std::fs::remove_file(&path);
}

/// Checks a written release before the switch: it runs and prints
/// `rxvisiond <expected_version>`, accepts `config_file`, and passes the
/// self-test of `bundle` on the CPU engine. `Err(why)`.
pub async fn verify(binary: &Path, expected_version: &str, config_file: &Path, bundle: &Path) -> Result<(), String> {
    let version = run(binary, &["--version".as_ref()]).await?;
    let says = String::from_utf8_lossy(&version).trim().to_string();
    if says != format!("rxvisiond {expected_version}") {
        return Err(format!("the binary says {says:?}, signed metadata rxvisiond {expected_version}"));
    }
    run(binary, &["config".as_ref(), "check".as_ref(), config_file.as_os_str()])
        .await
        .map_err(|e| format!("it refuses this appliance's configuration: {e}"))?;
    run(binary, &["selftest".as_ref(), "--engine".as_ref(), "cpu".as_ref(), "--bundle".as_ref(), bundle.as_os_str()])
        .await
        .map_err(|e| format!("the model's self-test fails under it: {e}"))?;
    Ok(())
}

/// Runs the binary with `args` (bounded in time); its standard output.
async fn run(binary: &Path, args: &[&std::ffi::OsStr]) -> Result<Vec<u8>, String> {
    let mut command = tokio::process::Command::new(binary);
    command
        .args(args)
        .env_remove(SLOT_ENV)
        .env_remove(LAUNCHER_ENV)
        .env("RXVISION_LOG", "error")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let shown = args.iter().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ");
    let output = match tokio::time::timeout(CHECK_TIMEOUT, command.output()).await {
        Err(_) => return Err(format!("`{shown}` did not finish within {CHECK_TIMEOUT:?}")),
        Ok(Err(e)) => return Err(format!("`{shown}` cannot run: {e}")),
        Ok(Ok(output)) => output,
    };
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let last = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default();
        return Err(format!("`{shown}` failed ({}): {last}", output.status));
    }
    Ok(output.stdout)
}

#[cfg(test)]
mod tests {
    use super::super::slots::Slot;
    use super::*;

    fn installed(slot: Slot, version: &str) -> Installed {
        Installed { slot, version: version.into(), sha256: "11".repeat(32) }
    }

    #[test]
    fn a_newer_release_is_launched_and_a_crash_loop_returns_to_the_package() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        assert_eq!(choose_at_start(&store, 2, "0.1.0"), Launch::This, "nothing installed");
        let mut slots = store.load().unwrap();
        slots.switch(installed(Slot::A, "0.2.0"), 1);
        store.save(&slots).unwrap();
        assert_eq!(choose_at_start(&store, 2, "0.1.0"), Launch::Release(installed(Slot::A, "0.2.0")));
        assert_eq!(choose_at_start(&store, 2, "0.1.0"), Launch::Release(installed(Slot::A, "0.2.0")));
        assert_eq!(choose_at_start(&store, 2, "0.1.0"), Launch::This, "the third start without confirmation");
        let slots = store.load().unwrap();
        assert_eq!((slots.active, slots.given_up), (None, vec!["11".repeat(32)]));
        let pending: Vec<(String, serde_json::Value)> =
            serde_json::from_slice(&std::fs::read(dir.path().join("daemon/pending-events.json")).unwrap()).unwrap();
        assert_eq!(pending[0].0, "daemon_rolled_back");
        assert_eq!(pending[0].1["from"], "0.2.0");
        assert_eq!(pending[0].1["to"], "0.1.0");
    }

    #[test]
    fn a_package_as_new_as_the_release_clears_the_slots() {
        let dir = tempfile::tempdir().unwrap();
        let store = store(dir.path());
        let mut slots = store.load().unwrap();
        slots.switch(installed(Slot::B, "0.2.0"), 1);
        slots.confirm();
        store.save(&slots).unwrap();
        assert_eq!(choose_at_start(&store, 2, "0.2.0"), Launch::This);
        assert_eq!(store.load().unwrap().active, None);
        assert!(!dir.path().join("daemon/pending-events.json").exists(), "nothing to report");
    }
}
