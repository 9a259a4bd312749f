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

/// One row of a device import: the site, and the id (none: made from the site).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportRow {
    /// Its line in the file (1-based).
    pub line: usize,
    /// The site.
    pub site: String,
    /// The id, if the file names one.
    pub device_id: Option<String>,
}

/// Reads a device import: CSV with a header naming the columns `site`
/// (required) and `device_id` (optional; an empty cell makes one), in any
/// order. Blank lines and lines starting with `#` are skipped. Site names
/// and ids cannot hold commas or quotes, so no quoting is needed. A
/// spreadsheet's byte-order mark and CRLF line ends are accepted. Every
/// problem is reported at once, with its line.
pub fn parse_import(text: &str) -> Result<Vec<ImportRow>, String> {
    let mut lines = text
        .strip_prefix('\u{feff}')
        .unwrap_or(text)
        .lines()
        .enumerate()
        .map(|(k, line)| (k + 1, line.trim()))
        .filter(|(_, line)| !line.is_empty() && !line.starts_with('#'));
    let Some((header_line, header)) = lines.next() else {
        return Err("the file holds no header (site,device_id) and no devices".into());
    };
    let columns: Vec<&str> = header.split(',').map(str::trim).collect();
    let mut problems = Vec::new();
    for column in &columns {
        if !matches!(*column, "site" | "device_id") {
            problems
                .push(format!("line {header_line}: unknown column {column:?} (the columns are site and device_id)"));
        }
    }
    let position = |name: &str| columns.iter().position(|c| *c == name);
    let (Some(site_at), id_at) = (position("site"), position("device_id")) else {
        problems.push(format!("line {header_line}: the header names no site column"));
        return Err(problems.join("\n"));
    };
    let mut rows = Vec::new();
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (line, text) in lines {
        let cells: Vec<&str> = text.split(',').map(str::trim).collect();
        if cells.len() != columns.len() {
            problems.push(format!("line {line}: {} fields, the header has {}", cells.len(), columns.len()));
            continue;
        }
        let site = cells[site_at].to_string();
        if let Err(e) = crate::devices::check_site(&site) {
            problems.push(format!("line {line}: {e}"));
        }
        let device_id = id_at.map(|at| cells[at].to_string()).filter(|id| !id.is_empty());
        if let Some(id) = &device_id {
            if let Err(e) = crate::devices::check_device_id(id) {
                problems.push(format!("line {line}: {e}"));
            }
            if let Some(first) = seen.insert(id.clone(), line) {
                problems.push(format!("line {line}: device {id:?} is on line {first} already"));
            }
        }
        rows.push(ImportRow { line, site, device_id });
    }
    if rows.is_empty() && problems.is_empty() {
        problems.push("the file names no devices".into());
    }
    if problems.is_empty() {
        Ok(rows)
    } else {
        Err(problems.join("\n"))
    }
}

/// A device registered by an import.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Imported {
    /// Its id.
    pub device_id: String,
    /// Its site.
    pub site: String,
    /// Its configuration fragment (credentials next to it).
    pub config_path: PathBuf,
}

