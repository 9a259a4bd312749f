//! The shipped broker configuration (`packaging/mosquitto/`) against a real
//! Mosquitto on a free port: no anonymous access, wrong passwords refused,
//! and every device bound to its own topics by the pattern ACL.

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A Mosquitto started with the shipped configuration, TLS listener
/// replaced by a plain one on loopback; stopped when dropped.
pub struct Broker {
    child: Child,
    pub port: u16,
    conf: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether the Mosquitto tools are here; without them the test says so and,
/// where they must be (CI), fails.
pub fn tools_present(test: &str) -> bool {
    let present = ["mosquitto", "mosquitto_passwd", "mosquitto_pub", "mosquitto_sub"].iter().all(|tool| {
        Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
    });
    if !present {
        assert!(
            std::env::var_os("RXVISION_REQUIRE_REFERENCES").is_none(),
            "mosquitto and mosquitto-clients are not installed (scripts/setup-system installs them)"
        );
        eprintln!("SKIPPED {test}: mosquitto and mosquitto-clients are not installed");
    }
    present
}

/// Runs `openssl` in `dir`, failing the test with its complaint.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A self-signed CA in `dir`: `<name>.crt` and `<name>.key`.
pub fn make_ca(dir: &Path, name: &str, subject: &str) {
    let (cert, key) = (format!("{name}.crt"), format!("{name}.key"));
    openssl(
        dir,
        &[
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &cert, "-days", "2", "-subj",
            subject,
        ],
    );
}

/// A certificate for `subject` signed by the CA `ca.crt` in `dir` (with the
/// extensions of the file `extfile`, if any): `<name>.crt` and `<name>.key`.
fn sign(dir: &Path, name: &str, subject: &str, extfile: Option<&str>) {
    let (csr, cert, key) = (format!("{name}.csr"), format!("{name}.crt"), format!("{name}.key"));
    openssl(dir, &["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", subject]);
    let mut args = vec![
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        &cert,
        "-days",
        "2",
    ];
    if let Some(extfile) = extfile {
        args.extend(["-extfile", extfile]);
    }
    openssl(dir, &args);
}

/// A CA, and a server certificate for `localhost` signed by it, as the
/// shipped configuration names them (`ca.crt`, `server.crt`, `server.key`).
pub fn make_certificates(dir: &Path) {
    make_ca(dir, "ca", "/CN=rxvision test CA");
    std::fs::write(dir.join("san.ext"), "subjectAltName=DNS:localhost\n").unwrap();
    sign(dir, "server", "/CN=localhost", Some("san.ext"));
    // Mosquitto started as root reads its certificates after dropping to its
    // own user: the test's private directory must let it in.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    for file in ["ca.crt", "server.crt", "server.key"] {
        std::fs::set_permissions(dir.join(file), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
}

fn launch(conf: &Path, port: u16) -> Child {
    let child =
        Command::new("mosquitto").arg("-c").arg(conf).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(10), "mosquitto did not listen on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

impl Broker {
    /// Starts a broker whose accounts are `accounts` (name, password), on a
    /// plain loopback listener.
    pub fn start(accounts: &[(&str, &str)]) -> Broker {
        Broker::start_with(accounts, false)
    }

    /// Like [`Broker::start`], keeping the shipped TLS listener: a CA and a
    /// server certificate for `localhost` are made with `openssl`
    /// (`<dir>/ca.crt` is what appliances pin: [`Broker::ca_file`]).
    pub fn start_tls(accounts: &[(&str, &str)]) -> Broker {
        Broker::start_with(accounts, true)
    }

    /// A client certificate for `name` signed by the broker's CA: (certificate, key), the key mode 0600.
    pub fn client_certificate(&self, name: &str) -> (PathBuf, PathBuf) {
        let dir = self._dir.path();
        sign(dir, name, &format!("/CN={name}"), None);
        let (cert, key) = (format!("{name}.crt"), format!("{name}.key"));
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.join(&key), std::fs::Permissions::from_mode(0o600)).unwrap();
        (dir.join(cert), dir.join(key))
    }

    /// Like [`Broker::start_tls`], and the broker asks every client for a
    /// certificate signed by its CA (`require_certificate`).
    pub fn start_tls_with_client_certificates(accounts: &[(&str, &str)]) -> Broker {
        let mut broker = Broker::start_with(accounts, true);
        let mut conf = std::fs::read_to_string(&broker.conf).unwrap();
        conf.push_str("require_certificate true\n");
        std::fs::write(&broker.conf, conf).unwrap();
        broker.restart();
        broker
    }

    /// The CA a TLS broker's certificate is signed by.
    pub fn ca_file(&self) -> PathBuf {
        self._dir.path().join("ca.crt")
    }

    fn start_with(accounts: &[(&str, &str)], tls: bool) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let passwd = dir.path().join("passwd");
        for (i, (user, password)) in accounts.iter().enumerate() {
            let mut args = vec!["-b"];
            if i == 0 {
                args.insert(0, "-c");
            }
            let status =
                Command::new("mosquitto_passwd").args(&args).arg(&passwd).args([user, password]).status().unwrap();
            assert!(status.success(), "mosquitto_passwd failed for {user}");
        }
        Broker::start_in(dir, "", tls)
    }

    /// Starts a broker with a ready password file (`user:hash` lines) and
    /// `extra_acl` appended to the shipped ACL (many accounts, or a load generator's).
    pub fn start_with_passwd(passwd: &str, extra_acl: &str) -> Broker {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("passwd"), passwd).unwrap();
        Broker::start_in(dir, extra_acl, false)
    }

