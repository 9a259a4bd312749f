//! The state of a live camera's connection, without I/O.
//!
//! A capture thread (see [`super::v4l2`]) drives this machine with what
//! happened — an open that worked or failed, a frame, a read error — and asks
//! it when to try opening again. Everything time-dependent takes `now`, so
//! the tests step through unplug / replug / stall without a camera or a clock.
//!
//! ```text
//!             open ok                      read error (unplugged)
//!   Down ───────────────► Streaming ───────────────────────────► Down
//!    ▲ │ open failed:          │ no frame for STALL_AFTER: health() says
//!    └─┘ retry after backoff   │ Stalled (scans get an error, no hang)
//! ```
//!
//! Re-open attempts back off from [`RETRY_MIN`] to [`RETRY_MAX`], so a camera
//! that is plugged back in is in use again within [`RETRY_MAX`], and a missing
//! one costs one failed `open` every few seconds.

use std::time::{Duration, Instant};

/// First wait before re-opening a camera that failed.
pub const RETRY_MIN: Duration = Duration::from_millis(250);
/// Longest wait between re-open attempts.
pub const RETRY_MAX: Duration = Duration::from_secs(4);
/// A streaming camera silent this long is reported as stalled.
pub const STALL_AFTER: Duration = Duration::from_secs(3);

/// What a technician (and `/v1/status`, `/metrics`) is told about the camera.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CameraHealth {
    /// The first open has not finished yet.
    Starting,
    /// Frames are arriving.
    Up,
    /// Open, but no frame for `silent`.
    Stalled {
        /// How long since the last frame (or since opening).
        silent: Duration,
    },
    /// Not open: never opened yet, unplugged, or failing to open.
    Down {
        /// Why, in the driver's words.
        reason: String,
        /// Open attempts since it went down.
        attempts: u32,
        /// How long it has been down.
        down_for: Duration,
    },
}

impl CameraHealth {
    /// Whether frames are arriving.
    pub fn is_up(&self) -> bool {
        matches!(self, CameraHealth::Up)
    }
}

impl std::fmt::Display for CameraHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CameraHealth::Starting => write!(f, "starting"),
            CameraHealth::Up => write!(f, "up"),
            CameraHealth::Stalled { silent } => write!(f, "stalled: no frame for {:.1} s", silent.as_secs_f64()),
            CameraHealth::Down { reason, attempts, down_for } => write!(
                f,
                "down for {:.0} s ({reason}); {attempts} attempt(s) to re-open so far",
                down_for.as_secs_f64()
            ),
        }
    }
}

#[derive(Debug, Clone)]
enum State {
    Starting,
    Down { since: Instant, reason: String, attempts: u32, next_try: Instant, backoff: Duration },
    Streaming { last_frame: Instant, frames: u64 },
}

/// A camera connection's state machine.
#[derive(Debug, Clone)]
pub struct CameraLink {
    state: State,
    started: Instant,
}

impl CameraLink {
    /// A camera not opened yet; the first attempt is due at once.
    pub fn new(started: Instant) -> CameraLink {
        CameraLink { state: State::Starting, started }
    }

    /// Whether the capture thread should try to open the device now.
    pub fn should_open(&self, now: Instant) -> bool {
        match self.state {
            State::Starting => true,
            State::Down { next_try, .. } => now >= next_try,
            State::Streaming { .. } => false,
        }
    }

    /// How long until the next open attempt is due (zero when streaming or due).
    pub fn wait_before_open(&self, now: Instant) -> Duration {
        match self.state {
            State::Down { next_try, .. } => next_try.saturating_duration_since(now),
            State::Starting | State::Streaming { .. } => Duration::ZERO,
        }
    }

    /// The device opened and streams. Returns how long it was down and how
    /// many attempts opening it took (for the log).
    pub fn opened(&mut self, now: Instant) -> (Duration, u32) {
        let down = match &self.state {
            State::Starting => (now.saturating_duration_since(self.started), 1),
            State::Down { since, attempts, .. } => (now.saturating_duration_since(*since), attempts + 1),
            State::Streaming { .. } => (Duration::ZERO, 0),
        };
        self.state = State::Streaming { last_frame: now, frames: 0 };
        down
    }

    /// An open attempt failed with `reason`; the next one waits a little
    /// longer. Returns whether the failure is worth a log line (the first of
    /// a run, or a new reason; repeats are quiet).
    pub fn open_failed(&mut self, reason: String, now: Instant) -> bool {
        match &mut self.state {
            State::Down { reason: r, attempts, next_try, backoff, .. } => {
                let first = *attempts == 0 || *r != reason;
                *r = reason;
                *attempts += 1;
                *next_try = now + *backoff;
                *backoff = (*backoff * 2).min(RETRY_MAX);
                first
            }
            State::Starting | State::Streaming { .. } => {
                let since = if matches!(self.state, State::Starting) { self.started } else { now };
                self.state =
                    State::Down { since, reason, attempts: 1, next_try: now + RETRY_MIN, backoff: RETRY_MIN * 2 };
                true
            }
        }
    }

    /// A frame arrived.
    pub fn frame_arrived(&mut self, now: Instant) {
        if let State::Streaming { last_frame, frames } = &mut self.state {
            *last_frame = now;
            *frames += 1;
        }
    }

