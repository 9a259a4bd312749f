//! `rxvisiond`: command line of the RxVision appliance daemon.
//!
//! Exit codes: 0 success; 1 a command ran and failed (an image could not be
//! classified, the self-test failed, the audit log fails verification); 64
//! bad usage or a bad configuration; 65 a bad model bundle; 66 `run`: the
//! audit store is missing, shorter than or forked from the chain this
//! appliance confirmed (an operator must `audit accept-store`); 69 the
//! requested engine is unavailable; 70 `run`: a daemon release on trial
//! could not start (in place of 64-66, so that systemd restarts it and the
//! launcher gives it up); 74 `run`: the audit store failed and could not be
//! reopened (systemd restarts the service); 75 `run`: the restart into a new
//! model or release could not be `exec`'d (systemd restarts the service).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rxvision_daemon::commands::{self, AuditCommand, ModelArgs};
use rxvision_daemon::config;

/// This binary's version: the crate's, unless the release build stamped
/// another (`RXVISION_RELEASE_VERSION` at build time).
const VERSION: &str = match option_env!("RXVISION_RELEASE_VERSION") {
    Some(version) => version,
    None => env!("CARGO_PKG_VERSION"),
};

#[derive(Parser)]
#[command(name = "rxvisiond", version = VERSION, about = "RxVision pill-verification appliance daemon")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Classify image files and print the most probable classes.
    Classify {
        #[command(flatten)]
        model: ModelArgs,
        /// How many classes to print per image.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..))]
        top: u16,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// JPEG or PNG files.
        #[arg(required = true)]
        images: Vec<PathBuf>,
    },
    /// Check the engine against ONNX Runtime on the bundle's golden images.
    Selftest {
        #[command(flatten)]
        model: ModelArgs,
        /// Print the report as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run the full counter path over a labelled dataset (labels.csv) and score it.
    Eval {
        #[command(flatten)]
        model: ModelArgs,
        /// Directory holding labels.csv and the images it names.
        #[arg(long)]
        dataset: PathBuf,
        /// The camera's scale (pixels per millimetre) the images were taken at: turns on the
        /// size cue, as `[camera] px_per_mm` does for the service (9 for rxvision-synth frames).
        #[arg(long)]
        px_per_mm: Option<f32>,
        /// The formulary: product sizes for the size cue, and which faces are twins (scored
        /// apart). Default models/formulary/formulary.json when it exists.
        #[arg(long)]
        formulary: Option<PathBuf>,
        /// Print the report as one JSON object.
        #[arg(long)]
        json: bool,
        /// Also write every scored image whose top-1 was wrong to this CSV file (file,
        /// expected, face, predicted, confidence, verdict, measured size in pixels, contrast).
        #[arg(long, value_name = "FILE")]
        mistakes: Option<PathBuf>,
        /// Also ask every image as a pharmacy system does, with an expected NDC (its own, and a
        /// known look-alike's): automation and false MATCH, and their curve over the
        /// confidence threshold.
        #[arg(long)]
        verify: bool,
        /// With --verify: also write every verification scan to this CSV file (file, expected,
        /// case own|lookalike|unknown, the lowest confidence threshold answering MATCH), the
        /// input of `python -m rxvision_trainer calibrate-match`.
        #[arg(long, value_name = "FILE", requires = "verify")]
        scans: Option<PathBuf>,
        /// The quality gate's blur limit (Laplacian variance of a pill's crop; default 12):
        /// to measure what the model reads in frames the gate refuses.
        #[arg(long, value_name = "VARIANCE")]
        min_sharpness: Option<f32>,
    },
    /// Verify, export or prune the encrypted audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Check configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Print the annotated default configuration.
    PrintDefaultConfig,
    /// List the V4L2 cameras of this machine, their stable names and formats (for `[camera] device`).
    Cameras {
        /// Print the list as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the appliance service: the local API over the camera, model and audit log.
    Run {
        /// The configuration file.
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a configuration file; every problem is reported with its key path.
    Check {
        /// The TOML file.
        file: PathBuf,
    },
}

/// Warnings and errors; wgpu's Vulkan layer chatter only when it is an error.
const DEFAULT_LOG_FILTER: &str = "warn,wgpu_hal=error,wgpu_core=error,naga=error";

fn main() -> ExitCode {
    rxvision_daemon::set_daemon_version(VERSION);
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RXVISION_LOG").unwrap_or_else(|_| DEFAULT_LOG_FILTER.into()),
        )
        .with_writer(std::io::stderr)
        .init();
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
    let result = match cli.command {
        Command::Classify { model, top, json, images } => commands::classify(&model, usize::from(top), json, &images),
        Command::Selftest { model, json } => commands::run_selftest(&model, json),
        Command::Eval { model, dataset, px_per_mm, formulary, json, mistakes, verify, scans, min_sharpness } => {
            let options = commands::EvalOptions { px_per_mm, formulary, json, verify, scans, min_sharpness };
            commands::run_eval(&model, &dataset, options, mistakes.as_deref())
        }
        Command::Audit { command } => return commands::audit(command),
        Command::Config { command: ConfigCommand::Check { file } } => {
            return match config::load(&file) {
                Ok(_) => {
                    println!("{}: ok", file.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("rxvisiond: {e}");
                    ExitCode::from(64)
                }
            };
        }
        Command::Run { config: path } => {
            let config = match config::load(&path) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("rxvisiond: {e}");
                    return ExitCode::from(64);
                }
            };
            launch_installed_release(&config);
            let release_store = rxvision_daemon::updates::release::store(&config.state_dir);
            return match rxvision_daemon::service::run(config, |addr| {
                use std::io::Write;
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "rxvisiond: listening on http://{addr}");
                let _ = out.flush();
            }) {
                Ok(rxvision_daemon::service::Stopped::Signal) => ExitCode::SUCCESS,
                Ok(rxvision_daemon::service::Stopped::Restart) => restart_self(),
                Err(e) => {
                    eprintln!("rxvisiond: {e}");
                    let code = e.exit_code();
                    if [64, 65, 66].contains(&code)
                        && rxvision_daemon::updates::release::running_on_trial(&release_store)
                    {
                        // A release on trial that cannot start must not stop systemd from
                        // restarting it: the launcher counts the restarts and goes back.
                        eprintln!("rxvisiond: this release is on trial: exiting to be restarted (and given up)");
                        return ExitCode::from(70);
                    }
                    ExitCode::from(code)
                }
            };
        }
        Command::PrintDefaultConfig => {
            print!("{}", config::DEFAULT_CONFIG);
            return ExitCode::SUCCESS;
        }
        Command::Cameras { json } => return commands::cameras(json),
    };
    result.unwrap_or_else(|e| {
        eprintln!("rxvisiond: {e}");
        ExitCode::from(e.exit_code())
    })
}

