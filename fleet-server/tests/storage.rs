//! The batch commit: deduplication, the contiguous acknowledgement, refusal
//! counts and chain-head anchoring, identical on SQLite and PostgreSQL.

use rxvision_fleet::classify::{classify, Incoming, RejectReason, Rejected};
use rxvision_fleet::config::DatabaseConfig;
use rxvision_fleet::db::{Backend, Db};
use rxvision_protocol::{ChainHead, Event, Status, Telemetry};

const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

fn golden<T: serde::de::DeserializeOwned>(name: &str) -> T {
    let path = format!("{}/../protocol/tests/golden/{name}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn head(next_seq: u64, c: char) -> ChainHead {
    ChainHead { next_seq, head: c.to_string().repeat(64) }
}

fn window(device: &str, seq: u64, scans: u64, audit: ChainHead) -> Incoming {
    let mut w: Telemetry = golden("telemetry.json");
    w.device_id = device.into();
    w.seq = seq;
    w.scans = scans;
    w.audit = audit;
    w.window.start_ms = seq * 60_000;
    w.window.end_ms = w.window.start_ms + 60_000;
    Incoming::Telemetry(w)
}

fn event(device: &str, seq: u64) -> Incoming {
    let mut e: Event = golden("event.json");
    e.device_id = device.into();
    e.seq = seq;
    Incoming::Event(e)
}

/// A status written at the device's `time_ms` (windows `seq` end at `(seq + 1)` minutes).
fn status(device: &str, online: bool, audit: Option<ChainHead>, time_ms: u64) -> Incoming {
    let mut s: Status = golden("status.json");
    s.time_ms = time_ms;
    s.device_id = device.into();
    s.online = online;
    s.audit = audit;
    Incoming::Status(s)
}

/// A database of each kind: a temporary SQLite file, and a fresh PostgreSQL
/// database (dropped at the end) when the server is reachable; without it
/// the test says so, and fails where it must run (CI).
pub(crate) struct Databases {
    sqlite_dir: tempfile::TempDir,
    postgres: Option<String>,
}

impl Databases {
    pub(crate) async fn new(test: &str) -> Databases {
        let sqlite_dir = tempfile::tempdir().unwrap();
        sqlx::any::install_default_drivers();
        let name = format!("rxfleet_{}_{}", test, std::process::id());
        let postgres = match <sqlx::AnyConnection as sqlx::Connection>::connect(PG_ADMIN_URL).await {
            Ok(mut admin) => {
                // Databases this test left behind in earlier runs go first (at most one stays).
                let stale = sqlx::query(&format!(
                    "SELECT CAST(datname AS TEXT) FROM pg_database WHERE datname LIKE 'rxfleet_{test}_%'"
                ))
                .fetch_all(&mut admin)
                .await
                .unwrap();
                for row in stale {
                    let stale: String = sqlx::Row::get(&row, 0);
                    let drop = format!("DROP DATABASE IF EXISTS {stale} WITH (FORCE)");
                    sqlx::Executor::execute(&mut admin, drop.as_str()).await.unwrap();
                }
                sqlx::Executor::execute(&mut admin, format!("CREATE DATABASE {name}").as_str()).await.unwrap();
                Some(format!("postgres://postgres@127.0.0.1:5432/{name}"))
            }
            Err(e) => {
                assert!(
                    std::env::var_os("RXVISION_REQUIRE_REFERENCES").is_none(),
                    "PostgreSQL on 127.0.0.1:5432 is required here: {e}"
                );
                eprintln!("SKIPPED the PostgreSQL half of {test}: {e}");
                None
            }
        };
        Databases { sqlite_dir, postgres }
    }

    pub(crate) fn urls(&self) -> Vec<String> {
        let mut urls = vec![format!("sqlite://{}/fleet.db", self.sqlite_dir.path().display())];
        urls.extend(self.postgres.clone());
        urls
    }

    pub(crate) async fn open_each(&self) -> Vec<Db> {
        let mut dbs = Vec::new();
        for url in self.urls() {
            dbs.push(Db::open(&DatabaseConfig { url, max_connections: 4 }).await.unwrap());
        }
        dbs
    }
}

#[tokio::test]
async fn migrations_run_once_and_a_reopened_database_keeps_everything() {
    let dbs = Databases::new("migrations").await;
    for db in dbs.open_each().await {
        assert_eq!(db.applied_migrations().await.unwrap(), [1, 2, 3, 4, 5]);
        db.commit(&[window("counter-1", 1, 5, head(10, 'a'))], &[], 1_000).await.unwrap();
        db.close().await;
    }
    for db in dbs.open_each().await {
        assert_eq!(db.applied_migrations().await.unwrap(), [1, 2, 3, 4, 5], "{:?}", db.backend());
        assert_eq!(db.stored_seqs("counter-1").await.unwrap(), [1], "{:?}", db.backend());
    }
}

#[tokio::test]
async fn replays_are_counted_once_and_the_ack_covers_only_a_contiguous_prefix() {
    let dbs = Databases::new("dedupe").await;
    for db in dbs.open_each().await {
        let backend = db.backend();
        let d = "counter-1";
        let first = db.commit(&[window(d, 1, 3, head(10, 'a')), event(d, 2)], &[], 1_000).await.unwrap();
        assert_eq!((first.stored, first.duplicates, first.acks[d]), (2, 0, 2), "{backend:?}");
        // Seq 4 before 3: stored, but the ack waits for the hole.
        let gap = db.commit(&[window(d, 4, 7, head(30, 'c'))], &[], 2_000).await.unwrap();
        assert_eq!((gap.stored, gap.acks[d]), (1, 2), "{backend:?}");
        // The device resends from 3: 3 is new, 4 is a replay, and the ack moves to 4.
        let resent =
            db.commit(&[window(d, 3, 2, head(20, 'b')), window(d, 4, 7, head(30, 'c'))], &[], 3_000).await.unwrap();
        assert_eq!((resent.stored, resent.duplicates, resent.acks[d]), (1, 1, 4), "{backend:?}");
        // A replay of everything changes nothing and is acknowledged again.
        let replay = db
            .commit(&[window(d, 1, 3, head(10, 'a')), event(d, 2), window(d, 3, 2, head(20, 'b'))], &[], 4_000)
            .await
            .unwrap();
        assert_eq!((replay.stored, replay.duplicates, replay.acks[d]), (0, 3, 4), "{backend:?}");
        let devices = db.devices().await.unwrap();
        assert_eq!(devices.len(), 1);
        let device = &devices[0];
        assert_eq!((device.acked_seq, device.windows, device.scans, device.events), (4, 3, 12, 1), "{backend:?}");
        assert_eq!(db.stored_seqs(d).await.unwrap(), [1, 2, 3, 4]);
        assert!(db.fleet_events(None).await.unwrap().is_empty(), "{backend:?}: a growing chain raised nothing");
    }
}

#[tokio::test]
async fn refusals_are_counted_by_device_channel_and_reason() {
    let dbs = Databases::new("rejects").await;
    let garbage = classify("rxv/v1/dev/counter-2/telemetry", b"garbage").unwrap_err();
    let foreign = {
        let mut w: Telemetry = golden("telemetry.json");
        w.device_id = "counter-3".into();
        classify("rxv/v1/dev/counter-2/telemetry", &serde_json::to_vec(&w).unwrap()).unwrap_err()
    };
    assert_eq!((garbage.reason, foreign.reason), (RejectReason::Malformed, RejectReason::WrongDevice));
    for db in dbs.open_each().await {
        let rejected: Vec<Rejected> = vec![garbage.clone(), garbage.clone(), foreign.clone()];
        let committed = db.commit(&[window("counter-2", 1, 1, head(1, 'a'))], &rejected, 5_000).await.unwrap();
        assert_eq!((committed.stored, committed.rejected), (1, 3));
        let counts: Vec<(String, String, i64)> =
            db.rejects().await.unwrap().into_iter().map(|r| (r.device_id, r.reason, r.count)).collect();
        assert_eq!(
            counts,
            [("counter-2".into(), "malformed".into(), 2), ("counter-2".into(), "wrong_device".into(), 1)],
            "{:?}",
            db.backend()
        );
        assert_eq!(db.devices().await.unwrap().len(), 1, "a refused payload creates no device");
    }
}

#[tokio::test]
async fn windows_whose_chain_shrinks_in_seq_order_are_flagged_in_order_or_not() {
    let dbs = Databases::new("windows").await;
    for db in dbs.open_each().await {
        let backend = db.backend();
        // In order, across batches and past an event: 1 (10), event 2, 3 (5): shorter.
        db.commit(&[window("w-1", 1, 1, head(10, 'a')), event("w-1", 2)], &[], 1_000).await.unwrap();
        let shrunk = db.commit(&[window("w-1", 3, 1, head(5, 'b'))], &[], 2_000).await.unwrap();
        assert_eq!(shrunk.rewrites.len(), 1, "{backend:?}: in order");
        // Out of order: 2 (50) then 1 (60), which is longer than the window after it.
        db.commit(&[window("w-2", 2, 1, head(50, 'c'))], &[], 1_000).await.unwrap();
        let late = db.commit(&[window("w-2", 1, 1, head(60, 'd'))], &[], 2_000).await.unwrap();
        assert_eq!(late.rewrites.len(), 1, "{backend:?}: out of order");
        // Growing windows in one batch and out of order raise nothing.
        let fine = db
            .commit(
                &[
                    window("w-3", 1, 1, head(10, 'e')),
                    window("w-3", 3, 1, head(30, 'f')),
                    window("w-3", 2, 1, head(20, 'g')),
                ],
                &[],
                1_000,
            )
            .await
            .unwrap();
        assert!(fine.rewrites.is_empty(), "{backend:?}: {:?}", fine.rewrites);
        assert_eq!(fine.acks["w-3"], 3);
        // In one batch: 3 (5) is shorter than 1 (10), and 2 (20), late, is
        // longer than 3, the window after it in the new epoch.
        let both = db
            .commit(
                &[
                    window("w-4", 1, 1, head(10, 'h')),
                    window("w-4", 3, 1, head(5, 'i')),
                    window("w-4", 2, 1, head(20, 'j')),
                ],
                &[],
                1_000,
            )
            .await
            .unwrap();
        assert_eq!(both.rewrites.len(), 2, "{backend:?}: {:?}", both.rewrites);
    }
}

#[tokio::test]
async fn a_restored_audit_store_is_flagged_once_and_an_outage_backlog_is_not() {
    let dbs = Databases::new("anchoring").await;
    for db in dbs.open_each().await {
        let backend = db.backend();
        let d = "counter-4";
        db.commit(&[status(d, true, Some(head(10, 'a')), 0), window(d, 1, 1, head(12, 'b'))], &[], 1_000)
            .await
            .unwrap();
        // Reconnect after an outage: the status (head now) comes first, the backlog's older heads after.
        let reconnect = db
            .commit(
                &[
                    status(d, true, Some(head(40, 'e')), 300_000),
                    window(d, 2, 1, head(20, 'c')),
                    window(d, 3, 1, head(30, 'd')),
                ],
                &[],
                2_000,
            )
            .await
            .unwrap();
        assert!(reconnect.rewrites.is_empty(), "{backend:?}: {:?}", reconnect.rewrites);
        // The ingest reconnects and the broker hands it the retained status
        // of an earlier connect again: older than windows reported since.
        let replayed = db.commit(&[status(d, true, Some(head(10, 'a')), 0)], &[], 2_500).await.unwrap();
        assert!(replayed.rewrites.is_empty(), "{backend:?}: {:?}", replayed.rewrites);
        // The store is restored from an older copy: shorter than reported before.
        let restored = db.commit(&[status(d, true, Some(head(15, 'x')), 400_000)], &[], 3_000).await.unwrap();
        assert_eq!(restored.rewrites.len(), 1, "{backend:?}");
        // It carries on from there: the same new chain does not raise it again.
        let later = db
            .commit(&[status(d, false, Some(head(15, 'x')), 410_000), window(d, 4, 1, head(16, 'y'))], &[], 4_000)
            .await
            .unwrap();
        assert!(later.rewrites.is_empty(), "{backend:?}: {:?}", later.rewrites);
        // A fork: the same length with another head.
        let forked = db.commit(&[status(d, true, Some(head(16, 'z')), 500_000)], &[], 5_000).await.unwrap();
        assert_eq!(forked.rewrites.len(), 1, "{backend:?}");
        let events = db.fleet_events(Some(d)).await.unwrap();
        let how: Vec<&str> = events.iter().map(|e| e.details["how"].as_str().unwrap()).collect();
        assert_eq!(how, ["shorter", "forked"], "{backend:?}");
        assert!(events.iter().all(|e| e.kind == "audit_chain_rewritten"));
        assert_eq!(events[0].details["previous"]["next_seq"], 40);
        let device = &db.devices().await.unwrap()[0];
        assert_eq!((device.chain_rewrites, device.online), (2, true), "{backend:?}");
        if backend == Backend::Postgres {
            // Every query above also ran on PostgreSQL.
            assert_eq!(db.stored_seqs(d).await.unwrap(), [1, 2, 3, 4]);
        }
    }
}

/// A small deterministic generator (the scenarios must be the same on every run).
struct Lcg(u64);

impl Lcg {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 33) % n
    }
}

