//! Daemon releases: `rxvisiond` binaries the fleet publishes as TUF targets
//! of kind `daemon`, deployed to a growing share of the devices.
//!
//! A push checks that the file is a 64-bit little-endian ELF executable for
//! an architecture appliances run (x86_64, aarch64) and whole (its program
//! and section header tables lie inside the file), stores it under the
//! artifacts directory by SHA-256 and registers it as `available`. The
//! appliance checks the rest before it switches: the binary runs, says the
//! version signed metadata gives it, accepts the appliance's configuration
//! and passes the model's self-test ([`rxvision_protocol::updates`],
//! `daemon/src/updates/release.rs`).
//!
//! States ([`ReleaseState`]): `available` → `deploying` (to `percent` % of
//! the devices, by the same cohort buckets as model rollouts; the admin
//! widens the stage) → `production` at 100 % (the former production becomes
//! `retired`), or `halted` (by an admin, or by the leader when a device of
//! the stage reports a refused or crash-looping install: then the stage's
//! devices are ordered back to production through signed metadata).
//!
//! Why not the model rollouts' field comparison: the hourly telemetry
//! rollups are kept per model version, not per daemon version, so a stage
//! of daemons has no control cohort to be compared with yet. A daemon
//! release is gated like an OTA manager gates firmware: by install success
//! and survival on every device of the stage (see `ARCHITECTURE.md`).

use std::io::Write;
use std::path::Path;

use rxvision_protocol::updates::{TargetInfo, TargetKind, COHORT_BUCKETS};
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::db::{Db, DbError};
use crate::registry::artifact_path;
use crate::updates::repo::WantedTarget;

/// Largest release accepted (a debug build of `rxvisiond` is about 400 MB).
pub const MAX_RELEASE_BYTES: u64 = 1 << 30;

/// The TUF target name prefix of daemon releases; the target's
/// `custom.rxvision.name` is `rxvisiond-<arch>`, so an appliance takes the
/// release built for its own architecture.
pub const RELEASE_NAME: &str = "rxvisiond";

/// The `custom.rxvision.name` of releases for `arch` (`x86_64`, `aarch64`).
pub fn release_name(arch: &str) -> String {
    format!("{RELEASE_NAME}-{arch}")
}

/// Where a release is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseState {
    /// Pushed; not deployed.
    Available,
    /// Being deployed to `percent` % of the devices.
    Deploying,
    /// What the fleet runs.
    Production,
    /// Its deployment was halted: the stage's devices are ordered back.
    Halted,
    /// Replaced by a newer production release.
    Retired,
}

impl ReleaseState {
    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            ReleaseState::Available => "available",
            ReleaseState::Deploying => "deploying",
            ReleaseState::Production => "production",
            ReleaseState::Halted => "halted",
            ReleaseState::Retired => "retired",
        }
    }

    fn parse(s: &str) -> Option<ReleaseState> {
        [
            ReleaseState::Available,
            ReleaseState::Deploying,
            ReleaseState::Production,
            ReleaseState::Halted,
            ReleaseState::Retired,
        ]
        .into_iter()
        .find(|state| state.as_str() == s)
    }
}

/// A release as registered (one row per version and architecture).
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct DaemonRelease {
    /// Its semantic version.
    pub version: String,
    /// The architecture it is built for (`x86_64`, `aarch64`).
    pub arch: String,
    /// Its state.
    pub state: ReleaseState,
    /// While deploying (and as halted): the share of devices it is for.
    pub percent: u32,
    /// SHA-256 of the binary.
    pub sha256: String,
    /// Its length in bytes.
    pub length: i64,
    /// Its TUF target name (`rxvisiond-<version>-<arch>`).
    pub target: String,
    /// Why it is in its state.
    pub state_reason: String,
    /// When it was pushed, Unix ms.
    pub pushed_ms: i64,
    /// Who pushed it.
    pub pushed_by: String,
    /// When its state last changed, Unix ms.
    pub updated_ms: i64,
}

