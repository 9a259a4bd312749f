//! The size cue: the pill's measured size against each product's formulary
//! size, applied to the model's probabilities before the verdict.
//!
//! The model sees a crop cut relative to the pill, so every pill fills its
//! input alike and size is invisible to it; look-alikes told apart by size
//! alone (sildenafil 25/50/100 mg, the blank backs of pantoprazole 20/40 mg)
//! would stay UNCERTAIN. The localiser measures the pill in frame pixels; the
//! camera's scale (px/mm) turns that into millimetres, and each class's
//! formulary size is compared with it.
//!
//! The cue only decides between look-alikes: among the model's best class
//! and the members of its look-alike group the model finds plausible
//! (within [`PLAUSIBLE`] of its best), their total probability is
//! redistributed by fit; every other class is left alone. So size never
//! makes the model surer of a group than it was, and an unknown product the
//! model spreads over several groups stays UNCERTAIN. It is left out when
//! the measurement is not to be trusted:
//! * the pill barely differs from the tray ([`MIN_CONTRAST`]): its shaded
//!   rim merges with the tray and it measures small;
//! * the size fits none of the classes the model finds plausible (within
//!   [`PLAUSIBLE`] of its best): a localiser that found half a two-tone
//!   capsule must not turn a confident answer into another product.
//!
//! **Refusals** ([`SizeCue::apply`]). The counter asks for a new picture
//! (`BAD_IMAGE`) rather than naming a product when
//! * the answer turns on size — the model finds look-alikes of different
//!   sizes plausible ([`SizeCue::needs_size`]) — but the pill barely differs
//!   from the tray, so it cannot be measured; or
//! * the trusted measurement fits even the best class after weighing worse
//!   than [`CONTRADICTS`] (about 3 σ in one dimension): most often a
//!   two-tone capsule with one half the colour of the tray, so only the
//!   other half is found and the model sees half a capsule; else a product
//!   the model does not know.
//!
//! Tolerance: σ = 7 % of the nominal size + 0.4 mm per dimension (pill
//! manufacturing tolerance, camera height, the renderer's ±8 % scale
//! jitter, the localiser's working resolution).

use crate::localise::PillBox;
use rxvision_models::bundle::Label;
use rxvision_models::formulary::{Formulary, Shape};

/// Below this pill-to-tray colour distance (0–441) the size is not used.
pub const MIN_CONTRAST: f32 = 80.0;
/// Classes within this factor of the model's best are plausible.
pub const PLAUSIBLE: f32 = 0.1;
/// If the size fits no plausible class at least this well, it is not used.
pub const MIN_FIT: f32 = 0.1;

/// A measured size that fits the model's best class worse than this
/// contradicts it (e.g. 3.04 σ in one dimension, or 2.15 σ in both).
pub const CONTRADICTS: f32 = 0.01;

/// Look-alikes whose formulary sizes fit each other worse than this are told
/// apart by size (sildenafil 25/50 mg, 8.9 × 6.2 and 11.2 × 7.8 mm: 0.01–0.04;
/// cephalexin 250 mg / fluoxetine 20 mg, 18.0 and 15.9 mm: 0.29–0.35;
/// trazodone 50/100 mg, 9.5 and 10.3 mm: 0.57–0.60, not).
pub const SIZES_DIFFER: f32 = 0.5;

/// Why the size cue refuses a pill (the counter answers `BAD_IMAGE`).
#[derive(Debug, Clone, PartialEq)]
pub enum SizeRefusal {
    /// The answer turns on size, but the pill barely differs from the tray
    /// (mean colour distance below [`MIN_CONTRAST`]), so it cannot be measured.
    Unmeasurable {
        /// The model's best class.
        class: usize,
        /// The pill's mean colour distance from the tray.
        contrast: f32,
    },
    /// The measured size contradicts the best class.
    Contradicts(Contradiction),
}