/// What the fleet holds, comparable across databases (times left out).
async fn holdings(db: &Db, devices: &[String]) -> String {
    let mut out = String::new();
    for d in db.devices().await.unwrap() {
        out.push_str(&format!(
            "{} acked {} online {} rewrites {} windows {} scans {} events {}\n",
            d.device_id, d.acked_seq, d.online, d.chain_rewrites, d.windows, d.scans, d.events
        ));
    }
    for device in devices {
        out.push_str(&format!("{device} seqs {:?}\n", db.stored_seqs(device).await.unwrap()));
    }
    for e in db.fleet_events(None).await.unwrap() {
        out.push_str(&format!("{:?} {} {}\n", e.device_id, e.kind, e.details));
    }
    out
}

/// Several appliances' traffic as the ingest meets it: windows whose chain
/// grows (or not, without scans), statuses, events, resends, messages out
/// of order, and now and then a restored audit store (a shorter or forked chain).
fn scenario(rng: &mut Lcg, devices: &[String]) -> Vec<Incoming> {
    struct Device {
        seq: u64,
        length: u64,
        fork: u64,
    }
    let chain = |fork: u64, length: u64| ChainHead { next_seq: length, head: format!("{fork:016x}{length:048x}") };
    let mut state: Vec<Device> = devices.iter().map(|_| Device { seq: 0, length: 1, fork: 0 }).collect();
    let mut messages: Vec<Incoming> = Vec::new();
    for _ in 0..80 {
        let k = rng.below(devices.len() as u64) as usize;
        let (id, d) = (&devices[k], &mut state[k]);
        match rng.below(20) {
            0..=9 => {
                d.seq += 1;
                d.length += rng.below(4);
                messages.push(window(id, d.seq, 1, chain(d.fork, d.length)));
            }
            10..=11 => {
                d.seq += 1;
                messages.push(event(id, d.seq));
            }
            12..=14 => {
                let time_ms = (d.seq + 1) * 60_000 + 1_000;
                messages.push(status(id, rng.below(4) > 0, Some(chain(d.fork, d.length)), time_ms));
            }
            15 if !messages.is_empty() => {
                let again = messages[rng.below(messages.len() as u64) as usize].clone();
                messages.push(again);
            }
            16..=17 if messages.len() > 1 => {
                let at = messages.len() - 1;
                messages.swap(at, at - 1 - rng.below(at.min(8) as u64) as usize);
            }
            18 => {
                d.length = d.length.saturating_sub(rng.below(6)).max(1);
                d.fork += 1;
            }
            _ => d.seq += 1, // a message the ingest never sees (a hole)
        }
    }
    messages
}

