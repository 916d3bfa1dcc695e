//! The event loop shared by the relay and the app side: poll, dispatch,
//! then the handler's end of the turn; plus the fixed tokens, the timers,
//! listener accept with back-off, the stop handle, signals through the poll,
//! and systemd's notifications (ready, watchdog, stopping).
//!
//! One turn of the loop, as in redis's `ae.c`:
//!
//! 1. wait for events, at most until the nearest deadline (zero if work was
//!    requeued);
//! 2. hand each event to the [`Handler`];
//! 3. let the handler finish the turn: requeued sockets, expired timers,
//!    and only then the closes that the turn asked for, so a slab slot is
//!    never reused while an event for its old occupant may still be pending
//!    (invariant *Deferred close*).

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use crate::ops::notify::{Notifier, watchdog_interval};

/// Wakes the loop from another thread (stop requests).
pub const WAKER: Token = Token(usize::MAX);
/// SIGINT/SIGTERM arrived (see [`Reactor::stop_on_signals`]).
pub const SIGNALS: Token = Token(usize::MAX - 1);
/// The fixed token a user of the reactor may give its own main socket (the
/// relay's registration listener).
pub const MAIN: Token = Token(usize::MAX - 2);
/// The status listener (`--metrics`), relay's or agent's.
pub const STATUS: Token = Token(usize::MAX - 3);

/// What the loop needs from whatever it drives.
pub trait Handler {
    /// How long `poll` may block: `Some(ZERO)` when work is queued, the time to
    /// the nearest deadline otherwise, `None` for no deadline at all.
    fn poll_timeout(&self, now: Instant) -> Option<Duration>;
    /// One readiness event (never the [`WAKER`]).
    fn on_event(&mut self, event: &Event, now: Instant);
    /// End of a turn: requeued work, expired timers, then deferred closes.
    fn end_turn(&mut self, now: Instant);
    /// SIGINT or SIGTERM arrived (see [`Reactor::stop_on_signals`]); returns
    /// whether the loop should stop at once. The default does; a handler
    /// that drains first returns false and ends the loop itself later.
    fn on_signal(&mut self, _now: Instant) -> bool {
        true
    }
    /// Whether the handler is ready to serve, for systemd's `READY=1`: the
    /// relay once it listens (at once), the agent once registered.
    fn is_ready(&self) -> bool {
        true
    }
    /// One line on how the handler fares, for `systemctl status`
    /// (`STATUS=…`, sent when it changes, at most every few seconds).
    fn status_line(&self) -> Option<String> {
        None
    }
}

/// How often the status line is looked at: `systemctl status` is read by
/// people, and the line costs a census and a datagram.
const STATUS_PERIOD: Duration = Duration::from_secs(5);

/// A poll, its stop handle and, if asked for, SIGINT/SIGTERM delivery.
pub struct Reactor {
    poll: Poll,               // the one poll of this loop
    events: Events,           // reused event buffer
    stopper: Stopper,         // stop requests from other threads
    signals: Option<Signals>, // SIGINT/SIGTERM, when the loop owns the process
    systemd: Option<Systemd>, // notifications to systemd, under `Type=notify`
}

/// What the loop tells systemd (see [`Reactor::notify_systemd`]).
struct Systemd {
    notifier: Notifier,                    // `$NOTIFY_SOCKET`
    ready: bool,                           // `READY=1` sent
    watchdog: Option<(Duration, Instant)>, // ping period, and the next ping
    status: (String, Instant),             // the last status line sent, and when to look again
}

impl Reactor {
    /// A new poll with its waker.
    pub fn new() -> io::Result<Reactor> {
        let poll = Poll::new()?;
        let stopper = Stopper::new(&poll)?;
        Ok(Reactor {
            poll,
            events: Events::with_capacity(1024),
            stopper,
            signals: None,
            systemd: None,
        })
    }

    /// Where sockets are registered.
    pub fn registry(&self) -> &Registry {
        self.poll.registry()
    }

    /// A handle that stops the loop from any thread.
    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    /// Makes SIGINT and SIGTERM stop the loop, through the poll itself (a
    /// self-pipe registered as [`SIGNALS`]): no thread, and no signal lost in
    /// the instant before `poll` blocks.
    pub fn stop_on_signals(&mut self) -> io::Result<()> {
        let mut signals = Signals::new([SIGINT, SIGTERM])?;
        self.poll
            .registry()
            .register(&mut signals, SIGNALS, Interest::READABLE)?;
        self.signals = Some(signals);
        Ok(())
    }

