//! `rxfleet`: the RxVision fleet server's command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use rxvision_fleet::config::{self, FleetConfig, DEFAULT_CONFIG};
use rxvision_fleet::db::Db;
use rxvision_fleet::devices::{DeviceQuery, DeviceSort, Scope};
use rxvision_fleet::now_ms;
use rxvision_fleet::provision;
use rxvision_fleet::serve::{self, Parts};
use rxvision_fleet::tokens::Role;

#[derive(Parser)]
#[command(name = "rxfleet", version, about = "RxVision fleet server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `--config FILE` (default: the embedded defaults).
#[derive(clap::Args)]
struct ConfigArg {
    /// Configuration file (default: the embedded defaults).
    #[arg(long)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// Runs the fleet server: the managed broker (unless external), the
    /// ingest while this replica leads, the API, dashboard and metrics
    /// (until SIGINT/SIGTERM).
    Serve(ConfigArg),
    /// Runs only the ingest (while this replica leads), from an external
    /// broker, without HTTP.
    Ingest(ConfigArg),
    /// Runs the database migrations and exits.
    Migrate(ConfigArg),
    /// The device registry.
    Devices {
        #[command(subcommand)]
        command: DevicesCommand,
    },
    /// The fleet's CA for appliances' client certificates.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// An external Mosquitto's accounts.
    Broker {
        #[command(subcommand)]
        command: BrokerCommand,
    },
    /// API tokens.
    Tokens {
        #[command(subcommand)]
        command: TokensCommand,
    },
    /// Payloads the ingest refused, counted by device, channel and reason.
    Rejects {
        #[command(flatten)]
        config: ConfigArg,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Events: what the fleet raised (`audit_chain_rewritten` …) and every
    /// change with who made it.
    Events {
        #[command(flatten)]
        config: ConfigArg,
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
    /// Registers a device at a site and prints its credentials and the
    /// `[device]` and `[telemetry]` sections of its rxvisiond.toml.
    Add {
        #[command(flatten)]
        config: ConfigArg,
        /// Its site.
        #[arg(long)]
        site: String,
        /// Its id (default: the site and 8 random hex digits).
        #[arg(long)]
        id: Option<String>,
        /// Write rxvisiond-telemetry.toml and broker.password (0600) into
        /// this directory instead of printing the password.
        #[arg(long)]
        out: Option<PathBuf>,
        /// JSON (with the password) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Every device: registered, or heard from.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// Only this site.
        #[arg(long)]
        site: Option<String>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One device in full.
    Show {
        #[command(flatten)]
        config: ConfigArg,
        /// The device.
        id: String,
    },
    /// Registers many devices from a CSV file (header `site,device_id`; an
    /// empty id is made from the site): all of them or none. Each device's
    /// rxvisiond-telemetry.toml and credentials go to OUT/<device_id>/;
    /// prints device_id,site,config for each.
    Import {
        #[command(flatten)]
        config: ConfigArg,
        /// The CSV file.
        file: PathBuf,
        /// The directory for the devices' files.
        #[arg(long)]
        out: PathBuf,
    },
    /// Retires a device: its broker account stops working.
    Retire {
        #[command(flatten)]
        config: ConfigArg,
        /// The device.
        id: String,
    },
    /// What the ingest stored per device (windows, scans, events, losses).
    Stats {
        #[command(flatten)]
        config: ConfigArg,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Creates the CA in `[broker] ca_dir` (ca.key mode 0600, ca.crt).
    Init(ConfigArg),
}

#[derive(Subcommand)]
enum BrokerCommand {
    /// Writes a Mosquitto password file with every live device's account
    /// and the ingest's (for an external Mosquitto: reload it afterwards).
    Passwd {
        #[command(flatten)]
        config: ConfigArg,
        /// The password file to write (replaced atomically, mode 0600).
        #[arg(long)]
        out: PathBuf,
        /// The ingest account's password (first line), hashed into the file.
        #[arg(long)]
        ingest_password_file: PathBuf,
    },
}

#[derive(Subcommand)]
enum TokensCommand {
    /// Creates a token and prints it (the only time it is shown).
    Create {
        #[command(flatten)]
        config: ConfigArg,
        /// viewer, operator or admin.
        #[arg(long)]
        role: String,
        /// Its name (unique).
        #[arg(long)]
        name: String,
        /// What it may read: fleet (default), site:SITE or device:ID.
        #[arg(long, default_value = "fleet")]
        scope: String,
    },
    /// Every token (never the tokens themselves).
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Revokes a token: it stops working at once.
    Revoke {
        #[command(flatten)]
        config: ConfigArg,
        /// Its name.
        name: String,
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

fn load(arg: &ConfigArg) -> Result<FleetConfig, String> {
    config::load(arg.config.as_deref()).map_err(|e| e.to_string())
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

/// Who runs a command: recorded with every change it makes.
fn cli_actor() -> String {
    let user = std::env::var("SUDO_USER")
        .or_else(|_| std::env::var("USER"))
        .unwrap_or_else(|_| format!("uid{}", rustix::process::getuid().as_raw()));
    format!("cli:{user}")
}

fn age(ms: Option<i64>) -> String {
    match ms {
        None => "-".into(),
        Some(t) => {
            let s = (now_ms() - t).max(0) / 1000;
            if s < 120 {
                format!("{s}s ago")
            } else if s < 7200 {
                format!("{}m ago", s / 60)
            } else {
                format!("{}h ago", s / 3600)
            }
        }
    }
}

async fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Serve(arg) => {
            let config = load(&arg)?;
            serve::serve(config, Parts { http: true }, shutdown_signal()).await.map_err(|e| e.to_string())
        }
        Command::Ingest(arg) => {
            let config = load(&arg)?;
            if config.broker.managed.is_some() {
                return Err("rxfleet ingest reads an external broker (broker.mode = \"external\"); \
                            `rxfleet serve` runs the managed one"
                    .into());
            }
            serve::serve(config, Parts { http: false }, shutdown_signal()).await.map_err(|e| e.to_string())
        }
        Command::Migrate(arg) => {
            let db = open(&load(&arg)?).await?;
            let applied = db.applied_migrations().await.map_err(|e| e.to_string())?;
            println!("database {:?}: migrations applied {applied:?}", db.backend());
            Ok(())
        }
        Command::Devices { command } => devices(command).await,
        Command::Tokens { command } => tokens(command).await,
        Command::Ca { command: CaCommand::Init(arg) } => {
            let config = load(&arg)?;
            let dir = config.broker.ca_dir.ok_or("set [broker] ca_dir to the directory the CA goes to")?;
            let cert = rxvision_fleet::ca::init(&dir)?;
            println!("{}", cert.display());
            eprintln!("rxfleet: CA created; `devices add` now issues client certificates signed by it");
            Ok(())
        }
        Command::Broker { command: BrokerCommand::Passwd { config, out, ingest_password_file } } => {
            let config = load(&config)?;
            let db = open(&config).await?;
            let ingest = rxvision_fleet::config::Secret::File(ingest_password_file)
                .read()?
                .ok_or("the ingest password file is empty")?;
            let devices = db.broker_accounts().await.map_err(|e| e.to_string())?;
            let text = rxvision_fleet::broker::passwd_file(
                &config.broker.username,
                &rxvision_fleet::devices::hash_password(&ingest),
                &devices,
            );
            rxvision_fleet::broker::write_private(&out, &text).map_err(|e| e.to_string())?;
            println!("{}: {} device accounts and {}", out.display(), devices.len(), config.broker.username);
            Ok(())
        }
        Command::Rejects { config, json } => {
            let db = open(&load(&config)?).await?;
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
            let db = open(&load(&config)?).await?;
            let events = db.fleet_events(device.as_deref()).await.map_err(|e| e.to_string())?;
            if json {
                print_json(&events);
            } else {
                for e in events {
                    println!(
                        "{} {} {} {} {}",
                        e.time_ms,
                        e.device_id.unwrap_or_default(),
                        e.kind,
                        e.actor.unwrap_or_default(),
                        e.details
                    );
                }
            }
            Ok(())
        }
        Command::PrintDefaultConfig => {
            print!("{DEFAULT_CONFIG}");
            Ok(())
        }
        Command::Config { command: ConfigCommand::Check { config } } => {
            config::load(Some(&config)).map_err(|e| e.to_string())?;
            println!("{}: ok", config.display());
            Ok(())
        }
    }
}

async fn devices(command: DevicesCommand) -> Result<(), String> {
    match command {
        DevicesCommand::Add { config, site, id, out, json } => {
            let config = load(&config)?;
            let db = open(&config).await?;
            let registered = provision::register(&config, &db, id.as_deref(), &site, &cli_actor(), now_ms())
                .await
                .map_err(|e| e.to_string())?;
            let (device_id, password) = (&registered.device_id, &registered.password);
            if let Some(dir) = out {
                let config_path =
                    provision::write_files(&config, &dir, device_id, &site, password, registered.certificate.as_ref())
                        .map_err(|e| format!("device {device_id} is registered, but {}: {e}", dir.display()))?;
                println!("{device_id}");
                eprintln!(
                    "rxfleet: device {device_id} registered at site {site}; wrote {} and its credentials next to it",
                    config_path.display()
                );
            } else {
                let (cert, key) = provision::DEFAULT_CLIENT_FILES;
                let fragment = provision::appliance_config(
                    &config,
                    device_id,
                    &site,
                    std::path::Path::new(provision::DEFAULT_PASSWORD_FILE),
                    registered.certificate.as_ref().map(|_| (std::path::Path::new(cert), std::path::Path::new(key))),
                );
                if json {
                    print_json(&serde_json::json!({
                        "device_id": device_id, "site": site, "password": password, "config": fragment,
                        "client_certificate": registered.certificate.as_ref().map(|c| &c.cert_pem),
                        "client_key": registered.certificate.as_ref().map(|c| &c.key_pem),
                    }));
                } else {
                    print!("{fragment}");
                    eprintln!(
                        "rxfleet: device {device_id} registered at site {site}. Its broker password (shown only \
                         now) goes to {} on the appliance, mode 0600:\n{password}",
                        provision::DEFAULT_PASSWORD_FILE
                    );
                    if let Some(c) = &registered.certificate {
                        eprintln!(
                            "Its client certificate goes to {} and its key to {} (mode 0600):\n{}{}",
                            cert, key, c.cert_pem, c.key_pem
                        );
                    }
                }
            }
            Ok(())
        }
        DevicesCommand::List { config, site, json } => {
            let config = load(&config)?;
            let db = open(&config).await?;
            let query = DeviceQuery { site, sort: DeviceSort::Site, limit: 10_000, ..DeviceQuery::default() };
            let mut all = Vec::new();
            loop {
                let (page, total) = db
                    .device_page(
                        &Scope::Fleet,
                        &DeviceQuery { offset: all.len() as i64, ..query.clone() },
                        now_ms(),
                        config.attention,
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                let done = page.is_empty() || all.len() + page.len() >= total as usize;
                all.extend(page);
                if done {
                    break;
                }
            }
            if json {
                print_json(&all);
            } else {
                println!(
                    "{:<32} {:<20} {:<10} {:<10} {:<10} {:<5} {:>7}  ATTENTION",
                    "DEVICE", "SITE", "STATE", "LAST SEEN", "MODEL", "ENG", "BACKLOG"
                );
                for d in all {
                    let attention: Vec<String> = d
                        .attention
                        .iter()
                        .map(|a| serde_json::to_value(a).unwrap().as_str().unwrap_or("").to_string())
                        .collect();
                    println!(
                        "{:<32} {:<20} {:<10} {:<10} {:<10} {:<5} {:>7}  {}",
                        d.device_id,
                        d.site.unwrap_or_else(|| "-".into()),
                        serde_json::to_value(d.state).unwrap().as_str().unwrap_or(""),
                        age(d.last_seen_ms),
                        d.model_version.unwrap_or_else(|| "-".into()),
                        d.engine.unwrap_or_else(|| "-".into()),
                        d.outbox_depth.map_or("-".into(), |n| n.to_string()),
                        attention.join(",")
                    );
                }
            }
            Ok(())
        }
        DevicesCommand::Show { config, id } => {
            let config = load(&config)?;
            let db = open(&config).await?;
            let device = db
                .device(&id, now_ms(), config.attention)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("no device {id:?}"))?;
            print_json(&device);
            Ok(())
        }
        DevicesCommand::Import { config, file, out } => {
            let config = load(&config)?;
            let text = std::fs::read_to_string(&file).map_err(|e| format!("{}: {e}", file.display()))?;
            let rows = provision::parse_import(&text).map_err(|e| format!("{}:\n{e}", file.display()))?;
            let db = open(&config).await?;
            let imported = provision::import(&config, &db, &rows, &out, &cli_actor(), now_ms()).await?;
            println!("device_id,site,config");
            for device in &imported {
                println!("{},{},{}", device.device_id, device.site, device.config_path.display());
            }
            eprintln!(
                "rxfleet: {} devices registered; their configuration and credentials are under {}",
                imported.len(),
                out.display()
            );
            Ok(())
        }
        DevicesCommand::Retire { config, id } => {
            let db = open(&load(&config)?).await?;
            db.retire_device(&id, &cli_actor(), now_ms()).await.map_err(|e| e.to_string())?;
            println!("device {id} retired: its broker account goes at the broker's next reload (within seconds)");
            Ok(())
        }
        DevicesCommand::Stats { config, json } => {
            let db = open(&load(&config)?).await?;
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
    }
}

async fn tokens(command: TokensCommand) -> Result<(), String> {
    match command {
        TokensCommand::Create { config, role, name, scope } => {
            let db = open(&load(&config)?).await?;
            let role = Role::parse(&role)?;
            let scope = Scope::parse(&scope)?;
            let (info, token) =
                db.create_token(&name, role, &scope, &cli_actor(), now_ms()).await.map_err(|e| e.to_string())?;
            println!("{token}");
            eprintln!(
                "rxfleet: token {:?} ({}, {}) created; it is shown only now. Send it as `Authorization: Bearer TOKEN`.",
                info.name,
                info.role.as_str(),
                info.scope
            );
            Ok(())
        }
        TokensCommand::List { config, json } => {
            let db = open(&load(&config)?).await?;
            let tokens = db.tokens().await.map_err(|e| e.to_string())?;
            if json {
                print_json(&tokens);
            } else {
                println!("{:<24} {:<9} {:<24} {:<12} CREATED BY", "NAME", "ROLE", "SCOPE", "STATE");
                for t in tokens {
                    let state = if t.revoked_ms.is_some() { "revoked" } else { "active" };
                    println!("{:<24} {:<9} {:<24} {:<12} {}", t.name, t.role.as_str(), t.scope, state, t.created_by);
                }
            }
            Ok(())
        }
        TokensCommand::Revoke { config, name } => {
            let db = open(&load(&config)?).await?;
            db.revoke_token(&name, &cli_actor(), now_ms()).await.map_err(|e| e.to_string())?;
            println!("token {name} revoked");
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
