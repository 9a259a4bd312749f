//! Audit keys: loading, derivation, rotation.
//!
//! A key file holds one 256-bit master key, as 64 hex digits (whitespace
//! allowed around them) or as exactly 32 raw bytes. It is refused when group
//! or others have any permission on it. A systemd credential
//! (`LoadCredential=audit-key:/etc/rxvision/audit.key`) is just such a file
//! under `$CREDENTIALS_DIRECTORY`.
//!
//! From each master key, HKDF-SHA256 derives independent subkeys: the
//! AES-256-GCM record key, the HMAC key that pseudonymises prescription
//! references, the HMAC key that signs pruning checkpoints, and a 32-bit key
//! id stored in every record so that old records stay readable after the key
//! rotates. Key material never appears in `Debug` output, logs or errors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ring::{aead, hkdf, hmac};

/// Why a key could not be loaded. Never contains key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file could not be read.
    #[error("audit key {path}: cannot read: {source}")]
    Read {
        /// The key file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The key file is accessible to group or others.
    #[error("audit key {path}: mode {mode:04o} gives group or others access; run `chmod 600` on it (or use a systemd credential)")]
    Permissions {
        /// The key file.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
    /// The file holds neither 64 hex digits nor 32 raw bytes.
    #[error("audit key {path}: expected 64 hex digits or 32 raw bytes ({len} bytes found)")]
    Format {
        /// The key file.
        path: PathBuf,
        /// How many bytes the file had.
        len: usize,
    },
    /// Two key files hold keys with the same id.
    #[error("audit key {path}: duplicates the key id {id:08x} of another key file")]
    Duplicate {
        /// The second key file.
        path: PathBuf,
        /// The id both share.
        id: u32,
    },
    /// No key file was given.
    #[error("no audit key configured")]
    None,
}

const HKDF_SALT: &[u8] = b"rxvision-audit-v1";

struct Len(usize);

impl hkdf::KeyType for Len {
    fn len(&self) -> usize {
        self.0
    }
}

/// The subkeys derived from one master key.
pub struct AuditKey {
    id: u32,
    aead: aead::LessSafeKey,
    pseudonym: hmac::Key,
    checkpoint: hmac::Key,
}

impl std::fmt::Debug for AuditKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AuditKey({:08x})", self.id)
    }
}

impl AuditKey {
    /// Derives the subkeys of a 32-byte master key.
    pub fn from_master(master: &[u8; 32]) -> AuditKey {
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, HKDF_SALT).extract(master);
        let expand = |info: &'static [u8], len: usize| -> Vec<u8> {
            let info = [info];
            let okm = prk.expand(&info, Len(len)).expect("HKDF output length is valid");
            let mut out = vec![0u8; len];
            okm.fill(&mut out).expect("HKDF fill matches its length");
            out
        };
        let id_bytes = expand(b"key id", 4);
        let aead_key = aead::UnboundKey::new(&aead::AES_256_GCM, &expand(b"record encryption", 32))
            .expect("AES-256 key is 32 bytes");
        AuditKey {
            id: u32::from_be_bytes([id_bytes[0], id_bytes[1], id_bytes[2], id_bytes[3]]),
            aead: aead::LessSafeKey::new(aead_key),
            pseudonym: hmac::Key::new(hmac::HMAC_SHA256, &expand(b"prescription pseudonym", 32)),
            checkpoint: hmac::Key::new(hmac::HMAC_SHA256, &expand(b"pruning checkpoint", 32)),
        }
    }

    /// Loads a key file, refusing one that group or others can access.
    pub fn load(path: &Path) -> Result<AuditKey, KeyError> {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(path).map_err(|source| KeyError::Read { path: path.into(), source })?;
            let mode = meta.permissions().mode() & 0o7777;
            if mode & 0o077 != 0 {
                return Err(KeyError::Permissions { path: path.into(), mode });
            }
        }
        let bytes = std::fs::read(path).map_err(|source| KeyError::Read { path: path.into(), source })?;
        let master = parse_master(&bytes).ok_or(KeyError::Format { path: path.into(), len: bytes.len() })?;
        Ok(AuditKey::from_master(&master))
    }

    /// The key id stored in records encrypted under this key.
    pub fn id(&self) -> u32 {
        self.id
    }

    pub(super) fn aead(&self) -> &aead::LessSafeKey {
        &self.aead
    }

    /// Keyed hash (HMAC-SHA256, hex) of a prescription reference: the same
    /// reference gives the same pseudonym under the same key, and nothing
    /// about the reference can be learnt from it without the key.
    pub fn pseudonym(&self, value: &str) -> String {
        hex(hmac::sign(&self.pseudonym, value.as_bytes()).as_ref())
    }

    pub(super) fn sign_checkpoint(&self, bytes: &[u8]) -> String {
        hex(hmac::sign(&self.checkpoint, bytes).as_ref())
    }

    pub(super) fn verify_checkpoint(&self, bytes: &[u8], mac_hex: &str) -> bool {
        let Some(mac) = unhex(mac_hex) else { return false };
        hmac::verify(&self.checkpoint, bytes, &mac).is_ok()
    }
}