#[tokio::test]
async fn a_batch_stores_what_its_messages_store_one_by_one() {
    let devices: Vec<String> = (1..=3).map(|k| format!("mix-{k}")).collect();
    let whole = Databases::new("whole").await;
    let single = Databases::new("single").await;
    let chunked = Databases::new("chunked").await;
    let mut rng = Lcg(7);
    let mut rewrites = 0;
    for round in 0..12 {
        let messages = scenario(&mut rng, &devices);
        let mut cuts = Vec::new();
        let mut at = 0;
        while at < messages.len() {
            let len = 1 + rng.below(12) as usize;
            cuts.push(at..(at + len).min(messages.len()));
            at += len;
        }
        for ((a, b), c) in
            whole.open_each().await.into_iter().zip(single.open_each().await).zip(chunked.open_each().await)
        {
            let backend = a.backend();
            let committed = a.commit(&messages, &[], 1_000).await.unwrap();
            rewrites += committed.rewrites.len();
            for message in &messages {
                b.commit(std::slice::from_ref(message), &[], 1_000).await.unwrap();
            }
            for cut in &cuts {
                c.commit(&messages[cut.clone()], &[], 1_000).await.unwrap();
            }
            let expected = holdings(&b, &devices).await;
            assert_eq!(holdings(&a, &devices).await, expected, "{backend:?}, round {round}: one batch");
            assert_eq!(holdings(&c, &devices).await, expected, "{backend:?}, round {round}: batches of 1-12");
            for db in [a, b, c] {
                db.close().await;
            }
        }
    }
    assert!(rewrites > 0, "the scenarios restore an audit store now and then");
}

