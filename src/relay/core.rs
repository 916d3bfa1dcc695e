//! The relay's handler: dispatch by state, accepting under limits and
//! back-off, state transitions, timers, deferred close, and the drain on
//! shutdown. What happens *inside* each state lives in `apps` and `clients`.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::{TcpListener, TcpStream};
use mio::{Registry, Token};
use slab::Slab;

use super::Stats;
use crate::config::Config;
use crate::pool::BufferPool;
use crate::reactor::{self, ACCEPT_BUDGET, AcceptGate, Accepted, Handler, Timers, split};
use crate::sockio::reset_on_close;
use crate::state::{App, AppRef, Conn, Ending, Piped};

/// The registration listener's token (fixed; connection tokens are slab keys).
pub(super) const REG_LISTENER: Token = reactor::MAIN;

/// Sockets of an app entry, by sub-token (an authenticating app has only
/// its control connection).
pub(super) const CONTROL: usize = 0;
pub(super) const RELAYED: usize = 1;
pub(super) const DIAL: usize = 2;

/// Sockets of a client entry, by sub-token. A presenting dial-in is an entry
/// of its own, with its socket at sub-token 0; a ready dial-in is an entry
/// of its own with its socket at `DIAL_IN`, so that a client can join it.
pub(super) const CLIENT: usize = 0;
pub(super) const DIAL_IN: usize = 1;
/// A presenting dial-in is an entry of its own, its socket at sub-token 0.
pub(super) const PRESENTING: usize = 0;

/// Free rings the pool keeps for reuse: enough that busy pipes rarely
/// allocate, small enough (16 × 64 KiB = 1 MiB) that a relay idle after a
/// burst stays small (with 64 it sat at about 5.8 MiB RSS instead of 2.7).
const POOL_MAX_IDLE: usize = 16;

/// Counts of entries by state, kept as states change.
#[derive(Default)]
pub(super) struct Census {
    pub apps: usize,       // Registering + Registered
    pub applicants: usize, // Authenticating
    pub presenting: usize, // Presenting
    pub spares: usize,     // Standby
    pub waiting: usize,    // AwaitingDialIn
    pub pipes: usize,      // Piping
    pub sockets: usize,    // peer sockets held, for the connection limit
}

impl Census {
    fn count(&mut self, conn: &Conn) -> Option<&mut usize> {
        match conn {
            Conn::Registering(_) | Conn::Registered(_) => Some(&mut self.apps),
            Conn::Authenticating(_) => Some(&mut self.applicants),
            Conn::Presenting(_) => Some(&mut self.presenting),
            Conn::Standby(_) => Some(&mut self.spares),
            Conn::AwaitingDialIn(_) => Some(&mut self.waiting),
            Conn::Piping(_) => Some(&mut self.pipes),
            Conn::Closed => None,
        }
    }

    pub fn entered(&mut self, conn: &Conn) {
        self.sockets += conn.peer_sockets();
        if let Some(n) = self.count(conn) {
            *n += 1;
        }
    }

    pub fn left(&mut self, conn: &Conn) {
        self.sockets -= conn.peer_sockets();
        if let Some(n) = self.count(conn) {
            *n -= 1;
        }
    }
}

/// A condition logged once when it starts, not once per event.
#[derive(Default)]
pub(super) struct Alarm {
    raised: bool,
}

impl Alarm {
    /// Logs `message` if the alarm was not already raised.
    pub fn raise(&mut self, message: impl FnOnce() -> String) {
        if !self.raised {
            log::warn!("{}", message());
            self.raised = true;
        }
    }

    /// The condition is over; the next one is logged again.
    pub fn clear(&mut self) {
        self.raised = false;
    }
}

