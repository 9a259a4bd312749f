//! Signing keys of the TUF repository: Ed25519, PKCS#8 in PEM files of mode
//! 0600.
//!
//! - **Root keys** (`root-1.pem` …) and `root.json` go where the admin says
//!   (`rxfleet keys init --dir DIR`); the server never reads them. They are
//!   needed again only to rotate keys, and belong offline in between.
//! - **Online keys** (`targets.pem`, `snapshot.pem`, `timestamp.pem`) live in
//!   `[updates] keys_dir`, read by the leader whenever it signs, so a rotation
//!   takes effect without a restart.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use tough::key_source::KeySource;
use tough::schema::decoded::{Decoded, Hex};
use tough::schema::key::Key;
use tough::sign::Sign;

/// The PEM label of a PKCS#8 private key.
const PEM_TAG: &str = "PRIVATE KEY";

/// The online roles and their key files in `keys_dir`.
pub const ONLINE_ROLES: [OnlineRole; 3] = [OnlineRole::Targets, OnlineRole::Snapshot, OnlineRole::Timestamp];

/// A role whose key the server holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnlineRole {
    /// Signs the list of targets (what each cohort installs).
    Targets,
    /// Signs the versions of the targets metadata.
    Snapshot,
    /// Signs, often, the current snapshot (freshness).
    Timestamp,
}

impl OnlineRole {
    /// The role's name, as in TUF metadata.
    pub fn name(self) -> &'static str {
        match self {
            OnlineRole::Targets => "targets",
            OnlineRole::Snapshot => "snapshot",
            OnlineRole::Timestamp => "timestamp",
        }
    }

    /// Parses `targets`, `snapshot` or `timestamp`.
    pub fn parse(name: &str) -> Option<OnlineRole> {
        ONLINE_ROLES.into_iter().find(|r| r.name() == name)
    }

    fn file(self) -> String {
        format!("{}.pem", self.name())
    }
}

/// Why a key could not be made, read or used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing a key file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not a usable key.
    #[error("{path}: {problem}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// A private signing key read from (or written to) a PEM file.
pub struct SigningKey {
    path: PathBuf,
    pkcs8: Vec<u8>,
    public: Key,
    id: Decoded<Hex>,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the key itself.
        f.debug_struct("SigningKey").field("path", &self.path).field("id", &hex(&self.id)).finish()
    }
}

fn hex(id: &Decoded<Hex>) -> String {
    id.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

impl SigningKey {
    /// Makes a new Ed25519 key and writes it to `path` (mode 0600; an
    /// existing file is never overwritten).
    pub fn generate(path: &Path) -> Result<SigningKey, KeyError> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| KeyError::Invalid { path: path.into(), problem: "the system RNG failed".into() })?;
        let pem = pem::encode(&pem::Pem::new(PEM_TAG, pkcs8.as_ref().to_vec()));
        let io = |source| KeyError::Io { path: path.into(), source };
        let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
        file.write_all(pem.as_bytes()).and_then(|()| file.sync_all()).map_err(io)?;
        SigningKey::from_pkcs8(path, pkcs8.as_ref().to_vec())
    }

    /// Reads a key file; refused when others may read it.
    pub fn read(path: &Path) -> Result<SigningKey, KeyError> {
        let io = |source| KeyError::Io { path: path.into(), source };
        let meta = std::fs::metadata(path).map_err(io)?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(KeyError::Invalid {
                path: path.into(),
                problem: format!(
                    "mode {:o}: a signing key must not be readable by others (chmod 600)",
                    meta.permissions().mode() & 0o777
                ),
            });
        }
        let text = std::fs::read(path).map_err(io)?;
        let pem =
            pem::parse(&text).map_err(|e| KeyError::Invalid { path: path.into(), problem: format!("not PEM: {e}") })?;
        if pem.tag() != PEM_TAG {
            return Err(KeyError::Invalid {
                path: path.into(),
                problem: format!("a PEM {:?}, expected a {PEM_TAG:?} (PKCS#8 Ed25519)", pem.tag()),
            });
        }
        SigningKey::from_pkcs8(path, pem.into_contents())
    }

    fn from_pkcs8(path: &Path, pkcs8: Vec<u8>) -> Result<SigningKey, KeyError> {
        let invalid = |problem: String| KeyError::Invalid { path: path.into(), problem };
        let pair = tough::sign::parse_keypair(&pkcs8).map_err(|e| invalid(format!("not a signing key: {e}")))?;
        let public = pair.tuf_key();
        let id = public.key_id().map_err(|e| invalid(format!("key id: {e}")))?;
        Ok(SigningKey { path: path.into(), pkcs8, public, id })
    }

    /// The public key, as TUF metadata lists it.
    pub fn public(&self) -> &Key {
        &self.public
    }

    /// Its TUF key id.
    pub fn id(&self) -> &Decoded<Hex> {
        &self.id
    }

    /// Its key id in hex.
    pub fn id_hex(&self) -> String {
        hex(&self.id)
    }

    /// The file it came from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// As tough's key source (for [`tough::editor::signed::SignedRole::new`]).
    pub fn source(&self) -> Box<dyn KeySource> {
        Box::new(Pkcs8Source { pkcs8: self.pkcs8.clone(), path: self.path.clone() })
    }
}

/// A key already in memory, for tough's signing.
struct Pkcs8Source {
    pkcs8: Vec<u8>,
    path: PathBuf,
}