impl SizeRefusal {
    /// A stable code for telemetry: `size_unmeasurable` or `size_contradicts`.
    pub fn code(&self) -> &'static str {
        match self {
            SizeRefusal::Unmeasurable { .. } => "size_unmeasurable",
            SizeRefusal::Contradicts(_) => "size_contradicts",
        }
    }

    /// What the counter tells the pharmacist (`labels`: the bundle's classes).
    pub fn reason(&self, labels: &[Label]) -> String {
        let name = |class: usize| labels.get(class).map_or_else(String::new, |l| format!("{} {}", l.name, l.strength));
        match self {
            SizeRefusal::Unmeasurable { class, .. } => format!(
                "the pill barely differs from the tray, so its size cannot be measured, and {} has look-alikes \
                 told apart by size: use a tray of another colour, or verify by hand",
                name(*class)
            ),
            SizeRefusal::Contradicts(c) => format!(
                "the pill measures {:.1} × {:.1} mm, unlike {} ({:.1} × {:.1} mm) that it looks most like: part of \
                 it may be the colour of the tray (use a tray of another colour), or it is another product; take a \
                 new picture or verify by hand",
                c.measured_mm[0],
                c.measured_mm[1],
                name(c.class),
                c.nominal_mm[0],
                c.nominal_mm[1]
            ),
        }
    }
}

/// The measured size and the model's best class disagree.
#[derive(Debug, Clone, PartialEq)]
pub struct Contradiction {
    /// The class (model output index).
    pub class: usize,
    /// The pill as measured, mm (longer first).
    pub measured_mm: [f32; 2],
    /// The class's formulary size, mm.
    pub nominal_mm: [f32; 2],
}

/// A product's size as the formulary states it.
#[derive(Debug, Clone, PartialEq)]
pub struct Nominal {
    /// Length, mm.
    pub length_mm: f32,
    /// Width, mm.
    pub width_mm: f32,
    /// Measured along its principal axes (a diamond's diagonals) rather than
    /// by its bounding rectangle.
    pub by_axes: bool,
    /// Its look-alike group: size decides only between members of one.
    pub group: Option<String>,
}

/// The size cue of one appliance: its camera scale and the size of each
/// class of the model.
#[derive(Debug, Clone)]
pub struct SizeCue {
    px_per_mm: f32,
    nominal: Vec<Option<Nominal>>,
}

impl SizeCue {
    /// A cue for a camera at `px_per_mm` over classes of the given sizes
    /// (in the model's output order; `None`: size unknown, weight 1).
    pub fn new(px_per_mm: f32, nominal: Vec<Option<Nominal>>) -> SizeCue {
        SizeCue { px_per_mm, nominal }
    }

    /// The sizes of a bundle's classes from the formulary.
    pub fn from_formulary(px_per_mm: f32, labels: &[Label], formulary: &Formulary) -> SizeCue {
        let nominal = labels
            .iter()
            .map(|label| {
                formulary.get(&label.ndc).map(|p| Nominal {
                    length_mm: p.length_mm,
                    width_mm: p.width_mm,
                    by_axes: p.shape == Shape::Diamond,
                    group: p.lookalike_group.clone(),
                })
            })
            .collect();
        SizeCue::new(px_per_mm, nominal)
    }

    /// How many classes have a known size.
    pub fn known(&self) -> usize {
        self.nominal.iter().flatten().count()
    }

    /// Whether `pill` is measured well enough to be weighed against `probs`.
    fn measurable(&self, probs: &[f32], pill: &PillBox) -> bool {
        !pill.partial && pill.contrast >= MIN_CONTRAST && probs.len() == self.nominal.len()
    }

    /// The pill's size in mm as `nominal` is measured (longer first).
    fn measured_mm(&self, pill: &PillBox, nominal: &Nominal) -> [f32; 2] {
        let px = if nominal.by_axes { pill.axes_px } else { pill.rectangle_px };
        px.map(|v| v / self.px_per_mm)
    }

    /// The model's best class and the members of its look-alike group it
    /// finds plausible (within [`PLAUSIBLE`] of its best); empty when the
    /// best class has no group.
    fn plausible_lookalikes(&self, probs: &[f32]) -> Vec<usize> {
        let Some(top) = best_class(probs) else { return Vec::new() };
        let Some(group) = self.nominal[top].as_ref().and_then(|n| n.group.as_ref()) else { return Vec::new() };
        (0..probs.len())
            .filter(|&i| {
                probs[i] >= PLAUSIBLE * probs[top]
                    && self.nominal[i].as_ref().is_some_and(|n| n.group.as_ref() == Some(group))
            })
            .collect()
    }

