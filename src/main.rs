//! The `tcp-relay` command: arguments, logger, then the library does the work.

use std::io::Write;
use std::net::{IpAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand};
use cli::{LocalSpec, parse_duration, parse_local, parse_port_range};
use log::LevelFilter;
use tcp_relay::{
    Agent, AgentConfig, AllowList, Config, ProxyVersion, Registered, Relay, RelayStyle, Secret,
    Service, ServiceConfig,
};

mod cli;

/// A TCP relay: publishes apps behind NAT on public ports, never dialing out.
#[derive(Parser)]
#[command(name = "tcp-relay", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// More log output: -v debug (per client), -vv trace (per state change).
    #[arg(short, long, action = ArgAction::Count, global = true)]
    verbose: u8,
    /// Less log output: -q warnings only, -qq errors only.
    #[arg(short, long, action = ArgAction::Count, global = true, conflicts_with = "verbose")]
    quiet: u8,
    /// Log level (off, error, warn, info, debug, trace); overrides -v and -q.
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<LevelFilter>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the relay.
    Serve(ServeArgs),
    /// Run the sample app: register with a relay and echo every client.
    Echo(EchoArgs),
    /// Publish a local TCP service through a relay; prints the public
    /// address (HOST:PORT) on stdout after each registration.
    Expose(ExposeArgs),
}

#[derive(Args)]
struct ServeArgs {
    /// Address to listen on, for every port (IPv4 or IPv6).
    #[arg(long, default_value = "0.0.0.0")]
    bind: IpAddr,
    /// Registration port apps connect to.
    #[arg(long, default_value_t = 8080)]
    reg_port: u16,
    /// How relayed ports are chosen: increment (reg-port+1, +2, ...) or random (OS-assigned); 1 and 0 are aliases.
    #[arg(long, default_value = "increment", value_name = "STYLE")]
    relay_style: RelayStyle,
    /// How long a client waits for its app to dial in before it is closed.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    dial_in_timeout: Duration,
    /// Shared secret apps must prove they know (HMAC challenge); also makes
    /// every dial-in present a one-time token. Prefer --secret-file or the
    /// environment variable, which stay out of `ps`.
    #[arg(long, env = SECRET_ENV, hide_env_values = true, value_name = "SECRET")]
    secret: Option<String>,
    #[command(flatten)]
    secret_file: SecretFile,
    /// Relayed ports only from this range, e.g. 20000-20999 (default: above
    /// the registration port for increment, any for random).
    #[arg(long, value_parser = parse_port_range, value_name = "MIN-MAX")]
    port_range: Option<(u16, u16)>,
    /// Most apps registered at once.
    #[arg(long, default_value_t = Config::default().max_apps, value_name = "N")]
    max_apps: usize,
    /// Most clients one app may have waiting for dial-ins; more are reset.
    #[arg(long, default_value_t = Config::default().max_waiting_per_app, value_name = "N")]
    max_waiting: usize,
    /// Most peer connections held at once (apps, clients, dial-ins); more are reset.
    #[arg(long, default_value_t = Config::default().max_connections, value_name = "N")]
    max_connections: usize,
    /// Listen backlog of every listener (connections the kernel queues
    /// between two accepts); capped by net.core.somaxconn, logged if so.
    #[arg(long, default_value_t = Config::default().backlog, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    backlog: u32,
    /// Trust these sources (a balancer in front: HAProxy send-proxy, nginx
    /// stream proxy_protocol, a cloud load balancer) to begin each client
    /// connection with a PROXY protocol header (v1 or v2) naming the real
    /// client, e.g. 10.0.0.0/8,192.0.2.7. From them a connection without a
    /// valid header is reset; from anyone else a header is client data.
    #[arg(long, value_name = "CIDR[,...]")]
    accept_proxy_from: Option<AllowList>,
    /// Serve the status endpoint here: GET /metrics (Prometheus), /status
    /// (JSON), / (a live page), e.g. 127.0.0.1:9090. It shows app
    /// addresses: keep it on loopback and use an SSH tunnel.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Longest control line accepted from an app, in bytes.
    #[arg(long, default_value_t = Config::default().max_line, value_name = "BYTES")]
    max_line: usize,
    /// Time an app has to authenticate, and a dial-in to present its token.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    register_timeout: Duration,
    /// A half-closed pipe idle this long is closed.
    #[arg(long, default_value = "10m", value_parser = parse_duration, value_name = "DURATION")]
    half_close_timeout: Duration,
    /// On SIGINT/SIGTERM, how long open pipes may drain before exiting.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    grace: Duration,
    /// Copy bytes through user-space rings instead of splice(2) through
    /// kernel pipes (splice is the default on Linux: fewer copies for bulk,
    /// two descriptors per direction while bytes are in flight).
    #[arg(long)]
    no_splice: bool,
}

