//! A registration's control connection (see the diagram in `state`):
//! connecting with back-off, answering the relay's challenge, registering
//! (with the `port` and `ready` requests), reading dial lines, and losing
//! the relay without stalling the clients already served.

use std::hash::{BuildHasher, RandomState};
use std::io;
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::{Duration, Instant, SystemTime};

use mio::Interest;
use mio::net::TcpStream;

use super::core::AgentCore;
use super::state::{AgentConn, LINK};
use super::{AgentError, Registered};
use crate::client::{Client, Event, Failure, Phase, Registration};
use crate::reactor;
use crate::sockio::{Io, keep_alive, read_slice, write_slice};
use crate::table::Id;

/// How long connecting to the relay, and then registering, may each take.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Reconnect back-off: doubled from the first to the cap, each delay drawn
/// between half and all of it, so agents that lost the same relay do not
/// all come back in the same instant.
const BACKOFF_FIRST: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// Attempts after which the back-off is at its cap (250 ms × 2⁷ > 30 s).
const BACKOFF_STEPS: u32 = 7;

/// A connected control connection.
pub(super) struct LinkConn {
    stream: TcpStream, // to the relay's registration port
    relay: SocketAddr, // its address; dial-ins go to the same IP
    client: Client,    // the registration's protocol, without I/O
}

impl LinkConn {
    /// The relay's address (dial-ins go to its IP).
    pub(super) fn relay(&self) -> SocketAddr {
        self.relay
    }

    /// The relayed port of the registration, once registered.
    pub(super) fn port(&self) -> Option<u16> {
        self.client.registered_port()
    }

    /// Why registering took too long, for the log line.
    pub(super) fn registration_timed_out(&self) -> String {
        match self.client.phase() {
            Phase::Registering { unanswered, .. } if unanswered.first().is_some() => {
                let request = unanswered.first().unwrap_or_default();
                format!(
                    "the relay did not answer our {request} request \
                     (is it a tcp-relay that supports it?)"
                )
            }
            Phase::Registering { seen, .. } if seen > 0 => {
                "the relay did not answer the port request (does it support --port?)".into()
            }
            _ => "the relay did not register us in time".into(),
        }
    }

    /// The socket, for closing.
    pub(super) fn into_stream(self) -> TcpStream {
        self.stream
    }
}

impl AgentCore {
    /// Reconnecting => Connecting: resolves the relay's address (every
    /// time, so a relay that moved is followed) and starts a non-blocking
    /// connect, under the registration deadline.
    pub(super) fn connect(&mut self, id: Id, now: Instant) {
        let Some(AgentConn::Reconnecting(link)) = self.table.get(id) else {
            return;
        };
        let relay = link.relay.clone();
        let addr = match relay.to_socket_addrs().map(|mut addrs| addrs.next()) {
            Ok(Some(addr)) => addr,
            Ok(None) => {
                return self.lost(
                    id,
                    now,
                    format!("relay address {relay:?} resolves to nothing"),
                );
            }
            Err(e) => return self.lost(id, now, format!("cannot resolve relay {relay:?}: {e}")),
        };
        let mut stream = match TcpStream::connect(addr) {
            Ok(stream) => stream,
            Err(e) => return self.lost(id, now, format!("cannot reach relay {addr}: {e}")),
        };
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self
            .table
            .registry()
            .register(&mut stream, id.token(LINK), interest)
        {
            return self.lost(
                id,
                now,
                format!("cannot register the control connection: {e}"),
            );
        }
        self.table.transition(id, |conn| match conn {
            AgentConn::Reconnecting(link) => AgentConn::Connecting(link, stream),
            other => other,
        });
        self.table.arm(id, now + REGISTER_TIMEOUT);
    }