fn parse_master(bytes: &[u8]) -> Option<[u8; 32]> {
    if let Ok(text) = std::str::from_utf8(bytes) {
        let trimmed = text.trim();
        if trimmed.len() == 64 {
            if let Some(decoded) = unhex(trimmed) {
                return decoded.try_into().ok();
            }
        }
    }
    bytes.try_into().ok()
}

/// The active key and every older key still needed to read old records.
#[derive(Debug)]
pub struct KeyRing {
    active: u32,
    keys: HashMap<u32, AuditKey>,
}

impl KeyRing {
    /// Loads `active` (used for new records) and `previous` (read only).
    pub fn load(active: &Path, previous: &[PathBuf]) -> Result<KeyRing, KeyError> {
        let mut ring = KeyRing::new(AuditKey::load(active)?);
        for path in previous {
            let key = AuditKey::load(path)?;
            if ring.keys.contains_key(&key.id) {
                return Err(KeyError::Duplicate { path: path.clone(), id: key.id });
            }
            ring.keys.insert(key.id, key);
        }
        Ok(ring)
    }

    /// A ring of one key.
    pub fn new(active: AuditKey) -> KeyRing {
        let id = active.id;
        KeyRing { active: id, keys: HashMap::from([(id, active)]) }
    }

    /// Adds a read-only older key.
    pub fn with_previous(mut self, key: AuditKey) -> KeyRing {
        self.keys.entry(key.id).or_insert(key);
        self
    }

    /// The key new records are encrypted under.
    pub fn active(&self) -> &AuditKey {
        &self.keys[&self.active]
    }

    /// The key with this id, if the ring holds it.
    pub fn get(&self, id: u32) -> Option<&AuditKey> {
        self.keys.get(&id)
    }
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn write_key(dir: &Path, name: &str, contents: &[u8], mode: u32) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    #[test]
    fn hex_and_raw_keys_load_and_derive_the_same_subkeys() {
        let dir = tempfile::tempdir().unwrap();
        let raw = [7u8; 32];
        let a = AuditKey::load(&write_key(dir.path(), "raw.key", &raw, 0o600)).unwrap();
        let b =
            AuditKey::load(&write_key(dir.path(), "hex.key", format!("{}\n", hex(&raw)).as_bytes(), 0o400)).unwrap();
        assert_eq!(a.id(), b.id());
        assert_eq!(a.pseudonym("RX-1"), b.pseudonym("RX-1"));
        assert_ne!(a.pseudonym("RX-1"), a.pseudonym("RX-2"));
        assert_ne!(AuditKey::from_master(&[8u8; 32]).id(), a.id());
    }

    #[test]
    fn group_or_world_accessible_keys_are_refused_without_showing_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let secret = hex(&[0xAB; 32]);
        for mode in [0o640, 0o604, 0o660, 0o644, 0o610] {
            let path = write_key(dir.path(), &format!("k{mode:o}.key"), secret.as_bytes(), mode);
            let err = AuditKey::load(&path).unwrap_err();
            assert!(matches!(err, KeyError::Permissions { .. }), "{mode:o}: {err}");
            assert!(!err.to_string().contains(&secret[..16]));
        }
    }

    #[test]
    fn malformed_keys_are_refused_without_showing_the_contents() {
        let dir = tempfile::tempdir().unwrap();
        for (name, contents) in [("short", b"abcd".to_vec()), ("badhex", vec![b'z'; 64]), ("long", vec![1u8; 33])] {
            let err = AuditKey::load(&write_key(dir.path(), name, &contents, 0o600)).unwrap_err();
            assert!(matches!(err, KeyError::Format { .. }), "{name}: {err}");
            assert!(!format!("{err:?}").contains("zzzz"));
        }
        let err = AuditKey::load(&dir.path().join("absent")).unwrap_err();
        assert!(matches!(err, KeyError::Read { .. }));
    }

    #[test]
    fn debug_output_shows_only_the_key_id() {
        let key = AuditKey::from_master(&[9u8; 32]);
        let shown = format!("{key:?} {:?}", KeyRing::new(AuditKey::from_master(&[9u8; 32])));
        assert!(shown.contains(&format!("{:08x}", key.id())));
        assert!(!shown.contains("0909"));
    }
}