/// The relay's state, driven by the reactor through [`Handler`].
pub(super) struct Core {
    pub registry: Registry,            // registers sockets accepted mid-turn
    pub config: Config,                // what the user asked for
    pub reg: Option<TcpListener>,      // the registration port (None once draining)
    pub reg_addr: SocketAddr,          // its bound address
    pub conns: Slab<Conn>,             // every app, client, dial-in and pipe
    pub pool: BufferPool,              // rings lent to directions with bytes in flight
    pub timers: Timers,                // deadlines: dial-in, authentication, token, idle
    pub gate: AcceptGate,              // accept back-off when out of descriptors
    pub requeued: Vec<Token>,          // sockets that used their budget with work left
    pub closing: Vec<(usize, Ending)>, // entries to reap at the end of the turn
    pub held_ports: BTreeSet<u16>,     // relayed ports apps hold now
    pub census: Census,                // entries by state
    pub published: Arc<Mutex<Stats>>,  // the census as of the last turn, for other threads
    pub full: Alarm,                   // the connection limit is being hit
    pub crowded: Alarm,                // the app limit is being hit
    pub draining: Option<Instant>,     // shutting down: pipes may drain until then
    pub reserve: Option<File>,         // a descriptor held back for a dial-in at EMFILE
    pub unflushed: Vec<usize>,         // apps with dial lines queued this turn
    pub noted: Vec<Token>,             // sockets an event of this turn made ready
    pub accepting: Vec<Token>,         // listeners with connections to take
    pub reserved: usize,               // dial-ins promised room (see `committed`)
    pub backlog: usize,                // the listen backlog the kernel grants
    pub next_app_id: u64,              // identity of the next app
}

impl Handler for Core {
    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if !self.requeued.is_empty() || !self.accepting.is_empty() {
            return Some(Duration::ZERO);
        }
        let deadline = reactor::earliest(self.timers.next(), self.gate.deadline());
        reactor::until(reactor::earliest(deadline, self.draining), now)
    }

    /// Only notes what the event says: the work runs in `end_turn`, once
    /// every event of the batch is known (a ready dial-in's end that came
    /// in the same batch as a client is seen before the client is paired),
    /// and in order of priority: listeners first.
    fn on_event(&mut self, event: &Event, _now: Instant) {
        let token = event.token();
        if self.is_listener(token) {
            self.want_accept(token);
        } else if self.note(token, event) {
            self.noted.push(token);
        }
    }

    /// The turn's work, most urgent first: accepting (dial-ins, then
    /// clients, then apps: a busy turn must not leave connections waiting
    /// in a full accept queue, and a dial-in completes a client already
    /// admitted), then every socket an event or an earlier budget left
    /// ready, then timers, control lines and the deferred closes.
    fn end_turn(&mut self, now: Instant) {
        self.accept_all(now);
        let noted = std::mem::take(&mut self.noted);
        let requeued = std::mem::take(&mut self.requeued);
        for token in noted.into_iter().chain(requeued) {
            self.serve(token, now);
        }
        for listener in self.gate.take_due(now) {
            self.want_accept(listener);
        }
        self.expire(now);
        for app in std::mem::take(&mut self.unflushed) {
            self.serve_control(app, now);
        }
        self.reap();
        if self.reserve.is_none() {
            self.reserve = reserve();
        }
        debug_assert_eq!(self.reserved, self.count_reservations());
        self.publish();
    }

    /// The first signal starts a drain; a second one stops at once.
    fn on_signal(&mut self, now: Instant) -> bool {
        if self.draining.is_some() {
            log::info!("second signal: stopping now");
            return true;
        }
        self.begin_drain(now);
        false
    }
}

impl Core {
    /// A handler for a freshly bound registration listener.
    pub fn new(registry: Registry, config: Config, reg: TcpListener) -> io::Result<Core> {
        let config_backlog = config.backlog;
        Ok(Core {
            registry,
            pool: BufferPool::new(config.buffer_size, POOL_MAX_IDLE).with_splice(config.splice),
            reg_addr: reg.local_addr()?,
            reg: Some(reg),
            config,
            conns: Slab::new(),
            timers: Timers::default(),
            gate: AcceptGate::default(),
            requeued: Vec::new(),
            closing: Vec::new(),
            held_ports: BTreeSet::new(),
            census: Census::default(),
            published: Arc::default(),
            full: Alarm::default(),
            crowded: Alarm::default(),
            draining: None,
            reserve: reserve(),
            unflushed: Vec::new(),
            noted: Vec::new(),
            accepting: Vec::new(),
            reserved: 0,
            backlog: effective_backlog(config_backlog),
            next_app_id: 0,
        })
    }

