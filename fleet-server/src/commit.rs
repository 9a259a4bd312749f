//! The ingest's batch commit, written for throughput: what the batch needs
//! from the database is read once per batch, the messages are judged in
//! memory in arrival order, and the rows they make are written with
//! multi-row statements.
//!
//! A batch costs a handful of statements per few hundred devices (upsert
//! the devices, read their state, their stored-but-unacknowledged `seq`s
//! and the chain heads reported before at the lengths the batch reports),
//! one multi-row insert per table, one acknowledgement update, and the
//! rollups. Statements per message remain only where the answer depends on
//! the message: a status (its online state, and the longest chain reported
//! as of its time), a window arriving out of order (its neighbours, read
//! after the batch's earlier rows are written), and a rewritten chain.
//!
//! The judgement is the one [`crate::db::Db::commit`] documents: each
//! message sees the database as it was before the batch plus the batch's
//! earlier messages, as if they were committed one by one.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use rxvision_protocol::{ChainHead, Event, Status, Telemetry};
use sqlx::any::{AnyArguments, AnyRow};
use sqlx::query::Query;
use sqlx::{Any, Row};

use crate::chain::{self, History, Rewrite, Source};
use crate::classify::{Incoming, Rejected};
use crate::db::{Backend, Committed, DbError, Tx};
use crate::rollup::BatchRollup;

/// Bind parameters in one statement: below PostgreSQL's 65,535 and
/// SQLite's 32,766.
const MAX_PARAMETERS: usize = 30_000;
/// Rows in one multi-row statement (or devices in one read).
const MAX_ROWS: usize = 500;
/// Devices in one chain-head read (each is a term of an `OR`).
const HEAD_READ_DEVICES: usize = 100;

type AnyQuery<'q> = Query<'q, Any, AnyArguments<'q>>;

