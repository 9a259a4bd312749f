//! The outbox's acknowledgement state machine against a model of the
//! network and the fleet (proptest): random appends, sends, deliveries,
//! losses, acks, disconnects, reconnects, crashes and reopens. Whatever
//! happens, nothing appended is lost, the fleet commits every message once,
//! sends on a connection go in order within the in-flight window, and once
//! the link is up long enough everything is committed and the outbox is
//! empty. Failing sequences are kept in `tests/proptest-regressions/outbox.txt`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use proptest::prelude::*;
use rxvision_daemon::outbox::{AckOutcome, BudgetAction, Entry, Losses, MessageKind, Outbox, Persisted, Tracker};

#[derive(Debug, Clone)]
enum Op {
    Append(bool),
    Connect,
    Disconnect,
    Send,
    Deliver,
    LoseInFlight,
    FleetAck,
    DeliverAck,
    Budget(u8),
    Rewind,
    Crash { removals_persisted: bool },
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<bool>().prop_map(Op::Append),
        1 => Just(Op::Connect),
        1 => Just(Op::Disconnect),
        4 => Just(Op::Send),
        4 => Just(Op::Deliver),
        1 => Just(Op::LoseInFlight),
        2 => Just(Op::FleetAck),
        2 => Just(Op::DeliverAck),
        2 => (0u8..8).prop_map(Op::Budget),
        1 => Just(Op::Rewind),
        1 => any::<bool>().prop_map(|removals_persisted| Op::Crash { removals_persisted }),
    ]
}

/// The device's durable store as the I/O layer keeps it.
#[derive(Debug, Default, Clone)]
struct Store {
    entries: BTreeMap<u64, Entry>,
    acked: u64,
    next_seq: u64,
    next_id: u64,
    losses: Losses,
}

/// The fleet: commits each `seq` once, acknowledges the highest contiguous one.
#[derive(Debug, Default)]
struct Fleet {
    committed: BTreeSet<u64>,
    commits: BTreeMap<u64, u32>,
}

impl Fleet {
    fn receive(&mut self, seq: u64) {
        if self.committed.insert(seq) {
            *self.commits.entry(seq).or_default() += 1;
        }
    }
    fn contiguous(&self) -> u64 {
        let mut n = 0;
        while self.committed.contains(&(n + 1)) {
            n += 1;
        }
        n
    }
}

const MAX_IN_FLIGHT: usize = 4;
const BYTES: u64 = 100;

struct Model {
    tracker: Tracker,
    store: Store,
    fleet: Fleet,
    /// Every id appended, and what became of the ones merged or dropped.
    appended: Vec<u64>,
    merged_into: BTreeMap<u64, u64>,
    dropped: BTreeSet<u64>,
    seq_of: BTreeMap<u64, u64>,
    losses: Losses,
}

impl Model {
    fn apply_ack(&mut self, seq: u64, persist: bool) {
        match self.tracker.ack(seq) {
            AckOutcome::Committed { removed, acked } => {
                if persist {
                    for id in removed {
                        self.store.entries.remove(&id);
                    }
                    self.store.acked = acked;
                }
            }
            AckOutcome::Stale => {}
            AckOutcome::Ahead { highest } => panic!("the fleet acknowledged {seq}, above {highest}"),
        }
    }

    /// Sends the next message if there is one; returns its seq.
    fn send(&mut self) -> Option<u64> {
        let entry = self.tracker.next_to_send()?;
        let seq = match entry.seq {
            Some(seq) => seq,
            None => {
                let seq = self.tracker.assign(entry.id).expect("assignable");
                self.store.entries.insert(entry.id, Entry { seq: Some(seq), ..entry });
                self.store.next_seq = self.tracker.next_seq();
                assert!(self.seq_of.insert(entry.id, seq).is_none(), "id {} got a second seq", entry.id);
                seq
            }
        };
        self.tracker.sent(seq);
        Some(seq)
    }

