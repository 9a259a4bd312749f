//! Classifying images with a bundle: preprocessing, engine, top-k.
//!
//! [`Classifier`] owns one loaded bundle, its engines and a preprocessor; the
//! daemon's `classify` and `selftest` commands and the counter path
//! (`rxvision-counter`) stand on it, and so will the fleet's validation.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;

use crate::bundle::{self, Bundle, BundleError};
use crate::engine::{EngineError, EngineKind, EngineOptions, Engines, Inference};
use crate::preprocess::{decode, PreprocessError, Preprocessor, RgbView};

/// Where bundles are looked for when none is named, in order: the source
/// tree's shipped bundles (for development and the demo), then the installed
/// ones.
pub fn default_bundle_roots() -> Vec<PathBuf> {
    vec![
        PathBuf::from("models/bundles"),
        PathBuf::from("/var/lib/rxvision/bundles"),
        PathBuf::from("/usr/share/rxvision/bundles"),
    ]
}

/// Loads and verifies `bundle_path`, or the newest bundle under `roots` when `None`.
pub fn load_bundle(bundle_path: Option<&Path>, roots: &[PathBuf]) -> Result<Bundle, ClassifyError> {
    let path = match bundle_path {
        Some(p) => p.to_path_buf(),
        None => bundle::find_newest(roots).ok_or_else(|| {
            ClassifyError::NoBundle(roots.iter().map(|r| r.display().to_string()).collect::<Vec<_>>().join(", "))
        })?,
    };
    Bundle::load(&path).map_err(|source| ClassifyError::Bundle { path: path.display().to_string(), source })
}

/// Why classification could not start or could not answer.
#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    /// No bundle was named and none was found.
    #[error("no model bundle found under {0} (pass --bundle DIR)")]
    NoBundle(String),
    /// The bundle failed to load or verify.
    #[error("model bundle {path}: {source}")]
    Bundle {
        /// Where it was loaded from.
        path: String,
        /// What is wrong.
        source: BundleError,
    },
    /// The engines could not be prepared.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The image is unreadable.
    #[error(transparent)]
    Image(#[from] PreprocessError),
}

impl ClassifyError {
    /// The process exit code: 65 a bad or missing bundle, 69 the requested
    /// engine is unavailable, else 1.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClassifyError::NoBundle(_) | ClassifyError::Bundle { .. } => 65,
            ClassifyError::Engine(EngineError::NoGpu(_)) => 69,
            _ => 1,
        }
    }
}

/// One class in a top-k list.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Ranked {
    /// Position in the model output.
    pub index: usize,
    /// The class's NDC.
    pub ndc: String,
    /// The class's name.
    pub name: String,
    /// Calibrated probability.
    pub prob: f32,
}

/// The answer for one image.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Classification {
    /// The k most probable classes, most probable first.
    pub top_k: Vec<Ranked>,
    /// The engine that answered.
    pub engine: EngineKind,
    /// True when the GPU failed and the CPU answered instead.
    pub fell_back: bool,
    /// The bundle's model version.
    pub model_version: String,
    /// Preprocessing plus inference, in milliseconds.
    pub latency_ms: f64,
}

/// A loaded bundle with its engines.
#[derive(Debug)]
pub struct Classifier {
    bundle: Bundle,
    engines: Engines,
    preprocessor: Mutex<(Preprocessor, Vec<f32>)>,
}

impl Classifier {
    /// Loads `bundle_path`, or the newest bundle under `roots` when `None`,
    /// and prepares its engines.
    pub fn open(
        bundle_path: Option<&Path>,
        roots: &[PathBuf],
        options: EngineOptions,
    ) -> Result<Classifier, ClassifyError> {
        let bundle = load_bundle(bundle_path, roots)?;
        let engines = Engines::select(&bundle, options)?;
        let preprocessor = Preprocessor::new(&bundle.manifest.input);
        let input = vec![0.0; preprocessor.tensor_len()];
        Ok(Classifier { bundle, engines, preprocessor: Mutex::new((preprocessor, input)) })
    }

    /// The loaded bundle.
    pub fn bundle(&self) -> &Bundle {
        &self.bundle
    }

    /// The engines and the reason for the choice.
    pub fn engines(&self) -> &Engines {
        &self.engines
    }

    /// Classifies encoded image bytes (JPEG or PNG), returning the `k` best classes.
    pub fn classify_bytes(&self, bytes: &[u8], k: usize) -> Result<Classification, ClassifyError> {
        let started = Instant::now();
        let image = decode(bytes)?;
        let inference = self.infer(image.view())?;
        let latency_ms = started.elapsed().as_secs_f64() * 1e3;
        Ok(Classification {
            top_k: self.top_k(&inference.probs, k),
            engine: inference.engine,
            fell_back: inference.fell_back,
            model_version: self.bundle.manifest.version.to_string(),
            latency_ms,
        })
    }

    /// Runs one image (or a crop of one) through preprocessing and the engines.
    pub fn infer(&self, image: RgbView<'_>) -> Result<Inference, EngineError> {
        let mut guard = self.preprocessor.lock().unwrap_or_else(|p| p.into_inner());
        let (preprocessor, input) = &mut *guard;
        preprocessor.preprocess(image, input);
        self.engines.run(input)
    }

    /// The `k` most probable classes with their labels, most probable first.
    pub fn top_k(&self, probs: &[f32], k: usize) -> Vec<Ranked> {
        let mut order: Vec<usize> = (0..probs.len()).collect();
        order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
        order
            .into_iter()
            .take(k)
            .map(|i| {
                let label = &self.bundle.labels[i];
                Ranked { index: i, ndc: label.ndc.clone(), name: label.name.clone(), prob: probs[i] }
            })
            .collect()
    }
}
