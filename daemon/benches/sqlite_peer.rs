//! The benchmarks' outside reference: SQLite through Python's sqlite3 (the
//! SQLite of this machine), durable inserts of records of the same size.

use std::path::Path;
use std::process::Command;

/// SQLite's durable inserts per second with `writers` threads (one
/// connection each), through Python's sqlite3 (the SQLite of this machine).
pub fn sqlite_peer(dir: &Path, writers: u64, n: u64, bytes: usize) -> Result<f64, String> {
    let python = std::env::var("RXVISION_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = format!(
        r#"
import os, sqlite3, threading, time
path = os.path.join({dir:?}, "peer-{writers}.sqlite")
setup = sqlite3.connect(path, isolation_level=None)
setup.execute("PRAGMA journal_mode=WAL")
setup.execute("CREATE TABLE audit (seq INTEGER PRIMARY KEY AUTOINCREMENT, value BLOB)")
blob = os.urandom({bytes})
def writer(count):
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA synchronous=FULL"); db.execute("PRAGMA busy_timeout=60000")
    for _ in range(count):
        db.execute("INSERT INTO audit (value) VALUES (?)", (blob,))
threads = [threading.Thread(target=writer, args=({n} // {writers},)) for _ in range({writers})]
t = time.perf_counter()
for th in threads: th.start()
for th in threads: th.join()
print(({n} // {writers}) * {writers} / (time.perf_counter() - t))
"#,
        dir = dir.display().to_string()
    );
    let out = Command::new(python).arg("-c").arg(script).output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().map_err(|e| format!("{e}"))
}
