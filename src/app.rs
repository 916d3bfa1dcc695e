//! The app side: an [`Agent`] registers with a relay and, for every client
//! the relay announces, dials in and serves that client: by echoing
//! ([`Service::Echo`], the sample app) or by piping it to a local TCP service
//! ([`Service::Forward`], `tcp-relay expose`).
//!
//! It runs on the same [`Reactor`] and the same [`Direction`](crate::pipe)
//! code as the relay: one thread, no thread per client, bounded rings,
//! half-close carried. The control connection has its own small state
//! machine, so that losing the relay never stalls the pipes already running:
//!
//! ```text
//!  Waiting ──(time to connect)──► Connecting ──(connected)──► Registering
//!     ▲                                │                          │
//!     │                                │ failed            established (and the
//!     │                                ▼                   answer to `port N`)
//!     └──── back-off with jitter ◄── lost ◄────────────────── Ready
//!                  (or give up: --no-reconnect, or a refused request)
//! ```

use std::fmt;
use std::hash::{BuildHasher, RandomState};
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Registry, Token};
use slab::Slab;

use crate::auth::{self, DialToken};
use crate::config::Secret;
use crate::pipe::{Broken, Echo, Endpoint, Flow, Pipe, RxState};
use crate::pool::BufferPool;
use crate::protocol::{
    LineReader, MAX_READY, RelayLine, auth_line, parse_relay_line, port_request_line, ready_line,
    token_line,
};
use crate::reactor::{self, Handler, Reactor, Stopper, Timers, split, token};
use crate::sockio::{Io, keep_alive, read_slice, reset_on_close, write_slice};

/// The control connection's token.
const CONTROL: Token = reactor::MAIN;

/// Sockets of a client entry, by sub-token.
const DIAL_IN: usize = 0;
const LOCAL: usize = 1;

/// How long connecting to the relay, and then registering, may each take.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Reconnect back-off: doubled from the first to the cap, each delay drawn
/// between half and all of it, so agents that lost the same relay do not
/// all come back in the same instant.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// Ring size for the agent's pipes and echoes.
const BUFFER_SIZE: usize = 64 * 1024;

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
}

impl AgentConfig {
    /// The default of [`connect_timeout`](Self::connect_timeout), as the
    /// relay's default dial-in timeout.
    pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
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
    core: Core,       // everything the handler owns
}