    /// Tells systemd how the loop fares, when it runs under a `Type=notify`
    /// unit (`$NOTIFY_SOCKET` set; otherwise nothing happens and this
    /// returns false): `READY=1` once the handler says it is ready,
    /// `WATCHDOG=1` from a timer of the loop itself at half the interval
    /// `$WATCHDOG_USEC` asks for (a loop that stops turning stops pinging,
    /// and systemd restarts it), and `STOPPING=1` when a signal starts the
    /// end.
    pub fn notify_systemd(&mut self) -> bool {
        let Some(notifier) = Notifier::from_env() else {
            return false;
        };
        let watchdog = watchdog_interval().map(|full| (full / 2, Instant::now()));
        self.systemd = Some(Systemd {
            notifier,
            ready: false,
            watchdog,
            status: (String::new(), Instant::now()),
        });
        true
    }

    /// Runs turns while `go_on(handler)` holds after each; returns whether
    /// the loop was stopped (rather than `go_on` turning false).
    pub fn run_while<H: Handler>(
        &mut self,
        handler: &mut H,
        mut go_on: impl FnMut(&H) -> bool,
    ) -> io::Result<bool> {
        loop {
            if self.turn(handler)? {
                return Ok(true);
            }
            if !go_on(handler) {
                return Ok(false);
            }
        }
    }

    /// One turn; returns whether a stop was requested.
    fn turn(&mut self, handler: &mut impl Handler) -> io::Result<bool> {
        let now = Instant::now();
        let systemd_due = self.systemd.as_ref().and_then(Systemd::next_due);
        let timeout = match (handler.poll_timeout(now), systemd_due) {
            (timeout, Some(at)) => {
                let due = at.saturating_duration_since(now);
                Some(timeout.map_or(due, |t| t.min(due)))
            }
            (timeout, None) => timeout,
        };
        match self.poll.poll(&mut self.events, timeout) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                return Ok(self.stopper.is_stopped());
            }
            other => other?,
        }
        let now = Instant::now();
        for event in self.events.iter() {
            match event.token() {
                WAKER => {}
                SIGNALS => {
                    let systemd = self.systemd.as_mut();
                    take_signals(self.signals.as_mut(), &self.stopper, handler, systemd, now);
                }
                _ => handler.on_event(event, now),
            }
        }
        if self.stopper.is_stopped() {
            return Ok(true);
        }
        handler.end_turn(now);
        if let Some(systemd) = self.systemd.as_mut() {
            systemd.after_turn(handler, now);
        }
        Ok(false)
    }
}

impl Systemd {
    /// When the loop must turn for systemd: the next watchdog ping, or the
    /// next look at the status line once ready.
    fn next_due(&self) -> Option<Instant> {
        let ping = self.watchdog.map(|(_, at)| at);
        let status = self.ready.then_some(self.status.1);
        earliest(ping, status)
    }

    /// `READY=1` the first time the handler is ready; `WATCHDOG=1` when a
    /// ping is due (a turn ran: the loop is alive); `STATUS=…` when the
    /// handler's line changed.
    fn after_turn(&mut self, handler: &impl Handler, now: Instant) {
        if !self.ready && handler.is_ready() {
            self.ready = self.notifier.ready();
        }
        if now >= self.status.1 {
            self.status.1 = now + STATUS_PERIOD;
            if let Some(line) = handler.status_line().filter(|line| *line != self.status.0) {
                self.notifier.status(&line);
                self.status.0 = line;
            }
        }
        if let Some((period, at)) = self.watchdog.as_mut()
            && now >= *at
        {
            self.notifier.watchdog();
            *at = now + *period;
        }
    }
}

/// Hands pending SIGINT/SIGTERM to the handler; stops if it says so.
fn take_signals(
    signals: Option<&mut Signals>,
    stopper: &Stopper,
    handler: &mut impl Handler,
    mut systemd: Option<&mut Systemd>,
    now: Instant,
) {
    for signal in signals.into_iter().flat_map(|s| s.pending()) {
        let name = if signal == SIGINT {
            "SIGINT"
        } else {
            "SIGTERM"
        };
        log::info!("{name} received");
        if let Some(systemd) = systemd.as_deref_mut() {
            systemd.notifier.stopping();
        }
        if handler.on_signal(now) {
            stopper.flag.store(true, Ordering::Release);
        }
    }
}

/// Stops a running loop from any thread.
#[derive(Clone)]
pub struct Stopper {
    waker: Arc<Waker>,     // interrupts the loop's poll
    flag: Arc<AtomicBool>, // read by the loop after every turn
}

