//! The model registry: bundles pushed by admins (or the retraining job),
//! checked, stored by content hash, and moved through their lifecycle.
//!
//! A push verifies exactly the bytes it stores: a directory is packed into a
//! `.tar.gz` first, an archive is copied, and then the copy is loaded with
//! the appliances' own loader (structure, hashes, manifest ↔ graph) and
//! scanned ([`rxvision_models::scan`]: external data, custom or unknown
//! operators, sub-graphs, absurd sizes). Only then is it renamed to
//! `<artifacts_dir>/<sha256>` and registered. A refused bundle leaves
//! nothing behind.
//!
//! States ([`ModelState`]): `candidate` (pushed) → `validated` (gates
//! passed) or `rejected` (gates failed, with the stored reason) →
//! `rolling_out` → `production` (rollout completed; the former production
//! becomes `retired` and the `previous` alias) or `halted` (its rollout
//! halted or was aborted). Aliases: `production`, `previous`.
//!
//! A fleet serves one model family: a push under another name is refused.
//! What the TUF repository lists follows from the registry and the active
//! rollout ([`Db::wanted_targets`]).

use std::io::Write;
use std::path::{Path, PathBuf};

use rxvision_models::bundle::{self, Bundle};
use rxvision_models::scan::{self, ScanReport};
use rxvision_protocol::updates::{TargetInfo, TargetKind, COHORT_BUCKETS};
use sqlx::any::AnyRow;
use sqlx::Row;

use crate::db::{Db, DbError};
use crate::rollout::stage::{Plan, State};
use crate::rollout::store::{Rollout, RolloutError};
use crate::updates::repo::WantedTarget;

/// The alias of the version every device runs outside a rollout.
pub const PRODUCTION: &str = "production";
/// The alias of the version production replaced.
pub const PREVIOUS: &str = "previous";

/// Largest archive accepted (the loader's limits apply to what is inside).
const MAX_ARCHIVE_BYTES: u64 = bundle::MAX_TOTAL_BYTES;

/// Where a model version is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ModelState {
    /// Pushed; gates not yet run.
    Candidate,
    /// The gates passed: it may be rolled out.
    Validated,
    /// The gates failed (the reason is stored): it cannot be rolled out.
    Rejected,
    /// A rollout is taking it to the fleet.
    RollingOut,
    /// What the fleet runs.
    Production,
    /// Its rollout halted or was aborted.
    Halted,
    /// Replaced by a newer production version.
    Retired,
}

impl ModelState {
    /// Its name as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelState::Candidate => "candidate",
            ModelState::Validated => "validated",
            ModelState::Rejected => "rejected",
            ModelState::RollingOut => "rolling_out",
            ModelState::Production => "production",
            ModelState::Halted => "halted",
            ModelState::Retired => "retired",
        }
    }

    fn parse(s: &str) -> Option<ModelState> {
        serde_json::from_value(serde_json::Value::String(s.into())).ok()
    }
}

/// Why a registry request was refused.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The bundle is not a valid bundle.
    #[error("{path}: not a valid model bundle: {problem}")]
    Bundle {
        /// The pushed path.
        path: String,
        /// The loader's words.
        problem: String,
    },
    /// The security scan found something.
    #[error("{path}: refused by the model security scan:\n  {}", .findings.join("\n  "))]
    Scan {
        /// The pushed path.
        path: String,
        /// Every finding.
        findings: Vec<String>,
    },
    /// It contradicts the registry (a version with other content, another family …).
    #[error("{0}")]
    Conflict(String),
    /// No such version.
    #[error("no model version {0} in the registry")]
    NotFound(String),
    /// Reading the bundle or writing the artifact failed.
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

impl From<sqlx::Error> for ModelError {
    fn from(e: sqlx::Error) -> ModelError {
        ModelError::Db(DbError::Sql(e))
    }
}