impl Agent {
    /// An agent that will connect to `config.relay` on its first turn.
    pub fn new(config: AgentConfig) -> io::Result<Agent> {
        let splice = config.splice;
        let reactor = Reactor::new()?;
        let core = Core {
            registry: reactor.registry().try_clone()?,
            config,
            control: Control::Waiting(Instant::now()),
            attempts: 0,
            public_port: Arc::new(AtomicU16::new(0)),
            on_registered: None,
            failure: None,
            conns: Slab::new(),
            pool: BufferPool::new(BUFFER_SIZE, 16).with_splice(splice),
            requeued: Vec::new(),
            closing: Vec::new(),
            local_down: false,
            timers: Timers::default(),
            next_id: 0,
        };
        Ok(Agent { reactor, core })
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

/// The control connection, by phase.
enum Control {
    /// Not connected; (re)connect at this instant.
    Waiting(Instant),
    /// A non-blocking connect under way, to give up on at the deadline.
    Connecting(TcpStream, Instant),
    /// Connected; waiting for the established line (and, after a `port`
    /// request, for the relay's answer) until the deadline.
    Registering(Link, Instant),
    /// Registered on this relayed port; serving dial lines.
    Ready(Link, u16),
    /// Gave up; the loop is ending.
    Failed,
}

/// A connected control connection.
struct Link {
    stream: TcpStream,  // to the relay's registration port
    relay: SocketAddr,  // its address; dial-ins go to the same IP
    lines: LineReader,  // frames the relay's lines
    established: usize, // established lines seen on this connection
    greeted: bool,      // we answered the relay's first line
}

/// A client's connections on the agent side.
enum Conn {
    /// Connects under way: the dial-in, and the local service (if forwarding).
    Dialing {
        dial_in: TcpStream,
        local: Option<TcpStream>,
        connected: [bool; 2],     // by sub-token: dial-in, local
        rx: [RxState; 2],         // their read halves, from every event since registered
        token: Option<DialToken>, // to present first on the dial-in (with a secret)
        id: u64,                  // identity, for the connect timer
    },
    /// A dial-in being echoed.
    Echoing(Echo),
    /// A dial-in piped to the local service.
    Piping(Pipe),
    /// Placeholder for the instant of a transition.
    Closed,
}

/// The agent's state, driven by the reactor.
struct Core {
    registry: Registry,          // registers sockets as they are made
    config: AgentConfig,         // what the user asked for
    control: Control,            // the control connection's phase
    attempts: u32,               // failed (re)connects in a row, for back-off
    public_port: Arc<AtomicU16>, // relayed port, for other threads (0: none)
    on_registered: Option<Box<dyn FnMut(u16) + Send>>, // told each new port
    failure: Option<AgentError>, // why we gave up, once we have
    conns: Slab<Conn>,           // every client's dial-in (and local) sockets
    pool: BufferPool,            // rings lent while bytes are in flight
    requeued: Vec<Token>,        // entries that used their budget with work left
    closing: Vec<(usize, bool)>, // (key, abort) to reap at the end of the turn
    local_down: bool,            // the local service is failing (logged once)
    timers: Timers,              // connect deadlines of Dialing entries
    next_id: u64,                // identity of the next Dialing entry
}

impl Handler for Core {
    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.requeued.is_empty() {
            return Some(Duration::ZERO);
        }
        let deadline = match (self.control_deadline(), self.timers.next()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        reactor::until(deadline, now)
    }

    fn on_event(&mut self, event: &Event, now: Instant) {
        self.dispatch(event.token(), Some(event), now);
    }

    fn end_turn(&mut self, now: Instant) {
        for token in std::mem::take(&mut self.requeued) {
            self.dispatch(token, None, now);
        }
        if self.control_deadline().is_some_and(|d| d <= now) {
            self.control_due(now);
        }
        while let Some((key, id)) = self.timers.pop_due(now) {
            self.connect_timed_out(key, id);
        }
        self.reap();
    }
}

impl Core {
    fn relayed_port(&self) -> Option<u16> {
        match self.control {
            Control::Ready(_, port) => Some(port),
            _ => None,
        }
    }

    fn control_deadline(&self) -> Option<Instant> {
        match self.control {
            Control::Waiting(at) | Control::Connecting(_, at) | Control::Registering(_, at) => {
                Some(at)
            }
            Control::Ready(..) | Control::Failed => None,
        }
    }

    fn dispatch(&mut self, token: Token, event: Option<&Event>, now: Instant) {
        if token == CONTROL {
            return self.serve_control(event, now);
        }
        let (key, sub) = split(token);
        match self.conns.get_mut(key) {
            // A connect finished or failed: writable or error says which.
            Some(Conn::Dialing { .. }) => self.finish_connect(key, sub, event),
            Some(Conn::Echoing(echo)) => {
                if let Some(event) = event {
                    echo.end.note(event);
                }
                self.pump(key);
            }
            Some(Conn::Piping(pipe)) => {
                if let Some(event) = event {
                    let end = if sub == DIAL_IN {
                        &mut pipe.a
                    } else {
                        &mut pipe.b
                    };
                    end.note(event);
                }
                self.pump(key);
            }
            Some(Conn::Closed) | None => {}
        }
    }

    /// A control deadline passed: time to connect, or a connect or
    /// registration took too long.
    fn control_due(&mut self, now: Instant) {
        match &self.control {
            Control::Waiting(_) => self.connect(now),
            Control::Connecting(..) => self.lost(now, "connecting to the relay timed out".into()),
            Control::Registering(link, _) if link.established > 0 => self.lost(
                now,
                "the relay did not answer the port request (does it support --port?)".into(),
            ),
            Control::Registering(..) => {
                self.lost(now, "the relay did not register us in time".into())
            }
            Control::Ready(..) | Control::Failed => {}
        }
    }

    /// Resolves the relay's address and starts a non-blocking connect.
    fn connect(&mut self, now: Instant) {
        let relay = &self.config.relay;
        let addr = match relay.to_socket_addrs().map(|mut addrs| addrs.next()) {
            Ok(Some(addr)) => addr,
            Ok(None) => {
                return self.lost(now, format!("relay address {relay:?} resolves to nothing"));
            }
            Err(e) => return self.lost(now, format!("cannot resolve relay {relay:?}: {e}")),
        };
        let mut stream = match TcpStream::connect(addr) {
            Ok(stream) => stream,
            Err(e) => return self.lost(now, format!("cannot reach relay {addr}: {e}")),
        };
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self.registry.register(&mut stream, CONTROL, interest) {
            return self.lost(now, format!("cannot register the control connection: {e}"));
        }
        self.control = Control::Connecting(stream, now + REGISTER_TIMEOUT);
    }

    /// Drives the control connection: completes its connect, then reads the
    /// relay's lines. A short read ends reading (every later arrival raises
    /// a new edge, see `pipe.rs`), unless the event also said the relay
    /// closed or failed: only a further read reports that.
    fn serve_control(&mut self, event: Option<&Event>, now: Instant) {
        let ending = event.is_none_or(|e| e.is_read_closed() || e.is_error());
        if let Control::Connecting(stream, _) = &self.control {
            match connect_result(stream, None) {
                Ok(false) => return, // not yet: a spurious wake-up
                Ok(true) => self.connected(now),
                Err(e) => return self.lost(now, format!("cannot reach relay: {e}")),
            }
        }
        let mut buf = [0u8; 512];
        loop {
            let (Control::Registering(link, _) | Control::Ready(link, _)) = &mut self.control
            else {
                return;
            };
            match read_slice(&link.stream, &mut buf) {
                Io::Moved(n) => {
                    self.take_lines(&buf[..n], now);
                    if n < buf.len() && !ending {
                        return;
                    }
                }
                Io::WouldBlock => return,
                Io::Eof | Io::Reset => {
                    return self.lost(now, "the relay closed the control connection".into());
                }
                Io::Failed(e) => return self.lost(now, format!("control connection failed: {e}")),
            }
        }
    }

    /// Connecting => Registering. We speak only after the relay's first
    /// line, which tells whether it wants the secret proved first.
    fn connected(&mut self, now: Instant) {
        let Control::Connecting(stream, _) = std::mem::replace(&mut self.control, Control::Failed)
        else {
            return;
        };
        keep_alive(&stream);
        let relay = match stream.peer_addr() {
            Ok(addr) => addr,
            Err(e) => return self.lost(now, format!("cannot reach relay: {e}")),
        };
        let link = Link {
            stream,
            relay,
            lines: LineReader::new(),
            established: 0,
            greeted: false,
        };
        self.control = Control::Registering(link, now + REGISTER_TIMEOUT);
    }

    fn take_lines(&mut self, data: &[u8], now: Instant) {
        let (Control::Registering(link, _) | Control::Ready(link, _)) = &mut self.control else {
            return;
        };
        let mut lines = Vec::new();
        if let Err(e) = link
            .lines
            .feed(data, |line| lines.push(parse_relay_line(line)))
        {
            return self.lost(now, format!("relay sent {e}"));
        }
        for line in lines {
            match line {
                Ok(RelayLine::Dial(port, token)) => self.dial(port, token),
                Ok(RelayLine::Challenge(nonce)) => self.greet(Some(&nonce), now),
                Ok(RelayLine::Established(port)) => {
                    self.greet(None, now);
                    self.established(port);
                }
                Ok(RelayLine::Error(reason)) if is_final(&reason) => {
                    return self.give_up(AgentError::Refused(reason));
                }
                // A passing refusal (the relay is full, out of ports): try again later.
                Ok(RelayLine::Error(reason)) => {
                    return self.lost(now, format!("the relay refused: {reason}"));
                }
                Err(e) => log::warn!("relay sent a line we do not understand ({e}); ignored"),
            }
        }
    }

    /// Answers the relay's first line: the challenge (if it sent one) and
    /// our `port` request (if we have one), in one write. A few dozen bytes
    /// on a fresh connection: the send buffer is empty, so anything short of
    /// a full write means the connection is bad.
    fn greet(&mut self, nonce: Option<&[u8]>, now: Instant) {
        let Control::Registering(link, _) = &mut self.control else {
            return;
        };
        if std::mem::replace(&mut link.greeted, true) {
            return;
        }
        let mut lines = String::new();
        if let Some(nonce) = nonce {
            let Some(secret) = &self.config.secret else {
                let needed = "it requires a secret and we have none (--secret or TCP_RELAY_SECRET)";
                return self.give_up(AgentError::Refused(needed.into()));
            };
            lines += &auth_line(&auth::response(&secret.0, nonce));
        }
        if let Some(port) = self.config.port {
            lines += &port_request_line(port);
        }
        if self.config.ready > 0 {
            lines += &ready_line(self.config.ready.min(MAX_READY));
        }
        if lines.is_empty() {
            return;
        }
        if !matches!(write_slice(&link.stream, lines.as_bytes()), Io::Moved(n) if n == lines.len())
        {
            self.lost(now, "cannot send our requests to the relay".into());
        }
    }

    /// An established line. Without a `port` request the first one registers
    /// us; with one, the first is the port assigned on connect and the second
    /// the relay's answer to our request.
    fn established(&mut self, port: u16) {
        let needed = if self.config.port.is_some() { 2 } else { 1 };
        let link = match std::mem::replace(&mut self.control, Control::Failed) {
            Control::Registering(mut link, deadline) => {
                link.established += 1;
                if link.established < needed {
                    self.control = Control::Registering(link, deadline);
                    return;
                }
                link
            }
            Control::Ready(link, old) => {
                log::warn!("relay sent another established line (port {port}); ignored");
                self.control = Control::Ready(link, old);
                return;
            }
            other => {
                self.control = other;
                return;
            }
        };
        log::info!("registered with relay {}: relayed port {port}", link.relay);
        self.control = Control::Ready(link, port);
        self.attempts = 0;
        self.public_port.store(port, Ordering::Release);
        if let Some(tell) = self.on_registered.as_mut() {
            tell(port);
        }
    }

    /// The control connection is gone or could not be made: back off and
    /// try again, or give up if reconnecting is off.
    fn lost(&mut self, now: Instant, why: String) {
        self.public_port.store(0, Ordering::Release);
        if let Control::Connecting(mut stream, _)
        | Control::Registering(Link { mut stream, .. }, _)
        | Control::Ready(Link { mut stream, .. }, _) =
            std::mem::replace(&mut self.control, Control::Failed)
        {
            reactor::forget(&self.registry, &mut stream);
        }
        if !self.config.reconnect {
            return self.give_up(AgentError::Lost(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                why,
            )));
        }
        let delay = backoff(self.attempts);
        self.attempts = self.attempts.saturating_add(1);
        log::warn!("{why}; reconnecting in {delay:.1?}");
        self.control = Control::Waiting(now + delay);
    }

    /// Stops the loop for good; the caller reports `failure` (the command
    /// line prints it as its one error line, so it is only logged at debug).
    fn give_up(&mut self, failure: AgentError) {
        log::debug!("giving up: {failure}");
        self.control = Control::Failed;
        // The loop checks `failure` after each turn and ends; the stopper
        // is not used, so that a failure is not mistaken for a stop request.
        self.failure = Some(failure);
    }

    /// Starts the connects for one client: the dial-in and, when forwarding,
    /// the local service, both non-blocking.
    fn dial(&mut self, port: u16, token: Option<DialToken>) {
        let (Control::Ready(link, _) | Control::Registering(link, _)) = &self.control else {
            return;
        };
        let addr = SocketAddr::new(link.relay.ip(), port);
        let dial_in = match TcpStream::connect(addr) {
            Ok(stream) => stream,
            Err(e) => return log::warn!("dial-in to {addr} failed: {e}"),
        };
        let local = match &self.config.service {
            Service::Echo => None,
            Service::Forward(local) => match TcpStream::connect(*local) {
                Ok(stream) => Some(stream),
                Err(e) => return self.local_failed(dial_in, &e),
            },
        };
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        self.next_id += 1;
        let id = self.next_id;
        let mut conn = Conn::Dialing {
            dial_in,
            local,
            connected: [false, false],
            rx: [RxState::default(); 2],
            token,
            id,
        };
        if let Err(e) = register_dialing(&self.registry, &mut conn, key) {
            return log::warn!("dial-in to {addr} dropped: {e}");
        }
        entry.insert(conn);
        let deadline = Instant::now() + self.config.connect_timeout;
        self.timers.add(deadline, key, id);
    }

    /// A client's connects did not all finish in time: close them with a
    /// reset (a dial-in the relay already paired resets its client) rather
    /// than leave the client hanging. A timer of an entry that has moved on
    /// (served, or closed and its key reused) finds a different state or id.
    fn connect_timed_out(&mut self, key: usize, id: u64) {
        let Some(Conn::Dialing {
            local,
            connected,
            id: current,
            ..
        }) = self.conns.get(key)
        else {
            return;
        };
        if *current != id {
            return;
        }
        let timeout = self.config.connect_timeout;
        if local.is_some() && !connected[LOCAL] {
            let e = io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect timed out after {timeout:?}"),
            );
            self.note_local(Some(&e));
        } else {
            log::debug!("dial-in connect timed out after {timeout:?}");
        }
        self.closing.push((key, true));
    }

