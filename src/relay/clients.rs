//! The client side of the relay: admitting clients, checking dial-ins (by
//! source address, or by token with a secret), pairing them, and pumping
//! pipes, including the idle timer of half-closed pipes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::Interest;
use mio::net::TcpStream;

use super::core::{CLIENT, Core, DIAL_IN};
use crate::auth::{DialToken, TOKEN_LINE_LEN};
use crate::pipe::{Broken, Endpoint, Flow, Pipe, RxState};
use crate::protocol::{dial_line, parse_token_line};
use crate::reactor::token;
use crate::sockio::{Io, no_delay, read_slice, reset_on_close};
use crate::state::{Conn, Ending, Piped, Presenter, Spare, Waiting};

/// A ready dial-in that dies sooner than this after arriving counts as a
/// sign that its app cannot serve (see `back_off_if_failing`).
const SPARE_GRACE: Duration = Duration::from_secs(1);

/// Back-off of ready dial-in replacements while they keep dying young.
const REFILL_FIRST: Duration = Duration::from_millis(100);
const REFILL_CAP: Duration = Duration::from_secs(5);

impl Core {
    /// A client on an app's relayed port: queue it and ask the app to dial
    /// in (with a token, when a secret is set).
    pub(super) fn admit_client(
        &mut self,
        app_key: usize,
        mut stream: TcpStream,
        peer: SocketAddr,
        now: Instant,
    ) {
        let max_waiting = self.config.max_waiting_per_app;
        let token_wanted = self.config.secret.is_some();
        let Some(app) = self.conns.get_mut(app_key).and_then(Conn::app_mut) else {
            return;
        };
        no_delay(&stream);
        if let Some(spare) = app.spares.pop_front() {
            app.refusing = false;
            return self.hand_spare(app_key, spare, stream, peer, now);
        }
        let full = app.waiting.len() >= max_waiting || !app.control.has_room(80);
        let dial_token = if token_wanted {
            DialToken::random().ok()
        } else {
            None
        };
        if full || (token_wanted && dial_token.is_none()) {
            if !app.refusing {
                log::warn!(
                    "port {}: app {} has {} clients waiting for dial-ins; refusing new clients",
                    app.relayed_port,
                    app.control.peer,
                    app.waiting.len()
                );
                app.refusing = true;
            }
            return reset_on_close(&stream);
        }
        app.refusing = false;
        let (line, relayed_port) = (
            dial_line(app.dial_port, dial_token.as_ref()),
            app.relayed_port,
        );
        let inserted = self.insert(|key, registry| {
            let interest = Interest::READABLE | Interest::WRITABLE;
            registry.register(&mut stream, token(key, CLIENT), interest)?;
            Ok(Conn::AwaitingDialIn(Waiting {
                client: Endpoint::new(stream, RxState::registered()),
                peer,
                app: app_key,
                token: dial_token,
            }))
        });
        let key = match inserted {
            Ok(key) => key,
            Err(e) => return log::warn!("client {peer} dropped: cannot register: {e}"),
        };
        self.timers.add(now + self.config.dial_in_timeout, key);
        if let Some(app) = self.conns.get_mut(app_key).and_then(Conn::app_mut) {
            app.waiting.push_back(key);
            app.control.queue(&line);
        }
        log::debug!("client {peer} on port {relayed_port}: asked its app to dial in");
        self.flush_later(app_key);
    }

    /// Hands a new client the app's oldest ready dial-in: the client joins
    /// the ready dial-in's entry (Standby => Piping), so nothing is
    /// re-registered; then a replacement is asked for.
    fn hand_spare(
        &mut self,
        app_key: usize,
        spare: usize,
        mut client: TcpStream,
        peer: SocketAddr,
        now: Instant,
    ) {
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self
            .registry
            .register(&mut client, token(spare, CLIENT), interest)
        {
            return log::warn!("client {peer} dropped: cannot register: {e}");
        }
        self.transition(spare, |conn| match conn {
            Conn::Standby(ready) => Conn::Piping(Piped {
                pipe: Pipe::new(
                    Endpoint::new(client, RxState::registered()),
                    Endpoint::new(ready.stream, ready.rx),
                ),
                last_moved: now,
                moved: 0,
                timer_armed: false,
            }),
            other => other,
        });
        log::debug!("client {peer}: handed a ready dial-in");
        if let Some(app) = self.conns.get_mut(app_key).and_then(Conn::app_mut) {
            app.spares_lost = 0; // its ready dial-ins serve: the service is up
        }
        self.pump(spare, now);
        self.top_up(app_key, now);
        self.flush_later(app_key);
    }

