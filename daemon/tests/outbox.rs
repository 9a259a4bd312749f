//! The outbox's acknowledgement state machine against a model of the
//! network and the fleet (proptest): random appends, sends, deliveries,
//! losses, acks, disconnects, reconnects, crashes and reopens. Whatever
//! happens, nothing appended is lost, the fleet commits every message once,
//! sends on a connection go in order within the in-flight window, and once
//! the link is up long enough everything is committed and the outbox is
//! empty. Failing sequences are kept in `tests/proptest-regressions/outbox.txt`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use proptest::prelude::*;
use rxvision_daemon::outbox::{AckOutcome, Entry, MessageKind, Tracker};

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
        1 => any::<bool>().prop_map(|removals_persisted| Op::Crash { removals_persisted }),
    ]
}

/// The device's durable store as the I/O layer would keep it.
#[derive(Debug, Default, Clone)]
struct Store {
    entries: BTreeMap<u64, Entry>,
    acked: u64,
    next_seq: u64,
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

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let mut tracker = Tracker::new(MAX_IN_FLIGHT);
    let mut store = Store { next_seq: 1, ..Store::default() };
    let mut fleet = Fleet::default();
    let mut appended: Vec<u64> = Vec::new();
    let mut wire: VecDeque<u64> = VecDeque::new(); // device → fleet, in order
    let mut acks: VecDeque<u64> = VecDeque::new(); // fleet → device
    let mut last_sent: Option<u64> = None; // on this connection
    let mut now = 0u64;
    let apply_ack = |tracker: &mut Tracker, store: &mut Store, seq: u64, persist: bool| match tracker.ack(seq) {
        AckOutcome::Committed { removed, acked } => {
            if persist {
                for s in removed {
                    store.entries.remove(&s);
                }
                store.acked = acked;
            }
        }
        AckOutcome::Stale => {}
        AckOutcome::Ahead { highest } => panic!("the fleet acknowledged {seq}, above {highest}"),
    };
    for op in ops {
        now += 1000;
        match op {
            Op::Append(window) => {
                let kind = if window { MessageKind::Window } else { MessageKind::Event };
                let entry = tracker.append(kind, 100, now);
                prop_assert!(!appended.contains(&entry.seq), "seq {} given out twice", entry.seq);
                appended.push(entry.seq);
                store.entries.insert(entry.seq, entry);
                store.next_seq = tracker.next_seq();
            }
            Op::Connect => {
                tracker.connected();
                last_sent = None;
            }
            Op::Disconnect => {
                tracker.disconnected();
                wire.clear();
                acks.clear();
            }
            Op::Send => {
                if let Some(entry) = tracker.next_to_send() {
                    if let Some(previous) = last_sent {
                        prop_assert!(entry.seq > previous, "sent {} after {previous}", entry.seq);
                    }
                    prop_assert!(entry.seq - tracker.acked() <= MAX_IN_FLIGHT as u64 || tracker.depth() > 0);
                    tracker.sent(entry.seq);
                    last_sent = Some(entry.seq);
                    wire.push_back(entry.seq);
                }
            }
            Op::Deliver => {
                if let Some(seq) = wire.pop_front() {
                    fleet.receive(seq);
                }
            }
            Op::LoseInFlight => {
                wire.pop_front();
            }
            Op::FleetAck => acks.push_back(fleet.contiguous()),
            Op::DeliverAck => {
                if let Some(seq) = acks.pop_front() {
                    apply_ack(&mut tracker, &mut store, seq, true);
                }
            }
            Op::Crash { removals_persisted } => {
                // A crash while an ack was applied may lose its removals (never its appends).
                if !removals_persisted {
                    if let Some(seq) = acks.pop_front() {
                        apply_ack(&mut tracker, &mut store, seq, false);
                    }
                }
                let entries: Vec<Entry> = store.entries.values().copied().collect();
                tracker = Tracker::recover(entries, store.acked, store.next_seq, MAX_IN_FLIGHT);
                wire.clear();
                acks.clear();
                last_sent = None;
            }
        }
        // Nothing appended is lost: committed by the fleet or still pending.
        let pending: BTreeSet<u64> = tracker.pending().map(|e| e.seq).collect();
        for seq in &appended {
            prop_assert!(fleet.committed.contains(seq) || pending.contains(seq), "seq {seq} was lost");
        }
        prop_assert!(fleet.commits.values().all(|&n| n == 1));
        prop_assert!(tracker.depth() as u64 * 100 == tracker.bytes());
    }
    // With the link up long enough, everything is committed and the outbox drains.
    tracker.connected();
    wire.clear();
    acks.clear();
    for _ in 0..(appended.len() * 4 + 8) {
        while let Some(entry) = tracker.next_to_send() {
            tracker.sent(entry.seq);
            fleet.receive(entry.seq);
        }
        apply_ack(&mut tracker, &mut store, fleet.contiguous(), true);
    }
    prop_assert_eq!(tracker.depth(), 0, "the outbox did not drain");
    prop_assert_eq!(fleet.committed.len(), appended.len());
    prop_assert_eq!(tracker.oldest_created_ms(), None);
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
    tracker.append(MessageKind::Event, 10, 0);
    assert_eq!(tracker.ack(5), AckOutcome::Ahead { highest: 1 });
    assert_eq!(tracker.depth(), 1, "a forged ack made the device forget nothing");
    assert_eq!(tracker.ack(0), AckOutcome::Stale);
    assert_eq!(tracker.ack(1), AckOutcome::Committed { removed: vec![1], acked: 1 });
    assert_eq!(tracker.ack(1), AckOutcome::Stale);
}

