//! The `ketenbus` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use ketenbus::bus::Bus;
use ketenbus::bus::embedded::EmbeddedBus;
use ketenbus::bus::kafka::KafkaBus;
use ketenbus::config::{Config, Engine, Settings};
use ketenbus::dlq::{self, Selection};
use ketenbus_schemas::Format;
use tokio_util::sync::CancellationToken;

// mimalloc: the normalisers build many small strings per message, and glibc malloc/free were
// the largest item in profiles of both the EDIFACT mapping and the whole pipeline.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// ketenbus: a message broker for Dutch care-chain exchanges.
///
/// Takes in EDIFACT, secure mail and FHIR, normalises every message into zib-based events on
/// topics (an embedded durable log, or Kafka), and delivers them to subscribers with retries,
/// dead letters and proof of delivery. Without a config file it runs on the embedded log in
/// ./data with HTTP on 127.0.0.1:8080.
#[derive(Parser)]
#[command(name = "ketenbus", version, about, long_about)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Human, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    /// Readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the broker until SIGINT or SIGTERM.
    Run {
        /// Configuration file (TOML); see ops/ketenbus.example.toml. Without it, defaults apply.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file and print every problem with its key path.
    CheckConfig {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// A terminal summary of a running broker: components, inflow, deliveries, failures,
    /// lag and the oldest undelivered record per subscription.
    Status {
        /// Base URL of the broker's HTTP API.
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        url: String,
    },
    /// Print a file as ketenbus reads it (parsed message and the events it makes) as JSON,
    /// without touching the log. Exits non-zero with the error position when it does not parse.
    Inspect {
        /// The file (EDIFACT, FHIR JSON/XML, or an .eml mail message).
        file: PathBuf,
        /// Format, when detection from the first bytes is not enough.
        #[arg(long, value_parser = ["edifact", "fhir_json", "fhir_xml", "rfc822"])]
        format: Option<String>,
    },
    /// Dead letters: list, replay and purge. Dead letters are kept until purged (retention
    /// never removes them). With `[[operators]]` configured, needs an operator token in
    /// KETENBUS_OPERATOR_TOKEN.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Bearer tokens for `[[senders]]` and `[[operators]]`.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Consent registry helpers.
    Consent {
        #[command(subcommand)]
        command: ConsentCommand,
    },
    /// The audit trail (data_dir/audit.jsonl): verify its hash chain, export records. With
    /// `[[operators]]` configured, needs an operator token in KETENBUS_OPERATOR_TOKEN.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Subcommand)]
enum ConsentCommand {
    /// Print the patient pseudonym (patient key) of a BSN, the value the consent file's
    /// `patient` column holds. Reads the patient-key secret like `ketenbus run` does.
    Pseudonym {
        /// Configuration file (TOML) naming the data directory and key secret.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The BSN.
        #[arg(long)]
        bsn: String,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check the keyed hash chain with the audit key (`[audit] key_env` / `key_file`, as
    /// `run` reads it); names the first broken record and exits non-zero.
    Verify {
        /// Configuration file (TOML) naming the data directory.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Write records at or after --since as JSON lines to standard output.
    Export {
        /// Configuration file (TOML) naming the data directory.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// RFC 3339 time, e.g. 2026-11-24T08:00:00Z.
        #[arg(long)]
        since: String,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a random token: prints the token (give it to the client, once) and the
    /// `token_sha256` line for the config.
    New,
    /// Print the `token_sha256` of a token read from standard input.
    Hash,
}

/// When `[[operators]]` are configured, the operator whose token is in
/// KETENBUS_OPERATOR_TOKEN, or an error; `None` when none are configured.
fn operator(settings: &Settings) -> anyhow::Result<Option<String>> {
    let auth =
        ketenbus::auth::Authenticator::new(&settings.config.senders, &settings.config.operators);
    let token = std::env::var("KETENBUS_OPERATOR_TOKEN").ok();
    auth.operator_token(token.as_deref())
        .map(|p| p.map(|p| p.name.clone()))
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// The audit key as the configuration names it (also when `[audit] enabled = false`, to
/// check an older trail).
fn audit_key(settings: &Settings) -> anyhow::Result<ketenbus::audit::AuditKey> {
    let cfg = &settings.config;
    cfg.audit
        .key(&cfg.data_dir, &env_var)
        .map_err(|(k, m)| anyhow::anyhow!("audit.{k}: {m}"))
}

/// The operator running a `dlq` command (checked against the configured operators) as the
/// audit trail names it, and the trail its records go to (none when the audit is off).
fn operator_audit(settings: &Settings) -> anyhow::Result<(Option<ketenbus::audit::Audit>, String)> {
    let operator = operator(settings)?;
    let audit = if settings.config.audit.enabled {
        Some(
            ketenbus::audit::Audit::open(&settings.config.data_dir, audit_key(settings)?)
                .context("opening the audit trail")?,
        )
    } else {
        None
    };
    let actor = operator.map_or_else(|| "anonymous".to_owned(), |o| format!("operator:{o}"));
    Ok((audit, actor))
}

/// Which dead letters a `dlq` command works on.
#[derive(clap::Args)]
struct DlqSelection {
    /// Configuration file (TOML) naming the log.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Subscription name (`router` for messages that could not be normalised: list only).
    #[arg(long)]
    subscription: String,
    /// Only these dead-letter, record or message ids.
    #[arg(long = "id")]
    ids: Vec<String>,
    /// Only dead letters since this time (RFC 3339, e.g. 2026-11-24T08:00:00Z).
    #[arg(long)]
    since: Option<String>,
}

impl DlqSelection {
    /// The validated settings, the subscription and the selection.
    fn resolve(self) -> anyhow::Result<(Settings, String, Selection)> {
        let settings = load(self.config.as_deref())?;
        let sel = Selection {
            ids: self.ids,
            since_ms: parse_since(self.since.as_deref())?,
            before_ms: None,
        };
        Ok((settings, self.subscription, sel))
    }
}

#[derive(Subcommand)]
enum DlqCommand {
    /// List dead letters of a subscription (or `router`) as JSON lines.
    List(#[command(flatten)] DlqSelection),
    /// Deliver dead letters of a subscription again (to that subscription only).
    Replay {
        #[command(flatten)]
        selection: DlqSelection,
        /// Replay every dead letter of the subscription (required when no --id or --since is given).
        #[arg(long)]
        all: bool,
    },
    /// Remove dead letters of a subscription (or `router`) from the log for good, writing an
    /// audit record (`dlq_purge`) for each first.
    Purge {
        #[command(flatten)]
        selection: DlqSelection,
        /// Only dead letters from before this time (RFC 3339, e.g. 2026-11-24T08:00:00Z).
        #[arg(long)]
        before: Option<String>,
        /// Purge every dead letter of the subscription (required when no --id or --before is given).
        #[arg(long)]
        all: bool,
    },
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KETENBUS_LOG")
        .unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn env_var(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

/// Load and validate, printing every problem.
fn load(path: Option<&Path>) -> anyhow::Result<Settings> {
    let config = match path {
        Some(p) => Config::from_file(p).map_err(|p| anyhow::anyhow!("{p}"))?,
        None => Config::default(),
    };
    config.validate(&env_var).map_err(|problems| {
        let list: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
        anyhow::anyhow!("invalid configuration:\n{}", list.join("\n"))
    })
}

fn parse_since(since: Option<&str>) -> anyhow::Result<Option<i64>> {
    since
        .map(|s| {
            let t = humantime::parse_rfc3339_weak(s)
                .with_context(|| format!("--since {s:?} is not an RFC 3339 time"))?;
            let ms = t
                .duration_since(std::time::UNIX_EPOCH)
                .context("--since before 1970")?
                .as_millis();
            Ok(i64::try_from(ms)?)
        })
        .transpose()
}

async fn with_bus<T>(
    settings: &Settings,
    f: impl AsyncFnOnce(&dyn DlqOps) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    match settings.config.bus.engine {
        Engine::Embedded => {
            let bus = EmbeddedBus::open(&settings.config.data_dir, &settings.config.bus.embedded)?;
            f(&bus).await
        }
        Engine::Kafka => {
            let bus = kafka_bus(settings)?;
            f(&bus).await
        }
    }
}

fn kafka_bus(settings: &Settings) -> anyhow::Result<KafkaBus> {
    let mut config = settings
        .config
        .bus
        .kafka
        .clone()
        .context("bus.kafka is required")?;
    // Every message the listener takes fits a record.
    config.max_record_bytes =
        settings.config.http.max_body.as_u64() + ketenbus::bus::kafka::RECORD_OVERHEAD;
    Ok(KafkaBus::new(&config)?)
}

/// The dead-letter operations, object-safe over both engines.
trait DlqOps {
    fn list<'a>(
        &'a self,
        stage: &'a str,
        sel: &'a Selection,
    ) -> ketenbus_connectors::BoxFuture<'a, anyhow::Result<Vec<ketenbus_schemas::DeadLetter>>>;
    fn replay<'a>(
        &'a self,
        subscription: &'a str,
        sel: &'a Selection,
        audit: Option<&'a ketenbus::audit::Audit>,
        actor: &'a str,
    ) -> ketenbus_connectors::BoxFuture<'a, anyhow::Result<usize>>;
    fn purge<'a>(
        &'a self,
        stage: &'a str,
        sel: &'a Selection,
        audit: Option<&'a ketenbus::audit::Audit>,
        actor: &'a str,
    ) -> ketenbus_connectors::BoxFuture<'a, anyhow::Result<dlq::Purged>>;
}

impl<B: Bus> DlqOps for B {
    fn list<'a>(
        &'a self,
        stage: &'a str,
        sel: &'a Selection,
    ) -> ketenbus_connectors::BoxFuture<'a, anyhow::Result<Vec<ketenbus_schemas::DeadLetter>>> {
        Box::pin(async move { Ok(dlq::list(self, stage, sel).await?) })
    }
    fn replay<'a>(
        &'a self,
        subscription: &'a str,
        sel: &'a Selection,
        audit: Option<&'a ketenbus::audit::Audit>,
        actor: &'a str,
    ) -> ketenbus_connectors::BoxFuture<'a, anyhow::Result<usize>> {
        Box::pin(async move { Ok(dlq::replay(self, subscription, sel, audit, actor).await?) })
    }
    fn purge<'a>(
        &'a self,
        stage: &'a str,
        sel: &'a Selection,
        audit: Option<&'a ketenbus::audit::Audit>,
        actor: &'a str,
    ) -> ketenbus_connectors::BoxFuture<'a, anyhow::Result<dlq::Purged>> {
        Box::pin(async move { Ok(dlq::purge(self, stage, sel, audit, actor).await?) })
    }
}

async fn run(config: Option<PathBuf>) -> anyhow::Result<()> {
    let settings = load(config.as_deref())?;
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        stop.cancel();
    });
    match settings.config.bus.engine {
        Engine::Embedded => {
            let bus = EmbeddedBus::open(&settings.config.data_dir, &settings.config.bus.embedded)?;
            ketenbus::runtime::run(settings, bus, cancel).await
        }
        Engine::Kafka => {
            let bus = kafka_bus(&settings)?;
            ketenbus::runtime::run(settings, bus, cancel).await
        }
    }
}

