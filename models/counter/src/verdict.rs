//! From probabilities to a verdict the pharmacist can act on.
//!
//! Pure functions, no I/O. A pill's verdict:
//!
//! | condition (in order) | verdict |
//! |---|---|
//! | top-1 probability below the threshold (`min_confidence`; when top-1 is the expected product, that product's own MATCH threshold if the bundle calibrated one), or top-1 − top-2 below `min_margin` | `UNCERTAIN` (low confidence) |
//! | no expected NDC given | `IDENTIFIED` (identification mode) |
//! | the expected NDC is not one of the model's classes | `UNCERTAIN` (cannot verify a product the model does not know) |
//! | top-1 is the expected NDC | `MATCH` |
//! | otherwise | `MISMATCH` |
//!
//! Several pills: any `MISMATCH` makes the whole scan a `MISMATCH`, whatever
//! the other pills say (a wrong pill in the tray is the one thing the
//! pharmacist must not miss); else any `BAD_IMAGE` pill makes it `BAD_IMAGE`;
//! else any `UNCERTAIN` makes it `UNCERTAIN`; else `IDENTIFIED` if any pill
//! was identified, else `MATCH`. No pill at all is `NO_PILL`; an unreadable
//! image is `BAD_IMAGE`.

use rxvision_models::bundle::{Label, Thresholds};
use serde::Serialize;

/// What the counter shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Verdict {
    /// The pill is the expected product, with confidence.
    Match,
    /// The pill is confidently a different product: stop and check.
    Mismatch,
    /// The model cannot tell with enough confidence, or cannot know this product.
    Uncertain,
    /// No expected product was given; the pill was identified with confidence.
    Identified,
    /// No pill in view.
    NoPill,
    /// The image is unusable (corrupt, too dark, over-exposed, blurred), or
    /// the pill in it measures unlike the product it looks like (part of it
    /// the tray's colour, say): take a new picture.
    BadImage,
}

impl Verdict {
    /// The verdict's wire name (as serialised: `MATCH`, `NO_PILL` …).
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Match => "MATCH",
            Verdict::Mismatch => "MISMATCH",
            Verdict::Uncertain => "UNCERTAIN",
            Verdict::Identified => "IDENTIFIED",
            Verdict::NoPill => "NO_PILL",
            Verdict::BadImage => "BAD_IMAGE",
        }
    }
}

/// Why a pill got its verdict, in words for the counter page and the audit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PillVerdict {
    /// The verdict.
    pub verdict: Verdict,
    /// A sentence a pharmacist understands.
    pub reason: String,
}

/// Decides one pill's verdict from its probabilities (in label order).
pub fn judge_pill(probs: &[f32], labels: &[Label], thresholds: &Thresholds, expected_ndc: Option<&str>) -> PillVerdict {
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let (top1, p1) = order.first().map_or((0, 0.0), |&i| (i, probs[i]));
    let p2 = order.get(1).map_or(0.0, |&i| probs[i]);
    // A MATCH for the expected product needs that product's own threshold.
    let min_confidence = match (expected_ndc, labels.get(top1)) {
        (Some(expected), Some(label)) if label.ndc == expected => thresholds.to_match(expected),
        _ => thresholds.min_confidence,
    };
    let name = |i: usize| {
        labels.get(i).map_or("an unknown product".to_string(), |l| match l.strength.trim() {
            "" | "n/a" => l.name.clone(),
            strength => format!("{} {strength}", l.name),
        })
    };
    if p1 < min_confidence || p1 - p2 < thresholds.min_margin {
        return PillVerdict {
            verdict: Verdict::Uncertain,
            reason: format!(
                "low confidence: best guess {} at {:.0}% (needs {:.0}%, and {:.0} points ahead of the next); \
                 turn the pill over (a blank face can belong to several products) or verify by hand",
                name(top1),
                p1 * 100.0,
                min_confidence * 100.0,
                thresholds.min_margin * 100.0
            ),
        };
    }
    let Some(expected) = expected_ndc else {
        return PillVerdict { verdict: Verdict::Identified, reason: format!("identified as {}", name(top1)) };
    };
    if !labels.iter().any(|l| l.ndc == expected) {
        return PillVerdict {
            verdict: Verdict::Uncertain,
            reason: format!("the expected product {expected} is not in this model's formulary: verify by hand"),
        };
    }
    if labels.get(top1).is_some_and(|l| l.ndc == expected) {
        PillVerdict { verdict: Verdict::Match, reason: format!("matches {}", name(top1)) }
    } else {
        PillVerdict {
            verdict: Verdict::Mismatch,
            reason: format!("looks like {}, not the expected {expected}", name(top1)),
        }
    }
}