    /// The final id an appended message lives in, if it was not dropped.
    fn home(&self, id: u64) -> Option<u64> {
        let mut id = id;
        while let Some(&into) = self.merged_into.get(&id) {
            id = into;
        }
        (!self.dropped.contains(&id)).then_some(id)
    }
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut m = Model {
        tracker: Tracker::new(MAX_IN_FLIGHT),
        store: Store { next_seq: 1, ..Store::default() },
        fleet: Fleet::default(),
        appended: Vec::new(),
        merged_into: BTreeMap::new(),
        dropped: BTreeSet::new(),
        seq_of: BTreeMap::new(),
        losses: Losses::default(),
    };
    let mut wire: VecDeque<u64> = VecDeque::new(); // device → fleet, in order
    let mut acks: VecDeque<u64> = VecDeque::new(); // fleet → device
    let mut last_sent: Option<u64> = None; // on this connection
    let mut now = 0u64;
    for op in ops {
        now += 1000;
        match op {
            Op::Append(window) => {
                let kind = if window { MessageKind::Window } else { MessageKind::Event };
                let entry = m.tracker.append(kind, BYTES, now);
                prop_assert!(!m.appended.contains(&entry.id), "id {} given out twice", entry.id);
                m.appended.push(entry.id);
                m.store.entries.insert(entry.id, entry);
                m.store.next_id = entry.id + 1;
            }
            Op::Connect => {
                m.tracker.connected();
                last_sent = None;
            }
            Op::Disconnect => {
                m.tracker.disconnected();
                wire.clear();
                acks.clear();
            }
            Op::Send => {
                if let Some(seq) = m.send() {
                    if let Some(previous) = last_sent {
                        prop_assert!(seq > previous, "sent {seq} after {previous}");
                    }
                    last_sent = Some(seq);
                    wire.push_back(seq);
                }
            }
            Op::Rewind => {
                // No ack in time: the same connection sends again from the oldest unacknowledged.
                m.tracker.rewind();
                last_sent = None;
            }
            Op::Deliver => {
                if let Some(seq) = wire.pop_front() {
                    m.fleet.receive(seq);
                }
            }
            Op::LoseInFlight => {
                wire.pop_front();
            }
            Op::FleetAck => acks.push_back(m.fleet.contiguous()),
            Op::DeliverAck => {
                if let Some(seq) = acks.pop_front() {
                    m.apply_ack(seq, true);
                }
            }
            Op::Budget(messages) => {
                let budget = u64::from(messages) * BYTES;
                while let Some(action) = m.tracker.next_budget_action(budget) {
                    match action {
                        BudgetAction::Merge { from, into } => {
                            let (a, b) = (m.tracker.get(from).unwrap(), m.tracker.get(into).unwrap());
                            prop_assert!(a.seq.is_none() && b.seq.is_none(), "merged a sent message");
                            prop_assert!(a.kind == MessageKind::Window && b.kind == MessageKind::Window);
                            m.losses.merged_windows += u64::from(a.windows);
                            m.tracker.merged(from, into, BYTES);
                            m.store.entries.remove(&from);
                            m.store.entries.insert(into, m.tracker.get(into).unwrap());
                            m.merged_into.insert(from, into);
                        }
                        BudgetAction::Drop { id } => {
                            let entry = m.tracker.get(id).unwrap();
                            prop_assert!(entry.seq.is_none(), "dropped a sent message");
                            match entry.kind {
                                MessageKind::Window => m.losses.dropped_windows += u64::from(entry.windows),
                                MessageKind::Event => m.losses.dropped_events += 1,
                            }
                            m.tracker.dropped(id);
                            m.store.entries.remove(&id);
                            m.dropped.insert(id);
                        }
                    }
                    m.store.losses = m.tracker.losses();
                }
                let unsent = m.tracker.pending().filter(|e| e.seq.is_none()).count();
                prop_assert!(m.tracker.bytes() <= budget || unsent == 0, "over budget with unsent messages left");
            }
            Op::Crash { removals_persisted } => {
                // A crash while an ack was applied may lose its removals (never an append or a seq).
                if !removals_persisted {
                    if let Some(seq) = acks.pop_front() {
                        m.apply_ack(seq, false);
                    }
                }
                let entries: Vec<Entry> = m.store.entries.values().copied().collect();
                let persisted = Persisted {
                    entries,
                    acked: m.store.acked,
                    next_seq: m.store.next_seq,
                    next_id: m.store.next_id,
                    losses: m.store.losses,
                };
                m.tracker = Tracker::recover(persisted, MAX_IN_FLIGHT);
                wire.clear();
                acks.clear();
                last_sent = None;
            }
        }
        // Nothing is lost: every appended message lives in a queued or committed
        // message, or was dropped and counted.
        let pending: BTreeSet<u64> = m.tracker.pending().map(|e| e.id).collect();
        for id in &m.appended {
            if let Some(home) = m.home(*id) {
                let committed = m.seq_of.get(&home).is_some_and(|seq| m.fleet.committed.contains(seq));
                prop_assert!(pending.contains(&home) || committed, "message {id} (in {home}) was lost");
            }
        }
        // Every merge and drop is counted, and the counts survive crashes.
        prop_assert_eq!(m.tracker.losses(), m.losses);
        prop_assert!(m.fleet.commits.values().all(|&n| n == 1));
    }
    // With the link up long enough, everything is committed, without gaps, and the outbox drains.
    m.tracker.connected();
    for _ in 0..(m.appended.len() * 4 + 8) {
        while let Some(seq) = m.send() {
            m.fleet.receive(seq);
        }
        let contiguous = m.fleet.contiguous();
        m.apply_ack(contiguous, true);
    }
    prop_assert_eq!(m.tracker.depth(), 0, "the outbox did not drain");
    let given: BTreeSet<u64> = (1..m.tracker.next_seq()).collect();
    prop_assert_eq!(&m.fleet.committed, &given, "every seq given out is committed, and no other");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256),
        failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::Direct(
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/proptest-regressions/outbox.txt"),
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_tracker_loses_nothing_and_commits_everything_once(ops in proptest::collection::vec(op(), 1..80)) {
        run(ops)?;
    }
}

