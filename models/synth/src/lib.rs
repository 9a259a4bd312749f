//! Synthetic pill imaging: the renderer behind the `rxvision-synth` binary.
//!
//! No real pill-photo dataset can be downloaded here, so the model is trained
//! and tested on top-down counter-camera photos rendered from the formulary.
//! The formulary itself, the drift features and the `labels.csv` layout are
//! `rxvision-models`' (`formulary`, `features`, `labels`); the pill crops of
//! `dataset --pill-crops` are cut by `rxvision-counter`, exactly as the counter
//! cuts them.
//!
//! # Layout
//!
//! * [`shape`] — every pill outline as a signed distance function in mm.
//! * [`text`] — the bundled font, imprint line placement, glyph coverage.
//! * [`render`] — one pill as a height field (bevel, dome, capsule cylinder,
//!   score grooves, debossed or printed imprint), shaded with Lambert +
//!   Blinn–Phong, its drop shadow, compositing.
//! * [`scene`] — the tray, light, camera nuisances and composition of
//!   single-pill images and multi-pill trays.
//! * [`impostor`] — products that do not exist: formulary pills with one
//!   imprint character altered, for open-set tests and outlier exposure.
//! * [`dataset`] — writing `images/` + `labels.csv` and `trays/` +
//!   `trays.json`, on all cores, identically for any thread count.
//! * [`rng`] — SplitMix64 and per-image seeds.
//! * [`check_drawable`] and [`load_formulary`] — whether the renderer can
//!   draw every product of a formulary (a glyph in the bundled font for every
//!   imprint character); every program that renders from a formulary loads it
//!   with [`load_formulary`].
//!
//! # Determinism
//!
//! An image is a pure function of its product, face, seed and
//! [`scene::SceneOptions`]; per-image seeds come from the run's seed, the
//! product's NDC and the image's index ([`rng::image_seed`]). Nothing reads the
//! clock, the thread id or global state. The outputs are identical across
//! thread counts; across platforms they rest on IEEE `f32` arithmetic and the
//! standard library's `sin`/`exp`/`powf`, which Rust does not promise to be
//! bit-identical everywhere, so a dataset is reproducible on one platform and
//! toolchain, and visually the same elsewhere.
//!
//! # Example
//!
//! ```no_run
//! use rxvision_models::formulary::Face;
//! use rxvision_synth::scene::{render_sample, SceneOptions};
//!
//! let formulary = rxvision_synth::load_formulary("models/formulary/formulary.json".as_ref())?;
//! let product = &formulary.products[0];
//! let picture = render_sample(product, Face::Front, &[], 42, &SceneOptions::crop(224, 224));
//! std::fs::write("pill.jpg", picture.to_jpeg()?)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod dataset;
pub mod impostor;
pub mod render;
pub mod rng;
pub mod scene;
pub mod shape;
pub mod text;

use std::path::Path;

use rxvision_models::formulary::{Formulary, FormularyError};

/// Whether the renderer can draw every product of `formulary`: every imprint
/// character has a glyph in the bundled font. The problems, one line per
/// character missing, each naming the product by position and NDC.
pub fn check_drawable(formulary: &Formulary) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    for (i, p) in formulary.products.iter().enumerate() {
        for (face, text) in [("front", &p.imprint_front), ("back", &p.imprint_back)] {
            if let Some(c) = text.chars().find(|&c| c != ' ' && c != ';' && !text::has_glyph(c)) {
                problems.push(format!(
                    "product {i} ({}): imprint {face} {text:?}: the bundled font has no glyph for {c:?}",
                    p.ndc
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Loads and validates a formulary to render from: [`Formulary::load`], then
/// [`check_drawable`], whose problems are reported as
/// [`FormularyError::Invalid`].
pub fn load_formulary(path: &Path) -> Result<Formulary, FormularyError> {
    let formulary = Formulary::load(path)?;
    check_drawable(&formulary).map_err(|problems| FormularyError::Invalid { path: path.to_owned(), problems })?;
    Ok(formulary)
}
