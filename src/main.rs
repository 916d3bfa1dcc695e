//! The `tcp-relay` command: arguments, logger, then the library does the work.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand};
use log::LevelFilter;
use tcp_relay::config::parse_duration;
use tcp_relay::{Config, EchoApp, Relay, RelayStyle};

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
}

#[derive(Args)]
struct EchoArgs {
    /// The relay's registration address.
    #[arg(long, default_value = "127.0.0.1:8080", value_name = "HOST:PORT")]
    relay: String,
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
        ..Config::default()
    };
    let relay = Relay::bind(config).map_err(|e| e.to_string())?;
    relay.run().map_err(|e| format!("relay failed: {e}"))
}

fn echo(args: EchoArgs) -> Result<(), String> {
    let relay = resolve(&args.relay)?;
    let app = EchoApp::connect(relay).map_err(|e| e.to_string())?;
    log::info!(
        "registered with relay {relay}: relayed port {}",
        app.relayed_port()
    );
    app.run().map_err(|e| e.to_string())
}

/// The first address `HOST:PORT` resolves to.
fn resolve(host_port: &str) -> Result<SocketAddr, String> {
    host_port
        .to_socket_addrs()
        .map_err(|e| format!("bad relay address {host_port:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("relay address {host_port:?} resolves to nothing"))
}