    /// One of a client's connects finished (or failed); once all have, the
    /// client is served.
    fn finish_connect(&mut self, key: usize, sub: usize, event: Option<&Event>) {
        let Some(Conn::Dialing {
            dial_in,
            local,
            connected,
            rx,
            token,
            ..
        }) = self.conns.get_mut(key)
        else {
            return;
        };
        let stream = match (sub, local.as_ref()) {
            (DIAL_IN, _) => &*dial_in,
            (LOCAL, Some(local)) => local,
            _ => return,
        };
        // Bytes may come with the connect (a server-first service): noted
        // here, they spare the first pump a read that finds nothing.
        if let Some(event) = event {
            rx[sub].note(event);
        }
        if connected[sub] && !event.is_some_and(Event::is_error) {
            return; // news for a side already connected, kept in `rx`
        }
        match connect_result(stream, event) {
            Ok(true) if sub == DIAL_IN && !present(dial_in, token.take()) => {
                log::debug!("dial-in lost before its token was sent");
                return self.closing.push((key, true));
            }
            Ok(true) => {
                // Outgoing sockets inherit nothing: small messages must not
                // wait for Nagle here either.
                let _ = stream.set_nodelay(true);
                connected[sub] = true;
            }
            Ok(false) => return,
            Err(e) if sub == LOCAL => {
                reset_on_close(dial_in);
                self.note_local(Some(&e));
                return self.closing.push((key, true));
            }
            Err(e) => {
                log::debug!("dial-in failed: {e}");
                return self.closing.push((key, true));
            }
        }
        let forwarding = local.is_some();
        if !(connected[DIAL_IN] && (connected[LOCAL] || !forwarding)) {
            return;
        }
        if forwarding {
            self.note_local(None);
        }
        self.start_serving(key);
        self.pump(key);
    }

