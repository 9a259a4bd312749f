//! A synthetic camera: rendered counter photos of formulary products, for
//! demos and tests without a real camera.

use std::path::Path;

use rxvision_models::formulary::{Face, Product};
use rxvision_synth::rng::image_seed;
use rxvision_synth::scene::{render_sample, SceneOptions};

use super::{CameraError, Frame, FrameSource};

/// Frames of the listed products in turn (front, back, front …), each a
/// fresh render with its own nuisances, deterministic from `seed`.
#[derive(Debug)]
pub struct SyntheticSource {
    products: Vec<Product>,
    seed: u64,
    width: usize,
    height: usize,
    next: u64,
}

impl SyntheticSource {
    /// Products `ndcs` (all of the formulary when empty) at `width`×`height`.
    pub fn new(
        formulary: &Path,
        ndcs: &[String],
        seed: u64,
        width: usize,
        height: usize,
    ) -> Result<SyntheticSource, String> {
        let formulary = rxvision_synth::load_formulary(formulary).map_err(|e| e.to_string())?;
        let products: Vec<Product> = if ndcs.is_empty() {
            formulary.products
        } else {
            ndcs.iter()
                .map(|ndc| {
                    formulary
                        .products
                        .iter()
                        .find(|p| &p.ndc == ndc)
                        .cloned()
                        .ok_or_else(|| format!("camera.products: {ndc} is not in the formulary"))
                })
                .collect::<Result<_, _>>()?
        };
        if products.is_empty() {
            return Err("the formulary has no products".into());
        }
        Ok(SyntheticSource { products, seed, width, height, next: 0 })
    }
}

impl FrameSource for SyntheticSource {
    fn describe(&self) -> String {
        format!("synthetic {} product(s) at {}x{}", self.products.len(), self.width, self.height)
    }

    fn next_frame(&mut self) -> Result<Frame, CameraError> {
        let index = self.next;
        self.next += 1;
        let product = &self.products[(index as usize / 2) % self.products.len()];
        let face = if index.is_multiple_of(2) { Face::Front } else { Face::Back };
        let seed = image_seed(self.seed, &product.ndc, index as u32);
        let picture = render_sample(product, face, &[], seed, &SceneOptions::camera(self.width, self.height));
        let encoded = picture.to_jpeg().map_err(|e| CameraError::Unavailable(format!("renderer: {e}")))?;
        let image = rxvision_models::preprocess::decode(&encoded).map_err(|error| CameraError::BadFrame {
            source_name: format!("synthetic {} #{index}", product.ndc),
            error,
            encoded: encoded.clone(),
        })?;
        Ok(Frame { image, encoded, origin: format!("synthetic {} {face:?} #{index}", product.ndc) })
    }
}

#[cfg(test)]
mod tests {
    use rxvision_models::formulary::Formulary;

    use super::*;

    fn formulary() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/formulary/formulary.json")
    }

    #[test]
    fn renders_the_listed_products_in_turn_and_deterministically() {
        let f = Formulary::load(&formulary()).unwrap();
        let ndcs: Vec<String> = f.products.iter().take(2).map(|p| p.ndc.clone()).collect();
        let mut a = SyntheticSource::new(&formulary(), &ndcs, 7, 320, 240).unwrap();
        let mut b = SyntheticSource::new(&formulary(), &ndcs, 7, 320, 240).unwrap();
        let frames: Vec<Frame> = (0..4).map(|_| a.next_frame().unwrap()).collect();
        assert!(frames[0].origin.contains(&ndcs[0]) && frames[1].origin.contains(&ndcs[0]));
        assert!(frames[2].origin.contains(&ndcs[1]));
        assert_eq!((frames[0].image.width, frames[0].image.height), (320, 240));
        assert_eq!(frames[0].encoded, b.next_frame().unwrap().encoded);
        assert_ne!(frames[0].encoded, frames[1].encoded);
    }

    #[test]
    fn an_unknown_product_or_formulary_is_a_clear_error() {
        let err = SyntheticSource::new(&formulary(), &["00000-0000-00".into()], 1, 320, 240).unwrap_err();
        assert!(err.contains("00000-0000-00"), "{err}");
        assert!(SyntheticSource::new(Path::new("/nonexistent.json"), &[], 1, 320, 240).is_err());
    }
}
