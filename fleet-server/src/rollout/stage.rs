//! The rollout's stage machine: what the evidence of a stage means (pass,
//! fail, inconclusive, outage, or keep watching), and how a rollout moves
//! between stages and states. No I/O and no clock: the caller supplies the
//! time and the evidence, so every path is tested with made-up time.

use std::collections::BTreeMap;

use super::sequential::{PeriodCounts, RateTest};

/// What a rollout watches: each a count of bad events over an exposure,
/// compared between the stage and its control cohort.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Scans answered NO_PILL or BAD_IMAGE (no answer), per scan.
    Unanswered,
    /// UNCERTAIN answers per scan.
    Uncertain,
    /// Verification scans not answered MATCH (1 − automation), per verification scan.
    NotAutomated,
    /// Scans slower than the control cohort's p95 bucket's lower bound (its
    /// upper one when that bucket holds the bulk; `evidence.rs`), per scan with a latency.
    Slow,
    /// Identified pills with top-1 probability at most 0.9, per identified pill.
    LowConfidence,
    /// GPU requests the CPU answered after a failure, per scan.
    Fallbacks,
    /// Answers the pharmacist corrected, per piece of feedback.
    Corrected,
}

impl Metric {
    /// Every metric, in report order.
    pub const ALL: [Metric; 7] = [
        Metric::NotAutomated,
        Metric::Uncertain,
        Metric::Unanswered,
        Metric::Slow,
        Metric::LowConfidence,
        Metric::Fallbacks,
        Metric::Corrected,
    ];

    /// Whether a pass must show this metric is not worse (common events),
    /// or only that nothing shows it worse (rare events: a stage without a
    /// single fallback cannot prove it has fewer than a control without one).
    pub fn must_show_not_worse(self) -> bool {
        matches!(self, Metric::NotAutomated | Metric::Uncertain | Metric::Slow | Metric::LowConfidence)
    }

    /// Its name in reports and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::Unanswered => "unanswered",
            Metric::Uncertain => "uncertain",
            Metric::NotAutomated => "not_automated",
            Metric::Slow => "slow",
            Metric::LowConfidence => "low_confidence",
            Metric::Fallbacks => "fallbacks",
            Metric::Corrected => "corrected",
        }
    }
}

/// How a rollout proceeds (`--plan FILE`; every field has a default).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Plan {
    /// Percent of the fleet in each stage, rising, the last 100. Every stage
    /// but the last is judged against the devices not in it; the last is
    /// where the rollout ends.
    pub stages: Vec<u32>,
    /// The least time a stage runs before it may pass, minutes.
    pub soak_minutes: u64,
    /// The most: a stage without a verdict by then is inconclusive, minutes.
    pub max_stage_minutes: u64,
    /// Scans a pass needs from stage devices that reported since installing.
    pub min_scans: u64,
    /// Stage devices that must have reported since installing (at most the stage's size).
    pub min_devices: u32,
    /// The chance of a false halt, and of a false pass, over all metrics.
    pub alpha: f64,
    /// A metric halts the stage when its rate is shown above `1 + halt_tolerance` times the control's.
    pub halt_tolerance: f64,
    /// A metric that must show it is not worse does so below `1 + pass_margin` times the control's.
    pub pass_margin: f64,
    /// Install failures (failed verification or self-test) that halt a stage.
    pub max_install_failures: u64,
    /// Crash-loop rollbacks that halt a stage.
    pub max_crash_loops: u64,
    /// Minutes without telemetry from either cohort before the rollout pauses as an outage.
    pub outage_minutes: u64,
    /// Whether the last stage (100 %) waits for an admin's approval.
    pub approve_last_stage: bool,
}

impl Default for Plan {
    fn default() -> Plan {
        Plan {
            stages: vec![1, 10, 50, 100],
            soak_minutes: 60,
            max_stage_minutes: 24 * 60,
            min_scans: 2_000,
            min_devices: 3,
            alpha: 0.05,
            halt_tolerance: 0.1,
            pass_margin: 0.25,
            max_install_failures: 1,
            max_crash_loops: 1,
            outage_minutes: 15,
            approve_last_stage: true,
        }
    }
}