/// Why a release request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    /// The file is not a release appliances can run.
    #[error("{path}: not an rxvisiond release: {problem}")]
    NotARelease {
        /// The pushed path.
        path: String,
        /// What is wrong with it.
        problem: String,
    },
    /// It contradicts the registry or the deployment rules.
    #[error("{0}")]
    Refused(String),
    /// No such release.
    #[error("no daemon release {0} (`rxfleet releases push`)")]
    NotFound(String),
    /// Reading the file or writing the artifact failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<sqlx::Error> for ReleaseError {
    fn from(e: sqlx::Error) -> ReleaseError {
        ReleaseError::Db(DbError::Sql(e))
    }
}

fn u16_at(bytes: &[u8], at: usize) -> u64 {
    u64::from(u16::from_le_bytes([bytes[at], bytes[at + 1]]))
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(bytes[at..at + 8].try_into().expect("8 bytes"))
}

/// The architecture of a 64-bit little-endian ELF executable, checked
/// whole: its program and section header tables must lie inside `bytes`
/// (a truncated file is refused). Pure.
pub fn elf_arch(bytes: &[u8]) -> Result<&'static str, String> {
    const HEADER: usize = 64;
    if bytes.len() < HEADER || &bytes[..4] != b"\x7fELF" {
        return Err("not an ELF file".into());
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let kind = u16_at(bytes, 16);
    if kind != 2 && kind != 3 {
        return Err(format!("ELF type {kind} is not an executable"));
    }
    let arch = match u16_at(bytes, 18) {
        62 => "x86_64",
        183 => "aarch64",
        other => return Err(format!("ELF machine {other} is not one appliances run (x86_64, aarch64)")),
    };
    let len = bytes.len() as u64;
    let table_end = |offset: u64, entries: u64, size: u64| offset.checked_add(entries.checked_mul(size)?);
    let program = table_end(u64_at(bytes, 0x20), u16_at(bytes, 0x38), u16_at(bytes, 0x36));
    if u16_at(bytes, 0x38) == 0 || program.is_none_or(|end| end > len) {
        return Err(format!("its program headers do not lie inside its {len} bytes (truncated?)"));
    }
    let sections = table_end(u64_at(bytes, 0x28), u16_at(bytes, 0x3c), u16_at(bytes, 0x3a));
    if sections.is_none_or(|end| end > len) {
        return Err(format!("its section headers do not lie inside its {len} bytes (truncated?)"));
    }
    Ok(arch)
}

const COLUMNS: &str =
    "version, arch, state, percent, sha256, length, target, state_reason, pushed_ms, pushed_by, updated_ms";

fn from_row(row: &AnyRow) -> Result<DaemonRelease, ReleaseError> {
    let state: String = row.get(2);
    let version: String = row.get(0);
    Ok(DaemonRelease {
        arch: row.get(1),
        state: ReleaseState::parse(&state)
            .ok_or_else(|| ReleaseError::Refused(format!("release {version}: stored state {state:?}")))?,
        percent: u32::try_from(row.get::<i64, _>(3)).unwrap_or(0),
        sha256: row.get(4),
        length: row.get(5),
        target: row.get(6),
        state_reason: row.get(7),
        pushed_ms: row.get(8),
        pushed_by: row.get(9),
        updated_ms: row.get(10),
        version,
    })
}

fn semver(version: &str) -> Result<semver::Version, ReleaseError> {
    semver::Version::parse(version).map_err(|e| ReleaseError::Refused(format!("version {version:?}: {e}")))
}

