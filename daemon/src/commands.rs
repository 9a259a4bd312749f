//! The one-shot commands of `rxvisiond` (`classify`, `selftest`, `eval`,
//! `audit …`, `cameras`): each takes its parsed arguments, does its work
//! through the library and prints its report; `main.rs` only parses the
//! command line and dispatches here or to [`crate::service::run`].

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use rxvision_models::classify::{default_bundle_roots, load_bundle, Classifier, ClassifyError};
use rxvision_models::engine::{EngineOptions, EnginePreference, Engines};
use rxvision_models::selftest;

use crate::audit::{parse_time, Acceptance};
use crate::control::{self, AccessError, AuditAccess};

/// `rxvisiond audit …`.
#[derive(Subcommand)]
pub enum AuditCommand {
    /// Check every record's tag and the hash chain; name the first bad record.
    Verify {
        #[allow(missing_docs)] // the flattened arguments document themselves
        #[command(flatten)]
        store: AuditArgs,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write decrypted records of a time range as JSON lines (itself audited).
    Export {
        #[allow(missing_docs)] // the flattened arguments document themselves
        #[command(flatten)]
        store: AuditArgs,
        /// First day or time included (YYYY-MM-DD or RFC 3339, UTC).
        #[arg(long)]
        from: String,
        /// First day or time excluded (YYYY-MM-DD or RFC 3339, UTC).
        #[arg(long)]
        to: String,
        /// Output file (created, must not exist); default standard output.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Who exports (recorded in the audit log).
        #[arg(long)]
        operator: String,
    },
    /// Remove records older than a date, keeping the chain verifiable (itself audited).
    Prune {
        #[allow(missing_docs)] // the flattened arguments document themselves
        #[command(flatten)]
        store: AuditArgs,
        /// Records written before this day or time are removed.
        #[arg(long)]
        before: String,
        /// Who prunes (recorded in the audit log).
        #[arg(long)]
        operator: String,
    },
    /// Accept an audit store that does not continue the chain this appliance
    /// confirmed (missing, shorter or forked: a restored backup, a replaced
    /// disk). The acceptance is recorded as the store's next record. Run it
    /// with the daemon stopped.
    AcceptStore {
        /// The daemon's configuration (store, keys, state directory).
        #[arg(long)]
        config: PathBuf,
        /// Who accepts (recorded in the audit log).
        #[arg(long)]
        operator: String,
        /// Why (recorded in the audit log).
        #[arg(long)]
        reason: String,
    },
}

/// Where the `audit` commands find the log.
#[derive(Args)]
pub struct AuditArgs {
    /// Take the store and keys from this configuration's [audit] section.
    #[arg(long, conflicts_with_all = ["dir", "key"])]
    config: Option<PathBuf>,
    /// The audit store directory.
    #[arg(long, required_unless_present = "config")]
    dir: Option<PathBuf>,
    /// The active audit key file (64 hex digits or 32 bytes, mode 0600 or stricter).
    #[arg(long, required_unless_present = "config")]
    key: Option<PathBuf>,
    /// Older keys, to read records written before a key rotation.
    #[arg(long = "previous-key")]
    previous_keys: Vec<PathBuf>,
}

impl AuditArgs {
    /// The running daemon of `--config`, its store, or the store of `--dir`/`--key`.
    pub fn open(&self) -> Result<AuditAccess, AccessError> {
        let access = match (&self.config, &self.dir, &self.key) {
            (Some(config), _, _) => AuditAccess::from_config(config, &self.previous_keys)?,
            (None, Some(dir), Some(key)) => AuditAccess::from_dir(dir, key, &self.previous_keys)?,
            _ => return Err(AccessError::Key("give --config, or both --dir and --key".into())),
        };
        if let AuditAccess::Daemon(client) = &access {
            eprintln!("rxvisiond: the daemon is running; asking it through {}", client.socket().display());
        }
        Ok(access)
    }
}

/// The bundle and engine of `classify`, `selftest` and `eval`.
#[derive(Args)]
pub struct ModelArgs {
    /// Bundle directory or .tar.gz; default: the newest under models/bundles/ or the installed ones.
    #[arg(long)]
    bundle: Option<PathBuf>,
    /// Inference engine: auto, gpu or cpu.
    #[arg(long, default_value = "auto")]
    engine: EnginePreference,
    /// CPU engine threads (default: available cores, at most 4).
    #[arg(long)]
    threads: Option<usize>,
    /// Watchdog bound on one GPU request, in milliseconds, before it falls back to the CPU.
    #[arg(long, default_value_t = 2000)]
    gpu_timeout_ms: u64,
}

impl ModelArgs {
    /// The engine options these arguments ask for.
    pub fn options(&self) -> EngineOptions {
        let defaults = EngineOptions::default();
        EngineOptions {
            preference: self.engine,
            cpu_threads: self.threads.unwrap_or(defaults.cpu_threads).max(1),
            gpu_timeout: Duration::from_millis(self.gpu_timeout_ms),
        }
    }

