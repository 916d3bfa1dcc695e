//! The app side of the card's path: an app connects to the registration
//! port, the relay opens its relayed port and its dial-in listener and
//! says so (the `established` line), then serves its control connection:
//! writing dial lines, reading the requests of the extensions.

use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use mio::Interest;
use mio::net::{TcpListener, TcpStream};

use super::core::RelayCore;
use super::state::{App, CONTROL, ControlConn, DIAL, Ending, RELAYED, RelayConn};
use super::status::{Listener, Refused};
use crate::auth;
use crate::config::RelayStyle;
use crate::pipe::Flow;
use crate::protocol::{Refusal, error_line, established_line};
use crate::sockio::{keep_alive, listen, no_delay_listener, write_slice};
use crate::table::Id;

impl RelayCore {
    /// A connection on the registration port: registered at once (the
    /// original protocol), or challenged first when a secret is set.
    pub(super) fn admit_app(&mut self, stream: TcpStream, peer: SocketAddr, now: Instant) {
        if !self.may_admit_app() {
            self.metrics.refused(Listener::Registration, Refused::Apps);
            return refuse_unregistered(&stream, &Refusal::TooManyApps);
        }
        keep_alive(&stream);
        let control = ControlConn::new(stream, peer, self.config.max_line);
        match self.config.secret {
            None => self.register(control, now),
            Some(_) => self.challenge(control, now),
        }
    }

    /// Whether one more app fits under `--max-apps` (counting those still
    /// authenticating); logs once per episode when it does not.
    fn may_admit_app(&mut self) -> bool {
        let max = self.config.max_apps;
        let census = self.table.census();
        if census.count(super::state::APPS) + census.count(super::state::APPLICANTS) >= max {
            self.crowded
                .raise(|| format!("app limit ({max}) reached: new apps are refused"));
            return false;
        }
        self.crowded.clear();
        true
    }

    /// Opens the app's ports and inserts it, its `established` line queued
    /// (and written before the turn ends).
    fn register(&mut self, control: ControlConn, now: Instant) {
        let peer = control.peer;
        let (listeners, ports) = match self.open_listeners() {
            Ok(opened) => opened,
            Err(e) => {
                log::warn!("app {peer} refused: cannot open a relayed port: {e}");
                let refusal = Refusal::NoRelayedPort(e.to_string());
                return refuse_unregistered(&control.stream, &refusal);
            }
        };
        let inserted = self.table.insert(|id, registry| {
            let mut app = App::new(control, listeners, ports);
            let interest = Interest::READABLE | Interest::WRITABLE;
            registry.register(&mut app.control.stream, id.token(CONTROL), interest)?;
            registry.register(&mut app.relayed, id.token(RELAYED), Interest::READABLE)?;
            registry.register(&mut app.dial, id.token(DIAL), Interest::READABLE)?;
            app.control.queue(&established_line(ports.0));
            Ok(RelayConn::App(app))
        });
        match inserted {
            Ok(id) => self.registered(id, now),
            Err(e) => log::warn!("app {peer} refused: cannot register its sockets: {e}"),
        }
    }

    /// Bookkeeping and the log line of a new registration, then the first
    /// flush of the established line.
    pub(super) fn registered(&mut self, id: Id, now: Instant) {
        let Some(app) = self.app(id) else {
            return;
        };
        let (peer, relayed_port, dial_port) = (app.control.peer, app.relayed_port, app.dial_port);
        self.held_ports.insert(relayed_port);
        log::info!(
            "app {peer} registered: relayed port {relayed_port} open (dial-in port {dial_port})"
        );
        self.serve_control(id, now);
    }

    /// A relayed-port listener (by the relay style and range) and a dial-in
    /// listener on an OS-assigned port, not yet registered.
    pub(super) fn open_listeners(&self) -> io::Result<((TcpListener, TcpListener), (u16, u16))> {
        let relayed = self.open_relayed_port()?;
        let dial = listen(SocketAddr::new(self.config.bind, 0), self.config.backlog)?;
        no_delay_listener(&relayed);
        no_delay_listener(&dial);
        let ports = (relayed.local_addr()?.port(), dial.local_addr()?.port());
        Ok(((relayed, dial), ports))
    }

