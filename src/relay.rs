//! The relay's reactor handler: accepts apps, clients and dial-ins, pairs
//! them, pumps pipes, fires dial-in timeouts and reaps closed entries.

use std::collections::BTreeSet;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry, Token};
use slab::Slab;

use crate::config::{Config, RelayStyle};
use crate::pipe::{Broken, Endpoint, Flow, Pipe, Side};
use crate::pool::BufferPool;
use crate::protocol::{ProtocolError, dial_line, error_line, established_line};
use crate::reactor::{
    self, ACCEPT_BUDGET, AcceptGate, Accepted, Handler, Reactor, Stopper, Timers, split, token,
};
use crate::sockio::{keep_alive, reset_on_close};
use crate::state::{App, Conn, Ending, Waiting};

/// The registration listener's token (fixed; connection tokens are slab keys).
const REG_LISTENER: Token = reactor::MAIN;

/// Sockets of an app entry, by sub-token.
const CONTROL: usize = 0;
const RELAYED: usize = 1;
const DIAL: usize = 2;

/// Sockets of a client entry, by sub-token.
const CLIENT: usize = 0;
const DIAL_IN: usize = 1;

/// Free rings the pool keeps for reuse: enough for a burst of busy pipes,
/// small enough (64 × 64 KiB = 4 MiB) to give memory back after it.
const POOL_MAX_IDLE: usize = 64;

/// Counts of entries by state, kept by the reactor as states change.
#[derive(Default)]
struct Census {
    apps: usize,    // Registering + Registered
    waiting: usize, // AwaitingDialIn
    pipes: usize,   // Piping
}

impl Census {
    fn count(&mut self, conn: &Conn) -> Option<&mut usize> {
        match conn {
            Conn::Registering(_) | Conn::Registered(_) => Some(&mut self.apps),
            Conn::AwaitingDialIn(_) => Some(&mut self.waiting),
            Conn::Piping(_) => Some(&mut self.pipes),
            Conn::Closed => None,
        }
    }

    fn entered(&mut self, conn: &Conn) {
        if let Some(n) = self.count(conn) {
            *n += 1;
        }
    }

    fn left(&mut self, conn: &Conn) {
        if let Some(n) = self.count(conn) {
            *n -= 1;
        }
    }
}

/// What the relay holds right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Registered apps (each with a control connection and two listeners).
    pub apps: usize,
    /// Clients waiting for a dial-in.
    pub waiting_clients: usize,
    /// Client/dial-in pairs being piped.
    pub pipes: usize,
    /// Ring buffers lent out (only pipes with bytes in flight hold one).
    pub buffers_lent: usize,
}

impl Stats {
    /// Client-side connections held: waiting clients plus both ends of pipes.
    pub fn client_connections(&self) -> usize {
        self.waiting_clients + 2 * self.pipes
    }
}

/// Controls a running relay from any thread.
#[derive(Clone)]
pub struct RelayHandle {
    stopper: Stopper,
    published: Arc<Mutex<Stats>>,
    reg_addr: SocketAddr,
}

impl RelayHandle {
    /// Asks the relay's loop to return. Its sockets close when the [`Relay`]
    /// is dropped.
    pub fn stop(&self) {
        self.stopper.stop();
    }

    /// Counts of what the relay holds, as of its last completed turn (a
    /// consistent snapshot: never half of a transition).
    pub fn stats(&self) -> Stats {
        match self.published.lock() {
            Ok(stats) => *stats,
            Err(poisoned) => *poisoned.into_inner(),
        }
    }

    /// The address apps register on.
    pub fn reg_addr(&self) -> SocketAddr {
        self.reg_addr
    }
}

/// A bound relay, ready to [`run`](Relay::run).
pub struct Relay {
    reactor: Reactor, // the poll this relay runs on
    core: Core,       // everything the handler owns
}

