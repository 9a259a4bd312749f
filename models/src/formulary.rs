//! The formulary (`models/formulary/formulary.json`): loading and validation.
//!
//! The file's fields are described in `models/formulary/README.md`. Loading
//! parses the JSON (unknown keys are refused, so a misspelt field is an error,
//! not a silently missing attribute) and then checks every product, reporting
//! all problems at once, each naming the product by position and NDC.
//!
//! Whether the renderer can draw every product (a glyph in its font for every
//! imprint character) is the renderer's check, `rxvision_synth::check_drawable`,
//! made wherever a formulary is loaded for rendering.

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Default location, relative to the repository root (the working directory
/// of the project's scripts).
pub const DEFAULT_PATH: &str = "models/formulary/formulary.json";

/// Why a formulary could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FormularyError {
    /// The file could not be read.
    #[error("cannot read formulary {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not the formulary's JSON layout.
    #[error("formulary {path} is not valid: {reason}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// serde's message, with line and column.
        reason: String,
    },
    /// The JSON parsed but products break the rules.
    #[error("formulary {path} has {} problem(s):\n  {}", problems.len(), problems.join("\n  "))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// One line per problem, naming the product.
        problems: Vec<String>,
    },
}

/// Which side of the pill faces the camera.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Face {
    /// The face with `imprint.front`.
    Front,
    /// The face with `imprint.back` (for a capsule: rolled over).
    Back,
}

impl Face {
    /// `front` or `back`, as in `labels.csv`.
    pub fn as_str(self) -> &'static str {
        match self {
            Face::Front => "front",
            Face::Back => "back",
        }
    }
}

impl fmt::Display for Face {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the imprint is made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImprintStyle {
    /// Pressed into the tablet: drawn as a dip in the height field.
    Debossed,
    /// Ink on the surface, in this sRGB colour.
    Printed([u8; 3]),
}

/// Which faces carry the score.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreFace {
    /// Front only.
    Front,
    /// Back only.
    Back,
    /// Both faces.
    Both,
}

/// A pill's outline, by name (SPL shape words plus the formulary's `oblong`,
/// `teardrop` and `shield`, see `models/formulary/README.md`). The geometry
/// of each is the renderer's (`rxvision-synth`'s `shape` module).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Shape {
    /// Circle.
    Round,
    /// Ellipse.
    Oval,
    /// Caplet: a rounded rectangle with nearly semicircular ends.
    Oblong,
    /// Gelatin capsule: a stadium (cylinder with hemispherical ends).
    Capsule,
    /// Rhombus with its vertices on the axes.
    Diamond,
    /// Rectangle with rounded corners.
    Rectangle,
    /// Square with rounded corners.
    Square,
    /// Round end at `+u`, rounded point at `−u`.
    Teardrop,
    /// Isosceles triangle, base along `u` at the bottom, rounded corners.
    Triangle,
    /// Flat top at `+u`, sides curving in to a blunt point at `−u`.
    Shield,
    /// Regular pentagon, a vertex up (`−v`), stretched to the box.
    Pentagon,
    /// Regular hexagon, vertices on the `u` axis, stretched to the box.
    Hexagon,
}

impl Shape {
    /// The formulary's words for the shapes, in the order of [`Shape::ALL`].
    pub const WORDS: [&'static str; 12] = [
        "round",
        "oval",
        "oblong",
        "capsule",
        "diamond",
        "rectangle",
        "square",
        "teardrop",
        "triangle",
        "shield",
        "pentagon",
        "hexagon",
    ];

    /// Every shape.
    pub const ALL: [Shape; 12] = [
        Shape::Round,
        Shape::Oval,
        Shape::Oblong,
        Shape::Capsule,
        Shape::Diamond,
        Shape::Rectangle,
        Shape::Square,
        Shape::Teardrop,
        Shape::Triangle,
        Shape::Shield,
        Shape::Pentagon,
        Shape::Hexagon,
    ];

    /// The shape a formulary word names.
    pub fn from_word(word: &str) -> Option<Shape> {
        Shape::WORDS.iter().position(|w| *w == word).map(|i| Shape::ALL[i])
    }

