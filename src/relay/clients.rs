//! The client side of the relay: admitting clients, asking their apps for
//! dial-ins (paced to what the dial-in listener's backlog holds), checking
//! dial-ins (by source address, or by token with a secret), pairing them,
//! ready dial-ins and their trial, and pumping pipes, including the idle
//! timer of half-closed pipes.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::Interest;
use mio::net::TcpStream;

use super::core::{CLIENT, Core, DIAL_IN, PRESENTING};
use crate::auth::{DialToken, TOKEN_LINE_LEN};
use crate::pipe::{Broken, Endpoint, Flow, Pipe, RxState};
use crate::protocol::{dial_line, parse_token_line};
use crate::reactor::{self, token};
use crate::sockio::{Io, no_delay, read_slice, reset_on_close};
use crate::state::{AppRef, Conn, Ending, Piped, Presenter, Spare, Waiting};

/// A ready dial-in that dies sooner than this after arriving counts as a
/// sign that its app cannot serve (see `back_off_if_failing`).
const SPARE_GRACE: Duration = Duration::from_secs(1);

/// Back-off of ready dial-in replacements while they keep dying young.
const REFILL_FIRST: Duration = Duration::from_millis(100);
const REFILL_CAP: Duration = Duration::from_secs(5);

/// Room a dial line needs in an app's outbox: the longest one (port and
/// token) is 40 bytes; twice that leaves slack.
const DIAL_LINE_ROOM: usize = 80;

impl Core {
    /// A client on an app's relayed port: hand it a ready dial-in, or queue
    /// it and ask the app to dial in (with a token, when a secret is set).
    pub(super) fn admit_client(
        &mut self,
        app_key: usize,
        stream: TcpStream,
        peer: SocketAddr,
        now: Instant,
    ) {
        no_delay(&stream);
        if let Some(spare) = self.live_spare(app_key, now) {
            return self.hand_spare(app_key, spare, stream, peer, now);
        }
        if !self.may_wait(app_key) {
            return reset_on_close(&stream);
        }
        let token = match self.config.secret {
            Some(_) => match DialToken::random() {
                Ok(token) => Some(token),
                Err(e) => return log::warn!("client {peer} refused: {e}"),
            },
            None => None,
        };
        let Some(app) = self.conns.get(app_key).and_then(Conn::app) else {
            return;
        };
        let app_ref = AppRef {
            key: app_key,
            id: app.id,
        };
        let waiting = Waiting {
            client: Endpoint::new(stream, RxState::registered()),
            peer,
            app: app_ref,
            token,
            replay: None,
        };
        self.wait_for_dial_in(waiting, None, now);
    }

    /// Whether one more client may wait for a dial-in of this app: within
    /// the per-app queue bound, with room in its outbox for the dial line,
    /// and room under the connection limit for the client and its dial-in.
    fn may_wait(&mut self, app_key: usize) -> bool {
        let max_waiting = self.config.max_waiting_per_app;
        let Some(app) = self.conns.get_mut(app_key).and_then(Conn::app_mut) else {
            return false;
        };
        let full = app.waiting.len() >= max_waiting || !app.control.has_room(DIAL_LINE_ROOM);
        if full {
            if !app.refusing {
                log::warn!(
                    "port {}: app {} has {} clients waiting for dial-ins; refusing new clients",
                    app.relayed_port,
                    app.control.peer,
                    app.waiting.len()
                );
                app.refusing = true;
            }
            return false;
        }
        app.refusing = false;
        self.has_room(2)
    }

    /// Queues a client (new, or back from a lost trial under `key`) for a
    /// dial-in: registered under its own entry, under its dial-in deadline,
    /// with room promised for the dial-in, and asked for as soon as the
    /// app's dial-in backlog has room.
    fn wait_for_dial_in(&mut self, waiting: Waiting, key: Option<usize>, now: Instant) {
        let (peer, app) = (waiting.peer, waiting.app);
        let key = match key {
            Some(key) => {
                self.transition(key, |_| Conn::AwaitingDialIn(waiting));
                key
            }
            None => {
                let mut waiting = waiting;
                let inserted = self.insert(|key, registry| {
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    registry.register(&mut waiting.client.stream, token(key, CLIENT), interest)?;
                    Ok(Conn::AwaitingDialIn(waiting))
                });
                match inserted {
                    Ok(key) => key,
                    Err(e) => return log::warn!("client {peer} dropped: cannot register: {e}"),
                }
            }
        };
        self.timers.add(now + self.config.dial_in_timeout, key);
        let Some(entry) = self.app_mut(app) else {
            return self.close(key, Ending::AppGone);
        };
        entry.waiting.push_back(key);
        entry.unasked += 1;
        self.reserved += 1;
        self.ask_for_waiting(app.key, now);
    }