#[test]
fn an_ack_above_anything_given_out_is_ignored() {
    let mut tracker = Tracker::new(8);
    let entry = tracker.append(MessageKind::Event, 10, 0);
    tracker.connected();
    assert_eq!(tracker.assign(entry.id), Some(1));
    assert_eq!(tracker.ack(5), AckOutcome::Ahead { highest: 1 });
    assert_eq!(tracker.depth(), 1, "a forged ack made the device forget nothing");
    assert_eq!(tracker.ack(0), AckOutcome::Stale);
    assert_eq!(tracker.ack(1), AckOutcome::Committed { removed: vec![entry.id], acked: 1 });
    assert_eq!(tracker.ack(1), AckOutcome::Stale);
}

#[test]
fn sequence_numbers_continue_after_a_restart_even_with_an_empty_store() {
    let mut tracker = Tracker::recover(Persisted { acked: 41, next_seq: 42, ..Persisted::default() }, 8);
    let entry = tracker.append(MessageKind::Window, 10, 0);
    assert_eq!(tracker.assign(entry.id), Some(42));
    // A store whose counter was lost still never reuses an acknowledged seq.
    let mut tracker = Tracker::recover(Persisted { acked: 41, next_seq: 1, ..Persisted::default() }, 8);
    let entry = tracker.append(MessageKind::Window, 10, 0);
    assert_eq!(tracker.assign(entry.id), Some(42));
}

#[test]
fn the_budget_merges_old_windows_evenly_then_drops_and_counts() {
    let mut tracker = Tracker::new(8);
    let ids: Vec<u64> = (0..4).map(|i| tracker.append(MessageKind::Window, 10, i).id).collect();
    let event = tracker.append(MessageKind::Event, 10, 5).id;
    // 50 bytes, budget 30: merge the oldest pair, then the next pair (coarsening evenly).
    let mut steps = Vec::new();
    while let Some(action) = tracker.next_budget_action(30) {
        match action {
            BudgetAction::Merge { from, into } => tracker.merged(from, into, 10),
            BudgetAction::Drop { id } => tracker.dropped(id),
        }
        steps.push(action);
    }
    assert_eq!(
        steps,
        [BudgetAction::Merge { from: ids[0], into: ids[1] }, BudgetAction::Merge { from: ids[2], into: ids[3] },]
    );
    assert_eq!(tracker.get(ids[3]).unwrap().windows, 2);
    // Tighter: the two 2-window windows merge, then the window is dropped, then the event.
    while let Some(action) = tracker.next_budget_action(0) {
        match action {
            BudgetAction::Merge { from, into } => tracker.merged(from, into, 10),
            BudgetAction::Drop { id } => tracker.dropped(id),
        }
    }
    assert_eq!(tracker.depth(), 0);
    assert_eq!(tracker.losses(), Losses { merged_windows: 4, dropped_windows: 4, dropped_events: 1 });
    assert!(tracker.get(event).is_none());
}

