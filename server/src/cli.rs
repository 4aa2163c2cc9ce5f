//! The `haven-relay` command line: configuration layering, logging, binding and
//! signals around [`crate::run`].

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::Parser;
use tokio::net::TcpListener;
use tracing_subscriber::EnvFilter;

use crate::config::{Config, LogFormat, StoreKind, TlsConfig};

/// Command-line flags; each also reads a `HAVEN_*` environment variable and
/// overrides the configuration file.
#[derive(Debug, Parser)]
#[command(
    name = "haven-relay",
    version,
    about = "The Haven relay: forwards sealed envelopes it cannot read."
)]
pub struct Args {
    /// TOML configuration file; every key is optional (see ARCHITECTURE.md, "Configuration").
    #[arg(long, env = "HAVEN_CONFIG")]
    pub config: Option<PathBuf>,
    /// gRPC listen address [default: 127.0.0.1:50051].
    #[arg(long, env = "HAVEN_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Data directory of the sled store [default: ./haven-data].
    #[arg(long, env = "HAVEN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Store backend [default: sled].
    #[arg(long, env = "HAVEN_STORE", value_enum)]
    pub store: Option<StoreKind>,
    /// Redis Cluster seed nodes for `--store redis`, comma-separated
    /// `redis://host:port` URLs.
    #[arg(long, env = "HAVEN_REDIS_NODES", value_delimiter = ',')]
    pub redis_nodes: Option<Vec<String>>,
    /// Key prefix in the Redis Cluster [default: haven].
    #[arg(long, env = "HAVEN_REDIS_NAMESPACE")]
    pub redis_namespace: Option<String>,
    /// Metrics listen address, or `off` [default: 127.0.0.1:9464].
    #[arg(long, env = "HAVEN_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// TLS certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "HAVEN_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM); needs --tls-cert.
    #[arg(long, env = "HAVEN_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Serve plaintext gRPC on a non-loopback address (behind a TLS-terminating proxy).
    #[arg(long, env = "HAVEN_ALLOW_PLAINTEXT")]
    pub allow_plaintext: bool,
    /// Whether clients come through a proxy (true or false): then per-address
    /// caps are off unless set [default: true when serving plaintext].
    #[arg(long, env = "HAVEN_BEHIND_PROXY")]
    pub behind_proxy: Option<bool>,
    /// The association's Ed25519 public key (64 hex digits) for the directory.
    #[arg(long, env = "HAVEN_ASSOCIATION_KEY")]
    pub association_key: Option<String>,
    /// Log level of the relay's own crates: error, warn, info, debug, trace [default: info].
    #[arg(long, env = "HAVEN_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Log format [default: text].
    #[arg(long, env = "HAVEN_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Proof-of-work difficulty for intake mailboxes, in bits [default: 18].
    #[arg(long, env = "HAVEN_INTAKE_POW_DIFFICULTY")]
    pub intake_pow_difficulty: Option<u32>,
    /// Expiry bucket width in seconds [default: 3600].
    #[arg(long, env = "HAVEN_EXPIRY_BUCKET_SECONDS")]
    pub expiry_bucket_seconds: Option<u64>,
    /// Sweep interval in seconds [default: 60].
    #[arg(long, env = "HAVEN_SWEEP_INTERVAL_SECONDS")]
    pub sweep_interval_seconds: Option<u64>,
    /// Seconds between two push wake-ups of one unread mailbox [default: 60].
    #[arg(long, env = "HAVEN_PUSH_INTERVAL_SECONDS")]
    pub push_interval_seconds: Option<u64>,
    /// Accept http:// and local-network push endpoints (tests, an in-house gateway).
    #[arg(long, env = "HAVEN_PUSH_ALLOW_LOCAL_ENDPOINTS")]
    pub push_allow_local_endpoints: bool,
    /// Validate the configuration, print what would run, and exit.
    #[arg(long)]
    pub check_config: bool,
}

impl Args {
    /// Builds the configuration: defaults, then the file, then flags/environment.
    pub fn into_config(self) -> anyhow::Result<Config> {
        let mut config = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| {
                    format!("cannot read configuration file {}", path.display())
                })?;
                Config::from_toml(&text)
                    .with_context(|| format!("in configuration file {}", path.display()))?
            }
            None => Config::default(),
        };
        if let Some(listen) = self.listen {
            config.listen = listen;
        }
        if let Some(data_dir) = self.data_dir {
            config.data_dir = data_dir;
        }
        if let Some(store) = self.store {
            config.store = store;
        }
        if let Some(nodes) = self.redis_nodes {
            config.redis.nodes = nodes;
        }
        if let Some(namespace) = self.redis_namespace {
            config.redis.namespace = namespace;
        }
        if let Some(metrics) = self.metrics_listen {
            config.metrics_listen = crate::config::parse_address_or_off(&metrics)
                .map_err(|message| anyhow::anyhow!("--metrics-listen: {message}"))?;
        }
        if let (Some(cert), Some(key)) = (self.tls_cert, self.tls_key) {
            config.tls = Some(TlsConfig { cert, key });
        }
        config.allow_plaintext |= self.allow_plaintext;
        if let Some(behind_proxy) = self.behind_proxy {
            config.behind_proxy = Some(behind_proxy);
        }
        if let Some(key) = self.association_key {
            config.association_key = Some(key);
        }
        if let Some(level) = self.log_level {
            config.log.level = level;
        }
        if let Some(format) = self.log_format {
            config.log.format = format;
        }
        if let Some(bits) = self.intake_pow_difficulty {
            config.intake_pow_difficulty = bits;
        }
        if let Some(seconds) = self.expiry_bucket_seconds {
            config.expiry_bucket_seconds = seconds;
        }
        if let Some(seconds) = self.sweep_interval_seconds {
            config.sweep_interval_seconds = seconds;
        }
        if let Some(seconds) = self.push_interval_seconds {
            config.push.interval_seconds = seconds;
        }
        config.push.allow_local_endpoints |= self.push_allow_local_endpoints;
        config.validate()?;
        Ok(config)
    }
}

/// Logs to stderr. The relay's own crates log at the configured level; every
/// other crate stays at `warn`, because their verbose output (connection and
/// frame traces) has not been audited to be free of addresses and ids.
fn init_logging(config: &Config) {
    let level = &config.log.level;
    let filter = EnvFilter::new(format!("warn,haven_server={level},haven_store={level}"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(%error, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(error) => {
                tracing::error!(%error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let grpc = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let metrics = match config.metrics_listen {
        Some(address) => Some(
            TcpListener::bind(address)
                .await
                .with_context(|| format!("cannot listen for metrics on {address}"))?,
        ),
        None => None,
    };
    crate::run(
        config,
        crate::Listeners { grpc, metrics },
        shutdown_signal(),
    )
    .await
}

/// The relay's `main`: exit code 2 for a bad configuration, 1 for a failure.
pub fn main() -> ExitCode {
    let args = Args::parse();
    let check_only = args.check_config;
    let config = match args.into_config() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("haven-relay: {error:#}");
            return ExitCode::from(2);
        }
    };
    if check_only {
        println!(
            "configuration is valid: gRPC on {}, store {:?} in {}, metrics {}",
            config.listen,
            config.store,
            config.data_dir.display(),
            config
                .metrics_listen
                .map_or_else(|| "off".to_owned(), |address| address.to_string())
        );
        return ExitCode::SUCCESS;
    }
    init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("haven-relay: cannot start the runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(serve(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("haven-relay: {error:#}");
            ExitCode::FAILURE
        }
    }
}