    /// Dialing => Echoing or Piping.
    fn start_serving(&mut self, key: usize) {
        let Some(slot) = self.conns.get_mut(key) else {
            return;
        };
        *slot = match std::mem::replace(slot, Conn::Closed) {
            Conn::Dialing {
                dial_in,
                local: None,
                rx,
                ..
            } => Conn::Echoing(Echo::new(Endpoint::new(dial_in, rx[DIAL_IN]))),
            Conn::Dialing {
                dial_in,
                local: Some(local),
                rx,
                ..
            } => Conn::Piping(Pipe::new(
                Endpoint::new(dial_in, rx[DIAL_IN]),
                Endpoint::new(local, rx[LOCAL]),
            )),
            other => other,
        };
    }

    /// The local service refused before the client was registered.
    fn local_failed(&mut self, dial_in: TcpStream, e: &io::Error) {
        reset_on_close(&dial_in);
        self.note_local(Some(e));
    }

    /// Logs the local service going down (once) and coming back (once),
    /// not once per client.
    fn note_local(&mut self, failure: Option<&io::Error>) {
        let Service::Forward(addr) = &self.config.service else {
            return;
        };
        match (failure, self.local_down) {
            (Some(e), false) => {
                log::warn!(
                    "local service {addr} unavailable ({e}); its clients are closed until it answers"
                );
                self.local_down = true;
            }
            (None, true) => {
                log::info!("local service {addr} answers again");
                self.local_down = false;
            }
            _ => {}
        }
    }

