//! The agent's handler: what it owns ([`Core`]: the control connection's
//! phase, one [`Conn`] per client), the reactor's callbacks, dispatch by
//! token and state, pumping and deferred close.

use std::collections::VecDeque;
use std::io;
use std::sync::Arc;
use std::sync::atomic::AtomicU16;
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Registry, Token};
use slab::Slab;

use crate::auth::DialToken;
use crate::pipe::{Broken, Echo, Flow, Pipe, RxState};
use crate::pool::BufferPool;
use crate::reactor::{self, Handler, Timers, split, token};
use crate::sockio::reset_on_close;

use super::control::Control;
use super::{AgentConfig, AgentError};

/// The control connection's token.
pub(super) const CONTROL: Token = reactor::MAIN;

/// Sockets of a client entry, by sub-token.
pub(super) const DIAL_IN: usize = 0;
pub(super) const LOCAL: usize = 1;

/// Ring size for the agent's pipes and echoes.
const BUFFER_SIZE: usize = 64 * 1024;

/// A client's connections on the agent side.
pub(super) enum Conn {
    /// Connects under way: the dial-in, and the local service (if forwarding).
    Dialing {
        dial_in: TcpStream,
        local: Option<TcpStream>,
        connected: [bool; 2],     // by sub-token: dial-in, local
        rx: [RxState; 2],         // their read halves, from every event since registered
        token: Option<DialToken>, // to present first on the dial-in (with a secret)
        refused: bool,            // the local service failed: reset the dial-in once connected
    },
    /// A dial-in being echoed.
    Echoing(Echo),
    /// A dial-in piped to the local service.
    Piping(Pipe),
    /// Placeholder for the instant of a transition.
    Closed,
}

/// The agent's state, driven by the reactor.
pub(super) struct Core {
    pub(super) registry: Registry,  // registers sockets as they are made
    pub(super) config: AgentConfig, // what the user asked for
    pub(super) control: Control,    // the control connection's phase
    pub(super) attempts: u32,       // failed (re)connects in a row, for back-off
    pub(super) public_port: Arc<AtomicU16>, // relayed port, for other threads (0: none)
    pub(super) on_registered: Option<Box<dyn FnMut(u16) + Send>>, // told each new port
    pub(super) failure: Option<AgentError>, // why we gave up, once we have
    pub(super) conns: Slab<Conn>,   // every client's dial-in (and local) sockets
    pub(super) pool: BufferPool,    // rings lent while bytes are in flight
    pub(super) requeued: Vec<Token>, // entries that used their budget with work left
    pub(super) closing: Vec<(usize, bool)>, // (key, abort) to reap at the end of the turn
    pub(super) local_down: bool,    // the local service is failing (logged once)
    pub(super) timers: Timers,      // connect deadlines of Dialing entries
    pub(super) max_clients: usize,  // most entries (clients served) at once
    pub(super) queued: VecDeque<(u16, Option<DialToken>)>, // dial lines waiting for room, oldest first
    pub(super) crowded: bool, // dial lines are waiting (logged once per episode)
}

impl Core {
    /// A handler for `config`, registering its sockets with `registry`; it
    /// connects to the relay on its first turn.
    pub(super) fn new(config: AgentConfig, registry: Registry) -> Core {
        let splice = config.splice;
        Core {
            registry,
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
            max_clients: config
                .max_clients
                .unwrap_or_else(AgentConfig::default_max_clients)
                .max(1),
            queued: VecDeque::new(),
            crowded: false,
            config,
        }
    }
}

impl Handler for Core {
    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.requeued.is_empty() {
            return Some(Duration::ZERO);
        }
        let deadline = reactor::earliest(self.control_deadline(), self.timers.next());
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
        while let Some(key) = self.timers.pop_due(now) {
            self.connect_timed_out(key);
        }
        self.reap();
        self.dial_queued(now);
    }
}

impl Core {
    pub(super) fn relayed_port(&self) -> Option<u16> {
        match self.control {
            Control::Ready(_, port) => Some(port),
            _ => None,
        }
    }

    pub(super) fn control_deadline(&self) -> Option<Instant> {
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

    pub(super) fn pump(&mut self, key: usize) {
        let flow = match self.conns.get_mut(key) {
            Some(Conn::Echoing(echo)) => echo.pump(&mut self.pool),
            Some(Conn::Piping(pipe)) => pipe.pump(&mut self.pool),
            _ => return,
        };
        match flow {
            Ok(Flow::Idle) => {}
            Ok(Flow::More) => self.requeued.push(token(key, DIAL_IN)),
            Ok(Flow::Done) => self.closing.push((key, false)),
            // A lost trial is the relay's notion; here it is a reset.
            Err(Broken::Reset | Broken::Lost) => self.closing.push((key, true)),
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
            self.timers.cancel(key);
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