/// The environment variable that may hold the secret.
const SECRET_ENV: &str = "TCP_RELAY_SECRET";

/// `--secret-file`, shared by every command that takes a secret.
#[derive(Args)]
struct SecretFile {
    /// Read the secret from this file (one trailing newline is dropped), so
    /// it appears in neither `ps` nor the environment. Without a secret, the
    /// systemd credential `tcp-relay-secret` is used if there is one.
    #[arg(long = "secret-file", value_name = "PATH", conflicts_with = "secret")]
    path: Option<PathBuf>,
}

#[derive(Args)]
struct EchoArgs {
    /// The relay's registration address; more than once to register with
    /// several relays.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "HOST:PORT")]
    relay: Vec<String>,
    /// The relay's shared secret, if it asks for one.
    #[arg(long, env = SECRET_ENV, hide_env_values = true, value_name = "SECRET")]
    secret: Option<String>,
    #[command(flatten)]
    secret_file: SecretFile,
}

#[derive(Args)]
struct ExposeArgs {
    /// The relay's registration address; more than once to register every
    /// service with several relays (each link reconnects on its own).
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "HOST:PORT")]
    relay: Vec<String>,
    /// A local service to publish: its clients are piped to HOST:PORT.
    /// More than once for several services, each its own registration;
    /// NAME= names it on the address lines, @PORT asks for that relayed
    /// port, e.g. --local web=127.0.0.1:3000@8081 --local ssh=127.0.0.1:22.
    #[arg(long, value_name = "[NAME=]HOST:PORT[@PORT]", value_parser = parse_local)]
    local: Vec<LocalSpec>,
    /// Ask the relay for this relayed port (a protocol extension; refused
    /// if taken). With one service; with several use --local ...@PORT.
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    port: Option<u16>,
    /// Exit (non-zero) when the relay goes away, instead of reconnecting.
    #[arg(long)]
    no_reconnect: bool,
    /// Ask the relay to keep N dial-ins ready (each already connected to the
    /// local service), so new clients skip the dial-in round trip. At most 64.
    #[arg(long, default_value_t = 0, value_name = "N", value_parser = clap::value_parser!(u16).range(0..=64))]
    ready: u16,
    /// How long a client's connects (to the relay and to the local service)
    /// may take before the client is reset.
    #[arg(long, default_value = "10s", value_parser = parse_duration, value_name = "DURATION")]
    connect_timeout: Duration,
    /// Most clients served at once (each holds a dial-in and a local
    /// connection); dial requests beyond it wait, in order. Default: what
    /// the descriptor limit allows.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    max_clients: Option<u64>,
    /// Ask the relay to begin every dial-in with a PROXY protocol header
    /// (v1: text, v2: binary) naming the client's real address; it reaches
    /// the local service untouched (nginx `listen ... proxy_protocol`,
    /// HAProxy `accept-proxy`). The service must expect it.
    #[arg(long, value_name = "VERSION")]
    proxy_protocol: Option<ProxyVersion>,
    /// Serve the agent's status endpoint here: GET /metrics (Prometheus),
    /// /status (JSON), / (a live page), e.g. 127.0.0.1:9091.
    #[arg(long, value_name = "ADDR")]
    metrics: Option<std::net::SocketAddr>,
    /// Copy bytes through rings instead of splice(2), as `serve --no-splice`.
    #[arg(long)]
    no_splice: bool,
    /// The relay's shared secret, if it asks for one.
    #[arg(long, env = SECRET_ENV, hide_env_values = true, value_name = "SECRET")]
    secret: Option<String>,
    #[command(flatten)]
    secret_file: SecretFile,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let level = cli.log_level.unwrap_or(match (cli.verbose, cli.quiet) {
        (0, 0) => LevelFilter::Info,
        (1, _) => LevelFilter::Debug,
        (v, _) if v > 1 => LevelFilter::Trace,
        (_, 1) => LevelFilter::Warn,
        _ => LevelFilter::Error,
    });
    if let Err(e) = simple_logger::SimpleLogger::new()
        .with_utc_timestamps()
        .with_level(level)
        .init()
    {
        eprintln!("tcp-relay: cannot start logging: {e}");
    }
    let result = match cli.command {
        Command::Serve(args) => serve(args),
        Command::Echo(args) => echo(args),
        Command::Expose(args) => expose(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("tcp-relay: error: {message}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> Result<(), String> {
    let config = Config {
        bind: args.bind,
        reg_port: args.reg_port,
        relay_style: args.relay_style,
        dial_in_timeout: args.dial_in_timeout,
        secret: Secret::select(args.secret, args.secret_file.path.as_deref())?,
        port_range: args.port_range,
        max_apps: args.max_apps,
        max_waiting_per_app: args.max_waiting,
        max_connections: args.max_connections,
        max_line: args.max_line,
        backlog: args.backlog,
        accept_proxy_from: args.accept_proxy_from,
        metrics: args.metrics,
        register_timeout: args.register_timeout,
        half_close_timeout: args.half_close_timeout,
        grace: args.grace,
        splice: !args.no_splice && Config::default().splice,
        ..Config::default()
    };
    raise_fd_limit();
    let mut relay = Relay::bind(config).map_err(|e| e.to_string())?;
    relay
        .stop_on_signals()
        .map_err(|e| format!("cannot watch signals: {e}"))?;
    relay.notify_systemd();
    relay.run().map_err(|e| format!("relay failed: {e}"))
}

fn echo(args: EchoArgs) -> Result<(), String> {
    run_agent(AgentConfig {
        relays: args.relay,
        secret: Secret::select(args.secret, args.secret_file.path.as_deref())?,
        reconnect: false,
        ..AgentConfig::new(String::new(), Service::Echo)
    })
}

fn expose(args: ExposeArgs) -> Result<(), String> {
    if args.local.is_empty() {
        return Err("nothing to expose: give --local HOST:PORT".into());
    }
    if args.port.is_some() && args.local.len() > 1 {
        return Err(
            "--port is for one service; with several, give each its port as --local NAME=HOST:PORT@PORT"
                .into(),
        );
    }
    let several = args.local.len() > 1;
    let services = args
        .local
        .iter()
        .map(|spec| {
            Ok(ServiceConfig {
                name: match &spec.name {
                    Some(name) => name.clone(),
                    None if several => spec.local.clone(),
                    None => String::new(),
                },
                port: spec.port.or(args.port),
                ready: usize::from(args.ready),
                proxy_protocol: args.proxy_protocol,
                ..ServiceConfig::new(Service::Forward(resolve_local(&spec.local)?))
            })
        })
        .collect::<Result<Vec<_>, String>>()?;
    run_agent(AgentConfig {
        relays: args.relay,
        services,
        secret: Secret::select(args.secret, args.secret_file.path.as_deref())?,
        splice: !args.no_splice && Config::default().splice,
        reconnect: !args.no_reconnect,
        connect_timeout: args.connect_timeout,
        max_clients: args
            .max_clients
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        metrics: args.metrics,
    })
}

/// A local service's address, resolved once at start.
fn resolve_local(local: &str) -> Result<std::net::SocketAddr, String> {
    local
        .to_socket_addrs()
        .map_err(|e| format!("bad local address {local:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("local address {local:?} resolves to nothing"))
}

/// Registers (failing at once if that fails), then serves until a signal or
/// until the agent gives up. After every registration the public address
/// goes to stdout, alone on its line, for scripts: the relay's host as the
/// user wrote it, with the relayed port; with several services, the
/// service's name, a space, then the address.
fn run_agent(config: AgentConfig) -> Result<(), String> {
    let several = config.services.len() > 1;
    raise_fd_limit();
    let mut agent = Agent::new(config).map_err(|e| e.to_string())?;
    agent.on_registered(move |registered| print_address(registered, several));
    agent
        .stop_on_signals()
        .map_err(|e| format!("cannot watch signals: {e}"))?;
    agent.notify_systemd();
    agent.register().map_err(|e| e.to_string())?;
    agent.run().map_err(|e| e.to_string())
}

/// One registration's address line.
fn print_address(registered: &Registered, several: bool) {
    let relay = registered.relay.as_str();
    let host = relay.rsplit_once(':').map_or(relay, |(host, _)| host);
    let line = match several {
        true => format!("{} {host}:{}", registered.service, registered.port),
        false => format!("{host}:{}", registered.port),
    };
    // Not println!, which panics when stdout is gone (piped into `head`):
    // the agent keeps running; only its address line has nowhere to go.
    let mut out = std::io::stdout();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

/// Raises the soft descriptor limit to the hard one: each relayed client
/// costs two descriptors in the relay and two in the agent, and the usual
/// soft default (1024) would cap either at a few hundred clients for no
/// reason. Logs the limit either way.
fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return log::warn!(
            "cannot read the descriptor limit: {}",
            std::io::Error::last_os_error()
        );
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            rlim_max: limit.rlim_max,
        };
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
            limit = raised;
        }
    }
    log::info!("descriptor limit: {}", limit.rlim_cur);
}
