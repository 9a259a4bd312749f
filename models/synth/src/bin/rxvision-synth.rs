//! `rxvision-synth`: synthetic counter-camera pill photos, count-mode trays and
//! the drift features.
//!
//! ```text
//! rxvision-synth dataset  --out DIR --per-class N --seed S [--size WxH] [--exclude NDC,...] [--impostors N] [--pill-crops [--crop square|upright [--crop-margin F]]]
//! rxvision-synth tray     --out DIR --n N --seed S [--size WxH]
//! rxvision-synth features DIR            # CSV on stdout
//! rxvision-synth sample   --ndc NDC --seed S --out FILE.png|.jpg [--face back] [--clean]
//! ```
//!
//! Exit codes: 0 success; 1 a write failed; 64 bad usage (a malformed flag,
//! `--size` outside 1..=4096 or too small for a tray of two pills, an
//! `--exclude` NDC the formulary lacks); 65 bad input data (formulary missing
//! or invalid, an image `features` cannot read).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use rxvision_models::bundle::{check_crop_margin, PillCrop};
use rxvision_models::features::{self, CSV_HEADER};
use rxvision_models::formulary::{self, Face, Formulary};
use rxvision_models::labels::quote;
use rxvision_synth::dataset::{self, DatasetError, DatasetSpec};
use rxvision_synth::scene::{render_sample, SceneError, SceneOptions, MAX_SIDE};

#[derive(Parser)]
#[command(name = "rxvision-synth", version, about = "Synthetic pill photos, tray scenes and drift features")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Render single-pill images of every product: DIR/images/*.jpg and DIR/labels.csv.
    Dataset {
        #[command(flatten)]
        common: RenderArgs,
        /// Images per product (faces alternate front, back).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        per_class: u32,
        /// Image size.
        #[arg(long, value_name = "WxH", default_value = "224x224", value_parser = parse_size)]
        size: (usize, usize),
        /// Products to leave out (comma-separated NDCs), e.g. for open-set tests.
        #[arg(long, value_name = "NDC,...", value_delimiter = ',', value_parser = parse_ndc)]
        exclude: Vec<String>,
        /// Write each frame's pill as the counter crops it (quality gate,
        /// localiser, square crop with margin) instead of the whole frame;
        /// frames the counter would not classify are left out. For training
        /// sets: the model then learns from what the counter shows it.
        #[arg(long)]
        pill_crops: bool,
        /// How `--pill-crops` cuts the pill (the model bundle's `input.crop`):
        /// `square` as it lies, or `upright` with an elongated pill's long
        /// axis turned horizontal.
        #[arg(long, requires = "pill_crops", default_value = "square")]
        crop: PillCrop,
        /// The room an `upright` crop leaves around the pill, a fraction of
        /// its length on each side (the bundle's `input.crop_margin`);
        /// without it, the localiser's margin (0.3).
        #[arg(long, value_name = "FRACTION", requires = "pill_crops")]
        crop_margin: Option<f32>,
        /// Also render N images per product of products that do not exist:
        /// the product with one imprint character of the face in view
        /// altered, anew for every image (NDC 99999-…, `imitates` names the
        /// product). For open-set tests and outlier exposure.
        #[arg(long, value_name = "N", default_value_t = 0)]
        impostors: u32,
    },
    /// Render multi-pill count-mode scenes: DIR/trays/*.jpg and DIR/trays.json.
    Tray {
        #[command(flatten)]
        common: RenderArgs,
        /// Number of tray images.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        n: u32,
        /// Image size.
        #[arg(long, value_name = "WxH", default_value = "640x480", value_parser = parse_size)]
        size: (usize, usize),
    },
    /// Print the drift features of the images of DIR (labels.csv order, else every .jpg/.png) as CSV.
    Features {
        /// Dataset directory or a folder of images.
        dir: PathBuf,
        /// Worker threads (default: every core).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        threads: Option<u32>,
    },
    /// Render one image of one product (for looking at the renderer).
    Sample {
        /// Product NDC.
        #[arg(long, value_parser = parse_ndc)]
        ndc: String,
        /// Face up.
        #[arg(long, default_value = "front", value_parser = ["front", "back"])]
        face: String,
        /// The image's seed.
        #[arg(long)]
        seed: u64,
        /// Output file; `.png` is lossless, anything else is JPEG at the camera's quality.
        #[arg(long)]
        out: PathBuf,
        /// Image size.
        #[arg(long, value_name = "WxH", default_value = "224x224", value_parser = parse_size)]
        size: (usize, usize),
        /// Scale override in px/mm.
        #[arg(long, value_parser = parse_scale)]
        px_per_mm: Option<f32>,
        /// No camera nuisances (plain tray, fixed light, no blur, no noise).
        #[arg(long)]
        clean: bool,
        /// The formulary.
        #[arg(long, default_value = formulary::DEFAULT_PATH)]
        formulary: PathBuf,
    },
}

#[derive(Args)]
struct RenderArgs {
    /// Output directory (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// The run's seed; the same seed gives the same bytes.
    #[arg(long)]
    seed: u64,
    /// The formulary.
    #[arg(long, default_value = formulary::DEFAULT_PATH)]
    formulary: PathBuf,
    /// Scale override in px/mm (default: 9 px/mm at 224 px for datasets, 9 px/mm for trays).
    #[arg(long, value_parser = parse_scale)]
    px_per_mm: Option<f32>,
    /// Worker threads (default: every core); the output does not depend on it.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    threads: Option<u32>,
}

fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let (w, h) = s.split_once(['x', 'X']).ok_or("expected WxH, e.g. 224x224")?;
    let parse = |v: &str| v.trim().parse::<usize>().ok().filter(|n| (1..=MAX_SIDE).contains(n));
    match (parse(w), parse(h)) {
        (Some(w), Some(h)) => Ok((w, h)),
        _ => Err(format!("width and height must be whole numbers in 1..={MAX_SIDE}")),
    }
}

fn parse_ndc(s: &str) -> Result<String, String> {
    let s = s.trim();
    if formulary::is_ndc(s) {
        Ok(s.to_owned())
    } else {
        Err(format!("{s:?} is not an NDC in 5-4-2 form (12345-6789-01)"))
    }
}

fn parse_scale(s: &str) -> Result<f32, String> {
    s.parse::<f32>()
        .ok()
        .filter(|v| v.is_finite() && (0.5..=100.0).contains(v))
        .ok_or_else(|| "px/mm must be in 0.5..=100".into())
}

/// A failure and its exit code.
struct Failure(u8, String);

impl From<DatasetError> for Failure {
    fn from(e: DatasetError) -> Failure {
        let code = match e {
            DatasetError::UnknownNdc(_)
            | DatasetError::NothingToRender
            | DatasetError::ImpostorLabelerTaken(_)
            | DatasetError::Scene(SceneError::TrayTooSmall { .. }) => 64,
            _ => 1,
        };
        Failure(code, e.to_string())
    }
}

fn load(path: &std::path::Path) -> Result<Formulary, Failure> {
    rxvision_synth::load_formulary(path).map_err(|e| Failure(65, e.to_string()))
}

fn threads(t: Option<u32>) -> usize {
    t.map_or_else(rxvision_models::par::default_threads, |t| t as usize)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => {
            let _ = e.print(); // --help, --version
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(64);
        }
    };
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, message)) => {
            eprintln!("rxvision-synth: {message}");
            ExitCode::from(code)
        }
    }
}

fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Dataset { common, per_class, size, exclude, pill_crops, crop, crop_margin, impostors } => {
            let pill_crops = pill_crops.then_some(crop);
            if let Some(margin) = crop_margin {
                check_crop_margin(crop, margin).map_err(|problem| Failure(64, format!("--crop-margin: {problem}")))?;
            }
            let formulary = load(&common.formulary)?;
            let mut options = SceneOptions::crop(size.0, size.1);
            if let Some(s) = common.px_per_mm {
                options.px_per_mm = s;
            }
            let threads = threads(common.threads);
            let spec = DatasetSpec {
                out: common.out,
                per_class,
                seed: common.seed,
                options,
                exclude,
                threads,
                pill_crops,
                crop_margin,
                impostors,
            };
            let start = Instant::now();
            let summary = dataset::write_dataset(&formulary, &spec)?;
            let secs = start.elapsed().as_secs_f64();
            eprintln!(
                "rxvision-synth: {} images of {} products in {secs:.1} s ({:.2} ms per image per thread) → {}",
                summary.images,
                summary.products,
                1000.0 * secs * threads as f64 / summary.images as f64,
                summary.labels.display()
            );
            if summary.impostors > 0 {
                eprintln!("rxvision-synth: {} of the images show impostors (altered imprints)", summary.impostors);
            }
            if summary.skipped > 0 {
                eprintln!(
                    "rxvision-synth: {} frames left out: the counter would not classify them (no whole pill, too dark, over-exposed or blurred)",
                    summary.skipped
                );
            }
            Ok(())
        }
        Command::Tray { common, n, size } => {
            let formulary = load(&common.formulary)?;
            let mut options = SceneOptions::tray(size.0, size.1);
            if let Some(s) = common.px_per_mm {
                options.px_per_mm = s;
            }
            let index =
                dataset::write_trays(&formulary, &common.out, n, common.seed, &options, threads(common.threads))?;
            let pills: usize = index.images.iter().map(|i| i.count).sum();
            eprintln!(
                "rxvision-synth: {} trays, {pills} pills → {}",
                index.images.len(),
                common.out.join("trays.json").display()
            );
            Ok(())
        }
        Command::Features { dir, threads: t } => {
            let rows = features::compute_dir(&dir, threads(t)).map_err(|e| Failure(65, e.to_string()))?;
            let mut out = String::with_capacity(rows.len() * 96 + 96);
            out.push_str(CSV_HEADER);
            out.push('\n');
            for (file, f) in rows {
                out.push_str(&format!("{},{}\n", quote(&file), f.csv_fields()));
            }
            std::io::stdout().lock().write_all(out.as_bytes()).map_err(|e| Failure(1, format!("stdout: {e}")))
        }
        Command::Sample { ndc, face, seed, out, size, px_per_mm, clean, formulary } => {
            let formulary = load(&formulary)?;
            let product = formulary.get(&ndc).ok_or_else(|| Failure(64, format!("{ndc} is not in the formulary")))?;
            let face = if face == "back" { Face::Back } else { Face::Front };
            let mut options = SceneOptions::crop(size.0, size.1);
            options.clean = clean;
            if let Some(s) = px_per_mm {
                options.px_per_mm = s;
            }
            let others: Vec<_> = formulary.products.iter().collect();
            let picture = render_sample(product, face, &others, seed, &options);
            let png = out.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
            let bytes = if png { picture.to_png() } else { picture.to_jpeg() };
            let bytes = bytes.map_err(|e| Failure(1, e.to_string()))?;
            std::fs::write(&out, bytes).map_err(|e| Failure(1, format!("cannot write {}: {e}", out.display())))
        }
    }
}