#[test]
fn sending_waits_for_acks_beyond_the_in_flight_window() {
    let mut tracker = Tracker::new(2);
    for i in 0..5 {
        tracker.append(MessageKind::Window, 10, i);
    }
    assert_eq!(tracker.next_to_send(), None, "nothing is sent while disconnected");
    tracker.connected();
    let mut sent = Vec::new();
    while let Some(entry) = tracker.next_to_send() {
        let seq = entry.seq.or_else(|| tracker.assign(entry.id)).unwrap();
        tracker.sent(seq);
        sent.push(seq);
    }
    assert_eq!(sent, [1, 2]);
    tracker.ack(1);
    let next = tracker.next_to_send().unwrap();
    assert_eq!(next.seq, None, "the third message has no seq until it is sent");
    // A reconnect starts again at the oldest unacknowledged message.
    tracker.disconnected();
    tracker.connected();
    assert_eq!(tracker.next_to_send().unwrap().seq, Some(2));
}

mod durable {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::time::Duration;

    use rxvision_daemon::outbox::{AckOutcome, Losses, MessageKind, Outbox, OutboxError};

    fn payload(i: u64) -> Vec<u8> {
        format!("{{\"n\":{i},\"filler\":\"{}\"}}", "x".repeat(200)).into_bytes()
    }

    /// Puts the seq in front, as a real caller puts it into the message.
    fn finalize(_kind: MessageKind, seq: u64, stored: &[u8]) -> Result<Vec<u8>, String> {
        Ok([format!("{seq}:").as_bytes(), stored].concat())
    }

    fn send_all(outbox: &Outbox) -> Vec<(u64, Vec<u8>)> {
        let mut sent = Vec::new();
        while let Some((seq, _, bytes)) = outbox.next_to_send(finalize).unwrap() {
            outbox.sent(seq);
            sent.push((seq, bytes));
        }
        sent
    }

