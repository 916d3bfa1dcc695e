//! The relay: its public face ([`Relay`], [`RelayHandle`], [`Stats`]) and
//! the handler the reactor drives. Read in this order for the card's path
//! (one client, from accept to piped bytes):
//!
//! * `core`: one turn of the loop (note, accept, serve, expire, reap),
//!   dispatch by state, the connection limit, shutdown;
//! * `apps`: an app registers, gets its ports, its control connection;
//! * `clients`: a client waits, its app is asked to dial in, the dial-in
//!   is paired with it, the pipe is pumped;
//! * `state`: the entries and the data each phase owns.
//!
//! The extensions each live in a file of their own, so removing one is
//! deleting that file and the few match arms that name its states:
//! `auth` (the secret: challenge and dial-in tokens), `ready` (ready
//! dial-ins), `port` (a relayed port asked for), `proxy` (clients' real
//! addresses: PROXY protocol headers to apps, and from balancers),
//! `access` (who may connect: allow-lists and per-source rate limits).

mod access;
mod apps;
mod auth;
mod clients;
mod core;
mod port;
mod proxy;
mod ready;
mod state;
mod status;
#[cfg(test)]
mod tests;

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::thread;

use mio::Interest;

use self::core::{REG_LISTENER, RelayCore};
use crate::config::Config;
use crate::reactor::{Reactor, Stopper};
use crate::sockio::listen;

/// What the relay holds right now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Registered apps (each with a control connection and two listeners).
    pub apps: usize,
    /// Connections still proving themselves: apps answering the challenge,
    /// dial-ins presenting their token.
    pub pending: usize,
    /// Dial-ins kept ready for apps' next clients (the `ready` extension).
    pub ready_dial_ins: usize,
    /// Clients waiting for a dial-in.
    pub waiting_clients: usize,
    /// Client/dial-in pairs being piped.
    pub pipes: usize,
    /// Ring buffers lent out (only pipes with bytes in flight hold one).
    pub buffers_lent: usize,
    /// Deadlines armed: authentication, dial-in, token and half-close idle
    /// timeouts of the entries in those phases; none outlives its entry.
    pub timers: usize,
}

impl Stats {
    /// Client-side connections held: waiting clients plus both ends of pipes.
    pub fn client_connections(&self) -> usize {
        self.waiting_clients + 2 * self.pipes
    }
}

/// Controls a running relay from any thread.
#[derive(Clone)]
pub struct RelayHandle {
    stopper: Stopper,                // stops the loop
    published: Arc<Mutex<Stats>>,    // its counts, as of its last turn
    reg_addr: SocketAddr,            // where apps register
    status_addr: Option<SocketAddr>, // where the status endpoint listens
}

impl RelayHandle {
    /// Asks the relay's loop to return at once. Its sockets close when the
    /// [`Relay`] is dropped. (SIGINT/SIGTERM, after
    /// [`Relay::stop_on_signals`], drain first instead.)
    pub fn stop(&self) {
        self.stopper.stop();
    }

    /// Counts of what the relay holds, as of its last completed turn (a
    /// consistent snapshot: never half of a transition).
    pub fn stats(&self) -> Stats {
        match self.published.lock() {
            Ok(stats) => *stats,
            Err(poisoned) => *poisoned.into_inner(),
        }
    }

    /// The address apps register on.
    pub fn reg_addr(&self) -> SocketAddr {
        self.reg_addr
    }

    /// Where the status endpoint listens ([`Config::metrics`]), with the
    /// real port when bound to port 0.
    pub fn status_addr(&self) -> Option<SocketAddr> {
        self.status_addr
    }
}

/// A bound relay, ready to [`run`](Relay::run).
pub struct Relay {
    reactor: Reactor, // the poll this relay runs on
    core: RelayCore,  // everything the handler owns
}

