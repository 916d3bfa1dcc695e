//! The `ready` extension (`ready N` on the control connection): the relay
//! keeps N dial-ins of an app ready (`Standby`), hands a new client the
//! oldest at once (the client joins its entry: `Standby => Piping`), and
//! asks for a replacement. A dead one is noticed with `peek` and replaced,
//! never handed out; one that dies in a client's hands before the app's
//! first byte sends the client back to waiting, its bytes kept (the pipe's
//! trial, [`Pipe::on_trial`]).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mio::Interest;
use mio::net::TcpStream;

use super::clients::DIAL_LINE_ROOM;
use super::core::RelayCore;
use super::state::{CLIENT, DIAL_IN, Ending, Piped, RelayConn, Waiting};
use super::status::{Listener, Refused};
use crate::auth::DialToken;
use crate::pipe::{Endpoint, Pipe, RxState};
use crate::protocol::{ProtocolError, Refusal, dial_line};
use crate::reactor;
use crate::sockio::reset_on_close;
use crate::table::Id;

/// A ready dial-in that dies sooner than this after arriving counts as a
/// sign that its app cannot serve (see `back_off_if_failing`).
const SPARE_GRACE: Duration = Duration::from_secs(1);

/// Back-off of ready dial-in replacements while they keep dying young.
const REFILL_FIRST: Duration = Duration::from_millis(100);
const REFILL_CAP: Duration = Duration::from_secs(5);

/// A dial-in kept ready for the next client of its app. Not read: bytes a
/// server-first app sends wait in the kernel for the client; only its
/// death is watched for, with `peek`.
pub(super) struct Spare {
    pub(super) stream: TcpStream, // the dial-in
    pub(super) app: Id,           // its app
    pub(super) rx: RxState,       // its read half, from every event since it was registered
    pub(super) born: Instant,     // when it arrived, to tell a dial-in that died young
}

/// An app's ready dial-ins and what keeping them needs.
#[derive(Default)]
pub(super) struct ReadyPool {
    pub(super) wanted: usize,              // dial-ins to keep ready (`ready N`)
    pub(super) spares: VecDeque<Id>,       // the ready ones, oldest first
    pub(super) asks: VecDeque<Instant>,    // deadlines of dial lines sent for them, oldest first
    pub(super) tokens: Vec<DialToken>,     // tokens of those lines (with a secret), oldest first
    pub(super) lost: u32,                  // ready dial-ins in a row that died young
    pub(super) refill_at: Option<Instant>, // replacements wait until then (back-off)
}

impl ReadyPool {
    /// The pool's next deadline: a refill back-off's end, or the oldest
    /// ask's.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        reactor::earliest(self.refill_at, self.asks.front().copied())
    }
}

impl RelayCore {
    /// `ready N`: keep this many dial-ins of the app ready. Spares beyond
    /// a lowered count are closed; the rest are asked for.
    pub(super) fn answer_ready(
        &mut self,
        app_id: Id,
        request: Result<usize, ProtocolError>,
        now: Instant,
    ) {
        let count = match request {
            Ok(count) => count,
            Err(e) => return self.refuse(app_id, Refusal::BadReadyRequest(e.to_string())),
        };
        let Some(app) = self.app_mut(app_id) else {
            return;
        };
        app.ready.wanted = count;
        let extra: Vec<Id> = app.ready.spares.iter().skip(count).copied().collect();
        log::debug!("app {} keeps {count} dial-ins ready", app.control.peer);
        for spare in extra {
            self.close(spare, Ending::Done);
        }
        self.top_up(app_id, now);
    }

