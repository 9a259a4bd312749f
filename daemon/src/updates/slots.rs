//! A/B slots: which installed model bundle (or daemon release) the daemon
//! loads (or runs), the one before it, and whether the newest is still on trial.
//!
//! Layout under `<state_dir>/models/`: `a/bundle.tar.gz`, `b/bundle.tar.gz`
//! and `slots.json`; under `<state_dir>/daemon/` the same with `a/rxvisiond`
//! and `b/rxvisiond` ([`SlotStore::for_releases`]). An install writes the *inactive* slot, checks it, then
//! replaces `slots.json` atomically (written to a temporary file, synced,
//! renamed, directory synced): before the rename the daemon loads what it
//! loaded before, after it the new slot, and a power cut in between leaves
//! one or the other, never a mix. The configured bundle (`[model] bundle`,
//! as shipped) is what runs when no slot is active.
//!
//! A switch starts a **trial**: every start of the daemon counts against it
//! ([`Slots::on_start`]) until the new model has served for a while
//! ([`Slots::confirm`]). Too many starts without that mean a crash loop: the
//! daemon goes back to the previous slot by itself. The state changes here
//! are pure; [`SlotStore`] reads and writes them.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One of the two slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Slot {
    /// `a/`.
    A,
    /// `b/`.
    B,
}

impl Slot {
    /// The other slot.
    pub fn other(self) -> Slot {
        match self {
            Slot::A => Slot::B,
            Slot::B => Slot::A,
        }
    }

    /// Its directory name.
    pub fn dir_name(self) -> &'static str {
        match self {
            Slot::A => "a",
            Slot::B => "b",
        }
    }
}

/// An installed artifact (model bundle or daemon release).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Installed {
    /// Where it is.
    pub slot: Slot,
    /// Its version.
    pub version: String,
    /// SHA-256 of its bytes, as signed metadata gave it.
    pub sha256: String,
}

/// A switch not yet proven.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    /// Starts of the daemon since the switch.
    pub starts: u32,
    /// When the switch happened, Unix ms.
    pub since_ms: u64,
}

/// `slots.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Slots {
    /// What the daemon loads; `None`: the configured bundle.
    pub active: Option<Installed>,
    /// What it loaded before (the rollback target); `None`: the configured bundle.
    pub previous: Option<Installed>,
    /// Set by a switch until the new model has served long enough.
    pub trial: Option<Trial>,
    /// SHA-256 of bundles given up here (a crash loop, a load failure):
    /// never installed again, whatever metadata assigns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub given_up: Vec<String>,
}

/// What a start should load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// The active slot (or the configured bundle).
    Load(Option<Installed>),
    /// The trial failed (too many starts): went back from `from` to `to`.
    RolledBack {
        /// The version given up.
        from: Installed,
        /// What is loaded now (`None`: the configured bundle).
        to: Option<Installed>,
    },
}

impl Slots {
    /// The slot an install may write: never the active one.
    pub fn inactive(&self) -> Slot {
        self.active.as_ref().map_or(Slot::A, |a| a.slot.other())
    }

    /// `installed` becomes active, the active one previous, and a trial starts.
    pub fn switch(&mut self, installed: Installed, now_ms: u64) {
        self.previous = self.active.take();
        self.active = Some(installed);
        self.trial = Some(Trial { starts: 0, since_ms: now_ms });
    }

    /// A start of the daemon: counts it against a trial; past `max_starts`
    /// starts the trial has failed and the previous slot is active again.
    pub fn on_start(&mut self, max_starts: u32) -> Start {
        let Some(trial) = &mut self.trial else { return Start::Load(self.active.clone()) };
        trial.starts += 1;
        if trial.starts <= max_starts {
            return Start::Load(self.active.clone());
        }
        match self.roll_back() {
            Some((from, to)) => Start::RolledBack { from, to },
            None => Start::Load(self.active.clone()),
        }
    }

    /// Goes back to the previous slot (a failed trial, or the model failed
    /// to load): returns what was given up and what is active now.
    pub fn roll_back(&mut self) -> Option<(Installed, Option<Installed>)> {
        let from = self.active.take()?;
        self.active = self.previous.take();
        self.trial = None;
        if !self.given_up.contains(&from.sha256) {
            self.given_up.push(from.sha256.clone());
        }
        Some((from, self.active.clone()))
    }

    /// The new model has served long enough: the trial is over.
    pub fn confirm(&mut self) -> bool {
        self.trial.take().is_some()
    }
}

/// Why the slots could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {problem}")]
pub struct SlotError {
    /// The file.
    pub path: String,
    /// What went wrong.
    pub problem: String,
}

/// The slots on disk: `<state_dir>/models/` (model bundles) or
/// `<state_dir>/daemon/` (daemon releases, written executable).
#[derive(Debug, Clone)]
pub struct SlotStore {
    dir: PathBuf,
    /// The file name of a slot's artifact.
    artifact: &'static str,
    /// Whether the artifact is a program (written mode 0700).
    executable: bool,
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

impl SlotStore {
    /// The model slots under `models_dir` (created on first write).
    pub fn new(models_dir: &Path) -> SlotStore {
        SlotStore { dir: models_dir.to_path_buf(), artifact: "bundle.tar.gz", executable: false }
    }