/// The launcher's step (see `updates::release`): runs an installed daemon
/// release newer than this binary in place of it; returns when this binary
/// runs the service itself.
fn launch_installed_release(config: &config::Config) {
    use rxvision_daemon::updates::release::{self, Launch};
    let store = release::store(&config.state_dir);
    let max_starts = config.updates.as_ref().map_or(3, |u| u.max_starts);
    if let Launch::Release(installed) = release::choose_at_start(&store, max_starts, VERSION) {
        tracing::info!(version = %installed.version, slot = installed.slot.dir_name(), "starting the installed daemon release");
        let error = release::exec(&store, &installed);
        eprintln!("rxvisiond: the installed release {} cannot start: {error}", installed.version);
        release::give_up_after_exec_failure(&store, VERSION, &error.to_string());
    }
}

/// Starts the service anew in this process (same arguments, same PID, so a
/// supervisor sees one service) through the launcher: after a model update
/// the new model loads through the ordinary start, after a daemon update
/// the launcher starts the new release; either start counts against the
/// trial. Files are opened close-on-exec, so the audit store's lock goes
/// with the old image.
fn restart_self() -> ExitCode {
    let error = rxvision_daemon::updates::release::restart();
    eprintln!("rxvisiond: cannot restart: {error}");
    // systemd (Restart=on-failure) starts it again.
    ExitCode::from(75)
}
