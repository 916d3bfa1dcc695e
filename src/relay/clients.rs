//! The client side of the card's path: a client connects to a relayed
//! port and waits (`AwaitingDialIn`); its app is asked to dial in (paced
//! to what the dial-in listener's backlog holds); the dial-in is paired
//! with it (`Piping`) and the pipe is pumped until both ways are done.

use std::net::SocketAddr;
use std::time::Instant;

use mio::Interest;
use mio::net::TcpStream;

use super::core::RelayCore;
use super::state::{CLIENT, DIAL_IN, Ending, Flushing, Piped, RelayConn, Waiting};
use super::status::{Listener, Refused};
use crate::auth::DialToken;
use crate::flush::{Check, Flush, STALL};
use crate::pipe::{Broken, Endpoint, Flow, Pipe, RxState};
use crate::protocol::dial_line;
use crate::sockio::{no_delay, reset_on_close};
use crate::table::Id;

/// Room a dial line needs in an app's outbox: the longest one (port and
/// token) is 40 bytes; twice that leaves slack.
pub(super) const DIAL_LINE_ROOM: usize = 80;

impl RelayCore {
    /// A client on an app's relayed port. One from a balancer the relay
    /// trusts first says who the client really is (the `proxy` extension).
    pub(super) fn on_client(&mut self, app: Id, stream: TcpStream, peer: SocketAddr, now: Instant) {
        if self.is_trusted_balancer(peer) {
            return self.unwrap(app, stream, peer, now);
        }
        self.admit_client(app, stream, peer, now);
    }

    /// A client at `peer`: handed a ready dial-in if the app keeps some,
    /// else queued for a dial-in of its own.
    pub(super) fn admit_client(
        &mut self,
        app: Id,
        mut stream: TcpStream,
        peer: SocketAddr,
        now: Instant,
    ) {
        if !self.client_may_connect(app, peer, now) {
            return reset_on_close(&stream);
        }
        no_delay(&stream);
        while let Some(spare) = self.live_spare(app, now) {
            match self.hand_spare(app, spare, stream, peer, now) {
                Ok(()) => return,
                Err(back) => stream = back, // that one was dead: the next
            }
        }
        if !self.may_wait(app) {
            return reset_on_close(&stream);
        }
        let token = match self.config.secret {
            Some(_) => match DialToken::random() {
                Ok(token) => Some(token),
                Err(e) => return log::warn!("client {peer} refused: {e}"),
            },
            None => None,
        };
        let client = Endpoint::new(stream, RxState::registered());
        let waiting = Waiting {
            client,
            peer,
            app,
            token,
            replay: None,
            since: now,
        };
        self.wait_for_dial_in(waiting, None, now);
    }

    /// Whether one more client may wait for a dial-in of this app: within
    /// the per-app queue bound, with room in its outbox for the dial line,
    /// and room under the connection limit for the client and its dial-in.
    fn may_wait(&mut self, app_id: Id) -> bool {
        let max_waiting = self.config.max_waiting_per_app;
        let Some(app) = self.app_mut(app_id) else {
            return false;
        };
        let full = app.waiting.len() >= max_waiting || !app.control.has_room(DIAL_LINE_ROOM);
        if full && !app.refusing {
            log::warn!(
                "port {}: app {} has {} clients waiting for dial-ins; refusing new clients",
                app.relayed_port,
                app.control.peer,
                app.waiting.len()
            );
        }
        app.refusing = full;
        let refused = if full {
            Some(Refused::Waiting)
        } else {
            (!self.has_room(2)).then_some(Refused::Limit)
        };
        if let Some(reason) = refused {
            self.metrics.refused(Listener::Relayed, reason);
        }
        refused.is_none()
    }

    /// Queues a client (a new one, or one back from a lost trial in entry
    /// `back`) for a dial-in: under its dial-in deadline, with room promised
    /// for the dial-in, asked for as soon as the app's backlog has room.
    pub(super) fn wait_for_dial_in(&mut self, waiting: Waiting, back: Option<Id>, now: Instant) {
        let (peer, app) = (waiting.peer, waiting.app);
        let id = match back {
            Some(id) => {
                self.table
                    .transition(id, |_| RelayConn::AwaitingDialIn(waiting));
                id
            }
            None => match self.insert_waiting(waiting) {
                Ok(id) => id,
                Err(e) => return log::warn!("client {peer} dropped: cannot register: {e}"),
            },
        };
        self.table.arm(id, now + self.config.dial_in_timeout);
        let Some(entry) = self.app_mut(app) else {
            return self.close(id, Ending::AppGone);
        };
        entry.waiting.push_back(id);
        entry.unasked += 1;
        self.reserved += 1;
        self.ask_for_waiting(app, now);
    }

