//! Writing datasets and tray sets to disk, on all cores.
//!
//! Work is split over threads by an atomic job counter (small chunks of one
//! image); each image depends only on its own seed and results are put back
//! in job order, so the bytes written do not depend on the thread count or
//! on scheduling.
//!
//! Completion marker: the index file (`labels.csv`, `trays.json`) is removed
//! when a run starts and written last, to a temporary name renamed into
//! place, so a directory whose run failed or was killed has no index and
//! cannot be mistaken for a complete dataset. Images left by an earlier run
//! with other options are not removed; only those the index lists belong to
//! the dataset.

use std::path::{Path, PathBuf};

use serde::Serialize;

use rxvision_models::bundle::PillCrop;
use rxvision_models::formulary::{Face, Formulary, Product};
use rxvision_models::labels::{LabelRow, HEADER};
use rxvision_models::par::par_map;

use crate::impostor::{alterable_faces, impostor, impostor_ndc, IMPOSTOR_LABELER};
use crate::rng::{fnv1a64, image_seed, mix64, tray_seed};
use crate::scene::{render_sample, render_tray, SceneError, SceneOptions};

/// Why a dataset could not be written.
#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    /// `--exclude` names an NDC the formulary does not have.
    #[error("--exclude: {0} is not in the formulary")]
    UnknownNdc(String),
    /// Nothing is left to render.
    #[error("--exclude removes every product of the formulary")]
    NothingToRender,
    /// Impostors were asked for, but the formulary uses their labeler code.
    #[error("--impostors: the formulary has a product with the impostors' labeler code {labeler}: {0}", labeler = crate::impostor::IMPOSTOR_LABELER)]
    ImpostorLabelerTaken(String),
    /// A file or directory could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A scene could not be rendered or encoded.
    #[error(transparent)]
    Scene(#[from] SceneError),
}

/// What `rxvision-synth dataset` renders.
#[derive(Debug, Clone)]
pub struct DatasetSpec {
    /// Output directory (created if missing).
    pub out: PathBuf,
    /// Images per product (faces alternate: even index front, odd back).
    pub per_class: u32,
    /// The run's seed.
    pub seed: u64,
    /// Image size and scale.
    pub options: SceneOptions,
    /// NDCs left out (they also never appear as the second pill).
    pub exclude: Vec<String>,
    /// Worker threads (≥ 1).
    pub threads: usize,
    /// Write each frame's pill as the counter crops it with this crop (see
    /// [`pill_crop`]) instead of the whole frame.
    pub pill_crops: Option<PillCrop>,
    /// The margin of an upright crop (the bundle's `input.crop_margin`);
    /// `None`: the localiser's.
    pub crop_margin: Option<f32>,
    /// Images of impostors per included product (see [`crate::impostor`]),
    /// besides its own `per_class`: each a freshly altered imprint on a face
    /// that has one (faces alternate when both have).
    pub impostors: u32,
}

/// What a dataset run wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DatasetSummary {
    /// Images written (impostors included).
    pub images: usize,
    /// Of them, images of impostors.
    pub impostors: usize,
    /// Products rendered.
    pub products: usize,
    /// Frames left out because the counter would not ask the model about
    /// them (`--pill-crops` only): no whole pill found, or the frame or the
    /// pill fails the quality gate.
    pub skipped: usize,
    /// The index.
    pub labels: PathBuf,
}

/// The products left after `exclude`; every excluded NDC must exist.
pub fn included<'a>(formulary: &'a Formulary, exclude: &[String]) -> Result<Vec<&'a Product>, DatasetError> {
    if let Some(unknown) = exclude.iter().find(|n| formulary.get(n).is_none()) {
        return Err(DatasetError::UnknownNdc(unknown.clone()));
    }
    let products: Vec<&Product> = formulary.products.iter().filter(|p| !exclude.contains(&p.ndc)).collect();
    if products.is_empty() {
        return Err(DatasetError::NothingToRender);
    }
    Ok(products)
}

/// File name of image `index` of a product.
pub fn image_name(ndc: &str, index: u32, face: Face) -> String {
    format!("images/{ndc}_{index:05}_{face}.jpg")
}

/// The face of image `index`: front for even, back for odd.
pub fn face_of(index: u32) -> Face {
    if index.is_multiple_of(2) {
        Face::Front
    } else {
        Face::Back
    }
}

/// One image to render: image `index` of `product` itself, or of an impostor of it.
#[derive(Clone, Copy)]
struct Job<'a> {
    product: &'a Product,
    index: u32,
    impostor: bool,
}