impl Plan {
    /// Reads a plan file (TOML; every key optional, an unknown key is an
    /// error naming it) and checks it; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Plan, String> {
        let plan: Plan = serde_path_to_error::deserialize(toml::Deserializer::new(text)).map_err(|e| {
            let key = e.path().to_string();
            let key = if key == "." { "(top level)".to_string() } else { key };
            format!("{file}: {key}: {}", e.inner().message())
        })?;
        plan.check().map_err(|problems| format!("{file}: {problems}"))?;
        Ok(plan)
    }

    /// Every problem with the plan, at once.
    pub fn check(&self) -> Result<(), String> {
        let mut problems = Vec::new();
        if self.stages.len() < 2 || self.stages.last() != Some(&100) {
            problems
                .push("stages: at least one stage below 100 (it has a control cohort), and the last 100".to_string());
        }
        if self.stages.windows(2).any(|w| w[0] >= w[1]) || self.stages.first() == Some(&0) {
            problems.push("stages: percentages must rise from above 0".to_string());
        }
        if self.soak_minutes == 0 || self.max_stage_minutes < self.soak_minutes {
            problems.push("soak_minutes must be above 0 and at most max_stage_minutes".to_string());
        }
        if !(self.alpha > 0.0 && self.alpha < 0.5) {
            problems.push("alpha must be above 0 and below 0.5".to_string());
        }
        if !(self.halt_tolerance >= 0.0 && self.pass_margin > 0.0) {
            problems.push("halt_tolerance must be at least 0 and pass_margin above 0".to_string());
        }
        if self.min_scans == 0 || self.min_devices == 0 {
            problems.push("min_scans and min_devices must be above 0 (no data is never a pass)".to_string());
        }
        if self.outage_minutes == 0 || self.max_install_failures == 0 || self.max_crash_loops == 0 {
            problems.push("outage_minutes, max_install_failures and max_crash_loops must be above 0".to_string());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(problems.join("; "))
        }
    }

    /// Each test's share of `alpha`: halting and passing each get `alpha`
    /// split over the metrics (Bonferroni; every test is anytime-valid).
    fn alpha_per_test(&self) -> f64 {
        #[allow(clippy::cast_precision_loss)]
        let metrics = Metric::ALL.len() as f64;
        self.alpha / metrics
    }
}

/// What is known about the current stage when it is judged.
#[derive(Debug, Clone, Default)]
pub struct Evidence {
    /// Per metric, per period since the stage began, stage against control.
    pub metrics: BTreeMap<Metric, Vec<PeriodCounts>>,
    /// Devices in the stage.
    pub stage_devices: u32,
    /// Stage devices that reported telemetry since installing the version.
    pub stage_devices_reporting: u32,
    /// Scans from those devices since they installed it.
    pub stage_scans: u64,
    /// Install failures in the stage (verification or self-test failed).
    pub install_failures: u64,
    /// Crash-loop rollbacks in the stage.
    pub crash_loops: u64,
    /// The newest telemetry window from either cohort, Unix ms.
    pub last_telemetry_ms: Option<i64>,
}

/// One metric's numbers behind a decision.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MetricReport {
    /// Which.
    pub metric: Metric,
    /// Counts over the stage so far.
    pub totals: PeriodCounts,
    /// The stage's rate over the control's, most likely (`None`: no events yet).
    pub ratio: Option<f64>,
    /// Its confidence sequence at the decision's level (upper `None`: unbounded).
    pub interval: (f64, Option<f64>),
    /// Evidence that it is worse than the halt tolerance (e-value; halts at `1/α`).
    pub evidence_worse: f64,
    /// Evidence that it is within the pass margin (e-value; passes at `1/α`).
    pub evidence_not_worse: f64,
    /// `worse`, `not_worse`, `no_harm_seen` (rare metrics) or `open`.
    pub verdict: String,
}

