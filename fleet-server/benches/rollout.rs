//! The rollout gates in simulation: a fleet of 10,000 pharmacies of uneven
//! volume and uneven habits, a 1 % stage against the rest, judged every
//! hour by [`judge`] with the default plan.
//!
//! - good rollouts (the candidate as good as production): how many halt
//!   (false halts), how many pass, how long a pass takes;
//! - bad rollouts (UNCERTAIN twice as often, or 1.3 times): hours and stage
//!   scans until the halt, against a fixed-soak rule in the same
//!   simulation (wait a fixed soak, then halt if the stage's rate is above
//!   the tolerance), which is what gating on "the metric after N hours"
//!   amounts to;
//! - the time one decision takes over a day of hourly evidence.
//!
//! `cargo bench -p rxvision-fleet --bench rollout`; RXVISION_BENCH_RUNS
//! (default 200 of each kind).

use std::collections::BTreeMap;
use std::time::Instant;

use rxvision_fleet::rollout::sequential::PeriodCounts;
use rxvision_fleet::rollout::stage::{judge, Evidence, Metric, Outcome, Plan};

/// A small deterministic generator.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        let (u, v) = (self.uniform().max(1e-300), self.uniform());
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos()
    }

    /// Poisson: exact below a mean of 500, normal above.
    fn poisson(&mut self, mean: f64) -> u64 {
        if mean > 500.0 {
            return (mean + mean.sqrt() * self.normal()).round().max(0.0) as u64;
        }
        let mut left = mean;
        let mut count = 0;
        while left > 0.0 {
            let chunk = left.min(30.0);
            left -= chunk;
            let limit = (-chunk).exp();
            let mut product = self.uniform();
            while product > limit {
                count += 1;
                product *= self.uniform();
            }
        }
        count
    }
}

/// Each metric's base rate of bad events, and its exposure per scan.
const METRICS: [(Metric, f64, f64); 7] = [
    (Metric::NotAutomated, 0.15, 0.85),
    (Metric::Uncertain, 0.10, 1.0),
    (Metric::Unanswered, 0.05, 1.0),
    (Metric::Slow, 0.05, 1.0),
    (Metric::LowConfidence, 0.08, 0.9),
    (Metric::Fallbacks, 0.001, 1.0),
    (Metric::Corrected, 0.02, 0.1),
];

/// The fleet: per device, scans an hour and a habit multiplier (a site's
/// own rate of bad events: lighting, pills, staff), lognormal with sd 0.3.
struct Fleet {
    devices: Vec<(f64, f64)>,
}

impl Fleet {
    fn new(rng: &mut Rng, n: usize) -> Fleet {
        let devices = (0..n).map(|_| (20.0 + 60.0 * rng.uniform(), (0.3 * rng.normal() - 0.045).exp())).collect();
        Fleet { devices }
    }
}

struct Run {
    /// Hours until the outcome, and the outcome.
    hours: u64,
    outcome: Outcome,
    stage_scans: u64,
    /// The fixed-soak rule's verdict (halt?).
    fixed_halts: bool,
}

/// One rollout's first stage, judged hourly until it ends (at most the plan's cap).
fn simulate(rng: &mut Rng, fleet: &Fleet, plan: &Plan, uncertain_effect: f64, fixed_soak_hours: u64) -> Run {
    // A fresh 1 % stage each run: which sites land in it is chance.
    let stage: Vec<bool> = fleet.devices.iter().map(|_| rng.uniform() < 0.01).collect();
    let sum = |in_stage: bool, weighted: bool| -> f64 {
        fleet
            .devices
            .iter()
            .zip(&stage)
            .filter(|(_, s)| **s == in_stage)
            .map(|((scans, habit), _)| if weighted { scans * habit } else { *scans })
            .sum()
    };
    let (stage_scans_h, control_scans_h) = (sum(true, false), sum(false, false));
    let (stage_weighted, control_weighted) = (sum(true, true), sum(false, true));
    let stage_devices = stage.iter().filter(|s| **s).count() as u32;
    let mut evidence = Evidence {
        stage_devices,
        stage_devices_reporting: stage_devices,
        last_telemetry_ms: Some(0),
        ..Evidence::default()
    };
    let mut fixed: (u64, u64, f64, f64) = (0, 0, 0.0, 0.0); // uncertain events and exposures over the fixed soak
    let mut fixed_halts = false;
    let mut sequential: Option<(u64, Outcome, u64)> = None;
    for hour in 1..=plan.max_stage_minutes / 60 {
        let now = hour as i64 * 3_600_000;
        for (metric, rate, exposure) in METRICS {
            let effect = if metric == Metric::Uncertain { uncertain_effect } else { 1.0 };
            let stage_exposure = rng.poisson(stage_scans_h * exposure);
            let control_exposure = rng.poisson(control_scans_h * exposure);
            let period = PeriodCounts {
                stage_events: rng.poisson(stage_weighted * exposure * rate * effect),
                stage_exposure,
                control_events: rng.poisson(control_weighted * exposure * rate),
                control_exposure,
            };
            if metric == Metric::Uncertain && hour <= fixed_soak_hours {
                fixed.0 += period.stage_events;
                fixed.1 += period.control_events;
                fixed.2 += period.stage_exposure as f64;
                fixed.3 += period.control_exposure as f64;
            }
            evidence.metrics.entry(metric).or_default().push(period);
        }
        evidence.stage_scans += (stage_scans_h as u64).max(1);
        evidence.last_telemetry_ms = Some(now);
        if hour == fixed_soak_hours {
            let ratio = (fixed.0 as f64 / fixed.2) / (fixed.1 as f64 / fixed.3);
            fixed_halts = ratio > 1.0 + plan.halt_tolerance;
        }
        if sequential.is_none() {
            let decision = judge(plan, 0, 0, now, &evidence);
            if !matches!(decision.outcome, Outcome::Continue(_)) {
                sequential = Some((hour, decision.outcome, evidence.stage_scans));
            }
        }
        // The same data goes on until the fixed rule has decided too.
        if hour >= fixed_soak_hours {
            if let Some((hours, outcome, stage_scans)) = sequential.take() {
                return Run { hours, outcome, stage_scans, fixed_halts };
            }
        }
    }
    unreachable!("the plan's cap ends every stage")
}