    /// Sends dial lines for waiting clients not asked for yet, oldest
    /// first, while the app's dial-in backlog and outbox have room: an app
    /// never has more dial-ins outstanding than its dial-in listener can
    /// queue (invariant *A dial-in is never dropped*); the rest are asked
    /// for as dial-ins arrive or asks expire.
    pub(super) fn ask_for_waiting(&mut self, app_key: usize, now: Instant) {
        let (backlog, deadline) = (self.backlog, now + self.config.dial_in_timeout);
        let mut asked = false;
        loop {
            let Some(app) = self.conns.get(app_key).and_then(Conn::app) else {
                return;
            };
            if app.unasked == 0 || app.asks_out() >= backlog {
                break;
            }
            if !app.control.has_room(DIAL_LINE_ROOM) {
                break; // asked again once the outbox drains (`serve_control`)
            }
            let next = app.waiting[app.waiting.len() - app.unasked];
            let token = match self.conns.get(next) {
                Some(Conn::AwaitingDialIn(waiting)) => waiting.token,
                _ => None,
            };
            let Some(app) = self.conns.get_mut(app_key).and_then(Conn::app_mut) else {
                return;
            };
            app.control.queue(&dial_line(app.dial_port, token.as_ref()));
            app.unasked -= 1;
            app.client_asks.push_back(deadline);
            asked = true;
        }
        if asked {
            self.arm_app_timer(app_key);
            self.flush_later(app_key);
        }
    }

    /// The oldest ready dial-in of an app that is not known to be dead;
    /// dead ones found on the way (their end or error was noted, perhaps in
    /// this very batch of events) are closed and replaced, never handed out.
    fn live_spare(&mut self, app_key: usize, now: Instant) -> Option<usize> {
        loop {
            let app = self.conns.get(app_key).and_then(Conn::app)?;
            let spare = *app.spares.front()?;
            if let Some(Conn::Standby(ready)) = self.conns.get(spare)
                && !ready.rx.ending
            {
                return Some(spare);
            }
            if let Some(app) = self.conns.get_mut(app_key).and_then(Conn::app_mut) {
                app.spares.pop_front();
            }
            self.spare_died(spare, now);
        }
    }