/// A model version as registered.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct ModelVersion {
    /// Its semantic version (the registry's key).
    pub version: String,
    /// The model family.
    pub name: String,
    /// Where it is in its lifecycle.
    pub state: ModelState,
    /// Why it is in that state (who pushed it, the failed gate …).
    pub state_reason: String,
    /// The aliases naming it (`production`, `previous`).
    pub aliases: Vec<String>,
    /// SHA-256 of the stored `.tar.gz`.
    pub sha256: String,
    /// Its size in bytes.
    pub length: i64,
    /// Its TUF target name.
    pub target: String,
    /// The bundle's manifest.
    #[schema(value_type = Object)]
    pub manifest: serde_json::Value,
    /// What the security scan found (ops, nodes, parameters, opset).
    #[schema(value_type = Object)]
    pub scan: ScanReport,
    /// The validation gates' report, once run (`gates::GateReport`).
    #[schema(value_type = Option<Object>)]
    pub gate_report: Option<serde_json::Value>,
    /// When and by whom it was pushed.
    pub pushed_ms: i64,
    /// See `pushed_ms`.
    pub pushed_by: String,
    /// Its last change, Unix ms.
    pub updated_ms: i64,
}

/// What a push did.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "outcome", content = "model", rename_all = "snake_case")]
pub enum Pushed {
    /// Newly registered.
    Stored(ModelVersion),
    /// The same bytes were already registered under this version.
    AlreadyStored(ModelVersion),
}

/// Where an artifact is stored.
pub fn artifact_path(artifacts_dir: &Path, sha256: &str) -> PathBuf {
    artifacts_dir.join(sha256)
}

/// A bundle directory as a `.tar.gz` (files at the root, sorted, no
/// owners or times, so the same directory always packs to the same bytes).
/// Links and special files are packed as what they are and refused by the
/// loader afterwards.
pub fn pack_dir(dir: &Path) -> std::io::Result<Vec<u8>> {
    let mut paths = Vec::new();
    let mut stack = vec![PathBuf::new()];
    while let Some(relative) = stack.pop() {
        for entry in std::fs::read_dir(dir.join(&relative))? {
            let entry = entry?;
            let name = relative.join(entry.file_name());
            if entry.file_type()?.is_dir() {
                stack.push(name.clone());
            }
            paths.push(name);
        }
    }
    paths.sort();
    let encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    let mut archive = tar::Builder::new(encoder);
    archive.mode(tar::HeaderMode::Deterministic);
    archive.follow_symlinks(false);
    for path in &paths {
        archive.append_path_with_name(dir.join(path), path)?;
    }
    archive.into_inner()?.finish()
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |source| ModelError::Io { path: path.display().to_string(), source }
}

/// Writes `bytes` to `dir/<tmp>` durably; returns the path.
fn write_staged(dir: &Path, bytes: &[u8]) -> Result<PathBuf, ModelError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut nonce = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut nonce).expect("system RNG");
    let path = dir.join(format!(".push-{}.tar.gz", nonce.iter().map(|b| format!("{b:02x}")).collect::<String>()));
    let mut file = std::fs::File::create(&path).map_err(io(&path))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(io(&path))?;
    Ok(path)
}

const COLUMNS: &str = "version, name, state, sha256, length, target, manifest, scan, gate_report, state_reason, \
                       pushed_ms, pushed_by, updated_ms";

fn from_row(row: &AnyRow, aliases: &[(String, String)]) -> Result<ModelVersion, ModelError> {
    let version: String = row.get(0);
    let corrupt = |what: &str, e: String| ModelError::Conflict(format!("model {version}: stored {what}: {e}"));
    let state: String = row.get(2);
    Ok(ModelVersion {
        aliases: aliases.iter().filter(|(_, v)| *v == version).map(|(a, _)| a.clone()).collect(),
        name: row.get(1),
        state: ModelState::parse(&state).ok_or_else(|| corrupt("state", state.clone()))?,
        sha256: row.get(3),
        length: row.get(4),
        target: row.get(5),
        manifest: serde_json::from_str(&row.get::<String, _>(6)).map_err(|e| corrupt("manifest", e.to_string()))?,
        scan: serde_json::from_str(&row.get::<String, _>(7)).map_err(|e| corrupt("scan", e.to_string()))?,
        gate_report: row
            .get::<Option<String>, _>(8)
            .map(|g| serde_json::from_str(&g))
            .transpose()
            .map_err(|e| corrupt("gate report", e.to_string()))?,
        state_reason: row.get(9),
        pushed_ms: row.get(10),
        pushed_by: row.get(11),
        updated_ms: row.get(12),
        version,
    })
}