    /// A dial-in. With a secret it must present its client's token first;
    /// without one it must come from the app's address, and gets the oldest
    /// waiting client.
    pub(super) fn admit_dial_in(
        &mut self,
        app_key: usize,
        mut stream: TcpStream,
        peer: SocketAddr,
        now: Instant,
    ) {
        if self.config.secret.is_some() {
            let inserted = self.insert(|key, registry| {
                registry.register(&mut stream, token(key, 0), Interest::READABLE)?;
                Ok(Conn::Presenting(Presenter {
                    stream,
                    peer,
                    app: app_key,
                    line: [0; TOKEN_LINE_LEN],
                    got: 0,
                }))
            });
            if let Ok(key) = inserted {
                self.timers.add(now + self.config.register_timeout, key);
                self.read_token(key, now);
            }
            return;
        }
        let Some(app) = self.conns.get_mut(app_key).and_then(Conn::app_mut) else {
            return;
        };
        if peer.ip().to_canonical() != app.control.peer.ip().to_canonical() {
            log::debug!(
                "dial-in from {peer} refused: app {} registered from another address",
                app.control.peer
            );
            return reset_on_close(&stream);
        }
        no_delay(&stream);
        match app.waiting.pop_front() {
            Some(client) => self.pair(client, stream, false, now),
            None => self.stand_by(app_key, stream, false, now),
        }
    }

    /// Reads a presenting dial-in's token line, never a byte past it (bytes
    /// the app sends right behind it belong to the client); then pairs it
    /// with the one client the token was made for, or closes it.
    pub(super) fn read_token(&mut self, key: usize, now: Instant) {
        let Some(Conn::Presenting(presenter)) = self.conns.get_mut(key) else {
            return;
        };
        while presenter.got < TOKEN_LINE_LEN {
            match read_slice(&presenter.stream, &mut presenter.line[presenter.got..]) {
                Io::Moved(n) => presenter.got += n,
                Io::WouldBlock => return,
                Io::Eof | Io::Reset | Io::Failed(_) => return self.close(key, Ending::Gone),
            }
        }
        let (app_key, peer) = (presenter.app, presenter.peer);
        let Some(token) = parse_token_line(&presenter.line) else {
            log::debug!("dial-in from {peer} refused: not a token");
            return self.close(key, Ending::Refused);
        };
        let client = self.claim(app_key, &token);
        let spare = client.is_none() && self.claim_spare(app_key, &token);
        if client.is_none() && !spare {
            log::debug!("dial-in from {peer} refused: wrong or used token");
            return self.close(key, Ending::Refused);
        }
        let Some(Conn::Presenting(presenter)) = self.take(key) else {
            return;
        };
        no_delay(&presenter.stream);
        match client {
            Some(client) => self.pair(client, presenter.stream, true, now),
            None => self.stand_by(app_key, presenter.stream, true, now),
        }
    }

    /// Forgets a token the relay sent for a ready dial-in; whether it was one.
    fn claim_spare(&mut self, app_key: usize, token: &DialToken) -> bool {
        let Some(app) = self.conns.get_mut(app_key).and_then(Conn::app_mut) else {
            return false;
        };
        let Some(at) = app.spare_tokens.iter().position(|t| t.matches(token)) else {
            return false;
        };
        app.spare_tokens.remove(at); // in order: the oldest expire first
        true
    }

    /// A dial-in with no client to pair: keep it ready if its app asked for
    /// ready dial-ins and has room for one more, else close it.
    fn stand_by(&mut self, app_key: usize, mut stream: TcpStream, registered: bool, now: Instant) {
        let Some(app) = self.conns.get_mut(app_key).and_then(Conn::app_mut) else {
            return;
        };
        // The oldest ask is taken as answered: deadlines are per count, not
        // per line (with a secret, the token already proved it was asked).
        app.asked.pop_front();
        self.arm_app_timer(app_key);
        let Some(app) = self.conns.get_mut(app_key).and_then(Conn::app_mut) else {
            return;
        };
        if app.spares.len() >= app.ready {
            return log::debug!("dial-in closed: no client is waiting");
        }
        // Writable too, though a ready dial-in writes nothing: a client will
        // join this entry as it is, and its pipe needs the writable edges.
        let interest = Interest::READABLE | Interest::WRITABLE;
        let inserted = self.insert(|key, registry| {
            let moved = if registered {
                registry.reregister(&mut stream, token(key, DIAL_IN), interest)
            } else {
                registry.register(&mut stream, token(key, DIAL_IN), interest)
            };
            moved.map(|()| {
                Conn::Standby(Spare {
                    stream,
                    app: app_key,
                    // Not read yet: the poll reports what is pending.
                    rx: RxState::default(),
                    born: now,
                })
            })
        });
        if let (Ok(key), Some(app)) = (
            inserted,
            self.conns.get_mut(app_key).and_then(Conn::app_mut),
        ) {
            app.spares.push_back(key);
        }
    }