    /// Connecting => Registering, once the connect completed. We speak only
    /// after the relay's first line, which tells whether it wants the
    /// secret proved first.
    pub(super) fn finish_link_connect(&mut self, id: Id, now: Instant) {
        let Some(AgentConn::Connecting(_, stream)) = self.table.get(id) else {
            return;
        };
        let relay = match super::clients::connect_result(stream, None) {
            Ok(false) => return, // not yet: a spurious wake-up
            Ok(true) => stream.peer_addr(),
            Err(e) => Err(e),
        };
        let relay = match relay {
            Ok(relay) => relay,
            Err(e) => return self.lost(id, now, format!("cannot reach relay: {e}")),
        };
        let Some(AgentConn::Connecting(link, _)) = self.table.get(id) else {
            return;
        };
        let service = &self.config.services[link.service];
        let registration = Registration {
            secret: self.config.secret.clone(),
            port: service.port,
            ready: service.ready,
            proxy: service.proxy_protocol,
            allow: service.allow_clients.clone(),
            rate: service.client_rate,
        };
        self.table.transition(id, |conn| match conn {
            AgentConn::Connecting(link, stream) => {
                keep_alive(&stream);
                let conn = Box::new(LinkConn {
                    stream,
                    relay,
                    client: Client::new(registration),
                });
                AgentConn::Registering(link, conn)
            }
            other => other,
        });
        self.table.arm(id, now + REGISTER_TIMEOUT);
        self.serve_link(id, true, now);
    }

    /// Reads the relay's lines and acts on them. A short read ends reading
    /// (every later arrival raises a new edge), unless `ending`: the event
    /// said the relay closed or failed, which only a further read reports.
    pub(super) fn serve_link(&mut self, id: Id, ending: bool, now: Instant) {
        let mut buf = [0u8; 512];
        loop {
            if self.failure.is_some() {
                return; // given up on an earlier line: nothing more to hear
            }
            let Some(AgentConn::Registering(_, conn) | AgentConn::Registered(_, conn)) =
                self.table.get_mut(id)
            else {
                return;
            };
            let n = match read_slice(&conn.stream, &mut buf) {
                Io::Moved(n) => n,
                Io::WouldBlock => return,
                Io::Eof | Io::Reset => {
                    return self.lost(id, now, "the relay closed the control connection".into());
                }
                Io::Failed(e) => {
                    return self.lost(id, now, format!("control connection failed: {e}"));
                }
            };
            for event in conn.client.feed(&buf[..n]) {
                if !self.is_link_up(id) {
                    return; // lost, or given up, on an earlier line
                }
                self.hear(id, event, now);
            }
            if n < buf.len() && !ending {
                return;
            }
        }
    }

    /// Whether a registration's control connection is up (registering or
    /// registered) and the agent has not given up.
    pub(super) fn is_link_up(&self, id: Id) -> bool {
        self.failure.is_none()
            && matches!(
                self.table.get(id),
                Some(AgentConn::Registering(..) | AgentConn::Registered(..))
            )
    }

    /// Acts on what the relay's lines meant (in order).
    fn hear(&mut self, id: Id, event: Event, now: Instant) {
        match event {
            Event::Send(bytes) => self.send(id, &bytes, now),
            Event::Registered(port) => self.registered(id, port),
            Event::Dial { port, token } => self.want_dial(id, port, token, now),
            Event::ExtraEstablished(port) => {
                log::warn!("relay sent another established line (port {port}); ignored");
            }
            Event::Unparsable(e) => {
                log::warn!("relay sent a line we do not understand ({e}); ignored");
            }
            Event::Failed(Failure::NoSecret) => {
                let needed = "it requires a secret and we have none (--secret or TCP_RELAY_SECRET)";
                self.refused(id, needed.into(), now);
            }
            Event::Failed(failure) if failure.is_final() => {
                self.refused(id, failure.to_string(), now)
            }
            // A passing refusal (the relay is full, out of ports): try again later.
            Event::Failed(failure) => self.lost(id, now, format!("the relay refused: {failure}")),
        }
    }