#[test]
fn sequence_numbers_continue_after_a_restart_even_with_an_empty_store() {
    // Everything acknowledged and removed: the store holds only the counters.
    let tracker = Tracker::recover(Vec::new(), 41, 42, 8);
    let mut tracker = tracker;
    assert_eq!(tracker.append(MessageKind::Window, 10, 0).seq, 42);
    // A store whose counter was lost still never reuses an acknowledged seq.
    let mut tracker = Tracker::recover(Vec::new(), 41, 1, 8);
    assert_eq!(tracker.append(MessageKind::Window, 10, 0).seq, 42);
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
        tracker.sent(entry.seq);
        sent.push(entry.seq);
    }
    assert_eq!(sent, [1, 2]);
    tracker.ack(1);
    let next = tracker.next_to_send().unwrap();
    assert_eq!(next.seq, 3);
    // A reconnect starts again at the oldest unacknowledged message.
    tracker.disconnected();
    tracker.connected();
    assert_eq!(tracker.next_to_send().unwrap().seq, 2);
}

mod durable {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::time::Duration;

    use rxvision_daemon::outbox::{AckOutcome, MessageKind, Outbox, OutboxError};

    fn payload(seq: u64) -> Vec<u8> {
        format!("{{\"seq\":{seq},\"filler\":\"{}\"}}", "x".repeat(200)).into_bytes()
    }

    #[test]
    fn messages_survive_reopening_and_acks_are_durable_and_seqs_never_repeat() {
        let dir = tempfile::tempdir().unwrap();
        {
            let outbox = Outbox::open(dir.path(), 8).unwrap();
            for i in 0..5 {
                let kind = if i % 2 == 0 { MessageKind::Window } else { MessageKind::Event };
                assert_eq!(outbox.push(kind, 1000 + i, payload).unwrap(), i + 1);
            }
        }
        let outbox = Outbox::open(dir.path(), 8).unwrap();
        assert_eq!(outbox.depth(), (5, 5 * payload(1).len() as u64, Some(1000), 0));
        outbox.connected();
        let (seq, bytes) = outbox.next_to_send().unwrap().unwrap();
        assert_eq!((seq, bytes), (1, payload(1)));
        assert!(
            matches!(outbox.ack(3).unwrap(), AckOutcome::Committed { ref removed, acked: 3 } if removed == &[1, 2, 3])
        );
        drop(outbox);
        let outbox = Outbox::open(dir.path(), 8).unwrap();
        assert_eq!(outbox.depth().0, 2);
        assert_eq!(outbox.depth().3, 3);
        assert!(matches!(outbox.ack(5).unwrap(), AckOutcome::Committed { .. }));
        drop(outbox);
        // Everything acknowledged: the next message still gets a new seq.
        let outbox = Outbox::open(dir.path(), 8).unwrap();
        assert_eq!(outbox.depth(), (0, 0, None, 5));
        assert_eq!(outbox.push(MessageKind::Event, 2000, payload).unwrap(), 6);
    }

    #[test]
    fn a_corrupt_record_is_a_clear_error_that_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        {
            let outbox = Outbox::open(dir.path(), 8).unwrap();
            outbox.push(MessageKind::Window, 1, payload).unwrap();
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
            let seq = outbox.push(MessageKind::Window, i, payload).unwrap();
            std::io::Write::write_all(&mut out, format!("ACCEPTED {seq}\n").as_bytes()).unwrap();
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
            let (depth, _, _, acked) = outbox.depth();
            assert_eq!(acked, 0);
            let max = accepted.iter().max().copied().unwrap_or(0);
            assert!(depth as u64 >= max, "round {round}: {max} accepted but only {depth} stored");
            // Seqs are given out from 1 without gaps, so holding `max` messages
            // (none acknowledged) means holding every accepted one.
            assert_eq!(depth as u64, outbox.push(MessageKind::Event, 0, payload).unwrap() - 1);
        }
        assert!(accepted.len() > 10, "the writer accepted only {} messages", accepted.len());
    }
}