fn percentile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    values.sort_by(|a, b| a.partial_cmp(b).unwrap());
    values[((values.len() - 1) as f64 * q).round() as usize]
}

fn main() {
    let runs: usize = std::env::var("RXVISION_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    let plan = Plan::default();
    let mut rng = Rng(0x0dd5_eed5);
    let fleet = Fleet::new(&mut rng, 10_000);
    let fixed_soak_hours = 6;
    println!(
        "rollout gates: 10,000 devices (20-80 scans an hour, habits lognormal sd 0.3), a 1 % stage, default plan \
         (soak {} min, cap {} min, alpha {}, halt above {:.2}x, pass below {:.2}x); fixed-soak rule: {fixed_soak_hours} h, \
         then halt above {:.2}x; {runs} runs of each kind",
        plan.soak_minutes,
        plan.max_stage_minutes,
        plan.alpha,
        1.0 + plan.halt_tolerance,
        1.0 + plan.pass_margin,
        1.0 + plan.halt_tolerance
    );
    for (label, effect) in [("good (1.0x)", 1.0), ("bad (UNCERTAIN 2.0x)", 2.0), ("subtle (UNCERTAIN 1.3x)", 1.3)] {
        let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
        let (mut hours_fail, mut hours_pass, mut scans_fail) = (Vec::new(), Vec::new(), Vec::new());
        let mut fixed_halts = 0;
        for _ in 0..runs {
            let run = simulate(&mut rng, &fleet, &plan, effect, fixed_soak_hours);
            fixed_halts += usize::from(run.fixed_halts);
            let name = match run.outcome {
                Outcome::Pass => {
                    hours_pass.push(run.hours as f64);
                    "pass"
                }
                Outcome::Fail(_) => {
                    hours_fail.push(run.hours as f64);
                    scans_fail.push(run.stage_scans as f64);
                    "halt"
                }
                Outcome::Inconclusive(_) => "inconclusive",
                Outcome::Outage(_) => "outage",
                Outcome::Continue(_) => "continue",
            };
            *outcomes.entry(name).or_default() += 1;
        }
        println!(
            "  {label:<24} sequential: {outcomes:?}; halted after p50 {:.0} h / p95 {:.0} h ({:.0} / {:.0} stage scans); \
             passed after p50 {:.0} h; fixed {fixed_soak_hours} h soak: {fixed_halts} of {runs} halted, each after {fixed_soak_hours} h",
            percentile(&mut hours_fail.clone(), 0.5),
            percentile(&mut hours_fail, 0.95),
            percentile(&mut scans_fail.clone(), 0.5),
            percentile(&mut scans_fail, 0.95),
            percentile(&mut hours_pass, 0.5),
        );
    }
    // One decision over a day of hourly evidence for every metric.
    let mut evidence = Evidence { stage_devices: 100, stage_devices_reporting: 100, ..Evidence::default() };
    for (metric, rate, exposure) in METRICS {
        let periods = (0..24)
            .map(|_| PeriodCounts {
                stage_events: rng.poisson(5_000.0 * exposure * rate),
                stage_exposure: (5_000.0 * exposure) as u64,
                control_events: rng.poisson(495_000.0 * exposure * rate),
                control_exposure: (495_000.0 * exposure) as u64,
            })
            .collect();
        evidence.metrics.insert(metric, periods);
    }
    evidence.stage_scans = 120_000;
    evidence.last_telemetry_ms = Some(24 * 3_600_000);
    let started = Instant::now();
    let decisions = 50;
    for _ in 0..decisions {
        std::hint::black_box(judge(&plan, 0, 0, 24 * 3_600_000, &evidence));
    }
    println!(
        "  one decision over 24 hourly periods of 7 metrics: {:.1} ms",
        started.elapsed().as_secs_f64() * 1000.0 / f64::from(decisions)
    );
}
