//! The `tcp-relay` command: arguments and config file, logger, then the
//! library does the work.

use std::io::Write;
use std::net::ToSocketAddrs;
use std::process::ExitCode;

use cli::args::SecretFile;
use cli::print::{SecretSource, ServiceShown};
use cli::values::ProxySetting;
use cli::{Command, EchoArgs, ExposeArgs, LoadError, ServeArgs};
use log::LevelFilter;
use tcp_relay::{
    Agent, AgentConfig, Config, RateLimit, Registered, Relay, Secret, Service, ServiceConfig,
};

mod cli;

fn main() -> ExitCode {
    let loaded = match cli::load(std::env::args_os().collect()) {
        Ok(loaded) => loaded,
        Err(LoadError::Usage(e)) => e.exit(),
        // A config file's mistake is the command line's: status 2, as clap's.
        Err(LoadError::File(message)) => return fail(&message, ExitCode::from(2)),
    };
    let level = loaded.cli.level();
    if let Err(e) = simple_logger::SimpleLogger::new()
        .with_utc_timestamps()
        .with_level(level)
        .init()
    {
        eprintln!("tcp-relay: cannot start logging: {e}");
    }
    loaded.warnings.iter().for_each(|w| log::warn!("{w}"));
    let result = match loaded.cli.command {
        Command::Serve(args) => serve(args, level),
        Command::Echo(args) => echo(args),
        Command::Expose(args) => expose(args, level),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => fail(&message, ExitCode::FAILURE),
    }
}

/// The one line a failure leaves on stderr.
fn fail(message: &str, status: ExitCode) -> ExitCode {
    eprintln!("tcp-relay: error: {message}");
    status
}

fn serve(args: ServeArgs, level: LevelFilter) -> Result<(), String> {
    let print_config = args.file.print_config;
    let (config, secret) = serve_config(args)?;
    if print_config {
        return print(&cli::print::serve(&config, &secret, level));
    }
    raise_fd_limit();
    let mut relay = Relay::bind(config).map_err(|e| e.to_string())?;
    relay
        .stop_on_signals()
        .map_err(|e| format!("cannot watch signals: {e}"))?;
    relay.notify_systemd();
    relay.run().map_err(|e| format!("relay failed: {e}"))
}

/// The relay's configuration, and where its secret came from.
fn serve_config(args: ServeArgs) -> Result<(Config, SecretSource), String> {
    let (secret, source) = select_secret(args.secret, &args.secret_file)?;
    let config = Config {
        bind: args.bind,
        reg_port: args.reg_port,
        relay_style: args.relay_style,
        dial_in_timeout: args.dial_in_timeout,
        secret,
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
        allow_apps: args.allow_apps,
        allow_clients: args.allow_clients,
        client_rate: args
            .client_rate
            .map(|rate| RateLimit::new(rate, args.client_burst)),
        ..Config::default()
    };
    Ok((config, source))
}

/// The secret the flags select (see [`Secret::select`]), and its source.
fn select_secret(
    given: Option<String>,
    file: &SecretFile,
) -> Result<(Option<Secret>, SecretSource), String> {
    let source = match (&given, &file.path) {
        (Some(_), _) => SecretSource::Given,
        (None, Some(path)) => SecretSource::File(path.clone()),
        (None, None) => SecretSource::None,
    };
    let secret = Secret::select(given, file.path.as_deref())?;
    let source = match source {
        SecretSource::None if secret.is_some() => SecretSource::Credential,
        source => source,
    };
    Ok((secret, source))
}

/// `--print-config`'s output, to stdout.
fn print(text: &str) -> Result<(), String> {
    let mut out = std::io::stdout();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| format!("cannot print the configuration: {e}"))
}

fn echo(args: EchoArgs) -> Result<(), String> {
    run_agent(AgentConfig {
        relays: args.relay,
        secret: Secret::select(args.secret, args.secret_file.path.as_deref())?,
        reconnect: false,
        ..AgentConfig::new(String::new(), Service::Echo)
    })
}

fn expose(args: ExposeArgs, level: LevelFilter) -> Result<(), String> {
    let (services, shown) = expose_services(&args)?;
    let (secret, source) = select_secret(args.secret, &args.secret_file)?;
    let config = AgentConfig {
        relays: args.relay,
        services,
        secret,
        splice: !args.no_splice && Config::default().splice,
        reconnect: !args.no_reconnect,
        connect_timeout: args.connect_timeout,
        max_clients: args
            .max_clients
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        metrics: args.metrics,
    };
    if args.file.print_config {
        config.check()?;
        return print(&cli::print::expose(&config, &shown, &source, level));
    }
    run_agent(config)
}

/// The services to publish: from `--local` or the config file, `--port`,
/// `--ready`, `--proxy-protocol`, `--allow-clients`, `--client-rate` and
/// `--client-burst` filling in what a service leaves out.
fn expose_services(args: &ExposeArgs) -> Result<(Vec<ServiceConfig>, Vec<ServiceShown>), String> {
    if args.local.is_empty() {
        return Err(
            "nothing to expose: give --local HOST:PORT (or local or [[service]] in the config file)"
                .into(),
        );
    }
    if args.port.is_some() && args.local.len() > 1 {
        return Err(
            "--port is for one service; with several, give each its port as --local NAME=HOST:PORT@PORT"
                .into(),
        );
    }
    let several = args.local.len() > 1;
    let mut services = Vec::new();
    for spec in &args.local {
        services.push(ServiceConfig {
            name: match &spec.name {
                Some(name) => name.clone(),
                None if several => spec.local.clone(),
                None => String::new(),
            },
            port: spec.port.or(args.port),
            ready: usize::from(spec.ready.unwrap_or(args.ready)),
            proxy_protocol: spec
                .proxy_protocol
                .or(args.proxy_protocol)
                .and_then(ProxySetting::version),
            allow_clients: spec.allow_clients.clone().or(args.allow_clients.clone()),
            client_rate: spec
                .client_rate
                .or(args.client_rate)
                .map(|rate| RateLimit::new(rate, spec.client_burst.or(args.client_burst))),
            ..ServiceConfig::new(Service::Forward(resolve_local(&spec.local)?))
        });
    }
    let shown = args.local.iter().map(|spec| ServiceShown {
        local: spec.local.clone(),
        named: spec.name.is_some(),
    });
    Ok((services, shown.collect()))
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
