//! The fleet's TUF repository: signed metadata kept in the database (so any
//! replica serves it), signed by the leader with the online keys, and the
//! root's lifecycle (creation and rotation) from the offline root keys.
//!
//! Metadata files are stored under the names clients fetch with consistent
//! snapshots: `N.root.json`, `N.targets.json`, `N.snapshot.json`, and
//! `timestamp.json` (latest only). [`plan`] decides, without I/O, what must
//! be signed anew: targets when the wanted targets differ from the signed
//! ones, a role when half its lifetime has passed or its key was rotated out
//! of the root, and everything above a changed role. [`Db::publish`] signs
//! and stores what the plan says in one transaction.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU64;
use std::path::Path;
use std::time::Duration;

use sqlx::Row;
use tough::editor::signed::SignedRole;
use tough::schema::decoded::{Decoded, Hex};
use tough::schema::{
    Hashes, KeyHolder, Metafile, Role, RoleKeys, RoleType, Root, Signed, Snapshot, Target, Targets, Timestamp,
};
use tough::TargetName;

use super::keys::{self, KeyError, OnlineKeys, SigningKey};
use crate::db::{Db, DbError};

/// The TUF specification version written into every role.
const SPEC_VERSION: &str = "1.0.0";

/// Why the repository could not be changed.
#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    /// A key could not be made or read.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// tough refused to sign or parse.
    #[error("TUF {what}: {source}")]
    Tuf {
        /// What was being done.
        what: String,
        /// tough's error.
        source: tough::error::Error,
    },
    /// Not possible in the repository's state (no root yet, already one …).
    #[error("{0}")]
    State(String),
    /// Stored metadata does not parse.
    #[error("stored {name}: {problem}")]
    Corrupt {
        /// The file.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// A file could not be written.
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

impl From<sqlx::Error> for RepoError {
    fn from(e: sqlx::Error) -> RepoError {
        RepoError::Db(DbError::Sql(e))
    }
}

fn tuf(what: impl Into<String>) -> impl FnOnce(tough::error::Error) -> RepoError {
    let what = what.into();
    move |source| RepoError::Tuf { what, source }
}

/// How long each role's metadata is valid. The leader signs a role anew
/// when half of its lifetime has passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// targets.json.
    pub targets: Duration,
    /// snapshot.json.
    pub snapshot: Duration,
    /// timestamp.json: how long a client can be held on old metadata (freeze attack).
    pub timestamp: Duration,
}

impl Default for Lifetimes {
    fn default() -> Lifetimes {
        Lifetimes {
            targets: Duration::from_secs(30 * 86_400),
            snapshot: Duration::from_secs(7 * 86_400),
            timestamp: Duration::from_secs(86_400),
        }
    }
}

/// A target the repository should list: its name, bytes' hash and length,
/// and `custom` fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WantedTarget {
    /// The target's name (`pillnet-0.5.0.tar.gz`).
    pub name: String,
    /// SHA-256 of its bytes.
    pub sha256: [u8; 32],
    /// Its length.
    pub length: u64,
    /// Its `custom` object (cohort bound, rollback order).
    pub custom: HashMap<String, serde_json::Value>,
}