    fn pump(&mut self, key: usize) {
        let flow = match self.conns.get_mut(key) {
            Some(Conn::Echoing(echo)) => echo.pump(&mut self.pool),
            Some(Conn::Piping(pipe)) => pipe.pump(&mut self.pool),
            _ => return,
        };
        match flow {
            Ok(Flow::Idle) => {}
            Ok(Flow::More) => self.requeued.push(token(key, DIAL_IN)),
            Ok(Flow::Done) => self.closing.push((key, false)),
            Err(Broken::Reset) => self.closing.push((key, true)),
            Err(Broken::Failed(e)) => {
                log::debug!("client stream failed: {e}");
                self.closing.push((key, true));
            }
        }
    }

    fn reap(&mut self) {
        while let Some((key, abort)) = self.closing.pop() {
            let Some(conn) = self.conns.try_remove(key) else {
                continue;
            };
            let mut streams = match conn {
                Conn::Dialing { dial_in, local, .. } => [Some(dial_in), local],
                Conn::Echoing(mut echo) => {
                    echo.release(&mut self.pool);
                    [Some(echo.end.stream), None]
                }
                Conn::Piping(mut pipe) => {
                    pipe.release(&mut self.pool);
                    [Some(pipe.a.stream), Some(pipe.b.stream)]
                }
                Conn::Closed => continue,
            };
            for stream in streams.iter_mut().flatten() {
                if abort {
                    reset_on_close(stream);
                }
                reactor::forget(&self.registry, stream);
            }
        }
    }
}

