//! The client side of the agent: for each dial line (at most
//! `max_clients` served at once, the rest waiting in order), connecting the
//! dial-in (presenting its token) and the local service under one deadline,
//! then serving the client by piping or echoing.

use std::io;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::Interest;
use mio::event::Event;
use mio::net::TcpStream;

use super::Service;
use super::core::AgentCore;
use super::state::{AgentConn, DIAL_IN, DialLine, Dialing, Ending, LOCAL, timed_out};
use crate::auth::DialToken;
use crate::pipe::{Echo, Endpoint, Pipe, RxState};
use crate::protocol::token_line;
use crate::sockio::{Io, write_slice};
use crate::table::Id;

/// Most dial lines kept waiting for room under `max_clients`. Beyond it a
/// line is dropped: its client is closed by the relay's dial-in timeout, as
/// it would be anyway after waiting behind this many.
const MAX_QUEUED: usize = 16 * 1024;

/// Where a client's connects stand after one of them reported.
enum Connects {
    Pending,                // not all done yet
    Ready,                  // all done: serve the client
    LocalFailed(io::Error), // the local service failed (the dial-in goes on, to be reset)
    Failed(String),         // the dial-in failed, or the client is done for
}

/// The first pause of dialing when out of descriptors.
const DIAL_BACKOFF_MIN: Duration = Duration::from_millis(20);
/// The longest pause: short enough that dialing resumes promptly.
const DIAL_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Whether making a socket failed for want of descriptors (the process's or
/// the system's) or of socket memory: waiting helps, unlike a refused or
/// unreachable address.
fn is_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

impl AgentCore {
    /// A dial line from registration `link`: served now if fewer than
    /// `max_clients` clients are, else queued behind those already waiting.
    pub(super) fn want_dial(
        &mut self,
        link: Id,
        port: u16,
        token: Option<DialToken>,
        now: Instant,
    ) {
        let Some(AgentConn::Registering(entry, conn) | AgentConn::Registered(entry, conn)) =
            self.table.get(link)
        else {
            return;
        };
        let line = DialLine {
            link,
            service: entry.service,
            addr: SocketAddr::new(conn.relay().ip(), port),
            token,
        };
        if self.may_dial(now) && self.queued.is_empty() {
            return self.dial(line, now);
        }
        if !self.crowded {
            log::warn!(
                "{} clients in service (--max-clients): further dial requests wait",
                self.clients()
            );
            self.crowded = true;
        }
        if self.queued.len() >= MAX_QUEUED {
            return log::debug!("dial request dropped: {MAX_QUEUED} already wait");
        }
        self.queued.push_back(line);
    }

    /// Whether a client may be dialed now: fewer than `max_clients` in
    /// service, and not paused for want of descriptors.
    fn may_dial(&self, now: Instant) -> bool {
        self.clients() < self.max_clients && self.starved.is_none_or(|(_, until)| now >= until)
    }

    /// Serves queued dial lines, oldest first, while there is room.
    pub(super) fn dial_queued(&mut self, now: Instant) {
        while self.may_dial(now) {
            let Some(line) = self.queued.pop_front() else {
                if self.crowded {
                    log::info!("no dial request waits any more");
                    self.crowded = false;
                }
                return;
            };
            self.dial(line, now);
        }
    }

    /// Starts the connects for one client: the local service (when
    /// forwarding) and the dial-in, both non-blocking, under the connect
    /// deadline. Out of descriptors, the dial line waits instead (see
    /// `pause_dialing`).
    fn dial(&mut self, line: DialLine, now: Instant) {
        // The local socket first: a dial-in made and then dropped for want
        // of the second socket would reach the relay and cost a client.
        let (local, refused) = match self.connect_local(line.service) {
            Ok(local) => (local, false),
            Err(e) if is_exhaustion(&e) => return self.pause_dialing(line, &e, now),
            Err(e) => {
                self.note_local(line.service, Some(&e));
                (None, true)
            }
        };
        let dial_in = match TcpStream::connect(line.addr) {
            Ok(stream) => stream,
            Err(e) if is_exhaustion(&e) => return self.pause_dialing(line, &e, now),
            Err(e) => {
                self.metrics.dial_in_failures += 1;
                return log::warn!("dial-in to {} failed: {e}", line.addr);
            }
        };
        self.fed();
        let dialing = Dialing {
            dial_in,
            local,
            connected: [false, false],
            rx: [RxState::default(); 2],
            token: line.token,
            refused,
            service: line.service,
        };
        match self
            .table
            .insert(|id, registry| register_dialing(registry, dialing, id))
        {
            Ok(id) => self.table.arm(id, now + self.config.connect_timeout),
            Err(e) => log::warn!("dial-in to {} dropped: {e}", line.addr),
        }
    }

    /// Starts the connect to service `service`'s local address (none for
    /// the echo app).
    fn connect_local(&self, service: usize) -> io::Result<Option<TcpStream>> {
        match self.config.services[service].service {
            Service::Echo => Ok(None),
            Service::Forward(local) => TcpStream::connect(local).map(Some),
        }
    }

    /// A socket could not be made for want of descriptors (or socket
    /// memory): the dial line goes back to the head of the queue and dialing
    /// pauses, 20 ms doubling to 1 s while it lasts, as the relay pauses
    /// accepting. The client waits (the relay's dial-in timeout answers for
    /// it) instead of being lost: descriptors come back as clients leave and
    /// as splice pipes, which take what sockets leave, are let go.
    fn pause_dialing(&mut self, line: DialLine, e: &io::Error, now: Instant) {
        self.queued.push_front(line);
        let backoff = self
            .starved
            .map_or(DIAL_BACKOFF_MIN, |(b, _)| (b * 2).min(DIAL_BACKOFF_MAX));
        if self.starved.is_none() {
            log::warn!(
                "cannot open a connection ({e}); dial requests wait until descriptors free up"
            );
        }
        self.starved = Some((backoff, now + backoff));
    }

    /// Sockets could be made again: the episode is over.
    fn fed(&mut self) {
        if self.starved.take().is_some() {
            log::info!("dialing again");
        }
    }

    /// A client's connects did not all finish in time: close them with a
    /// reset (a dial-in the relay already paired resets its client) rather
    /// than leave the client hanging.
    pub(super) fn connect_timed_out(&mut self, id: Id, now: Instant) {
        // A connect that completed while this turn was busy has its event
        // in the next poll, not taken yet: ask the sockets before giving up.
        for sub in [DIAL_IN, LOCAL] {
            self.finish_connect(id, sub, None, now);
        }
        let Some(AgentConn::Dialing(dialing)) = self.table.get(id) else {
            return;
        };
        let timeout = self.config.connect_timeout;
        if dialing.local.is_some() && !dialing.connected[LOCAL] {
            self.note_local(dialing.service, Some(&timed_out(timeout)));
        } else {
            log::debug!("dial-in connect timed out after {timeout:?}");
        }
        self.table.close(id, Ending::Abort);
    }

    /// One of a client's connects finished (or failed); once all have, the
    /// client is served (Dialing => Piping or Echoing).
    pub(super) fn finish_connect(
        &mut self,
        id: Id,
        sub: usize,
        event: Option<&Event>,
        now: Instant,
    ) {
        let Some(AgentConn::Dialing(dialing)) = self.table.get_mut(id) else {
            return;
        };
        let (forwarding, service) = (dialing.local.is_some(), dialing.service);
        match dialing.advance(sub, event) {
            Connects::Pending => {}
            Connects::Ready => {
                if forwarding {
                    self.note_local(service, None);
                }
                self.start_serving(id);
                self.pump(id, now);
            }
            Connects::LocalFailed(e) => self.note_local(service, Some(&e)),
            Connects::Failed(why) => {
                self.metrics.dial_in_failures += 1;
                log::debug!("{why}");
                self.table.close(id, Ending::Abort);
            }
        }
        // The local service failed: the dial-in still goes through (with
        // its token) and is then reset, so the relay learns at once: its
        // client gets a reset instead of waiting out the dial-in timeout,
        // and a ready dial-in counts as dead instead of as never coming.
        if let Some(AgentConn::Dialing(dialing)) = self.table.get(id)
            && dialing.refused
            && dialing.connected[DIAL_IN]
        {
            self.table.close(id, Ending::Abort);
        }
    }

    /// Dialing => Echoing or Piping: the connect deadline is met (the
    /// transition cancels it).
    fn start_serving(&mut self, id: Id) {
        self.metrics.served += 1;
        self.table.transition(id, |conn| match conn {
            AgentConn::Dialing(Dialing {
                dial_in,
                local: None,
                rx,
                ..
            }) => AgentConn::Echoing(Echo::new(Endpoint::new(dial_in, rx[DIAL_IN]))),
            AgentConn::Dialing(Dialing {
                dial_in,
                local: Some(local),
                rx,
                ..
            }) => AgentConn::Piping(Pipe::new(
                Endpoint::new(dial_in, rx[DIAL_IN]),
                Endpoint::new(local, rx[LOCAL]),
            )),
            other => other,
        });
    }

    /// Logs the local service going down (once) and coming back (once),
    /// not once per client.
    fn note_local(&mut self, service: usize, failure: Option<&io::Error>) {
        let Service::Forward(addr) = &self.config.services[service].service else {
            return;
        };
        self.metrics.local_failures += u64::from(failure.is_some());
        let down = &mut self.local_down[service];
        match (failure, *down) {
            (Some(e), false) => {
                log::warn!(
                    "local service {addr} unavailable ({e}); its clients are closed until it answers"
                );
                *down = true;
            }
            (None, true) => {
                log::info!("local service {addr} answers again");
                *down = false;
            }
            _ => {}
        }
    }
}

impl Dialing {
    /// Takes what an event (or, with none, the socket itself) says about
    /// one of the connects, and says where the client stands.
    fn advance(&mut self, sub: usize, event: Option<&Event>) -> Connects {
        if self.socket(sub).is_none() {
            return Connects::Pending;
        }
        // Bytes may come with the connect (a server-first service): noted
        // here, they spare the first pump a read that finds nothing.
        if let Some(event) = event {
            self.rx[sub].note(event);
        }
        if self.connected[sub] && !event.is_some_and(Event::is_error) {
            return Connects::Pending; // news for a side already connected, kept in `rx`
        }
        let Some(stream) = self.socket(sub) else {
            return Connects::Pending;
        };
        match connect_result(stream, event) {
            Ok(true) => self.connected_now(sub),
            Ok(false) => Connects::Pending,
            Err(e) if sub == LOCAL => {
                self.refused = true;
                Connects::LocalFailed(e)
            }
            Err(e) => Connects::Failed(format!("dial-in failed: {e}")),
        }
    }

    /// One connect completed: the dial-in presents its token first.
    fn connected_now(&mut self, sub: usize) -> Connects {
        if sub == DIAL_IN && !present(&self.dial_in, self.token.take()) {
            return Connects::Failed("dial-in lost before its token was sent".into());
        }
        // Outgoing sockets inherit nothing: small messages must not wait
        // for Nagle here either.
        if let Some(stream) = self.socket(sub) {
            let _ = stream.set_nodelay(true);
        }
        self.connected[sub] = true;
        let all = self.connected[DIAL_IN] && (self.connected[LOCAL] || self.local.is_none());
        if all && !self.refused {
            Connects::Ready
        } else {
            Connects::Pending
        }
    }
}

impl Dialing {
    /// The socket behind sub-token `sub`, if the client has it.
    fn socket(&self, sub: usize) -> Option<&TcpStream> {
        match sub {
            DIAL_IN => Some(&self.dial_in),
            LOCAL => self.local.as_ref(),
            _ => None,
        }
    }
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

/// Registers a client's connecting sockets under its entry.
fn register_dialing(
    registry: &mio::Registry,
    mut dialing: Dialing,
    id: Id,
) -> io::Result<AgentConn> {
    let interest = Interest::READABLE | Interest::WRITABLE;
    registry.register(&mut dialing.dial_in, id.token(DIAL_IN), interest)?;
    if let Some(local) = &mut dialing.local {
        registry.register(local, id.token(LOCAL), interest)?;
    }
    Ok(AgentConn::Dialing(dialing))
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
pub(super) fn connect_result(stream: &TcpStream, event: Option<&Event>) -> io::Result<bool> {
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