impl Relay {
    /// Binds the registration port. Fails with a message naming the address.
    pub fn bind(config: Config) -> io::Result<Relay> {
        let reactor = Reactor::new()?;
        let addr = SocketAddr::new(config.bind, config.reg_port);
        let mut reg = TcpListener::bind(addr)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        reactor
            .registry()
            .register(&mut reg, REG_LISTENER, Interest::READABLE)?;
        let reg_addr = reg.local_addr()?;
        let core = Core {
            registry: reactor.registry().try_clone()?,
            pool: BufferPool::new(config.buffer_size, POOL_MAX_IDLE),
            config,
            reg,
            reg_addr,
            conns: Slab::new(),
            timers: Timers::default(),
            gate: AcceptGate::default(),
            requeued: Vec::new(),
            closing: Vec::new(),
            held_ports: BTreeSet::new(),
            next_id: 0,
            census: Census::default(),
            published: Arc::default(),
        };
        Ok(Relay { reactor, core })
    }

    /// The registration address (with the real port when bound to port 0).
    pub fn reg_addr(&self) -> SocketAddr {
        self.core.reg_addr
    }

    /// A handle to stop and observe the relay from another thread.
    pub fn handle(&self) -> RelayHandle {
        RelayHandle {
            stopper: self.reactor.stopper(),
            published: self.core.published.clone(),
            reg_addr: self.core.reg_addr,
        }
    }

    /// Makes SIGINT and SIGTERM stop the relay (for the command line).
    pub fn stop_on_signals(&mut self) -> io::Result<()> {
        self.reactor.stop_on_signals()
    }

    /// Runs the reactor on this thread until [`RelayHandle::stop`] (or a
    /// signal, after [`Relay::stop_on_signals`]).
    pub fn run(mut self) -> io::Result<()> {
        log::info!(
            "listening for apps on {} (relay style {}, dial-in timeout {:?})",
            self.core.reg_addr,
            self.core.config.relay_style,
            self.core.config.dial_in_timeout
        );
        self.reactor.run(&mut self.core)?;
        log::info!("relay stopped");
        Ok(())
    }

    /// Runs the relay on a thread of its own, for tests, benchmarks and
    /// programs that embed it. The relay stops when the result is dropped.
    pub fn spawn(self) -> io::Result<RunningRelay> {
        let handle = self.handle();
        let thread = thread::Builder::new()
            .name("tcp-relay".into())
            .spawn(move || self.run())?;
        Ok(RunningRelay {
            handle,
            thread: Some(thread),
        })
    }
}

/// A relay running on its own thread; dropping it stops the relay.
pub struct RunningRelay {
    handle: RelayHandle,
    thread: Option<thread::JoinHandle<io::Result<()>>>,
}

impl RunningRelay {
    /// The handle to observe (or stop) the relay.
    pub fn handle(&self) -> &RelayHandle {
        &self.handle
    }

    /// The address apps register on.
    pub fn reg_addr(&self) -> SocketAddr {
        self.handle.reg_addr
    }

    /// Counts of what the relay holds.
    pub fn stats(&self) -> Stats {
        self.handle.stats()
    }
}

impl Drop for RunningRelay {
    fn drop(&mut self) {
        self.handle.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The relay's state, driven by the reactor through [`Handler`].
struct Core {
    registry: Registry,            // registers sockets accepted mid-turn
    config: Config,                // what the user asked for
    reg: TcpListener,              // the registration port
    reg_addr: SocketAddr,          // its bound address
    conns: Slab<Conn>,             // every app, waiting client and pipe
    pool: BufferPool,              // rings lent to directions with bytes in flight
    timers: Timers,                // dial-in deadlines
    gate: AcceptGate,              // accept back-off when out of descriptors
    requeued: Vec<Token>,          // sockets that used their budget with work left
    closing: Vec<(usize, Ending)>, // entries to reap at the end of the turn
    held_ports: BTreeSet<u16>,     // relayed ports apps hold now
    next_id: u64,                  // identity for the next waiting client
    census: Census,                // entries by state
    published: Arc<Mutex<Stats>>,  // the census as of the last turn, for other threads
}

impl Handler for Core {
    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.requeued.is_empty() {
            return Some(Duration::ZERO);
        }
        reactor::until(
            reactor::earliest(self.timers.next(), self.gate.deadline()),
            now,
        )
    }

    fn on_event(&mut self, event: &Event, now: Instant) {
        self.dispatch(event.token(), Some(event), now);
    }

    fn end_turn(&mut self, now: Instant) {
        for token in std::mem::take(&mut self.requeued) {
            self.dispatch(token, None, now);
        }
        self.requeued.extend(self.gate.take_due(now));
        self.expire_waiting(now);
        self.reap();
        self.publish();
    }
}

impl Core {
    /// Copies the census to where [`RelayHandle::stats`] reads it.
    fn publish(&self) {
        let stats = Stats {
            apps: self.census.apps,
            waiting_clients: self.census.waiting,
            pipes: self.census.pipes,
            buffers_lent: self.pool.lent(),
        };
        if let Ok(mut published) = self.published.lock() {
            *published = stats;
        }
    }