/// Whether a refusal from the relay stands however often we ask: a wrong
/// secret, or a refused request of ours (`port`, `ready`). Others (too many
/// apps, no free relayed port) may pass, so a reconnecting agent retries.
fn is_final(reason: &str) -> bool {
    reason.starts_with("secret") || reason.starts_with("port ") || reason.starts_with("bad ")
}

/// Sends a dial-in's token line, if it has one (33 bytes on a fresh
/// connection: all or nothing). Returns whether the dial-in can be used.
fn present(dial_in: &TcpStream, token: Option<DialToken>) -> bool {
    let Some(token) = token else {
        return true;
    };
    let line = token_line(&token);
    matches!(write_slice(dial_in, line.as_bytes()), Io::Moved(n) if n == line.len())
}

/// Registers a client's connecting sockets under its key.
fn register_dialing(registry: &Registry, conn: &mut Conn, key: usize) -> io::Result<()> {
    let Conn::Dialing { dial_in, local, .. } = conn else {
        return Ok(());
    };
    let interest = Interest::READABLE | Interest::WRITABLE;
    registry.register(dial_in, token(key, DIAL_IN), interest)?;
    if let Some(local) = local {
        registry.register(local, token(key, LOCAL), interest)?;
    }
    Ok(())
}

/// Whether a non-blocking connect has completed: `Ok(true)` connected,
/// `Ok(false)` still under way, `Err` failed (mio's documented recipe:
/// `take_error`, then `peer_addr`).
///
/// A plain writable event (no error, no hang-up) on a connecting socket is
/// the kernel saying the handshake finished (a failed connect reports
/// EPOLLERR with it), so it needs neither `getsockopt(SO_ERROR)` nor
/// `getpeername` to confirm: four syscalls per client saved, on the agent's
/// busiest path (connection churn).
fn connect_result(stream: &TcpStream, event: Option<&Event>) -> io::Result<bool> {
    if event.is_some_and(|e| e.is_writable() && !e.is_error() && !e.is_write_closed()) {
        return Ok(true);
    }
    if let Some(e) = stream.take_error()? {
        return Err(e);
    }
    match stream.peer_addr() {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Ok(false),
        Err(e) => Err(e),
    }
}

/// The delay before reconnect attempt `attempt` (0-based): exponential,
/// capped, with jitter drawn from std's randomly seeded hasher.
fn backoff(attempt: u32) -> Duration {
    let full = BACKOFF_FIRST
        .saturating_mul(1u32 << attempt.min(16))
        .min(BACKOFF_CAP);
    let random = RandomState::new().hash_one(attempt);
    let fraction = 0.5 + (random % 1000) as f64 / 2000.0; // in [0.5, 1.0)
    full.mul_f64(fraction)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_with_jitter() {
        for attempt in 0..40 {
            let full = BACKOFF_FIRST
                .saturating_mul(1u32 << attempt.min(16))
                .min(BACKOFF_CAP);
            let delay = backoff(attempt);
            assert!(
                delay >= full / 2 && delay <= full,
                "attempt {attempt}: {delay:?}"
            );
        }
        assert!(backoff(30) <= BACKOFF_CAP);
        assert!(backoff(0) <= BACKOFF_FIRST);
    }
}