impl Db {
    /// Checks and stores a bundle (directory or `.tar.gz`) as a
    /// `candidate`. With `production`, it is declared the version the fleet
    /// already runs (only while the registry has no production version: the
    /// bundle appliances shipped with).
    pub async fn push_model(
        &self,
        path: &Path,
        artifacts_dir: &Path,
        production: bool,
        actor: &str,
        now_ms: i64,
    ) -> Result<Pushed, ModelError> {
        let meta = std::fs::metadata(path).map_err(io(path))?;
        let bytes = if meta.is_dir() {
            pack_dir(path).map_err(io(path))?
        } else if meta.len() > MAX_ARCHIVE_BYTES {
            return Err(ModelError::Bundle {
                path: path.display().to_string(),
                problem: format!("{} bytes, more than {MAX_ARCHIVE_BYTES}", meta.len()),
            });
        } else {
            std::fs::read(path).map_err(io(path))?
        };
        let staged = write_staged(artifacts_dir, &bytes)?;
        let checked = Bundle::load(&staged)
            .map_err(|e| ModelError::Bundle { path: path.display().to_string(), problem: e.to_string() })
            .and_then(|b| {
                let report = scan::scan(&b)
                    .map_err(|findings| ModelError::Scan { path: path.display().to_string(), findings })?;
                Ok((b, report))
            });
        let (loaded, report) = match checked {
            Ok(ok) => ok,
            Err(e) => {
                let _ = std::fs::remove_file(&staged);
                return Err(e);
            }
        };
        let sha256 = bundle::sha256_hex(&bytes);
        let stored = artifact_path(artifacts_dir, &sha256);
        let renamed = std::fs::rename(&staged, &stored).map_err(io(&stored));
        if let Err(e) = renamed {
            let _ = std::fs::remove_file(&staged);
            return Err(e);
        }
        if let Ok(dir) = std::fs::File::open(artifacts_dir) {
            let _ = dir.sync_all();
        }
        let manifest = &loaded.manifest;
        let version = manifest.version.to_string();
        let target = format!("{}-{version}.tar.gz", manifest.name);

        let mut tx = self.begin_write().await?;
        if let Some(row) = sqlx::query("SELECT sha256 FROM model_versions WHERE version = $1")
            .bind(&version)
            .fetch_optional(&mut *tx)
            .await?
        {
            let existing: String = row.get(0);
            drop(tx);
            if existing == sha256 {
                let model = self.model(&version).await?.ok_or_else(|| ModelError::NotFound(version.clone()))?;
                return Ok(Pushed::AlreadyStored(model));
            }
            return Err(ModelError::Conflict(format!(
                "version {version} is already registered with other content (SHA-256 {existing}): \
                 give the new bundle a new version"
            )));
        }
        if let Some(row) = sqlx::query("SELECT name FROM model_versions WHERE name <> $1 LIMIT 1")
            .bind(&manifest.name)
            .fetch_optional(&mut *tx)
            .await?
        {
            return Err(ModelError::Conflict(format!(
                "this fleet serves the model family {:?}; {} is a {:?}",
                row.get::<String, _>(0),
                loaded,
                manifest.name
            )));
        }
        let has_production = sqlx::query("SELECT version FROM model_aliases WHERE alias = $1")
            .bind(PRODUCTION)
            .fetch_optional(&mut *tx)
            .await?;
        if production && has_production.is_some() {
            return Err(ModelError::Conflict(format!(
                "the fleet already has a production version ({}): a new one gets there by a rollout",
                has_production.map(|r| r.get::<String, _>(0)).unwrap_or_default()
            )));
        }
        let (state, reason) = if production {
            (ModelState::Production, format!("declared the version the fleet runs by {actor}"))
        } else {
            (ModelState::Candidate, format!("pushed by {actor}"))
        };
        sqlx::query(&format!(
            "INSERT INTO model_versions ({COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, NULL, $9, $10, $11, $10)"
        ))
        .bind(&version)
        .bind(&manifest.name)
        .bind(state.as_str())
        .bind(&sha256)
        .bind(bytes.len() as i64)
        .bind(&target)
        .bind(serde_json::to_string(manifest).expect("manifest serialises"))
        .bind(serde_json::to_string(&report).expect("report serialises"))
        .bind(&reason)
        .bind(now_ms)
        .bind(actor)
        .execute(&mut *tx)
        .await?;
        if production {
            set_alias(&mut tx, PRODUCTION, &version, now_ms).await?;
        }
        let details = serde_json::json!({
            "version": version, "name": manifest.name, "sha256": sha256, "state": state.as_str(),
            "ops": report.ops, "parameters": report.parameters,
        });
        crate::devices::record_change(&mut tx, now_ms, actor, "model_pushed", None, details).await?;
        tx.commit().await?;
        let model = self.model(&version).await?.ok_or_else(|| ModelError::NotFound(version.clone()))?;
        Ok(Pushed::Stored(model))
    }