    /// Asks the app for as many dial-ins as it wants ready, beyond those it
    /// has and those already asked for. Queues the lines; callers flush.
    /// An asked dial-in that does not come within the dial-in timeout is
    /// given up (see `app_due`), so an app that could not dial (out of
    /// descriptors, a connect that timed out) is asked again rather than
    /// left with a short ready pool for good.
    pub(super) fn top_up(&mut self, app_key: usize, now: Instant) {
        let (secret, deadline) = (
            self.config.secret.is_some(),
            now + self.config.dial_in_timeout,
        );
        let Some(app) = self.conns.get_mut(app_key).and_then(Conn::app_mut) else {
            return;
        };
        if app.refill_at.is_some() {
            return; // backing off: see `back_off_if_failing`
        }
        let wanted = app.ready.saturating_sub(app.spares.len() + app.asked.len());
        for _ in 0..wanted {
            let token = if secret {
                DialToken::random().ok()
            } else {
                None
            };
            if (secret && token.is_none()) || !app.control.has_room(80) {
                break;
            }
            app.control.queue(&dial_line(app.dial_port, token.as_ref()));
            app.spare_tokens.extend(token);
            app.asked.push_back(deadline);
        }
        self.arm_app_timer(app_key);
    }

    /// Arms the app entry's one timer for its next deadline (see
    /// [`App::next_deadline`](crate::state::App::next_deadline)), or
    /// cancels it when there is none.
    pub(super) fn arm_app_timer(&mut self, app_key: usize) {
        let Some(Conn::Registering(app) | Conn::Registered(app)) = self.conns.get(app_key) else {
            return;
        };
        match app.next_deadline() {
            Some(at) => self.timers.add(at, app_key),
            None => self.timers.cancel(app_key),
        }
    }

    /// The app's timer fired: a refill back-off ended, or asked dial-ins
    /// did not come in time (forgotten, tokens too, and asked again).
    pub(super) fn app_due(&mut self, app_key: usize, now: Instant) {
        let Some(app) = self.conns.get_mut(app_key).and_then(Conn::app_mut) else {
            return;
        };
        if app.refill_at.is_some_and(|at| at <= now) {
            app.refill_at = None;
        }
        while app.asked.front().is_some_and(|&at| at <= now) {
            app.asked.pop_front();
            if !app.spare_tokens.is_empty() {
                app.spare_tokens.remove(0);
            }
            log::debug!(
                "app {}: an asked ready dial-in did not come",
                app.control.peer
            );
        }
        self.top_up(app_key, now);
        self.flush_later(app_key);
    }

