//! Anytime-valid comparison of an event rate between a rollout stage and
//! its control cohort, for counts as sparse as a handful of errors.
//!
//! # The model
//!
//! Every metric is a count of *bad* events over an exposure (UNCERTAIN
//! answers per scan, engine fallbacks per scan, corrections per piece of
//! feedback …), observed per period (an hour) in both cohorts over the same
//! hours. With events arriving as Poisson processes of rates `λ_S` (stage)
//! and `λ_C` (control), and exposures `e` and `f` in a period, the stage's
//! share of the period's `n` events is binomial given `n`, with
//!
//! ```text
//! ρ(θ) = θ·e / (θ·e + f),   θ = λ_S / λ_C
//! ```
//!
//! so the likelihood of `θ` needs no rate of its own and is exact however
//! few the events (this is the conditioning Netflix's sequential tests for
//! counting processes rest on; Lindon & Malek 2022). Periods where either
//! cohort has no exposure say nothing and are skipped.
//!
//! # The tests
//!
//! Against `H0: θ ≤ θ0` the mixture over `θ > θ0` of likelihood ratios
//! `L(θ)/L(θ0)` is a test supermartingale under every `θ' ≤ θ0` (the
//! binomial's likelihood ratio is monotone in `ρ`), so by Ville's inequality
//! it ever reaches `1/α` with probability at most `α`, however often it is
//! looked at: that is the *e-value* [`RateTest::evidence_above`] returns,
//! and [`RateTest::evidence_below`] is the mirror image. The mixing
//! distribution is a grid over `log θ` with weights from two normals, a
//! narrow and a wide one (any mixture is valid; this one is sensitive from
//! about 1.2x in plenty of data and to 100x in a handful of errors). The confidence sequence
//! [`RateTest::interval`] holds every `θ` whose two-sided e-value stays
//! below `1/α`. No data gives e-value 1 and the whole line as interval:
//! never evidence of anything.
//!
//! What the model does not see: events that cluster by device (one stage
//! counter with a bad lamp) are more variable than Poisson, which makes the
//! test quicker to alarm than `α` says; the stage machine asks for a
//! tolerance before it halts and for several reporting devices before it
//! passes.

/// One period's counts of a metric: bad events and exposure, per cohort.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeriodCounts {
    /// Bad events in the stage.
    pub stage_events: u64,
    /// The stage's exposure (scans, or pieces of feedback).
    pub stage_exposure: u64,
    /// Bad events in the control cohort.
    pub control_events: u64,
    /// The control cohort's exposure.
    pub control_exposure: u64,
}

/// Grid step of the mixture over `log θ`.
const STEP: f64 = 0.05;
/// Grid points on each side of the null (up to `e^(STEP·POINTS)` ≈ 400x).
const POINTS: usize = 120;
/// Standard deviations of the mixture's two normal components on `log θ`,
/// equally weighted: one for modest changes (1.2-3x) in plenty of scans,
/// one for large changes seen in a handful of rare events.
const SCALES: [f64; 2] = [0.5, 2.0];

/// The evidence about one metric's rate ratio so far.
#[derive(Debug, Clone, Default)]
pub struct RateTest {
    /// Informative periods: (stage events, stage exposure, control events, control exposure).
    periods: Vec<(f64, f64, f64, f64)>,
    totals: PeriodCounts,
}

impl RateTest {
    /// No evidence yet.
    pub fn new() -> RateTest {
        RateTest::default()
    }

    /// Adds a period's counts (a period where either cohort has no exposure is
    /// counted in the totals but carries no evidence).
    pub fn add(&mut self, period: PeriodCounts) {
        self.totals.stage_events += period.stage_events;
        self.totals.stage_exposure += period.stage_exposure;
        self.totals.control_events += period.control_events;
        self.totals.control_exposure += period.control_exposure;
        if period.stage_exposure > 0 && period.control_exposure > 0 {
            #[allow(clippy::cast_precision_loss)] // counts far below 2^52
            self.periods.push((
                period.stage_events as f64,
                period.stage_exposure as f64,
                period.control_events as f64,
                period.control_exposure as f64,
            ));
        }
    }

    /// Everything added.
    pub fn totals(&self) -> PeriodCounts {
        self.totals
    }

    /// Log-likelihood of `log θ`, up to a constant.
    fn log_likelihood(&self, log_theta: f64) -> f64 {
        let theta = log_theta.exp();
        self.periods.iter().map(|&(x, e, y, f)| x * log_theta - (x + y) * (theta * e + f).ln()).sum()
    }