impl Stopper {
    /// A stopper for `poll`, plus the flag its loop must watch.
    pub fn new(poll: &Poll) -> io::Result<Self> {
        Ok(Stopper {
            waker: Arc::new(Waker::new(poll.registry(), WAKER)?),
            flag: Arc::new(AtomicBool::new(false)),
        })
    }

    /// Asks the loop to return; it does so at the end of its current turn.
    pub fn stop(&self) {
        self.flag.store(true, Ordering::Release);
        // A failed wake can only mean the loop is already gone.
        let _ = self.waker.wake();
    }

    /// Whether a stop was asked for.
    pub fn is_stopped(&self) -> bool {
        self.flag.load(Ordering::Acquire)
    }
}

/// Deadlines of slab entries, soonest first, at most one per entry:
/// arming replaces the entry's deadline and [`cancel`](Timers::cancel)
/// removes it, so only live deadlines are held. (A heap that leaves a
/// closed entry's timer to expire on its own grows with the rate of
/// connections times the timeout: at 10,000 connections a second, each
/// half-closing once, a 10-minute idle timeout would hold six million.)
/// Owners cancel an entry's timer whenever it changes phase or closes, so a
/// timer that fires always belongs to the phase that armed it: no identity
/// needs to ride along.
#[derive(Default)]
pub struct Timers {
    order: BTreeSet<(Instant, usize)>, // (deadline, key), soonest first
    armed: HashMap<usize, Instant>,    // key => deadline
}

impl Timers {
    /// Arms the timer of entry `key`, replacing any it had.
    pub fn add(&mut self, deadline: Instant, key: usize) {
        if let Some(old) = self.armed.insert(key, deadline) {
            self.order.remove(&(old, key));
        }
        self.order.insert((deadline, key));
    }

    /// Disarms the timer of entry `key`, if any: for an entry being closed.
    pub fn cancel(&mut self, key: usize) {
        if let Some(deadline) = self.armed.remove(&key) {
            self.order.remove(&(deadline, key));
        }
    }

    /// The nearest deadline.
    pub fn next(&self) -> Option<Instant> {
        self.order.first().map(|&(at, _)| at)
    }

    /// Removes one timer due at `now` and returns its entry's key.
    pub fn pop_due(&mut self, now: Instant) -> Option<usize> {
        let &(at, key) = self.order.first()?;
        if at > now {
            return None;
        }
        self.order.pop_first();
        self.armed.remove(&key);
        Some(key)
    }

    /// How many timers are armed.
    pub fn len(&self) -> usize {
        self.armed.len()
    }

    /// Whether no timer is armed.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.armed.is_empty()
    }
}

/// What one `accept` gave.
pub enum Accepted {
    /// A new connection.
    Conn(TcpStream, SocketAddr),
    /// No connection is pending: the listener's readiness is used up.
    Empty,
    /// This one connection failed (aborted before we took it, refused by a
    /// firewall rule): go on with the next.
    Skip,
    /// Accepting cannot succeed now (out of descriptors or memory, or an error
    /// we do not know): pause accepting and retry after a back-off instead of
    /// spinning, since the listener stays readable.
    Exhausted(io::Error),
}

/// Accepts one connection and classifies the outcome.
pub fn accept(listener: &TcpListener) -> Accepted {
    loop {
        match listener.accept() {
            Ok((stream, addr)) => return Accepted::Conn(stream, addr),
            Err(e) => match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Accepted::Empty,
                io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::PermissionDenied => return Accepted::Skip,
                _ => return Accepted::Exhausted(e),
            },
        }
    }
}

/// Accepts attempted per listener per turn before yielding to other sockets.
pub const ACCEPT_BUDGET: usize = 64;

/// The accept pause after the first exhaustion; doubled while it lasts.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(20);
/// The longest accept pause: short enough that accepting resumes promptly
/// once descriptors free up.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Accept back-off shared by all listeners of a loop: when one accept finds
/// the process out of descriptors, every listener would too.
#[derive(Default)]
pub struct AcceptGate {
    paused_until: Option<Instant>, // no accepts before this
    backoff: Option<Duration>,     // the current pause length, while failing
    starved: Vec<Token>,           // listeners still readable, to retry
    warned: bool,                  // one log line per episode, not per accept
}

impl AcceptGate {
    /// May listeners accept now?
    pub fn is_open(&self, now: Instant) -> bool {
        self.paused_until.is_none_or(|t| now >= t)
    }

    /// Remembers that `listener` still has connections to take.
    pub fn starve(&mut self, listener: Token) {
        if !self.starved.contains(&listener) {
            self.starved.push(listener);
        }
    }