    /// Routes readiness (an event, or `None` for requeued work) to the
    /// handler for the entry's state. Tokens of vacant entries are stale and
    /// ignored.
    fn dispatch(&mut self, token: Token, event: Option<&Event>, now: Instant) {
        if token == REG_LISTENER {
            return self.accept_from(REG_LISTENER, now);
        }
        let (key, sub) = split(token);
        match (self.conns.get_mut(key), sub) {
            // The app's control connection: read (and ignore) lines, write ours.
            (Some(Conn::Registering(app) | Conn::Registered(app)), CONTROL) => {
                if let Some(event) = event {
                    app.note(event);
                }
                self.serve_control(key);
            }
            // A client or a dial-in knocking on one of the app's listeners.
            (Some(Conn::Registering(_) | Conn::Registered(_)), RELAYED | DIAL) => {
                self.accept_from(token, now);
            }
            // A waiting client is not read (no peer yet); only a reset matters.
            (Some(Conn::AwaitingDialIn(waiting)), _) => {
                if let Some(event) = event {
                    waiting.client.note(event);
                    if event.is_error() && waiting.failed().is_some() {
                        self.close(key, Ending::Gone);
                    }
                }
            }
            // A pipe: record readiness on the right side, then move bytes.
            (Some(Conn::Piping(pipe)), CLIENT | DIAL_IN) => {
                if let Some(event) = event {
                    let side = if sub == CLIENT { Side::A } else { Side::B };
                    pipe.endpoint_mut(side).note(event);
                }
                self.pump(key);
            }
            _ => {}
        }
    }

    /// Accepts from one listener until it is drained, the budget is spent
    /// (then it is requeued) or descriptors run out (then the gate retries).
    fn accept_from(&mut self, listener: Token, now: Instant) {
        if !self.gate.is_open(now) {
            return self.gate.starve(listener);
        }
        for _ in 0..ACCEPT_BUDGET {
            let Some(socket) = self.listener(listener) else {
                return;
            };
            match reactor::accept(socket) {
                Accepted::Conn(stream, peer) => {
                    self.gate.succeeded();
                    self.on_accepted(listener, stream, peer, now);
                }
                Accepted::Empty => return,
                Accepted::Skip => {}
                Accepted::Exhausted(e) => return self.gate.exhausted(now, listener, &e),
            }
        }
        self.requeued.push(listener);
    }

    /// The listener behind a listener token, if it still exists.
    fn listener(&self, listener: Token) -> Option<&TcpListener> {
        if listener == REG_LISTENER {
            return Some(&self.reg);
        }
        let (key, sub) = split(listener);
        match (self.conns.get(key), sub) {
            (Some(Conn::Registering(app) | Conn::Registered(app)), RELAYED) => Some(&app.relayed),
            (Some(Conn::Registering(app) | Conn::Registered(app)), DIAL) => Some(&app.dial),
            _ => None,
        }
    }

    fn on_accepted(&mut self, listener: Token, stream: TcpStream, peer: SocketAddr, now: Instant) {
        if listener == REG_LISTENER {
            return self.register_app(stream, peer);
        }
        match split(listener) {
            (app, RELAYED) => self.admit_client(app, stream, peer, now),
            (app, DIAL) => self.admit_dial_in(app, stream, peer),
            _ => {}
        }
    }

