//! Chain-head anchoring: does what a device reports of its audit chain
//! continue what it reported before? Pure judgement; the database supplies
//! the history.
//!
//! A device reports its chain's head `(next_seq, head)` in its retained
//! status (the head now, at every connect) and at the end of every
//! telemetry window. An honest chain only grows, and a given length always
//! has the same head. So the fleet flags a **rewrite** when a report
//!
//! * has a length reported before with another head (a fork), or
//! * is a status (the head *now*) shorter than any length reported before, or
//! * is a window shorter than the window before it in the device's own
//!   message order, or longer than the window after it.
//!
//! Windows are compared only with their neighbours by `seq`, never with a
//! status: a backlog of windows from a long outage arrives after the status
//! of the reconnect and legitimately holds older, shorter heads.
//! After a rewrite the fleet starts a new epoch of the device's history, so
//! one restore raises one `audit_chain_rewritten`, not one per report.

use rxvision_protocol::ChainHead;

/// What a report is compared with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    /// The head reported before at the same length, if any.
    pub same_length: Option<String>,
    /// The longest length reported before (status checks).
    pub longest: Option<u64>,
    /// The window before this one by `seq` (window checks).
    pub previous_window: Option<ChainHead>,
    /// The window after this one by `seq` (window checks; windows can arrive out of order).
    pub next_window: Option<ChainHead>,
}

/// Where a report came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The retained status: the head now.
    Status,
    /// A telemetry window: the head at the window's end.
    Window,
}

/// How a chain was found rewritten.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rewrite {
    /// This length was reported before with another head.
    Forked {
        /// The head reported before.
        previous_head: String,
    },
    /// Shorter than a length reported before.
    Shorter {
        /// That length.
        previous_next_seq: u64,
    },
}

impl Rewrite {
    /// `forked` or `shorter`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Rewrite::Forked { .. } => "forked",
            Rewrite::Shorter { .. } => "shorter",
        }
    }
}

/// Judges one report against the history (`None`: consistent).
pub fn judge(report: &ChainHead, source: Source, history: &History) -> Option<Rewrite> {
    if let Some(previous_head) = &history.same_length {
        if previous_head != &report.head {
            return Some(Rewrite::Forked { previous_head: previous_head.clone() });
        }
    }
    match source {
        Source::Status => match history.longest {
            Some(longest) if report.next_seq < longest => Some(Rewrite::Shorter { previous_next_seq: longest }),
            _ => None,
        },
        Source::Window => {
            if let Some(previous) = &history.previous_window {
                if report.next_seq < previous.next_seq {
                    return Some(Rewrite::Shorter { previous_next_seq: previous.next_seq });
                }
            }
            match &history.next_window {
                // A later window is shorter than this one: the chain behind it was rewritten.
                Some(next) if next.next_seq < report.next_seq => {
                    Some(Rewrite::Shorter { previous_next_seq: report.next_seq })
                }
                _ => None,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(next_seq: u64, c: char) -> ChainHead {
        ChainHead { next_seq, head: c.to_string().repeat(64) }
    }

    #[test]
    fn a_growing_chain_is_consistent() {
        let history = History { longest: Some(10), previous_window: Some(head(10, 'a')), ..History::default() };
        assert_eq!(judge(&head(12, 'b'), Source::Status, &history), None);
        assert_eq!(judge(&head(12, 'b'), Source::Window, &history), None);
        let same = History { same_length: Some("a".repeat(64)), longest: Some(10), ..History::default() };
        assert_eq!(judge(&head(10, 'a'), Source::Status, &same), None, "a repeated report");
    }

    #[test]
    fn the_same_length_with_another_head_is_a_fork() {
        let history = History { same_length: Some("a".repeat(64)), longest: Some(10), ..History::default() };
        assert_eq!(
            judge(&head(10, 'b'), Source::Window, &history),
            Some(Rewrite::Forked { previous_head: "a".repeat(64) })
        );
    }

    #[test]
    fn a_status_shorter_than_anything_reported_is_a_rewrite() {
        let history = History { longest: Some(10), ..History::default() };
        assert_eq!(judge(&head(4, 'c'), Source::Status, &history), Some(Rewrite::Shorter { previous_next_seq: 10 }));
    }

    #[test]
    fn an_old_window_arriving_after_a_newer_status_is_not_a_rewrite() {
        // The backlog of an outage: windows with older heads arrive after the reconnect's status.
        let history = History { longest: Some(50), previous_window: Some(head(8, 'a')), ..History::default() };
        assert_eq!(judge(&head(9, 'b'), Source::Window, &history), None);
    }

    #[test]
    fn windows_that_shrink_in_message_order_are_a_rewrite() {
        let after = History { previous_window: Some(head(10, 'a')), ..History::default() };
        assert_eq!(judge(&head(6, 'b'), Source::Window, &after), Some(Rewrite::Shorter { previous_next_seq: 10 }));
        let before = History { next_window: Some(head(6, 'b')), ..History::default() };
        assert_eq!(judge(&head(10, 'a'), Source::Window, &before), Some(Rewrite::Shorter { previous_next_seq: 10 }));
    }
}