    /// A relay refused a registration for good (a wrong secret, a port
    /// taken). At start that is a configuration error and the agent gives
    /// up. Once serving with several registrations, the others go on: this
    /// one keeps retrying, at the longest back-off, since the cause may pass
    /// (the relay restarted with another secret and will be fixed, the port
    /// will be freed), as frp and rathole clients do.
    fn refused(&mut self, id: Id, why: String, now: Instant) {
        let links = self.config.relays.len() * self.config.services.len();
        if !self.started || links == 1 {
            return self.give_up(AgentError::Refused(why));
        }
        log::error!("the relay refused: {why}");
        if let Some(AgentConn::Registering(link, _) | AgentConn::Registered(link, _)) =
            self.table.get_mut(id)
        {
            link.attempts = link.attempts.max(BACKOFF_STEPS);
        }
        self.lost(id, now, format!("the relay refused: {why}"));
    }

    /// Writes our lines (the answer to the challenge, our requests) in one
    /// write. A few dozen bytes on a fresh connection: the send buffer is
    /// empty, so anything short of a full write means the connection is bad.
    fn send(&mut self, id: Id, bytes: &[u8], now: Instant) {
        let Some(AgentConn::Registering(_, conn)) = self.table.get(id) else {
            return;
        };
        if !matches!(write_slice(&conn.stream, bytes), Io::Moved(n) if n == bytes.len()) {
            self.lost(id, now, "cannot send our requests to the relay".into());
        }
    }

    /// Registering => Registered: the relay told us our port (after one
    /// established line, or two when we asked for a port: see [`Client`]).
    fn registered(&mut self, id: Id, port: u16) {
        let mut told = None;
        let services = &self.config.services;
        self.table.transition(id, |conn| match conn {
            AgentConn::Registering(mut link, conn) => {
                let service = services[link.service].name.clone();
                let on = if service.is_empty() {
                    String::new()
                } else {
                    format!(" for {service}")
                };
                log::info!(
                    "registered with relay {}{on}: relayed port {port}",
                    conn.relay
                );
                (link.attempts, link.since, link.failed) = (0, SystemTime::now(), None);
                told = Some(Registered {
                    service,
                    relay: link.relay.clone(),
                    port,
                });
                AgentConn::Registered(link, conn)
            }
            other => other,
        });
        self.publish_registrations();
        if let (Some(told), Some(tell)) = (told, self.on_registered.as_mut()) {
            tell(&told);
        }
    }

    /// The control connection is gone or could not be made: back off and
    /// try again (=> Reconnecting), or give up if reconnecting is off.
    pub(super) fn lost(&mut self, id: Id, now: Instant, why: String) {
        // Dial lines name the lost registration's dial-in port: stale now.
        self.queued.retain(|line| line.link != id);
        let Some(conn) = self.table.take(id) else {
            return;
        };
        let mut link = match conn {
            AgentConn::Reconnecting(link) => link,
            AgentConn::Connecting(link, mut stream) => {
                reactor::forget(self.table.registry(), &mut stream);
                link
            }
            AgentConn::Registering(link, conn) | AgentConn::Registered(link, conn) => {
                reactor::forget(self.table.registry(), &mut conn.into_stream());
                link
            }
            other => return self.table.transition(id, |_| other),
        };
        if !self.config.reconnect {
            self.table.transition(id, |_| AgentConn::Reconnecting(link));
            let lost = io::Error::new(io::ErrorKind::ConnectionAborted, why);
            return self.give_up(AgentError::Lost(lost));
        }
        let delay = backoff(link.attempts);
        link.attempts = link.attempts.saturating_add(1);
        link.since = SystemTime::now();
        self.metrics.reconnects += 1;
        log::warn!("{why}; reconnecting in {delay:.1?}");
        link.failed = Some(why);
        self.table.transition(id, |_| AgentConn::Reconnecting(link));
        self.table.arm(id, now + delay);
        self.publish_registrations();
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
