//! Signed updates: the fleet's TUF repository (tough).
//!
//! - [`keys`] — Ed25519 signing keys in PEM files: the offline root keys and
//!   the online targets, snapshot and timestamp keys.
//! - [`repo`] — the repository's metadata in the database: creation, root
//!   and online-key rotation, and the leader's publishing step, which lists
//!   what the registry and the active rollout want ([`crate::registry`]) and
//!   keeps every role fresh before it expires.
//!
//! - [`http`] — served read-only by every replica: `/tuf/metadata/<name>`
//!   and `/tuf/targets/<sha256>.<target>` (byte ranges for resuming).

pub mod http;
pub mod keys;
pub mod repo;

use crate::config::FleetConfig;
use crate::db::Db;

/// The leader's publishing step: the repository is signed anew where the
/// registry, the active rollout and the daemon releases want other targets, or a role nears its
/// expiry. Nothing happens before `rxfleet keys init`.
pub async fn publish(config: &FleetConfig, db: &Db) -> Result<repo::Plan, String> {
    let mut wanted = db.wanted_targets().await.map_err(|e| e.to_string())?;
    wanted.extend(db.wanted_release_targets().await.map_err(|e| e.to_string())?);
    db.publish(&wanted, &config.updates.keys_dir, &config.updates.lifetimes, crate::now_ms())
        .await
        .map_err(|e| e.to_string())
}