    /// Whether the answer turns on size: the model finds look-alikes of
    /// different formulary sizes plausible (each fits another's size below
    /// [`SIZES_DIFFER`]).
    pub fn needs_size(&self, probs: &[f32]) -> bool {
        if probs.len() != self.nominal.len() {
            return false;
        }
        let sizes: Vec<[f32; 2]> = self
            .plausible_lookalikes(probs)
            .iter()
            .filter_map(|&i| self.nominal[i].as_ref().map(|n| [n.length_mm, n.width_mm]))
            .collect();
        sizes.iter().any(|a| sizes.iter().any(|b| fit(*a, *b) < SIZES_DIFFER))
    }

    /// The whole cue for one pill: weighs `probs` by its size (`Ok(true)`)
    /// or leaves them (`Ok(false)`), or refuses the pill when the answer turns
    /// on a size that cannot be measured against this tray, or when the
    /// measured size contradicts the best class.
    pub fn apply(&self, probs: &mut [f32], pill: &PillBox) -> Result<bool, SizeRefusal> {
        if !self.measurable(probs, pill) {
            let top = best_class(probs);
            return match top.filter(|_| !pill.partial && self.needs_size(probs)) {
                Some(class) => Err(SizeRefusal::Unmeasurable { class, contrast: pill.contrast }),
                None => Ok(false),
            };
        }
        let weighed = self.weigh(probs, pill);
        match self.contradiction(probs, pill) {
            Some(c) => Err(SizeRefusal::Contradicts(c)),
            None => Ok(weighed),
        }
    }

    /// Weighs `probs` by the size of `pill`; returns whether the cue was applied.
    pub fn weigh(&self, probs: &mut [f32], pill: &PillBox) -> bool {
        if !self.measurable(probs, pill) {
            return false;
        }
        let fits: Vec<f32> = self
            .nominal
            .iter()
            .map(|n| match n {
                None => 1.0,
                Some(n) => fit(self.measured_mm(pill, n), [n.length_mm, n.width_mm]),
            })
            .collect();
        let plausible = self.plausible_lookalikes(probs);
        let best_fit = plausible.iter().map(|&i| fits[i]).fold(0.0f32, f32::max);
        if plausible.len() < 2 || best_fit < MIN_FIT {
            return false;
        }
        // Redistribute the plausible classes' mass by fit; the rest is untouched.
        let mass: f32 = plausible.iter().map(|&i| probs[i]).sum();
        let weighted: f32 = plausible.iter().map(|&i| probs[i] * fits[i]).sum();
        for &i in &plausible {
            probs[i] = mass * probs[i] * fits[i] / weighted;
        }
        true
    }

    /// Whether the measured size of `pill` contradicts the best class of
    /// `probs` (call after [`SizeCue::weigh`]): the pill is measured with
    /// trust, the class has a formulary size, and the size fits it worse than
    /// [`CONTRADICTS`].
    pub fn contradiction(&self, probs: &[f32], pill: &PillBox) -> Option<Contradiction> {
        if !self.measurable(probs, pill) {
            return None;
        }
        let class = best_class(probs)?;
        let nominal = self.nominal[class].as_ref()?;
        let measured_mm = self.measured_mm(pill, nominal);
        let nominal_mm = [nominal.length_mm, nominal.width_mm];
        (fit(measured_mm, nominal_mm) < CONTRADICTS).then_some(Contradiction { class, measured_mm, nominal_mm })
    }
}

/// The class the model finds most probable (`None` for no classes).
fn best_class(probs: &[f32]) -> Option<usize> {
    (0..probs.len()).max_by(|&a, &b| probs[a].total_cmp(&probs[b]))
}

