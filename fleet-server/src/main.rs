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
    /// The TUF repository's signing keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// The model registry.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Held-out datasets for the validation gates.
    Datasets {
        #[command(subcommand)]
        command: DatasetsCommand,
    },
    /// Staged rollouts of model versions.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// Daemon releases (rxvisiond binaries) and their staged deployment.
    Releases {
        #[command(subcommand)]
        command: ReleasesCommand,
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
    /// change with who made it; with `--device`, also what the device itself
    /// reported (`model_installed` …, actor `device`).
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
enum KeysCommand {
    /// Creates the TUF repository: root keys and `root.json` in DIR (keep
    /// them offline; appliances and clients pin `root.json`), the online
    /// keys in `[updates] keys_dir`, and the first root in the database.
    Init {
        #[command(flatten)]
        config: ConfigArg,
        /// Where the root keys and root.json go (must not hold root keys yet).
        #[arg(long)]
        dir: PathBuf,
        /// How many root keys to make.
        #[arg(long, default_value_t = 3)]
        root_keys: usize,
        /// How many root keys must sign a new root.
        #[arg(long, default_value_t = 2)]
        threshold: u64,
        /// How long the root is valid, in days (rotate before).
        #[arg(long, default_value_t = 365)]
        root_expires_days: u64,
    },
    /// Replaces the root keys: the current ones (at least their threshold,
    /// the *.pem in DIR) and new ones made in NEW_DIR sign the next root.
    RotateRoot {
        #[command(flatten)]
        config: ConfigArg,
        /// The current root keys.
        #[arg(long)]
        dir: PathBuf,
        /// Where the new root keys and root.json go.
        #[arg(long)]
        new_dir: PathBuf,
        /// How many new root keys to make.
        #[arg(long, default_value_t = 3)]
        root_keys: usize,
        /// How many of them must sign a new root.
        #[arg(long, default_value_t = 2)]
        threshold: u64,
        /// How long the new root is valid, in days.
        #[arg(long, default_value_t = 365)]
        root_expires_days: u64,
    },
    /// Replaces online keys (all, or the roles named): a new root signed by
    /// the root keys in DIR lists them; the leader re-signs with them.
    RotateOnline {
        #[command(flatten)]
        config: ConfigArg,
        /// The root keys (at least their threshold); root.json is rewritten here.
        #[arg(long)]
        dir: PathBuf,
        /// targets, snapshot or timestamp (repeatable; default: all three).
        #[arg(long)]
        role: Vec<String>,
        /// How long the new root is valid, in days.
        #[arg(long, default_value_t = 365)]
        root_expires_days: u64,
    },
    /// Every role's newest version and expiry.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// JSON instead of lines.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DatasetsCommand {
    /// Registers a dataset (labels.csv with file and ndc, and
    /// lookalike_group and face when known; the images): checked,
    /// content-hashed and copied into `[gates] datasets_dir`.
    Add {
        #[command(flatten)]
        config: ConfigArg,
        /// The dataset directory.
        dir: PathBuf,
        /// Its name (default: the directory's).
        #[arg(long)]
        name: Option<String>,
        /// The camera scale the images were taken at (9 for rxvision-synth
        /// frames): the gates then weigh by measured size, as appliances with
        /// `[camera] px_per_mm` do.
        #[arg(long)]
        px_per_mm: Option<f32>,
    },
    /// Every registered dataset.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ReleasesCommand {
    /// Checks an rxvisiond binary (a whole 64-bit ELF executable for
    /// x86_64 or aarch64) and stores it as an available release.
    Push {
        #[command(flatten)]
        config: ConfigArg,
        /// The binary.
        file: PathBuf,
        /// Its version (what `rxvisiond --version` prints; appliances check).
        #[arg(long)]
        version: String,
        /// Declare it the release the fleet already runs (only while no
        /// production release of its architecture is registered).
        #[arg(long)]
        production: bool,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Deploys a release to a share of the devices (a stage only grows; at
    /// 100 % it becomes production). A device of the stage that refuses it
    /// or crash-loops on it halts the deployment by itself.
    Deploy {
        #[command(flatten)]
        config: ConfigArg,
        /// The version.
        version: String,
        /// The share of devices, by cohort bucket.
        #[arg(long)]
        percent: u32,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Halts a deploying release: its stage's devices are ordered back to production.
    Halt {
        #[command(flatten)]
        config: ConfigArg,
        /// The version.
        version: String,
        /// Why (stored and shown).
        #[arg(long, default_value = "halted by an admin")]
        reason: String,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Every release with its state.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Checks a bundle (directory or .tar.gz: structure, hashes, graph, the
    /// security scan), stores it as a candidate, and runs the validation
    /// gates on the newest registered dataset.
    Push {
        #[command(flatten)]
        config: ConfigArg,
        /// The bundle.
        bundle: PathBuf,
        /// Declare it the version the fleet already runs (only while the
        /// registry has no production version).
        #[arg(long)]
        production: bool,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Runs the validation gates for a version (again): validated or rejected.
    Validate {
        #[command(flatten)]
        config: ConfigArg,
        /// The version or alias.
        version: String,
        /// The dataset's name or hash (default: the newest registered).
        #[arg(long)]
        dataset: Option<String>,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Every version with its state and aliases.
    List {
        #[command(flatten)]
        config: ConfigArg,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One version (or alias: production, previous) in full.
    Show {
        #[command(flatten)]
        config: ConfigArg,
        /// The version or alias.
        version: String,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// `--id N` (default: the active rollout) and `--json`.
#[derive(clap::Args)]
struct RolloutArg {
    #[command(flatten)]
    config: ConfigArg,
    /// The rollout (default: the active one).
    #[arg(long)]
    id: Option<i64>,
    /// JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// Starts rolling a validated version out in place of production,
    /// stage by stage (default 1 % → 10 % → 50 % → 100 %).
    Start {
        #[command(flatten)]
        config: ConfigArg,
        /// The model version.
        version: String,
        /// A plan (TOML: stages, soak_minutes, … see docs); default: the defaults.
        #[arg(long)]
        plan: Option<PathBuf>,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The rollout's state, stage, and its latest decisions with their numbers.
    Status(RolloutArg),
    /// Stops where it is (devices keep what they run).
    Pause(RolloutArg),
    /// Goes on from a pause; the stage's evidence starts afresh.
    Resume(RolloutArg),
    /// Lets the last stage (100 %) go.
    Approve(RolloutArg),
    /// Stops it and orders its devices back to production.
    Abort(RolloutArg),
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
        Command::Keys { command } => keys(command).await,
        Command::Datasets { command } => datasets(command).await,
        Command::Rollout { command } => rollout(command).await,
        Command::Models { command } => models(command).await,
        Command::Releases { command } => releases(command).await,
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
            let mut events = db.fleet_events(device.as_deref()).await.map_err(|e| e.to_string())?;
            if let Some(device) = &device {
                // What the device itself reported, in time order with the fleet's.
                events.extend(db.device_events(device, 1000).await.map_err(|e| e.to_string())?);
                events.sort_by_key(|e| e.time_ms);
            }
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

fn days(n: u64) -> std::time::Duration {
    std::time::Duration::from_secs(n.saturating_mul(86_400))
}

fn print_root(summary: &rxvision_fleet::updates::repo::RootSummary) {
    println!(
        "root version {} ({} of {} root keys sign the next root), expires {}",
        summary.version,
        summary.threshold,
        summary.root_key_ids.len(),
        iso(summary.expires_ms)
    );
    println!("pin on appliances and clients: {}", summary.root_json);
}

fn iso(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map(|t| t.to_string()).unwrap_or_else(|_| ms.to_string())
}

async fn keys(command: KeysCommand) -> Result<(), String> {
    use rxvision_fleet::updates::keys::{read_keys_in, OnlineRole, ONLINE_ROLES};
    match command {
        KeysCommand::Init { config, dir, root_keys, threshold, root_expires_days } => {
            let config = load(&config)?;
            let db = open(&config).await?;
            let summary = db
                .init_repository(
                    &dir,
                    root_keys,
                    threshold,
                    days(root_expires_days),
                    &config.updates.keys_dir,
                    &cli_actor(),
                    now_ms(),
                )
                .await
                .map_err(|e| e.to_string())?;
            print_root(&summary);
            eprintln!(
                "rxfleet: root keys in {}: move them offline; online keys in {}",
                dir.display(),
                config.updates.keys_dir.display()
            );
            Ok(())
        }
        KeysCommand::RotateRoot { config, dir, new_dir, root_keys, threshold, root_expires_days } => {
            let config = load(&config)?;
            let db = open(&config).await?;
            let current = read_keys_in(&dir).map_err(|e| e.to_string())?;
            if new_dir.join("root-1.pem").exists() {
                return Err(format!("{} already holds root keys", new_dir.display()));
            }
            let new =
                rxvision_fleet::updates::keys::generate_root_keys(&new_dir, root_keys).map_err(|e| e.to_string())?;
            let summary = db
                .rotate_root_keys(
                    &current,
                    &new,
                    threshold,
                    days(root_expires_days),
                    &new_dir,
                    &config.updates.keys_dir,
                    &cli_actor(),
                    now_ms(),
                )
                .await;
            match summary {
                Ok(summary) => {
                    print_root(&summary);
                    eprintln!("rxfleet: the old root keys in {} can now be destroyed", dir.display());
                    Ok(())
                }
                Err(e) => {
                    // Nothing was signed: the new keys are of no use.
                    for key in &new {
                        let _ = std::fs::remove_file(key.path());
                    }
                    Err(e.to_string())
                }
            }
        }
        KeysCommand::RotateOnline { config, dir, role, root_expires_days } => {
            let config = load(&config)?;
            let db = open(&config).await?;
            let roles = if role.is_empty() {
                ONLINE_ROLES.to_vec()
            } else {
                role.iter()
                    .map(|r| {
                        OnlineRole::parse(r).ok_or_else(|| format!("--role {r:?}: targets, snapshot or timestamp"))
                    })
                    .collect::<Result<Vec<_>, _>>()?
            };
            let root_keys = read_keys_in(&dir).map_err(|e| e.to_string())?;
            let summary = db
                .rotate_online_keys(
                    &root_keys,
                    &roles,
                    days(root_expires_days),
                    &dir,
                    &config.updates.keys_dir,
                    &cli_actor(),
                    now_ms(),
                )
                .await
                .map_err(|e| e.to_string())?;
            print_root(&summary);
            Ok(())
        }
        KeysCommand::Status { config, json } => {
            let db = open(&load(&config)?).await?;
            let status = db.tuf_status().await.map_err(|e| e.to_string())?;
            if status.is_empty() {
                return Err("no TUF repository yet: `rxfleet keys init --dir DIR`".into());
            }
            if json {
                let value: serde_json::Map<String, serde_json::Value> = status
                    .iter()
                    .map(|(role, (version, expires))| {
                        (role.clone(), serde_json::json!({"version": version, "expires_ms": expires}))
                    })
                    .collect();
                print_json(&value);
            } else {
                for (role, (version, expires)) in status {
                    println!("{role:<9} version {version:<6} expires {}", iso(expires));
                }
            }
            Ok(())
        }
    }
}

async fn releases(command: ReleasesCommand) -> Result<(), String> {
    use rxvision_fleet::releases::DaemonRelease;
    let print = |releases: &[DaemonRelease], json: bool| {
        if json {
            return print_json(&releases);
        }
        for r in releases {
            let stage = if r.state == rxvision_fleet::releases::ReleaseState::Deploying {
                format!(" at {} %", r.percent)
            } else {
                String::new()
            };
            println!("rxvisiond {} {} [{}{stage}]", r.version, r.arch, r.state.as_str());
            println!("  {}", r.state_reason);
            println!("  target {} sha256 {} ({} bytes)", r.target, r.sha256, r.length);
        }
    };
    match command {
        ReleasesCommand::Push { config, file, version, production, json } => {
            let config = load(&config)?;
            let db = open(&config).await?;
            let release = db
                .push_release(&file, &version, &config.updates.artifacts_dir, production, &cli_actor(), now_ms())
                .await
                .map_err(|e| e.to_string())?;
            print(&[release], json);
        }
        ReleasesCommand::Deploy { config, version, percent, json } => {
            let db = open(&load(&config)?).await?;
            let releases =
                db.deploy_release(&version, percent, &cli_actor(), now_ms()).await.map_err(|e| e.to_string())?;
            print(&releases, json);
        }
        ReleasesCommand::Halt { config, version, reason, json } => {
            let db = open(&load(&config)?).await?;
            let reason = format!("{reason} ({})", cli_actor());
            let releases = db.halt_release(&version, &reason, now_ms()).await.map_err(|e| e.to_string())?;
            print(&releases, json);
        }
        ReleasesCommand::List { config, json } => {
            let db = open(&load(&config)?).await?;
            print(&db.releases().await.map_err(|e| e.to_string())?, json);
        }
    }
    Ok(())
}

async fn models(command: ModelsCommand) -> Result<(), String> {
    use rxvision_fleet::registry::{ModelVersion, Pushed};
    let show = |m: &ModelVersion| {
        println!(
            "{} {} [{}]{}",
            m.name,
            m.version,
            m.state.as_str(),
            if m.aliases.is_empty() { String::new() } else { format!(" ({})", m.aliases.join(", ")) }
        );
        println!("  {}", m.state_reason);
        println!("  target {} sha256 {} ({} bytes)", m.target, m.sha256, m.length);
        println!(
            "  scan: {} nodes, {} parameters, opset {}, ops {:?}",
            m.scan.nodes, m.scan.parameters, m.scan.opset, m.scan.ops
        );
        if let Some(gates) = &m.gate_report {
            println!("  gates: {gates}");
        }
    };
    match command {
        ModelsCommand::Push { config, bundle, production, json } => {
            let config = load(&config)?;
            let db = open(&config).await?;
            let pushed = db
                .push_model(&bundle, &config.updates.artifacts_dir, production, &cli_actor(), now_ms())
                .await
                .map_err(|e| e.to_string())?;
            let (Pushed::Stored(model) | Pushed::AlreadyStored(model)) = &pushed;
            let gates = if db.dataset(None).await.map_err(|e| e.to_string())?.is_some() && model.gate_report.is_none() {
                Some(
                    db.validate_model(&model.version, None, &config, &cli_actor(), now_ms())
                        .await
                        .map_err(|e| e.to_string())?,
                )
            } else {
                None
            };
            if json {
                print_json(&serde_json::json!({"pushed": pushed, "gates": gates}));
            } else {
                match &pushed {
                    Pushed::Stored(m) => {
                        println!("stored:");
                        show(m);
                    }
                    Pushed::AlreadyStored(m) => {
                        println!("already registered (same bytes):");
                        show(m);
                    }
                }
                match &gates {
                    Some(report) => print_gates(report),
                    None if model.gate_report.is_none() => {
                        eprintln!("rxfleet: no held-out dataset registered: `rxfleet datasets add DIR`, then `rxfleet models validate {}`", model.version)
                    }
                    None => {}
                }
            }
            Ok(())
        }
        ModelsCommand::Validate { config, version, dataset, json } => {
            let config = load(&config)?;
            let db = open(&config).await?;
            let report = db
                .validate_model(&version, dataset.as_deref(), &config, &cli_actor(), now_ms())
                .await
                .map_err(|e| e.to_string())?;
            if json {
                print_json(&report);
            } else {
                print_gates(&report);
            }
            if report.passed {
                Ok(())
            } else {
                Err(format!("{} failed its gates", report.version))
            }
        }
        ModelsCommand::List { config, json } => {
            let db = open(&load(&config)?).await?;
            let models = db.models().await.map_err(|e| e.to_string())?;
            if json {
                print_json(&models);
            } else {
                println!("{:<12} {:<10} {:<12} {:<20} PUSHED", "VERSION", "NAME", "STATE", "ALIASES");
                for m in models {
                    println!(
                        "{:<12} {:<10} {:<12} {:<20} {}",
                        m.version,
                        m.name,
                        m.state.as_str(),
                        m.aliases.join(","),
                        age(Some(m.pushed_ms))
                    );
                }
            }
            Ok(())
        }
        ModelsCommand::Show { config, version, json } => {
            let db = open(&load(&config)?).await?;
            let model = db
                .model(&version)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("no model version or alias {version:?}"))?;
            if json {
                print_json(&model);
            } else {
                show(&model);
            }
            Ok(())
        }
    }
}

async fn which_rollout(db: &Db, id: Option<i64>) -> Result<rxvision_fleet::rollout::store::Rollout, String> {
    match id {
        Some(id) => db.rollout(id).await.map_err(|e| e.to_string())?.ok_or_else(|| format!("no rollout {id}")),
        None => db
            .active_rollout()
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "no active rollout (name one with --id)".to_string()),
    }
}

fn print_rollout(r: &rxvision_fleet::rollout::store::Rollout) {
    println!(
        "rollout {}: {} replacing {}: {} at {} % (stages {:?})",
        r.id,
        r.model_version,
        r.previous_version,
        serde_json::to_value(&r.state)
            .ok()
            .and_then(|v| v.get("state").and_then(|s| s.as_str()).map(str::to_string))
            .unwrap_or_default(),
        r.percent,
        r.plan.stages
    );
    println!("  state: {}", serde_json::to_string(&r.state).unwrap_or_default());
    println!("  started by {} {}", r.created_by, age(Some(r.created_ms)));
}

async fn rollout(command: RolloutCommand) -> Result<(), String> {
    use rxvision_fleet::rollout::stage::Plan;
    use rxvision_fleet::rollout::store::AdminCommand;
    let (arg, command) = match command {
        RolloutCommand::Start { config, version, plan, json } => {
            let db = open(&load(&config)?).await?;
            let plan = match plan {
                Some(path) => {
                    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
                    Plan::parse(&text, &path.display().to_string())?
                }
                None => Plan::default(),
            };
            let started =
                db.start_model_rollout(&version, &plan, &cli_actor(), now_ms()).await.map_err(|e| e.to_string())?;
            if json {
                print_json(&started);
            } else {
                print_rollout(&started);
            }
            return Ok(());
        }
        RolloutCommand::Status(arg) => (arg, None),
        RolloutCommand::Pause(arg) => (arg, Some(AdminCommand::Pause)),
        RolloutCommand::Resume(arg) => (arg, Some(AdminCommand::Resume)),
        RolloutCommand::Approve(arg) => (arg, Some(AdminCommand::Approve)),
        RolloutCommand::Abort(arg) => (arg, Some(AdminCommand::Abort)),
    };
    let db = open(&load(&arg.config)?).await?;
    let current = which_rollout(&db, arg.id).await?;
    let rollout = match command {
        Some(command) => {
            db.command_rollout(current.id, command, &cli_actor(), now_ms()).await.map_err(|e| e.to_string())?
        }
        None => current,
    };
    let decisions = db.rollout_decisions(rollout.id, 20).await.map_err(|e| e.to_string())?;
    if arg.json {
        print_json(&serde_json::json!({"rollout": rollout, "decisions": decisions}));
    } else {
        print_rollout(&rollout);
        for d in decisions.iter().take(5) {
            println!("  {}", serde_json::to_string(d).unwrap_or_default());
        }
    }
    Ok(())
}

fn print_gates(report: &rxvision_fleet::gates::GateReport) {
    let m = &report.measures;
    println!(
        "gates for {} on dataset {} ({} images, {}), engine {}: {}",
        report.version,
        report.dataset_name,
        m.images,
        &report.dataset_hash[..12.min(report.dataset_hash.len())],
        m.engine,
        if report.passed { "PASSED" } else { "FAILED" }
    );
    for gate in &report.gates {
        println!("  {} {:<36} {}", if gate.passed { "ok  " } else { "FAIL" }, gate.name, gate.detail);
    }
}

async fn datasets(command: DatasetsCommand) -> Result<(), String> {
    match command {
        DatasetsCommand::Add { config, dir, name, px_per_mm } => {
            let config = load(&config)?;
            let db = open(&config).await?;
            let d = db
                .add_dataset(&dir, name.as_deref(), px_per_mm, &config.gates.datasets_dir, &cli_actor(), now_ms())
                .await
                .map_err(|e| e.to_string())?;
            println!("dataset {} ({}): {} images of {} products", d.name, d.hash, d.images, d.products);
            Ok(())
        }
        DatasetsCommand::List { config, json } => {
            let db = open(&load(&config)?).await?;
            let all = db.datasets().await.map_err(|e| e.to_string())?;
            if json {
                print_json(&all);
            } else {
                println!("{:<20} {:<14} {:>7} {:>8} {:>9} ADDED", "NAME", "HASH", "IMAGES", "PRODUCTS", "PX/MM");
                for d in all {
                    println!(
                        "{:<20} {:<14} {:>7} {:>8} {:>9} {}",
                        d.name,
                        &d.hash[..12],
                        d.images,
                        d.products,
                        d.px_per_mm.map(|p| p.to_string()).unwrap_or_else(|| "-".into()),
                        age(Some(d.added_ms))
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
