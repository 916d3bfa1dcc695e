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
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::thread;
use std::time::Duration;

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

/// What an [`Agent`] needs.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The relay's registration address, `HOST:PORT`; resolved at each
    /// (re)connect, so a relay that moves to another address is followed.
    pub relay: String,
    /// What to do with each client.
    pub service: Service,
    /// Ask the relay for this relayed port (the `port` extension).
    pub port: Option<u16>,
    /// The relay's shared secret, for a relay that asks for it.
    pub secret: Option<Secret>,
    /// Ask the relay to keep this many dial-ins ready (the `ready`
    /// extension): a new client is then paired at once, without waiting for
    /// a dial-in round trip. Each ready dial-in is served (connected to the
    /// local service) as soon as it is made. 0: do not ask.
    pub ready: usize,
    /// Move bytes with `splice(2)` (Linux), as [`crate::Config::splice`].
    pub splice: bool,
    /// Reconnect when the relay goes away (otherwise the agent stops with
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
    /// Ask the relay to begin every dial-in with a PROXY protocol header
    /// naming the client (the `proxy` extension). The agent passes it to the
    /// local service untouched, so the service must expect it (nginx
    /// `listen … proxy_protocol`, HAProxy `accept-proxy`). Registration
    /// fails if the relay does not answer the request.
    pub proxy_protocol: Option<ProxyVersion>,
    /// Serve the status endpoint here (`GET /metrics`, `/status`, `/`), on
    /// the agent's own loop; `None`: no socket at all.
    pub metrics: Option<std::net::SocketAddr>,
}

impl AgentConfig {
    /// The default of [`connect_timeout`](Self::connect_timeout), as the
    /// relay's default dial-in timeout.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

    /// The default of [`max_clients`](Self::max_clients): what the soft
    /// descriptor limit holds when every client holds all it can: two
    /// sockets and, while bytes are in flight both ways, two kernel pipes
    /// for splicing (two descriptors each), keeping 64 descriptors for the
    /// control connection, the poll, the standard streams and slack. (A
    /// pipe that cannot be made falls back to a ring, but a socket that
    /// cannot be made loses its client, so sockets get the guarantee.)
    pub fn default_max_clients() -> usize {
        let limit = crate::sockio::descriptor_limit().unwrap_or(1024);
        (limit.saturating_sub(64) / 6).max(1)
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
pub struct Agent {
    reactor: Reactor, // the poll this agent runs on
    core: AgentCore,  // everything the handler owns
}

impl Agent {
    /// An agent that will connect to `config.relay` on its first turn.
    pub fn new(config: AgentConfig) -> io::Result<Agent> {
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

    /// Called with the relayed port after every (re)registration, e.g. to
    /// print the public address.
    pub fn on_registered(&mut self, f: impl FnMut(u16) + Send + 'static) {
        self.core.on_registered = Some(Box::new(f));
    }

    /// Runs the loop until registered; returns the relayed port. Fails if
    /// the relay cannot be reached or refuses, whatever `reconnect` says:
    /// a first registration that fails is a configuration error.
    pub fn register(&mut self) -> Result<u16, AgentError> {
        let reconnect = std::mem::replace(&mut self.core.config.reconnect, false);
        let outcome = self.reactor.run_while(&mut self.core, |core| {
            core.relayed_port().is_none() && core.failure.is_none()
        });
        self.core.config.reconnect = reconnect;
        outcome.map_err(AgentError::Lost)?;
        if let Some(failure) = self.core.failure.take() {
            return Err(failure);
        }
        self.relayed_port()
            .ok_or_else(|| AgentError::Lost(io::Error::other("stopped before registering")))
    }

    /// The relayed port, once registered (it may change after a reconnect).
    pub fn relayed_port(&self) -> Option<u16> {
        self.core.relayed_port()
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
        let public_port = self.core.public_port.clone();
        let thread = thread::Builder::new()
            .name("tcp-relay-agent".into())
            .spawn(move || self.run())?;
        Ok(RunningAgent {
            stopper,
            public_port,
            thread: Some(thread),
        })
    }
}

/// An agent on its own thread; dropping it stops the agent.
pub struct RunningAgent {
    stopper: Stopper,
    public_port: Arc<AtomicU16>,
    thread: Option<thread::JoinHandle<Result<(), AgentError>>>,
}

impl RunningAgent {
    /// The relayed port of the current registration (0 while unregistered).
    pub fn relayed_port(&self) -> u16 {
        self.public_port.load(Ordering::Acquire)
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
            relay: relay.to_string(),
            service: Service::Echo,
            port: None,
            secret: None,
            ready: 0,
            splice: crate::Config::default().splice,
            reconnect: false,
            connect_timeout: AgentConfig::DEFAULT_CONNECT_TIMEOUT,
            max_clients: None,
            proxy_protocol: None,
            metrics: None,
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