/// How well a measured size (mm, longer first) fits a nominal one: 1 for a
/// perfect fit, falling as a Gaussian in each dimension.
pub fn fit(measured: [f32; 2], nominal: [f32; 2]) -> f32 {
    let z = |m: f32, n: f32| (m - n) / (0.07 * n + 0.4);
    let (l, w) = (z(measured[0], nominal[0]), z(measured[1], nominal[1]));
    (-0.5 * (l * l + w * w)).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pill(mm: [f32; 2], contrast: f32) -> PillBox {
        let px = mm.map(|v| v * 9.0);
        PillBox {
            x: 0,
            y: 0,
            w: 100,
            h: 100,
            partial: false,
            rectangle_px: px,
            axes_px: px,
            contrast,
            centre_px: [50.0; 2],
            angle_deg: 0.0,
        }
    }

    fn oval(length_mm: f32, width_mm: f32) -> Option<Nominal> {
        Some(Nominal { length_mm, width_mm, by_axes: false, group: Some("LA".into()) })
    }

    fn alone(length_mm: f32, width_mm: f32) -> Option<Nominal> {
        Some(Nominal { length_mm, width_mm, by_axes: false, group: None })
    }

    /// Pantoprazole 20 mg (9.3 x 5.2) and 40 mg (11.8 x 6.1), look-alikes, and a shield (10.4 x 8.9) of its own.
    fn cue() -> SizeCue {
        SizeCue::new(9.0, vec![oval(9.3, 5.2), oval(11.8, 6.1), alone(10.4, 8.9)])
    }

    #[test]
    fn fit_is_one_at_the_nominal_size_and_falls_off() {
        assert_eq!(fit([11.8, 6.1], [11.8, 6.1]), 1.0);
        assert!(fit([11.0, 5.9], [11.8, 6.1]) > 0.5, "within tolerance");
        let other = fit([9.3, 5.2], [11.8, 6.1]);
        assert!(other < 0.1, "the 20 mg size against the 40 mg: {other}");
    }

    #[test]
    fn a_look_alike_the_model_cannot_tell_apart_is_decided_by_size() {
        let mut probs = [0.48, 0.50, 0.02];
        assert!(cue().weigh(&mut probs, &pill([11.6, 6.0], 200.0)));
        assert!(probs[1] > 0.85, "{probs:?}");
        assert!((probs.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert_eq!(probs[2], 0.02, "an implausible class is left alone");
        let mut probs = [0.50, 0.48, 0.02];
        assert!(cue().weigh(&mut probs, &pill([9.5, 5.3], 200.0)));
        assert!(probs[0] > 0.85, "{probs:?}");
    }

    #[test]
    fn size_decides_only_between_look_alikes() {
        // A pill the model spreads over a look-alike pair and an unrelated product:
        // the pair keeps its share (0.75), however well the size fits one of them.
        let mut probs = [0.30, 0.45, 0.25];
        assert!(cue().weigh(&mut probs, &pill([9.3, 5.2], 200.0)));
        assert_eq!(probs[2], 0.25, "{probs:?}");
        assert!((probs[0] + probs[1] - 0.75).abs() < 1e-5 && probs[0] > 0.6, "{probs:?}");
        // A best class without look-alikes: nothing for size to decide.
        let mut probs = [0.05, 0.05, 0.90];
        assert!(!cue().weigh(&mut probs, &pill([10.4, 8.9], 200.0)));
        assert_eq!(probs, [0.05, 0.05, 0.90]);
    }

    #[test]
    fn a_size_that_fits_no_plausible_class_is_not_used() {
        // Half of a capsule found: the size fits none of the plausible look-alikes.
        let mut probs = [0.40, 0.58, 0.02];
        let before = probs;
        assert!(!cue().weigh(&mut probs, &pill([5.5, 3.0], 200.0)));
        assert_eq!(probs, before);
    }

    #[test]
    fn a_size_far_from_the_best_class_contradicts_it() {
        // Half of the 40 mg capsule-shaped oval found (the other half the tray's colour).
        let half = pill([5.9, 6.0], 200.0);
        let mut probs = [0.10, 0.88, 0.02];
        assert!(!cue().weigh(&mut probs, &half), "the size fits no plausible class: not weighed");
        let c = cue().contradiction(&probs, &half).expect("5.9 mm long is no 11.8 mm pill");
        assert_eq!(c.class, 1);
        assert_eq!(c.nominal_mm, [11.8, 6.1]);
        assert!((c.measured_mm[0] - 5.9).abs() < 1e-4 && (c.measured_mm[1] - 6.0).abs() < 1e-4, "{c:?}");
        // Within the tolerance (the renderer's ±8 % scale, the localiser's error): no contradiction.
        for mm in [[11.8, 6.1], [10.6, 5.6], [13.0, 6.6]] {
            assert_eq!(cue().contradiction(&probs, &pill(mm, 200.0)), None, "{mm:?}");
        }
        // After weighing, the class the size moved the answer to is the one checked.
        let mut probs = [0.48, 0.50, 0.02];
        let small = pill([9.4, 5.2], 200.0);
        assert!(cue().weigh(&mut probs, &small));
        assert_eq!(cue().contradiction(&probs, &small), None);
        // A class without a formulary size, or a measurement not to be trusted, is never contradicted.
        let unknown = SizeCue::new(9.0, vec![None, oval(11.8, 6.1)]);
        assert_eq!(unknown.contradiction(&[0.9, 0.1], &half), None);
        assert_eq!(cue().contradiction(&[0.1, 0.88, 0.02], &pill([5.9, 6.0], MIN_CONTRAST - 1.0)), None);
        let mut partial = half;
        partial.partial = true;
        assert_eq!(cue().contradiction(&[0.1, 0.88, 0.02], &partial), None);
    }

    #[test]
    fn a_pill_like_its_tray_is_refused_only_when_the_answer_turns_on_size() {
        let dim = pill([11.8, 6.1], MIN_CONTRAST - 1.0);
        // Torn between the 20 and the 40 mg (sizes that differ), on a tray it barely differs from.
        let mut probs = [0.48, 0.50, 0.02];
        assert!(cue().needs_size(&probs));
        let refusal = cue().apply(&mut probs, &dim).unwrap_err();
        assert_eq!(refusal, SizeRefusal::Unmeasurable { class: 1, contrast: MIN_CONTRAST - 1.0 });
        assert_eq!(probs, [0.48, 0.50, 0.02], "nothing weighed");
        let labels: Vec<Label> = ["20 mg", "40 mg", "1 mg"]
            .iter()
            .enumerate()
            .map(|(index, strength)| Label {
                index,
                ndc: format!("0000{index}"),
                name: "Pantoprazole".into(),
                strength: strength.to_string(),
                attributes: Default::default(),
            })
            .collect();
        let reason = refusal.reason(&labels);
        assert!(reason.contains("Pantoprazole 40 mg") && reason.contains("tray of another colour"), "{reason}");
        // Sure of one class: the model answers, unweighed.
        let mut probs = [0.02, 0.96, 0.02];
        assert!(!cue().needs_size(&probs));
        assert_eq!(cue().apply(&mut probs, &dim), Ok(false));
        // Look-alikes of one size: size could not decide anyway.
        let same = SizeCue::new(9.0, vec![oval(15.9, 6.6), oval(15.9, 6.6)]);
        assert!(!same.needs_size(&[0.5, 0.5]));
        assert_eq!(same.apply(&mut [0.5, 0.5], &dim), Ok(false));
        // A partial pill is never refused for its size.
        let mut partial = dim;
        partial.partial = true;
        assert_eq!(cue().apply(&mut [0.48, 0.50, 0.02], &partial), Ok(false));
        // Measured with trust: weighed, or refused when the size contradicts the answer.
        let mut probs = [0.48, 0.50, 0.02];
        assert_eq!(cue().apply(&mut probs, &pill([9.4, 5.2], 200.0)), Ok(true));
        assert!(probs[0] > 0.85, "{probs:?}");
        let refusal = cue().apply(&mut [0.10, 0.88, 0.02], &pill([5.9, 6.0], 200.0)).unwrap_err();
        let reason = refusal.reason(&labels);
        assert!(reason.contains("5.9 × 6.0 mm") && reason.contains("Pantoprazole 40 mg (11.8 × 6.1 mm)"), "{reason}");
    }

    #[test]
    fn a_low_contrast_or_partial_pill_is_not_measured() {
        let mut probs = [0.48, 0.50, 0.02];
        assert!(!cue().weigh(&mut probs, &pill([9.3, 5.2], MIN_CONTRAST - 1.0)));
        let mut partial = pill([9.3, 5.2], 200.0);
        partial.partial = true;
        assert!(!cue().weigh(&mut probs, &partial));
        assert_eq!(probs, [0.48, 0.50, 0.02]);
    }

    #[test]
    fn diamonds_are_measured_along_their_diagonals() {
        let diamond =
            |length_mm, width_mm| Some(Nominal { length_mm, width_mm, by_axes: true, group: Some("LA08".into()) });
        let cue = SizeCue::new(9.0, vec![diamond(8.9, 6.2), diamond(11.2, 7.8)]);
        // A 50 mg diamond: diagonals 11.2 x 7.8, bounding rectangle (side-aligned) smaller.
        let mut p = pill([9.0, 6.5], 200.0);
        p.axes_px = [11.1 * 9.0, 7.7 * 9.0];
        let mut probs = [0.5, 0.5];
        assert!(cue.weigh(&mut probs, &p));
        assert!(probs[1] > 0.85, "{probs:?}");
    }
}
