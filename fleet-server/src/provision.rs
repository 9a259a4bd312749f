//! What an installer puts on a new appliance: the `[device]` id and the
//! `[telemetry]` section of its `rxvisiond.toml`, and its broker password.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use crate::config::FleetConfig;

/// Where the fragment says the password file is, unless written elsewhere.
pub const DEFAULT_PASSWORD_FILE: &str = "/etc/rxvision/broker.password";

/// The appliance's configuration fragment: its id and how it reaches the
/// fleet's broker, with the password in `password_file`.
pub fn appliance_config(config: &FleetConfig, device_id: &str, site: &str, password_file: &Path) -> String {
    let url = &config.broker.device_url;
    let ca = if url.starts_with("mqtts://") {
        "# The CA certificate that signed the broker's certificate (PEM).\nca_file = \"/etc/rxvision/fleet-ca.pem\"\n"
    } else {
        ""
    };
    format!(
        "# rxvisiond.toml for device {device_id} at site {site} (from `rxfleet devices add`).\n\
         [device]\n\
         id = {device_id:?}\n\n\
         [telemetry]\n\
         enabled = true\n\
         broker = {url:?}\n\
         # The broker password (first line, mode 0600).\n\
         password_file = {:?}\n{ca}",
        password_file.display().to_string()
    )
}

/// Writes `<dir>/rxvisiond-telemetry.toml` and `<dir>/broker.password`
/// (mode 0600); refuses to overwrite either. Returns the two paths.
pub fn write_files(
    config: &FleetConfig,
    dir: &Path,
    device_id: &str,
    site: &str,
    password: &str,
) -> std::io::Result<(PathBuf, PathBuf)> {
    std::fs::create_dir_all(dir)?;
    let dir = dir.canonicalize()?;
    let password_path = dir.join("broker.password");
    let config_path = dir.join("rxvisiond-telemetry.toml");
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&password_path)?;
    file.write_all(format!("{password}\n").as_bytes())?;
    file.sync_all()?;
    let mut file = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o644).open(&config_path)?;
    file.write_all(appliance_config(config, device_id, site, &password_path).as_bytes())?;
    file.sync_all()?;
    Ok((config_path, password_path))
}