    /// A new entry for a waiting client, its socket registered under it.
    fn insert_waiting(&mut self, mut waiting: Waiting) -> std::io::Result<Id> {
        self.table.insert(|id, registry| {
            let interest = Interest::READABLE | Interest::WRITABLE;
            registry.register(&mut waiting.client.stream, id.token(CLIENT), interest)?;
            Ok(RelayConn::AwaitingDialIn(waiting))
        })
    }

    /// Sends dial lines for waiting clients not asked for yet, oldest
    /// first, while the app's dial-in backlog and outbox have room: an app
    /// never has more dial-ins outstanding than its dial-in listener can
    /// queue (invariant *A dial-in is never dropped*); the rest are asked
    /// for as dial-ins arrive or asks expire.
    pub(super) fn ask_for_waiting(&mut self, app_id: Id, now: Instant) {
        let (backlog, deadline) = (self.backlog, now + self.config.dial_in_timeout);
        let mut asked = false;
        while let Some(client) = self.next_to_ask(app_id, backlog) {
            let token = match self.table.get(client) {
                Some(RelayConn::AwaitingDialIn(waiting)) => waiting.token,
                _ => None,
            };
            let Some(app) = self.app_mut(app_id) else {
                return;
            };
            app.control.queue(&dial_line(app.dial_port, token.as_ref()));
            app.unasked -= 1;
            app.asks.push_back(deadline);
            asked = true;
        }
        if asked {
            self.arm_app_timer(app_id);
            self.flush_later(app_id);
        }
    }

    /// The oldest waiting client of the app not asked for yet, if the app's
    /// dial-in backlog and outbox have room to ask for it now.
    fn next_to_ask(&self, app_id: Id, backlog: usize) -> Option<Id> {
        let app = self.app(app_id)?;
        let room = app.asks_out() < backlog && app.control.has_room(DIAL_LINE_ROOM);
        (app.unasked > 0 && room).then(|| app.waiting[app.waiting.len() - app.unasked])
    }

    /// Arms the app entry's one timer for its next deadline (see
    /// `App::next_deadline`), or cancels it when there is none.
    pub(super) fn arm_app_timer(&mut self, app: Id) {
        match self.app(app).and_then(|a| a.next_deadline()) {
            Some(at) => self.table.arm(app, at),
            None => self.table.disarm(app),
        }
    }

    /// The app's timer fired: asked dial-ins that did not come in time are
    /// given up (and their clients' places asked for again); then the
    /// ready pool's deadlines.
    pub(super) fn app_due(&mut self, app_id: Id, now: Instant) {
        let Some(app) = self.app_mut(app_id) else {
            return;
        };
        // A client's ask expires with the client (its dial-in deadline is
        // no later), which is closed by its own timer.
        let before = app.asks.len();
        while app.asks.front().is_some_and(|&at| at <= now) {
            app.asks.pop_front();
        }
        self.reserved -= before - app.asks.len();
        self.ready_due(app_id, now);
        self.ask_for_waiting(app_id, now);
        self.arm_app_timer(app_id);
        self.flush_later(app_id);
    }

    /// A dial-in. One the app was asked for always gets in (its room was
    /// promised when it was asked for); others only under the connection
    /// limit. With a secret it must present its client's token first;
    /// without one it must come from the app's address.
    pub(super) fn admit_dial_in(
        &mut self,
        app_id: Id,
        stream: TcpStream,
        peer: SocketAddr,
        now: Instant,
    ) {
        if !self.app_may_connect(Listener::DialIn, peer, now) {
            return reset_on_close(&stream);
        }
        let Some(app) = self.app(app_id) else {
            return;
        };
        let expected = app.asks_out() > app.presenting;
        let from_app = peer.ip().to_canonical() == app.control.peer.ip().to_canonical();
        if self.config.secret.is_none() && !from_app {
            log::debug!(
                "dial-in from {peer} refused: app {} registered from another address",
                app.control.peer
            );
            self.metrics.refused(Listener::DialIn, Refused::Address);
            return reset_on_close(&stream);
        }
        if !expected && !self.has_room(1) {
            self.metrics.refused(Listener::DialIn, Refused::Limit);
            return reset_on_close(&stream);
        }
        match self.config.secret {
            Some(_) => self.present(app_id, stream, peer, now),
            None => self.dial_in_from_app(app_id, stream, now),
        }
    }