/// Registers every device of an import, or none: each device's files are
/// written to `out/<device_id>/` (as [`write_files`]) first, then all are
/// registered in one transaction; if anything fails, the files written are
/// removed and nothing is registered. No device is ever registered without
/// its credentials on disk.
pub async fn import(
    config: &FleetConfig,
    db: &crate::db::Db,
    rows: &[ImportRow],
    out: &Path,
    actor: &str,
    now_ms: i64,
) -> Result<Vec<Imported>, String> {
    let ids: Vec<String> = rows
        .iter()
        .map(|row| row.device_id.clone().unwrap_or_else(|| crate::devices::new_device_id(&row.site)))
        .collect();
    let mut unique = ids.clone();
    unique.sort();
    unique.dedup();
    if unique.len() != ids.len() {
        return Err("two rows make the same device id; name the ids in the file".into());
    }
    let taken = db.registered(&ids).await.map_err(|e| e.to_string())?;
    if !taken.is_empty() {
        let shown: Vec<&str> = taken.iter().take(10).map(String::as_str).collect();
        return Err(format!("{} of the devices are registered already: {}", taken.len(), shown.join(", ")));
    }
    let present: Vec<String> =
        ids.iter().filter(|id| out.join(id).exists()).take(10).map(|id| out.join(id).display().to_string()).collect();
    if !present.is_empty() {
        return Err(format!("these directories exist already: {}", present.join(", ")));
    }
    let mut devices = Vec::with_capacity(rows.len());
    let mut imported = Vec::with_capacity(rows.len());
    let mut written: Vec<PathBuf> = Vec::new();
    let undo = |written: &[PathBuf]| {
        for dir in written {
            let _ = std::fs::remove_dir_all(dir);
        }
    };
    let ca = match &config.broker.ca_dir {
        Some(dir) => {
            Some(crate::ca::Ca::load(dir).map_err(|e| format!("the fleet's CA: {e}; nothing was registered"))?)
        }
        None => None,
    };
    for (row, device_id) in rows.iter().zip(&ids) {
        let certificate = match ca.as_ref().map(|ca| ca.issue(device_id)).transpose() {
            Ok(certificate) => certificate,
            Err(e) => {
                undo(&written);
                return Err(format!("line {}: the fleet's CA: {e}; nothing was registered", row.line));
            }
        };
        let password = crate::devices::new_password();
        let dir = out.join(device_id);
        written.push(dir.clone());
        let config_path = match write_files(config, &dir, device_id, &row.site, &password, certificate.as_ref()) {
            Ok(path) => path,
            Err(e) => {
                undo(&written);
                return Err(format!("{}: {e}; nothing was registered", dir.display()));
            }
        };
        devices.push(crate::devices::NewDevice {
            device_id: device_id.clone(),
            site: row.site.clone(),
            password,
            cert_serial: certificate.map(|c| c.serial),
        });
        imported.push(Imported { device_id: device_id.clone(), site: row.site.clone(), config_path });
    }
    if let Err(e) = db.add_devices(&devices, actor, now_ms).await {
        undo(&written);
        return Err(format!("{e}; nothing was registered"));
    }
    Ok(imported)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_import_file_is_read_with_its_columns_in_any_order() {
        let rows = parse_import("# the Leeds stores\ndevice_id, site\nleeds-1,store-7\n\n,store-8\n").unwrap();
        assert_eq!(
            rows,
            [
                ImportRow { line: 3, site: "store-7".into(), device_id: Some("leeds-1".into()) },
                ImportRow { line: 5, site: "store-8".into(), device_id: None },
            ]
        );
        assert_eq!(parse_import("site\nstore-9\n").unwrap()[0].site, "store-9");
        // As a spreadsheet saves "CSV UTF-8": a byte-order mark and CRLF.
        let exported = parse_import("\u{feff}site,device_id\r\nstore-7,leeds-1\r\n").unwrap();
        assert_eq!((exported[0].site.as_str(), exported[0].device_id.as_deref()), ("store-7", Some("leeds-1")));
    }

    #[test]
    fn every_problem_of_an_import_file_is_named_with_its_line() {
        let problems = parse_import("site,device_id\nstore 1,a\nstore-2,b/c\nstore-3,a\nstore-4,x,y\n").unwrap_err();
        for expected in [
            "line 2: \"store 1\" is not a site name",
            "line 3: \"b/c\" is not a device id",
            "line 4: device \"a\" is on line 2 already",
            "line 5: 3 fields, the header has 2",
        ] {
            assert!(problems.contains(expected), "{expected:?} in:\n{problems}");
        }
        assert!(parse_import("site,shelf\nx,y\n").unwrap_err().contains("line 1: unknown column \"shelf\""));
        assert!(parse_import("device_id\nx\n").unwrap_err().contains("no site column"));
        assert!(parse_import("# nothing\n").unwrap_err().contains("no header"));
        assert!(parse_import("site,device_id\n").unwrap_err().contains("names no devices"));
    }
}