    /// The daemon release slots under `daemon_dir` (`a/rxvisiond`, `b/rxvisiond`).
    pub fn for_releases(daemon_dir: &Path) -> SlotStore {
        SlotStore { dir: daemon_dir.to_path_buf(), artifact: "rxvisiond", executable: true }
    }

    /// The directory of the slots.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `slots.json`.
    pub fn state_file(&self) -> PathBuf {
        self.dir.join("slots.json")
    }

    /// Where a slot's artifact (bundle or binary) lives.
    pub fn bundle_path(&self, slot: Slot) -> PathBuf {
        self.dir.join(slot.dir_name()).join(self.artifact)
    }

    /// Where downloads are kept while incomplete (they resume from there).
    pub fn downloads(&self) -> PathBuf {
        self.dir.join("downloads")
    }

    /// The slots; none installed when `slots.json` does not exist.
    pub fn load(&self) -> Result<Slots, SlotError> {
        let path = self.state_file();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| SlotError { path: path.display().to_string(), problem: format!("not valid: {e}") }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Slots::default()),
            Err(e) => Err(SlotError { path: path.display().to_string(), problem: e.to_string() }),
        }
    }

    /// Replaces `slots.json` atomically and durably.
    pub fn save(&self, slots: &Slots) -> Result<(), SlotError> {
        let bytes = serde_json::to_vec_pretty(slots).expect("slots serialise");
        self.replace_file("slots.json", &bytes)
            .map_err(|e| SlotError { path: self.state_file().display().to_string(), problem: e.to_string() })
    }

    /// Replaces `<dir>/<name>` with `bytes` atomically and durably (a
    /// temporary file written and synced, renamed, the directory synced).
    pub fn replace_file(&self, name: &str, bytes: &[u8]) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let staged = self.dir.join(format!("{name}.new"));
        let mut file = std::fs::File::create(&staged)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&staged, self.dir.join(name))?;
        sync_dir(&self.dir)
    }

    /// Writes the file `from` as `slot`'s artifact durably (staged, synced, renamed).
    pub fn write_bundle(&self, slot: Slot, from: &Path) -> Result<PathBuf, SlotError> {
        use std::os::unix::fs::PermissionsExt;
        let target = self.bundle_path(slot);
        let dir = target.parent().expect("a slot has a directory").to_path_buf();
        let err = |e: std::io::Error| SlotError { path: target.display().to_string(), problem: e.to_string() };
        std::fs::create_dir_all(&dir).map_err(err)?;
        let staged = dir.join(format!("{}.new", self.artifact));
        std::fs::copy(from, &staged).map_err(err)?;
        let mode = if self.executable { 0o700 } else { 0o600 };
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(mode)).map_err(err)?;
        std::fs::File::open(&staged).and_then(|f| f.sync_all()).map_err(err)?;
        std::fs::rename(&staged, &target).map_err(err)?;
        sync_dir(&dir).map_err(err)?;
        Ok(target)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn installed(slot: Slot, version: &str) -> Installed {
        Installed { slot, version: version.into(), sha256: "00".repeat(32) }
    }

    #[test]
    fn installs_alternate_slots_and_keep_the_previous() {
        let mut slots = Slots::default();
        assert_eq!(slots.inactive(), Slot::A);
        slots.switch(installed(Slot::A, "0.5.0"), 1);
        assert_eq!(slots.inactive(), Slot::B);
        slots.confirm();
        slots.switch(installed(Slot::B, "0.6.0"), 2);
        assert_eq!(slots.previous.as_ref().unwrap().version, "0.5.0");
        assert_eq!(slots.inactive(), Slot::A, "the previous slot is written next, never the active one");
    }

    #[test]
    fn a_trial_that_keeps_restarting_goes_back_by_itself() {
        let mut slots = Slots::default();
        slots.switch(installed(Slot::A, "0.5.0"), 1);
        for _ in 0..3 {
            assert_eq!(slots.on_start(3), Start::Load(Some(installed(Slot::A, "0.5.0"))));
        }
        assert_eq!(slots.on_start(3), Start::RolledBack { from: installed(Slot::A, "0.5.0"), to: None });
        assert_eq!(
            slots,
            Slots { given_up: vec!["00".repeat(32)], ..Slots::default() },
            "back on the configured bundle, no trial, the bundle given up"
        );
        assert_eq!(slots.on_start(3), Start::Load(None));
    }

    #[test]
    fn a_confirmed_switch_is_not_counted_any_more() {
        let mut slots = Slots::default();
        slots.switch(installed(Slot::A, "0.5.0"), 1);
        slots.on_start(3);
        assert!(slots.confirm());
        for _ in 0..10 {
            assert_eq!(slots.on_start(3), Start::Load(Some(installed(Slot::A, "0.5.0"))));
        }
    }

    #[test]
    fn the_store_round_trips_and_refuses_a_corrupt_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = SlotStore::new(dir.path());
        assert_eq!(store.load().unwrap(), Slots::default());
        let mut slots = Slots::default();
        slots.switch(installed(Slot::B, "0.5.0"), 7);
        store.save(&slots).unwrap();
        assert_eq!(store.load().unwrap(), slots);
        std::fs::write(dir.path().join("slots.json"), b"{\"active\": 3").unwrap();
        assert!(store.load().unwrap_err().to_string().contains("not valid"));
    }
}
