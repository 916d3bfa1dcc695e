//! The control connection's state machine (see the diagram in the module
//! above): connecting with back-off, answering the relay's challenge,
//! registering (with the `port` and `ready` requests), reading dial lines,
//! and losing the relay without stalling the pipes already running.

use std::hash::{BuildHasher, RandomState};
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use mio::Interest;
use mio::event::Event;
use mio::net::TcpStream;

use crate::auth;
use crate::protocol::{
    LineReader, MAX_READY, RelayLine, auth_line, parse_relay_line, port_request_line, ready_line,
};
use crate::reactor;
use crate::sockio::{Io, keep_alive, read_slice, write_slice};

use super::AgentError;
use super::core::{CONTROL, Core, connect_result};

/// How long connecting to the relay, and then registering, may each take.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Reconnect back-off: doubled from the first to the cap, each delay drawn
/// between half and all of it, so agents that lost the same relay do not
/// all come back in the same instant.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(30);

/// The control connection, by phase.
pub(super) enum Control {
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
pub(super) struct Link {
    stream: TcpStream,            // to the relay's registration port
    pub(super) relay: SocketAddr, // its address; dial-ins go to the same IP
    lines: LineReader,            // frames the relay's lines
    established: usize,           // established lines seen on this connection
    greeted: bool,                // we answered the relay's first line
}

impl Core {
    /// A control deadline passed: time to connect, or a connect or
    /// registration took too long.
    pub(super) fn control_due(&mut self, now: Instant) {
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
    pub(super) fn serve_control(&mut self, event: Option<&Event>, now: Instant) {
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
                Ok(RelayLine::Dial(port, token)) => self.want_dial(port, token, now),
                Ok(RelayLine::Challenge(nonce)) => self.greet(Some(&nonce), now),
                Ok(RelayLine::Established(port)) => {
                    self.greet(None, now);
                    self.established(port);
                }
                Ok(RelayLine::Error(reason)) if reason.is_final() => {
                    return self.give_up(AgentError::Refused(reason.to_string()));
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
        // Dial lines name the lost registration's dial-in port: stale now.
        self.queued.clear();
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