    #[test]
    fn messages_survive_reopening_and_acks_are_durable_and_seqs_never_repeat() {
        let dir = tempfile::tempdir().unwrap();
        {
            let outbox = Outbox::open(dir.path(), 8).unwrap();
            for i in 0..5 {
                let kind = if i % 2 == 0 { MessageKind::Window } else { MessageKind::Event };
                assert_eq!(outbox.push(kind, 1000 + i, &payload(i)).unwrap(), i + 1);
            }
            outbox.connected();
            let sent = send_all(&outbox);
            assert_eq!(sent.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
            assert_eq!(sent[0].1, finalize(MessageKind::Window, 1, &payload(0)).unwrap());
        }
        // Reopened: the same seqs go out again, in order.
        let outbox = Outbox::open(dir.path(), 8).unwrap();
        assert_eq!(outbox.depth(), (5, 5 * payload(0).len() as u64, Some(1000), 0));
        outbox.connected();
        assert_eq!(send_all(&outbox).iter().map(|(s, _)| *s).collect::<Vec<_>>(), [1, 2, 3, 4, 5]);
        assert!(matches!(outbox.ack(3).unwrap(), AckOutcome::Committed { acked: 3, .. }));
        drop(outbox);
        let outbox = Outbox::open(dir.path(), 8).unwrap();
        assert_eq!((outbox.depth().0, outbox.depth().3), (2, 3));
        assert!(matches!(outbox.ack(5).unwrap(), AckOutcome::Committed { .. }));
        drop(outbox);
        // Everything acknowledged: the next message still gets a new seq.
        let outbox = Outbox::open(dir.path(), 8).unwrap();
        assert_eq!(outbox.depth(), (0, 0, None, 5));
        outbox.push(MessageKind::Event, 2000, &payload(9)).unwrap();
        outbox.connected();
        assert_eq!(send_all(&outbox)[0].0, 6);
    }

    #[test]
    fn the_budget_merges_unsent_windows_durably_and_counts_what_it_gave_up() {
        let dir = tempfile::tempdir().unwrap();
        let merge = |a: &[u8], b: &[u8]| Ok([a, b"+", b].concat());
        {
            let outbox = Outbox::open(dir.path(), 8).unwrap();
            outbox.push(MessageKind::Window, 1, b"w1").unwrap();
            outbox.connected();
            assert_eq!(send_all(&outbox).len(), 1); // w1 has a seq now: never merged
            outbox.disconnected();
            for (i, p) in [b"w2", b"w3", b"w4"].iter().enumerate() {
                outbox.push(MessageKind::Window, 2 + i as u64, *p).unwrap();
            }
            let steps = outbox.enforce_budget(6, merge).unwrap();
            assert!(!steps.is_empty());
            assert!(outbox.depth().1 <= 6, "{:?}", outbox.depth());
        }
        let outbox = Outbox::open(dir.path(), 8).unwrap();
        let losses = outbox.losses();
        assert!(losses.merged_windows >= 1, "{losses:?}");
        outbox.connected();
        let sent = send_all(&outbox);
        assert_eq!(sent[0], (1, b"1:w1".to_vec()), "the sent window is untouched");
        assert_eq!(sent.iter().map(|(s, _)| *s).collect::<Vec<_>>(), (1..=sent.len() as u64).collect::<Vec<_>>());
        let rest: Vec<String> = sent[1..].iter().map(|(_, b)| String::from_utf8_lossy(b).to_string()).collect();
        assert!(rest.iter().any(|b| b.contains('+')) || losses.dropped_windows > 0, "{rest:?}");
        assert_ne!(losses, Losses::default());
    }

    #[test]
    fn a_corrupt_record_is_a_clear_error_that_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        {
            let outbox = Outbox::open(dir.path(), 8).unwrap();
            outbox.push(MessageKind::Window, 1, &payload(1)).unwrap();
        }
        {
            let db = crate::audit::raw_open(dir.path());
            db.open_tree("messages").unwrap().insert(2u64.to_be_bytes(), &[9u8, 0][..]).unwrap();
            db.flush().unwrap();
        }
        match Outbox::open(dir.path(), 8) {
            Err(OutboxError::Corrupt { key, reason }) => {
                assert_eq!(key, "0000000000000002");
                assert!(reason.contains("header"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    const CHILD_ENV: &str = "RXVISION_OUTBOX_CRASH_CHILD_DIR";

    /// The writer for the SIGKILL test; as a plain test it returns at once.
    #[test]
    fn outbox_crash_writer_child() {
        let Some(dir) = std::env::var_os(CHILD_ENV) else { return };
        let outbox = Outbox::open(std::path::Path::new(&dir), 8).unwrap();
        let mut out = std::io::stdout().lock();
        for i in 0.. {
            let id = outbox.push(MessageKind::Window, i, &payload(i)).unwrap();
            std::io::Write::write_all(&mut out, format!("ACCEPTED {id}\n").as_bytes()).unwrap();
            std::io::Write::flush(&mut out).unwrap();
        }
    }

    #[test]
    fn every_accepted_message_survives_sigkill() {
        let dir = tempfile::tempdir().unwrap();
        let mut accepted = Vec::new();
        for round in 0..6u64 {
            let mut child = Command::new(std::env::current_exe().unwrap())
                .args(["--exact", "outbox::durable::outbox_crash_writer_child", "--nocapture", "--test-threads", "1"])
                .env(CHILD_ENV, dir.path())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap();
            let stdout = child.stdout.take().unwrap();
            let reader = std::thread::spawn(move || {
                BufReader::new(stdout)
                    .lines()
                    .map_while(Result::ok)
                    .filter_map(|l| l.strip_prefix("ACCEPTED ").and_then(|s| s.parse::<u64>().ok()))
                    .collect::<Vec<u64>>()
            });
            std::thread::sleep(Duration::from_millis(150 + 60 * round));
            child.kill().unwrap();
            child.wait().unwrap();
            accepted.extend(reader.join().unwrap());
            let outbox = Outbox::open(dir.path(), 8).unwrap();
            // Ids are given from 1 without gaps and nothing was acknowledged, so
            // holding `max` messages means holding every accepted one.
            let max = accepted.iter().max().copied().unwrap_or(0);
            let (depth, ..) = outbox.depth();
            assert!(depth as u64 >= max, "round {round}: {max} accepted but only {depth} stored");
            assert_eq!(depth as u64, outbox.push(MessageKind::Event, 0, b"{}").unwrap() - 1);
        }
        assert!(accepted.len() > 10, "the writer accepted only {} messages", accepted.len());
    }
}

#[test]
fn a_window_and_the_audit_mark_it_counted_to_are_stored_together() {
    let dir = tempfile::tempdir().unwrap();
    {
        let outbox = Outbox::open(dir.path(), 8).unwrap();
        assert_eq!(outbox.audit_through().unwrap(), None, "a new outbox has no mark");
        outbox.start_audit_mark(5).unwrap();
        assert_eq!(outbox.audit_through().unwrap(), Some(5));
        outbox.push_window(1_000, &[b"{\"event\":0}".to_vec()], b"{\"window\":1}", 9).unwrap();
        outbox.push(MessageKind::Event, 1_000, b"{\"event\":1}").unwrap();
    }
    let outbox = Outbox::open(dir.path(), 8).unwrap();
    assert_eq!(outbox.audit_through().unwrap(), Some(9), "the mark survives a reopen; an event leaves it alone");
    assert_eq!(outbox.depth().0, 3);
}