/// What the evidence says about a stage now.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome", content = "reason")]
pub enum Outcome {
    /// Not enough yet: keep watching.
    Continue(String),
    /// The stage is not worse than its control: go on.
    Pass,
    /// The stage is worse (or a veto): halt and roll its devices back.
    Fail(String),
    /// The stage ran its longest without a verdict: pause for a human.
    Inconclusive(String),
    /// No telemetry for too long: pause, judge nothing.
    Outage(String),
}

/// A judgement of a stage with the numbers behind it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Decision {
    /// What it says.
    pub outcome: Outcome,
    /// The stage's index in the plan.
    pub stage: usize,
    /// When, Unix ms.
    pub at_ms: i64,
    /// Minutes since the stage began.
    pub minutes: u64,
    /// Stage devices, and those that reported since installing.
    pub stage_devices: (u32, u32),
    /// Scans from them since installing.
    pub stage_scans: u64,
    /// Install failures and crash-loop rollbacks in the stage.
    pub vetoes: (u64, u64),
    /// Each metric.
    pub metrics: Vec<MetricReport>,
}

/// Judges the stage `stage` that began at `started_ms`.
pub fn judge(plan: &Plan, stage: usize, started_ms: i64, now_ms: i64, evidence: &Evidence) -> Decision {
    let minutes = u64::try_from((now_ms - started_ms).max(0) / 60_000).unwrap_or(0);
    let alpha = plan.alpha_per_test();
    let threshold = 1.0 / alpha;
    let mut metrics = Vec::new();
    let (mut worse, mut open) = (Vec::new(), Vec::new());
    for metric in Metric::ALL {
        let mut test = RateTest::new();
        for period in evidence.metrics.get(&metric).map(Vec::as_slice).unwrap_or_default() {
            test.add(*period);
        }
        let evidence_worse = test.evidence_above(1.0 + plan.halt_tolerance);
        let evidence_not_worse = test.evidence_below(1.0 + plan.pass_margin);
        let verdict = if evidence_worse >= threshold {
            worse.push(metric.as_str());
            "worse"
        } else if evidence_not_worse >= threshold {
            "not_worse"
        } else if metric.must_show_not_worse() {
            open.push(metric.as_str());
            "open"
        } else {
            "no_harm_seen"
        };
        let (low, high) = test.interval(alpha);
        metrics.push(MetricReport {
            metric,
            totals: test.totals(),
            ratio: test.estimate(),
            interval: (low, high.is_finite().then_some(high)),
            evidence_worse,
            evidence_not_worse,
            verdict: verdict.to_string(),
        });
    }
    let needed_devices = plan.min_devices.min(evidence.stage_devices).max(1);
    let outcome = if evidence.install_failures >= plan.max_install_failures {
        Outcome::Fail(format!("{} install failures (veto at {})", evidence.install_failures, plan.max_install_failures))
    } else if evidence.crash_loops >= plan.max_crash_loops {
        Outcome::Fail(format!("{} crash-loop rollbacks (veto at {})", evidence.crash_loops, plan.max_crash_loops))
    } else if !worse.is_empty() {
        Outcome::Fail(format!("worse than the control cohort: {}", worse.join(", ")))
    } else if evidence.last_telemetry_ms.is_none_or(|t| now_ms - t > minutes_ms(plan.outage_minutes))
        && now_ms - started_ms > minutes_ms(plan.outage_minutes)
    {
        Outcome::Outage(format!("no telemetry from either cohort for over {} minutes", plan.outage_minutes))
    } else if minutes < plan.soak_minutes {
        Outcome::Continue(format!("soaking: {minutes} of {} minutes", plan.soak_minutes))
    } else if evidence.stage_devices_reporting < needed_devices || evidence.stage_scans < plan.min_scans {
        let why = format!(
            "{} devices reporting since installing ({needed_devices} needed), {} of {} scans",
            evidence.stage_devices_reporting, evidence.stage_scans, plan.min_scans
        );
        if minutes >= plan.max_stage_minutes {
            Outcome::Inconclusive(format!("too little evidence after {minutes} minutes: {why}"))
        } else {
            Outcome::Continue(why)
        }
    } else if !open.is_empty() {
        if minutes >= plan.max_stage_minutes {
            Outcome::Inconclusive(format!("not shown within the margin after {minutes} minutes: {}", open.join(", ")))
        } else {
            Outcome::Continue(format!("not yet shown within the margin: {}", open.join(", ")))
        }
    } else {
        Outcome::Pass
    };
    Decision {
        outcome,
        stage,
        at_ms: now_ms,
        minutes,
        stage_devices: (evidence.stage_devices, evidence.stage_devices_reporting),
        stage_scans: evidence.stage_scans,
        vetoes: (evidence.install_failures, evidence.crash_loops),
        metrics,
    }
}

