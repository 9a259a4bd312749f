//! Synthetic pill imaging: the renderer behind `rxvision-synth`, and the drift
//! features the fleet watches.
//!
//! No real pill-photo dataset can be downloaded here, so the model is trained
//! and tested on top-down counter-camera photos rendered from the formulary.
//!
//! # Layout
//!
//! * [`formulary`] — loads and validates `models/formulary/formulary.json`.
//! * [`shape`] — every pill outline as a signed distance function in mm.
//! * [`text`] — the bundled font, imprint line placement, glyph coverage.
//! * [`render`] — one pill as a height field (bevel, dome, capsule cylinder,
//!   score grooves, debossed or printed imprint), shaded with Lambert +
//!   Blinn–Phong, its drop shadow, compositing.
//! * [`scene`] — the tray, light, camera nuisances and composition of
//!   single-pill images and multi-pill trays.
//! * [`features`] — the drift features (aspect ratio, mean RGB, brightness,
//!   blur, contrast, entropy), defined once.
//! * [`dataset`] — writing `images/` + `labels.csv` and `trays/` +
//!   `trays.json`, on all cores, identically for any thread count.
//! * [`labels`] — the `labels.csv` layout.
//! * [`rng`] — SplitMix64 and per-image seeds.
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
//! use rxvision_models::synth::{formulary::{Face, Formulary}, scene::{render_sample, SceneOptions}};
//!
//! let formulary = Formulary::load("models/formulary/formulary.json".as_ref())?;
//! let product = &formulary.products[0];
//! let picture = render_sample(product, Face::Front, &[], 42, &SceneOptions::crop(224, 224));
//! std::fs::write("pill.jpg", picture.to_jpeg()?)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod dataset;
pub mod features;
pub mod formulary;
pub mod labels;
pub mod render;
pub mod rng;
pub mod scene;
pub mod shape;
pub mod text;

use std::sync::atomic::{AtomicUsize, Ordering};

/// Maps `f` over `items` on `threads` threads; results in item order. Workers
/// take the next item from a shared counter, so uneven items balance out.
pub fn par_map<T: Sync, R: Send>(items: &[T], threads: usize, f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = threads.clamp(1, items.len().max(1));
    if threads == 1 {
        return items.iter().map(f).collect();
    }
    let next = AtomicUsize::new(0);
    let mut indexed: Vec<(usize, R)> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= items.len() {
                            break done;
                        }
                        done.push((i, f(&items[i])));
                    }
                })
            })
            .collect();
        workers.into_iter().flat_map(|w| w.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))).collect()
    });
    indexed.sort_by_key(|(i, _)| *i);
    indexed.into_iter().map(|(_, r)| r).collect()
}

/// Threads to use by default: every core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