    /// A ready dial-in became readable: data a server-first app sent (kept
    /// for the client), or its end. `peek` tells which without consuming a
    /// byte; a dead one is closed and replaced, never handed a client.
    pub(super) fn check_spare(&mut self, key: usize, now: Instant) {
        let Some(Conn::Standby(spare)) = self.conns.get_mut(key) else {
            return;
        };
        let mut byte = [0u8; 1];
        let dead = match spare.stream.peek(&mut byte) {
            Ok(n) => n == 0,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                // Nothing there, not even an end: its client need not read.
                spare.rx = RxState::default();
                false
            }
            Err(e) => e.kind() != std::io::ErrorKind::Interrupted,
        };
        if dead {
            let (app_key, young) = (spare.app, now.duration_since(spare.born) < SPARE_GRACE);
            self.close(key, Ending::Gone);
            self.back_off_if_failing(app_key, young, now);
            self.top_up(app_key, now);
            self.flush_later(app_key);
        }
    }

    /// Ready dial-ins that die as soon as they arrive say the app cannot
    /// serve (its local service is down: the agent resets each dial-in it
    /// cannot connect through). Replacing them at once would spin the relay
    /// and the agent at full speed for as long as that lasts, so from the
    /// second young death in a row replacements wait, doubling from
    /// `REFILL_FIRST` to `REFILL_CAP`. A spare that lived, or served a
    /// client, ends the streak.
    fn back_off_if_failing(&mut self, app_key: usize, young: bool, now: Instant) {
        let Some(app) = self.conns.get_mut(app_key).and_then(Conn::app_mut) else {
            return;
        };
        app.spares_lost = if young { app.spares_lost + 1 } else { 0 };
        if app.spares_lost < 2 || app.refill_at.is_some() {
            return;
        }
        let delay = REFILL_FIRST
            .saturating_mul(1 << (app.spares_lost - 2).min(10))
            .min(REFILL_CAP);
        app.refill_at = Some(now + delay);
        log::debug!(
            "app {}: {} ready dial-ins died young; asking for more in {delay:?}",
            app.control.peer,
            app.spares_lost
        );
        self.arm_app_timer(app_key);
    }

    /// Removes and returns the waiting client of `app_key` whose token is
    /// `token`: a token is good once.
    fn claim(&mut self, app_key: usize, token: &DialToken) -> Option<usize> {
        let app = self.conns.get(app_key)?;
        let (Conn::Registering(app) | Conn::Registered(app)) = app else {
            return None;
        };
        let client = app.waiting.iter().copied().find(|&k| {
            matches!(self.conns.get(k), Some(Conn::AwaitingDialIn(w)) if w.token.is_some_and(|t| t.matches(token)))
        })?;
        if let Some(app) = self.conns.get_mut(app_key).and_then(Conn::app_mut) {
            app.waiting.retain(|&k| k != client);
        }
        Some(client)
    }

    /// AwaitingDialIn => Piping, then an immediate pump: the client may have
    /// sent bytes while it waited, and no new event will announce them.
    /// A dial-in that presented a token is already registered (under its
    /// own entry's token) and moves to the client's.
    fn pair(&mut self, key: usize, mut dial_in: TcpStream, registered: bool, now: Instant) {
        let interest = Interest::READABLE | Interest::WRITABLE;
        let moved = if registered {
            self.registry
                .reregister(&mut dial_in, token(key, DIAL_IN), interest)
        } else {
            self.registry
                .register(&mut dial_in, token(key, DIAL_IN), interest)
        };
        if let Err(e) = moved {
            log::warn!("dial-in dropped: cannot register: {e}");
            return self.close(key, Ending::Failed(e));
        }
        self.transition(key, |conn| match conn {
            Conn::AwaitingDialIn(waiting) => {
                log::debug!("client {} paired with its dial-in", waiting.peer);
                Conn::Piping(Piped {
                    pipe: Pipe::new(
                        waiting.client,
                        Endpoint::new(dial_in, RxState::registered()),
                    ),
                    last_moved: now,
                    moved: 0,
                    timer_armed: false,
                })
            }
            other => other,
        });
        self.pump(key, now);
    }

    /// Moves a pipe's bytes; requeues it if its budget ran out; arms the
    /// idle timer once it is half-closed.
    pub(super) fn pump(&mut self, key: usize, now: Instant) {
        let Some(Conn::Piping(piped)) = self.conns.get_mut(key) else {
            return;
        };
        let flow = piped.pipe.pump(&mut self.pool);
        if piped.pipe.moved() != piped.moved {
            piped.moved = piped.pipe.moved();
            piped.last_moved = now;
        }
        if piped.pipe.is_half_closed() && !piped.timer_armed {
            piped.timer_armed = true;
            self.timers.add(now + self.config.half_close_timeout, key);
        }
        match flow {
            Ok(Flow::Idle) => {}
            Ok(Flow::More) => self.requeued.push(token(key, CLIENT)),
            Ok(Flow::Done) => self.close(key, Ending::Done),
            Err(Broken::Reset) => self.close(key, Ending::Reset),
            Err(Broken::Failed(e)) => self.close(key, Ending::Failed(e)),
        }
    }

    /// The idle timer of a half-closed pipe fired: close it if nothing moved
    /// for the whole timeout, else wait out the rest.
    pub(super) fn check_idle(&mut self, key: usize, now: Instant) {
        let timeout = self.config.half_close_timeout;
        let Some(Conn::Piping(piped)) = self.conns.get_mut(key) else {
            return;
        };
        if !piped.pipe.is_half_closed() {
            return; // an open pipe may idle as long as its peers like
        }
        let idle_until = piped.last_moved + timeout;
        if now >= idle_until {
            log::debug!("half-closed pipe idle for {timeout:?}: closed");
            return self.close(key, Ending::TimedOut);
        }
        self.timers.add(idle_until, key);
    }
}