    /// A listener for a new app's relayed port, chosen by the relay style
    /// within the port range.
    fn open_relayed_port(&self) -> io::Result<TcpListener> {
        let (lo, hi) = self.port_range();
        let ports: Box<dyn Iterator<Item = u16>> = match self.config.relay_style {
            RelayStyle::Random if self.config.port_range.is_none() => {
                return listen(SocketAddr::new(self.config.bind, 0), self.config.backlog);
            }
            // A random start, then every port of the range once, wrapping.
            RelayStyle::Random => {
                let span = u32::from(hi - lo) + 1;
                let start = auth::random::<4>().map_or(0, u32::from_le_bytes) % span;
                Box::new((0..span).map(move |i| lo + ((start + i) % span) as u16))
            }
            // The lowest free port: reg-port+1, +2, ... while earlier ones are held.
            RelayStyle::Increment => Box::new(lo..=hi),
        };
        for port in ports.filter(|p| !self.held_ports.contains(p)) {
            match listen(SocketAddr::new(self.config.bind, port), self.config.backlog) {
                Ok(listener) => return Ok(listener),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::AddrInUse | io::ErrorKind::PermissionDenied
                    ) => {}
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AddrInUse,
            format!("no free port in {lo}-{hi}"),
        ))
    }

    /// The ports relayed ports may use.
    pub(super) fn port_range(&self) -> (u16, u16) {
        let above_reg = self.reg_addr.port().saturating_add(1);
        self.config.port_range.unwrap_or((above_reg, u16::MAX))
    }

    /// Reads from and writes to an app's control connection and acts on
    /// the requests it made (the extensions'), in that order; dial lines
    /// held back for want of outbox room go once it drains.
    pub(super) fn serve_control(&mut self, id: Id, now: Instant) {
        let Some(app) = self.app_mut(id) else {
            return;
        };
        let read = app.read_control();
        self.answer_requests(id, now);
        let Some(app) = self.app_mut(id) else {
            return; // a request was refused: the app is closing
        };
        match read.and_then(|flow| app.control.flush().map(|()| flow)) {
            Ok(Flow::More) => self.table.requeue(id, CONTROL),
            Ok(Flow::Idle | Flow::Done) => {}
            Err(ending) => return self.close(id, ending),
        }
        if self
            .app(id)
            .is_some_and(|app| app.unasked > 0 && app.control.flushed())
        {
            self.ask_for_waiting(id, now);
        }
    }

    /// Acts on what the app asked for since the last time (`port`, `ready`,
    /// `proxy`, `allow`, `rate`).
    fn answer_requests(&mut self, id: Id, now: Instant) {
        let Some(app) = self.app_mut(id) else {
            return;
        };
        let requests = &mut app.requests;
        let (port, ready, proxy) = (
            requests.port.take(),
            requests.ready.take(),
            requests.proxy.take(),
        );
        let (allow, rate) = (requests.allow.take(), requests.rate.take());
        if let Some(request) = port {
            self.answer_port_request(id, request);
        }
        // Before `ready` too: a ready dial-in waits for an admitted client.
        match allow {
            Some(Ok(list)) => self.answer_allow_request(id, list),
            Some(Err(e)) => return self.refuse(id, Refusal::BadAllowRequest(e.to_string())),
            None => {}
        }
        match rate {
            Some(Ok(limit)) => self.answer_rate_request(id, limit),
            Some(Err(e)) => return self.refuse(id, Refusal::BadRateRequest(e.to_string())),
            None => {}
        }
        // Before `ready`: the ready dial-ins it asks for begin with headers.
        if let Some(request) = proxy {
            self.answer_proxy_request(id, request);
        }
        if let Some(request) = ready {
            self.answer_ready(id, request, now);
        }
    }

    /// Answers an app (authenticating or registered) with an error line and
    /// closes it. The line is tiny and the connection's send buffer nearly
    /// empty, so one write delivers it.
    pub(super) fn refuse(&mut self, id: Id, refusal: Refusal) {
        let control = match self.table.get_mut(id) {
            Some(RelayConn::App(app)) => &mut app.control,
            Some(RelayConn::Authenticating(applicant)) => &mut applicant.control,
            _ => return,
        };
        log::warn!("app {}: refused: {refusal}", control.peer);
        control.queue(&error_line(&refusal));
        let _ = control.flush();
        self.close(id, Ending::Refused);
    }
}

/// Tells a connection that never became an app why, in one write (its send
/// buffer is empty), before it is dropped.
fn refuse_unregistered(stream: &TcpStream, refusal: &Refusal) {
    // Whatever the write's outcome, the connection is dropped next.
    let _ = write_slice(stream, error_line(refusal).as_bytes());
}
