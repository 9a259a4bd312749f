//! Products that do not exist: formulary pills with one imprint character
//! changed.
//!
//! The counter must never MATCH a pill the model was not trained on, and the
//! hardest such pills are those that differ from a known one by one digit
//! (`M366` between `M365` and `M367`). The formulary holds only a few real
//! ones, so the renderer makes more without end: an *impostor* of a product
//! is that product (outline, colours, size, score, imprint style) with one
//! character of the imprint on the face in view changed to another of its
//! kind (digit for digit, capital for capital, small for small), drawn anew
//! for every image. Its face is never a face of a formulary product (checked
//! with [`Product::face_twin`], without the size), so no picture of it could
//! be a real product; only faces that carry an imprint are shown, since a
//! blank face has nothing to alter.
//!
//! Every impostor of one product shares one NDC, [`impostor_ndc`]: the
//! labeler code `99999` (no formulary product may use it) and the product's
//! own product and package codes. `labels.csv` names the product it imitates
//! in its `imitates` column.

use rxvision_models::formulary::{Face, Formulary, Product};

use crate::rng::Rng;
use crate::text;

/// The labeler code of impostor NDCs; a formulary that uses it cannot have impostors.
pub const IMPOSTOR_LABELER: &str = "99999";

/// The NDC every impostor of `source` is labelled with.
pub fn impostor_ndc(source: &Product) -> String {
    let codes = source.ndc.split_once('-').map_or("", |(_, rest)| rest);
    format!("{IMPOSTOR_LABELER}-{codes}")
}

/// The faces of `source` an impostor can show: those with an imprint.
pub fn alterable_faces(source: &Product) -> Vec<Face> {
    [Face::Front, Face::Back].into_iter().filter(|&f| source.imprint(f).chars().any(is_alterable)).collect()
}

fn is_alterable(c: char) -> bool {
    c.is_ascii_alphanumeric()
}

/// How many draws [`impostor`] makes before it gives up on a face.
const DRAWS: usize = 32;

/// An impostor of `source` showing `face`: `source` with one character of
/// `face`'s imprint changed, drawn from `seed`, such that the altered face is
/// not a face of any product of `formulary`. `None` when `face` has no
/// imprint or no draw gives a face unlike every product's (in practice never
/// for an imprint with a digit or letter).
pub fn impostor(source: &Product, face: Face, formulary: &Formulary, seed: u64) -> Option<Product> {
    let imprint: Vec<char> = source.imprint(face).chars().collect();
    let positions: Vec<usize> = (0..imprint.len()).filter(|&i| is_alterable(imprint[i])).collect();
    if positions.is_empty() {
        return None;
    }
    let mut rng = Rng::new(seed);
    for _ in 0..DRAWS {
        let at = positions[rng.below(positions.len())];
        let alphabet: &[u8] = match imprint[at] {
            '0'..='9' => b"0123456789",
            'A'..='Z' => b"ABCDEFGHIJKLMNOPQRSTUVWXYZ",
            _ => b"abcdefghijklmnopqrstuvwxyz",
        };
        let replacement = char::from(alphabet[rng.below(alphabet.len())]);
        if replacement == imprint[at] || !text::has_glyph(replacement) {
            continue;
        }
        let mut altered = imprint.clone();
        altered[at] = replacement;
        let mut fake = source.clone();
        fake.ndc = impostor_ndc(source);
        fake.name = format!("{} (altered imprint)", source.name);
        match face {
            Face::Front => fake.imprint_front = altered.into_iter().collect(),
            Face::Back => fake.imprint_back = altered.into_iter().collect(),
        }
        if !formulary.products.iter().any(|real| fake.face_twin(face, real, false)) {
            return Some(fake);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use rxvision_models::formulary::DEFAULT_PATH;

    fn formulary() -> Formulary {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("..").join(DEFAULT_PATH);
        crate::load_formulary(&path).expect("the shipped formulary loads")
    }

    #[test]
    fn an_impostor_differs_from_its_source_by_one_character_of_the_face_in_view() {
        let formulary = formulary();
        for source in &formulary.products {
            for face in alterable_faces(source) {
                for seed in 0..20 {
                    let fake = impostor(source, face, &formulary, seed).expect("every imprinted face can be altered");
                    let (was, is) = (source.imprint(face), fake.imprint(face));
                    let changed: Vec<(char, char)> = was.chars().zip(is.chars()).filter(|(a, b)| a != b).collect();
                    assert_eq!(was.chars().count(), is.chars().count());
                    assert_eq!(changed.len(), 1, "{was:?} → {is:?}");
                    let (a, b) = changed[0];
                    assert_eq!(
                        (a.is_ascii_digit(), a.is_ascii_uppercase()),
                        (b.is_ascii_digit(), b.is_ascii_uppercase()),
                        "{a} → {b}: a character of the same kind"
                    );
                    let other = match face {
                        Face::Front => Face::Back,
                        Face::Back => Face::Front,
                    };
                    assert_eq!(fake.imprint(other), source.imprint(other), "the hidden face is kept");
                    assert_eq!(
                        (fake.shape, &fake.color_rgb, fake.length_mm),
                        (source.shape, &source.color_rgb, source.length_mm)
                    );
                    assert_eq!(fake.ndc, impostor_ndc(source));
                    assert!(formulary.products.iter().all(|real| !fake.face_twin(face, real, false)));
                }
            }
        }
    }

    #[test]
    fn an_altered_face_that_would_be_a_real_product_is_drawn_again() {
        // M365 and M367 are real; an impostor of M365 must never read M367 (or M366).
        let formulary = formulary();
        let m365 = formulary.products.iter().find(|p| p.imprint_front == "M365").expect("M365 in the formulary");
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..400 {
            let fake = impostor(m365, Face::Front, &formulary, seed).unwrap();
            seen.insert(fake.imprint_front.clone());
        }
        assert!(!seen.contains("M367") && !seen.contains("M366") && !seen.contains("M365"), "{seen:?}");
        assert!(seen.contains("M368") && seen.contains("N365"), "digits and letters are both altered: {seen:?}");
    }

    #[test]
    fn impostor_ndcs_are_unique_per_source_and_outside_the_formulary() {
        let formulary = formulary();
        let ndcs: std::collections::BTreeSet<String> = formulary.products.iter().map(impostor_ndc).collect();
        assert_eq!(ndcs.len(), formulary.products.len());
        assert!(ndcs.iter().all(|n| rxvision_models::formulary::is_ndc(n) && formulary.get(n).is_none()));
    }
}
