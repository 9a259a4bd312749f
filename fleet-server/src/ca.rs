//! The fleet's certificate authority for appliances' client certificates.
//!
//! With `[broker] ca_dir` set, `rxfleet ca init` creates the CA there
//! (`ca.key`, mode 0600, ECDSA P-256, and `ca.crt`), `rxfleet devices add`
//! issues each new device a client certificate (CN = its id, client
//! authentication only, valid [`CLIENT_DAYS`] days), and the managed
//! broker's TLS listener requires one signed by this CA in addition to the
//! device's password. Retiring a device removes its password from the
//! broker, so a retired device's still-valid certificate opens nothing.
//!
//! The CA certificate is not parsed back: when signing, the CA is rebuilt
//! from its stored key and the same fixed parameters, which is all a
//! child certificate's issuer name and key identifier depend on.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SerialNumber,
};
use ring::rand::SecureRandom;

/// How long a client certificate is valid.
pub const CLIENT_DAYS: i64 = 825;

/// The CA's name.
const CA_NAME: &str = "RxVision fleet appliance CA";

/// A client certificate and its key (PEM).
#[derive(Debug, Clone)]
pub struct ClientCertificate {
    /// The certificate.
    pub cert_pem: String,
    /// Its private key (PKCS#8).
    pub key_pem: String,
    /// Its serial number, hex.
    pub serial: String,
}

/// The CA certificate's path in `dir`.
pub fn cert_path(dir: &Path) -> PathBuf {
    dir.join("ca.crt")
}

fn key_path(dir: &Path) -> PathBuf {
    dir.join("ca.key")
}

fn ca_params() -> Result<CertificateParams, String> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, CA_NAME);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.not_before = rcgen::date_time_ymd(2025, 1, 1);
    params.not_after = rcgen::date_time_ymd(2050, 1, 1);
    Ok(params)
}

fn write_new(path: &Path, text: &str, mode: u32) -> Result<(), String> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(text.as_bytes()).and_then(|()| file.sync_all()).map_err(|e| format!("{}: {e}", path.display()))
}

/// Creates the CA in `dir`; refuses to replace one.
pub fn init(dir: &Path) -> Result<PathBuf, String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if key_path(dir).exists() || cert_path(dir).exists() {
        return Err(format!("{} already holds a CA; remove it first to make a new one", dir.display()));
    }
    let key = KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = ca_params()?.self_signed(&key).map_err(|e| e.to_string())?;
    write_new(&key_path(dir), &key.serialize_pem(), 0o600)?;
    write_new(&cert_path(dir), &cert.pem(), 0o644)?;
    Ok(cert_path(dir))
}

/// The fleet's CA, read once to issue any number of client certificates.
pub struct Ca {
    cert: Certificate,
    key: KeyPair,
}

impl Ca {
    /// Reads the CA in `dir` (made by `rxfleet ca init`).
    pub fn load(dir: &Path) -> Result<Ca, String> {
        let pem = std::fs::read_to_string(key_path(dir))
            .map_err(|e| format!("{}: {e} (create the CA with `rxfleet ca init`)", key_path(dir).display()))?;
        let key = KeyPair::from_pem(&pem).map_err(|e| format!("{}: {e}", key_path(dir).display()))?;
        let cert = ca_params()?.self_signed(&key).map_err(|e| e.to_string())?;
        Ok(Ca { cert, key })
    }

    /// Issues a client certificate for `device_id`.
    pub fn issue(&self, device_id: &str) -> Result<ClientCertificate, String> {
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, device_id);
        params.distinguished_name = name;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let mut serial = [0u8; 16];
        ring::rand::SystemRandom::new().fill(&mut serial).map_err(|_| "the system RNG failed")?;
        serial[0] &= 0x7f; // a positive number
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::minutes(5);
        params.not_after = now + time::Duration::days(CLIENT_DAYS);
        let cert = params.signed_by(&key, &self.cert, &self.key).map_err(|e| e.to_string())?;
        Ok(ClientCertificate {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial: serial.iter().map(|b| format!("{b:02x}")).collect(),
        })
    }
}

/// Issues a client certificate for `device_id` from the CA in `dir`.
pub fn issue(dir: &Path, device_id: &str) -> Result<ClientCertificate, String> {
    Ca::load(dir)?.issue(device_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_is_made_once_and_issues_client_certificates() {
        let dir = tempfile::tempdir().unwrap();
        init(dir.path()).unwrap();
        assert!(init(dir.path()).unwrap_err().contains("already holds a CA"));
        let one = issue(dir.path(), "store-1-counter").unwrap();
        let two = issue(dir.path(), "store-1-counter").unwrap();
        assert!(one.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(one.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
        assert_ne!(one.serial, two.serial);
        let missing = tempfile::tempdir().unwrap();
        assert!(issue(missing.path(), "x").unwrap_err().contains("rxfleet ca init"));
    }
}
