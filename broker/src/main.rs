//! The `ketenbus` command line: argument parsing only; each subcommand is a file in
//! `ketenbus::cli`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use ketenbus::cli::{self, dlq::DlqCommand};

// mimalloc: the normalisers build many small strings per message, and glibc malloc/free were
// the largest item in profiles of both the EDIFACT mapping and the whole pipeline.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Blocking threads of the main runtime (tokio's default is 512): each thread that ran
/// keeps allocator pages and a stack, and a burst of parses or SQLite reads would otherwise
/// start one thread per message. Idle ones end after [`BLOCKING_KEEP_ALIVE`].
const MAX_BLOCKING_THREADS: usize = 32;
const BLOCKING_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(2);

/// ketenbus: a message broker for Dutch care-chain exchanges.
///
/// Takes in EDIFACT, secure mail and FHIR, normalises every message into zib-based events on
/// topics (an embedded durable log, or Kafka), and delivers them to subscribers with retries,
/// dead letters and proof of delivery. Without a config file it runs on the embedded log in
/// ./data with HTTP on 127.0.0.1:8080 and has no subscriptions: it takes messages in and
/// normalises them, and delivers nothing. Quick start with one webhook subscription:
/// README.md, "Quick start" (ops/quickstart/).
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
        /// Configuration file (TOML); see ops/ketenbus.example.toml and, for a first run,
        /// ops/quickstart/ketenbus.toml. Without it, defaults apply: no subscriptions, so
        /// messages are taken in and normalised and nothing is delivered.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file and print every problem with its key path: every
    /// syntax error, every type error (each section and key read on its own, with an example
    /// of a good value) or else every value problem.
    CheckConfig {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// A terminal summary of a running broker: components, inflow, refusals, deliveries,
    /// retrying records with the reason of their last failure, dead letters (router ones too),
    /// inbox failures, lag and the oldest undelivered record per subscription.
    Status {
        /// Base URL of the broker's HTTP API (default: from --config's `http.listen`, else
        /// http://127.0.0.1:8080).
        #[arg(long)]
        url: Option<String>,
        /// The broker's configuration file: its URL, and dead letters and inbox failures
        /// read from its log and inboxes (whole also after a restart). Sends the operator
        /// token in KETENBUS_OPERATOR_TOKEN, when set.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Print a file as ketenbus reads it (parsed message and the events it makes) as JSON,
    /// without touching the log. Exits non-zero with the error position when it does not
    /// parse, and non-zero after printing it when the router would reject it (the reason is
    /// in `rejected` and on stderr).
    Inspect {
        /// The file (EDIFACT, FHIR JSON/XML, or an .eml mail message).
        file: PathBuf,
        /// Format, when detection from the first bytes is not enough.
        #[arg(long, value_parser = ["edifact", "fhir_json", "fhir_xml", "rfc822"])]
        format: Option<String>,
        /// Instead: the field-coverage report, each source element with a value (FHIR leaf
        /// element paths, EDIFACT segment/element/component positions) and whether the
        /// events carry it, with totals.
        #[arg(long)]
        coverage: bool,
        /// With --coverage: the report as JSON.
        #[arg(long, requires = "coverage")]
        json: bool,
    },
    /// Dead letters: list, replay and purge. Dead letters are kept until purged (retention
    /// never removes them). Works on the log of --config (default ./data, which must exist);
    /// needs no secrets of sinks or mail sources. With `[[operators]]` configured, needs an operator token in
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
    /// The address book: what a record for a party would be sent to.
    Address {
        #[command(subcommand)]
        command: AddressCommand,
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
enum AddressCommand {
    /// Print what a record whose receiver is PARTY would be sent to and why: the
    /// `[address_book]` override, or which `[[mcsd]]` directory and which Organization /
    /// HealthcareService / Endpoint, and every endpoint passed over (status, period, FHIR
    /// version, kind). Reads the replicas `ketenbus run` keeps in the data dir. Exits
    /// non-zero when nothing fits.
    Resolve {
        /// The party id: `ura:…`, `agb:…`, `mailbox:…`, or `<system>|<value>`.
        party: String,
        /// Only this channel (default: all three).
        #[arg(long, value_enum)]
        channel: Option<ChannelArg>,
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

/// A sink's channel.
#[derive(Clone, Copy, clap::ValueEnum)]
enum ChannelArg {
    /// The FHIR sink.
    Fhir,
    /// The webhook sink.
    Webhook,
    /// The secure-mail sink.
    Mail,
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

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("KETENBUS_LOG")
        .unwrap_or_else(|_| "info".into());
    // Colours only for a person at a terminal: a log file or journal gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn main_async(cli: Cli) -> anyhow::Result<ExitCode> {
    let ok = |()| ExitCode::SUCCESS;
    match cli.command {
        Command::Run { config } => cli::run::run(config.as_deref()).await.map(ok),
        Command::CheckConfig { config } => Ok(cli::check_config::run(&config)),
        Command::Token {
            command: TokenCommand::New,
        } => {
            cli::token::new();
            Ok(ExitCode::SUCCESS)
        }
        Command::Token {
            command: TokenCommand::Hash,
        } => Ok(cli::token::hash().map(ok)?),
        Command::Address {
            command:
                AddressCommand::Resolve {
                    party,
                    channel,
                    config,
                },
        } => cli::address::resolve(
            config.as_deref(),
            &party,
            channel.map(|c| match c {
                ChannelArg::Fhir => ketenbus_connectors::address_book::Channel::Fhir,
                ChannelArg::Webhook => ketenbus_connectors::address_book::Channel::Webhook,
                ChannelArg::Mail => ketenbus_connectors::address_book::Channel::Mail,
            }),
        ),
        Command::Consent {
            command: ConsentCommand::Pseudonym { config, bsn },
        } => cli::consent::pseudonym(config.as_deref(), &bsn).map(ok),
        Command::Audit {
            command: AuditCommand::Verify { config },
        } => cli::audit::verify_trail(config.as_deref()),
        Command::Audit {
            command: AuditCommand::Export { config, since },
        } => cli::audit::export_since(config.as_deref(), &since).map(ok),
        Command::Status { url, config } => {
            cli::status::run(url.as_deref(), config.as_deref()).await
        }
        Command::Inspect {
            file,
            format,
            coverage,
            json,
        } => cli::inspect::run(&file, format.as_deref(), coverage.then_some(json)),
        Command::Dlq { command } => cli::dlq::run(command).await.map(ok),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(cli.log_format);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .thread_keep_alive(BLOCKING_KEEP_ALIVE)
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