/// A window of `device` on `version` ending in `hour` (Unix hours), with
/// 10 scans of which `uncertain` UNCERTAIN and the rest MATCH.
fn versioned_window(device: &str, seq: u64, version: &str, hour: u64, uncertain: u64) -> Incoming {
    let Incoming::Telemetry(mut w) = window(device, seq, 10, head(seq * 10, 'v')) else { unreachable!() };
    w.model_version = version.into();
    w.window.end_ms = hour * 3_600_000 + 30 * 60_000;
    w.window.start_ms = w.window.end_ms - 60_000;
    w.verdicts = [("MATCH".to_string(), 10 - uncertain), ("UNCERTAIN".to_string(), uncertain)].into();
    Incoming::Telemetry(w)
}

#[tokio::test]
async fn a_stage_is_compared_with_its_control_cohort_on_their_own_versions_over_the_same_hours() {
    use rxvision_fleet::rollout::evidence::StageQuery;
    use rxvision_fleet::rollout::in_stage;
    use rxvision_fleet::rollout::stage::Metric;
    let dbs = Databases::new("evidence").await;
    let ids: Vec<String> = (0..40).map(|n| format!("ev-{n:02}")).collect();
    let (stage, control): (Vec<&String>, Vec<&String>) = ids.iter().partition(|id| in_stage(id, 50));
    assert!(stage.len() >= 3 && control.len() >= 3, "both cohorts hold devices");
    let hour = 480_000; // the stage began at this hour
    for db in dbs.open_each().await {
        let backend = db.backend();
        for id in &ids {
            db.add_device(id, "site-ev", None, "cli:test", 0).await.unwrap();
        }
        let mut batch = Vec::new();
        // Stage devices on 2.0 with 3 UNCERTAIN in 10, except the last, not yet updated.
        for (k, id) in stage.iter().enumerate() {
            let version = if k + 1 == stage.len() { "1.0" } else { "2.0" };
            batch.push(versioned_window(id, 1, version, hour, 3));
            batch.push(versioned_window(id, 2, version, hour + 1, 3));
        }
        // Control devices on 1.0 with 1 in 10, except the last, on another version;
        // and windows from before the stage began, which do not count.
        for (k, id) in control.iter().enumerate() {
            let version = if k + 1 == control.len() { "0.9" } else { "1.0" };
            batch.push(versioned_window(id, 1, version, hour - 2, 9));
            batch.push(versioned_window(id, 2, version, hour, 1));
            batch.push(versioned_window(id, 3, version, hour + 1, 1));
        }
        db.commit(&batch, &[], 1_000).await.unwrap();
        let query =
            StageQuery { candidate: "2.0", previous: "1.0", percent: 50, since_ms: hour as i64 * 3_600_000 + 600_000 };
        let evidence = db.stage_evidence(&query).await.unwrap();
        let (s, c) = ((stage.len() - 1) as u64, (control.len() - 1) as u64);
        assert_eq!(evidence.stage_devices as usize, stage.len(), "{backend:?}");
        assert_eq!(u64::from(evidence.stage_devices_reporting), s, "{backend:?}: the device on 1.0 is not evidence");
        assert_eq!(evidence.stage_scans, s * 20, "{backend:?}");
        let uncertain = &evidence.metrics[&Metric::Uncertain];
        assert_eq!(uncertain.len(), 2, "{backend:?}: one period per hour since the stage began");
        for period in uncertain {
            assert_eq!(
                (period.stage_events, period.stage_exposure, period.control_events, period.control_exposure),
                (3 * s, 10 * s, c, 10 * c),
                "{backend:?}"
            );
        }
        let automation = &evidence.metrics[&Metric::NotAutomated][0];
        assert_eq!((automation.stage_events, automation.stage_exposure), (3 * s, 10 * s), "{backend:?}");
        assert!(evidence.last_telemetry_ms.is_some());
    }
}