/// Renders a dataset into `spec.out`: `images/*.jpg`, then `labels.csv`.
pub fn write_dataset(formulary: &Formulary, spec: &DatasetSpec) -> Result<DatasetSummary, DatasetError> {
    let products = included(formulary, &spec.exclude)?;
    if spec.impostors > 0 {
        if let Some(p) = formulary.products.iter().find(|p| p.ndc.starts_with(&format!("{IMPOSTOR_LABELER}-"))) {
            return Err(DatasetError::ImpostorLabelerTaken(p.ndc.clone()));
        }
    }
    let labels = spec.out.join("labels.csv");
    remove_if_present(&labels)?;
    let images = spec.out.join("images");
    std::fs::create_dir_all(&images).map_err(|source| DatasetError::Write { path: images.clone(), source })?;

    let own =
        products.iter().flat_map(|&p| (0..spec.per_class).map(move |index| Job { product: p, index, impostor: false }));
    let fakes = products
        .iter()
        .filter(|p| !alterable_faces(p).is_empty())
        .flat_map(|&p| (0..spec.impostors).map(move |index| Job { product: p, index, impostor: true }));
    let jobs: Vec<Job> = own.chain(fakes).collect();
    let rows = par_map(&jobs, spec.threads, |&job| -> Result<Option<LabelRow>, DatasetError> {
        let Job { index, .. } = job;
        let fake;
        let (product, face, imitates, seed);
        if job.impostor {
            let faces = alterable_faces(job.product);
            face = faces[index as usize % faces.len()];
            seed = image_seed(spec.seed, &impostor_ndc(job.product), index);
            let Some(altered) = impostor(job.product, face, formulary, mix64(seed ^ fnv1a64("imprint"))) else {
                return Ok(None);
            };
            fake = altered;
            product = &fake;
            imitates = job.product.ndc.clone();
        } else {
            (product, face, imitates) = (job.product, face_of(index), String::new());
            seed = image_seed(spec.seed, &product.ndc, index);
        }
        let picture = render_sample(product, face, &products, seed, &spec.options);
        let file = image_name(&product.ndc, index, face);
        let path = spec.out.join(&file);
        let jpeg = picture.to_jpeg()?;
        let bytes = if let Some(mode) = spec.pill_crops {
            match pill_crop(&jpeg, mode, spec.crop_margin)? {
                Some(crop) => crop,
                None => return Ok(None),
            }
        } else {
            jpeg
        };
        std::fs::write(&path, bytes).map_err(|source| DatasetError::Write { path, source })?;
        Ok(Some(LabelRow {
            file,
            ndc: product.ndc.clone(),
            face: face.as_str().to_owned(),
            name: product.name.clone(),
            strength: product.strength.clone(),
            lookalike_group: product.lookalike_group.clone().unwrap_or_default(),
            seed,
            imitates,
            imprint: product.imprint(face).to_owned(),
        }))
    });
    let mut csv = format!("{HEADER}\n");
    let (mut written, mut impostors) = (0, 0);
    for row in rows {
        if let Some(row) = row? {
            csv.push_str(&row.to_csv());
            written += 1;
            impostors += usize::from(!row.imitates.is_empty());
        }
    }
    write_atomically(&labels, csv.as_bytes())?;
    Ok(DatasetSummary { images: written, impostors, products: products.len(), skipped: jobs.len() - written, labels })
}

/// JPEG quality of the crops `--pill-crops` writes (one generation after the camera's).
pub const CROP_JPEG_QUALITY: u8 = 95;

/// The pill of a camera frame (JPEG bytes) as the counter path would show it
/// to the model: the frame decoded, passed through the quality gate, the
/// pill localised and checked for sharpness, then cut with `mode`. `None`
/// when the counter would not ask the model (no whole pill, too dark,
/// over-exposed, blurred). With several whole pills, the one nearest the centre.
/// `margin`: an upright crop's (the bundle's `input.crop_margin`), `None`
/// for the localiser's, as the counter cuts it.
pub fn pill_crop(jpeg: &[u8], mode: PillCrop, margin: Option<f32>) -> Result<Option<Vec<u8>>, SceneError> {
    use rxvision_counter::crop::crop_pill;
    use rxvision_counter::localise::{localise, LocaliseOptions};
    use rxvision_counter::quality::{check_frame, check_sharpness, QualityLimits};
    let frame = rxvision_models::preprocess::decode(jpeg).map_err(|e| SceneError::Crop(e.to_string()))?;
    let limits = QualityLimits::default();
    if check_frame(&frame, limits).is_err() {
        return Ok(None);
    }
    let (cx, cy) = (frame.width as f32 / 2.0, frame.height as f32 / 2.0);
    let off_centre = |b: &rxvision_counter::localise::PillBox| {
        let (x, y) = (b.x as f32 + b.w as f32 / 2.0, b.y as f32 + b.h as f32 / 2.0);
        (x - cx).powi(2) + (y - cy).powi(2)
    };
    let options = LocaliseOptions::default();
    let found = localise(&frame, options);
    let Some(pill) = found.pills.into_iter().min_by(|a, b| off_centre(a).total_cmp(&off_centre(b))) else {
        return Ok(None);
    };
    if check_sharpness(&frame, pill, limits).is_err() {
        return Ok(None);
    }
    let crop = crop_pill(&frame, &pill, mode, margin.unwrap_or(options.margin));
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, CROP_JPEG_QUALITY).encode(
        &crop.data,
        crop.width,
        crop.height,
        image::ExtendedColorType::Rgb8,
    )?;
    Ok(Some(out))
}