fn i(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn u(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

/// Placeholders for statements with many parameters, in binding order.
///
/// PostgreSQL needs `$N`. SQLite gets anonymous `?`: sqlx binds a named
/// parameter (`$N`) by looking its name up, and SQLite finds a name by a
/// scan of the statement's names, so a 12,000-parameter insert spent most
/// of a second binding.
struct Params {
    numbered: bool,
    next: usize,
}

impl Params {
    fn new(backend: Backend) -> Params {
        Params { numbered: backend == Backend::Postgres, next: 0 }
    }

    /// The next parameter's placeholder.
    fn next(&mut self) -> String {
        self.next += 1;
        if self.numbered {
            format!("${}", self.next)
        } else {
            "?".to_string()
        }
    }

    /// `n` placeholders separated by commas.
    fn list(&mut self, n: usize) -> String {
        (0..n).map(|_| self.next()).collect::<Vec<_>>().join(", ")
    }
}

/// `INSERT INTO … VALUES (…), (…) {tail}` over `rows`, in as few statements
/// as the parameter limit allows.
pub(crate) async fn insert_rows<R>(
    tx: &mut Tx<'_>,
    backend: Backend,
    into: &str,
    columns: usize,
    tail: &str,
    rows: &[R],
    bind: impl for<'q> Fn(AnyQuery<'q>, &'q R) -> AnyQuery<'q>,
) -> Result<(), DbError> {
    let per_statement = (MAX_PARAMETERS / columns).clamp(1, MAX_ROWS);
    for chunk in rows.chunks(per_statement) {
        let mut params = Params::new(backend);
        let values: Vec<String> = chunk.iter().map(|_| format!("({})", params.list(columns))).collect();
        let sql = format!("{into} VALUES {} {tail}", values.join(", "));
        let mut query = sqlx::query(&sql);
        for row in chunk {
            query = bind(query, row);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// A chain head the device reported before, at a length.
#[derive(Debug, Clone)]
struct KnownHead {
    head: String,
    /// When it was the head, by the device's clock.
    device_ms: u64,
}

/// What the batch knows of a device: read once, then kept up to date by
/// the batch's messages.
#[derive(Debug)]
struct DeviceState {
    /// Every message up to this `seq` was committed before the batch.
    acked: u64,
    /// The current epoch of its chain-head history.
    epoch: i64,
    /// The epoch before the batch.
    loaded_epoch: i64,
    /// Of the chain heads stored before the batch (that epoch), the longest:
    /// (length, when it was the head by the device's clock).
    longest_stored: Option<(u64, u64)>,
    /// The highest `seq` stored.
    max_seq: u64,
    /// The chain head of the stored window with the highest `seq`, if it is
    /// of the current epoch: the previous window of one above `max_seq`.
    last_window: Option<ChainHead>,
    /// Its site in the registry (unregistered: none).
    site: Option<String>,
    /// `seq`s stored above `acked`, before the batch and by it.
    stored_above: BTreeSet<u64>,
    /// Chain heads by (epoch, length): those stored before the batch at the
    /// lengths the batch reports, and every one the batch records.
    heads: BTreeMap<(i64, u64), KnownHead>,
    /// Chain-head lengths the batch reports: (lowest, highest).
    reported: Option<(u64, u64)>,
}

/// A chain-head report to record.
#[derive(Debug)]
struct HeadRow {
    device: String,
    epoch: i64,
    next_seq: u64,
    head: String,
    source: &'static str,
    device_ms: u64,
}

/// Rows the batch has made and not yet written.
#[derive(Debug, Default)]
struct Pending<'a> {
    /// (device, seq, channel, payload)
    messages: Vec<(&'a str, u64, &'static str, String)>,
    windows: Vec<(&'a Telemetry, i64)>,
    events: Vec<&'a Event>,
    heads: Vec<HeadRow>,
}

/// Stores one batch inside `tx` (see the module documentation).
pub(crate) async fn write(
    tx: &mut Tx<'_>,
    backend: Backend,
    accepted: &[Incoming],
    rejected: &[Rejected],
    now_ms: u64,
) -> Result<Committed, DbError> {
    let mut out = Committed::default();
    let mut states = load_devices(tx, backend, accepted, now_ms).await?;
    let mut pending = Pending::default();
    let mut rollup = BatchRollup::default();
    let mut sequenced: BTreeSet<&str> = BTreeSet::new();
    for message in accepted {
        let device = message.device_id();
        let state = states.get_mut(device).expect("every device of the batch is loaded");
        match message {
            Incoming::Status(status) => {
                out.statuses += 1;
                if let Some(head) = &status.audit {
                    let report = Report { head, window_seq: None, device_ms: status.time_ms };
                    if let Some(rewrite) =
                        check_chain(tx, backend, &mut pending, device, state, &report, now_ms).await?
                    {
                        out.rewrites.push((device.to_string(), rewrite));
                    }
                }
            }
            Incoming::Telemetry(window) => {
                sequenced.insert(device);
                if !is_new(state, window.seq, &mut out) {
                    continue;
                }
                let payload = serde_json::to_string(window).expect("a window serialises");
                pending.messages.push((device, window.seq, "telemetry", payload));
                let report =
                    Report { head: &window.audit, window_seq: Some(window.seq), device_ms: window.window.end_ms };
                if let Some(rewrite) = check_chain(tx, backend, &mut pending, device, state, &report, now_ms).await? {
                    out.rewrites.push((device.to_string(), rewrite));
                }
                pending.windows.push((window, state.epoch));
                rollup.add(window, state.site.as_deref());
                if window.seq > state.max_seq {
                    state.last_window = Some(window.audit.clone());
                }
                state.max_seq = state.max_seq.max(window.seq);
            }
            Incoming::Event(event) => {
                sequenced.insert(device);
                if !is_new(state, event.seq, &mut out) {
                    continue;
                }
                let payload = serde_json::to_string(event).expect("an event serialises");
                pending.messages.push((device, event.seq, "events", payload));
                pending.events.push(event);
                state.max_seq = state.max_seq.max(event.seq);
            }
        }
    }
    flush(tx, backend, &mut pending, now_ms).await?;
    let mut advanced = Vec::new();
    for device in sequenced {
        let state = &states[device];
        let mut contiguous = state.acked;
        for seq in &state.stored_above {
            if *seq != contiguous + 1 {
                break;
            }
            contiguous = *seq;
        }
        if contiguous != state.acked {
            advanced.push((device, contiguous));
        }
        out.acks.insert(device.to_string(), contiguous);
    }
    advance_acks(tx, backend, &advanced).await?;
    crate::db::Db::add_rollups(tx, backend, &rollup).await?;
    for refusal in rejected {
        sqlx::query(
            "INSERT INTO ingest_rejects (device_id, channel, reason, count, last_ms, last_error) \
             VALUES ($1, $2, $3, 1, $4, $5) \
             ON CONFLICT (device_id, channel, reason) DO UPDATE SET count = ingest_rejects.count + 1, \
             last_ms = excluded.last_ms, last_error = excluded.last_error",
        )
        .bind(&refusal.device_id)
        .bind(&refusal.channel)
        .bind(refusal.reason.as_str())
        .bind(i(now_ms))
        .bind(&refusal.error)
        .execute(&mut **tx)
        .await?;
        out.rejected += 1;
    }
    Ok(out)
}

/// Whether a numbered message is new (not at or below the device's
/// acknowledged `seq`, nor stored above it, before or by this batch); counts it.
fn is_new(state: &mut DeviceState, seq: u64, out: &mut Committed) -> bool {
    let new = seq > state.acked && state.stored_above.insert(seq);
    if new {
        out.stored += 1;
    } else {
        out.duplicates += 1;
    }
    new
}

/// Creates the rows of devices not seen before, notes that every device of
/// the batch was seen, and reads what the batch needs of each.
async fn load_devices(
    tx: &mut Tx<'_>,
    backend: Backend,
    accepted: &[Incoming],
    now_ms: u64,
) -> Result<HashMap<String, DeviceState>, DbError> {
    let mut reported: BTreeMap<&str, Option<(u64, u64)>> = BTreeMap::new();
    let mut statuses: HashMap<&str, StatusRow> = HashMap::new();
    for message in accepted {
        if let Incoming::Status(status) = message {
            statuses.entry(message.device_id()).or_default().apply(status);
        }
        let head = match message {
            Incoming::Status(status) => status.audit.as_ref(),
            Incoming::Telemetry(window) => Some(&window.audit),
            Incoming::Event(_) => None,
        };
        let range = reported.entry(message.device_id()).or_default();
        if let Some(head) = head {
            let (low, high) = range.get_or_insert((head.next_seq, head.next_seq));
            *low = (*low).min(head.next_seq);
            *high = (*high).max(head.next_seq);
        }
    }
    // Sorted by id: one lock order for every writer.
    let ids: Vec<&str> = reported.keys().copied().collect();
    let mut states = HashMap::with_capacity(ids.len());
    for chunk in ids.chunks(MAX_ROWS) {
        let devices: Vec<(&str, Option<&StatusRow>)> = chunk.iter().map(|id| (*id, statuses.get(id))).collect();
        upsert_devices(tx, backend, &devices, now_ms).await?;

        let list = Params::new(backend).list(chunk.len());
        let last_window = |column: &str| {
            format!(
                "(SELECT w.{column} FROM telemetry_windows w WHERE w.device_id = d.device_id ORDER BY w.seq DESC LIMIT 1)"
            )
        };
        let longest_head = |column: &str| {
            format!(
                "(SELECT a.{column} FROM audit_heads a WHERE a.device_id = d.device_id \
                 AND a.chain_epoch = d.chain_epoch ORDER BY a.next_seq DESC LIMIT 1)"
            )
        };
        let sql = format!(
            "SELECT d.device_id, d.acked_seq, d.chain_epoch, \
             (SELECT r.site FROM device_registry r WHERE r.device_id = d.device_id), {}, {}, {}, {}, {} \
             FROM devices d WHERE d.device_id IN ({list})",
            last_window("audit_next_seq"),
            last_window("audit_head"),
            last_window("chain_epoch"),
            longest_head("next_seq"),
            longest_head("device_ms"),
        );
        let mut query = sqlx::query(&sql);
        for id in chunk {
            query = query.bind(*id);
        }
        for row in query.fetch_all(&mut **tx).await? {
            let device: String = row.get(0);
            let epoch: i64 = row.get(2);
            let last_window =
                match (row.get::<Option<i64>, _>(4), row.get::<Option<String>, _>(5), row.get::<Option<i64>, _>(6)) {
                    (Some(next_seq), Some(head), Some(window_epoch)) if window_epoch == epoch => {
                        Some(ChainHead { next_seq: u(next_seq), head })
                    }
                    _ => None,
                };
            let longest_stored = match (row.get::<Option<i64>, _>(7), row.get::<Option<i64>, _>(8)) {
                (Some(next_seq), Some(device_ms)) => Some((u(next_seq), u(device_ms))),
                _ => None,
            };
            let state = DeviceState {
                acked: u(row.get(1)),
                epoch,
                loaded_epoch: epoch,
                longest_stored,
                max_seq: 0,
                last_window,
                site: row.get(3),
                stored_above: BTreeSet::new(),
                heads: BTreeMap::new(),
                reported: reported.get(device.as_str()).copied().flatten(),
            };
            states.insert(device, state);
        }

        let sql = format!(
            "SELECT m.device_id, m.seq FROM device_messages m JOIN devices d ON d.device_id = m.device_id \
             WHERE d.device_id IN ({list}) AND m.seq > d.acked_seq"
        );
        let mut query = sqlx::query(&sql);
        for id in chunk {
            query = query.bind(*id);
        }
        for row in query.fetch_all(&mut **tx).await? {
            if let Some(state) = states.get_mut(row.get::<String, _>(0).as_str()) {
                state.stored_above.insert(u(row.get(1)));
            }
        }
    }
    for state in states.values_mut() {
        state.max_seq = state.stored_above.last().copied().unwrap_or(0).max(state.acked);
    }

    // The heads stored before at the lengths the batch reports.
    let with_reports: Vec<(&str, i64, (u64, u64))> = ids
        .iter()
        .filter_map(|id| states.get(*id).and_then(|s| s.reported.map(|range| (*id, s.epoch, range))))
        .collect();
    for chunk in with_reports.chunks(HEAD_READ_DEVICES) {
        let mut params = Params::new(backend);
        let terms: Vec<String> = chunk
            .iter()
            .map(|_| {
                let (device, epoch, low, high) = (params.next(), params.next(), params.next(), params.next());
                format!("(device_id = {device} AND chain_epoch = {epoch} AND next_seq >= {low} AND next_seq <= {high})")
            })
            .collect();
        let sql = format!(
            "SELECT device_id, chain_epoch, next_seq, head, device_ms FROM audit_heads WHERE {}",
            terms.join(" OR ")
        );
        let mut query = sqlx::query(&sql);
        for (id, epoch, (low, high)) in chunk {
            query = query.bind(*id).bind(*epoch).bind(i(*low)).bind(i(*high));
        }
        for row in query.fetch_all(&mut **tx).await? {
            if let Some(state) = states.get_mut(row.get::<String, _>(0).as_str()) {
                let known = KnownHead { head: row.get(3), device_ms: u(row.get(4)) };
                state.heads.insert((row.get(1), u(row.get(2))), known);
            }
        }
    }
    Ok(states)
}

/// A device's statuses in the batch, applied in arrival order: online
/// state and time from the latest; versions, engine and outbox from the
/// latest that carries them (a last will carries none, and the device's
/// last known versions stay).
#[derive(Debug, Default)]
struct StatusRow {
    online: i64,
    time_ms: i64,
    json: String,
    daemon_version: Option<String>,
    model_version: Option<String>,
    engine: Option<String>,
    gpu_degraded: Option<i64>,
    engine_fallbacks: Option<i64>,
    outbox_depth: Option<i64>,
    outbox_oldest_unacked_s: Option<i64>,
}

impl StatusRow {
    fn apply(&mut self, status: &Status) {
        self.online = i64::from(status.online);
        self.time_ms = i(status.time_ms);
        self.json = serde_json::to_string(status).expect("a status serialises");
        let keep = |mine: &mut Option<String>, theirs: Option<&String>| {
            if let Some(value) = theirs {
                *mine = Some(value.clone());
            }
        };
        keep(&mut self.daemon_version, status.daemon_version.as_ref());
        keep(&mut self.model_version, status.model.as_ref().map(|m| &m.version));
        keep(&mut self.engine, status.engine.as_ref().map(|e| &e.active));
        if let Some(engine) = &status.engine {
            self.gpu_degraded = Some(i64::from(engine.gpu_degraded));
            self.engine_fallbacks = Some(i(engine.fallbacks));
        }
        if let Some(outbox) = &status.outbox {
            self.outbox_depth = Some(i(outbox.depth));
            self.outbox_oldest_unacked_s = Some(i(outbox.oldest_unacked_s));
        }
    }
}

/// Notes that the devices were seen (creating the rows of new ones) and
/// applies their statuses: one statement per few hundred devices.
async fn upsert_devices(
    tx: &mut Tx<'_>,
    backend: Backend,
    devices: &[(&str, Option<&StatusRow>)],
    now_ms: u64,
) -> Result<(), DbError> {
    let now = i(now_ms);
    let (with_status, seen_only): (Vec<_>, Vec<_>) = devices.iter().partition(|(_, status)| status.is_some());
    let seen_only: Vec<&str> = seen_only.iter().map(|(id, _)| *id).collect();
    insert_rows(
        tx,
        backend,
        "INSERT INTO devices (device_id, first_seen_ms, last_seen_ms, acked_seq, online, chain_epoch)",
        6,
        "ON CONFLICT (device_id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms",
        &seen_only,
        |query, id| query.bind(*id).bind(now).bind(now).bind(0_i64).bind(0_i64).bind(0_i64),
    )
    .await?;
    let with_status: Vec<(&str, &StatusRow)> =
        with_status.iter().filter_map(|(id, status)| status.map(|s| (*id, s))).collect();
    insert_rows(
        tx,
        backend,
        "INSERT INTO devices (device_id, first_seen_ms, last_seen_ms, acked_seq, chain_epoch, online, status_ms, \
         status, status_received_ms, daemon_version, model_version, engine, gpu_degraded, engine_fallbacks, \
         outbox_depth, outbox_oldest_unacked_s)",
        16,
        "ON CONFLICT (device_id) DO UPDATE SET last_seen_ms = excluded.last_seen_ms, online = excluded.online, \
         status_ms = excluded.status_ms, status = excluded.status, status_received_ms = excluded.status_received_ms, \
         daemon_version = COALESCE(excluded.daemon_version, devices.daemon_version), \
         model_version = COALESCE(excluded.model_version, devices.model_version), \
         engine = COALESCE(excluded.engine, devices.engine), \
         gpu_degraded = COALESCE(excluded.gpu_degraded, devices.gpu_degraded), \
         engine_fallbacks = COALESCE(excluded.engine_fallbacks, devices.engine_fallbacks), \
         outbox_depth = COALESCE(excluded.outbox_depth, devices.outbox_depth), \
         outbox_oldest_unacked_s = COALESCE(excluded.outbox_oldest_unacked_s, devices.outbox_oldest_unacked_s)",
        &with_status,
        |query, (id, s)| {
            query
                .bind(*id)
                .bind(now)
                .bind(now)
                .bind(0_i64)
                .bind(0_i64)
                .bind(s.online)
                .bind(s.time_ms)
                .bind(&s.json)
                .bind(now)
                .bind(&s.daemon_version)
                .bind(&s.model_version)
                .bind(&s.engine)
                .bind(s.gpu_degraded)
                .bind(s.engine_fallbacks)
                .bind(s.outbox_depth)
                .bind(s.outbox_oldest_unacked_s)
        },
    )
    .await
}

/// Writes the rows the batch has made so far.
async fn flush(tx: &mut Tx<'_>, backend: Backend, pending: &mut Pending<'_>, now_ms: u64) -> Result<(), DbError> {
    let received = i(now_ms);
    insert_rows(
        tx,
        backend,
        "INSERT INTO device_messages (device_id, seq, channel, received_ms, payload)",
        5,
        "ON CONFLICT (device_id, seq) DO NOTHING",
        &pending.messages,
        |query, (device, seq, channel, payload)| {
            query.bind(*device).bind(i(*seq)).bind(*channel).bind(received).bind(payload)
        },
    )
    .await?;
    insert_rows(
        tx,
        backend,
        "INSERT INTO telemetry_windows (device_id, seq, start_ms, end_ms, windows, model_version, engine, scans, \
         verdict_match, verdict_mismatch, verdict_uncertain, verdict_identified, verdict_no_pill, verdict_bad_image, \
         refusals, engine_fallbacks, feedback_confirmed, feedback_corrected, outbox_merged_windows, \
         outbox_dropped_windows, outbox_dropped_events, audit_next_seq, audit_head, chain_epoch)",
        24,
        "",
        &pending.windows,
        |query, (w, epoch)| {
            let verdict = |name: &str| i(w.verdicts.get(name).copied().unwrap_or(0));
            let sum = |map: &BTreeMap<String, u64>| i(map.values().sum());
            query
                .bind(&w.device_id)
                .bind(i(w.seq))
                .bind(i(w.window.start_ms))
                .bind(i(w.window.end_ms))
                .bind(i64::from(w.window.windows))
                .bind(&w.model_version)
                .bind(&w.engine)
                .bind(i(w.scans))
                .bind(verdict("MATCH"))
                .bind(verdict("MISMATCH"))
                .bind(verdict("UNCERTAIN"))
                .bind(verdict("IDENTIFIED"))
                .bind(verdict("NO_PILL"))
                .bind(verdict("BAD_IMAGE"))
                .bind(sum(&w.refusals))
                .bind(i(w.engine_fallbacks))
                .bind(sum(&w.feedback.confirmed))
                .bind(sum(&w.feedback.corrected))
                .bind(i(w.outbox.merged_windows))
                .bind(i(w.outbox.dropped_windows))
                .bind(i(w.outbox.dropped_events))
                .bind(i(w.audit.next_seq))
                .bind(&w.audit.head)
                .bind(*epoch)
        },
    )
    .await?;
    insert_rows(
        tx,
        backend,
        "INSERT INTO device_events (device_id, seq, time_ms, kind, details)",
        5,
        "",
        &pending.events,
        |query, e| {
            let kind =
                serde_json::to_value(e.kind).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
            query
                .bind(&e.device_id)
                .bind(i(e.seq))
                .bind(i(e.time_ms))
                .bind(kind)
                .bind(serde_json::Value::Object(e.details.clone()).to_string())
        },
    )
    .await?;
    insert_rows(
        tx,
        backend,
        "INSERT INTO audit_heads (device_id, chain_epoch, next_seq, head, source, device_ms, reported_ms)",
        7,
        "ON CONFLICT (device_id, chain_epoch, next_seq) DO NOTHING",
        &pending.heads,
        |query, h| {
            query
                .bind(&h.device)
                .bind(h.epoch)
                .bind(i(h.next_seq))
                .bind(&h.head)
                .bind(h.source)
                .bind(i(h.device_ms))
                .bind(received)
        },
    )
    .await?;
    pending.messages.clear();
    pending.windows.clear();
    pending.events.clear();
    pending.heads.clear();
    Ok(())
}

/// Moves each device's `acked_seq` (one statement per few hundred devices).
async fn advance_acks(tx: &mut Tx<'_>, backend: Backend, advanced: &[(&str, u64)]) -> Result<(), DbError> {
    for chunk in advanced.chunks(MAX_ROWS) {
        let mut params = Params::new(backend);
        let cases: Vec<String> =
            chunk.iter().map(|_| format!("WHEN {} THEN {}", params.next(), params.next())).collect();
        let list = params.list(chunk.len());
        let sql = format!(
            "UPDATE devices SET acked_seq = CASE device_id {} END WHERE device_id IN ({list})",
            cases.join(" ")
        );
        let mut query = sqlx::query(&sql);
        for (device, acked) in chunk {
            query = query.bind(*device).bind(i(*acked));
        }
        for (device, _) in chunk {
            query = query.bind(*device);
        }
        query.execute(&mut **tx).await?;
    }
    Ok(())
}

/// A chain head a device reported.
struct Report<'a> {
    head: &'a ChainHead,
    /// The window's `seq`; `None` for a status.
    window_seq: Option<u64>,
    /// When it was the head, by the device's clock.
    device_ms: u64,
}

/// Checks a reported chain head against the device's history (current
/// epoch) and records it; on a rewrite raises `audit_chain_rewritten` and
/// starts the next epoch (where the report is recorded). A status is
/// compared with what the device reported as of its own time or earlier: a
/// retained status delivered again (the ingest reconnected) is older than
/// the windows after it and must not look shorter than them.
///
/// The common case costs no statement: the report is recorded unless its
/// length is known (read with the batch, or recorded by it), and a window
/// above every stored `seq` takes its neighbour from the batch's state.
async fn check_chain(
    tx: &mut Tx<'_>,
    backend: Backend,
    pending: &mut Pending<'_>,
    device: &str,
    state: &mut DeviceState,
    report: &Report<'_>,
    now_ms: u64,
) -> Result<Option<Rewrite>, DbError> {
    let (head, window_seq, epoch) = (report.head, report.window_seq, state.epoch);
    let out_of_order = window_seq.is_some_and(|seq| seq <= state.max_seq);
    if out_of_order {
        // Its neighbours may be among the batch's rows: write them first.
        flush(tx, backend, pending, now_ms).await?;
    }
    let source_name = if window_seq.is_some() { "telemetry" } else { "status" };
    let key = (epoch, head.next_seq);
    let same_length = state.heads.get(&key).map(|known| known.head.clone());
    let recorded = same_length.is_none();
    if recorded {
        record(pending, device, state, epoch, report, source_name);
    }
    let mut history = History { same_length, ..History::default() };
    let source = match window_seq {
        None => {
            // Before the batch, as of the status's time: the longest stored
            // head when it is that old (the common case), else a query.
            let stored = match state.longest_stored {
                _ if epoch != state.loaded_epoch => None, // a new epoch: only the batch's heads
                None => None,
                Some((next_seq, device_ms)) if device_ms <= report.device_ms => Some(next_seq),
                Some(_) => sqlx::query(
                    "SELECT next_seq FROM audit_heads WHERE device_id = $1 AND chain_epoch = $2 AND device_ms <= $3 \
                     ORDER BY next_seq DESC LIMIT 1",
                )
                .bind(device)
                .bind(epoch)
                .bind(i(report.device_ms))
                .fetch_optional(&mut **tx)
                .await?
                .map(|r| u(r.get(0))),
            };
            let batch = state
                .heads
                .range((epoch, 0)..=(epoch, u64::MAX))
                .filter(|(_, known)| known.device_ms <= report.device_ms)
                .map(|((_, next_seq), _)| *next_seq)
                .max();
            history.longest = stored.max(batch);
            Source::Status
        }
        Some(_) if !out_of_order => {
            // In order: the previous window is the batch's latest, and none comes after.
            history.previous_window = state.last_window.clone();
            Source::Window
        }
        Some(seq) => {
            let neighbour = |sql: &'static str| sqlx::query(sql).bind(device.to_string()).bind(epoch).bind(i(seq));
            let to_head = |r: AnyRow| ChainHead { next_seq: u(r.get(0)), head: r.get(1) };
            history.previous_window = neighbour(
                "SELECT audit_next_seq, audit_head FROM telemetry_windows \
                 WHERE device_id = $1 AND chain_epoch = $2 AND seq < $3 ORDER BY seq DESC LIMIT 1",
            )
            .fetch_optional(&mut **tx)
            .await?
            .map(to_head);
            history.next_window = neighbour(
                "SELECT audit_next_seq, audit_head FROM telemetry_windows \
                 WHERE device_id = $1 AND chain_epoch = $2 AND seq > $3 ORDER BY seq ASC LIMIT 1",
            )
            .fetch_optional(&mut **tx)
            .await?
            .map(to_head);
            Source::Window
        }
    };
    let Some(rewrite) = chain::judge(head, source, &history) else { return Ok(None) };
    let next_epoch = epoch + 1;
    let details = serde_json::json!({
        "how": rewrite.as_str(),
        "reported": { "next_seq": head.next_seq, "head": head.head },
        "source": match window_seq { Some(seq) => format!("telemetry seq {seq}"), None => "status".into() },
        "previous": match &rewrite {
            Rewrite::Forked { previous_head } => serde_json::json!({ "next_seq": head.next_seq, "head": previous_head }),
            Rewrite::Shorter { previous_next_seq } => serde_json::json!({ "next_seq": previous_next_seq }),
        },
        "chain_epoch": next_epoch,
    });
    tracing::warn!(device, how = rewrite.as_str(), "audit chain rewritten");
    sqlx::query("INSERT INTO fleet_events (time_ms, device_id, kind, details) VALUES ($1, $2, $3, $4)")
        .bind(i(now_ms))
        .bind(device)
        .bind("audit_chain_rewritten")
        .bind(details.to_string())
        .execute(&mut **tx)
        .await?;
    sqlx::query("UPDATE devices SET chain_epoch = $2, chain_rewritten_ms = $3 WHERE device_id = $1")
        .bind(device)
        .bind(next_epoch)
        .bind(i(now_ms))
        .execute(&mut **tx)
        .await?;
    // The report opens the new epoch's history (not the old one's).
    if recorded {
        let dropped = pending.heads.pop();
        debug_assert!(dropped.is_some_and(|h| h.epoch == epoch && h.next_seq == head.next_seq));
        state.heads.remove(&key);
    }
    record(pending, device, state, next_epoch, report, source_name);
    state.epoch = next_epoch;
    state.last_window = None;
    Ok(Some(rewrite))
}

/// Records a report at `epoch`: known to the batch now, written at the next flush.
fn record(
    pending: &mut Pending<'_>,
    device: &str,
    state: &mut DeviceState,
    epoch: i64,
    report: &Report<'_>,
    source: &'static str,
) {
    let head = report.head;
    state.heads.insert((epoch, head.next_seq), KnownHead { head: head.head.clone(), device_ms: report.device_ms });
    pending.heads.push(HeadRow {
        device: device.to_string(),
        epoch,
        next_seq: head.next_seq,
        head: head.head.clone(),
        source,
        device_ms: report.device_ms,
    });
}