    /// Copies the census to where [`super::RelayHandle::stats`] reads it.
    fn publish(&self) {
        let stats = Stats {
            apps: self.census.apps,
            pending: self.census.applicants + self.census.presenting,
            ready_dial_ins: self.census.spares,
            waiting_clients: self.census.waiting,
            pipes: self.census.pipes,
            buffers_lent: self.pool.lent(),
            timers: self.timers.len(),
        };
        if let Ok(mut published) = self.published.lock() {
            *published = stats;
        }
    }

    /// Whether a token names a listener: the registration port, or an
    /// app's relayed or dial-in port.
    fn is_listener(&self, token: Token) -> bool {
        if token == REG_LISTENER {
            return true;
        }
        let (key, sub) = split(token);
        matches!(
            (self.conns.get(key), sub),
            (
                Some(Conn::Registering(_) | Conn::Registered(_)),
                RELAYED | DIAL
            )
        )
    }

    /// Records an event in the entry its token names (invariant *Readiness
    /// in software*); returns whether that entry has work to do now. Tokens
    /// of vacant entries are stale and ignored.
    fn note(&mut self, token: Token, event: &Event) -> bool {
        let (key, sub) = split(token);
        match (self.conns.get_mut(key), sub) {
            (Some(Conn::Authenticating(applicant)), CONTROL) => applicant.control.note(event),
            (Some(Conn::Registering(app) | Conn::Registered(app)), CONTROL) => {
                app.control.note(event);
            }
            // A waiting client is not read (no peer yet); only an error matters.
            (Some(Conn::AwaitingDialIn(waiting)), CLIENT) => {
                waiting.client.note(event);
                return event.is_error();
            }
            (Some(Conn::Presenting(_)), PRESENTING) => {}
            // A ready dial-in: readable means data from the app, or its end.
            (Some(Conn::Standby(spare)), DIAL_IN) => {
                spare.rx.note(event);
                return event.is_readable() || event.is_read_closed() || event.is_error();
            }
            (Some(Conn::Piping(piped)), CLIENT) => piped.pipe.a.note(event),
            (Some(Conn::Piping(piped)), DIAL_IN) => piped.pipe.b.note(event),
            _ => return false,
        }
        true
    }

    /// Does the work a ready socket (noted, or requeued after its budget)
    /// calls for, by the state of its entry.
    fn serve(&mut self, token: Token, now: Instant) {
        let (key, sub) = split(token);
        match (self.conns.get_mut(key), sub) {
            // An app answering the challenge: read its answer.
            (Some(Conn::Authenticating(_)), CONTROL) => self.serve_applicant(key, now),
            // A registered app's control connection: its requests, our lines.
            (Some(Conn::Registering(_) | Conn::Registered(_)), CONTROL) => {
                self.serve_control(key, now);
            }
            // A waiting client that reported an error: gone before its dial-in.
            (Some(Conn::AwaitingDialIn(waiting)), CLIENT) if waiting.failed().is_some() => {
                self.close(key, Ending::Gone);
            }
            (Some(Conn::Presenting(_)), PRESENTING) => self.read_token(key, now),
            (Some(Conn::Standby(_)), DIAL_IN) => self.check_spare(key, now),
            (Some(Conn::Piping(_)), CLIENT | DIAL_IN) => self.pump(key, now),
            _ => {}
        }
    }

    /// Remembers a listener with connections to take, once.
    fn want_accept(&mut self, listener: Token) {
        if !self.accepting.contains(&listener) {
            self.accepting.push(listener);
        }
    }

    /// Accepts from every listener that has connections waiting: dial-in
    /// listeners first, then relayed ports, then the registration port.
    fn accept_all(&mut self, now: Instant) {
        let mut listeners = std::mem::take(&mut self.accepting);
        listeners.sort_by_key(|&listener| accept_rank(listener));
        for listener in listeners {
            self.accept_from(listener, now);
        }
    }