impl WantedTarget {
    /// The target `name` of `length` bytes whose SHA-256 the database keeps
    /// as hex, carrying `info`; `None` when the stored hash is not 64 hex digits.
    pub fn from_stored(
        name: &str,
        sha256_hex: &str,
        length: u64,
        info: &rxvision_protocol::updates::TargetInfo,
    ) -> Option<WantedTarget> {
        let mut sha256 = [0u8; 32];
        if sha256_hex.len() != 64 {
            return None;
        }
        for (i, byte) in sha256.iter_mut().enumerate() {
            *byte = u8::from_str_radix(sha256_hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(WantedTarget { name: name.to_string(), sha256, length, custom: info.to_custom() })
    }

    fn target(&self) -> Target {
        Target {
            length: self.length,
            hashes: Hashes { sha256: Decoded::from(self.sha256.to_vec()), _extra: HashMap::new() },
            custom: self.custom.clone(),
            _extra: HashMap::new(),
        }
    }
}

/// The signed metadata as stored now.
#[derive(Debug, Clone)]
pub struct Current {
    /// The newest root.
    pub root: Signed<Root>,
    /// The newest targets, snapshot and timestamp, with their bytes.
    pub targets: Option<Stored<Targets>>,
    /// See `targets`.
    pub snapshot: Option<Stored<Snapshot>>,
    /// See `targets`.
    pub timestamp: Option<Stored<Timestamp>>,
}

/// A role's metadata with the exact bytes served.
#[derive(Debug, Clone)]
pub struct Stored<T> {
    /// The parsed metadata.
    pub signed: Signed<T>,
    /// Its bytes' length and SHA-256.
    pub length: u64,
    /// See `length`.
    pub sha256: Vec<u8>,
}

/// What must be signed anew.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Plan {
    /// targets.json.
    pub targets: bool,
    /// snapshot.json.
    pub snapshot: bool,
    /// timestamp.json.
    pub timestamp: bool,
}

impl Plan {
    /// Whether anything needs signing.
    pub fn any(&self) -> bool {
        self.targets || self.snapshot || self.timestamp
    }
}

fn expires_within(expires: jiff::Timestamp, now_ms: i64, window: Duration) -> bool {
    expires.as_millisecond() - now_ms < window.as_millis() as i64
}

fn signed_by_current_key<T>(signed: &Signed<T>, root: &Root, role: RoleType) -> bool {
    let Some(keys) = root.roles.get(&role) else { return false };
    let valid = signed.signatures.iter().filter(|s| keys.keyids.contains(&s.keyid)).count() as u64;
    valid >= keys.threshold.get()
}

/// What must be signed so that the repository lists `wanted`, is fresh
/// beyond half of each lifetime, and is signed with the root's current keys.
pub fn plan(current: &Current, wanted: &[WantedTarget], lifetimes: &Lifetimes, now_ms: i64) -> Plan {
    let root = &current.root.signed;
    let targets = match &current.targets {
        None => true,
        Some(t) => {
            let want: HashMap<TargetName, Target> =
                wanted.iter().filter_map(|w| Some((TargetName::new(&w.name).ok()?, w.target()))).collect();
            t.signed.signed.targets != want
                || expires_within(t.signed.signed.expires, now_ms, lifetimes.targets / 2)
                || !signed_by_current_key(&t.signed, root, RoleType::Targets)
        }
    };
    let snapshot = targets
        || match &current.snapshot {
            None => true,
            Some(s) => {
                expires_within(s.signed.signed.expires, now_ms, lifetimes.snapshot / 2)
                    || !signed_by_current_key(&s.signed, root, RoleType::Snapshot)
            }
        };
    let timestamp = snapshot
        || match &current.timestamp {
            None => true,
            Some(t) => {
                expires_within(t.signed.signed.expires, now_ms, lifetimes.timestamp / 2)
                    || !signed_by_current_key(&t.signed, root, RoleType::Timestamp)
            }
        };
    Plan { targets, snapshot, timestamp }
}

fn expiry(now_ms: i64, lifetime: Duration) -> jiff::Timestamp {
    // Whole seconds: some clients parse `expires` without fractions.
    let seconds = (now_ms + lifetime.as_millis() as i64) / 1000;
    jiff::Timestamp::from_second(seconds).expect("an expiry within jiff's range")
}

/// How snapshot.json names targets.json, and timestamp.json snapshot.json:
/// version, length and SHA-256 of the exact bytes served.
fn metafile(version: NonZeroU64, length: u64, sha256: Vec<u8>) -> Metafile {
    Metafile {
        length: Some(length),
        hashes: Some(Hashes { sha256: Decoded::from(sha256), _extra: HashMap::new() }),
        version,
        _extra: HashMap::new(),
    }
}

fn next_version(previous: Option<NonZeroU64>) -> NonZeroU64 {
    previous.map_or(NonZeroU64::MIN, |v| v.checked_add(1).expect("metadata version below u64::MAX"))
}

/// One metadata file to store.
struct MetadataFile {
    name: String,
    role: &'static str,
    version: u64,
    expires_ms: i64,
    body: String,
}

fn metadata_file<T: Role>(
    signed: &SignedRole<T>,
    role: &'static str,
    name: String,
    version: u64,
    expires: jiff::Timestamp,
) -> MetadataFile {
    MetadataFile {
        name,
        role,
        version,
        expires_ms: expires.as_millisecond(),
        body: String::from_utf8(signed.buffer().clone()).expect("tough writes UTF-8 JSON"),
    }
}

fn parse_stored<T: serde::de::DeserializeOwned>(name: &str, body: &str) -> Result<Stored<T>, RepoError> {
    let signed =
        serde_json::from_str(body).map_err(|e| RepoError::Corrupt { name: name.into(), problem: e.to_string() })?;
    Ok(Stored {
        signed,
        length: body.len() as u64,
        sha256: ring::digest::digest(&ring::digest::SHA256, body.as_bytes()).as_ref().to_vec(),
    })
}

/// A new root: the given root keys (with their threshold) and online keys.
fn root_role(
    version: NonZeroU64,
    expires: jiff::Timestamp,
    root_keys: &[&SigningKey],
    threshold: NonZeroU64,
    online: &OnlineKeys,
) -> Root {
    let mut root = Root {
        spec_version: SPEC_VERSION.into(),
        consistent_snapshot: true,
        version,
        expires,
        keys: HashMap::new(),
        roles: HashMap::new(),
        _extra: HashMap::new(),
    };
    let mut add = |role: RoleType, keys: &[&SigningKey], threshold: NonZeroU64| {
        for key in keys {
            root.keys.insert(key.id().clone(), key.public().clone());
        }
        root.roles.insert(
            role,
            RoleKeys { keyids: keys.iter().map(|k| k.id().clone()).collect(), threshold, _extra: HashMap::new() },
        );
    };
    add(RoleType::Root, root_keys, threshold);
    add(RoleType::Targets, &[&online.targets], NonZeroU64::MIN);
    add(RoleType::Snapshot, &[&online.snapshot], NonZeroU64::MIN);
    add(RoleType::Timestamp, &[&online.timestamp], NonZeroU64::MIN);
    root
}

/// Signs a root with `keys` (all of them that the root itself lists) and
/// with `previous_keys` under the previous root (a rotation must satisfy both).
async fn sign_root(
    root: Root,
    keys: &[&SigningKey],
    previous: Option<(&Root, &[&SigningKey])>,
) -> Result<SignedRole<Root>, RepoError> {
    let rng = aws_lc_rs::rand::SystemRandom::new();
    let sources: Vec<_> = keys.iter().map(|k| k.source()).collect();
    let signed = SignedRole::new(root.clone(), &KeyHolder::Root(root.clone()), &sources, &rng)
        .await
        .map_err(tuf("signing root"))?;
    let Some((previous_root, previous_keys)) = previous else { return Ok(signed) };
    let sources: Vec<_> = previous_keys.iter().map(|k| k.source()).collect();
    let by_previous = SignedRole::new(root, &KeyHolder::Root(previous_root.clone()), &sources, &rng)
        .await
        .map_err(tuf("signing root"))?;
    let already: Vec<_> = signed.signed().signatures.iter().map(|s| s.keyid.clone()).collect();
    let extra = by_previous.signed().signatures.iter().filter(|s| !already.contains(&s.keyid)).cloned().collect();
    signed.add_old_signatures(extra).map_err(tuf("signing root"))
}

fn write_root_json(dir: &Path, body: &str) -> Result<(), RepoError> {
    let path = dir.join("root.json");
    let staged = dir.join("root.json.new");
    std::fs::write(&staged, body)
        .and_then(|()| std::fs::rename(&staged, &path))
        .map_err(|source| RepoError::Io { path: path.display().to_string(), source })
}

/// What `keys init` made.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RootSummary {
    /// The root's version.
    pub version: u64,
    /// The root keys' ids.
    pub root_key_ids: Vec<String>,
    /// How many root keys must sign a new root.
    pub threshold: u64,
    /// When the root expires, Unix ms (a new root must be signed before).
    pub expires_ms: i64,
    /// The `root.json` to pin on appliances and clients.
    pub root_json: String,
}