    /// Hands a new client the app's oldest ready dial-in: the client joins
    /// the ready dial-in's entry (Standby => Piping), so nothing is
    /// re-registered; the pipe is on trial until the app answers (see
    /// [`Pipe::on_trial`]); then a replacement is asked for.
    fn hand_spare(
        &mut self,
        app_key: usize,
        spare: usize,
        mut client: TcpStream,
        peer: SocketAddr,
        now: Instant,
    ) {
        if !self.has_room(1) {
            return reset_on_close(&client);
        }
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self
            .registry
            .register(&mut client, token(spare, CLIENT), interest)
        {
            reset_on_close(&client);
            return log::warn!("client {peer} dropped: cannot register: {e}");
        }
        if let Some(app) = self.conns.get_mut(app_key).and_then(Conn::app_mut) {
            app.spares.retain(|&k| k != spare);
        }
        self.transition(spare, |conn| match conn {
            Conn::Standby(ready) => Conn::Piping(Piped {
                pipe: Pipe::on_trial(
                    Endpoint::new(client, RxState::registered()),
                    Endpoint::new(ready.stream, ready.rx),
                ),
                peer,
                trial: Some(ready.app),
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

    /// A dial-in. One the app was asked for always gets in (its room was
    /// promised when it was asked for); others only under the connection
    /// limit. With a secret it must present its client's token first;
    /// without one it must come from the app's address, and gets the oldest
    /// waiting client.
    pub(super) fn admit_dial_in(
        &mut self,
        app_key: usize,
        stream: TcpStream,
        peer: SocketAddr,
        now: Instant,
    ) {
        let Some(app) = self.conns.get(app_key).and_then(Conn::app) else {
            return;
        };
        let app_ref = AppRef {
            key: app_key,
            id: app.id,
        };
        let expected = app.asks_out() > app.presenting;
        let from_app = peer.ip().to_canonical() == app.control.peer.ip().to_canonical();
        if self.config.secret.is_none() && !from_app {
            log::debug!(
                "dial-in from {peer} refused: app {} registered from another address",
                app.control.peer
            );
            return reset_on_close(&stream);
        }
        if !expected && !self.has_room(1) {
            return reset_on_close(&stream);
        }
        match self.config.secret {
            Some(_) => self.present(app_ref, stream, peer, now),
            None => self.dial_in_from_app(app_key, stream, now),
        }
    }

    /// A dial-in from the app's address (no secret): it answers the oldest
    /// ask, and serves the oldest waiting client, or stands by.
    fn dial_in_from_app(&mut self, app_key: usize, stream: TcpStream, now: Instant) {
        no_delay(&stream);
        let Some(app) = self.conns.get_mut(app_key).and_then(Conn::app_mut) else {
            return;
        };
        let for_client = !app.waiting.is_empty();
        self.answer_ask(app_key, for_client);
        let Some(app) = self.conns.get_mut(app_key).and_then(Conn::app_mut) else {
            return;
        };
        if app.waiting.len() == app.unasked && app.unasked > 0 {
            // It serves a client whose dial line was not sent yet: that
            // promised dial-in is this one.
            app.unasked -= 1;
            self.reserved -= 1;
        }
        let Some(app) = self.conns.get_mut(app_key).and_then(Conn::app_mut) else {
            return;
        };
        match app.waiting.pop_front() {
            Some(client) => self.pair(client, stream, false, now),
            None => self.stand_by(app_key, stream, false, now),
        }
        self.ask_for_waiting(app_key, now);
    }

    /// Takes one outstanding ask of the app as answered: a client's if
    /// `for_client` (else a spare's), or the other kind if there is none.
    fn answer_ask(&mut self, app_key: usize, for_client: bool) {
        let Some(app) = self.conns.get_mut(app_key).and_then(Conn::app_mut) else {
            return;
        };
        let (first, second) = if for_client {
            (&mut app.client_asks, &mut app.spare_asks)
        } else {
            (&mut app.spare_asks, &mut app.client_asks)
        };
        if first.pop_front().or_else(|| second.pop_front()).is_some() {
            self.reserved -= 1;
        }
        self.arm_app_timer(app_key);
    }

    /// A dial-in that must present its token (with a secret): an entry of
    /// its own until the token is read.
    fn present(&mut self, app: AppRef, mut stream: TcpStream, peer: SocketAddr, now: Instant) {
        let inserted = self.insert(|key, registry| {
            registry.register(&mut stream, token(key, PRESENTING), Interest::READABLE)?;
            Ok(Conn::Presenting(Presenter {
                stream,
                peer,
                app,
                line: [0; TOKEN_LINE_LEN],
                got: 0,
            }))
        });
        if let Ok(key) = inserted {
            if let Some(app) = self.app_mut(app) {
                app.presenting += 1;
            }
            self.timers.add(now + self.config.register_timeout, key);
            self.read_token(key, now);
        }
    }

    /// A presenting dial-in of `app` resolved (paired, kept or closed).
    pub(super) fn presented(&mut self, app: AppRef) {
        if let Some(app) = self.app_mut(app) {
            app.presenting = app.presenting.saturating_sub(1);
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
        let (app, peer) = (presenter.app, presenter.peer);
        let Some(token) = parse_token_line(&presenter.line) else {
            log::debug!("dial-in from {peer} refused: not a token");
            return self.close(key, Ending::Refused);
        };
        let client = self.claim(app, &token);
        let spare = client.is_none() && self.claim_spare(app, &token);
        if client.is_none() && !spare {
            log::debug!("dial-in from {peer} refused: wrong or used token");
            return self.close(key, Ending::Refused);
        }
        let Some(Conn::Presenting(presenter)) = self.take(key) else {
            return;
        };
        self.presented(app);
        no_delay(&presenter.stream);
        match client {
            Some(client) => self.pair(client, presenter.stream, true, now),
            None => self.stand_by(app.key, presenter.stream, true, now),
        }
        if self.app_mut(app).is_some() {
            self.ask_for_waiting(app.key, now);
        }
    }

    /// Removes and returns the waiting client of `app` whose token is
    /// `token` (a token is good once), taking its ask as answered.
    fn claim(&mut self, app: AppRef, token: &DialToken) -> Option<usize> {
        let waiting = &self.conns.get(app.key).and_then(Conn::app)?.waiting;
        let client = waiting.iter().copied().find(|&k| {
            matches!(self.conns.get(k), Some(Conn::AwaitingDialIn(w)) if w.token.is_some_and(|t| t.matches(token)))
        })?;
        self.unqueue_waiting(app, client);
        self.answer_ask(app.key, true);
        Some(client)
    }

    /// Forgets a token the relay sent for a ready dial-in, taking its ask
    /// as answered; whether it was one.
    fn claim_spare(&mut self, app: AppRef, token: &DialToken) -> bool {
        let Some(entry) = self.app_mut(app) else {
            return false;
        };
        let Some(at) = entry.spare_tokens.iter().position(|t| t.matches(token)) else {
            return false;
        };
        entry.spare_tokens.remove(at); // in order: the oldest expire first
        self.answer_ask(app.key, false);
        true
    }

    /// A dial-in with no client to pair: keep it ready if its app asked for
    /// ready dial-ins and has room for one more, else close it.
    fn stand_by(&mut self, app_key: usize, mut stream: TcpStream, registered: bool, now: Instant) {
        let Some(app) = self.conns.get(app_key).and_then(Conn::app) else {
            return;
        };
        if app.spares.len() >= app.ready {
            return log::debug!("dial-in closed: no client is waiting");
        }
        let app_ref = AppRef {
            key: app_key,
            id: app.id,
        };
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
                    app: app_ref,
                    // Not read yet: the poll reports what is pending.
                    rx: RxState::default(),
                    born: now,
                })
            })
        });
        if let (Ok(key), Some(app)) = (inserted, self.app_mut(app_ref)) {
            app.spares.push_back(key);
        }
    }