    /// A dial-in from the app's address (no secret): it answers the oldest
    /// ask and serves the oldest waiting client, or stands by.
    fn dial_in_from_app(&mut self, app_id: Id, stream: TcpStream, now: Instant) {
        no_delay(&stream);
        let Some(app) = self.app_mut(app_id) else {
            return;
        };
        let for_client = !app.waiting.is_empty();
        if app.waiting.len() == app.unasked && app.unasked > 0 {
            // It serves a client whose dial line was not sent yet: that
            // promised dial-in is this one.
            app.unasked -= 1;
            self.reserved -= 1;
        }
        self.answer_ask(app_id, for_client);
        match self.app_mut(app_id).and_then(|app| app.waiting.pop_front()) {
            Some(client) => self.pair(client, stream, false, now),
            None => self.stand_by(app_id, stream, false, now),
        }
        self.ask_for_waiting(app_id, now);
    }

    /// Takes one outstanding ask of the app as answered: a client's if
    /// `for_client` (else a ready dial-in's), or the other kind if there
    /// is none of that one.
    pub(super) fn answer_ask(&mut self, app_id: Id, for_client: bool) {
        let Some(app) = self.app_mut(app_id) else {
            return;
        };
        let (first, second) = if for_client {
            (&mut app.asks, &mut app.ready.asks)
        } else {
            (&mut app.ready.asks, &mut app.asks)
        };
        if first.pop_front().or_else(|| second.pop_front()).is_some() {
            self.reserved -= 1;
        }
        self.arm_app_timer(app_id);
    }

    /// AwaitingDialIn => Piping, then an immediate pump: the client may have
    /// sent bytes while it waited, and no new event will announce them.
    /// A dial-in that presented a token is already registered (under its
    /// own entry's token) and moves to the client's.
    pub(super) fn pair(&mut self, id: Id, mut dial_in: TcpStream, registered: bool, now: Instant) {
        if !self.send_proxy_header(id, &dial_in) {
            log::debug!("dial-in lost before its PROXY header");
            return self.close(id, Ending::Reset);
        }
        let interest = Interest::READABLE | Interest::WRITABLE;
        let registry = self.table.registry();
        let moved = if registered {
            registry.reregister(&mut dial_in, id.token(DIAL_IN), interest)
        } else {
            registry.register(&mut dial_in, id.token(DIAL_IN), interest)
        };
        if let Err(e) = moved {
            log::warn!("dial-in dropped: cannot register: {e}");
            return self.close(id, Ending::Failed(e));
        }
        let mut paired = None;
        self.table.transition(id, |conn| match conn {
            RelayConn::AwaitingDialIn(mut waiting) => {
                log::debug!("client {} paired with its dial-in", waiting.peer);
                paired = Some((waiting.app, waiting.since));
                let dial_in = Endpoint::new(dial_in, RxState::registered());
                let replay = waiting.replay.take();
                let pipe = Pipe::with_replay(waiting.client, dial_in, replay);
                RelayConn::Piping(Piped::new(pipe, waiting.peer, waiting.app, false, now))
            }
            other => other,
        });
        if let Some((app, since)) = paired {
            self.piped(app, now.saturating_duration_since(since));
        }
        self.pump(id, now);
    }

    /// Begins a dial-in with the PROXY header naming waiting client `id`,
    /// if its app asked for headers; whether the dial-in is still good.
    fn send_proxy_header(&self, id: Id, dial_in: &TcpStream) -> bool {
        let Some(RelayConn::AwaitingDialIn(waiting)) = self.table.get(id) else {
            return true;
        };
        match self.proxy_header(waiting.app, &waiting.client.stream, waiting.peer) {
            Some(header) => super::proxy::send_header(dial_in, &header),
            None => true,
        }
    }