impl Db {
    /// The stored metadata file `name`, as served.
    pub async fn tuf_file(&self, name: &str) -> Result<Option<String>, DbError> {
        let name = if name == "root.json" {
            // The newest root, unversioned, for people; clients walk N.root.json.
            match sqlx::query("SELECT body FROM tuf_metadata WHERE role = 'root' ORDER BY version DESC LIMIT 1")
                .fetch_optional(&self.pool)
                .await?
            {
                Some(row) => return Ok(Some(row.get(0))),
                None => return Ok(None),
            }
        } else {
            name
        };
        Ok(sqlx::query("SELECT body FROM tuf_metadata WHERE name = $1")
            .bind(name)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| r.get(0)))
    }

    async fn latest_body(&self, role: &str) -> Result<Option<(String, String)>, RepoError> {
        Ok(sqlx::query("SELECT name, body FROM tuf_metadata WHERE role = $1 ORDER BY version DESC LIMIT 1")
            .bind(role)
            .fetch_optional(&self.pool)
            .await?
            .map(|r| (r.get(0), r.get(1))))
    }

    /// The newest metadata of every role; `None` before `keys init`.
    pub async fn tuf_current(&self) -> Result<Option<Current>, RepoError> {
        let Some((name, body)) = self.latest_body("root").await? else { return Ok(None) };
        let root: Stored<Root> = parse_stored(&name, &body)?;
        let targets = match self.latest_body("targets").await? {
            Some((name, body)) => Some(parse_stored(&name, &body)?),
            None => None,
        };
        let snapshot = match self.latest_body("snapshot").await? {
            Some((name, body)) => Some(parse_stored(&name, &body)?),
            None => None,
        };
        let timestamp = match self.latest_body("timestamp").await? {
            Some((name, body)) => Some(parse_stored(&name, &body)?),
            None => None,
        };
        Ok(Some(Current { root: root.signed, targets, snapshot, timestamp }))
    }

    async fn store_metadata(&self, files: &[MetadataFile], now_ms: i64) -> Result<(), RepoError> {
        let mut tx = self.begin_write().await?;
        for file in files {
            // Versioned names are never replaced: a second writer's
            // transaction fails here and changes nothing. timestamp.json is
            // replaced, and only by a higher version.
            let sql = if file.role == "timestamp" {
                "INSERT INTO tuf_metadata (name, role, version, expires_ms, body, created_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6) \
                 ON CONFLICT (name) DO UPDATE SET version = excluded.version, expires_ms = excluded.expires_ms, \
                 body = excluded.body, created_ms = excluded.created_ms \
                 WHERE tuf_metadata.version < excluded.version"
            } else {
                "INSERT INTO tuf_metadata (name, role, version, expires_ms, body, created_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6)"
            };
            let done = sqlx::query(sql)
                .bind(&file.name)
                .bind(file.role)
                .bind(file.version as i64)
                .bind(file.expires_ms)
                .bind(&file.body)
                .bind(now_ms)
                .execute(&mut *tx)
                .await?;
            if done.rows_affected() == 0 {
                return Err(RepoError::State(format!("{} was signed by another writer first", file.name)));
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// Creates the repository: `root_keys` root keys (any `threshold` of them
    /// sign a new root) and `root.json` in `root_dir`, the online keys in
    /// `keys_dir`, and the first root in the database. Refused when the
    /// database already holds a root.
    pub async fn init_repository(
        &self,
        root_dir: &Path,
        root_keys: usize,
        threshold: u64,
        root_lifetime: Duration,
        keys_dir: &Path,
        actor: &str,
        now_ms: i64,
    ) -> Result<RootSummary, RepoError> {
        if self.latest_body("root").await?.is_some() {
            return Err(RepoError::State(
                "the repository already has a root: rotate keys with `rxfleet keys rotate-root` or `rotate-online`"
                    .into(),
            ));
        }
        let threshold = NonZeroU64::new(threshold)
            .filter(|t| t.get() <= root_keys as u64)
            .ok_or_else(|| RepoError::State(format!("the threshold must be 1 to {root_keys} (the root keys made)")))?;
        if root_dir.join("root-1.pem").exists() || root_dir.join("root.json").exists() {
            return Err(RepoError::State(format!("{} already holds root keys or a root.json", root_dir.display())));
        }
        let made = keys::generate_root_keys(root_dir, root_keys)?;
        OnlineKeys::generate(keys_dir, &keys::ONLINE_ROLES)?;
        let online = OnlineKeys::read(keys_dir)?;
        let signers: Vec<&SigningKey> = made.iter().collect();
        let root = root_role(NonZeroU64::MIN, expiry(now_ms, root_lifetime), &signers, threshold, &online);
        let signed = sign_root(root, &signers, None).await?;
        self.add_root(&signed, root_dir, actor, "tuf_root_created", now_ms).await
    }

    async fn add_root(
        &self,
        signed: &SignedRole<Root>,
        root_dir: &Path,
        actor: &str,
        event: &str,
        now_ms: i64,
    ) -> Result<RootSummary, RepoError> {
        let root = &signed.signed().signed;
        let file =
            metadata_file(signed, "root", format!("{}.root.json", root.version), root.version.get(), root.expires);
        write_root_json(root_dir, &file.body)?;
        self.store_metadata(std::slice::from_ref(&file), now_ms).await?;
        let role = &root.roles[&RoleType::Root];
        let summary = RootSummary {
            version: root.version.get(),
            root_key_ids: role.keyids.iter().map(|k| hex(k)).collect(),
            threshold: role.threshold.get(),
            expires_ms: file.expires_ms,
            root_json: root_dir.join("root.json").display().to_string(),
        };
        let mut tx = self.begin_write().await?;
        crate::devices::record_change(
            &mut tx,
            now_ms,
            actor,
            event,
            None,
            serde_json::to_value(&summary).expect("serialisable"),
        )
        .await?;
        tx.commit().await?;
        Ok(summary)
    }

    /// The current root and those of `keys` its root role lists, refused
    /// below its threshold (`purpose` says what they are to sign).
    async fn root_and_signers<'k>(
        &self,
        keys: &'k [SigningKey],
        purpose: &str,
    ) -> Result<(Root, Vec<&'k SigningKey>), RepoError> {
        let current = self
            .tuf_current()
            .await?
            .ok_or_else(|| RepoError::State("no repository yet: `rxfleet keys init`".into()))?;
        let root = current.root.signed;
        let role = &root.roles[&RoleType::Root];
        let signers: Vec<&SigningKey> = keys.iter().filter(|k| role.keyids.contains(k.id())).collect();
        if (signers.len() as u64) < role.threshold.get() {
            return Err(RepoError::State(format!(
                "root version {} needs {} of its root keys to {purpose}; {} given",
                root.version,
                role.threshold,
                signers.len()
            )));
        }
        Ok((root, signers))
    }

    /// Replaces the root keys: `current_keys` (at least the current root's
    /// threshold of them) and the new keys, which must meet the new
    /// `threshold`, both sign the next root. The online keys stay.
    pub async fn rotate_root_keys(
        &self,
        current_keys: &[SigningKey],
        new_keys: &[SigningKey],
        threshold: u64,
        root_lifetime: Duration,
        root_dir: &Path,
        keys_dir: &Path,
        actor: &str,
        now_ms: i64,
    ) -> Result<RootSummary, RepoError> {
        let (old, old_signers) = self.root_and_signers(current_keys, "sign its successor").await?;
        let old = &old;
        let threshold = NonZeroU64::new(threshold).filter(|t| t.get() <= new_keys.len() as u64).ok_or_else(|| {
            RepoError::State(format!("the threshold must be 1 to {} (the new root keys)", new_keys.len()))
        })?;
        let online = OnlineKeys::read(keys_dir)?;
        let version = next_version(Some(old.version));
        let new_signers: Vec<&SigningKey> = new_keys.iter().collect();
        let root = root_role(version, expiry(now_ms, root_lifetime), &new_signers, threshold, &online);
        let signed = sign_root(root, &new_signers, Some((old, &old_signers))).await?;
        self.add_root(&signed, root_dir, actor, "tuf_root_rotated", now_ms).await
    }

    /// Replaces online keys: new keys for `roles` in `keys_dir`, and a new
    /// root listing them, signed by `root_keys` (the current root's
    /// threshold). The leader re-signs what the old keys signed.
    pub async fn rotate_online_keys(
        &self,
        root_keys: &[SigningKey],
        roles: &[keys::OnlineRole],
        root_lifetime: Duration,
        root_dir: &Path,
        keys_dir: &Path,
        actor: &str,
        now_ms: i64,
    ) -> Result<RootSummary, RepoError> {
        let (old, signers) = self.root_and_signers(root_keys, "list new online keys").await?;
        let old = &old;
        OnlineKeys::generate(keys_dir, roles)?;
        let online = OnlineKeys::read(keys_dir)?;
        let threshold = old.roles[&RoleType::Root].threshold;
        let root =
            root_role(next_version(Some(old.version)), expiry(now_ms, root_lifetime), &signers, threshold, &online);
        let signed = sign_root(root, &signers, None).await?;
        self.add_root(&signed, root_dir, actor, "tuf_online_keys_rotated", now_ms).await
    }

    /// Signs and stores what [`plan`] says so that the repository lists
    /// `wanted` (the leader calls this every few seconds). Returns the plan
    /// carried out; nothing when the repository has no root yet.
    pub async fn publish(
        &self,
        wanted: &[WantedTarget],
        keys_dir: &Path,
        lifetimes: &Lifetimes,
        now_ms: i64,
    ) -> Result<Plan, RepoError> {
        let Some(current) = self.tuf_current().await? else { return Ok(Plan::default()) };
        let todo = plan(&current, wanted, lifetimes, now_ms);
        if !todo.any() {
            return Ok(todo);
        }
        let online = OnlineKeys::read(keys_dir)?;
        let holder = KeyHolder::Root(current.root.signed.clone());
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let mut files = Vec::new();

        let (targets_version, targets_length, targets_sha256) = if todo.targets {
            let version = next_version(current.targets.as_ref().map(|t| t.signed.signed.version));
            let expires = expiry(now_ms, lifetimes.targets);
            let mut role = Targets::new(SPEC_VERSION.into(), version, expires);
            for w in wanted {
                let name = TargetName::new(&w.name).map_err(tuf(format!("target name {:?}", w.name)))?;
                role.targets.insert(name, w.target());
            }
            let signed = SignedRole::new(role, &holder, &[online.targets.source()], &rng)
                .await
                .map_err(tuf("signing targets"))?;
            let out = (version, *signed.length(), signed.sha256().to_vec());
            files.push(metadata_file(&signed, "targets", format!("{version}.targets.json"), version.get(), expires));
            out
        } else {
            let t = current.targets.as_ref().expect("planned: targets exist");
            (t.signed.signed.version, t.length, t.sha256.clone())
        };

        let (snapshot_version, snapshot_length, snapshot_sha256) = if todo.snapshot {
            let version = next_version(current.snapshot.as_ref().map(|s| s.signed.signed.version));
            let expires = expiry(now_ms, lifetimes.snapshot);
            let mut role = Snapshot::new(SPEC_VERSION.into(), version, expires);
            role.meta.insert("targets.json".into(), metafile(targets_version, targets_length, targets_sha256));
            let signed = SignedRole::new(role, &holder, &[online.snapshot.source()], &rng)
                .await
                .map_err(tuf("signing snapshot"))?;
            let out = (version, *signed.length(), signed.sha256().to_vec());
            files.push(metadata_file(&signed, "snapshot", format!("{version}.snapshot.json"), version.get(), expires));
            out
        } else {
            let s = current.snapshot.as_ref().expect("planned: snapshot exists");
            (s.signed.signed.version, s.length, s.sha256.clone())
        };

        let version = next_version(current.timestamp.as_ref().map(|t| t.signed.signed.version));
        let expires = expiry(now_ms, lifetimes.timestamp);
        let mut role = Timestamp::new(SPEC_VERSION.into(), version, expires);
        role.meta.insert("snapshot.json".into(), metafile(snapshot_version, snapshot_length, snapshot_sha256));
        let signed = SignedRole::new(role, &holder, &[online.timestamp.source()], &rng)
            .await
            .map_err(tuf("signing timestamp"))?;
        files.push(metadata_file(&signed, "timestamp", "timestamp.json".into(), version.get(), expires));
        self.store_metadata(&files, now_ms).await?;
        Ok(todo)
    }

    /// Every role's newest version and expiry, for `keys status` and the API.
    pub async fn tuf_status(&self) -> Result<BTreeMap<String, (u64, i64)>, RepoError> {
        let rows = sqlx::query("SELECT role, MAX(version), MIN(expires_ms) FROM tuf_metadata t WHERE version = (SELECT MAX(version) FROM tuf_metadata u WHERE u.role = t.role) GROUP BY role")
            .fetch_all(&self.pool)
            .await?;
        Ok(rows.iter().map(|r| (r.get::<String, _>(0), (r.get::<i64, _>(1) as u64, r.get::<i64, _>(2)))).collect())
    }
}

fn hex(id: &Decoded<Hex>) -> String {
    id.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}
