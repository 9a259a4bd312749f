//! What an installer puts on a new appliance: the `[device]` id and the
//! `[telemetry]` section of its `rxvisiond.toml`, and its broker password.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::ca::ClientCertificate;
use crate::config::FleetConfig;

/// Where the fragment says the password file is, unless written elsewhere.
pub const DEFAULT_PASSWORD_FILE: &str = "/etc/rxvision/broker.password";

/// Where the fragment says the client certificate and key are, unless written elsewhere.
pub const DEFAULT_CLIENT_FILES: (&str, &str) = ("/etc/rxvision/client.crt", "/etc/rxvision/client.key");

/// The appliance's configuration fragment: its id and how it reaches the
/// fleet's broker, with the password in `password_file` and, when the
/// fleet has a CA, its client certificate and key in `client_files`.
pub fn appliance_config(
    config: &FleetConfig,
    device_id: &str,
    site: &str,
    password_file: &Path,
    client_files: Option<(&Path, &Path)>,
) -> String {
    let url = &config.broker.device_url;
    let ca = if url.starts_with("mqtts://") {
        "# The CA certificate that signed the broker's certificate (PEM).\nca_file = \"/etc/rxvision/fleet-ca.pem\"\n"
    } else {
        ""
    };
    let client = match client_files {
        Some((cert, key)) => format!(
            "# Its client certificate from the fleet's CA, and the key (mode 0600).\n\
             client_cert_file = {:?}\nclient_key_file = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
        None => String::new(),
    };
    format!(
        "# rxvisiond.toml for device {device_id} at site {site} (from `rxfleet devices add`).\n\
         [device]\n\
         id = {device_id:?}\n\n\
         [telemetry]\n\
         enabled = true\n\
         broker = {url:?}\n\
         # The broker password (first line, mode 0600).\n\
         password_file = {:?}\n{ca}{client}",
        password_file.display().to_string()
    )
}

/// A registered device's credentials.
#[derive(Debug, Clone)]
pub struct Registered {
    /// Its id.
    pub device_id: String,
    /// Its broker password (shown once).
    pub password: String,
    /// Its client certificate, when the fleet has a CA.
    pub certificate: Option<ClientCertificate>,
}

/// Registers a device (id given, or made from the site) and, when the
/// fleet has a CA, issues its client certificate first (a CA that cannot
/// sign registers nothing).
pub async fn register(
    config: &FleetConfig,
    db: &crate::db::Db,
    device_id: Option<&str>,
    site: &str,
    actor: &str,
    now_ms: i64,
) -> Result<Registered, crate::devices::RegistryError> {
    crate::devices::check_site(site)?;
    let device_id = device_id.map_or_else(|| crate::devices::new_device_id(site), str::to_string);
    crate::devices::check_device_id(&device_id)?;
    let certificate = match &config.broker.ca_dir {
        Some(dir) => Some(crate::ca::issue(dir, &device_id).map_err(crate::devices::RegistryError::Ca)?),
        None => None,
    };
    let serial = certificate.as_ref().map(|c| c.serial.as_str());
    let password = db.add_device(&device_id, site, serial, actor, now_ms).await?;
    Ok(Registered { device_id, password, certificate })
}

fn write_new(path: &Path, text: &str, mode: u32) -> std::io::Result<()> {
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(path)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()
}

/// Writes `<dir>/rxvisiond-telemetry.toml`, `<dir>/broker.password` (mode
/// 0600) and, with a certificate, `client.crt` and `client.key` (0600);
/// refuses to overwrite any. Returns the configuration's path.
pub fn write_files(
    config: &FleetConfig,
    dir: &Path,
    device_id: &str,
    site: &str,
    password: &str,
    certificate: Option<&ClientCertificate>,
) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    let password_path = dir.join("broker.password");
    let config_path = dir.join("rxvisiond-telemetry.toml");
    let (cert_path, key_path) = (dir.join("client.crt"), dir.join("client.key"));
    write_new(&password_path, &format!("{password}\n"), 0o600)?;
    if let Some(c) = certificate {
        write_new(&cert_path, &c.cert_pem, 0o644)?;
        write_new(&key_path, &c.key_pem, 0o600)?;
    }
    let client = certificate.map(|_| (cert_path.as_path(), key_path.as_path()));
    write_new(&config_path, &appliance_config(config, device_id, site, &password_path, client), 0o644)?;
    Ok(config_path)
}