    /// Moves a pipe's bytes, and acts on what the pump says: requeue it if
    /// its budget ran out, close it when done or broken, arm the idle timer
    /// once it is half-closed.
    pub(super) fn pump(&mut self, id: Id, now: Instant) {
        let half_close_timeout = self.config.half_close_timeout;
        let Some(RelayConn::Piping(piped)) = self.table.get_mut(id) else {
            return;
        };
        let flow = piped.pipe.pump(&mut self.pool);
        let moved = piped.pipe.moved_each_way();
        if moved != piped.moved {
            let delta = (moved.0 - piped.moved.0, moved.1 - piped.moved.1);
            (piped.moved, piped.last_moved) = (moved, now);
            let app = piped.app;
            self.count_bytes(app, delta);
        }
        let Some(RelayConn::Piping(piped)) = self.table.get_mut(id) else {
            return;
        };
        if piped.pipe.is_half_closed() && !piped.timer_armed {
            piped.timer_armed = true;
            self.table.arm(id, now + half_close_timeout);
        }
        match flow {
            Ok(Flow::Idle) => {}
            Ok(Flow::More) => self.table.requeue(id, CLIENT),
            Ok(Flow::Done) => self.finish(id, now),
            Err(Broken::Reset) => self.close(id, Ending::Reset),
            Err(Broken::Failed(e)) => self.close(id, Ending::Failed(e)),
            Err(Broken::Lost) => self.retry(id, now),
        }
    }

    /// Both ways are done: Piping => closed, or => Flushing while a peer has
    /// not acknowledged every byte (a close would leave them to an orphan,
    /// which the kernel resets when TCP memory runs short: `crate::flush`).
    fn finish(&mut self, id: Id, now: Instant) {
        let Some(RelayConn::Piping(piped)) = self.table.get(id) else {
            return;
        };
        if piped.pipe.unacked() == 0 {
            return self.close(id, Ending::Done);
        }
        let (pool, mut check) = (&mut self.pool, Check::Delivered);
        self.table.transition(id, |conn| match conn {
            RelayConn::Piping(piped) => {
                let (flush, first) = Flush::new(piped.pipe.into_streams(pool), now);
                check = first;
                RelayConn::Flushing(Flushing {
                    flush,
                    app: piped.app,
                })
            }
            other => other,
        });
        self.flush_checked(id, check);
    }

    /// Flushing: counts what the peers have not acknowledged yet.
    pub(super) fn check_flush(&mut self, id: Id, now: Instant) {
        if let Some(RelayConn::Flushing(flushing)) = self.table.get_mut(id) {
            let check = flushing.flush.check(now);
            self.flush_checked(id, check);
        }
    }

    /// Flushing => closed once delivered, or when the peers stall.
    fn flush_checked(&mut self, id: Id, check: Check) {
        match check {
            Check::Delivered => self.close(id, Ending::Done),
            Check::Again(at) => self.table.arm(id, at),
            Check::Stalled => {
                if let Some(RelayConn::Flushing(flushing)) = self.table.get(id) {
                    let pending = flushing.flush.pending();
                    log::debug!("pipe closed with {pending} bytes unacknowledged for {STALL:?}");
                }
                self.close(id, Ending::Done);
            }
        }
    }

    /// A client was paired through app `app` after waiting `waited`.
    pub(super) fn piped(&mut self, app: Id, waited: std::time::Duration) {
        self.metrics.pairing.observe(waited);
        if let Some(app) = self.app_mut(app) {
            app.pipes += 1;
        }
    }

    /// A pipe of app `app` is no more (closed, or its client back to waiting).
    pub(super) fn unpiped(&mut self, app: Id) {
        if let Some(app) = self.app_mut(app) {
            app.pipes = app.pipes.saturating_sub(1);
        }
    }

    /// Bytes a pipe of app `app` moved: to the app, and back to the client.
    fn count_bytes(&mut self, app: Id, (to_app, to_client): (u64, u64)) {
        self.metrics.to_apps += to_app;
        self.metrics.to_clients += to_client;
        if let Some(app) = self.app_mut(app) {
            app.bytes.0 += to_app;
            app.bytes.1 += to_client;
        }
    }

    /// The idle timer of a half-closed pipe fired: close it if nothing moved
    /// for the whole timeout, else wait out the rest.
    pub(super) fn check_idle(&mut self, id: Id, now: Instant) {
        let timeout = self.config.half_close_timeout;
        let Some(RelayConn::Piping(piped)) = self.table.get_mut(id) else {
            return;
        };
        if !piped.pipe.is_half_closed() {
            return; // an open pipe may idle as long as its peers like
        }
        let idle_until = piped.last_moved + timeout;
        if now >= idle_until {
            log::debug!("half-closed pipe idle for {timeout:?}: closed");
            return self.close(id, Ending::TimedOut);
        }
        self.table.arm(id, idle_until);
    }
}