    async fn aliases(&self) -> Result<Vec<(String, String)>, ModelError> {
        let rows = sqlx::query("SELECT alias, version FROM model_aliases ORDER BY alias").fetch_all(&self.pool).await?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
    }

    /// Every registered version, newest push first.
    pub async fn models(&self) -> Result<Vec<ModelVersion>, ModelError> {
        let aliases = self.aliases().await?;
        let rows = sqlx::query(&format!("SELECT {COLUMNS} FROM model_versions ORDER BY pushed_ms DESC, version DESC"))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(|r| from_row(r, &aliases)).collect()
    }

    /// One version, by version or alias.
    pub async fn model(&self, version_or_alias: &str) -> Result<Option<ModelVersion>, ModelError> {
        let aliases = self.aliases().await?;
        let version =
            aliases.iter().find(|(a, _)| a == version_or_alias).map(|(_, v)| v.as_str()).unwrap_or(version_or_alias);
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM model_versions WHERE version = $1"))
            .bind(version)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(|r| from_row(r, &aliases)).transpose()
    }

    /// Whether `file` (`<sha256>.<target>`, as TUF clients fetch targets
    /// with consistent snapshots) is a registered artifact (a model bundle
    /// or a daemon release); its SHA-256.
    pub async fn artifact_for(&self, file: &str) -> Result<Option<String>, ModelError> {
        let Some((sha256, target)) = file.split_once('.') else { return Ok(None) };
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Ok(None);
        }
        let row = sqlx::query(
            "SELECT sha256 FROM model_versions WHERE sha256 = $1 AND target = $2 \
             UNION ALL SELECT sha256 FROM daemon_releases WHERE sha256 = $1 AND target = $2",
        )
        .bind(sha256.to_ascii_lowercase())
        .bind(target)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| r.get(0)))
    }

    /// The targets the TUF repository should list now: the production model
    /// for every device (an explicit rollback order when the last rollout
    /// halted or was aborted), and the candidate of the active rollout for
    /// its stage's devices.
    pub async fn wanted_targets(&self) -> Result<Vec<WantedTarget>, ModelError> {
        let mut wanted = Vec::new();
        let last = sqlx::query("SELECT model_version, plan, state, active FROM rollouts ORDER BY id DESC LIMIT 1")
            .fetch_optional(&self.pool)
            .await?;
        let mut rollback = false;
        let mut candidate = None;
        if let Some(row) = last {
            let parse = |i: usize| serde_json::from_str::<serde_json::Value>(&row.get::<String, _>(i));
            let plan: Option<Plan> = parse(1).ok().and_then(|v| serde_json::from_value(v).ok());
            let state: Option<State> = parse(2).ok().and_then(|v| serde_json::from_value(v).ok());
            match (plan, state) {
                (Some(plan), Some(state)) => {
                    rollback = matches!(state, State::Halted { .. } | State::Aborted { .. });
                    if row.get::<i64, _>(3) == 1 {
                        candidate = Some((row.get::<String, _>(0), state.percent(&plan)));
                    }
                }
                _ => {
                    return Err(ModelError::Conflict("the latest rollout's stored plan or state does not parse".into()))
                }
            }
        }
        if let Some(production) = self.model(PRODUCTION).await? {
            wanted.push(target(&production, COHORT_BUCKETS, rollback)?);
        }
        if let Some((version, percent)) = candidate {
            let model = self.model(&version).await?.ok_or(ModelError::NotFound(version))?;
            if percent > 0 {
                wanted.push(target(&model, percent.min(100) * (COHORT_BUCKETS / 100), false)?);
            }
        }
        Ok(wanted)
    }
}