    /// A new app: open its relayed port and dial-in listener, then tell it.
    fn register_app(&mut self, mut control: TcpStream, peer: SocketAddr) {
        keep_alive(&control);
        let listeners = self.open_relayed_port().and_then(|relayed| {
            let dial = TcpListener::bind(SocketAddr::new(self.config.bind, 0))?;
            Ok((relayed, dial))
        });
        let (mut relayed, mut dial) = match listeners {
            Ok(pair) => pair,
            Err(e) => return log::warn!("app {peer} refused: cannot open a relayed port: {e}"),
        };
        let ports = match (relayed.local_addr(), dial.local_addr()) {
            (Ok(r), Ok(d)) => (r.port(), d.port()),
            (Err(e), _) | (_, Err(e)) => return log::warn!("app {peer} refused: {e}"),
        };
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let registered = self
            .registry
            .register(
                &mut control,
                token(key, CONTROL),
                Interest::READABLE | Interest::WRITABLE,
            )
            .and_then(|()| {
                self.registry
                    .register(&mut relayed, token(key, RELAYED), Interest::READABLE)
            })
            .and_then(|()| {
                self.registry
                    .register(&mut dial, token(key, DIAL), Interest::READABLE)
            });
        if let Err(e) = registered {
            return log::warn!("app {peer} refused: cannot register its sockets: {e}");
        }
        let mut app = App::new(control, peer, relayed, dial, ports);
        app.queue(&established_line(ports.0));
        let conn = entry.insert(Conn::Registering(app));
        self.census.entered(conn);
        self.held_ports.insert(ports.0);
        log::info!(
            "app {peer} registered: relayed port {} open (dial-in port {})",
            ports.0,
            ports.1
        );
        self.serve_control(key);
    }

    /// A listener for a new app's relayed port, chosen by the relay style.
    fn open_relayed_port(&self) -> io::Result<TcpListener> {
        let ip = self.config.bind;
        if self.config.relay_style == RelayStyle::Random {
            return TcpListener::bind(SocketAddr::new(ip, 0));
        }
        // Lowest free port above the registration port: ports apps hold are
        // skipped without a syscall, ports others hold fail to bind.
        let first = self.reg_addr.port().saturating_add(1);
        for port in (first..=u16::MAX).filter(|p| !self.held_ports.contains(p)) {
            match TcpListener::bind(SocketAddr::new(ip, port)) {
                Ok(listener) => return Ok(listener),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::AddrInUse | io::ErrorKind::PermissionDenied
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("no free port in {first}-65535"),
        ))
    }

    /// Reads from and writes to an app's control connection; moves it from
    /// Registering to Registered once the established line is out.
    fn serve_control(&mut self, key: usize) {
        let Some(app) = self.conns.get_mut(key).and_then(Conn::app_mut) else {
            return;
        };
        let read = app.read_control();
        if let Some(request) = app.request.take() {
            self.answer_port_request(key, request);
        }
        let Some(app) = self.conns.get_mut(key).and_then(Conn::app_mut) else {
            return;
        };
        let result = read.and_then(|flow| app.flush().map(|()| flow));
        let flushed = app.flushed();
        if flushed && app.refused {
            return self.close(key, Ending::Refused);
        }
        match result {
            Ok(Flow::More) => self.requeued.push(token(key, CONTROL)),
            Ok(_) => {}
            Err(ending) => return self.close(key, ending),
        }
        if flushed && matches!(self.conns.get(key), Some(Conn::Registering(_))) {
            self.transition(key, |conn| match conn {
                Conn::Registering(app) => Conn::Registered(app),
                other => other,
            });
        }
    }

    /// The `port` extension: move the app's relayed port to the one it asked
    /// for, or tell it why not (then it is closed). Its dial-in listener and
    /// waiting clients stay as they are.
    fn answer_port_request(&mut self, key: usize, request: Result<u16, ProtocolError>) {
        let port = match request {
            Ok(port) => port,
            Err(e) => return self.refuse(key, &format!("bad port request: {e}")),
        };
        let Some(app) = self.conns.get_mut(key).and_then(Conn::app_mut) else {
            return;
        };
        let old = app.relayed_port;
        if port == old {
            return app.queue(&established_line(port));
        }
        if self.held_ports.contains(&port) || port == self.reg_addr.port() {
            return self.refuse(key, &format!("port {port} is taken"));
        }
        let mut relayed = match TcpListener::bind(SocketAddr::new(self.config.bind, port)) {
            Ok(listener) => listener,
            Err(e) => return self.refuse(key, &format!("port {port} is unavailable: {e}")),
        };
        if let Err(e) =
            self.registry
                .register(&mut relayed, token(key, RELAYED), Interest::READABLE)
        {
            return self.refuse(key, &format!("port {port} is unavailable: {e}"));
        }
        let _ = self.registry.deregister(&mut app.relayed);
        app.relayed = relayed; // the old listener closes here
        app.relayed_port = port;
        app.queue(&established_line(port));
        self.held_ports.remove(&old);
        self.held_ports.insert(port);
        log::info!(
            "app {} moved to relayed port {port} at its request; port {old} closed",
            app.peer
        );
    }