/// `trays.json`: the index of a tray set.
#[derive(Debug, Clone, Serialize)]
pub struct TrayIndex {
    /// The run's seed.
    pub seed: u64,
    /// Image width.
    pub width: usize,
    /// Image height.
    pub height: usize,
    /// Nominal scale.
    pub px_per_mm: f32,
    /// One entry per image.
    pub images: Vec<TrayEntry>,
}

/// One tray image.
#[derive(Debug, Clone, Serialize)]
pub struct TrayEntry {
    /// Path relative to the output directory.
    pub file: String,
    /// The image's own seed.
    pub seed: u64,
    /// Number of pills.
    pub count: usize,
    /// The pills.
    pub pills: Vec<TrayEntryPill>,
}

/// One pill of a tray image.
#[derive(Debug, Clone, Serialize)]
pub struct TrayEntryPill {
    /// Product NDC.
    pub ndc: String,
    /// `front` or `back`.
    pub face: &'static str,
    /// `[x, y, w, h]`, pixels, axis-aligned.
    #[serde(rename = "box")]
    pub bbox: [u32; 4],
}

/// Renders `n` tray scenes into `out`: `trays/*.jpg`, then `trays.json`.
pub fn write_trays(
    formulary: &Formulary,
    out: &Path,
    n: u32,
    seed: u64,
    options: &SceneOptions,
    threads: usize,
) -> Result<TrayIndex, DatasetError> {
    let index_path = out.join("trays.json");
    remove_if_present(&index_path)?;
    let dir = out.join("trays");
    std::fs::create_dir_all(&dir).map_err(|source| DatasetError::Write { path: dir.clone(), source })?;
    let products: Vec<&Product> = formulary.products.iter().collect();
    let jobs: Vec<u32> = (0..n).collect();
    let entries = par_map(&jobs, threads, |&i| -> Result<TrayEntry, DatasetError> {
        let image_seed = tray_seed(seed, i);
        let scene = render_tray(&products, image_seed, options)?;
        let file = format!("trays/tray_{i:05}.jpg");
        let path = out.join(&file);
        std::fs::write(&path, scene.picture.to_jpeg()?).map_err(|source| DatasetError::Write { path, source })?;
        Ok(TrayEntry {
            file,
            seed: image_seed,
            count: scene.pills.len(),
            pills: scene
                .pills
                .into_iter()
                .map(|p| TrayEntryPill { ndc: p.ndc, face: p.face.as_str(), bbox: p.bbox })
                .collect(),
        })
    });
    let index = TrayIndex {
        seed,
        width: options.width,
        height: options.height,
        px_per_mm: options.px_per_mm,
        images: entries.into_iter().collect::<Result<_, _>>()?,
    };
    let json = serde_json::to_vec_pretty(&index).expect("the tray index serialises");
    write_atomically(&index_path, &json)?;
    Ok(index)
}

fn remove_if_present(path: &Path) -> Result<(), DatasetError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(DatasetError::Write { path: path.to_owned(), source: e })
        }
        _ => Ok(()),
    }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), DatasetError> {
    let tmp = path.with_extension("tmp");
    let err = |source| DatasetError::Write { path: path.to_owned(), source };
    std::fs::write(&tmp, bytes).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn par_map_keeps_order_for_any_thread_count() {
        let items: Vec<u64> = (0..1000).collect();
        let one = par_map(&items, 1, |x| x * x);
        for t in [2, 3, 7, 64] {
            assert_eq!(par_map(&items, t, |x| x * x), one);
        }
        assert!(par_map(&[] as &[u8], 4, |x| *x).is_empty());
    }
}