    /// The formulary word.
    pub fn word(self) -> &'static str {
        Shape::WORDS[Shape::ALL.iter().position(|s| *s == self).expect("every shape has a word")]
    }
}

/// One product, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct Product {
    /// NDC in 5-4-2 form; the class key.
    pub ndc: String,
    /// Generic name.
    pub name: String,
    /// Strength per unit.
    pub strength: String,
    /// SPL dosage form (`tablet, film coated`, `capsule` …); decides the gloss.
    pub dosage_form: String,
    /// Outline.
    pub shape: Shape,
    /// SPL colour words (cap first for two-tone capsules).
    pub colors: Vec<String>,
    /// One sRGB colour per colour word.
    pub color_rgb: Vec<[u8; 3]>,
    /// Front imprint, `;` between lines, empty for a blank face.
    pub imprint_front: String,
    /// Back imprint, same form.
    pub imprint_back: String,
    /// Debossed or printed (with its ink).
    pub imprint_style: ImprintStyle,
    /// 1 unscored, 2 bisect, 3 trisect, 4 quadrisect.
    pub score: u8,
    /// Faces with the score; `None` when unscored.
    pub score_face: Option<ScoreFace>,
    /// Length (longest dimension) in mm.
    pub length_mm: f32,
    /// Width across the length in mm.
    pub width_mm: f32,
    /// Thickness in mm (sets the shadow length and the dome height).
    pub thickness_mm: f32,
    /// `LA01`… or `None`.
    pub lookalike_group: Option<String>,
}

impl Product {
    /// The imprint text of one face.
    pub fn imprint(&self, face: Face) -> &str {
        match face {
            Face::Front => &self.imprint_front,
            Face::Back => &self.imprint_back,
        }
    }

    /// Whether the score lines are on this face.
    pub fn scored_on(&self, face: Face) -> bool {
        matches!(
            (self.score_face, face),
            (Some(ScoreFace::Both), _) | (Some(ScoreFace::Front), Face::Front) | (Some(ScoreFace::Back), Face::Back)
        )
    }

    /// A gelatin capsule (rendered as a glossy cylinder with a seam).
    pub fn is_capsule(&self) -> bool {
        self.shape == Shape::Capsule
    }

    /// Whether `face` of this product looks exactly like a face of `other`
    /// from above: the same outline, colours, imprint text and style, and
    /// score lines. With `by_size` (the counter measures the pill, see
    /// `rxvision-counter`'s size cue) lengths and widths must also agree within the
    /// measurement's spread (7 % + 0.4 mm); without it only the proportions
    /// must (within 7 %), since a crop around the pill hides its size.
    ///
    /// Such a face cannot identify the product: the blank bisected back of
    /// prednisone 20 mg and of trazodone 50 mg, both white 9.5 mm rounds.
    pub fn face_twin(&self, face: Face, other: &Product, by_size: bool) -> bool {
        let near = |a: f32, b: f32| (a - b).abs() <= 0.07 * a.max(b) + 0.4;
        let sizes_agree = if by_size {
            near(self.length_mm, other.length_mm) && near(self.width_mm, other.width_mm)
        } else {
            let (a, b) = (self.width_mm / self.length_mm, other.width_mm / other.length_mm);
            (a - b).abs() <= 0.07 * a.max(b)
        };
        self.ndc != other.ndc
            && self.shape == other.shape
            && self.color_rgb == other.color_rgb
            && sizes_agree
            && [Face::Front, Face::Back].into_iter().any(|theirs| {
                let scored = self.scored_on(face);
                self.imprint(face) == other.imprint(theirs)
                    && (self.imprint(face).is_empty() || self.imprint_style == other.imprint_style)
                    && scored == other.scored_on(theirs)
                    && (!scored || self.score == other.score)
            })
    }
}

/// The products, in file order.
#[derive(Debug, Clone)]
pub struct Formulary {
    /// Validated products.
    pub products: Vec<Product>,
}