    /// Answers an app's request with an error line; the app is closed once
    /// the line is written.
    fn refuse(&mut self, key: usize, reason: &str) {
        if let Some(app) = self.conns.get_mut(key).and_then(Conn::app_mut) {
            log::warn!("app {}: request refused: {reason}", app.peer);
            app.queue(&error_line(reason));
            app.refused = true;
        }
    }

    /// A client on an app's relayed port: queue it and ask the app to dial in.
    fn admit_client(
        &mut self,
        app_key: usize,
        mut stream: TcpStream,
        peer: SocketAddr,
        now: Instant,
    ) {
        let max_waiting = self.config.max_waiting_per_app;
        let Some(app) = self.conns.get_mut(app_key).and_then(Conn::app_mut) else {
            return;
        };
        let line = dial_line(app.dial_port);
        if app.waiting.len() >= max_waiting || !app.has_room(line.len()) {
            if !app.refusing {
                log::warn!(
                    "port {}: app {} has {} clients waiting for dial-ins; refusing new clients",
                    app.relayed_port,
                    app.peer,
                    app.waiting.len()
                );
                app.refusing = true;
            }
            return reset_on_close(&stream);
        }
        app.refusing = false;
        let (relayed_port, app_peer) = (app.relayed_port, app.peer);
        let _ = stream.set_nodelay(true);
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self
            .registry
            .register(&mut stream, token(key, CLIENT), interest)
        {
            return log::warn!("client {peer} dropped: cannot register: {e}");
        }
        self.next_id += 1;
        let waiting = Waiting {
            client: Endpoint::new(stream),
            peer,
            app: app_key,
            id: self.next_id,
        };
        self.census
            .entered(entry.insert(Conn::AwaitingDialIn(waiting)));
        self.timers
            .add(now + self.config.dial_in_timeout, key, self.next_id);
        if let Some(app) = self.conns.get_mut(app_key).and_then(Conn::app_mut) {
            app.waiting.push_back(key);
            app.queue(&line);
        }
        log::debug!("client {peer} on port {relayed_port}: asked app {app_peer} to dial in");
        self.serve_control(app_key);
    }

    /// A dial-in: check it comes from the app's address, then pair it with
    /// the oldest waiting client.
    fn admit_dial_in(&mut self, app_key: usize, stream: TcpStream, peer: SocketAddr) {
        let Some(app) = self.conns.get_mut(app_key).and_then(Conn::app_mut) else {
            return;
        };
        if peer.ip().to_canonical() != app.peer.ip().to_canonical() {
            log::debug!(
                "dial-in from {peer} refused: app {} registered from another address",
                app.peer
            );
            return reset_on_close(&stream);
        }
        let Some(client) = app.waiting.pop_front() else {
            return log::debug!("dial-in from {peer} closed: no client is waiting");
        };
        let _ = stream.set_nodelay(true);
        self.pair(client, stream);
    }

    /// AwaitingDialIn => Piping, then an immediate pump: the client may have
    /// sent bytes while it waited, and no new event will announce them.
    fn pair(&mut self, key: usize, mut dial_in: TcpStream) {
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self
            .registry
            .register(&mut dial_in, token(key, DIAL_IN), interest)
        {
            log::warn!("dial-in dropped: cannot register: {e}");
            return self.close(key, Ending::Failed(e));
        }
        self.transition(key, |conn| match conn {
            Conn::AwaitingDialIn(waiting) => {
                log::debug!("client {} paired with its dial-in", waiting.peer);
                Conn::Piping(Pipe::new(waiting.client, Endpoint::new(dial_in)))
            }
            other => other,
        });
        self.pump(key);
    }

