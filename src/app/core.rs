//! The agent's loop handler: what it owns ([`AgentCore`]: one table of
//! registrations and clients), the reactor's callbacks, dispatch by state,
//! timers and deferred close.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use mio::event::Event;
use mio::net::TcpListener;
use mio::{Registry, Token};

use super::state::{AgentConn, DIAL_IN, DIALING, DialLine, Ending, LINKS_UP, Link, SERVING};
use super::status::Metrics;
use super::{AgentConfig, AgentError, Registered};
use crate::flush::{Check, Flush, STALL};
use crate::pipe::{Broken, Flow};
use crate::pool::BufferPool;
use crate::reactor::{self, Handler};
use crate::sockio::reset_on_close;
use crate::table::{Id, Table};

/// Ring size for the agent's pipes and echoes.
const BUFFER_SIZE: usize = 64 * 1024;

/// The agent's state, driven by the reactor.
/// What [`super::Agent::on_registered`] calls.
pub(super) type OnRegistered = Box<dyn FnMut(&Registered) + Send>;

pub(super) struct AgentCore {
    pub(super) table: Table<AgentConn>, // registrations and clients
    pub(super) config: AgentConfig,     // what the user asked for
    pub(super) pool: BufferPool,        // buffers lent while bytes are in flight
    pub(super) shared: Arc<Mutex<Vec<Registered>>>, // registrations up, for other threads
    pub(super) on_registered: Option<OnRegistered>, // told each registration
    pub(super) failure: Option<AgentError>, // why we gave up, once we have
    pub(super) started: bool, // register() returned: a refusal no longer stops every service
    pub(super) local_down: Vec<bool>, // by service: its local side is failing (logged once)
    pub(super) max_clients: usize, // most clients served at once
    pub(super) queued: VecDeque<DialLine>, // dial lines waiting for room, oldest first
    pub(super) crowded: bool, // dial lines are waiting (logged once per episode)
    pub(super) starved: Option<(Duration, Instant)>, // out of descriptors: back-off, and no dialing before
    pub(super) metrics: Metrics,                     // (status) counters of what happened
    pub(super) status: Option<TcpListener>,          // (status) the status endpoint, if asked for
}

impl AgentCore {
    /// A handler for `config`, registering its sockets with `registry`; its
    /// registration connects to the relay on the first turn.
    pub(super) fn new(config: AgentConfig, registry: Registry) -> AgentCore {
        let max_clients = config
            .max_clients
            .unwrap_or_else(AgentConfig::default_max_clients)
            .max(1);
        log::debug!("serving at most {max_clients} clients at once");
        let mut core = AgentCore {
            table: Table::new(registry),
            pool: BufferPool::new(BUFFER_SIZE, 16).with_splice(config.splice),
            shared: Arc::default(),
            on_registered: None,
            failure: None,
            started: false,
            local_down: vec![false; config.services.len()],
            max_clients,
            queued: VecDeque::new(),
            crowded: false,
            starved: None,
            metrics: Metrics::default(),
            status: None,
            config,
        };
        core.add_links();
        core
    }

    /// One registration per service and relay, each to connect at once.
    fn add_links(&mut self) {
        for service in 0..self.config.services.len() {
            for relay in self.config.relays.clone() {
                let link = Link {
                    relay,
                    service,
                    attempts: 0,
                    since: SystemTime::now(),
                    failed: None,
                };
                if let Ok(id) = self.table.insert(|_, _| Ok(AgentConn::Reconnecting(link))) {
                    self.table.arm(id, Instant::now());
                }
            }
        }
    }

    /// Clients being served or connected, against `max_clients`.
    pub(super) fn clients(&self) -> usize {
        let census = self.table.census();
        census.count(DIALING) + census.count(SERVING)
    }
}

impl Handler for AgentCore {
    fn poll_timeout(&self, now: Instant) -> Option<Duration> {
        if self.table.has_requeued() {
            return Some(Duration::ZERO);
        }
        let dial_again = self
            .starved
            .map(|(_, at)| at)
            .filter(|_| !self.queued.is_empty());
        reactor::until(
            reactor::earliest(self.table.next_deadline(), dial_again),
            now,
        )
    }

    fn on_event(&mut self, event: &Event, now: Instant) {
        self.dispatch(event.token(), Some(event), now);
    }

    /// Ready (for systemd) once a registration is up.
    fn is_ready(&self) -> bool {
        self.table.census().count(LINKS_UP) > 0
    }

    /// `2/2 registrations up, 5 clients` for `systemctl status`.
    fn status_line(&self) -> Option<String> {
        let census = self.table.census();
        let links = self.config.relays.len() * self.config.services.len();
        Some(format!(
            "{}/{links} registrations up, {} clients",
            census.count(LINKS_UP),
            self.clients()
        ))
    }

