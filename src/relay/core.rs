//! The relay's loop handler: what one turn does (note events, accept,
//! serve, expire, reap), dispatch by state, accepting under the connection
//! limit, and the drain on shutdown. What happens inside each state lives
//! in `apps` and `clients` (the card's path) and in the extensions' files.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::{TcpListener, TcpStream};
use mio::{Registry, Token};

use super::Stats;
use super::access::Access;
use super::state::{
    APPLICANTS, APPS, App, CLIENT, CONTROL, DIAL, Ending, PIPES, PRESENTING, RELAYED, RelayConn,
    SPARES, UNWRAPPING, WAITING,
};
use super::status::{Listener, Metrics, Refused};
use crate::config::Config;
use crate::pool::BufferPool;
use crate::reactor::{self, ACCEPT_BUDGET, AcceptGate, Accepted, Handler};
use crate::sockio::reset_on_close;
use crate::table::{Id, Table};

/// The registration listener's token (fixed; connection tokens name entries).
pub(super) const REG_LISTENER: Token = reactor::MAIN;
/// The status listener's token (`--metrics`).
pub(super) const STATUS_LISTENER: Token = reactor::STATUS;

/// Free rings the pool keeps for reuse: enough that busy pipes rarely
/// allocate, small enough (16 × 64 KiB = 1 MiB) that a relay idle after a
/// burst stays small (with 64 it sat at about 5.8 MiB RSS instead of 2.7).
const POOL_MAX_IDLE: usize = 16;

/// A condition logged once when it starts, not once per event.
#[derive(Default)]
pub(super) struct Alarm {
    raised: bool, // logged, and not over yet
}

impl Alarm {
    /// Logs `message` if the alarm was not already raised.
    pub(super) fn raise(&mut self, message: impl FnOnce() -> String) {
        if !self.raised {
            log::warn!("{}", message());
            self.raised = true;
        }
    }

    /// The condition is over; the next one is logged again.
    pub(super) fn clear(&mut self) {
        self.raised = false;
    }
}

/// The relay's state, driven by the reactor through [`Handler`].
pub(super) struct RelayCore {
    pub(super) table: Table<RelayConn>, // every app, client, dial-in and pipe
    pub(super) config: Config,          // what the user asked for
    pub(super) pool: BufferPool,        // buffers lent to directions with bytes in flight
    pub(super) reg_addr: SocketAddr,    // the registration port's bound address
    pub(super) held_ports: BTreeSet<u16>, // relayed ports apps hold now
    pub(super) reserved: usize,         // dial-ins promised room (see `committed`)
    pub(super) backlog: usize,          // the listen backlog the kernel grants
    pub(super) crowded: Alarm,          // the app limit is being hit
    pub(super) access: Access,          // (access) the relay's rate limit, refusal episodes
    pub(super) published: Arc<Mutex<Stats>>, // the counts as of the last turn
    pub(super) metrics: Metrics,        // (status) counters of what happened
    pub(super) status: Option<TcpListener>, // (status) the status endpoint, if asked for
    reg: Option<TcpListener>,           // the registration port (None once draining)
    gate: AcceptGate,                   // accept back-off when out of descriptors
    full: Alarm,                        // the connection limit is being hit
    draining: Option<Instant>,          // shutting down: pipes may drain until then
    reserve: Option<File>,              // a descriptor held back for a dial-in at EMFILE
    unflushed: Vec<Id>,                 // apps with dial lines queued this turn
    noted: Vec<Token>,                  // sockets an event of this turn made ready
    accepting: Vec<Token>,              // listeners with connections to take
}

