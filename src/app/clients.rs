//! The client side of the agent: for each dial line, connecting the dial-in
//! (presenting its token) and the local service under one deadline, then
//! serving the client by piping or echoing.

use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Registry};

use crate::auth::DialToken;
use crate::pipe::{Echo, Endpoint, Pipe, RxState};
use crate::protocol::token_line;
use crate::reactor::token;
use crate::sockio::{Io, write_slice};

use super::Service;
use super::control::Control;
use super::core::{Conn, Core, DIAL_IN, LOCAL, connect_result};

/// Most dial lines kept waiting for room under `max_clients`. Beyond it a
/// line is dropped: its client is closed by the relay's dial-in timeout, as
/// it would be anyway after waiting behind this many.
const MAX_QUEUED: usize = 16 * 1024;

impl Core {
    /// A dial line from the relay: served now if fewer than `max_clients`
    /// clients are, else queued behind those already waiting.
    pub(super) fn want_dial(&mut self, port: u16, token: Option<DialToken>, now: Instant) {
        if self.conns.len() < self.max_clients && self.queued.is_empty() {
            return self.dial(port, token, now);
        }
        if !self.crowded {
            log::warn!(
                "{} clients in service (--max-clients): further dial requests wait",
                self.conns.len()
            );
            self.crowded = true;
        }
        if self.queued.len() >= MAX_QUEUED {
            return log::debug!("dial request dropped: {MAX_QUEUED} already wait");
        }
        self.queued.push_back((port, token));
    }

    /// Serves queued dial lines, oldest first, while there is room.
    pub(super) fn dial_queued(&mut self, now: Instant) {
        while self.conns.len() < self.max_clients {
            let Some((port, token)) = self.queued.pop_front() else {
                if self.crowded {
                    log::info!("no dial request waits any more");
                    self.crowded = false;
                }
                return;
            };
            self.dial(port, token, now);
        }
    }

    /// Starts the connects for one client: the dial-in and, when forwarding,
    /// the local service, both non-blocking.
    fn dial(&mut self, port: u16, token: Option<DialToken>, now: Instant) {
        let (Control::Ready(link, _) | Control::Registering(link, _)) = &self.control else {
            return;
        };
        let addr = SocketAddr::new(link.relay.ip(), port);
        let dial_in = match TcpStream::connect(addr) {
            Ok(stream) => stream,
            Err(e) => return log::warn!("dial-in to {addr} failed: {e}"),
        };
        let (local, refused) = match &self.config.service {
            Service::Echo => (None, false),
            Service::Forward(local) => match TcpStream::connect(*local) {
                Ok(stream) => (Some(stream), false),
                Err(e) => {
                    self.note_local(Some(&e));
                    (None, true)
                }
            },
        };
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let mut conn = Conn::Dialing {
            dial_in,
            local,
            connected: [false, false],
            rx: [RxState::default(); 2],
            token,
            refused,
        };
        if let Err(e) = register_dialing(&self.registry, &mut conn, key) {
            return log::warn!("dial-in to {addr} dropped: {e}");
        }
        entry.insert(conn);
        let deadline = now + self.config.connect_timeout;
        self.timers.add(deadline, key);
    }

    /// A client's connects did not all finish in time: close them with a
    /// reset (a dial-in the relay already paired resets its client) rather
    /// than leave the client hanging. (The timer is cancelled when the
    /// entry is served or closed, so only a Dialing entry can see it fire.)
    pub(super) fn connect_timed_out(&mut self, key: usize) {
        // A connect that completed while this turn was busy has its event
        // in the next poll, not taken yet: ask the sockets before giving up.
        for sub in [DIAL_IN, LOCAL] {
            self.finish_connect(key, sub, None);
        }
        let Some(Conn::Dialing {
            local, connected, ..
        }) = self.conns.get(key)
        else {
            return;
        };
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
    pub(super) fn finish_connect(&mut self, key: usize, sub: usize, event: Option<&Event>) {
        let Some(Conn::Dialing {
            dial_in,
            local,
            connected,
            rx,
            token,
            refused,
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
                *refused = true;
                let dial_in_up = connected[DIAL_IN];
                self.note_local(Some(&e));
                if dial_in_up {
                    self.closing.push((key, true));
                }
                return;
            }
            Err(e) => {
                log::debug!("dial-in failed: {e}");
                return self.closing.push((key, true));
            }
        }
        // The local service failed: the dial-in still goes through (with
        // its token) and is then reset, so the relay learns at once: its
        // client gets a reset instead of waiting out the dial-in timeout,
        // and a ready dial-in counts as dead instead of as never coming.
        if *refused {
            if connected[DIAL_IN] {
                self.closing.push((key, true));
            }
            return;
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
        self.timers.cancel(key); // connected in time
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