    /// Reading failed (the camera was unplugged or reset): it is down and is
    /// re-opened after [`RETRY_MIN`]. Returns the frames delivered while it was up.
    pub fn lost(&mut self, reason: String, now: Instant) -> u64 {
        let frames = match self.state {
            State::Streaming { frames, .. } => frames,
            State::Starting | State::Down { .. } => 0,
        };
        self.state = State::Down { since: now, reason, attempts: 0, next_try: now + RETRY_MIN, backoff: RETRY_MIN };
        frames
    }

    /// The camera's health at `now`.
    pub fn health(&self, now: Instant) -> CameraHealth {
        match &self.state {
            State::Starting => CameraHealth::Starting,
            State::Streaming { last_frame, .. } => {
                let silent = now.saturating_duration_since(*last_frame);
                if silent >= STALL_AFTER {
                    CameraHealth::Stalled { silent }
                } else {
                    CameraHealth::Up
                }
            }
            State::Down { since, reason, attempts, .. } => CameraHealth::Down {
                reason: reason.clone(),
                attempts: *attempts,
                down_for: now.saturating_duration_since(*since),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn the_first_open_is_due_at_once_and_a_working_camera_is_up() {
        let t0 = Instant::now();
        let mut link = CameraLink::new(t0);
        assert!(link.should_open(t0));
        assert_eq!(link.health(t0), CameraHealth::Starting);
        assert_eq!(link.opened(t0 + ms(5)), (ms(5), 1));
        link.frame_arrived(t0 + ms(40));
        assert_eq!(link.health(t0 + ms(50)), CameraHealth::Up);
        assert!(!link.should_open(t0 + ms(50)));
    }

    #[test]
    fn failed_opens_back_off_up_to_the_limit_and_only_the_first_is_loud() {
        let t0 = Instant::now();
        let mut link = CameraLink::new(t0);
        let mut now = t0;
        let mut waits = Vec::new();
        for attempt in 0..8 {
            assert!(link.should_open(now));
            let loud = link.open_failed("No such file or directory".into(), now);
            assert_eq!(loud, attempt == 0, "attempt {attempt}");
            let wait = link.wait_before_open(now);
            waits.push(wait);
            assert!(!link.should_open(now + wait - ms(1)));
            now += wait;
        }
        assert_eq!(waits[0], RETRY_MIN);
        assert!(waits.windows(2).all(|w| w[1] >= w[0]), "{waits:?}");
        assert_eq!(*waits.last().unwrap(), RETRY_MAX);
        match link.health(now) {
            CameraHealth::Down { attempts, reason, down_for } => {
                assert_eq!(attempts, 8);
                assert!(reason.contains("No such file"));
                assert_eq!(down_for, now - t0);
            }
            other => panic!("{other:?}"),
        }
        // A different failure is worth a log line again.
        assert!(link.open_failed("Permission denied".into(), now));
    }

    #[test]
    fn an_unplugged_camera_goes_down_and_comes_back_with_a_fresh_backoff() {
        let t0 = Instant::now();
        let mut link = CameraLink::new(t0);
        link.opened(t0);
        for i in 1..=3 {
            link.frame_arrived(t0 + ms(33 * i));
        }
        assert_eq!(link.lost("No such device".into(), t0 + ms(200)), 3, "frames delivered while up");
        let health = link.health(t0 + ms(300));
        assert!(!health.is_up());
        assert!(health.to_string().contains("No such device"), "{health}");
        assert!(!link.should_open(t0 + ms(300)));
        assert!(link.should_open(t0 + ms(200) + RETRY_MIN));
        assert!(link.open_failed("No such file or directory".into(), t0 + ms(500)), "a new reason is logged");
        assert!(!link.open_failed("No such file or directory".into(), t0 + ms(900)), "the same failure again is quiet");
        let back = t0 + ms(900) + link.wait_before_open(t0 + ms(900));
        assert_eq!(link.opened(back), (back - (t0 + ms(200)), 3));
        assert!(link.health(back).is_up());
    }

    #[test]
    fn a_camera_missing_at_start_is_down_from_the_start() {
        let t0 = Instant::now();
        let mut link = CameraLink::new(t0);
        assert!(link.open_failed("No such file or directory".into(), t0 + ms(30)));
        assert_eq!(
            link.health(t0 + ms(30)),
            CameraHealth::Down { reason: "No such file or directory".into(), attempts: 1, down_for: ms(30) }
        );
        assert_eq!(link.wait_before_open(t0 + ms(30)), RETRY_MIN);
    }

    #[test]
    fn a_silent_camera_is_reported_stalled() {
        let t0 = Instant::now();
        let mut link = CameraLink::new(t0);
        link.opened(t0);
        link.frame_arrived(t0 + ms(100));
        assert!(link.health(t0 + ms(100) + STALL_AFTER - ms(1)).is_up());
        let stalled = link.health(t0 + ms(100) + STALL_AFTER);
        assert_eq!(stalled, CameraHealth::Stalled { silent: STALL_AFTER });
        assert!(stalled.to_string().starts_with("stalled"));
    }
}