    fn end_turn(&mut self, now: Instant) {
        for token in self.table.take_requeued() {
            self.dispatch(token, None, now);
        }
        while let Some(id) = self.table.pop_due(now) {
            self.expire(id, now);
        }
        self.reap();
        self.dial_queued(now);
    }
}

impl AgentCore {
    /// Routes readiness (an event, or `None` for requeued work) to the
    /// handler of the entry's state.
    fn dispatch(&mut self, token: Token, event: Option<&Event>, now: Instant) {
        if token == reactor::STATUS {
            return self.accept_observers(now);
        }
        let Some((id, sub)) = self.table.resolve(token) else {
            return;
        };
        match self.table.get_mut(id) {
            Some(AgentConn::Connecting(..)) => self.finish_link_connect(id, now),
            // A short read ends reading unless the event also said the
            // relay closed or failed: only a further read reports that.
            Some(AgentConn::Registering(..) | AgentConn::Registered(..)) => {
                let ending = event.is_none_or(|e| e.is_read_closed() || e.is_error());
                self.serve_link(id, ending, now);
            }
            // A connect finished or failed: writable or error says which.
            Some(AgentConn::Dialing(_)) => self.finish_connect(id, sub, event, now),
            Some(AgentConn::Echoing(echo)) => {
                event.inspect(|e| echo.end.note(*e));
                self.pump(id, now);
            }
            // a: the dial-in; b: the local service.
            Some(AgentConn::Piping(pipe)) => {
                match (event, sub == DIAL_IN) {
                    (Some(event), true) => pipe.a.note(event),
                    (Some(event), false) => pipe.b.note(event),
                    (None, _) => {}
                }
                self.pump(id, now);
            }
            // Acknowledgements free send space, a reset ends the wait: look.
            Some(AgentConn::Flushing(_)) => self.check_flush(id, now),
            Some(AgentConn::Observer(conn)) => {
                event.inspect(|e| conn.note(e));
                self.serve_observer(id);
            }
            Some(AgentConn::Reconnecting(_) | AgentConn::Vacant) | None => {}
        }
    }

    /// An entry's deadline passed: what it means depends on the phase that
    /// armed it.
    fn expire(&mut self, id: Id, now: Instant) {
        match self.table.get(id) {
            Some(AgentConn::Reconnecting(_)) => self.connect(id, now),
            Some(AgentConn::Connecting(..)) => {
                self.lost(id, now, "connecting to the relay timed out".into());
            }
            Some(AgentConn::Registering(_, conn)) => {
                let why = conn.registration_timed_out();
                self.lost(id, now, why);
            }
            Some(AgentConn::Dialing(_)) => self.connect_timed_out(id, now),
            Some(AgentConn::Flushing(_)) => self.check_flush(id, now),
            // A scraper that did not finish its request in time.
            Some(AgentConn::Observer(_)) => self.table.close(id, Ending::Abort),
            Some(
                AgentConn::Registered(..)
                | AgentConn::Echoing(_)
                | AgentConn::Piping(_)
                | AgentConn::Vacant,
            )
            | None => {} // never armed
        }
    }

    /// Moves a client's bytes; requeues it if its budget ran out.
    pub(super) fn pump(&mut self, id: Id, now: Instant) {
        let flow = match self.table.get_mut(id) {
            Some(AgentConn::Echoing(echo)) => echo.pump(&mut self.pool),
            Some(AgentConn::Piping(pipe)) => pipe.pump(&mut self.pool),
            _ => return,
        };
        match flow {
            Ok(Flow::Idle) => {}
            Ok(Flow::More) => self.table.requeue(id, DIAL_IN),
            Ok(Flow::Done) => self.finish(id, now),
            // A lost trial is the relay's notion; here it is a reset.
            Err(Broken::Reset | Broken::Lost) => self.table.close(id, Ending::Abort),
            Err(Broken::Failed(e)) => {
                log::debug!("client stream failed: {e}");
                self.table.close(id, Ending::Abort);
            }
        }
    }

    /// Both ways are done: closed, or Flushing while the relay or the
    /// service has not acknowledged every byte (a close would leave them to
    /// an orphan, which the kernel resets when TCP memory runs short).
    fn finish(&mut self, id: Id, now: Instant) {
        let unacked = match self.table.get(id) {
            Some(AgentConn::Echoing(echo)) => echo.unacked(),
            Some(AgentConn::Piping(pipe)) => pipe.unacked(),
            _ => return,
        };
        if unacked == 0 {
            return self.table.close(id, Ending::Done);
        }
        let (pool, metrics, mut check) = (&mut self.pool, &mut self.metrics, Check::Delivered);
        self.table.transition(id, |conn| {
            let ends = match conn {
                AgentConn::Echoing(echo) => echo.into_streams(pool),
                AgentConn::Piping(pipe) => {
                    metrics.count_closed(pipe.moved_each_way());
                    pipe.into_streams(pool)
                }
                other => return other,
            };
            let (flush, first) = Flush::new(ends, now);
            check = first;
            AgentConn::Flushing(flush)
        });
        self.flush_checked(id, check);
    }