impl Handler for RelayCore {
    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if self.table.has_requeued() || !self.accepting.is_empty() {
            return Some(Duration::ZERO);
        }
        let deadline = reactor::earliest(self.table.next_deadline(), self.gate.deadline());
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
        for token in noted.into_iter().chain(self.table.take_requeued()) {
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
    /// `3 apps, 12 clients piped, 0 waiting` for `systemctl status`.
    fn status_line(&self) -> Option<String> {
        let census = self.table.census();
        let draining = if self.draining.is_some() {
            "; draining"
        } else {
            ""
        };
        Some(format!(
            "{} apps, {} clients piped, {} waiting{draining}",
            census.count(APPS),
            census.count(PIPES),
            census.count(WAITING)
        ))
    }

    fn on_signal(&mut self, now: Instant) -> bool {
        if self.draining.is_some() {
            log::info!("second signal: stopping now");
            return true;
        }
        self.begin_drain(now);
        false
    }
}

impl RelayCore {
    /// A handler for a freshly bound registration listener.
    pub(super) fn new(registry: Registry, config: Config, reg: TcpListener) -> io::Result<Self> {
        Ok(RelayCore {
            table: Table::new(registry),
            pool: BufferPool::new(config.buffer_size, POOL_MAX_IDLE).with_splice(config.splice),
            reg_addr: reg.local_addr()?,
            held_ports: BTreeSet::new(),
            reserved: 0,
            backlog: granted_backlog(&reg, config.backlog),
            crowded: Alarm::default(),
            access: Access::new(config.client_rate),
            published: Arc::default(),
            metrics: Metrics::default(),
            status: None,
            reg: Some(reg),
            config,
            gate: AcceptGate::default(),
            full: Alarm::default(),
            draining: None,
            reserve: reserve(),
            unflushed: Vec::new(),
            noted: Vec::new(),
            accepting: Vec::new(),
        })
    }

    /// Copies the counts to where [`super::RelayHandle::stats`] reads them.
    fn publish(&self) {
        let census = self.table.census();
        let stats = Stats {
            apps: census.count(APPS),
            pending: census.count(APPLICANTS) + census.count(PRESENTING) + census.count(UNWRAPPING),
            ready_dial_ins: census.count(SPARES),
            waiting_clients: census.count(WAITING),
            pipes: census.count(PIPES),
            buffers_lent: self.pool.lent(),
            timers: self.table.timers(),
        };
        if let Ok(mut published) = self.published.lock() {
            *published = stats;
        }
    }

    /// Whether a token names a listener: the registration port, or an
    /// app's relayed or dial-in port.
    fn is_listener(&self, token: Token) -> bool {
        if token == REG_LISTENER || token == STATUS_LISTENER {
            return true;
        }
        let Some((id, sub)) = self.table.resolve(token) else {
            return false;
        };
        matches!(self.table.get(id), Some(RelayConn::App(_))) && matches!(sub, RELAYED | DIAL)
    }

    /// Records an event in the entry its token names (invariant *Readiness
    /// in software*); returns whether that entry has work to do now. Tokens
    /// of entries gone are stale and resolve to nothing.
    fn note(&mut self, token: Token, event: &Event) -> bool {
        let Some((id, sub)) = self.table.resolve(token) else {
            return false;
        };
        let Some(conn) = self.table.get_mut(id) else {
            return false;
        };
        match conn {
            RelayConn::App(app) => app.control.note(event),
            // A waiting client is not read (no peer yet); only an error matters.
            RelayConn::AwaitingDialIn(waiting) => {
                waiting.client.note(event);
                return event.is_error();
            }
            RelayConn::Piping(piped) if sub == CLIENT => piped.pipe.a.note(event),
            RelayConn::Piping(piped) => piped.pipe.b.note(event),
            RelayConn::Authenticating(applicant) => applicant.control.note(event),
            RelayConn::Presenting(_) | RelayConn::Unwrapping(_) => {}
            // Acknowledgements free send space, a reset ends the wait: look.
            RelayConn::Flushing(_) => {}
            RelayConn::Observer(conn) => conn.note(event),
            // A ready dial-in: readable means data from the app, or its end.
            RelayConn::Standby(spare) => {
                spare.rx.note(event);
                return event.is_readable() || event.is_read_closed() || event.is_error();
            }
            RelayConn::Vacant => return false,
        }
        true
    }