fn minutes_ms(minutes: u64) -> i64 {
    i64::try_from(minutes).unwrap_or(i64::MAX / 60_000) * 60_000
}

/// Where a rollout is.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum State {
    /// Stage `stage` is being watched since `since_ms`.
    Running {
        /// The stage's index.
        stage: usize,
        /// When it began.
        since_ms: i64,
    },
    /// Stopped at `stage` for a human (inconclusive, outage, or an admin's pause).
    Paused {
        /// The stage's index.
        stage: usize,
        /// Why.
        reason: String,
    },
    /// The last stage waits for an admin's approval.
    AwaitingApproval {
        /// The stage's index.
        stage: usize,
    },
    /// Every stage passed: the version is in production.
    Completed,
    /// A stage failed: its devices are ordered back to the previous version.
    Halted {
        /// The stage's index.
        stage: usize,
        /// Why.
        reason: String,
    },
    /// An admin stopped it: its devices are ordered back.
    Aborted {
        /// Who.
        by: String,
    },
}

impl State {
    /// Percent of the fleet assigned the new version (0 once rolled back).
    pub fn percent(&self, plan: &Plan) -> u32 {
        match self {
            State::Running { stage, .. } | State::Paused { stage, .. } | State::AwaitingApproval { stage } => {
                plan.stages.get(*stage).copied().unwrap_or(0)
            }
            State::Completed => 100,
            State::Halted { .. } | State::Aborted { .. } => 0,
        }
    }

    /// Whether nothing more will happen.
    pub fn is_final(&self) -> bool {
        matches!(self, State::Completed | State::Halted { .. } | State::Aborted { .. })
    }
}

