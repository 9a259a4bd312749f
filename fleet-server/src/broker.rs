//! The managed broker: the Mosquitto `rxfleet serve` runs by default.
//!
//! `rxfleet serve` writes, under `<state_dir>/mosquitto/` (mode 0700): the
//! broker's configuration, the ACL shipped in `packaging/mosquitto/` (every
//! device bound to its own topics), and the password file with one account
//! per live registered device and one for the ingest (whose password it
//! generates once and keeps there, mode 0600). It starts `mosquitto`, waits
//! for its listener, and restarts it with backoff whenever it exits. When a
//! device is added or retired (any replica or CLI moves the registry's
//! generation in the database), it rewrites the password file and sends
//! SIGHUP: Mosquitto reloads it, keeps every other connection, and
//! disconnects a retired device, whose reconnects are then refused.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::watch;

use crate::config::{managed_broker_dir, managed_ingest_password, FleetConfig, ManagedBroker};
use crate::db::Db;
use crate::devices::{hash_password, new_password};

/// The ACL every managed broker uses (the one shipped for installed brokers).
pub const ACL: &str = include_str!("../../packaging/mosquitto/rxvision.acl");

/// Why the managed broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// A file could not be written.
    #[error("managed broker: {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The listener's port is taken.
    #[error("managed broker: {addr} is in use (another broker or rxfleet?); set broker.listen to a free address")]
    PortInUse {
        /// The address.
        addr: std::net::SocketAddr,
    },
    /// Mosquitto did not start.
    #[error("managed broker: {0}")]
    Start(String),
    /// The registry could not be read.
    #[error(transparent)]
    Db(#[from] crate::db::DbError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> BrokerError + '_ {
    move |source| BrokerError::Io { path: path.to_path_buf(), source }
}

/// Writes `text` to `path` with mode 0600 through a temporary file and a
/// rename, so Mosquitto never reads half a file.
pub fn write_private(path: &Path, text: &str) -> Result<(), BrokerError> {
    let tmp = path.with_extension("tmp");
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io(&tmp))?;
    file.write_all(text.as_bytes()).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// The ingest's password at the managed broker: generated on first start.
fn ingest_password(state_dir: &Path) -> Result<String, BrokerError> {
    let path = managed_ingest_password(state_dir);
    match std::fs::read_to_string(&path) {
        Ok(text) if !text.trim().is_empty() => Ok(text.trim().to_string()),
        Ok(_) | Err(_) => {
            let password = new_password();
            write_private(&path, &format!("{password}\n"))?;
            Ok(password)
        }
    }
}

/// The broker's configuration file.
pub fn mosquitto_conf(dir: &Path, broker: &ManagedBroker, client_ca: Option<&Path>, run_as_root: bool) -> String {
    let mut conf = format!(
        "# Written by `rxfleet serve` at every start: edit rxfleet's configuration instead.\n\
         per_listener_settings false\n\
         allow_anonymous false\n\
         password_file {dir}/passwd\n\
         acl_file {dir}/rxvision.acl\n\
         persistence true\n\
         persistence_location {dir}/data/\n\
         log_dest file {dir}/mosquitto.log\n\
         log_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
         connection_messages true\n\
         # The ingest acknowledges a batch after committing it: let batches fill, keep its session.\n\
         max_inflight_messages 1000\n\
         max_queued_messages 100000\n\
         # The protocol's largest message is 256 KiB.\n\
         max_packet_size 300000\n\
         listener {} {}\n",
        broker.listen.port(),
        broker.listen.ip(),
        dir = dir.display(),
    );
    if let Some((addr, cert, key)) = &broker.tls {
        conf.push_str(&format!(
            "listener {} {}\ncertfile {}\nkeyfile {}\ntls_version tlsv1.2\n",
            addr.port(),
            addr.ip(),
            cert.display(),
            key.display()
        ));
        if let Some(ca) = client_ca {
            // Appliances show a certificate from the fleet's CA as well as their password.
            conf.push_str(&format!("cafile {}\nrequire_certificate true\n", ca.display()));
        }
    }
    if run_as_root {
        // Mosquitto started as root switches to the `mosquitto` user, which
        // cannot read rxfleet's private state directory.
        conf.push_str("user root\n");
    }
    conf
}