impl fmt::Debug for Pkcs8Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pkcs8Source").field("path", &self.path).finish()
    }
}

#[tough::async_trait]
impl KeySource for Pkcs8Source {
    async fn as_sign(&self) -> Result<Box<dyn Sign>, Box<dyn std::error::Error + Send + Sync + 'static>> {
        Ok(Box::new(tough::sign::parse_keypair(&self.pkcs8)?))
    }

    async fn write(
        &self,
        _value: &str,
        _key_id_hex: &str,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        Err(format!("{}: rxfleet never writes keys through tough", self.path.display()).into())
    }
}

/// The online keys, as found in `keys_dir`.
#[derive(Debug)]
pub struct OnlineKeys {
    /// Signs targets.json.
    pub targets: SigningKey,
    /// Signs snapshot.json.
    pub snapshot: SigningKey,
    /// Signs timestamp.json.
    pub timestamp: SigningKey,
}

impl OnlineKeys {
    /// Reads the three keys from `dir`.
    pub fn read(dir: &Path) -> Result<OnlineKeys, KeyError> {
        Ok(OnlineKeys {
            targets: SigningKey::read(&dir.join(OnlineRole::Targets.file()))?,
            snapshot: SigningKey::read(&dir.join(OnlineRole::Snapshot.file()))?,
            timestamp: SigningKey::read(&dir.join(OnlineRole::Timestamp.file()))?,
        })
    }

    /// The key of a role.
    pub fn get(&self, role: OnlineRole) -> &SigningKey {
        match role {
            OnlineRole::Targets => &self.targets,
            OnlineRole::Snapshot => &self.snapshot,
            OnlineRole::Timestamp => &self.timestamp,
        }
    }

    /// Makes fresh keys for `roles` in `dir` (mode 0700), keeping the
    /// others. A replaced key file is renamed `<role>.pem.<unix-seconds>.old`
    /// first, so a rotation that fails halfway loses nothing.
    pub fn generate(dir: &Path, roles: &[OnlineRole]) -> Result<(), KeyError> {
        let io = |source| KeyError::Io { path: dir.into(), source };
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
        let stamp =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        for role in roles {
            let path = dir.join(role.file());
            let staged = dir.join(format!("{}.new", role.file()));
            let _ = std::fs::remove_file(&staged);
            SigningKey::generate(&staged)?;
            if path.exists() {
                let old = dir.join(format!("{}.{stamp}.old", role.file()));
                std::fs::rename(&path, &old).map_err(|source| KeyError::Io { path: path.clone(), source })?;
            }
            std::fs::rename(&staged, &path).map_err(|source| KeyError::Io { path: path.clone(), source })?;
        }
        Ok(())
    }
}

/// Makes `count` root keys `root-1.pem` … in `dir`, which must not hold any yet.
pub fn generate_root_keys(dir: &Path, count: usize) -> Result<Vec<SigningKey>, KeyError> {
    let io = |source| KeyError::Io { path: dir.into(), source };
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir).map_err(io)?;
    (1..=count).map(|n| SigningKey::generate(&dir.join(format!("root-{n}.pem")))).collect()
}

/// Reads every `*.pem` key in `dir` (root keys, for rotation), sorted by name.
pub fn read_keys_in(dir: &Path) -> Result<Vec<SigningKey>, KeyError> {
    let io = |source| KeyError::Io { path: dir.into(), source };
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pem"))
        .collect();
    paths.sort();
    paths.iter().map(|p| SigningKey::read(p)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_reads_back_with_the_same_id_and_private_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        let made = SigningKey::generate(&path).unwrap();
        let read = SigningKey::read(&path).unwrap();
        assert_eq!(made.id_hex(), read.id_hex());
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(!format!("{read:?}").contains("PRIVATE"), "Debug never shows the key");
        assert!(SigningKey::generate(&path).is_err(), "an existing key is never overwritten");
    }

    #[test]
    fn a_readable_or_foreign_key_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.pem");
        SigningKey::generate(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = SigningKey::read(&path).unwrap_err().to_string();
        assert!(e.contains("chmod 600"), "{e}");
        let cert = dir.path().join("c.pem");
        std::fs::write(&cert, pem::encode(&pem::Pem::new("CERTIFICATE", vec![1, 2, 3]))).unwrap();
        std::fs::set_permissions(&cert, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = SigningKey::read(&cert).unwrap_err().to_string();
        assert!(e.contains("CERTIFICATE"), "{e}");
        let garbage = dir.path().join("g.pem");
        std::fs::write(&garbage, pem::encode(&pem::Pem::new(PEM_TAG, vec![1, 2, 3]))).unwrap();
        std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = SigningKey::read(&garbage).unwrap_err().to_string();
        assert!(e.contains("not a signing key"), "{e}");
    }

    #[test]
    fn rotating_an_online_key_keeps_the_old_one_aside() {
        let dir = tempfile::tempdir().unwrap();
        OnlineKeys::generate(dir.path(), &ONLINE_ROLES).unwrap();
        let before = OnlineKeys::read(dir.path()).unwrap();
        OnlineKeys::generate(dir.path(), &[OnlineRole::Timestamp]).unwrap();
        let after = OnlineKeys::read(dir.path()).unwrap();
        assert_eq!(before.targets.id_hex(), after.targets.id_hex());
        assert_ne!(before.timestamp.id_hex(), after.timestamp.id_hex());
        let old = std::fs::read_dir(dir.path())
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".old"))
            .count();
        assert_eq!(old, 1);
    }
}
