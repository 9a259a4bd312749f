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
//! Tolerance: σ = 7 % of the nominal size + 0.4 mm per dimension (pill
//! manufacturing tolerance, camera height, the renderer's ±8 % scale
//! jitter, the localiser's working resolution).

use rxvision_models::bundle::Label;
use rxvision_models::counter::localise::PillBox;
use rxvision_models::synth::formulary::Formulary;
use rxvision_models::synth::shape::Shape;

/// Below this pill-to-tray colour distance (0–441) the size is not used.
pub const MIN_CONTRAST: f32 = 80.0;
/// Classes within this factor of the model's best are plausible.
pub const PLAUSIBLE: f32 = 0.1;
/// If the size fits no plausible class at least this well, it is not used.
pub const MIN_FIT: f32 = 0.1;

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

    /// Weighs `probs` by the size of `pill`; returns whether the cue was applied.
    pub fn weigh(&self, probs: &mut [f32], pill: &PillBox) -> bool {
        if pill.partial || pill.contrast < MIN_CONTRAST || probs.len() != self.nominal.len() {
            return false;
        }
        let fits: Vec<f32> = self
            .nominal
            .iter()
            .map(|n| match n {
                None => 1.0,
                Some(n) => {
                    let px = if n.by_axes { pill.axes_px } else { pill.rectangle_px };
                    fit(px.map(|v| v / self.px_per_mm), [n.length_mm, n.width_mm])
                }
            })
            .collect();
        // The model's best class and its look-alikes it finds plausible.
        let Some(top) = (0..probs.len()).max_by(|&a, &b| probs[a].total_cmp(&probs[b])) else { return false };
        let Some(group) = self.nominal[top].as_ref().and_then(|n| n.group.as_ref()) else { return false };
        let plausible: Vec<usize> = (0..probs.len())
            .filter(|&i| {
                probs[i] >= PLAUSIBLE * probs[top]
                    && self.nominal[i].as_ref().is_some_and(|n| n.group.as_ref() == Some(group))
            })
            .collect();
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
