//! The app side: an [`Agent`] registers with a relay and, for every client
//! the relay announces, dials in and serves that client: by echoing
//! ([`Service::Echo`], the sample app) or by piping it to a local TCP service
//! ([`Service::Forward`], `tcp-relay expose`).
//!
//! It runs on the same [`Reactor`], the same entry table and the same
//! [`Direction`](crate::pipe) code as the relay: one thread, no thread per
//! client, bounded rings, half-close carried. Its registration is an entry
//! of its own with its own phases (see `state`), so losing the relay never
//! stalls the clients already served.
//!
//! The handler is split by concern:
//!
//! * `core`: what the handler owns, dispatch by state, timers, pumping,
//!   deferred close;
//! * `control`: a registration's control connection, by phase;
//! * `clients`: each client's connects (under one deadline) and serving it;
//! * `state`: the entries and the data each phase owns.

mod clients;
mod control;
mod core;
mod state;
mod status;
#[cfg(test)]
mod tests;

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use crate::access::{AllowList, RateLimit};
use crate::config::Secret;
use crate::proxy_protocol::ProxyVersion;
use crate::reactor::{Reactor, Stopper};

use self::core::AgentCore;

/// What the agent does with each client's stream.
#[derive(Debug, Clone)]
pub enum Service {
    /// Echo every byte back (the sample app).
    Echo,
    /// Pipe it to a fresh connection to this local address.
    Forward(SocketAddr),
}

/// One service an agent publishes, on every relay it registers with.
#[derive(Debug, Clone)]
pub struct ServiceConfig {
    /// Its name, for the address lines (`<name> <host>:<port>`, when there
    /// are several) and the logs; may be empty when there is one.
    pub name: String,
    /// What to do with each of its clients.
    pub service: Service,
    /// Ask each relay for this relayed port (the `port` extension).
    pub port: Option<u16>,
    /// Ask each relay to keep this many dial-ins ready (the `ready`
    /// extension): a new client is then paired at once, without waiting for
    /// a dial-in round trip. Each ready dial-in is served (connected to the
    /// local service) as soon as it is made. 0: do not ask.
    pub ready: usize,
    /// Ask each relay to begin every dial-in with a PROXY protocol header
    /// naming the client (the `proxy` extension). The agent passes it to
    /// the local service untouched, so the service must expect it (nginx
    /// `listen … proxy_protocol`, HAProxy `accept-proxy`). Registration
    /// fails if the relay does not answer the request.
    pub proxy_protocol: Option<ProxyVersion>,
    /// Ask each relay to admit to this service's port only clients from
    /// these sources (the `allow` extension), on top of the relay's own
    /// `--allow-clients`. Registration fails if a relay does not answer.
    pub allow_clients: Option<AllowList>,
    /// Ask each relay to limit this service's new clients per source
    /// address (the `rate` extension); a relay applies this, or its own
    /// `--client-rate` where that is stricter. Registration fails if a
    /// relay does not answer.
    pub client_rate: Option<RateLimit>,
}

impl ServiceConfig {
    /// A service with no name and no extension asked for.
    pub fn new(service: Service) -> ServiceConfig {
        ServiceConfig {
            name: String::new(),
            service,
            port: None,
            ready: 0,
            proxy_protocol: None,
            allow_clients: None,
            client_rate: None,
        }
    }
}