    /// Mixture of likelihood ratios against `log θ0` over the grid points on
    /// the given side (`+1`: above, `-1`: below, `0`: both).
    fn mixture(&self, log_theta0: f64, side: i8) -> f64 {
        if self.periods.is_empty() {
            return 1.0;
        }
        let null = self.log_likelihood(log_theta0);
        let (mut weighted, mut weights) = (0.0, 0.0);
        for k in 1..=POINTS {
            #[allow(clippy::cast_precision_loss)]
            let u = STEP * k as f64;
            let weight: f64 = SCALES.iter().map(|s| (-(u * u) / (2.0 * s * s)).exp() / s).sum();
            for sign in [1.0, -1.0] {
                if (side > 0 && sign < 0.0) || (side < 0 && sign > 0.0) {
                    continue;
                }
                weighted += weight * (self.log_likelihood(log_theta0 + sign * u) - null).exp();
                weights += weight;
            }
        }
        // Overwhelming evidence overflows the likelihood ratio to infinity;
        // the largest finite e-value says the same and stays a JSON number
        // in the stored decision (serde_json writes infinity as null).
        (weighted / weights).min(f64::MAX)
    }

    /// The e-value against "the stage's rate is at most `theta0` times the
    /// control's" (evidence that it is higher).
    pub fn evidence_above(&self, theta0: f64) -> f64 {
        self.mixture(theta0.ln(), 1)
    }

    /// The e-value against "the stage's rate is at least `theta1` times the
    /// control's" (evidence that it is lower).
    pub fn evidence_below(&self, theta1: f64) -> f64 {
        self.mixture(theta1.ln(), -1)
    }

    /// The most likely ratio (`None` until the periods say anything: no
    /// events in either cohort leave every ratio equally likely).
    pub fn estimate(&self) -> Option<f64> {
        let events: f64 = self.periods.iter().map(|p| p.0 + p.2).sum();
        if events == 0.0 {
            return None;
        }
        // The log-likelihood is concave in log θ: bisect on its slope.
        let slope = |log_theta: f64| {
            let theta = log_theta.exp();
            self.periods.iter().map(|&(x, e, y, f)| x - (x + y) * theta * e / (theta * e + f)).sum::<f64>()
        };
        let (mut low, mut high) = (-12.0_f64, 12.0_f64);
        if slope(low) <= 0.0 {
            return Some(low.exp());
        }
        if slope(high) >= 0.0 {
            return Some(high.exp());
        }
        for _ in 0..60 {
            let mid = 0.5 * (low + high);
            if slope(mid) > 0.0 {
                low = mid;
            } else {
                high = mid;
            }
        }
        Some((0.5 * (low + high)).exp())
    }