#[tokio::test]
async fn a_rollout_is_started_commanded_judged_and_halted_with_its_numbers_kept() {
    use rxvision_fleet::rollout::in_stage;
    use rxvision_fleet::rollout::stage::{Outcome, Plan, State};
    use rxvision_fleet::rollout::store::{AdminCommand, RolloutError};
    let dbs = Databases::new("rollouts").await;
    let ids: Vec<String> = (0..40).map(|n| format!("ro-{n:02}")).collect();
    let hour: u64 = 480_000;
    let start_ms = hour as i64 * 3_600_000;
    let plan = Plan { stages: vec![50, 100], ..Plan::default() };
    for db in dbs.open_each().await {
        let backend = db.backend();
        for id in &ids {
            db.add_device(id, "site-ro", None, "cli:test", 0).await.unwrap();
        }
        let bad = Plan { stages: vec![100], ..Plan::default() };
        assert!(matches!(
            db.start_rollout("2.0", "1.0", &bad, "cli:alice", start_ms).await,
            Err(RolloutError::Invalid(_))
        ));
        assert!(matches!(
            db.start_rollout("1.0", "1.0", &plan, "cli:alice", start_ms).await,
            Err(RolloutError::Invalid(_))
        ));
        let first = db.start_rollout("1.5", "1.0", &plan, "cli:alice", start_ms).await.unwrap();
        assert_eq!((first.percent, first.state.clone()), (50, State::Running { stage: 0, since_ms: start_ms }));
        let again = db.start_rollout("2.0", "1.0", &plan, "cli:bob", start_ms).await;
        assert!(matches!(again, Err(RolloutError::Conflict(_))), "{backend:?}: one active rollout");
        // Admin commands, and one the state does not take.
        let paused = db.command_rollout(first.id, AdminCommand::Pause, "cli:alice", start_ms + 1).await.unwrap();
        assert!(matches!(paused.state, State::Paused { .. }));
        assert!(db.decide_rollout((0, 0), start_ms + 2).await.unwrap().is_none(), "a paused rollout is not judged");
        let refused = db.command_rollout(first.id, AdminCommand::Approve, "cli:alice", start_ms + 2).await;
        assert!(matches!(refused, Err(RolloutError::Conflict(_))), "{backend:?}");
        db.command_rollout(first.id, AdminCommand::Resume, "cli:alice", start_ms + 3).await.unwrap();
        // No telemetry yet: keep watching; the judgement is kept, nothing moves.
        let soaking = db.decide_rollout((0, 0), start_ms + 60_000).await.unwrap().unwrap();
        assert!(matches!(soaking.outcome, Outcome::Continue(_)), "{:?}", soaking.outcome);
        let aborted = db.command_rollout(first.id, AdminCommand::Abort, "cli:bob", start_ms + 70_000).await.unwrap();
        assert_eq!((aborted.percent, aborted.state.is_final()), (0, true));
        assert!(db.active_rollout().await.unwrap().is_none());

        // A worse candidate: its stage answers UNCERTAIN three times as often.
        let rollout = db.start_rollout("2.0", "1.0", &plan, "cli:alice", start_ms).await.unwrap();
        let mut batch = Vec::new();
        for id in &ids {
            let (version, uncertain) = if in_stage(id, 50) { ("2.0", 3) } else { ("1.0", 1) };
            for seq in 1..=3 {
                batch.push(versioned_window(id, seq, version, hour, uncertain));
            }
        }
        db.commit(&batch, &[], 1_000).await.unwrap();
        let halt = db.decide_rollout((0, 0), start_ms + 30 * 60_000).await.unwrap().unwrap();
        assert!(
            matches!(&halt.outcome, Outcome::Fail(why) if why.contains("uncertain")),
            "{backend:?}: {:?}",
            halt.outcome
        );
        let halted = db.rollout(rollout.id).await.unwrap().unwrap();
        assert!(matches!(halted.state, State::Halted { stage: 0, .. }) && halted.percent == 0, "{:?}", halted.state);
        let kept = db.rollout_decisions(rollout.id, 10).await.unwrap();
        assert_eq!(kept, [halt.clone()], "{backend:?}: the judgement is kept with its numbers");
        let uncertain = halt.metrics.iter().find(|m| m.metric.as_str() == "uncertain").unwrap();
        assert!(uncertain.interval.0 > 1.1, "{uncertain:?}");
        let events: Vec<String> = db.fleet_events(None).await.unwrap().into_iter().map(|e| e.kind).collect();
        for kind in ["rollout_started", "rollout_paused", "rollout_resumed", "rollout_aborted", "rollout_halted"] {
            assert!(events.iter().any(|k| k == kind), "{backend:?}: {kind} in {events:?}");
        }
        assert!(!events.iter().any(|k| k == "rollout_judged"), "a judgement that moves nothing is not a fleet event");
    }
}