    /// Asks the app for as many dial-ins as it wants ready, beyond those it
    /// has and those already asked for, within its dial-in backlog and the
    /// connection limit. Queues the lines; callers flush. An asked dial-in
    /// that does not come within the dial-in timeout is given up (see
    /// `app_due`), so an app that could not dial (out of descriptors, a
    /// connect that timed out) is asked again rather than left with a short
    /// ready pool for good.
    pub(super) fn top_up(&mut self, app_key: usize, now: Instant) {
        let (secret, deadline) = (
            self.config.secret.is_some(),
            now + self.config.dial_in_timeout,
        );
        let (backlog, room) = (
            self.backlog,
            self.config.max_connections.saturating_sub(self.committed()),
        );
        let Some(app) = self.conns.get_mut(app_key).and_then(Conn::app_mut) else {
            return;
        };
        if app.refill_at.is_some() {
            return; // backing off: see `back_off_if_failing`
        }
        let wanted = app
            .ready
            .saturating_sub(app.spares.len() + app.spare_asks.len())
            .min(backlog.saturating_sub(app.asks_out()))
            .min(room);
        let mut asked = 0;
        for _ in 0..wanted {
            let token = if secret {
                DialToken::random().ok()
            } else {
                None
            };
            if (secret && token.is_none()) || !app.control.has_room(DIAL_LINE_ROOM) {
                break;
            }
            app.control.queue(&dial_line(app.dial_port, token.as_ref()));
            app.spare_tokens.extend(token);
            app.spare_asks.push_back(deadline);
            asked += 1;
        }
        self.reserved += asked;
        self.arm_app_timer(app_key);
    }