/// What an [`Agent`] needs: the relays to register with, the services to
/// publish on each of them (one registration, with its own control
/// connection, per service and relay), and how.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The relays' registration addresses, `HOST:PORT`, each resolved at
    /// every (re)connect, so a relay that moves to another address is
    /// followed. Every service registers with every relay; each
    /// registration reconnects on its own, so losing one relay loses only
    /// the clients that were on it.
    pub relays: Vec<String>,
    /// What to publish.
    pub services: Vec<ServiceConfig>,
    /// The relays' shared secret, for relays that ask for it.
    pub secret: Option<Secret>,
    /// Move bytes with `splice(2)` (Linux), as [`crate::Config::splice`].
    pub splice: bool,
    /// Reconnect when a relay goes away (otherwise the agent stops with
    /// an error).
    pub reconnect: bool,
    /// How long a client's connects (its dial-in, the local service) may
    /// take. Past it the client is reset instead of left hanging: a service
    /// host that drops SYNs would otherwise hold it for the kernel's two
    /// minutes of SYN retries.
    pub connect_timeout: Duration,
    /// Most clients served at once: each holds a dial-in and a local
    /// connection, so the relay (which sends one dial line per client)
    /// would otherwise decide how many descriptors the agent spends. Dial
    /// lines beyond it wait in order; the relay's dial-in timeout answers
    /// for those that wait too long. `None`: sized from the descriptor
    /// limit (see [`AgentConfig::default_max_clients`]).
    pub max_clients: Option<usize>,
    /// Serve the status endpoint here (`GET /metrics`, `/status`, `/`), on
    /// the agent's own loop; `None`: no socket at all.
    pub metrics: Option<std::net::SocketAddr>,
}

/// One registration the agent holds: a service on a relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    /// The service's name ([`ServiceConfig::name`]).
    pub service: String,
    /// The relay's address, as configured.
    pub relay: String,
    /// The relayed port the relay gave it.
    pub port: u16,
}

impl AgentConfig {
    /// The default of [`connect_timeout`](Self::connect_timeout), as the
    /// relay's default dial-in timeout.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

    /// One service on one relay, with the defaults: no secret, splicing
    /// where it is available, reconnecting, a 10 s connect timeout, clients
    /// bounded by the descriptor limit, no status endpoint.
    pub fn new(relay: impl Into<String>, service: Service) -> AgentConfig {
        AgentConfig {
            relays: vec![relay.into()],
            services: vec![ServiceConfig::new(service)],
            secret: None,
            splice: crate::Config::default().splice,
            reconnect: true,
            connect_timeout: Self::DEFAULT_CONNECT_TIMEOUT,
            max_clients: None,
            metrics: None,
        }
    }

    /// Whether the config can run: at least one relay and one service, and
    /// several services each named, differently. [`Agent::new`] checks it;
    /// `expose --print-config` too, so that what it prints would run.
    pub fn check(&self) -> Result<(), String> {
        if self.relays.is_empty() {
            return Err("no relay to register with".into());
        }
        if self.services.is_empty() {
            return Err("no service to publish".into());
        }
        if self.services.len() > 1 {
            for (i, service) in self.services.iter().enumerate() {
                if service.name.is_empty() {
                    return Err("with several services, each needs a name".into());
                }
                if self.services[..i].iter().any(|s| s.name == service.name) {
                    return Err(format!("two services are named {:?}", service.name));
                }
            }
        }
        Ok(())
    }

    /// The default of [`max_clients`](Self::max_clients): what the soft
    /// descriptor limit holds at two sockets a client (its dial-in and its
    /// local connection), keeping 64 descriptors for the control
    /// connections, the poll, the standard streams and slack. Splice pipes
    /// (two descriptors each, only while bytes are in flight) are not
    /// counted: one that cannot be made falls back to a ring, and when
    /// pipes leave no descriptor for a new client's sockets, its dial
    /// request waits (dialing pauses and retries) rather than losing it.
    /// (It was a sixth of the limit, counting two pipes a client: 3,322 at
    /// a limit of 20,000 turned away the 8,000 idle clients of
    /// `benches/compare.sh`.)
    pub fn default_max_clients() -> usize {
        let limit = crate::sockio::descriptor_limit().unwrap_or(1024);
        (limit.saturating_sub(64) / 2).max(1)
    }
}