    /// Does the work a ready socket (noted, or requeued after its budget)
    /// calls for, by the state of its entry.
    fn serve(&mut self, token: Token, now: Instant) {
        let Some((id, sub)) = self.table.resolve(token) else {
            return;
        };
        let Some(conn) = self.table.get(id) else {
            return;
        };
        match conn {
            // Its requests, our lines (its listeners are accepted from first).
            RelayConn::App(_) if sub == CONTROL => self.serve_control(id, now),
            RelayConn::App(_) => self.want_accept(token),
            // A waiting client that reported an error: gone before its dial-in.
            RelayConn::AwaitingDialIn(waiting) if waiting.failed().is_some() => {
                self.close(id, Ending::Gone);
            }
            RelayConn::AwaitingDialIn(_) => {}
            RelayConn::Piping(_) => self.pump(id, now),
            RelayConn::Flushing(_) => self.check_flush(id, now),
            RelayConn::Authenticating(_) => self.serve_applicant(id, now),
            RelayConn::Presenting(_) => self.read_token(id, now),
            RelayConn::Standby(_) => self.check_spare(id, now),
            RelayConn::Unwrapping(_) => self.read_proxy_header(id, now),
            RelayConn::Observer(_) => self.serve_observer(id),
            RelayConn::Vacant => {}
        }
    }

    /// Fires due timers. A timer belongs to the phase its entry is in (every
    /// transition and every reap cancels it: invariant *A deadline belongs
    /// to its phase*), so the phase says what the deadline meant.
    fn expire(&mut self, now: Instant) {
        while let Some(id) = self.table.pop_due(now) {
            match self.table.get(id) {
                Some(RelayConn::Piping(_)) => self.check_idle(id, now),
                Some(RelayConn::Flushing(_)) => self.check_flush(id, now),
                Some(RelayConn::App(_)) => self.app_due(id, now),
                Some(RelayConn::AwaitingDialIn(_)) => {
                    self.metrics.dial_in_timeouts += 1;
                    self.close(id, Ending::TimedOut);
                }
                Some(RelayConn::Authenticating(_)) => {
                    self.metrics.auth_failures += 1;
                    self.metrics.refused(Listener::Registration, Refused::Auth);
                    self.close(id, Ending::TimedOut);
                }
                Some(RelayConn::Presenting(_)) => {
                    self.metrics.refused(Listener::DialIn, Refused::Token);
                    self.close(id, Ending::TimedOut);
                }
                Some(RelayConn::Unwrapping(_)) => {
                    self.metrics
                        .refused(Listener::Relayed, Refused::ProxyHeader);
                    self.close(id, Ending::TimedOut);
                }
                // A scraper that did not finish its request in time.
                Some(RelayConn::Observer(_)) => self.close(id, Ending::TimedOut),
                Some(RelayConn::Standby(_) | RelayConn::Vacant) | None => {} // never armed
            }
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
        listeners.sort_by_key(|&listener| accept_rank(&self.table, listener));
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
                    if accept_rank(&self.table, listener) == 0 && self.reserve.take().is_some() => {
                }
                Accepted::Exhausted(e) => {
                    if self.gate.exhausted(now, listener, &e) {
                        self.metrics.descriptor_exhaustions += 1;
                    }
                    return;
                }
            }
        }
        self.want_accept(listener);
    }

    /// The listener behind a listener token, if it still exists.
    fn listener(&self, listener: Token) -> Option<&TcpListener> {
        if listener == REG_LISTENER {
            return self.reg.as_ref();
        }
        if listener == STATUS_LISTENER {
            return self.status.as_ref();
        }
        let (id, sub) = self.table.resolve(listener)?;
        let app = self.table.get(id)?.app()?;
        match sub {
            RELAYED => Some(&app.relayed),
            DIAL => Some(&app.dial),
            _ => None,
        }
    }

    /// Hands a new connection to the side it arrived on; each side checks
    /// the connection limit for what it will hold.
    fn on_accepted(&mut self, listener: Token, stream: TcpStream, peer: SocketAddr, now: Instant) {
        match listener {
            STATUS_LISTENER => return self.admit_observer(stream, now),
            REG_LISTENER => {
                self.metrics.accepted(Listener::Registration);
                if !self.app_may_connect(Listener::Registration, peer, now) {
                    return reset_on_close(&stream);
                }
                if !self.has_room(1) {
                    self.metrics.refused(Listener::Registration, Refused::Limit);
                    return reset_on_close(&stream);
                }
                return self.admit_app(stream, peer, now);
            }
            _ => {}
        }
        match self.table.resolve(listener) {
            Some((app, RELAYED)) => {
                self.metrics.accepted(Listener::Relayed);
                self.on_client(app, stream, peer, now);
            }
            Some((app, DIAL)) => {
                self.metrics.accepted(Listener::DialIn);
                self.admit_dial_in(app, stream, peer, now);
            }
            _ => {}
        }
    }