impl Formulary {
    /// Reads and validates a formulary file.
    pub fn load(path: &Path) -> Result<Formulary, FormularyError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| FormularyError::Read { path: path.to_owned(), source })?;
        Formulary::parse(&text, path)
    }

    /// Parses and validates formulary JSON; `path` only names it in errors.
    pub fn parse(json: &str, path: &Path) -> Result<Formulary, FormularyError> {
        let raw: RawFormulary = serde_json::from_str(json)
            .map_err(|e| FormularyError::Parse { path: path.to_owned(), reason: e.to_string() })?;
        let mut problems = Vec::new();
        if raw.schema_version != 1 {
            problems.push(format!("schema_version is {}, this renderer reads 1", raw.schema_version));
        }
        if raw.products.is_empty() {
            problems.push("no products".to_owned());
        }
        let mut seen = HashSet::new();
        let mut products = Vec::with_capacity(raw.products.len());
        for (i, p) in raw.products.into_iter().enumerate() {
            let tag = format!("product {i} ({})", p.ndc);
            if !seen.insert(p.ndc.clone()) {
                problems.push(format!("{tag}: duplicate ndc"));
            }
            match validate(p) {
                Ok(product) => products.push(product),
                Err(errs) => problems.extend(errs.into_iter().map(|e| format!("{tag}: {e}"))),
            }
        }
        if problems.is_empty() {
            Ok(Formulary { products })
        } else {
            Err(FormularyError::Invalid { path: path.to_owned(), problems })
        }
    }

    /// The product with this NDC.
    pub fn get(&self, ndc: &str) -> Option<&Product> {
        self.products.iter().find(|p| p.ndc == ndc)
    }
}