/// Why an agent stopped on its own.
#[derive(Debug)]
pub enum AgentError {
    /// The relay refused our request (`error <reason>`); retrying cannot help.
    Refused(String),
    /// The relay went away and reconnecting is off, or registering failed.
    Lost(io::Error),
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentError::Refused(reason) => write!(f, "the relay refused: {reason}"),
            AgentError::Lost(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for AgentError {}

impl From<AgentError> for io::Error {
    fn from(e: AgentError) -> io::Error {
        match e {
            AgentError::Lost(e) => e,
            refused => io::Error::new(io::ErrorKind::ConnectionRefused, refused.to_string()),
        }
    }
}

/// An app-side agent, ready to [`register`](Agent::register) and
/// [`run`](Agent::run).
///
/// ```no_run
/// use tcp_relay::{Agent, AgentConfig, Service, ServiceConfig};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let local = Service::Forward("127.0.0.1:3000".parse()?);
/// let mut config = AgentConfig::new("relay.example.com:8080", local);
/// config.services[0].name = "web".into();
/// config.services[0].port = Some(8081); // ask each relay for port 8081
/// config.services.push(ServiceConfig {
///     name: "ssh".into(),
///     allow_clients: Some("198.51.100.0/24".parse()?),
///     ..ServiceConfig::new(Service::Forward("127.0.0.1:22".parse()?))
/// });
/// config.relays.push("relay-b.example.com:8080".into());
/// let mut agent = Agent::new(config)?;
/// agent.on_registered(|r| println!("{} {}:{}", r.service, r.relay, r.port));
/// agent.register()?; // every service up on at least one relay
/// let running = agent.spawn()?;
/// println!("{:?}", running.registrations());
/// # Ok(())
/// # }
/// ```
pub struct Agent {
    reactor: Reactor, // the poll this agent runs on
    core: AgentCore,  // everything the handler owns
}

impl Agent {
    /// An agent that will connect to `config.relay` on its first turn.
    ///
    /// Fails (`InvalidInput`) without a relay or a service, or when several
    /// services do not each have a name of their own.
    pub fn new(config: AgentConfig) -> io::Result<Agent> {
        config
            .check()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        let reactor = Reactor::new()?;
        let status = config
            .metrics
            .map(|addr| status::open_status(reactor.registry(), addr))
            .transpose()?;
        let mut core = AgentCore::new(config, reactor.registry().try_clone()?);
        core.status = status;
        Ok(Agent { reactor, core })
    }

    /// Where the status endpoint listens ([`AgentConfig::metrics`]), with
    /// the real port when bound to port 0.
    pub fn status_addr(&self) -> Option<std::net::SocketAddr> {
        self.core.status.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Called after every (re)registration of a service on a relay, e.g.
    /// to print the public address.
    pub fn on_registered(&mut self, f: impl FnMut(&Registered) + Send + 'static) {
        self.core.on_registered = Some(Box::new(f));
    }

    /// Runs the loop until every registration has either come up or failed
    /// once; returns the first service's relayed port. Fails if a relay
    /// refused for good (a wrong secret, a port taken), or if a service came
    /// up on no relay at all: a first registration that fails is a
    /// configuration error. With several relays, one that is down at start
    /// is retried in the background (with `reconnect`) while the others
    /// serve.
    pub fn register(&mut self) -> Result<u16, AgentError> {
        let outcome = self.reactor.run_while(&mut self.core, |core| {
            core.failure.is_none() && !core.settled()
        });
        outcome.map_err(AgentError::Lost)?;
        if let Some(failure) = self.core.failure.take() {
            return Err(failure);
        }
        if let Some(why) = self.core.unregistered_service() {
            return Err(AgentError::Lost(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                why,
            )));
        }
        let port = self.relayed_port();
        self.core.started = port.is_some();
        port.ok_or_else(|| AgentError::Lost(io::Error::other("stopped before registering")))
    }

    /// The first service's relayed port on the first relay it registered
    /// with, once registered (it may change after a reconnect).
    pub fn relayed_port(&self) -> Option<u16> {
        self.core.relayed_port()
    }

    /// The registrations up now.
    pub fn registrations(&self) -> Vec<Registered> {
        self.core.registrations_now()
    }

    /// Stops the agent from another thread.
    pub fn stopper(&self) -> Stopper {
        self.reactor.stopper()
    }

    /// Makes SIGINT and SIGTERM stop the agent (for the command line).
    pub fn stop_on_signals(&mut self) -> io::Result<()> {
        self.reactor.stop_on_signals()
    }

    /// Under a systemd `Type=notify` unit (`$NOTIFY_SOCKET` set), tells
    /// systemd `READY=1` once registered, pings its watchdog
    /// (`WatchdogSec`) from the loop, and says `STOPPING=1` on SIGINT or
    /// SIGTERM. Returns whether systemd is listening.
    pub fn notify_systemd(&mut self) -> bool {
        self.reactor.notify_systemd()
    }

    /// Serves clients until stopped (`Ok`) or until it gives up (`Err`).
    pub fn run(mut self) -> Result<(), AgentError> {
        let stopped = self
            .reactor
            .run_while(&mut self.core, |core| core.failure.is_none())
            .map_err(AgentError::Lost)?;
        match self.core.failure.take() {
            Some(failure) if !stopped => Err(failure),
            _ => Ok(()),
        }
    }

    /// Runs the agent on a thread of its own; it stops when the result drops.
    pub fn spawn(self) -> io::Result<RunningAgent> {
        let stopper = self.stopper();
        let shared = self.core.shared.clone();
        let thread = thread::Builder::new()
            .name("tcp-relay-agent".into())
            .spawn(move || self.run())?;
        Ok(RunningAgent {
            stopper,
            shared,
            thread: Some(thread),
        })
    }
}

/// An agent on its own thread; dropping it stops the agent.
pub struct RunningAgent {
    stopper: Stopper,                    // stops its loop
    shared: Arc<Mutex<Vec<Registered>>>, // its registrations, as of its last change
    thread: Option<thread::JoinHandle<Result<(), AgentError>>>,
}

impl RunningAgent {
    /// The first service's relayed port on the first relay it registered
    /// with (0 while unregistered).
    pub fn relayed_port(&self) -> u16 {
        self.registrations().first().map_or(0, |r| r.port)
    }

    /// The registrations up now.
    pub fn registrations(&self) -> Vec<Registered> {
        match self.shared.lock() {
            Ok(registrations) => registrations.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Whether the agent's thread has ended (it gave up, or was stopped).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for RunningAgent {
    fn drop(&mut self) {
        self.stopper.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A running sample app, as returned by [`EchoApp::spawn`].
pub type RunningEcho = RunningAgent;

/// The sample app: an [`Agent`] with [`Service::Echo`], registered at once.
pub struct EchoApp {
    agent: Agent,
    relayed_port: u16,
}

impl EchoApp {
    /// Registers with the relay at `relay` (at most 10 s each to connect and
    /// to get the `established` line). Does not reconnect.
    pub fn connect(relay: SocketAddr) -> io::Result<EchoApp> {
        let mut agent = Agent::new(AgentConfig {
            reconnect: false,
            ..AgentConfig::new(relay.to_string(), Service::Echo)
        })?;
        let relayed_port = agent.register()?;
        Ok(EchoApp {
            agent,
            relayed_port,
        })
    }

    /// The public port the relay opened for this app.
    pub fn relayed_port(&self) -> u16 {
        self.relayed_port
    }

    /// Stops the app from another thread.
    pub fn stopper(&self) -> Stopper {
        self.agent.stopper()
    }

    /// Makes SIGINT and SIGTERM stop the app (for the command line).
    pub fn stop_on_signals(&mut self) -> io::Result<()> {
        self.agent.stop_on_signals()
    }

    /// Serves clients until stopped (`Ok`) or until the relay ends the
    /// control connection (`Err`, saying so).
    pub fn run(self) -> io::Result<()> {
        Ok(self.agent.run()?)
    }

    /// Runs the app on a thread of its own; it stops when the result drops.
    pub fn spawn(self) -> io::Result<RunningEcho> {
        self.agent.spawn()
    }
}