    /// Peer sockets held plus dial-ins promised room: what the connection
    /// limit is checked against. A client admitted to wait counts as the
    /// two sockets it will hold (itself and its dial-in), and so does a
    /// ready dial-in asked for (invariant *Promised room is kept*).
    pub(super) fn committed(&self) -> usize {
        self.table.census().sockets() + self.reserved
    }

    /// Whether `needed` more sockets fit under the connection limit; logs
    /// once per episode when they do not.
    pub(super) fn has_room(&mut self, needed: usize) -> bool {
        let limit = self.config.max_connections;
        if self.committed() + needed > limit {
            self.full
                .raise(|| format!("connection limit ({limit}) reached: new connections are reset"));
            return false;
        }
        self.full.clear();
        true
    }

    /// The sum [`RelayCore::reserved`] must equal; checked after every turn
    /// in debug builds, so no path can let the two drift apart unnoticed.
    fn count_reservations(&self) -> usize {
        self.table
            .iter()
            .filter_map(|(_, conn)| conn.app().map(App::reservations))
            .sum()
    }

    /// The app `id` names, if it is still there.
    pub(super) fn app_mut(&mut self, id: Id) -> Option<&mut App> {
        self.table.get_mut(id).and_then(RelayConn::app_mut)
    }

    /// The app `id` names, if it is still there.
    pub(super) fn app(&self, id: Id) -> Option<&App> {
        self.table.get(id).and_then(RelayConn::app)
    }

    /// Writes an app's queued dial lines at the end of this turn rather than
    /// now: clients that arrive in one turn then cost their app one write
    /// (and it one read), not one each. Still within the turn, so no line
    /// waits for an event (the writable invariant).
    pub(super) fn flush_later(&mut self, app: Id) {
        if !self.unflushed.contains(&app) {
            self.unflushed.push(app);
        }
    }

    /// Schedules an entry to close at the end of the turn. A waiting client
    /// or a ready dial-in leaves its app's queue now, so nothing is paired
    /// with it meanwhile.
    pub(super) fn close(&mut self, id: Id, ending: Ending) {
        match self.table.get(id) {
            Some(RelayConn::AwaitingDialIn(waiting)) => {
                let app = waiting.app;
                self.unqueue_waiting(app, id);
            }
            Some(RelayConn::Standby(spare)) => {
                let app = spare.app;
                if let Some(app) = self.app_mut(app) {
                    app.ready.spares.retain(|&k| k != id);
                }
            }
            _ => {}
        }
        self.table.close(id, ending);
    }

    /// Takes a waiting client out of its app's queue; if its dial line was
    /// not sent yet, the dial-in it was promised is not needed any more.
    pub(super) fn unqueue_waiting(&mut self, app: Id, client: Id) {
        if self.app_mut(app).and_then(|a| a.unqueue(client)) == Some(true) {
            self.reserved -= 1;
        }
    }

    /// Removes the entries closed this turn and releases what they held.
    fn reap(&mut self) {
        while let Some((_, conn, ending)) = self.table.pop_closed() {
            match conn {
                RelayConn::App(app) => self.retire_app(*app, ending),
                RelayConn::AwaitingDialIn(mut waiting) => {
                    if let Some(replay) = waiting.replay.take() {
                        self.pool.give(replay);
                    }
                    reactor::forget(self.table.registry(), &mut waiting.client.stream);
                    log::debug!("client {} closed: {ending}", waiting.peer);
                }
                RelayConn::Piping(piped) => {
                    self.unpiped(piped.app);
                    self.retire_pipe(piped.pipe, ending);
                }
                RelayConn::Flushing(flushing) => {
                    self.unpiped(flushing.app);
                    for mut stream in flushing.flush.into_ends() {
                        reactor::forget(self.table.registry(), &mut stream);
                    }
                }
                RelayConn::Authenticating(mut applicant) => {
                    reactor::forget(self.table.registry(), &mut applicant.control.stream);
                }
                RelayConn::Presenting(presenter) => self.retire_presenter(presenter),
                RelayConn::Standby(mut spare) => {
                    reactor::forget(self.table.registry(), &mut spare.stream);
                }
                RelayConn::Unwrapping(unwrap) => self.retire_unwrap(unwrap),
                RelayConn::Observer(conn) => self.retire_observer(conn),
                RelayConn::Vacant => {}
            }
        }
    }