    /// The broker's process id.
    #[allow(dead_code)] // used by the benchmarks
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    fn start_in(dir: tempfile::TempDir, extra_acl: &str, tls: bool) -> Broker {
        let acl = std::fs::read_to_string(workspace().join("packaging/mosquitto/rxvision.acl")).unwrap();
        std::fs::write(dir.path().join("rxvision.acl"), format!("{extra_acl}\n{acl}")).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let shipped = std::fs::read_to_string(workspace().join("packaging/mosquitto/rxvision.conf")).unwrap();
        let mut config = String::new();
        for line in shipped.lines() {
            let line = line.replace("/etc/rxvision/mosquitto/", &format!("{}/", dir.path().display()));
            let line = line.replace("/var/lib/mosquitto/", &format!("{}/", dir.path().display()));
            match line.split_whitespace().next() {
                Some("listener") => config.push_str(&format!("listener {port} 127.0.0.1\n")),
                Some("certfile" | "keyfile" | "cafile" | "tls_version") if !tls => {}
                _ => config.push_str(&format!("{line}\n")),
            }
        }
        if tls {
            make_certificates(dir.path());
        }
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(&conf, config).unwrap();
        let child = launch(&conf, port);
        Broker { child, port, conf, _dir: dir }
    }

    /// Kills the broker (SIGKILL: no goodbye to anyone).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts it again on the same port with the same configuration and state.
    pub fn restart(&mut self) {
        self.kill();
        self.child = launch(&self.conf, self.port);
    }

    /// Publishes `message` as retained on `topic` with QoS 1.
    pub fn publish(&self, user: &str, password: &str, topic: &str, message: &str) -> Output {
        Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-u", user, "-P", password])
            .args(["-V", "mqttv311", "-q", "1", "-r", "-t", topic, "-m", message])
            .output()
            .unwrap()
    }

    /// Subscribes to `topic` and returns the first retained message, or
    /// nothing within a second (the publish was refused, or reading is).
    pub fn first_message(&self, user: &str, password: &str, topic: &str) -> (Output, String) {
        let output = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-u", user, "-P", password])
            .args(["-V", "mqttv311", "-q", "1", "-t", topic, "-C", "1", "-W", "1"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&output.stdout).trim().to_string();
        (output, text)
    }
}

const INGEST: (&str, &str) = ("rxfleet-ingest", "ingest-secret-1");
const A: (&str, &str) = ("store-1-counter-1", "device-a-secret");
const B: (&str, &str) = ("store-2-counter-1", "device-b-secret");

fn topic(device: &str, channel: &str) -> String {
    format!("rxv/v1/dev/{device}/{channel}")
}

#[test]
fn a_device_speaks_only_for_itself_and_hears_only_its_own_acks() {
    if !tools_present("a_device_speaks_only_for_itself_and_hears_only_its_own_acks") {
        return;
    }
    let broker = Broker::start(&[INGEST, A, B]);
    // A's own telemetry reaches the fleet's ingest.
    assert!(broker.publish(A.0, A.1, &topic(A.0, "telemetry"), "a-own").status.success());
    assert_eq!(broker.first_message(INGEST.0, INGEST.1, &topic(A.0, "telemetry")).1, "a-own");
    // A speaking as B: the broker drops it, the fleet never sees it.
    for channel in ["status", "telemetry", "events"] {
        broker.publish(A.0, A.1, &topic(B.0, channel), "a-as-b");
        let (_, seen) = broker.first_message(INGEST.0, INGEST.1, &topic(B.0, channel));
        assert_eq!(seen, "", "A published under B's {channel}");
    }
    // A device cannot forge acknowledgements or hints, not even its own.
    broker.publish(A.0, A.1, &topic(A.0, "ack"), "forged");
    assert_eq!(broker.first_message(A.0, A.1, &topic(A.0, "ack")).1, "", "a device wrote an ack");
    // The fleet acknowledges both; each device reads only its own.
    for device in [A.0, B.0] {
        assert!(broker.publish(INGEST.0, INGEST.1, &topic(device, "ack"), &format!("ack-{device}")).status.success());
        assert!(broker
            .publish(INGEST.0, INGEST.1, &topic(device, "desired"), &format!("hint-{device}"))
            .status
            .success());
    }
    assert_eq!(broker.first_message(A.0, A.1, &topic(A.0, "ack")).1, format!("ack-{}", A.0));
    assert_eq!(broker.first_message(A.0, A.1, &topic(A.0, "desired")).1, format!("hint-{}", A.0));
    for channel in ["ack", "desired"] {
        assert_eq!(broker.first_message(A.0, A.1, &topic(B.0, channel)).1, "", "A read B's {channel}");
    }
    // Wildcards give a device nothing of others either.
    assert_eq!(broker.first_message(A.0, A.1, "rxv/v1/dev/+/ack").1, format!("ack-{}", A.0));
    // The ingest cannot speak for a device.
    broker.publish(INGEST.0, INGEST.1, &topic(B.0, "events"), "ingest-as-b");
    assert_eq!(broker.first_message(INGEST.0, INGEST.1, &topic(B.0, "events")).1, "");
}

#[test]
fn anonymous_clients_and_wrong_passwords_are_refused() {
    if !tools_present("anonymous_clients_and_wrong_passwords_are_refused") {
        return;
    }
    let broker = Broker::start(&[INGEST, A]);
    let anonymous = Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &broker.port.to_string(), "-t", "rxv/#", "-C", "1", "-W", "1"])
        .output()
        .unwrap();
    assert!(!anonymous.status.success());
    assert!(String::from_utf8_lossy(&anonymous.stderr).contains("not authorised"), "{anonymous:?}");
    let (wrong, _) = broker.first_message(A.0, "not-the-password", &topic(A.0, "ack"));
    assert!(!wrong.status.success());
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("not authorised"), "{wrong:?}");
}