    /// Arms the app entry's one timer for its next deadline (see
    /// [`App::next_deadline`](crate::state::App::next_deadline)), or
    /// cancels it when there is none.
    pub(super) fn arm_app_timer(&mut self, app_key: usize) {
        let Some(app) = self.conns.get(app_key).and_then(Conn::app) else {
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
        let mut expired = 0;
        while app.spare_asks.front().is_some_and(|&at| at <= now) {
            app.spare_asks.pop_front();
            if !app.spare_tokens.is_empty() {
                app.spare_tokens.remove(0);
            }
            expired += 1;
        }
        // A client's ask expires with the client (its dial-in deadline is
        // no later), which is closed by its own timer.
        while app.client_asks.front().is_some_and(|&at| at <= now) {
            app.client_asks.pop_front();
            expired += 1;
        }
        if expired > 0 {
            log::debug!(
                "app {}: {expired} asked dial-ins did not come",
                app.control.peer
            );
        }
        self.reserved -= expired;
        self.ask_for_waiting(app_key, now);
        self.top_up(app_key, now);
        self.arm_app_timer(app_key);
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
            self.spare_died(key, now);
        }
    }

    /// Closes a ready dial-in found dead, and asks for a replacement (after
    /// a back-off if they keep dying young).
    fn spare_died(&mut self, key: usize, now: Instant) {
        let Some(Conn::Standby(spare)) = self.conns.get(key) else {
            return;
        };
        let (app, young) = (spare.app, now.duration_since(spare.born) < SPARE_GRACE);
        self.close(key, Ending::Gone);
        self.back_off_if_failing(app, young, now);
        self.top_up(app.key, now);
        self.flush_later(app.key);
    }

    /// Ready dial-ins that die as soon as they arrive say the app cannot
    /// serve (its local service is down: the agent resets each dial-in it
    /// cannot connect through). Replacing them at once would spin the relay
    /// and the agent at full speed for as long as that lasts, so from the
    /// second young death in a row replacements wait, doubling from
    /// `REFILL_FIRST` to `REFILL_CAP`. A spare that lived, or served a
    /// client, ends the streak.
    fn back_off_if_failing(&mut self, app_ref: AppRef, young: bool, now: Instant) {
        let Some(app) = self.app_mut(app_ref) else {
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
        self.arm_app_timer(app_ref.key);
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
            Conn::AwaitingDialIn(mut waiting) => {
                log::debug!("client {} paired with its dial-in", waiting.peer);
                let dial_in = Endpoint::new(dial_in, RxState::registered());
                let replay = waiting.replay.take();
                Conn::Piping(Piped {
                    pipe: Pipe::with_replay(waiting.client, dial_in, replay),
                    peer: waiting.peer,
                    trial: None,
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
            Err(Broken::Lost) => self.retry(key, now),
        }
    }

    /// The ready dial-in a client was handed ended or failed before its app
    /// sent a byte (the local service had closed it, the agent went away):
    /// the client goes back to waiting, for a fresh dial-in, with every
    /// byte it sent kept to be written to that one first. Piping =>
    /// AwaitingDialIn, in place.
    fn retry(&mut self, key: usize, now: Instant) {
        let Some(Conn::Piping(piped)) = self.conns.get(key) else {
            return;
        };
        let (peer, app) = (piped.peer, piped.trial);
        let live = app.filter(|&app| self.app_mut(app).is_some());
        let token = match (live, &self.config.secret) {
            (Some(_), Some(_)) => DialToken::random().ok().map(Some),
            (Some(_), None) => Some(None),
            (None, _) => None,
        };
        let (Some(app), Some(token)) = (live, token) else {
            log::debug!("client {peer}: its ready dial-in was lost and its app is gone");
            return self.close(key, Ending::Reset);
        };
        let Some(Conn::Piping(piped)) = self.take_state(key) else {
            return;
        };
        let (client, mut lost, replay) = piped.pipe.into_replay(&mut self.pool);
        reactor::forget(&self.registry, &mut lost.stream);
        log::debug!("client {peer}: its ready dial-in was lost before answering; asking again");
        self.back_off_if_failing(app, true, now);
        let waiting = Waiting {
            client,
            peer,
            app,
            token,
            replay,
        };
        self.wait_for_dial_in(waiting, Some(key), now);
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