async fn main_async(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Run { config } => run(config).await.map(|()| ExitCode::SUCCESS),
        Command::CheckConfig { config } => {
            let parsed = match Config::from_file(&config) {
                Ok(c) => c,
                Err(p) => {
                    eprintln!("{}: {p}", config.display());
                    return Ok(ExitCode::FAILURE);
                }
            };
            for w in ketenbus::auth::warnings(&parsed) {
                eprintln!("{}: warning: {w}", config.display());
            }
            match parsed.validate(&env_var) {
                Ok(s) => {
                    println!(
                        "{}: ok ({} subscriptions, engine {:?})",
                        config.display(),
                        s.subscriptions.len(),
                        s.config.bus.engine
                    );
                    Ok(ExitCode::SUCCESS)
                }
                Err(problems) => {
                    for p in &problems {
                        eprintln!("{}: {p}", config.display());
                    }
                    eprintln!("{} problem(s)", problems.len());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Token {
            command: TokenCommand::New,
        } => {
            let (token, hash) = ketenbus::auth::new_token();
            println!("token = {token}");
            println!("token_sha256 = \"{hash}\"");
            Ok(ExitCode::SUCCESS)
        }
        Command::Token {
            command: TokenCommand::Hash,
        } => {
            let mut token = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut token)?;
            println!(
                "token_sha256 = \"{}\"",
                ketenbus::auth::token_hash(token.trim())
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Consent {
            command: ConsentCommand::Pseudonym { config, bsn },
        } => {
            let settings = load(config.as_deref())?;
            let cfg = &settings.config;
            let secret = cfg
                .keys
                .patient_key_secret_env
                .as_ref()
                .and_then(|v| std::env::var(v).ok());
            let keyer = ketenbus::keys::PatientKeyer::load(&cfg.data_dir, secret)
                .context("loading the patient-key secret")?;
            let id = ketenbus_schemas::event::Identifier {
                system: ketenbus_schemas::event::systems::BSN.into(),
                value: bsn.trim().to_owned(),
            };
            println!("{}", keyer.key_of(&id));
            Ok(ExitCode::SUCCESS)
        }
        Command::Audit { command } => {
            let (config, since) = match &command {
                AuditCommand::Verify { config } => (config, None),
                AuditCommand::Export { config, since } => (config, Some(since.as_str())),
            };
            let settings = load(config.as_deref())?;
            let _operator = operator(&settings)?;
            let path = ketenbus::audit::path_in(&settings.config.data_dir);
            match since {
                None => match ketenbus::audit::verify(&path, &audit_key(&settings)?)? {
                    ketenbus::audit::Verified::Intact { records, last_hash } => {
                        println!(
                            "{}: intact, {records} record(s), last hash {last_hash}",
                            path.display()
                        );
                        Ok(ExitCode::SUCCESS)
                    }
                    ketenbus::audit::Verified::Broken { line, reason } => {
                        eprintln!("{}: broken at record {line}: {reason}", path.display());
                        Ok(ExitCode::FAILURE)
                    }
                },
                Some(since) => {
                    let since_ms = parse_since(Some(since))?.unwrap_or(0);
                    let mut out = std::io::stdout().lock();
                    let n = ketenbus::audit::export(&path, since_ms, &mut out)?;
                    eprintln!("{n} audit record(s)");
                    Ok(ExitCode::SUCCESS)
                }
            }
        }
        Command::Status { url } => {
            let client = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(5))
                .redirect(reqwest::redirect::Policy::none())
                .build()?;
            let base = url.trim_end_matches('/');
            let ready = client
                .get(format!("{base}/readyz"))
                .send()
                .await
                .with_context(|| format!("cannot reach ketenbus at {base}"))?;
            let ready: serde_json::Value = serde_json::from_slice(&ready.bytes().await?)?;
            let metrics = client
                .get(format!("{base}/metrics"))
                .send()
                .await?
                .text()
                .await?;
            print!("{}", ketenbus::status::render(base, &ready, &metrics));
            Ok(if ready["ready"].as_bool() == Some(true) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Inspect { file, format } => {
            let bytes =
                std::fs::read(&file).with_context(|| format!("reading {}", file.display()))?;
            let format = match format.as_deref() {
                Some(f) => Format::ALL
                    .into_iter()
                    .find(|x| x.as_str() == f)
                    .context("unknown format")?,
                None => ketenbus::inspect::sniff(&bytes).with_context(|| {
                    format!("{}: format not recognised; give --format", file.display())
                })?,
            };
            match ketenbus::inspect::inspect(&bytes, format, &ketenbus::router::normalizers()) {
                Ok(json) => {
                    println!("{}", serde_json::to_string_pretty(&json)?);
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => {
                    eprintln!("{}: {e}", file.display());
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Dlq {
            command: DlqCommand::List(selection),
        } => {
            let (settings, subscription, sel) = selection.resolve()?;
            let (audit, actor) = operator_audit(&settings)?;
            let letters =
                with_bus(&settings, async |bus| bus.list(&subscription, &sel).await).await?;
            // No read without its audit record.
            if let Some(audit) = &audit {
                audit
                    .append(dlq::audit_entries("dlq_list", &actor, letters.iter()))
                    .await
                    .context("writing the audit trail")?;
            }
            for dl in &letters {
                let line = serde_json::json!({
                    "id": dl.id, "stage": dl.stage, "record_id": dl.record_id, "envelope_id": dl.envelope_id,
                    "at_ms": dl.at_ms, "reason": dl.reason, "detail": dl.detail, "source_topic": dl.source_topic,
                    "value_bytes": dl.value.len(),
                });
                println!("{line}");
            }
            eprintln!("{} dead letter(s)", letters.len());
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq {
            command: DlqCommand::Replay { selection, all },
        } => {
            let (settings, subscription, sel) = selection.resolve()?;
            let (audit, actor) = operator_audit(&settings)?;
            if subscription == "router" {
                anyhow::bail!(
                    "router dead letters cannot be replayed to a subscription; resend the message instead"
                );
            }
            if !settings
                .subscriptions
                .iter()
                .any(|s| s.name == subscription)
            {
                anyhow::bail!("no subscription named {subscription:?} in the configuration");
            }
            if sel.ids.is_empty() && sel.since_ms.is_none() && !all {
                anyhow::bail!("say which dead letters: --id, --since, or --all");
            }
            let n = with_bus(&settings, async |bus| {
                bus.replay(&subscription, &sel, audit.as_ref(), &actor)
                    .await
            })
            .await?;
            eprintln!("replayed {n} dead letter(s) to subscription {subscription}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq {
            command:
                DlqCommand::Purge {
                    selection,
                    before,
                    all,
                },
        } => {
            let (settings, stage, mut sel) = selection.resolve()?;
            sel.before_ms = parse_since(before.as_deref())?;
            if stage != "router" && !settings.subscriptions.iter().any(|s| s.name == stage) {
                anyhow::bail!("no subscription named {stage:?} in the configuration");
            }
            if sel.ids.is_empty() && sel.before_ms.is_none() && !all {
                anyhow::bail!("say which dead letters: --id, --before, or --all");
            }
            let (audit, actor) = operator_audit(&settings)?;
            let purged = with_bus(&settings, async |bus| {
                bus.purge(&stage, &sel, audit.as_ref(), &actor).await
            })
            .await?;
            eprintln!(
                "purged {} dead letter(s) of {stage} (audited {})",
                purged.removed, purged.selected
            );
            if purged.removed < purged.selected as u64 {
                eprintln!(
                    "{} kept: the kafka engine removes only a partition's oldest records",
                    purged.selected as u64 - purged.removed
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(main_async(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
