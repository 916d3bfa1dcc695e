//! The command line's shape: the commands, their flags and help texts
//! (clap derive). A config file's keys are these flags' long names.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand};
use log::LevelFilter;
use tcp_relay::{AllowList, Config, Rate, RelayStyle};

use super::values::{
    LocalSpec, ProxySetting, parse_burst, parse_duration, parse_local, parse_port_range,
};

/// A TCP relay: publishes apps behind NAT on public ports, never dialing out.
#[derive(Parser)]
#[command(name = "tcp-relay", version)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// More log output: -v debug (per client), -vv trace (per state change).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Less log output: -q warnings only, -qq errors only.
    #[arg(short, long, action = ArgAction::Count, global = true, conflicts_with = "verbose")]
    pub quiet: u8,
    /// Log level (off, error, warn, info, debug, trace); overrides -v and -q.
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<LevelFilter>,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Run the relay.
    Serve(ServeArgs),
    /// Run the sample app: register with a relay and echo every client.
    Echo(EchoArgs),
    /// Publish a local TCP service through a relay; prints the public
    /// address (HOST:PORT) on stdout after each registration.
    Expose(ExposeArgs),
}

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Address to listen on, for every port (IPv4 or IPv6).
    #[arg(long, default_value = "0.0.0.0")]
    pub bind: IpAddr,
    /// Registration port apps connect to.
    #[arg(long, default_value_t = 8080)]
    pub reg_port: u16,
    /// How relayed ports are chosen: increment (reg-port+1, +2, ...) or random (OS-assigned); 1 and 0 are aliases.
    #[arg(long, default_value = "increment", value_name = "STYLE")]
    pub relay_style: RelayStyle,
    /// How long a client waits for its app to dial in before it is closed.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub dial_in_timeout: Duration,
    /// Shared secret apps must prove they know (HMAC challenge); also makes
    /// every dial-in present a one-time token. Prefer --secret-file or the
    /// environment variable, which stay out of `ps`.
    #[arg(long, env = SECRET_ENV, hide_env_values = true, value_name = "SECRET")]
    pub secret: Option<String>,
    #[command(flatten)]
    pub secret_file: SecretFile,
    /// Relayed ports only from this range, e.g. 20000-20999 (default: above
    /// the registration port for increment, any for random).
    #[arg(long, value_parser = parse_port_range, value_name = "MIN-MAX")]
    pub port_range: Option<(u16, u16)>,
    /// Most apps registered at once.
    #[arg(long, default_value_t = Config::default().max_apps, value_name = "N")]
    pub max_apps: usize,
    /// Most clients one app may have waiting for dial-ins; more are reset.
    #[arg(long, default_value_t = Config::default().max_waiting_per_app, value_name = "N")]
    pub max_waiting: usize,
    /// Most peer connections held at once (apps, clients, dial-ins); more are reset.
    #[arg(long, default_value_t = Config::default().max_connections, value_name = "N")]
    pub max_connections: usize,
    /// Listen backlog of every listener (connections the kernel queues
    /// between two accepts); capped by net.core.somaxconn, logged if so.
    #[arg(long, default_value_t = Config::default().backlog, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub backlog: u32,
    /// Trust these sources (a balancer in front: HAProxy send-proxy, nginx
    /// stream proxy_protocol, a cloud load balancer) to begin each client
    /// connection with a PROXY protocol header (v1 or v2) naming the real
    /// client, e.g. 10.0.0.0/8,192.0.2.7. From them a connection without a
    /// valid header is reset; from anyone else a header is client data.
    #[arg(long, value_name = "CIDR[,...]")]
    pub accept_proxy_from: Option<AllowList>,
    /// Serve the status endpoint here: GET /metrics (Prometheus), /status
    /// (JSON), / (a live page), e.g. 127.0.0.1:9090. It shows app
    /// addresses: keep it on loopback and use an SSH tunnel.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Longest control line accepted from an app, in bytes.
    #[arg(long, default_value_t = Config::default().max_line, value_name = "BYTES")]
    pub max_line: usize,
    /// Time an app has to authenticate, and a dial-in to present its token.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub register_timeout: Duration,
    /// A half-closed pipe idle this long is closed.
    #[arg(long, default_value = "10m", value_parser = parse_duration, value_name = "DURATION")]
    pub half_close_timeout: Duration,
    /// On SIGINT/SIGTERM, how long open pipes may drain before exiting.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub grace: Duration,
    /// Copy bytes through user-space rings instead of splice(2) through
    /// kernel pipes (splice is the default on Linux: fewer copies for bulk,
    /// two descriptors per direction while bytes are in flight).
    #[arg(long)]
    pub no_splice: bool,
    /// Accept apps only from these sources (addresses or CIDR blocks, e.g.
    /// 10.0.0.0/8,2001:db8::/32), on the registration and dial-in ports. A
    /// connection from anywhere else is reset at once, before a byte is
    /// read; refusals are counted and logged once per episode.
    #[arg(long, value_name = "CIDR[,...]")]
    pub allow_apps: Option<AllowList>,
    /// Accept clients on relayed ports only from these sources (with
    /// --accept-proxy-from, the address a trusted PROXY header names). A
    /// connection from anywhere else is reset at once, before a byte is
    /// read; refusals are counted and logged once per episode.
    #[arg(long, value_name = "CIDR[,...]")]
    pub allow_clients: Option<AllowList>,
    /// Most new client connections per source address, over every relayed
    /// port: N per second (N/s) or per minute (N/m), after a burst of
    /// --client-burst. A connection beyond it is reset at once; refusals
    /// are counted and logged once per episode.
    #[arg(long, value_name = "N/s|N/m")]
    pub client_rate: Option<Rate>,
    /// Connections one source may open at once before --client-rate holds
    /// it back (default: one period's worth, 10 for 10/s).
    #[arg(long, value_name = "N", requires = "client_rate", value_parser = parse_burst)]
    pub client_burst: Option<NonZeroU32>,
    #[command(flatten)]
    pub file: FileArgs,
}