/// The verdict of a whole scan from its pills' verdicts: `MISMATCH` wins
/// over everything, then `BAD_IMAGE`, `UNCERTAIN`, `IDENTIFIED`, `MATCH`.
pub fn overall(pills: &[Verdict]) -> Verdict {
    if pills.is_empty() {
        Verdict::NoPill
    } else if pills.contains(&Verdict::Mismatch) {
        Verdict::Mismatch
    } else if pills.contains(&Verdict::BadImage) {
        Verdict::BadImage
    } else if pills.contains(&Verdict::Uncertain) {
        Verdict::Uncertain
    } else if pills.contains(&Verdict::Identified) {
        Verdict::Identified
    } else {
        Verdict::Match
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn as_str_is_the_serialised_name() {
        use Verdict::*;
        for v in [Match, Mismatch, Uncertain, Identified, NoPill, BadImage] {
            assert_eq!(serde_json::to_value(v).unwrap(), v.as_str());
        }
    }

    fn labels() -> Vec<Label> {
        ["00093-0058-01", "00378-0018-01", "00591-0405-01"]
            .iter()
            .enumerate()
            .map(|(index, ndc)| Label {
                index,
                ndc: ndc.to_string(),
                name: format!("Product {index}"),
                strength: "10 mg".into(),
                attributes: Default::default(),
            })
            .collect()
    }

    const T: Thresholds = Thresholds { min_confidence: 0.6, min_margin: 0.2, match_confidence: BTreeMap::new() };

    #[test]
    fn confident_and_expected_is_a_match() {
        let v = judge_pill(&[0.9, 0.05, 0.05], &labels(), &T, Some("00093-0058-01"));
        assert_eq!(v.verdict, Verdict::Match);
        assert!(v.reason.contains("Product 0"));
    }

    #[test]
    fn confident_and_different_is_a_mismatch_naming_both() {
        let v = judge_pill(&[0.05, 0.9, 0.05], &labels(), &T, Some("00093-0058-01"));
        assert_eq!(v.verdict, Verdict::Mismatch);
        assert!(v.reason.contains("Product 1") && v.reason.contains("00093-0058-01"), "{}", v.reason);
    }

    #[test]
    fn low_confidence_or_a_narrow_margin_is_uncertain_even_when_top1_is_expected() {
        assert_eq!(judge_pill(&[0.55, 0.25, 0.2], &labels(), &T, Some("00093-0058-01")).verdict, Verdict::Uncertain);
        let lenient = Thresholds::uniform(0.5, 0.2);
        assert_eq!(
            judge_pill(&[0.55, 0.4, 0.05], &labels(), &lenient, Some("00093-0058-01")).verdict,
            Verdict::Uncertain
        );
        // Exactly at the confidence threshold passes.
        assert_eq!(judge_pill(&[0.6, 0.25, 0.15], &labels(), &T, Some("00093-0058-01")).verdict, Verdict::Match);
    }

    #[test]
    fn a_product_s_own_match_threshold_decides_its_match_and_nothing_else() {
        let mut t = Thresholds::uniform(0.6, 0.0);
        t.match_confidence.insert("00093-0058-01".into(), 0.95);
        t.match_confidence.insert("00378-0018-01".into(), 0.4);
        // Product 0 expected and on top at 0.9: below its own 0.95, so no MATCH.
        let v = judge_pill(&[0.9, 0.05, 0.05], &labels(), &t, Some("00093-0058-01"));
        assert_eq!(v.verdict, Verdict::Uncertain);
        assert!(v.reason.contains("needs 95%"), "{}", v.reason);
        assert_eq!(judge_pill(&[0.96, 0.02, 0.02], &labels(), &t, Some("00093-0058-01")).verdict, Verdict::Match);
        // Product 1 expected and on top at 0.5: its own 0.4 is enough for MATCH ...
        assert_eq!(judge_pill(&[0.3, 0.5, 0.2], &labels(), &t, Some("00378-0018-01")).verdict, Verdict::Match);
        // ... but not for a MISMATCH against another expected product, nor for identification.
        assert_eq!(judge_pill(&[0.3, 0.5, 0.2], &labels(), &t, Some("00093-0058-01")).verdict, Verdict::Uncertain);
        assert_eq!(judge_pill(&[0.3, 0.5, 0.2], &labels(), &t, None).verdict, Verdict::Uncertain);
        // Product 0 on top at 0.9 against another expected product: min_confidence decides the MISMATCH.
        assert_eq!(judge_pill(&[0.9, 0.05, 0.05], &labels(), &t, Some("00378-0018-01")).verdict, Verdict::Mismatch);
    }

    #[test]
    fn an_expected_product_outside_the_formulary_cannot_be_verified() {
        let v = judge_pill(&[0.9, 0.05, 0.05], &labels(), &T, Some("12345-6789-01"));
        assert_eq!(v.verdict, Verdict::Uncertain);
        assert!(v.reason.contains("not in this model's formulary"));
    }

    #[test]
    fn without_an_expected_product_a_confident_pill_is_identified() {
        assert_eq!(judge_pill(&[0.1, 0.1, 0.8], &labels(), &T, None).verdict, Verdict::Identified);
        assert_eq!(judge_pill(&[0.4, 0.3, 0.3], &labels(), &T, None).verdict, Verdict::Uncertain);
    }

    #[test]
    fn one_mismatch_makes_the_scan_a_mismatch() {
        use Verdict::*;
        assert_eq!(overall(&[Match, Mismatch, Uncertain]), Mismatch);
        assert_eq!(overall(&[Match, Uncertain]), Uncertain);
        assert_eq!(overall(&[Match, Match]), Match);
        assert_eq!(overall(&[Identified, Identified]), Identified);
        assert_eq!(overall(&[]), NoPill);
        assert_eq!(overall(&[Match, BadImage]), BadImage);
    }

    #[test]
    fn a_mismatch_wins_over_every_other_verdict_in_any_order() {
        use Verdict::*;
        // A blurred or badly measured pill beside a wrong one must not hide it.
        assert_eq!(overall(&[BadImage, Mismatch]), Mismatch);
        assert_eq!(overall(&[Mismatch, BadImage]), Mismatch);
        assert_eq!(overall(&[Match, BadImage, Mismatch, Uncertain, Identified]), Mismatch);
        // Below it: BAD_IMAGE, then UNCERTAIN, IDENTIFIED, MATCH.
        assert_eq!(overall(&[Uncertain, BadImage, Match]), BadImage);
        assert_eq!(overall(&[Identified, Uncertain]), Uncertain);
        assert_eq!(overall(&[Match, Identified]), Identified);
        let ranked = [Mismatch, BadImage, Uncertain, Identified, Match];
        for (i, &winner) in ranked.iter().enumerate() {
            for &lower in &ranked[i..] {
                assert_eq!(overall(&[lower, winner]), winner, "{winner:?} over {lower:?}");
                assert_eq!(overall(&[winner, lower]), winner, "{winner:?} over {lower:?}");
            }
        }
    }
}