impl Relay {
    /// Binds the registration port. Fails with a message naming the address.
    pub fn bind(config: Config) -> io::Result<Relay> {
        let reactor = Reactor::new()?;
        let addr = SocketAddr::new(config.bind, config.reg_port);
        let mut reg = listen(addr, config.backlog)
            .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}")))?;
        reactor
            .registry()
            .register(&mut reg, REG_LISTENER, Interest::READABLE)?;
        warn_if_backlog_capped(&reg, config.backlog);
        let status = config
            .metrics
            .map(|addr| open_status(&reactor, addr))
            .transpose()?;
        let mut core = RelayCore::new(reactor.registry().try_clone()?, config, reg)?;
        core.status = status;
        Ok(Relay { reactor, core })
    }

    /// The registration address (with the real port when bound to port 0).
    pub fn reg_addr(&self) -> SocketAddr {
        self.core.reg_addr
    }

    /// Where the status endpoint listens ([`Config::metrics`]), with the
    /// real port when bound to port 0.
    pub fn status_addr(&self) -> Option<SocketAddr> {
        self.core.status_addr()
    }

    /// A handle to stop and observe the relay from another thread.
    pub fn handle(&self) -> RelayHandle {
        RelayHandle {
            stopper: self.reactor.stopper(),
            published: self.core.published.clone(),
            reg_addr: self.core.reg_addr,
            status_addr: self.core.status_addr(),
        }
    }

    /// Makes SIGINT and SIGTERM shut the relay down gracefully: stop
    /// accepting, close every app and its ports, let open pipes drain for
    /// the grace period, then return. A second signal returns at once.
    pub fn stop_on_signals(&mut self) -> io::Result<()> {
        self.reactor.stop_on_signals()
    }

    /// Under a systemd `Type=notify` unit (`$NOTIFY_SOCKET` set), tells
    /// systemd `READY=1` once the relay runs (it listens from `bind` on),
    /// pings its watchdog (`WatchdogSec`) from the loop, and says
    /// `STOPPING=1` when a signal starts the drain. Returns whether systemd
    /// is listening.
    pub fn notify_systemd(&mut self) -> bool {
        self.reactor.notify_systemd()
    }

    /// Runs the reactor on this thread until [`RelayHandle::stop`], or until
    /// a shutdown begun by a signal has drained.
    pub fn run(mut self) -> io::Result<()> {
        let config = &self.core.config;
        log::info!(
            "listening for apps on {} (relay style {}, dial-in timeout {:?}{})",
            self.core.reg_addr,
            config.relay_style,
            config.dial_in_timeout,
            if config.secret.is_some() {
                ", secret required"
            } else {
                ""
            }
        );
        if let Some(addr) = self.core.status_addr() {
            log::info!("status on http://{addr}/ (/metrics, /status)");
        }
        self.reactor
            .run_while(&mut self.core, |core| !core.drained())?;
        log::info!("relay stopped");
        Ok(())
    }

    /// Runs the relay on a thread of its own, for tests, benchmarks and
    /// programs that embed it. The relay stops when the result is dropped.
    pub fn spawn(self) -> io::Result<RunningRelay> {
        let handle = self.handle();
        let thread = thread::Builder::new()
            .name("tcp-relay".into())
            .spawn(move || self.run())?;
        Ok(RunningRelay {
            handle,
            thread: Some(thread),
        })
    }
}

/// A relay running on its own thread; dropping it stops the relay.
pub struct RunningRelay {
    handle: RelayHandle,
    thread: Option<thread::JoinHandle<io::Result<()>>>,
}

impl RunningRelay {
    /// The handle to observe (or stop) the relay.
    pub fn handle(&self) -> &RelayHandle {
        &self.handle
    }

    /// The address apps register on.
    pub fn reg_addr(&self) -> SocketAddr {
        self.handle.reg_addr
    }

    /// Counts of what the relay holds.
    pub fn stats(&self) -> Stats {
        self.handle.stats()
    }
}

impl Drop for RunningRelay {
    fn drop(&mut self) {
        self.handle.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Says so at start when the kernel grants less backlog than asked: bursts
/// larger than what it grants have connection attempts dropped (and
/// retried by the peer seconds later).
fn warn_if_backlog_capped(reg: &mio::net::TcpListener, asked: u32) {
    let granted = crate::sockio::granted_backlog(reg).or_else(crate::sockio::somaxconn);
    if let Some(max) = granted.filter(|&max| max < asked) {
        log::warn!(
            "listen backlog {asked} capped to {max} by net.core.somaxconn: bursts of more \
             connections at once are slowed (raise it: sysctl -w net.core.somaxconn={asked})"
        );
    }
}

/// The status endpoint's listener (`--metrics`), registered. Its backlog is
/// small: a scraper or two, and connections beyond the endpoint's cap are
/// closed as soon as they are accepted anyway.
fn open_status(reactor: &Reactor, addr: SocketAddr) -> io::Result<mio::net::TcpListener> {
    let mut listener = listen(addr, 64).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot listen on {addr} for --metrics: {e}"),
        )
    })?;
    reactor
        .registry()
        .register(&mut listener, status::STATUS_TOKEN, Interest::READABLE)?;
    Ok(listener)
}