/// `--config` and `--print-config`, for the commands that run long.
#[derive(Args)]
pub(crate) struct FileArgs {
    /// Read settings from this TOML file: each key a long flag's name with
    /// '_' for '-' (reg_port = 9000). Flags given here override the file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration (file, flags and defaults merged)
    /// as a config file, and exit without starting.
    #[arg(long)]
    pub print_config: bool,
}

/// The environment variable that may hold the secret.
pub(crate) const SECRET_ENV: &str = "TCP_RELAY_SECRET";

/// `--secret-file`, shared by every command that takes a secret.
#[derive(Args)]
pub(crate) struct SecretFile {
    /// Read the secret from this file (one trailing newline is dropped), so
    /// it appears in neither `ps` nor the environment. Without a secret, the
    /// systemd credential `tcp-relay-secret` is used if there is one.
    #[arg(long = "secret-file", value_name = "PATH", conflicts_with = "secret")]
    pub path: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct EchoArgs {
    /// The relay's registration address; more than once to register with
    /// several relays.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "HOST:PORT")]
    pub relay: Vec<String>,
    /// The relay's shared secret, if it asks for one.
    #[arg(long, env = SECRET_ENV, hide_env_values = true, value_name = "SECRET")]
    pub secret: Option<String>,
    #[command(flatten)]
    pub secret_file: SecretFile,
    /// Read settings from this TOML file (relay or relays, secret_file);
    /// flags given here override the file.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct ExposeArgs {
    /// The relay's registration address; more than once to register every
    /// service with several relays (each link reconnects on its own).
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "HOST:PORT")]
    pub relay: Vec<String>,
    /// A local service to publish: its clients are piped to HOST:PORT.
    /// More than once for several services, each its own registration;
    /// NAME= names it on the address lines, @PORT asks for that relayed
    /// port, e.g. --local web=127.0.0.1:3000@8081 --local ssh=127.0.0.1:22.
    #[arg(long, value_name = "[NAME=]HOST:PORT[@PORT]", value_parser = parse_local)]
    pub local: Vec<LocalSpec>,
    /// Ask the relay for this relayed port (a protocol extension; refused
    /// if taken). With one service; with several use --local ...@PORT.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub port: Option<u16>,
    /// Exit (non-zero) when the relay goes away, instead of reconnecting.
    #[arg(long)]
    pub no_reconnect: bool,
    /// Ask the relay to keep N dial-ins ready (each already connected to the
    /// local service), so new clients skip the dial-in round trip. At most 64.
    #[arg(long, default_value_t = 0, value_name = "N", value_parser = clap::value_parser!(u16).range(0..=64))]
    pub ready: u16,
    /// How long a client's connects (to the relay and to the local service)
    /// may take before the client is reset.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    pub connect_timeout: Duration,
    /// Most clients served at once (each holds a dial-in and a local
    /// connection); dial requests beyond it wait, in order. Default: what
    /// the descriptor limit allows.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_clients: Option<u64>,
    /// Ask the relay to begin every dial-in with a PROXY protocol header
    /// (v1: text, v2: binary) naming the client's real address; it reaches
    /// the local service untouched (nginx `listen ... proxy_protocol`,
    /// HAProxy `accept-proxy`). The service must expect it. `none` (the
    /// default) asks for none, also where a config file asks for one.
    #[arg(long, value_name = "v1|v2|none")]
    pub proxy_protocol: Option<ProxySetting>,
    /// Ask each relay to admit to every service's port only clients from
    /// these sources (the allow extension), on top of the relay's own
    /// --allow-clients. Registration fails if a relay does not answer.
    #[arg(long, value_name = "CIDR[,...]")]
    pub allow_clients: Option<AllowList>,
    /// Ask each relay to limit every service's new clients per source
    /// address, N per second (N/s) or minute (N/m) after a burst of
    /// --client-burst (the rate extension); a relay applies this, or its
    /// own --client-rate where that is stricter.
    #[arg(long, value_name = "N/s|N/m")]
    pub client_rate: Option<Rate>,
    /// Connections one source may open at once before --client-rate holds
    /// it back (default: one period's worth, 10 for 10/s).
    #[arg(long, value_name = "N", requires = "client_rate", value_parser = parse_burst)]
    pub client_burst: Option<NonZeroU32>,
    /// Serve the agent's status endpoint here: GET /metrics (Prometheus),
    /// /status (JSON), / (a live page), e.g. 127.0.0.1:9091.
    #[arg(long, value_name = "ADDR")]
    pub metrics: Option<SocketAddr>,
    /// Copy bytes through rings instead of splice(2), as `serve --no-splice`.
    #[arg(long)]
    pub no_splice: bool,
    /// The relay's shared secret, if it asks for one.
    #[arg(long, env = SECRET_ENV, hide_env_values = true, value_name = "SECRET")]
    pub secret: Option<String>,
    #[command(flatten)]
    pub secret_file: SecretFile,
    #[command(flatten)]
    pub file: FileArgs,
}

impl Cli {
    /// The log level the flags select: --log-level, else -v/-q, else info.
    pub(crate) fn level(&self) -> LevelFilter {
        self.log_level.unwrap_or(match (self.verbose, self.quiet) {
            (0, 0) => LevelFilter::Info,
            (1, _) => LevelFilter::Debug,
            (v, _) if v > 1 => LevelFilter::Trace,
            (_, 1) => LevelFilter::Warn,
            _ => LevelFilter::Error,
        })
    }
}