    /// Flushing: counts what the peers have not acknowledged yet.
    fn check_flush(&mut self, id: Id, now: Instant) {
        if let Some(AgentConn::Flushing(flush)) = self.table.get_mut(id) {
            let check = flush.check(now);
            self.flush_checked(id, check);
        }
    }

    /// Flushing => closed once delivered, or when the peers stall.
    fn flush_checked(&mut self, id: Id, check: Check) {
        match check {
            Check::Delivered => self.table.close(id, Ending::Done),
            Check::Again(at) => self.table.arm(id, at),
            Check::Stalled => {
                log::debug!("client closed with bytes unacknowledged for {STALL:?}");
                self.table.close(id, Ending::Done);
            }
        }
    }

    /// Removes the entries closed this turn and releases their sockets
    /// (with RST after a failure).
    fn reap(&mut self) {
        while let Some((_, conn, ending)) = self.table.pop_closed() {
            let mut streams = match conn {
                AgentConn::Dialing(dialing) => [Some(dialing.dial_in), dialing.local],
                AgentConn::Echoing(mut echo) => {
                    echo.release(&mut self.pool);
                    [Some(echo.end.stream), None]
                }
                AgentConn::Piping(mut pipe) => {
                    self.metrics.count_closed(pipe.moved_each_way());
                    pipe.release(&mut self.pool);
                    [Some(pipe.a.stream), Some(pipe.b.stream)]
                }
                AgentConn::Flushing(flush) => {
                    let mut ends = flush.into_ends().into_iter();
                    [ends.next(), ends.next()]
                }
                AgentConn::Observer(conn) => [Some(conn.stream), None],
                AgentConn::Connecting(_, stream) => [Some(stream), None],
                AgentConn::Registering(_, conn) | AgentConn::Registered(_, conn) => {
                    [Some(conn.into_stream()), None]
                }
                AgentConn::Reconnecting(_) | AgentConn::Vacant => continue,
            };
            for stream in streams.iter_mut().flatten() {
                if matches!(ending, Ending::Abort) {
                    reset_on_close(stream);
                }
                reactor::forget(self.table.registry(), stream);
            }
        }
    }

    /// The first service's relayed port, on the first relay it is
    /// registered with.
    pub(super) fn relayed_port(&self) -> Option<u16> {
        self.table.iter().find_map(|(_, conn)| match conn {
            AgentConn::Registered(link, conn) if link.service == 0 => conn.port(),
            _ => None,
        })
    }

    /// The registrations up now.
    pub(super) fn registrations_now(&self) -> Vec<Registered> {
        self.table
            .iter()
            .filter_map(|(_, conn)| match conn {
                AgentConn::Registered(link, conn) => Some(Registered {
                    service: self.config.services[link.service].name.clone(),
                    relay: link.relay.clone(),
                    port: conn.port()?,
                }),
                _ => None,
            })
            .collect()
    }

    /// Tells other threads what is registered now (after a change).
    pub(super) fn publish_registrations(&self) {
        let now = self.registrations_now();
        if let Ok(mut shared) = self.shared.lock() {
            *shared = now;
        }
    }

    /// Whether every registration has come up or failed at least once
    /// (what [`super::Agent::register`] waits for).
    pub(super) fn settled(&self) -> bool {
        self.table.iter().all(|(_, conn)| match conn {
            AgentConn::Reconnecting(link)
            | AgentConn::Connecting(link, _)
            | AgentConn::Registering(link, _) => link.failed.is_some(),
            _ => true,
        })
    }

    /// Why a service is registered with no relay at all, if one is not.
    pub(super) fn unregistered_service(&self) -> Option<String> {
        let up = |index: usize| {
            self.table.iter().any(
                |(_, conn)| matches!(conn, AgentConn::Registered(link, _) if link.service == index),
            )
        };
        let index = (0..self.config.services.len()).find(|&index| !up(index))?;
        let why = self.table.iter().find_map(|(_, conn)| match conn {
            AgentConn::Reconnecting(link) if link.service == index => link.failed.clone(),
            _ => None,
        });
        let why = why.unwrap_or_else(|| "not registered".into());
        match self.config.services[index].name.as_str() {
            "" => Some(why),
            name => Some(format!("{name}: {why}")),
        }
    }

    /// Stops the loop for good; the caller reports `failure` (the command
    /// line prints it as its one error line, so it is only logged at debug).
    pub(super) fn give_up(&mut self, failure: AgentError) {
        log::debug!("giving up: {failure}");
        // The loop checks `failure` after each turn and ends; the stopper
        // is not used, so that a failure is not mistaken for a stop request.
        // The first reason stands (a refusal, not the close that follows it).
        self.failure.get_or_insert(failure);
    }
}