    /// Closes the gate after `err`, for a growing back-off; returns whether
    /// this starts a new episode (the previous one had ended).
    pub fn exhausted(&mut self, now: Instant, listener: Token, err: &io::Error) -> bool {
        let new_episode = !self.warned;
        let backoff = self
            .backoff
            .map_or(ACCEPT_BACKOFF_MIN, |b| (b * 2).min(ACCEPT_BACKOFF_MAX));
        if !self.warned {
            log::warn!("accept failed ({err}); pausing accepts, open connections keep flowing");
            self.warned = true;
        }
        self.backoff = Some(backoff);
        self.paused_until = Some(now + backoff);
        self.starve(listener);
        new_episode
    }

    /// An accept succeeded: the episode is over.
    pub fn succeeded(&mut self) {
        if self.warned {
            log::info!("accepting again");
        }
        self.backoff = None;
        self.warned = false;
    }

    /// When the pause ends, if one is on.
    pub fn deadline(&self) -> Option<Instant> {
        self.paused_until.filter(|_| !self.starved.is_empty())
    }

    /// The listeners to retry, once the pause is over.
    pub fn take_due(&mut self, now: Instant) -> Vec<Token> {
        if !self.is_open(now) {
            return Vec::new();
        }
        self.paused_until = None;
        std::mem::take(&mut self.starved)
    }
}

/// Removes a source that is about to be dropped from the poll. mio asks for
/// an explicit deregister because some platforms leak otherwise; on Linux,
/// closing the last descriptor of a socket removes it from every epoll
/// interest list (epoll(7)), so the `epoll_ctl` call would be pure cost: two
/// syscalls per relayed client, measured in connection churn.
pub fn forget(registry: &Registry, source: &mut impl mio::event::Source) {
    if cfg!(not(target_os = "linux")) {
        let _ = registry.deregister(source);
    }
}

/// The earlier of two optional deadlines.
pub fn earliest(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Time from `now` to `deadline`, for `poll`: zero if it has passed.
pub fn until(deadline: Option<Instant>, now: Instant) -> Option<Duration> {
    deadline.map(|d| d.saturating_duration_since(now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timers_fire_in_deadline_order_only_when_due() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        timers.add(t0 + Duration::from_secs(2), 1);
        timers.add(t0 + Duration::from_secs(1), 2);
        assert_eq!(timers.next(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(timers.pop_due(t0), None);
        assert_eq!(timers.pop_due(t0 + Duration::from_secs(5)), Some(2));
        assert_eq!(timers.pop_due(t0 + Duration::from_secs(5)), Some(1));
        assert_eq!(timers.pop_due(t0 + Duration::from_secs(5)), None);
    }

    #[test]
    fn a_timer_is_replaced_by_its_entrys_next_and_gone_when_cancelled() {
        let t0 = Instant::now();
        let mut timers = Timers::default();
        timers.add(t0 + Duration::from_secs(1), 1);
        timers.add(t0 + Duration::from_secs(3), 1); // same entry: replaces
        timers.add(t0 + Duration::from_secs(2), 2);
        assert_eq!(timers.len(), 2);
        assert_eq!(timers.next(), Some(t0 + Duration::from_secs(2)));
        timers.cancel(2);
        timers.cancel(7); // nothing armed: no effect
        assert_eq!(timers.len(), 1);
        assert_eq!(timers.pop_due(t0 + Duration::from_secs(2)), None);
        assert_eq!(timers.pop_due(t0 + Duration::from_secs(3)), Some(1));
        assert!(timers.is_empty());
        assert_eq!(timers.next(), None);
    }

    #[test]
    fn accept_gate_backs_off_and_reopens() {
        let t0 = Instant::now();
        let mut gate = AcceptGate::default();
        let err = io::Error::other("EMFILE");
        gate.exhausted(t0, Token(4), &err);
        assert!(!gate.is_open(t0));
        assert_eq!(gate.take_due(t0), Vec::<Token>::new());
        let first = gate.deadline().map(|d| d - t0);
        assert_eq!(first, Some(ACCEPT_BACKOFF_MIN));
        let later = t0 + ACCEPT_BACKOFF_MIN;
        assert_eq!(gate.take_due(later), vec![Token(4)]);
        gate.exhausted(later, Token(4), &err);
        assert_eq!(
            gate.deadline().map(|d| d - later),
            Some(ACCEPT_BACKOFF_MIN * 2)
        );
        gate.succeeded();
        gate.exhausted(later, Token(4), &err);
        assert_eq!(gate.deadline().map(|d| d - later), Some(ACCEPT_BACKOFF_MIN));
    }
}