/// Whether `s` has the NDC 5-4-2 form (`12345-6789-01`).
pub fn is_ndc(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.len() == 3
        && [5, 4, 2].iter().zip(&parts).all(|(&n, part)| part.len() == n && part.bytes().all(|b| b.is_ascii_digit()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFormulary {
    schema_version: u32,
    #[allow(dead_code)]
    source_note: String,
    products: Vec<RawProduct>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImprint {
    front: String,
    back: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProduct {
    ndc: String,
    name: String,
    strength: String,
    dosage_form: String,
    shape: String,
    colors: Vec<String>,
    color_rgb: Vec<[u8; 3]>,
    imprint: RawImprint,
    imprint_style: String,
    imprint_color_rgb: Option<[u8; 3]>,
    score: u8,
    score_face: Option<String>,
    size_mm: [f32; 2],
    thickness_mm: f32,
    lookalike_group: Option<String>,
    #[allow(dead_code)]
    illustrative: bool,
}

fn validate(p: RawProduct) -> Result<Product, Vec<String>> {
    let mut errs = Vec::new();
    if !is_ndc(&p.ndc) {
        errs.push(format!("ndc {:?} is not in 5-4-2 form", p.ndc));
    }
    for (field, value) in [("name", &p.name), ("strength", &p.strength), ("dosage_form", &p.dosage_form)] {
        if value.trim().is_empty() {
            errs.push(format!("{field} is empty"));
        }
    }
    let shape = Shape::from_word(&p.shape);
    if shape.is_none() {
        errs.push(format!("shape {:?} is not one the renderer draws ({})", p.shape, Shape::WORDS.join(", ")));
    }
    let capsule = shape == Some(Shape::Capsule);
    if p.colors.is_empty() || p.colors.len() > 2 {
        errs.push(format!("{} colours (1, or 2 for a two-tone capsule)", p.colors.len()));
    } else if p.colors.len() == 2 && !capsule {
        errs.push("two colours are only for two-tone capsules".to_owned());
    }
    if p.color_rgb.len() != p.colors.len() {
        errs.push(format!("{} color_rgb entries for {} colours", p.color_rgb.len(), p.colors.len()));
    }
    let imprint_style = match (p.imprint_style.as_str(), p.imprint_color_rgb) {
        ("debossed", None) => Some(ImprintStyle::Debossed),
        ("printed", Some(ink)) => Some(ImprintStyle::Printed(ink)),
        ("debossed", Some(_)) => {
            errs.push("imprint_color_rgb must be null for a debossed imprint".to_owned());
            None
        }
        ("printed", None) => {
            errs.push("imprint_color_rgb is needed for a printed imprint".to_owned());
            None
        }
        (other, _) => {
            errs.push(format!("imprint_style {other:?} (debossed or printed)"));
            None
        }
    };
    let score_face = match p.score_face.as_deref() {
        None => None,
        Some("front") => Some(ScoreFace::Front),
        Some("back") => Some(ScoreFace::Back),
        Some("both") => Some(ScoreFace::Both),
        Some(other) => {
            errs.push(format!("score_face {other:?} (front, back, both or null)"));
            None
        }
    };
    if !(1..=4).contains(&p.score) {
        errs.push(format!("score {} (1 to 4)", p.score));
    } else if (p.score == 1) != p.score_face.is_none() {
        errs.push("score_face must be null exactly when score is 1".to_owned());
    } else if capsule && p.score != 1 {
        errs.push("capsules are not scored".to_owned());
    }
    let [length, width] = p.size_mm;
    if !(length.is_finite() && width.is_finite() && width > 0.0 && length >= width && length <= 40.0) {
        errs.push(format!("size_mm {:?} must be [length, width] with 0 < width <= length <= 40", p.size_mm));
    }
    if !(p.thickness_mm.is_finite() && p.thickness_mm > 0.0 && p.thickness_mm <= 20.0) {
        errs.push(format!("thickness_mm {} must be in (0, 20]", p.thickness_mm));
    }
    if let (Some(shape), Some(imprint_style), true) = (shape, imprint_style, errs.is_empty()) {
        Ok(Product {
            ndc: p.ndc,
            name: p.name,
            strength: p.strength,
            dosage_form: p.dosage_form,
            shape,
            colors: p.colors,
            color_rgb: p.color_rgb,
            imprint_front: p.imprint.front,
            imprint_back: p.imprint.back,
            imprint_style,
            score: p.score,
            score_face,
            length_mm: length,
            width_mm: width,
            thickness_mm: p.thickness_mm,
            lookalike_group: p.lookalike_group,
        })
    } else {
        Err(errs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn product_json(shape: &str, extra: &str) -> String {
        format!(
            r#"{{"schema_version": 1, "source_note": "t", "products": [{{
              "ndc": "12345-6789-01", "name": "X", "strength": "1 mg", "dosage_form": "tablet",
              "shape": "{shape}", "colors": ["white"], "color_rgb": [[250, 250, 250]],
              "imprint": {{"front": "A", "back": ""}}, "imprint_style": "debossed",
              "imprint_color_rgb": null, "score": 1, "score_face": null, "size_mm": [8, 8],
              "thickness_mm": 3, "lookalike_group": null, "illustrative": true{extra}}}]}}"#
        )
    }

    #[test]
    fn the_committed_formulary_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("formulary/formulary.json");
        let f = Formulary::load(&path).unwrap();
        assert!(f.products.len() >= 60);
    }

    #[test]
    fn a_minimal_product_loads() {
        let f = Formulary::parse(&product_json("round", ""), Path::new("t.json")).unwrap();
        assert_eq!(f.products[0].shape, Shape::Round);
    }

    #[test]
    fn problems_name_the_product_and_field() {
        let err = Formulary::parse(&product_json("octagon", ""), Path::new("t.json")).unwrap_err().to_string();
        assert!(err.contains("product 0 (12345-6789-01)") && err.contains("shape \"octagon\""), "{err}");
        let err = Formulary::parse(&product_json("round", r#", "colour": 1"#), Path::new("t.json")).unwrap_err();
        assert!(err.to_string().contains("unknown field `colour`"), "{err}");
    }

    #[test]
    fn words_round_trip() {
        for w in Shape::WORDS {
            assert_eq!(Shape::from_word(w).unwrap().word(), w);
        }
        assert_eq!(Shape::from_word("octagon"), None);
    }

    #[test]
    fn ndc_form() {
        assert!(is_ndc("12345-6789-01"));
        assert!(!is_ndc("1234-56789-01"));
        assert!(!is_ndc("12345-6789-0a"));
        assert!(!is_ndc("12345678901"));
    }
}