/// Where `rxfleet serve` notes the pid of the Mosquitto it started.
pub const PID_FILE: &str = "mosquitto.pid";

/// Stops a Mosquitto an earlier `rxfleet serve` of this state directory
/// started and left running (it was killed, or crashed): its pid is in
/// [`PID_FILE`] and its command line names this directory's configuration.
pub async fn stop_stale(dir: &Path) {
    let Some(pid) = std::fs::read_to_string(dir.join(PID_FILE)).ok().and_then(|t| t.trim().parse::<i32>().ok()) else {
        return;
    };
    let ours = std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| String::from_utf8_lossy(&c).contains(&dir.join("mosquitto.conf").display().to_string()))
        .unwrap_or(false);
    let Some(pid) = rustix::process::Pid::from_raw(pid).filter(|_| ours) else { return };
    tracing::warn!(pid = pid.as_raw_nonzero().get(), "stopping the managed Mosquitto an earlier rxfleet left running");
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
    for _ in 0..100 {
        if !Path::new(&format!("/proc/{}", pid.as_raw_nonzero())).exists() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
}

/// The password file: the ingest's account and every live device's.
pub fn passwd_file(ingest_user: &str, ingest_hash: &str, devices: &[(String, String)]) -> String {
    let mut text = format!("{ingest_user}:{ingest_hash}\n");
    for (device, hash) in devices {
        text.push_str(&format!("{device}:{hash}\n"));
    }
    text
}

/// Counters of the managed broker (for `/metrics`).
#[derive(Debug, Default)]
pub struct BrokerStats {
    /// Times Mosquitto exited and was started again.
    pub restarts: AtomicU64,
    /// Times the password file was rewritten and reloaded.
    pub reloads: AtomicU64,
}

/// The running managed broker.
pub struct Supervisor {
    dir: PathBuf,
    broker: ManagedBroker,
    ingest_user: String,
    ingest_hash: String,
    db: Db,
    stats: Arc<BrokerStats>,
}