impl Db {
    /// Checks and stores a release binary as `available` (with
    /// `production`: declared the release the fleet already runs, only
    /// while no production release of its architecture is registered).
    pub async fn push_release(
        &self,
        path: &Path,
        version: &str,
        artifacts_dir: &Path,
        production: bool,
        actor: &str,
        now_ms: i64,
    ) -> Result<DaemonRelease, ReleaseError> {
        let io = |source| ReleaseError::Io { path: path.display().to_string(), source };
        let parsed = semver(version)?;
        if !parsed.build.is_empty() {
            return Err(ReleaseError::Refused(format!(
                "version {version}: build metadata does not order versions; appliances compare versions"
            )));
        }
        let meta = std::fs::metadata(path).map_err(io)?;
        if meta.len() > MAX_RELEASE_BYTES {
            return Err(ReleaseError::NotARelease {
                path: path.display().to_string(),
                problem: format!("{} bytes, more than {MAX_RELEASE_BYTES}", meta.len()),
            });
        }
        let bytes = std::fs::read(path).map_err(io)?;
        let arch = elf_arch(&bytes)
            .map_err(|problem| ReleaseError::NotARelease { path: path.display().to_string(), problem })?;
        let sha256 = rxvision_models::bundle::sha256_hex(&bytes);
        if let Some(existing) = self.release(version, arch).await? {
            if existing.sha256 == sha256 {
                return Ok(existing);
            }
            return Err(ReleaseError::Refused(format!(
                "release {version} for {arch} is registered with other bytes (sha256 {}): a release is never replaced, push a new version",
                existing.sha256
            )));
        }
        if production {
            if let Some(current) =
                self.releases().await?.into_iter().find(|r| r.arch == arch && r.state == ReleaseState::Production)
            {
                return Err(ReleaseError::Refused(format!(
                    "{} is already the production release for {arch}: deploy new releases instead",
                    current.version
                )));
            }
        }
        // Stored before it is registered: a crash between leaves an unlisted file, never a listed missing one.
        std::fs::create_dir_all(artifacts_dir)
            .map_err(|source| ReleaseError::Io { path: artifacts_dir.display().to_string(), source })?;
        let stored = artifact_path(artifacts_dir, &sha256);
        let staged = artifacts_dir.join(format!(".push-{sha256}.release"));
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::File::create(&staged)?;
            file.write_all(&bytes)?;
            file.sync_all()?;
            std::fs::rename(&staged, &stored)?;
            std::fs::File::open(artifacts_dir)?.sync_all()
        };
        if let Err(source) = write() {
            let _ = std::fs::remove_file(&staged);
            return Err(ReleaseError::Io { path: stored.display().to_string(), source });
        }
        let (state, reason) = if production {
            (ReleaseState::Production, format!("declared the release the fleet runs by {actor}"))
        } else {
            (ReleaseState::Available, format!("pushed by {actor}"))
        };
        let mut tx = self.begin_write().await?;
        sqlx::query(&format!(
            "INSERT INTO daemon_releases ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
        ))
        .bind(version)
        .bind(arch)
        .bind(state.as_str())
        .bind(if production { 100i64 } else { 0 })
        .bind(&sha256)
        .bind(bytes.len() as i64)
        .bind(format!("{RELEASE_NAME}-{version}-{arch}"))
        .bind(&reason)
        .bind(now_ms)
        .bind(actor)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        self.release(version, arch).await?.ok_or_else(|| ReleaseError::NotFound(version.into()))
    }

    /// Every release, highest version first (then by architecture).
    pub async fn releases(&self) -> Result<Vec<DaemonRelease>, ReleaseError> {
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM daemon_releases")).fetch_all(&self.pool).await?;
        let mut releases = rows.iter().map(from_row).collect::<Result<Vec<_>, _>>()?;
        releases.sort_by_cached_key(|r| (std::cmp::Reverse(semver::Version::parse(&r.version).ok()), r.arch.clone()));
        Ok(releases)
    }

    /// One release.
    pub async fn release(&self, version: &str, arch: &str) -> Result<Option<DaemonRelease>, ReleaseError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM daemon_releases WHERE version = $1 AND arch = $2"))
            .bind(version)
            .bind(arch)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(from_row).transpose()
    }

    /// Deploys `version` (every architecture pushed) to `percent` % of the
    /// devices; at 100 % it becomes production. A stage only grows (halt a
    /// bad one), one release deploys at a time, and only above production.
    pub async fn deploy_release(
        &self,
        version: &str,
        percent: u32,
        actor: &str,
        now_ms: i64,
    ) -> Result<Vec<DaemonRelease>, ReleaseError> {
        if !(1..=100).contains(&percent) {
            return Err(ReleaseError::Refused(format!("--percent {percent} is outside 1..=100")));
        }
        let all = self.releases().await?;
        let these: Vec<&DaemonRelease> = all.iter().filter(|r| r.version == version).collect();
        let Some(first) = these.first() else { return Err(ReleaseError::NotFound(version.into())) };
        match first.state {
            ReleaseState::Available | ReleaseState::Deploying => {}
            other => {
                return Err(ReleaseError::Refused(format!(
                    "release {version} is {} ({}): push a new version instead",
                    other.as_str(),
                    first.state_reason
                )))
            }
        }
        if first.state == ReleaseState::Deploying && percent < first.percent {
            return Err(ReleaseError::Refused(format!(
                "release {version} is deployed to {} %: a stage does not shrink (devices in it would be ordered down without a rollback order); `releases halt` it instead",
                first.percent
            )));
        }
        if let Some(other) = all.iter().find(|r| r.state == ReleaseState::Deploying && r.version != version) {
            return Err(ReleaseError::Refused(format!(
                "release {} is deploying: finish it (--percent 100) or halt it first",
                other.version
            )));
        }
        let wanted = semver(version)?;
        for release in &these {
            let production = all
                .iter()
                .find(|r| r.arch == release.arch && r.state == ReleaseState::Production)
                .ok_or_else(|| {
                    ReleaseError::Refused(format!(
                        "no production release for {}: declare the one the fleet runs (`releases push FILE --version V --production`)",
                        release.arch
                    ))
                })?;
            if wanted <= semver(&production.version)? {
                return Err(ReleaseError::Refused(format!(
                    "{version} is not above production {} ({}): appliances refuse a lower version without a rollback order",
                    production.version, release.arch
                )));
            }
        }
        let mut tx = self.begin_write().await?;
        if percent == 100 {
            sqlx::query(
                "UPDATE daemon_releases SET state = $1, state_reason = $2, updated_ms = $3 \
                 WHERE state = $4 AND arch IN (SELECT arch FROM daemon_releases WHERE version = $5)",
            )
            .bind(ReleaseState::Retired.as_str())
            .bind(format!("replaced by {version} ({actor})"))
            .bind(now_ms)
            .bind(ReleaseState::Production.as_str())
            .bind(version)
            .execute(&mut *tx)
            .await?;
        }
        let (state, reason) = if percent == 100 {
            (ReleaseState::Production, format!("deployed to every device by {actor}"))
        } else {
            (ReleaseState::Deploying, format!("deployed to {percent} % of the devices by {actor}"))
        };
        sqlx::query(
            "UPDATE daemon_releases SET state = $2, percent = $3, state_reason = $4, updated_ms = $5 WHERE version = $1",
        )
        .bind(version)
        .bind(state.as_str())
        .bind(i64::from(percent))
        .bind(&reason)
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(self.releases().await?.into_iter().filter(|r| r.version == version).collect())
    }

    /// Halts a deploying release: the stage's devices are ordered back to
    /// production (a rollback order in signed metadata).
    pub async fn halt_release(
        &self,
        version: &str,
        reason: &str,
        now_ms: i64,
    ) -> Result<Vec<DaemonRelease>, ReleaseError> {
        let mut tx = self.begin_write().await?;
        let halted =
            sqlx::query("UPDATE daemon_releases SET state = $2, state_reason = $3, updated_ms = $4 WHERE version = $1 AND state = $5")
                .bind(version)
                .bind(ReleaseState::Halted.as_str())
                .bind(reason)
                .bind(now_ms)
                .bind(ReleaseState::Deploying.as_str())
                .execute(&mut *tx)
                .await?
                .rows_affected();
        tx.commit().await?;
        if halted == 0 {
            return match self.releases().await?.into_iter().find(|r| r.version == version) {
                None => Err(ReleaseError::NotFound(version.into())),
                Some(r) => Err(ReleaseError::Refused(format!(
                    "release {version} is {}, not deploying: nothing to halt",
                    r.state.as_str()
                ))),
            };
        }
        Ok(self.releases().await?.into_iter().filter(|r| r.version == version).collect())
    }

    /// The devices' vetoes against the deploying release from its stage:
    /// refused installs (`daemon_rejected` of its version) and crash-loop
    /// rollbacks (`daemon_rolled_back` from it).
    pub async fn release_vetoes(&self, version: &str, percent: u32) -> Result<(u64, u64), ReleaseError> {
        let rows = sqlx::query(
            "SELECT device_id, kind, details FROM device_events WHERE kind IN ('daemon_rejected', 'daemon_rolled_back')",
        )
        .fetch_all(&self.pool)
        .await?;
        let (mut refused, mut rolled_back) = (0, 0);
        for row in rows {
            if !crate::rollout::in_stage(&row.get::<String, _>(0), percent) {
                continue;
            }
            let details: serde_json::Value = serde_json::from_str(&row.get::<String, _>(2)).unwrap_or_default();
            match row.get::<String, _>(1).as_str() {
                "daemon_rejected" if details["version"] == version => refused += 1,
                "daemon_rolled_back" if details["from"] == version => rolled_back += 1,
                _ => {}
            }
        }
        Ok((refused, rolled_back))
    }

    /// The leader's step: a deploying release with a veto from its stage is
    /// halted. Returns the halt's reason when it halted one.
    pub async fn judge_deploying_release(&self, now_ms: i64) -> Result<Option<String>, ReleaseError> {
        let Some(release) = self.releases().await?.into_iter().find(|r| r.state == ReleaseState::Deploying) else {
            return Ok(None);
        };
        let (refused, rolled_back) = self.release_vetoes(&release.version, release.percent).await?;
        if refused == 0 && rolled_back == 0 {
            return Ok(None);
        }
        let reason = format!(
            "halted by rxfleet at {} %: {refused} device(s) of the stage refused it, {rolled_back} went back after a crash loop",
            release.percent
        );
        self.halt_release(&release.version, &reason, now_ms).await?;
        Ok(Some(reason))
    }

    /// The daemon targets the TUF repository should list: each
    /// architecture's production release for every device (an explicit
    /// rollback order while the last deployment is halted), and the
    /// deploying release for its stage.
    pub async fn wanted_release_targets(&self) -> Result<Vec<WantedTarget>, ReleaseError> {
        let releases = self.releases().await?;
        let last = releases
            .iter()
            .filter(|r| matches!(r.state, ReleaseState::Deploying | ReleaseState::Production | ReleaseState::Halted))
            .max_by_key(|r| r.updated_ms);
        let rollback = last.is_some_and(|r| r.state == ReleaseState::Halted);
        let mut wanted = Vec::new();
        for release in &releases {
            let cohort_below = match release.state {
                ReleaseState::Production => COHORT_BUCKETS,
                ReleaseState::Deploying => release.percent.min(100) * (COHORT_BUCKETS / 100),
                _ => continue,
            };
            let info = TargetInfo {
                kind: TargetKind::Daemon,
                name: release_name(&release.arch),
                version: release.version.clone(),
                cohort_below,
                rollback: rollback && release.state == ReleaseState::Production,
            };
            let target = WantedTarget::from_stored(&release.target, &release.sha256, release.length as u64, &info)
                .ok_or_else(|| {
                    ReleaseError::Refused(format!("release {}: stored SHA-256 is not hex", release.version))
                })?;
            wanted.push(target);
        }
        Ok(wanted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_test_binary_is_a_release_for_this_machine_and_truncations_are_not() {
        let bytes = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(elf_arch(&bytes).unwrap(), std::env::consts::ARCH);
        let err = elf_arch(&bytes[..bytes.len() / 2]).unwrap_err();
        assert!(err.contains("truncated"), "{err}");
        assert_eq!(elf_arch(b"#!/bin/sh\necho 0.9.0\n").unwrap_err(), "not an ELF file");
        let mut other = bytes.clone();
        other[18] = 40; // ARM (32-bit)
        assert!(elf_arch(&other).unwrap_err().contains("ELF machine 40"));
        let mut library = bytes;
        library[16] = 1; // relocatable object
        assert!(elf_arch(&library).unwrap_err().contains("not an executable"));
    }
}