    /// Moves a pipe's bytes; requeues it if its budget ran out.
    fn pump(&mut self, key: usize) {
        let Some(Conn::Piping(pipe)) = self.conns.get_mut(key) else {
            return;
        };
        match pipe.pump(&mut self.pool) {
            Ok(Flow::Idle) => {}
            Ok(Flow::More) => self.requeued.push(token(key, CLIENT)),
            Ok(Flow::Done) => self.close(key, Ending::Done),
            Err(Broken::Reset) => self.close(key, Ending::Reset),
            Err(Broken::Failed(e)) => self.close(key, Ending::Failed(e)),
        }
    }

    /// Closes waiting clients whose dial-in did not come in time.
    fn expire_waiting(&mut self, now: Instant) {
        while let Some((key, id)) = self.timers.pop_due(now) {
            // A timer outlives a client that was paired or closed; `id` tells.
            if matches!(self.conns.get(key), Some(Conn::AwaitingDialIn(w)) if w.id == id) {
                self.close(key, Ending::TimedOut);
            }
        }
    }

    /// Replaces an entry's state with `f(old)`, logging `A => B`. The one
    /// place states change, so the census cannot drift.
    fn transition(&mut self, key: usize, f: impl FnOnce(Conn) -> Conn) {
        let Some(slot) = self.conns.get_mut(key) else {
            return;
        };
        let old = std::mem::replace(slot, Conn::Closed);
        self.census.left(&old);
        let from = old.name();
        *slot = f(old);
        self.census.entered(slot);
        log::trace!("#{key}: {from} => {}", slot.name());
    }

    /// Schedules an entry to close at the end of the turn. A waiting client
    /// leaves its app's queue now, so no dial-in is paired with it meanwhile.
    fn close(&mut self, key: usize, ending: Ending) {
        if let Some(Conn::AwaitingDialIn(waiting)) = self.conns.get(key) {
            let app = waiting.app;
            if let Some(app) = self.conns.get_mut(app).and_then(Conn::app_mut) {
                app.waiting.retain(|&k| k != key);
            }
        }
        self.closing.push((key, ending));
    }

    /// Removes the entries closed this turn and releases what they held.
    fn reap(&mut self) {
        while let Some((key, ending)) = self.closing.pop() {
            // A key may be listed twice in one turn; the second finds it gone.
            let Some(conn) = self.conns.try_remove(key) else {
                continue;
            };
            self.census.left(&conn);
            log::trace!("#{key}: {} => closed", conn.name());
            match conn {
                Conn::Registering(app) | Conn::Registered(app) => self.retire_app(app, ending),
                Conn::AwaitingDialIn(waiting) => self.retire_waiting(waiting, ending),
                Conn::Piping(pipe) => self.retire_pipe(pipe, ending),
                Conn::Closed => {}
            }
        }
    }

    /// Closes an app's listeners at once (its port can be registered again)
    /// and its waiting clients; its established pipes run on.
    fn retire_app(&mut self, mut app: App, ending: Ending) {
        let _ = self.registry.deregister(&mut app.control);
        let _ = self.registry.deregister(&mut app.relayed);
        let _ = self.registry.deregister(&mut app.dial);
        self.held_ports.remove(&app.relayed_port);
        let waiting = app.waiting.len();
        log::info!(
            "app {} gone ({ending}); relayed port {} closed, {waiting} waiting clients closed",
            app.peer,
            app.relayed_port
        );
        for key in app.waiting.drain(..) {
            self.closing.push((key, Ending::AppGone));
        }
    }

    fn retire_waiting(&mut self, mut waiting: Waiting, ending: Ending) {
        let _ = self.registry.deregister(&mut waiting.client.stream);
        log::debug!("client {} closed: {ending}", waiting.peer);
    }

    fn retire_pipe(&mut self, mut pipe: Pipe, ending: Ending) {
        if ending.is_abort() {
            pipe.abort(&mut self.pool);
        } else {
            pipe.release(&mut self.pool);
        }
        let _ = self.registry.deregister(&mut pipe.a.stream);
        let _ = self.registry.deregister(&mut pipe.b.stream);
        match ending {
            Ending::Failed(e) => log::debug!("pipe closed on error: {e}"),
            ending => log::debug!("pipe closed: {ending}"),
        }
    }
}