impl Supervisor {
    /// Writes the broker's files and checks its port is free.
    pub async fn prepare(config: &FleetConfig, db: Db, stats: Arc<BrokerStats>) -> Result<Supervisor, BrokerError> {
        let broker = config.broker.managed.clone().expect("a managed broker is configured");
        let dir = managed_broker_dir(&config.state_dir);
        std::fs::create_dir_all(dir.join("data")).map_err(io(&dir))?;
        stop_stale(&dir).await;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io(&dir))?;
        for addr in std::iter::once(broker.listen).chain(broker.tls.as_ref().map(|t| t.0)) {
            std::net::TcpListener::bind(addr).map_err(|_| BrokerError::PortInUse { addr })?;
        }
        let password = ingest_password(&config.state_dir)?;
        let client_ca = config.broker.ca_dir.as_deref().map(crate::ca::cert_path);
        let conf = mosquitto_conf(&dir, &broker, client_ca.as_deref(), rustix::process::geteuid().is_root());
        write_private(&dir.join("mosquitto.conf"), &conf)?;
        write_private(&dir.join("rxvision.acl"), ACL)?;
        Ok(Supervisor {
            dir,
            broker,
            ingest_user: config.broker.username.clone(),
            ingest_hash: hash_password(&password),
            db,
            stats,
        })
    }

    async fn write_passwd(&self) -> Result<(), BrokerError> {
        let devices = self.db.broker_accounts().await?;
        write_private(&self.dir.join("passwd"), &passwd_file(&self.ingest_user, &self.ingest_hash, &devices))
    }

    async fn spawn(&self) -> Result<Child, BrokerError> {
        stop_stale(&self.dir).await;
        let child = Command::new(&self.broker.mosquitto)
            .arg("-c")
            .arg(self.dir.join("mosquitto.conf"))
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| BrokerError::Start(format!("cannot run {}: {e}", self.broker.mosquitto.display())))?;
        if let Some(pid) = child.id() {
            write_private(&self.dir.join(PID_FILE), &format!("{pid}\n"))?;
        }
        Ok(child)
    }

    /// Starts Mosquitto and waits (up to 10 s) until its listener accepts.
    pub async fn start(&self) -> Result<Child, BrokerError> {
        self.write_passwd().await?;
        let mut child = self.spawn().await?;
        let started = tokio::time::Instant::now();
        loop {
            if tokio::net::TcpStream::connect(self.broker.listen).await.is_ok() {
                return Ok(child);
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(BrokerError::Start(format!("mosquitto exited ({status}) at start: {}", self.log_tail())));
            }
            if started.elapsed() > Duration::from_secs(10) {
                return Err(BrokerError::Start(format!("mosquitto did not listen within 10 s: {}", self.log_tail())));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("mosquitto.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().rev().take(3).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    /// Keeps the broker running and its accounts current until `stop`
    /// changes; then stops it (SIGTERM, so it saves its persistence).
    pub async fn supervise(self, mut child: Child, mut stop: watch::Receiver<bool>) {
        let mut generation = self.db.registry_generation().await.ok();
        let mut delay = Duration::from_millis(500);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = stop.changed() => break,
                status = child.wait() => {
                    self.stats.restarts.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(status = ?status.ok(), log = %self.log_tail(), "mosquitto exited; restarting in {delay:?}");
                    tokio::select! {
                        _ = stop.changed() => return,
                        () = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(10));
                    match self.start().await {
                        Ok(new) => {
                            child = new;
                            tracing::info!("mosquitto restarted");
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "mosquitto did not restart");
                            child = match self.spawn().await {
                                Ok(c) => c,
                                Err(e) => {
                                    tracing::error!(error = %e, "giving up on the managed broker");
                                    return;
                                }
                            };
                        }
                    }
                }
                _ = tick.tick() => {
                    let now = match self.db.registry_generation().await {
                        Ok(g) => Some(g),
                        Err(e) => {
                            tracing::warn!(error = %e, "cannot read the registry generation");
                            continue;
                        }
                    };
                    if now != generation {
                        match self.write_passwd().await {
                            Ok(()) => {
                                if let Some(pid) = child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
                                    let _ = rustix::process::kill_process(pid, rustix::process::Signal::HUP);
                                }
                                self.stats.reloads.fetch_add(1, Ordering::Relaxed);
                                tracing::info!(generation = ?now, "broker accounts reloaded");
                                generation = now;
                                delay = Duration::from_millis(500);
                            }
                            Err(e) => tracing::error!(error = %e, "cannot write the broker's password file"),
                        }
                    }
                }
            }
        }
        if let Some(pid) = child.id().and_then(|p| rustix::process::Pid::from_raw(p as i32)) {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
        }
        if tokio::time::timeout(Duration::from_secs(5), child.wait()).await.is_err() {
            let _ = child.kill().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_names_its_files_and_listeners() {
        let broker = ManagedBroker {
            mosquitto: "mosquitto".into(),
            listen: "127.0.0.1:18830".parse().unwrap(),
            tls: Some(("0.0.0.0:18883".parse().unwrap(), "/c.pem".into(), "/k.pem".into())),
        };
        let conf = mosquitto_conf(Path::new("/s/mosquitto"), &broker, Some(Path::new("/ca/ca.crt")), false);
        for line in [
            "allow_anonymous false",
            "password_file /s/mosquitto/passwd",
            "acl_file /s/mosquitto/rxvision.acl",
            "listener 18830 127.0.0.1",
            "listener 18883 0.0.0.0",
            "certfile /c.pem",
            "cafile /ca/ca.crt",
            "require_certificate true",
        ] {
            assert!(conf.lines().any(|l| l == line), "{line} missing from\n{conf}");
        }
        assert!(!conf.contains("user root"));
        assert_eq!(
            passwd_file("rxfleet-ingest", "$7$h", &[("d1".into(), "$7$x".into())]),
            "rxfleet-ingest:$7$h\nd1:$7$x\n"
        );
    }
}