    /// Accepts from one listener until it is drained, the budget is spent
    /// (then it waits for the next turn, first in line again) or
    /// descriptors run out (then the gate retries it).
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
                // Out of descriptors with clients waiting for dial-ins, every
                // descriptor may be held by a waiting client: spend the
                // reserve on the dial-in so that one of them completes.
                Accepted::Exhausted(_)
                    if is_dial_listener(listener) && self.reserve.take().is_some() => {}
                Accepted::Exhausted(e) => return self.gate.exhausted(now, listener, &e),
            }
        }
        self.want_accept(listener);
    }

    /// The listener behind a listener token, if it still exists.
    fn listener(&self, listener: Token) -> Option<&TcpListener> {
        if listener == REG_LISTENER {
            return self.reg.as_ref();
        }
        let (key, sub) = split(listener);
        match (self.conns.get(key), sub) {
            (Some(Conn::Registering(app) | Conn::Registered(app)), RELAYED) => Some(&app.relayed),
            (Some(Conn::Registering(app) | Conn::Registered(app)), DIAL) => Some(&app.dial),
            _ => None,
        }
    }

    /// Hands a new connection to the side it arrived on; each side checks
    /// the connection limit for what it will hold.
    fn on_accepted(&mut self, listener: Token, stream: TcpStream, peer: SocketAddr, now: Instant) {
        if listener == REG_LISTENER {
            if !self.has_room(1) {
                return reset_on_close(&stream);
            }
            return self.admit_app(stream, peer, now);
        }
        match split(listener) {
            (app, RELAYED) => self.admit_client(app, stream, peer, now),
            (app, DIAL) => self.admit_dial_in(app, stream, peer, now),
            _ => {}
        }
    }

    /// Peer sockets held plus dial-ins promised room: what the connection
    /// limit is checked against. A client admitted to wait counts as the
    /// two sockets it will hold (itself and its dial-in), and so does a
    /// ready dial-in asked for, so a flood of clients up to the limit can
    /// never leave an admitted client's dial-in without room.
    pub fn committed(&self) -> usize {
        self.census.sockets + self.reserved
    }

    /// Whether `needed` more sockets fit under the connection limit; logs
    /// once per episode when they do not.
    pub fn has_room(&mut self, needed: usize) -> bool {
        let limit = self.config.max_connections;
        if self.committed() + needed > limit {
            self.full
                .raise(|| format!("connection limit ({limit}) reached: new connections are reset"));
            return false;
        }
        self.full.clear();
        true
    }

    /// The sum [`Core::reserved`] must equal; checked after every turn in
    /// debug builds, so no path can let the two drift apart unnoticed.
    fn count_reservations(&self) -> usize {
        self.conns
            .iter()
            .filter_map(|(_, conn)| match conn {
                Conn::Registering(app) | Conn::Registered(app) => Some(app.reservations()),
                _ => None,
            })
            .sum()
    }

    /// The app an `AppRef` names, if it is still there (and still that app).
    pub fn app_mut(&mut self, app: AppRef) -> Option<&mut App> {
        self.conns
            .get_mut(app.key)
            .and_then(Conn::app_mut)
            .filter(|a| a.id == app.id)
    }

    /// A fresh app identity.
    pub fn next_id(&mut self) -> u64 {
        self.next_app_id += 1;
        self.next_app_id
    }

    /// Inserts an entry built by `build`, which registers its sockets under
    /// the entry's key first: tokens and keys cannot diverge (invariant
    /// *Tokens are keys*).
    pub fn insert(
        &mut self,
        build: impl FnOnce(usize, &Registry) -> io::Result<Conn>,
    ) -> io::Result<usize> {
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let conn = entry.insert(build(key, &self.registry)?);
        self.census.entered(conn);
        log::trace!("#{key}: => {}", conn.name());
        Ok(key)
    }

    /// Writes an app's queued dial lines at the end of this turn rather than
    /// now: clients that arrive in one turn then cost their app one write
    /// (and it one read), not one each. Still within the turn, so no line
    /// waits for an event (the writable invariant).
    pub fn flush_later(&mut self, app: usize) {
        if !self.unflushed.contains(&app) {
            self.unflushed.push(app);
        }
    }

    /// Replaces an entry's state with `f(old)`, logging `A => B`. The one
    /// place states change, so the census cannot drift.
    pub fn transition(&mut self, key: usize, f: impl FnOnce(Conn) -> Conn) {
        let Some(slot) = self.conns.get_mut(key) else {
            return;
        };
        let old = std::mem::replace(slot, Conn::Closed);
        // A deadline belongs to the phase that armed it (a dial-in timeout
        // means nothing to the pipe the client becomes); a phase that needs
        // one arms its own.
        self.timers.cancel(key);
        self.census.left(&old);
        let from = old.name();
        *slot = f(old);
        self.census.entered(slot);
        log::trace!("#{key}: {from} => {}", slot.name());
    }

    /// Takes an entry's state out, leaving a placeholder to be reaped: for
    /// an entry whose socket moves into another entry.
    pub fn take(&mut self, key: usize) -> Option<Conn> {
        let taken = self.take_state(key);
        self.closing.push((key, Ending::Done));
        taken
    }

    /// Takes an entry's state out, leaving a placeholder that the caller
    /// replaces with a [`transition`](Self::transition) (the pieces of the
    /// old state needed a `&mut self` to come apart).
    pub fn take_state(&mut self, key: usize) -> Option<Conn> {
        let mut taken = None;
        self.transition(key, |conn| {
            taken = Some(conn);
            Conn::Closed
        });
        taken
    }

    /// Fires due timers. A timer belongs to the phase its entry is in (every
    /// transition and every reap cancels it: invariant *A deadline belongs
    /// to its phase*), so the phase says what the deadline meant.
    fn expire(&mut self, now: Instant) {
        while let Some(key) = self.timers.pop_due(now) {
            match self.conns.get(key) {
                Some(Conn::Piping(_)) => self.check_idle(key, now),
                Some(Conn::Registering(_) | Conn::Registered(_)) => self.app_due(key, now),
                Some(Conn::Authenticating(a)) => {
                    log::debug!("app {} did not authenticate in time", a.control.peer);
                    self.close(key, Ending::TimedOut);
                }
                // A client without its dial-in, a dial-in without its token.
                Some(Conn::AwaitingDialIn(_) | Conn::Presenting(_)) => {
                    self.close(key, Ending::TimedOut);
                }
                Some(Conn::Standby(_) | Conn::Closed) | None => {} // never armed
            }
        }
    }

    /// Schedules an entry to close at the end of the turn. A waiting client
    /// or a ready dial-in leaves its app's queue now, so nothing is paired
    /// with it meanwhile.
    pub fn close(&mut self, key: usize, ending: Ending) {
        match self.conns.get(key) {
            Some(Conn::AwaitingDialIn(waiting)) => {
                let app = waiting.app;
                self.unqueue_waiting(app, key);
            }
            Some(Conn::Standby(spare)) => {
                if let Some(app) = self.app_mut(spare.app) {
                    app.spares.retain(|&k| k != key);
                }
            }
            _ => {}
        }
        self.closing.push((key, ending));
    }

    /// Takes a waiting client out of its app's queue; if its dial line was
    /// not sent yet, the dial-in it was promised is not needed any more.
    pub fn unqueue_waiting(&mut self, app: AppRef, key: usize) {
        let Some(app) = self.app_mut(app) else {
            return;
        };
        let Some(at) = app.waiting.iter().position(|&k| k == key) else {
            return;
        };
        let unasked = at >= app.waiting.len() - app.unasked;
        app.waiting.remove(at);
        if unasked {
            app.unasked -= 1;
            self.reserved -= 1;
        }
    }

    /// Removes the entries closed this turn and releases what they held.
    fn reap(&mut self) {
        while let Some((key, ending)) = self.closing.pop() {
            // A key may be listed twice in one turn; the second finds it gone.
            let Some(conn) = self.conns.try_remove(key) else {
                continue;
            };
            self.timers.cancel(key);
            self.census.left(&conn);
            log::trace!("#{key}: {} => closed", conn.name());
            match conn {
                Conn::Authenticating(mut applicant) => {
                    reactor::forget(&self.registry, &mut applicant.control.stream);
                }
                Conn::Registering(app) | Conn::Registered(app) => self.retire_app(app, ending),
                Conn::AwaitingDialIn(mut waiting) => {
                    if let Some(replay) = waiting.replay.take() {
                        self.pool.give(replay);
                    }
                    reactor::forget(&self.registry, &mut waiting.client.stream);
                    log::debug!("client {} closed: {ending}", waiting.peer);
                }
                Conn::Presenting(mut presenter) => {
                    self.presented(presenter.app);
                    reset_on_close(&presenter.stream);
                    reactor::forget(&self.registry, &mut presenter.stream);
                }
                Conn::Standby(mut spare) => {
                    reactor::forget(&self.registry, &mut spare.stream);
                }
                Conn::Piping(piped) => self.retire_pipe(piped, ending),
                Conn::Closed => {}
            }
        }
    }

    /// Closes an app's listeners at once (its port can be registered again)
    /// and its waiting clients; its established pipes run on.
    fn retire_app(&mut self, mut app: App, ending: Ending) {
        reactor::forget(&self.registry, &mut app.control.stream);
        reactor::forget(&self.registry, &mut app.relayed);
        reactor::forget(&self.registry, &mut app.dial);
        self.held_ports.remove(&app.relayed_port);
        self.reserved -= app.reservations();
        log::info!(
            "app {} gone ({ending}); relayed port {} closed, {} waiting clients closed",
            app.control.peer,
            app.relayed_port,
            app.waiting.len()
        );
        for key in app.waiting.drain(..).chain(app.spares.drain(..)) {
            self.closing.push((key, Ending::AppGone));
        }
    }

    fn retire_pipe(&mut self, mut piped: Piped, ending: Ending) {
        let pipe = &mut piped.pipe;
        if ending.is_abort() {
            pipe.abort(&mut self.pool);
        } else {
            pipe.release(&mut self.pool);
        }
        reactor::forget(&self.registry, &mut pipe.a.stream);
        reactor::forget(&self.registry, &mut pipe.b.stream);
        match ending {
            Ending::Failed(e) => log::debug!("pipe closed on error: {e}"),
            ending => log::debug!("pipe closed: {ending}"),
        }
    }

    /// Graceful shutdown: no new apps or clients (every listener closes now,
    /// with every app and waiting client), while open pipes drain until the
    /// grace period ends.
    fn begin_drain(&mut self, now: Instant) {
        let grace = self.config.grace;
        self.draining = Some(now + grace);
        if let Some(mut reg) = self.reg.take() {
            reactor::forget(&self.registry, &mut reg);
        }
        let apps: Vec<usize> = self
            .conns
            .iter()
            .filter(|(_, c)| !matches!(c, Conn::Piping(_) | Conn::Closed))
            .map(|(key, _)| key)
            .collect();
        for key in apps {
            self.close(key, Ending::Shutdown);
        }
        log::info!(
            "shutting down: ports closed, {} pipes may drain for up to {grace:?}",
            self.census.pipes
        );
    }

    /// Whether a drain is over: every pipe done, or the grace period spent.
    pub fn drained(&self) -> bool {
        let Some(deadline) = self.draining else {
            return false;
        };
        if self.census.pipes == 0 {
            return true;
        }
        if Instant::now() >= deadline {
            log::info!("grace period over: closing {} pipes", self.census.pipes);
            return true;
        }
        false
    }
}