impl Db {
    /// Starts rolling a registered version out in place of production. The
    /// version must have passed its gates (`validated`), be meant for the
    /// counter (not a test fixture) and be above production: appliances
    /// refuse a lower version unless ordered back.
    pub async fn start_model_rollout(
        &self,
        version: &str,
        plan: &Plan,
        actor: &str,
        now_ms: i64,
    ) -> Result<Rollout, RolloutError> {
        let invalid = |why: String| RolloutError::Invalid(why);
        let model =
            self.model(version).await.map_err(|e| invalid(e.to_string()))?.ok_or_else(|| {
                invalid(format!("no model version {version} in the registry (`rxfleet models push`)"))
            })?;
        if model.state != ModelState::Validated {
            return Err(invalid(format!(
                "{} is {} ({}): only a validated version (its gates passed) can be rolled out",
                model.version,
                model.state.as_str(),
                model.state_reason
            )));
        }
        if model.manifest["purpose"] != "production" {
            return Err(invalid(format!(
                "{} is a {} bundle, not one for the counter",
                model.version, model.manifest["purpose"]
            )));
        }
        let production = self.model(PRODUCTION).await.map_err(|e| invalid(e.to_string()))?.ok_or_else(|| {
            invalid(
                "the registry has no production version: declare the one the fleet runs (`models push --production`)"
                    .into(),
            )
        })?;
        let parse = |v: &str| semver::Version::parse(v).map_err(|e| invalid(format!("version {v}: {e}")));
        if parse(&model.version)? <= parse(&production.version)? {
            return Err(invalid(format!(
                "{} is not above production {}: appliances refuse a lower version without a rollback order",
                model.version, production.version
            )));
        }
        self.start_rollout(&model.version, &production.version, plan, actor, now_ms).await
    }
}

fn target(model: &ModelVersion, cohort_below: u32, rollback: bool) -> Result<WantedTarget, ModelError> {
    let info = TargetInfo {
        kind: TargetKind::Model,
        name: model.name.clone(),
        version: model.version.clone(),
        cohort_below,
        rollback,
    };
    WantedTarget::from_stored(&model.target, &model.sha256, model.length as u64, &info).ok_or_else(|| {
        ModelError::Conflict(format!("model {}: stored SHA-256 {:?} is not hex", model.version, model.sha256))
    })
}

/// Moves a registered version to `state` (nothing when it is not registered).
pub(crate) async fn set_state(
    tx: &mut crate::db::Tx<'_>,
    version: &str,
    state: ModelState,
    reason: &str,
    now_ms: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE model_versions SET state = $2, state_reason = $3, updated_ms = $4 WHERE version = $1")
        .bind(version)
        .bind(state.as_str())
        .bind(reason)
        .bind(now_ms)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// A completed rollout: `version` becomes production, the former
/// production `previous` and retired.
pub(crate) async fn promote(
    tx: &mut crate::db::Tx<'_>,
    version: &str,
    rollout: i64,
    now_ms: i64,
) -> Result<(), sqlx::Error> {
    let former = sqlx::query("SELECT version FROM model_aliases WHERE alias = $1")
        .bind(PRODUCTION)
        .fetch_optional(&mut **tx)
        .await?
        .map(|r| r.get::<String, _>(0));
    if let Some(former) = former.filter(|f| f != version) {
        set_state(tx, &former, ModelState::Retired, &format!("replaced by {version} (rollout {rollout})"), now_ms)
            .await?;
        set_alias(tx, PREVIOUS, &former, now_ms).await?;
    }
    set_state(tx, version, ModelState::Production, &format!("rollout {rollout} completed"), now_ms).await?;
    set_alias(tx, PRODUCTION, version, now_ms).await
}

async fn set_alias(tx: &mut crate::db::Tx<'_>, alias: &str, version: &str, now_ms: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO model_aliases (alias, version, updated_ms) VALUES ($1, $2, $3) \
         ON CONFLICT (alias) DO UPDATE SET version = excluded.version, updated_ms = excluded.updated_ms",
    )
    .bind(alias)
    .bind(version)
    .bind(now_ms)
    .execute(&mut **tx)
    .await?;
    Ok(())
}