/// What moves a rollout.
#[derive(Debug, Clone, PartialEq)]
pub enum Command<'a> {
    /// A decision of the running stage.
    Decided(&'a Decision),
    /// An admin pauses.
    Pause(&'a str),
    /// An admin resumes a paused stage (it starts its evidence afresh).
    Resume,
    /// An admin approves the last stage.
    Approve,
    /// An admin aborts.
    Abort(&'a str),
}

/// The next state, or why the command does not apply.
pub fn next(plan: &Plan, state: &State, command: &Command<'_>, now_ms: i64) -> Result<State, String> {
    let last = plan.stages.len() - 1;
    match (state, command) {
        (State::Running { stage, .. }, Command::Decided(decision)) => Ok(match &decision.outcome {
            Outcome::Continue(_) => state.clone(),
            // The last stage (100 %) has no control cohort: it is not judged, it is the end.
            Outcome::Pass if *stage + 1 >= last && plan.approve_last_stage => State::AwaitingApproval { stage: *stage },
            Outcome::Pass if *stage + 1 >= last => State::Completed,
            Outcome::Pass => State::Running { stage: stage + 1, since_ms: now_ms },
            Outcome::Fail(reason) => State::Halted { stage: *stage, reason: reason.clone() },
            Outcome::Inconclusive(reason) | Outcome::Outage(reason) => {
                State::Paused { stage: *stage, reason: reason.clone() }
            }
        }),
        (State::Running { stage, .. }, Command::Pause(by)) => {
            Ok(State::Paused { stage: *stage, reason: format!("paused by {by}") })
        }
        (State::Paused { stage, .. }, Command::Resume) => Ok(State::Running { stage: *stage, since_ms: now_ms }),
        (State::AwaitingApproval { .. }, Command::Approve) => Ok(State::Completed),
        (state, Command::Abort(by)) if !state.is_final() => Ok(State::Aborted { by: (*by).to_string() }),
        (state, command) => Err(format!("{} cannot take {}", state_name(state), command_name(command))),
    }
}

fn state_name(state: &State) -> &'static str {
    match state {
        State::Running { .. } => "a running rollout",
        State::Paused { .. } => "a paused rollout",
        State::AwaitingApproval { .. } => "a rollout awaiting approval",
        State::Completed => "a completed rollout",
        State::Halted { .. } => "a halted rollout",
        State::Aborted { .. } => "an aborted rollout",
    }
}

fn command_name(command: &Command<'_>) -> &'static str {
    match command {
        Command::Decided(_) => "a decision",
        Command::Pause(_) => "pause",
        Command::Resume => "resume",
        Command::Approve => "approve",
        Command::Abort(_) => "abort",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: i64 = 60_000;

    /// `hours` of hourly periods of every metric: the stage with `stage_rate`
    /// bad events per scan on `stage_scans`, the control with `control_rate` on 9x as many.
    fn evidence(hours: u64, stage_scans: u64, stage_rate: f64, control_rate: f64, last_ms: i64) -> Evidence {
        let period = |rate_s: f64, rate_c: f64| PeriodCounts {
            stage_events: (rate_s * stage_scans as f64).round() as u64,
            stage_exposure: stage_scans,
            control_events: (rate_c * 9.0 * stage_scans as f64).round() as u64,
            control_exposure: 9 * stage_scans,
        };
        let mut metrics = BTreeMap::new();
        for metric in Metric::ALL {
            // Rare metrics: no events at all in either cohort.
            let counts = if metric.must_show_not_worse() { period(stage_rate, control_rate) } else { period(0.0, 0.0) };
            metrics.insert(metric, vec![counts; hours as usize]);
        }
        Evidence {
            metrics,
            stage_devices: 10,
            stage_devices_reporting: 10,
            stage_scans: hours * stage_scans,
            install_failures: 0,
            crash_loops: 0,
            last_telemetry_ms: Some(last_ms),
        }
    }

    #[test]
    fn the_default_plan_is_valid_and_bad_plans_say_why() {
        Plan::default().check().unwrap();
        let bad = Plan { stages: vec![10, 5, 90], alpha: 0.0, min_scans: 0, ..Plan::default() };
        let problems = bad.check().unwrap_err();
        for expected in ["the last 100", "must rise", "alpha", "no data is never a pass"] {
            assert!(problems.contains(expected), "{expected:?} in {problems}");
        }
        assert!(Plan { stages: vec![100], ..Plan::default() }.check().is_err(), "a stage with a control cohort");
    }

    #[test]
    fn a_plan_file_sets_what_it_names_and_a_wrong_key_is_named() {
        let plan =
            Plan::parse("stages = [5, 25, 100]\nsoak_minutes = 120\napprove_last_stage = false\n", "p.toml").unwrap();
        assert_eq!(
            (plan.stages.as_slice(), plan.soak_minutes, plan.approve_last_stage),
            (&[5, 25, 100][..], 120, false)
        );
        assert_eq!(plan.min_scans, Plan::default().min_scans, "what the file leaves out is the default");
        let wrong = Plan::parse("soak_minute = 120\n", "p.toml").unwrap_err();
        assert!(wrong.contains("p.toml") && wrong.contains("soak_minute"), "{wrong}");
        let typed = Plan::parse("alpha = \"low\"\n", "p.toml").unwrap_err();
        assert!(typed.contains("alpha"), "{typed}");
        let unchecked = Plan::parse("stages = [50, 10]\n", "p.toml").unwrap_err();
        assert!(unchecked.contains("must rise"), "{unchecked}");
        assert_eq!(Plan::parse("", "p.toml").unwrap(), Plan::default());
    }

    #[test]
    fn no_data_is_never_a_pass() {
        let plan = Plan::default();
        let now = 30 * 60 * MINUTE;
        let empty = Evidence { stage_devices: 10, last_telemetry_ms: Some(now), ..Evidence::default() };
        let decision = judge(&plan, 0, 0, now, &empty);
        assert!(matches!(decision.outcome, Outcome::Inconclusive(_)), "{:?}", decision.outcome);
        assert!(decision.metrics.iter().all(|m| m.evidence_worse == 1.0 && m.evidence_not_worse == 1.0));
    }

    #[test]
    fn an_equal_stage_passes_after_its_soak_and_a_worse_one_fails_before_it() {
        let plan = Plan::default();
        // Half an hour in: a stage with 30 % UNCERTAIN against 10 % has shown it.
        let worse = judge(&plan, 0, 0, 30 * MINUTE, &evidence(1, 500, 0.3, 0.1, 30 * MINUTE));
        assert!(matches!(&worse.outcome, Outcome::Fail(why) if why.contains("uncertain")), "{:?}", worse.outcome);
        let uncertain = worse.metrics.iter().find(|m| m.metric == Metric::Uncertain).unwrap();
        assert!(uncertain.interval.0 > 1.1 && uncertain.verdict == "worse", "{uncertain:?}");
        // An equal stage keeps soaking, then passes; rare metrics without events do not block it.
        let early = judge(&plan, 0, 0, 30 * MINUTE, &evidence(1, 500, 0.1, 0.1, 30 * MINUTE));
        assert!(matches!(early.outcome, Outcome::Continue(_)), "{:?}", early.outcome);
        let soaked = judge(&plan, 0, 0, 4 * 60 * MINUTE, &evidence(4, 2_000, 0.1, 0.1, 4 * 60 * MINUTE));
        assert_eq!(soaked.outcome, Outcome::Pass, "{:?}", soaked.metrics);
        let fallbacks = soaked.metrics.iter().find(|m| m.metric == Metric::Fallbacks).unwrap();
        assert_eq!((fallbacks.verdict.as_str(), fallbacks.ratio), ("no_harm_seen", None));
    }

    #[test]
    fn a_decision_on_overwhelming_evidence_is_stored_and_read_back() {
        // A day of a stage that gets every scan wrong: the e-value is beyond
        // f64's range, and a decision must still round-trip through its JSON.
        let plan = Plan::default();
        let decision = judge(&plan, 0, 0, 24 * 60 * MINUTE, &evidence(24, 5_000, 1.0, 0.01, 24 * 60 * MINUTE));
        assert!(matches!(decision.outcome, Outcome::Fail(_)), "{:?}", decision.outcome);
        let text = serde_json::to_string(&decision).unwrap();
        let back: Decision = serde_json::from_str(&text).unwrap();
        assert_eq!(back, decision);
    }

    #[test]
    fn vetoes_outages_and_too_little_traffic() {
        let plan = Plan::default();
        let now = 2 * 60 * MINUTE;
        let mut crashed = evidence(2, 2_000, 0.1, 0.1, now);
        crashed.crash_loops = 1;
        assert!(matches!(judge(&plan, 0, 0, now, &crashed).outcome, Outcome::Fail(why) if why.contains("crash-loop")));
        let mut failed = evidence(2, 2_000, 0.1, 0.1, now);
        failed.install_failures = 1;
        assert!(matches!(judge(&plan, 0, 0, now, &failed).outcome, Outcome::Fail(why) if why.contains("install")));
        // Telemetry stopped 20 minutes ago: an outage pauses, it does not fail or pass.
        let silent = evidence(2, 2_000, 0.1, 0.1, now - 20 * MINUTE);
        assert!(matches!(judge(&plan, 0, 0, now, &silent).outcome, Outcome::Outage(_)));
        // A trickle of scans: not a pass while time remains, inconclusive at the cap.
        let trickle = evidence(2, 30, 0.1, 0.1, now);
        assert!(matches!(judge(&plan, 0, 0, now, &trickle).outcome, Outcome::Continue(_)));
        let capped = plan.max_stage_minutes as i64 * MINUTE;
        let trickle = evidence(24, 30, 0.1, 0.1, capped);
        assert!(matches!(judge(&plan, 0, 0, capped, &trickle).outcome, Outcome::Inconclusive(_)));
    }

    #[test]
    fn a_rollout_moves_through_its_stages_and_waits_for_approval() {
        let plan = Plan::default();
        let pass = Decision {
            outcome: Outcome::Pass,
            stage: 0,
            at_ms: 0,
            minutes: 60,
            stage_devices: (1, 1),
            stage_scans: 1,
            vetoes: (0, 0),
            metrics: Vec::new(),
        };
        let mut state = State::Running { stage: 0, since_ms: 0 };
        let mut seen = Vec::new();
        for t in 1..=3 {
            state = next(&plan, &state, &Command::Decided(&pass), t).unwrap();
            seen.push(state.percent(&plan));
        }
        assert_eq!(state, State::AwaitingApproval { stage: 2 });
        assert_eq!(seen, [10, 50, 50]);
        assert!(next(&plan, &state, &Command::Resume, 4).is_err(), "only approve moves it on");
        state = next(&plan, &state, &Command::Approve, 4).unwrap();
        assert_eq!((state.clone(), state.percent(&plan)), (State::Completed, 100));
        assert!(next(&plan, &state, &Command::Abort("alice"), 5).is_err(), "a completed rollout stays");
        // Without approval the last pass completes it.
        let auto = Plan { approve_last_stage: false, ..Plan::default() };
        let done = next(&auto, &State::Running { stage: 2, since_ms: 0 }, &Command::Decided(&pass), 1).unwrap();
        assert_eq!(done, State::Completed);
    }

    #[test]
    fn failures_halt_pauses_resume_afresh_and_aborts_roll_back() {
        let plan = Plan::default();
        let decided = |outcome: Outcome| Decision {
            outcome,
            stage: 1,
            at_ms: 0,
            minutes: 5,
            stage_devices: (1, 1),
            stage_scans: 1,
            vetoes: (0, 0),
            metrics: Vec::new(),
        };
        let running = State::Running { stage: 1, since_ms: 0 };
        let fail = decided(Outcome::Fail("worse: uncertain".into()));
        let halted = next(&plan, &running, &Command::Decided(&fail), 10).unwrap();
        assert_eq!((halted.percent(&plan), halted.is_final()), (0, true));
        let outage = decided(Outcome::Outage("no telemetry".into()));
        let paused = next(&plan, &running, &Command::Decided(&outage), 10).unwrap();
        assert_eq!(paused.percent(&plan), 10, "an outage keeps the stage where it is");
        assert_eq!(next(&plan, &paused, &Command::Resume, 99).unwrap(), State::Running { stage: 1, since_ms: 99 });
        let by_admin = next(&plan, &running, &Command::Pause("bob"), 10).unwrap();
        assert!(matches!(&by_admin, State::Paused { reason, .. } if reason.contains("bob")));
        let aborted = next(&plan, &by_admin, &Command::Abort("bob"), 11).unwrap();
        assert_eq!((aborted.percent(&plan), aborted.is_final()), (0, true));
        assert!(next(&plan, &running, &Command::Approve, 12).is_err());
    }
}