    /// Closes an app's listeners at once (its port can be registered again)
    /// and its waiting clients and ready dial-ins; its pipes run on.
    fn retire_app(&mut self, mut app: App, ending: Ending) {
        let registry = self.table.registry();
        reactor::forget(registry, &mut app.control.stream);
        reactor::forget(registry, &mut app.relayed);
        reactor::forget(registry, &mut app.dial);
        self.held_ports.remove(&app.relayed_port);
        self.reserved -= app.reservations();
        log::info!(
            "app {} gone ({ending}); relayed port {} closed, {} waiting clients closed",
            app.control.peer,
            app.relayed_port,
            app.waiting.len()
        );
        for id in app.waiting.drain(..).chain(app.ready.spares.drain(..)) {
            self.table.close(id, Ending::AppGone);
        }
    }

    /// Closes a pipe's sockets: with RST both ways after a reset or error.
    fn retire_pipe(&mut self, mut pipe: crate::pipe::Pipe, ending: Ending) {
        if ending.is_abort() {
            pipe.abort(&mut self.pool);
        } else {
            pipe.release(&mut self.pool);
        }
        reactor::forget(self.table.registry(), &mut pipe.a.stream);
        reactor::forget(self.table.registry(), &mut pipe.b.stream);
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
            reactor::forget(self.table.registry(), &mut reg);
        }
        let closing: Vec<Id> = self
            .table
            .iter()
            .filter(|(_, conn)| {
                !matches!(
                    conn,
                    RelayConn::Piping(_) | RelayConn::Flushing(_) | RelayConn::Vacant
                )
            })
            .map(|(id, _)| id)
            .collect();
        for id in closing {
            self.close(id, Ending::Shutdown);
        }
        log::info!(
            "shutting down: ports closed, {} pipes may drain for up to {grace:?}",
            self.table.census().count(PIPES)
        );
    }

    /// Whether a drain is over: every pipe done, or the grace period spent.
    pub(super) fn drained(&self) -> bool {
        let Some(deadline) = self.draining else {
            return false;
        };
        let pipes = self.table.census().count(PIPES);
        if pipes == 0 {
            return true;
        }
        if Instant::now() >= deadline {
            log::info!("grace period over: closing {pipes} pipes");
            return true;
        }
        false
    }
}

/// The order listeners are served in a turn: dial-ins complete clients
/// already admitted (0), clients come next (1), apps (2: they are few and
/// patient), and the status endpoint last (3).
fn accept_rank(table: &Table<RelayConn>, listener: Token) -> u8 {
    match listener {
        REG_LISTENER => return 2,
        STATUS_LISTENER => return 3, // last of all: it only observes
        _ => {}
    }
    match table.resolve(listener) {
        Some((_, DIAL)) => 0,
        _ => 1,
    }
}

/// The backlog every listener got when `asked` was requested (they are
/// all opened alike): what the kernel says it granted the registration
/// port, or else `asked` capped by `net.core.somaxconn`, which Linux
/// applies silently.
pub(super) fn granted_backlog(reg: &TcpListener, asked: u32) -> usize {
    let granted = crate::sockio::granted_backlog(reg)
        .or_else(|| crate::sockio::somaxconn().map(|max| asked.min(max)))
        .unwrap_or(asked);
    usize::try_from(granted.max(1)).unwrap_or(usize::MAX)
}

/// A descriptor to give up when accepting a dial-in fails for want of one
/// (the classic reserve-descriptor trick): `/dev/null` costs nothing else.
fn reserve() -> Option<File> {
    File::open("/dev/null").ok()
}