    /// The bundle (named, or the newest found) with its engines.
    pub fn open(&self) -> Result<Classifier, ClassifyError> {
        Classifier::open(self.bundle.as_deref(), &default_bundle_roots(), self.options())
    }
}

/// `rxvisiond classify`: top-k of each image, as text or JSON lines; exit 1 if any image failed.
pub fn classify(model: &ModelArgs, k: usize, json: bool, images: &[PathBuf]) -> Result<ExitCode, ClassifyError> {
    let classifier = model.open()?;
    eprintln!("rxvisiond: model {} — engine {}", classifier.bundle(), classifier.engines().choice());
    let mut failures = 0;
    for path in images {
        let image = path.display().to_string();
        let result = std::fs::read(path)
            .map_err(|e| format!("cannot read: {e}"))
            .and_then(|bytes| classifier.classify_bytes(&bytes, k).map_err(|e| e.to_string()));
        match (result, json) {
            (Ok(c), true) => println!(
                "{}",
                serde_json::json!({
                    "image": image, "top_k": c.top_k, "engine": c.engine, "fell_back": c.fell_back,
                    "model_version": c.model_version, "latency_ms": c.latency_ms,
                })
            ),
            (Ok(c), false) => {
                let best: Vec<String> =
                    c.top_k.iter().map(|r| format!("{} {} ({:.3})", r.ndc, r.name, r.prob)).collect();
                println!("{image}: {} [{} {:.1} ms]", best.join(" | "), c.engine, c.latency_ms);
            }
            (Err(error), true) => {
                failures += 1;
                println!("{}", serde_json::json!({ "image": image, "error": error }));
            }
            (Err(error), false) => {
                failures += 1;
                println!("{image}: error: {error}");
            }
        }
    }
    Ok(if failures == 0 { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `rxvisiond selftest`: the bundle's golden images through the requested engine against ONNX Runtime's outputs.
pub fn run_selftest(model: &ModelArgs, json: bool) -> Result<ExitCode, ClassifyError> {
    let bundle = load_bundle(model.bundle.as_deref(), &default_bundle_roots())?;
    let (engine, choice) = Engines::prepare_requested(&bundle, model.options())?;
    let report = match selftest::run(&bundle, engine.as_ref()) {
        Ok(report) => report,
        Err(e) => {
            eprintln!("rxvisiond: self-test could not run: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    if json {
        println!("{}", serde_json::to_string(&report).expect("report serialises"));
    } else {
        println!("model {bundle}\nengine choice: {choice}");
        print!("{}", report.table());
    }
    Ok(if report.passed() { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// `rxvisiond audit …`: verify, export, prune, accept-store.
pub fn audit(command: AuditCommand) -> ExitCode {
    let result = match command {
        AuditCommand::Verify { store, json } => {
            store.open().and_then(|store| store.verify()).map_err(|e| e.to_string()).map(|report| {
                if json {
                    println!("{}", serde_json::to_string(&report).expect("report serialises"));
                } else {
                    println!(
                        "{} records checked (seq {} to {}), {} pruned under a signed checkpoint, chain head {}",
                        report.checked,
                        report.first_seq.map_or("-".into(), |s| s.to_string()),
                        report.last_seq.map_or("-".into(), |s| s.to_string()),
                        report.pruned,
                        report.head_hash
                    );
                }
                match report.tamper {
                    None => true,
                    Some(t) => {
                        eprintln!(
                            "rxvisiond: audit log FAILS verification: first bad record is seq {}: {}",
                            t.seq, t.reason
                        );
                        false
                    }
                }
            })
        }
        AuditCommand::Export { store, from, to, out, operator } => (|| {
            let (from_ms, to_ms) = (parse_time(&from)?, parse_time(&to)?);
            if from_ms >= to_ms {
                return Err(format!("--from {from} is not before --to {to}"));
            }
            let store = store.open().map_err(|e| e.to_string())?;
            let summary = match &out {
                Some(path) => {
                    use std::os::unix::fs::OpenOptionsExt;
                    // Decrypted records: readable by the compliance officer only.
                    let file = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .open(path)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                    let mut writer = std::io::BufWriter::new(file);
                    store.export(from_ms, to_ms, &operator, &mut writer)
                }
                None => store.export(from_ms, to_ms, &operator, &mut std::io::stdout().lock()),
            }
            .map_err(|e| e.to_string())?;
            eprintln!(
                "rxvisiond: exported {} records; the export is audit record {}",
                summary.count, summary.audit_seq
            );
            Ok(true)
        })(),
        AuditCommand::Prune { store, before, operator } => (|| {
            let before_ms = parse_time(&before)?;
            let summary = store.open().and_then(|s| s.prune(before_ms, &operator)).map_err(|e| e.to_string())?;
            match summary.audit_seq {
                None => println!("nothing to prune: no record is older than {before}"),
                Some(seq) => println!(
                    "removed {} records; checkpoint through seq {}; the pruning is audit record {seq}",
                    summary.removed,
                    summary.checkpoint.map_or("-".into(), |c| c.through_seq.to_string()),
                ),
            }
            Ok(true)
        })(),
        AuditCommand::AcceptStore { config, operator, reason } => {
            control::accept_store(&config, Acceptance { operator, reason }).map_err(|e| e.to_string()).map(|log| {
                let (next_seq, head) = log.head();
                let head: String = head.iter().map(|b| format!("{b:02x}")).collect();
                println!("accepted: the acceptance is audit record {}; chain head {head}", next_seq - 1);
                true
            })
        }
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("rxvisiond: {e}");
            ExitCode::from(1)
        }
    }
}

/// `rxvisiond cameras`: the V4L2 devices, their stable names and formats.
pub fn cameras(json: bool) -> ExitCode {
    let cameras = match crate::camera::v4l2::list_cameras() {
        Ok(cameras) => cameras,
        Err(e) => {
            eprintln!("rxvisiond: cannot list V4L2 cameras: {e}");
            return ExitCode::from(1);
        }
    };
    if json {
        let list: Vec<_> = cameras
            .iter()
            .map(|c| {
                let (formats, error) = match &c.formats {
                    Ok(f) => (f.clone(), None),
                    Err(e) => (Vec::new(), Some(e.clone())),
                };
                serde_json::json!({ "device": c.device, "stable_names": c.stable_names, "name": c.name, "formats": formats, "error": error })
            })
            .collect();
        println!("{}", serde_json::Value::Array(list));
        return ExitCode::SUCCESS;
    }
    if cameras.is_empty() {
        println!("no V4L2 camera found: is it plugged in, and may this user open /dev/video* (group \"video\")?");
    }
    for camera in &cameras {
        println!("{}  {}", camera.device, camera.name);
        for name in &camera.stable_names {
            println!("    also {name}");
        }
        match &camera.formats {
            Ok(formats) if formats.is_empty() => println!("    offers neither MJPEG nor YUYV: not usable"),
            Ok(formats) => println!("    {}", formats.join(", ")),
            Err(e) => println!("    formats unreadable: {e}"),
        }
    }
    ExitCode::SUCCESS
}

/// `rxvisiond eval`'s options.
#[derive(Debug, Clone, Default)]
pub struct EvalOptions {
    /// The camera's scale (turns on the size cue).
    pub px_per_mm: Option<f32>,
    /// The formulary (sizes, twin faces).
    pub formulary: Option<PathBuf>,
    /// One JSON object instead of text.
    pub json: bool,
    /// Also the verification cases and their curve.
    pub verify: bool,
    /// With `verify`: every verification scan to this CSV file.
    pub scans: Option<PathBuf>,
    /// The quality gate's blur limit instead of the default.
    pub min_sharpness: Option<f32>,
}

/// Writes a CSV file: `header`, then one line per row.
fn write_csv(path: &std::path::Path, header: &str, rows: impl Iterator<Item = String>) -> std::io::Result<()> {
    let mut csv = String::from(header);
    for row in rows {
        csv.push('\n');
        csv.push_str(&row);
    }
    csv.push('\n');
    std::fs::write(path, csv)
}

/// `rxvisiond eval`: the counter path over a labelled dataset, scored.
pub fn run_eval(
    model: &ModelArgs,
    dataset: &std::path::Path,
    options: EvalOptions,
    mistakes: Option<&std::path::Path>,
) -> Result<ExitCode, ClassifyError> {
    let EvalOptions { px_per_mm, formulary, json, verify, scans, min_sharpness } = options;
    if let Some(limit) = min_sharpness.filter(|l| !(0.0..=10_000.0).contains(l)) {
        eprintln!("rxvisiond: --min-sharpness {limit} is outside 0..=10000");
        return Ok(ExitCode::from(64));
    }
    const DEFAULT_FORMULARY: &str = "models/formulary/formulary.json";
    if let Some(scale) = px_per_mm.filter(|s| !(1.0..=100.0).contains(s)) {
        eprintln!("rxvisiond: --px-per-mm {scale} is outside 1..=100");
        return Ok(ExitCode::from(64));
    }
    let formulary = match formulary {
        Some(path) => Some(path),
        None if std::path::Path::new(DEFAULT_FORMULARY).is_file() => Some(PathBuf::from(DEFAULT_FORMULARY)),
        None if px_per_mm.is_some() => {
            eprintln!("rxvisiond: --px-per-mm needs the formulary's sizes: give --formulary");
            return Ok(ExitCode::from(64));
        }
        None => {
            eprintln!("rxvisiond: no formulary ({DEFAULT_FORMULARY} is missing): twin faces are not scored apart");
            None
        }
    };
    let formulary = match formulary.map(|p| rxvision_synth::load_formulary(&p)).transpose() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("rxvisiond: --formulary: {e}");
            return Ok(ExitCode::from(64));
        }
    };
    let classifier = model.open()?;
    eprintln!("rxvisiond: model {} — engine {}", classifier.bundle(), classifier.engines().choice());
    let mut path = rxvision_counter::analysis::CounterPath::new(std::sync::Arc::new(classifier));
    if let (Some(scale), Some(formulary)) = (px_per_mm, &formulary) {
        let cue = rxvision_counter::size::SizeCue::from_formulary(scale, &path.classifier().bundle().labels, formulary);
        eprintln!("rxvisiond: size cue at {scale} px/mm ({} classes with a formulary size)", cue.known());
        path = path.with_size_cue(cue);
    }
    if let Some(min_sharpness) = min_sharpness {
        let counter = rxvision_counter::quality::QualityLimits::default().min_sharpness;
        eprintln!("rxvisiond: blur limit {min_sharpness} (the counter's is {counter})");
        let limits = rxvision_counter::quality::QualityLimits { min_sharpness, ..Default::default() };
        path = path.with_quality(limits);
    }
    let twins = formulary
        .as_ref()
        .map(|formulary| rxvision_counter::eval::TwinRule { formulary, by_size: px_per_mm.is_some() });
    let (report, verification) = match crate::eval::evaluate(&path, dataset, twins, verify) {
        Ok(scored) => scored,
        Err(e) => {
            eprintln!("rxvisiond: eval: {e}");
            return Ok(ExitCode::from(1));
        }
    };
    if let Some(out) = mistakes {
        let rows = report.mistakes.iter().map(rxvision_counter::eval::Mistake::csv_row);
        if let Err(e) = write_csv(out, rxvision_counter::eval::Mistake::CSV_HEADER, rows) {
            eprintln!("rxvisiond: --mistakes {}: {e}", out.display());
            return Ok(ExitCode::from(1));
        }
    }
    if let (Some(out), Some(verification)) = (&scans, &verification) {
        let rows = verification.scans.iter().map(rxvision_counter::eval::VerifyScan::csv_row);
        if let Err(e) = write_csv(out, rxvision_counter::eval::VerifyScan::CSV_HEADER, rows) {
            eprintln!("rxvisiond: --scans {}: {e}", out.display());
            return Ok(ExitCode::from(1));
        }
    }
    if json {
        let mut value = serde_json::to_value(&report).expect("report serialises");
        if let Some(verification) = &verification {
            value["verify"] = serde_json::to_value(verification).expect("verification serialises");
        }
        println!("{value}");
    } else {
        println!(
            "{} images: top-1 {:.4}, top-3 {:.4}, ECE {:.4}, UNCERTAIN {:.4}, not analysed {}",
            report.n, report.top1, report.top3, report.ece, report.uncertain_rate, report.not_analysed
        );
        for (group, score) in &report.per_group {
            println!("  group {group}: {} images, top-1 {:.4}", score.n, score.top1);
        }
        println!("open set: {} images, UNCERTAIN {:.4}", report.open_set.n, report.open_set.uncertain_rate);
        let refusals: Vec<String> = report.refusals.iter().map(|(code, n)| format!("{code} {n}")).collect();
        println!("refused before the model: {}", refusals.join(", "));
        if let Some(t) = &report.twin_faces {
            println!(
                "twin faces (scored apart): {} images, top-1 {:.4}, UNCERTAIN {:.4}; open set {} images, UNCERTAIN {:.4}",
                t.n, t.top1, t.uncertain_rate, t.open_set_n, t.open_set_uncertain_rate
            );
        }
        for c in &report.confusions {
            println!("  {} taken for {}: {}", c.expected, c.predicted, c.count);
        }
        if let Some(v) = &verification {
            let rate = |r: &rxvision_counter::eval::MatchRate| format!("{:.4} ({}/{})", r.rate, r.matched, r.n);
            println!(
                "verification (min_confidence {}, {} products with their own MATCH threshold): automation {}, \
                 false MATCH with a look-alike expected {}, for unknown products {}",
                v.min_confidence,
                v.products_with_own_threshold,
                rate(&v.answered.automation),
                rate(&v.answered.false_match_lookalike),
                rate(&v.answered.false_match_unknown)
            );
            println!("  min_confidence  automation  false MATCH look-alike  false MATCH unknown");
            for p in &v.curve {
                println!(
                    "  {:<14}  {:<10.4}  {:<22.4}  {:.4}",
                    p.min_confidence,
                    p.report.automation.rate,
                    p.report.false_match_lookalike.rate,
                    p.report.false_match_unknown.rate
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