/// Whether a listener token names an app's dial-in listener.
fn is_dial_listener(listener: Token) -> bool {
    listener != REG_LISTENER && split(listener).1 == DIAL
}

/// The order listeners are served in a turn: dial-ins complete clients
/// already admitted, clients come before apps (which are few and patient).
fn accept_rank(listener: Token) -> u8 {
    match split(listener) {
        _ if listener == REG_LISTENER => 2,
        (_, DIAL) => 0,
        _ => 1,
    }
}

/// The backlog a listener gets when `asked` is requested: Linux silently
/// caps it at `net.core.somaxconn`.
pub(super) fn effective_backlog(asked: u32) -> usize {
    let granted = crate::sockio::somaxconn().map_or(asked, |max| asked.min(max));
    usize::try_from(granted.max(1)).unwrap_or(usize::MAX)
}

/// A descriptor to give up when accepting a dial-in fails for want of one
/// (the classic reserve-descriptor trick): `/dev/null` costs nothing else.
fn reserve() -> Option<File> {
    File::open("/dev/null").ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reactor::token;

    #[test]
    fn dial_in_listeners_are_served_first_and_the_registration_port_last() {
        let mut listeners = vec![
            REG_LISTENER,
            token(3, RELAYED),
            token(5, DIAL),
            token(1, RELAYED),
            token(2, DIAL),
        ];
        listeners.sort_by_key(|&listener| accept_rank(listener));
        let expected = vec![
            token(5, DIAL),
            token(2, DIAL),
            token(3, RELAYED),
            token(1, RELAYED),
            REG_LISTENER,
        ];
        assert_eq!(listeners, expected);
    }
}