    /// The confidence sequence at level `1 - alpha` for the ratio: `(lower,
    /// upper)`, with `0` and infinity where the data do not bound it.
    pub fn interval(&self, alpha: f64) -> (f64, f64) {
        let Some(estimate) = self.estimate() else { return (0.0, f64::INFINITY) };
        let threshold = 1.0 / alpha;
        let outside = |log_theta: f64| self.mixture(log_theta, 0) >= threshold;
        let centre = estimate.ln().clamp(-12.0, 12.0);
        let bound = |direction: f64| {
            let far = centre + direction * 12.0;
            if !outside(far) {
                return None;
            }
            let (mut inside, mut out) = (centre, far);
            for _ in 0..40 {
                let mid = 0.5 * (inside + out);
                if outside(mid) {
                    out = mid;
                } else {
                    inside = mid;
                }
            }
            Some(inside.exp())
        };
        (bound(-1.0).unwrap_or(0.0), bound(1.0).unwrap_or(f64::INFINITY))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator.
    struct Rng(u64);

    impl Rng {
        fn uniform(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 >> 11) as f64 / (1u64 << 53) as f64
        }

        fn poisson(&mut self, mean: f64) -> u64 {
            // Knuth's method, in chunks so large means do not underflow.
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

    fn period(
        rng: &mut Rng,
        stage_rate: f64,
        stage_exposure: u64,
        control_rate: f64,
        control_exposure: u64,
    ) -> PeriodCounts {
        PeriodCounts {
            stage_events: rng.poisson(stage_rate * stage_exposure as f64),
            stage_exposure,
            control_events: rng.poisson(control_rate * control_exposure as f64),
            control_exposure,
        }
    }

    #[test]
    fn no_data_is_no_evidence() {
        let mut test = RateTest::new();
        assert_eq!(test.evidence_above(1.0), 1.0);
        assert_eq!(test.evidence_below(1.0), 1.0);
        assert_eq!(test.interval(0.05), (0.0, f64::INFINITY));
        // Exposure on one side only, and periods without events, say nothing either.
        test.add(PeriodCounts { stage_events: 3, stage_exposure: 100, control_events: 0, control_exposure: 0 });
        test.add(PeriodCounts { stage_events: 0, stage_exposure: 100, control_events: 0, control_exposure: 900 });
        assert_eq!(test.evidence_above(1.0), 1.0);
        assert_eq!(test.estimate(), None);
        assert_eq!(test.totals().stage_events, 3);
    }

    #[test]
    fn overwhelming_evidence_is_a_finite_e_value() {
        // Every stage scan an error and none of the control's, over many
        // periods: the likelihood ratio is far beyond f64's range.
        let mut test = RateTest::new();
        for _ in 0..200 {
            test.add(PeriodCounts {
                stage_events: 500,
                stage_exposure: 500,
                control_events: 0,
                control_exposure: 5_000,
            });
        }
        let e = test.evidence_above(1.1);
        assert!(e.is_finite() && e > 1e300, "{e}");
        assert_eq!(serde_json::to_string(&e).unwrap().parse::<f64>().unwrap(), e);
    }

    #[test]
    fn a_few_errors_in_a_small_stage_are_judged_by_their_exposure() {
        // 4 errors in 1,000 stage scans against 2 in 99,000 control scans:
        // sparse, but 200 times the rate; a rank test would call them equal.
        let mut test = RateTest::new();
        test.add(PeriodCounts { stage_events: 4, stage_exposure: 1_000, control_events: 2, control_exposure: 99_000 });
        assert!(test.evidence_above(1.1) > 20.0, "{}", test.evidence_above(1.1));
        let (low, high) = test.interval(0.05);
        assert!(low > 1.1 && high > 100.0, "({low}, {high})");
        // One error each at the same rates: not enough to call.
        let mut test = RateTest::new();
        test.add(PeriodCounts { stage_events: 1, stage_exposure: 1_000, control_events: 99, control_exposure: 99_000 });
        assert!(test.evidence_above(1.1) < 20.0 && test.evidence_below(1.25) < 20.0);
    }

    #[test]
    fn a_worse_stage_is_found_and_an_equal_one_shows_it_is_not_worse() {
        let mut rng = Rng(0x5eed);
        let (mut worse, mut equal) = (RateTest::new(), RateTest::new());
        for _ in 0..24 {
            // The stage holds 10 % of the scans; UNCERTAIN at 10 % vs 15 %.
            worse.add(period(&mut rng, 0.15, 400, 0.10, 3_600));
            equal.add(period(&mut rng, 0.10, 400, 0.10, 3_600));
        }
        assert!(worse.evidence_above(1.1) > 1_000.0, "{}", worse.evidence_above(1.1));
        let estimate = worse.estimate().unwrap();
        assert!((1.35..1.65).contains(&estimate), "{estimate}");
        assert!(equal.evidence_above(1.1) < 1.0, "{}", equal.evidence_above(1.1));
        assert!(equal.evidence_below(1.25) > 100.0, "{}", equal.evidence_below(1.25));
        let (low, high) = equal.interval(0.05);
        assert!(low < 1.0 && high > 1.0 && high < 1.25, "({low}, {high})");
    }

    #[test]
    fn looking_after_every_period_keeps_false_alarms_below_alpha() {
        // 400 good rollouts (equal rates), each watched for 48 hourly looks
        // with exposure shares that change as devices come and go: an alarm
        // at any look counts. Ville's inequality promises at most 5 %.
        let mut rng = Rng(42);
        let runs = 400;
        let mut alarms = 0;
        let mut covered = 0;
        for _ in 0..runs {
            let mut test = RateTest::new();
            let mut alarmed = false;
            for hour in 0..48 {
                let stage = 50 + (hour * 37 % 200) as u64;
                test.add(period(&mut rng, 0.02, stage, 0.02, 2_000));
                if test.evidence_above(1.0) >= 20.0 {
                    alarmed = true;
                }
            }
            alarms += u32::from(alarmed);
            let (low, high) = test.interval(0.05);
            covered += u32::from(low <= 1.0 && 1.0 <= high);
        }
        assert!(alarms <= runs * 5 / 100, "{alarms} false alarms in {runs}");
        assert!(covered >= runs * 95 / 100, "the interval held the true ratio in {covered} of {runs}");
    }
}