    /// Asks the app for as many dial-ins as it wants ready, beyond those it
    /// has and those already asked for, within its dial-in backlog and the
    /// connection limit. Queues the lines; callers flush. An asked dial-in
    /// that does not come within the dial-in timeout is given up (see
    /// `ready_due`), so an app that could not dial (out of descriptors, a
    /// connect that timed out) is asked again rather than left with a short
    /// ready pool for good.
    pub(super) fn top_up(&mut self, app_id: Id, now: Instant) {
        let (secret, deadline) = (
            self.config.secret.is_some(),
            now + self.config.dial_in_timeout,
        );
        let room = self.config.max_connections.saturating_sub(self.committed());
        let backlog = self.backlog;
        let Some(app) = self.app_mut(app_id) else {
            return;
        };
        if app.ready.refill_at.is_some() {
            return; // backing off: see `back_off_if_failing`
        }
        let pool = &app.ready;
        let wanted = pool
            .wanted
            .saturating_sub(pool.spares.len() + pool.asks.len())
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
            app.ready.tokens.extend(token);
            app.ready.asks.push_back(deadline);
            asked += 1;
        }
        self.reserved += asked;
        self.arm_app_timer(app_id);
    }

    /// The pool's part of the app's timer: a refill back-off ended, or
    /// asked dial-ins did not come in time (forgotten, tokens too, and
    /// asked for again).
    pub(super) fn ready_due(&mut self, app_id: Id, now: Instant) {
        let Some(app) = self.app_mut(app_id) else {
            return;
        };
        let pool = &mut app.ready;
        if pool.refill_at.is_some_and(|at| at <= now) {
            pool.refill_at = None;
        }
        let mut expired = 0;
        while pool.asks.front().is_some_and(|&at| at <= now) {
            pool.asks.pop_front();
            if !pool.tokens.is_empty() {
                pool.tokens.remove(0);
            }
            expired += 1;
        }
        if expired > 0 {
            log::debug!(
                "app {}: {expired} asked ready dial-ins did not come",
                app.control.peer
            );
        }
        self.reserved -= expired;
        self.top_up(app_id, now);
    }

    /// Forgets a token the relay sent for a ready dial-in, taking its ask
    /// as answered; whether it was one.
    pub(super) fn claim_spare(&mut self, app_id: Id, token: &DialToken) -> bool {
        let Some(app) = self.app_mut(app_id) else {
            return false;
        };
        let Some(at) = app.ready.tokens.iter().position(|t| t.matches(token)) else {
            return false;
        };
        app.ready.tokens.remove(at); // in order: the oldest expire first
        self.answer_ask(app_id, false);
        true
    }

    /// A dial-in with no client to pair: keep it ready if its app asked for
    /// ready dial-ins and has room for one more, else close it.
    pub(super) fn stand_by(
        &mut self,
        app_id: Id,
        mut stream: TcpStream,
        registered: bool,
        now: Instant,
    ) {
        let Some(app) = self.app(app_id) else {
            return;
        };
        if app.ready.spares.len() >= app.ready.wanted {
            return log::debug!("dial-in closed: no client is waiting");
        }
        // Writable too, though a ready dial-in writes nothing: a client will
        // join this entry as it is, and its pipe needs the writable edges.
        let interest = Interest::READABLE | Interest::WRITABLE;
        let inserted = self.table.insert(|id, registry| {
            let moved = if registered {
                registry.reregister(&mut stream, id.token(DIAL_IN), interest)
            } else {
                registry.register(&mut stream, id.token(DIAL_IN), interest)
            };
            // Not read yet: the poll reports what is pending.
            let spare = Spare {
                stream,
                app: app_id,
                rx: RxState::default(),
                born: now,
            };
            moved.map(|()| RelayConn::Standby(spare))
        });
        if let (Ok(id), Some(app)) = (inserted, self.app_mut(app_id)) {
            app.ready.spares.push_back(id);
        }
    }

    /// The oldest ready dial-in of an app that is not known to be dead;
    /// dead ones found on the way (their end or error was noted, perhaps in
    /// this very batch of events) are closed and replaced, never handed out.
    pub(super) fn live_spare(&mut self, app_id: Id, now: Instant) -> Option<Id> {
        loop {
            let spare = *self.app(app_id)?.ready.spares.front()?;
            if let Some(RelayConn::Standby(ready)) = self.table.get(spare)
                && !ready.rx.ending
            {
                return Some(spare);
            }
            if let Some(app) = self.app_mut(app_id) {
                app.ready.spares.pop_front();
            }
            self.spare_died(spare, now);
        }
    }

    /// Hands a new client the app's oldest ready dial-in: the client joins
    /// the ready dial-in's entry (Standby => Piping), so nothing is
    /// re-registered; the pipe is on trial until the app answers; then a
    /// replacement is asked for.
    /// Gives the client back if that ready dial-in turns out dead (its
    /// PROXY header could not be written), to try the next.
    pub(super) fn hand_spare(
        &mut self,
        app_id: Id,
        spare: Id,
        mut client: TcpStream,
        peer: SocketAddr,
        now: Instant,
    ) -> Result<(), TcpStream> {
        if !self.has_room(1) {
            self.metrics.refused(Listener::Relayed, Refused::Limit);
            reset_on_close(&client);
            return Ok(());
        }
        if !self.spare_takes_header(app_id, spare, &client, peer) {
            if let Some(app) = self.app_mut(app_id) {
                app.ready.spares.retain(|&k| k != spare);
            }
            self.spare_died(spare, now);
            return Err(client);
        }
        let interest = Interest::READABLE | Interest::WRITABLE;
        let registry = self.table.registry();
        if let Err(e) = registry.register(&mut client, spare.token(CLIENT), interest) {
            reset_on_close(&client);
            log::warn!("client {peer} dropped: cannot register: {e}");
            return Ok(());
        }
        if let Some(app) = self.app_mut(app_id) {
            app.ready.spares.retain(|&k| k != spare);
            app.ready.lost = 0; // its ready dial-ins serve: the service is up
        }
        self.join_spare(spare, client, peer, now);
        self.piped(app_id, std::time::Duration::ZERO);
        self.pump(spare, now);
        self.top_up(app_id, now);
        self.flush_later(app_id);
        Ok(())
    }

    /// Standby => Piping (on trial): the client joins the ready dial-in's
    /// entry, already registered under its token.
    fn join_spare(&mut self, spare: Id, client: TcpStream, peer: SocketAddr, now: Instant) {
        self.table.transition(spare, |conn| match conn {
            RelayConn::Standby(ready) => {
                let client = Endpoint::new(client, RxState::registered());
                let pipe = Pipe::on_trial(client, Endpoint::new(ready.stream, ready.rx));
                RelayConn::Piping(Piped::new(pipe, peer, ready.app, true, now))
            }
            other => other,
        });
        log::debug!("client {peer}: handed a ready dial-in");
    }

    /// Begins a ready dial-in with the PROXY header naming its client, if
    /// its app asked for headers; whether the dial-in is still good.
    fn spare_takes_header(&self, app: Id, spare: Id, client: &TcpStream, peer: SocketAddr) -> bool {
        let Some(RelayConn::Standby(ready)) = self.table.get(spare) else {
            return false;
        };
        match self.proxy_header(app, client, peer) {
            Some(header) => super::proxy::send_header(&ready.stream, &header),
            None => true,
        }
    }

    /// A ready dial-in became readable: data a server-first app sent (kept
    /// for the client), or its end. `peek` tells which without consuming a
    /// byte; a dead one is closed and replaced, never handed a client.
    pub(super) fn check_spare(&mut self, id: Id, now: Instant) {
        let Some(RelayConn::Standby(spare)) = self.table.get_mut(id) else {
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
            self.spare_died(id, now);
        }
    }

    /// Closes a ready dial-in found dead, and asks for a replacement (after
    /// a back-off if they keep dying young).
    fn spare_died(&mut self, id: Id, now: Instant) {
        let Some(RelayConn::Standby(spare)) = self.table.get(id) else {
            return;
        };
        let (app, young) = (spare.app, now.duration_since(spare.born) < SPARE_GRACE);
        self.close(id, Ending::Gone);
        self.back_off_if_failing(app, young, now);
        self.top_up(app, now);
        self.flush_later(app);
    }

    /// Ready dial-ins that die as soon as they arrive say the app cannot
    /// serve (its local service is down: the agent resets each dial-in it
    /// cannot connect through). Replacing them at once would spin the relay
    /// and the agent at full speed for as long as that lasts, so from the
    /// second young death in a row replacements wait, doubling from
    /// `REFILL_FIRST` to `REFILL_CAP`. A spare that lived, or served a
    /// client, ends the streak.
    fn back_off_if_failing(&mut self, app_id: Id, young: bool, now: Instant) {
        let Some(app) = self.app_mut(app_id) else {
            return;
        };
        let pool = &mut app.ready;
        pool.lost = if young { pool.lost + 1 } else { 0 };
        if pool.lost < 2 || pool.refill_at.is_some() {
            return;
        }
        let delay = REFILL_FIRST
            .saturating_mul(1 << (pool.lost - 2).min(10))
            .min(REFILL_CAP);
        pool.refill_at = Some(now + delay);
        log::debug!(
            "app {}: {} ready dial-ins died young; asking for more in {delay:?}",
            app.control.peer,
            pool.lost
        );
        self.arm_app_timer(app_id);
    }

    /// The ready dial-in a client was handed ended or failed before its app
    /// sent a byte (the local service had closed it, the agent went away):
    /// the client goes back to waiting, for a fresh dial-in, with every
    /// byte it sent kept to be written to that one first. Piping =>
    /// AwaitingDialIn, in place.
    pub(super) fn retry(&mut self, id: Id, now: Instant) {
        let Some(RelayConn::Piping(piped)) = self.table.get(id) else {
            return;
        };
        let (peer, app) = (
            piped.peer,
            piped.trial.filter(|&app| self.app(app).is_some()),
        );
        let token = match self.config.secret {
            Some(_) => DialToken::random().ok(),
            None => None,
        };
        let Some(app) = app.filter(|_| token.is_some() || self.config.secret.is_none()) else {
            log::debug!("client {peer}: its ready dial-in was lost and no other can come");
            return self.close(id, Ending::Reset);
        };
        let Some(RelayConn::Piping(piped)) = self.table.take(id) else {
            return;
        };
        let (client, mut lost, replay) = piped.pipe.into_replay(&mut self.pool);
        reactor::forget(self.table.registry(), &mut lost.stream);
        log::debug!("client {peer}: its ready dial-in was lost before answering; asking again");
        self.back_off_if_failing(app, true, now);
        self.unpiped(app);
        // Its pairing is timed again from now: each pairing is a sample.
        let since = now;
        let waiting = Waiting {
            client,
            peer,
            app,
            token,
            replay,
            since,
        };
        self.wait_for_dial_in(waiting, Some(id), now);
    }
}
