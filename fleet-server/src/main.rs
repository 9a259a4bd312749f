//! `rxfleet`: the RxVision fleet server's command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use rxvision_fleet::config::{self, FleetConfig, DEFAULT_CONFIG};
use rxvision_fleet::db::Db;
use rxvision_fleet::ingest::{self, IngestStats};

#[derive(Parser)]
#[command(name = "rxfleet", version, about = "RxVision fleet server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Reads every appliance's status, telemetry and events from the broker
    /// into the database and acknowledges them (runs until SIGINT/SIGTERM).
    Ingest {
        /// Configuration file (default: the embedded defaults).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Runs the database migrations and exits.
    Migrate {
        /// Configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Devices the fleet has heard from.
    Devices {
        #[command(subcommand)]
        command: DevicesCommand,
    },
    /// Payloads the ingest refused, counted by device, channel and reason.
    Rejects {
        /// Configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Events the fleet raised (`audit_chain_rewritten` …).
    Events {
        /// Configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Only this device's.
        #[arg(long)]
        device: Option<String>,
        /// JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Prints the annotated default configuration.
    PrintDefaultConfig,
    /// Configuration files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
}

#[derive(Subcommand)]
enum DevicesCommand {
    /// Every device with its counts.
    List {
        /// Configuration file.
        #[arg(long)]
        config: Option<PathBuf>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Checks a configuration file and says what is wrong with it.
    Check {
        /// The file.
        #[arg(long)]
        config: PathBuf,
    },
}

fn load(path: Option<&PathBuf>) -> Result<FleetConfig, String> {
    config::load(path.map(PathBuf::as_path)).map_err(|e| e.to_string())
}

async fn open(config: &FleetConfig) -> Result<Db, String> {
    Db::open(&config.database).await.map_err(|e| e.to_string())
}

async fn shutdown_signal() {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("a SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn print_json(value: &impl serde::Serialize) {
    println!("{}", serde_json::to_string_pretty(value).expect("serialisable"));
}

async fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Ingest { config } => {
            let config = load(config.as_ref())?;
            let db = open(&config).await?;
            eprintln!(
                "rxfleet ingest: database {:?}, broker {}://{}:{} as {}",
                db.backend(),
                if config.broker.tls { "mqtts" } else { "mqtt" },
                config.broker.host,
                config.broker.port,
                config.broker.username
            );
            let stats = Arc::new(IngestStats::default());
            ingest::run(config, db.clone(), stats, shutdown_signal()).await.map_err(|e| e.to_string())?;
            db.close().await;
            Ok(())
        }
        Command::Migrate { config } => {
            let db = open(&load(config.as_ref())?).await?;
            let applied = db.applied_migrations().await.map_err(|e| e.to_string())?;
            println!("database {:?}: migrations applied {applied:?}", db.backend());
            Ok(())
        }
        Command::Devices { command: DevicesCommand::List { config, json } } => {
            let db = open(&load(config.as_ref())?).await?;
            let devices = db.devices().await.map_err(|e| e.to_string())?;
            if json {
                print_json(&devices);
            } else {
                println!(
                    "{:<32} {:>7} {:>10} {:>8} {:>10} {:>7} {:>9}",
                    "DEVICE", "ONLINE", "ACKED_SEQ", "WINDOWS", "SCANS", "EVENTS", "REWRITES"
                );
                for d in devices {
                    println!(
                        "{:<32} {:>7} {:>10} {:>8} {:>10} {:>7} {:>9}",
                        d.device_id, d.online, d.acked_seq, d.windows, d.scans, d.events, d.chain_rewrites
                    );
                }
            }
            Ok(())
        }
        Command::Rejects { config, json } => {
            let db = open(&load(config.as_ref())?).await?;
            let rejects = db.rejects().await.map_err(|e| e.to_string())?;
            if json {
                print_json(&rejects);
            } else {
                for r in rejects {
                    println!("{} {} {} x{}: {}", r.device_id, r.channel, r.reason, r.count, r.last_error);
                }
            }
            Ok(())
        }
        Command::Events { config, device, json } => {
            let db = open(&load(config.as_ref())?).await?;
            let events = db.fleet_events(device.as_deref()).await.map_err(|e| e.to_string())?;
            if json {
                print_json(&events);
            } else {
                for e in events {
                    println!("{} {} {} {}", e.time_ms, e.device_id.unwrap_or_default(), e.kind, e.details);
                }
            }
            Ok(())
        }
        Command::PrintDefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            Ok(())
        }
        Command::Config { command: ConfigCommand::Check { config } } => {
            load(Some(&config))?;
            println!("{}: ok", config.display());
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime starts");
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rxfleet: {e}");
            ExitCode::FAILURE
        }
    }
}
