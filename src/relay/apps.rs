//! The app side of the relay: authentication (with a secret), registration
//! (opening the relayed port and the dial-in listener), the control
//! connection, and `port` requests.

use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Registry};

use super::core::{CONTROL, Core, DIAL, RELAYED};
use crate::auth::{self, NONCE_LEN};
use crate::config::RelayStyle;
use crate::pipe::Flow;
use crate::protocol::{
    AppLine, ProtocolError, challenge_line, error_line, established_line, parse_app_line,
};
use crate::reactor::token;
use crate::sockio::{keep_alive, listen, no_delay_listener, write_slice};
use crate::state::{App, Applicant, Conn, Control, Ending, Requests};

impl Core {
    /// A connection on the registration port: challenge it (with a secret)
    /// or register it at once (the original protocol).
    pub(super) fn admit_app(&mut self, stream: TcpStream, peer: SocketAddr, now: Instant) {
        let max = self.config.max_apps;
        if self.census.apps + self.census.applicants >= max {
            self.crowded
                .raise(|| format!("app limit ({max}) reached: new apps are refused"));
            return refuse_unregistered(&stream, "too many apps");
        }
        self.crowded.clear();
        keep_alive(&stream);
        let control = Control::new(stream, peer, self.config.max_line);
        match self.config.secret {
            None => self.register_app(control, now),
            Some(_) => self.challenge(control, now),
        }
    }

    /// Sends a fresh nonce; the app has `register_timeout` to answer.
    fn challenge(&mut self, mut control: Control, now: std::time::Instant) {
        let nonce = match auth::random::<NONCE_LEN>() {
            Ok(nonce) => nonce,
            Err(e) => return log::error!("app {} dropped: {e}", control.peer),
        };
        control.queue(&challenge_line(&nonce));
        let inserted = self.insert(|key, registry| {
            let interest = Interest::READABLE | Interest::WRITABLE;
            registry.register(&mut control.stream, token(key, CONTROL), interest)?;
            Ok(Conn::Authenticating(Applicant {
                control,
                nonce,
                answered: None,
                early: Requests::default(),
            }))
        });
        match inserted {
            Ok(key) => {
                self.timers.add(now + self.config.register_timeout, key);
                self.serve_applicant(key, now);
            }
            Err(e) => log::warn!("app dropped: cannot register its socket: {e}"),
        }
    }

    /// Writes the challenge and reads the answer; judges it once complete.
    pub(super) fn serve_applicant(&mut self, key: usize, now: Instant) {
        let Some(Conn::Authenticating(applicant)) = self.conns.get_mut(key) else {
            return;
        };
        let peer = applicant.control.peer;
        let (answered, early) = (&mut applicant.answered, &mut applicant.early);
        let read = applicant.control.read_lines(|line| {
            if answered.is_some() {
                return early.take(line, peer);
            }
            // Anything but a well-formed `auth` line is a wrong answer.
            *answered = Some(match parse_app_line(line) {
                Ok(AppLine::Auth(answer)) => answer,
                _ => Vec::new(),
            });
        });
        let result = read.and_then(|flow| applicant.control.flush().map(|()| flow));
        let answer = applicant.answered.take();
        match result {
            Err(ending) => return self.close(key, ending),
            Ok(Flow::More) => self.requeued.push(token(key, CONTROL)),
            Ok(_) => {}
        }
        if let Some(answer) = answer {
            self.judge(key, &answer, now);
        }
    }

    /// Admits an app whose answer is right; refuses one whose is not.
    fn judge(&mut self, key: usize, answer: &[u8], now: Instant) {
        let Some(Conn::Authenticating(applicant)) = self.conns.get(key) else {
            return;
        };
        let secret = self.config.secret.as_ref().map_or(&[][..], |s| &s.0[..]);
        if !auth::verify(secret, &applicant.nonce, answer) {
            return self.refuse(key, "secret refused");
        }
        let (mut relayed, mut dial, ports) = match self.open_listeners() {
            Ok(opened) => opened,
            Err(e) => return self.refuse(key, &format!("no relayed port: {e}")),
        };
        if let Err(e) = register_listeners(&self.registry, key, &mut relayed, &mut dial) {
            return self.refuse(key, &format!("no relayed port: {e}"));
        }
        let id = self.next_id();
        self.transition(key, |conn| match conn {
            Conn::Authenticating(applicant) => {
                let mut app = App::new(id, applicant.control, (relayed, dial), ports);
                app.control.queue(&established_line(ports.0));
                app.requests = applicant.early;
                Conn::Registering(app)
            }
            other => other,
        });
        self.registered(key, ports, now);
    }

    /// An app without a secret to prove: open its ports and tell it.
    fn register_app(&mut self, control: Control, now: Instant) {
        let peer = control.peer;
        let (mut relayed, mut dial, ports) = match self.open_listeners() {
            Ok(opened) => opened,
            Err(e) => {
                log::warn!("app {peer} refused: cannot open a relayed port: {e}");
                return refuse_unregistered(&control.stream, &format!("no relayed port: {e}"));
            }
        };
        let id = self.next_id();
        let inserted = self.insert(|key, registry| {
            let mut control = control;
            let interest = Interest::READABLE | Interest::WRITABLE;
            registry.register(&mut control.stream, token(key, CONTROL), interest)?;
            register_listeners(registry, key, &mut relayed, &mut dial)?;
            let mut app = App::new(id, control, (relayed, dial), ports);
            app.control.queue(&established_line(ports.0));
            Ok(Conn::Registering(app))
        });
        match inserted {
            Ok(key) => self.registered(key, ports, now),
            Err(e) => log::warn!("app {peer} refused: cannot register its sockets: {e}"),
        }
    }

    /// Bookkeeping and the log line of a new registration, then the first
    /// flush of the established line.
    fn registered(&mut self, key: usize, (relayed_port, dial_port): (u16, u16), now: Instant) {
        self.held_ports.insert(relayed_port);
        if let Some(app) = self.conns.get_mut(key).and_then(Conn::app_mut) {
            log::info!(
                "app {} registered: relayed port {relayed_port} open (dial-in port {dial_port})",
                app.control.peer
            );
        }
        self.serve_control(key, now);
    }

    /// A relayed-port listener (by the relay style and range) and a dial-in
    /// listener on an OS-assigned port, not yet registered.
    fn open_listeners(&self) -> io::Result<(TcpListener, TcpListener, (u16, u16))> {
        let relayed = self.open_relayed_port()?;
        let dial = listen(SocketAddr::new(self.config.bind, 0), self.config.backlog)?;
        no_delay_listener(&relayed);
        no_delay_listener(&dial);
        let ports = (relayed.local_addr()?.port(), dial.local_addr()?.port());
        Ok((relayed, dial, ports))
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
    fn port_range(&self) -> (u16, u16) {
        let above_reg = self.reg_addr.port().saturating_add(1);
        self.config.port_range.unwrap_or((above_reg, u16::MAX))
    }

    /// Reads from and writes to an app's control connection; answers its
    /// `port` request; moves it from Registering to Registered once the
    /// established line is out.
    pub(super) fn serve_control(&mut self, key: usize, now: Instant) {
        let Some(app) = self.conns.get_mut(key).and_then(Conn::app_mut) else {
            return;
        };
        let read = app.read_control();
        let (port, ready) = (app.requests.port.take(), app.requests.ready.take());
        if let Some(request) = port {
            self.answer_port_request(key, request);
        }
        if let Some(request) = ready {
            self.answer_ready(key, request, now);
        }
        let Some(app) = self.conns.get_mut(key).and_then(Conn::app_mut) else {
            return;
        };
        let result = read.and_then(|flow| app.control.flush().map(|()| flow));
        let flushed = app.control.flushed();
        let unasked = app.unasked > 0;
        match result {
            Ok(Flow::More) => self.requeued.push(token(key, CONTROL)),
            Ok(_) => {}
            Err(ending) => return self.close(key, ending),
        }
        if unasked && flushed {
            // Dial lines held back for want of outbox room can go now.
            self.ask_for_waiting(key, now);
        }
        if flushed && matches!(self.conns.get(key), Some(Conn::Registering(_))) {
            self.transition(key, |conn| match conn {
                Conn::Registering(app) => Conn::Registered(app),
                other => other,
            });
            // Same app, same deadlines (asked ready dial-ins): re-armed, as
            // the transition cancelled the entry's timer.
            self.arm_app_timer(key);
        }
    }

    /// The `port` extension: move the app's relayed port to the one it asked
    /// for, or tell it why not (then it is closed). Its dial-in listener and
    /// waiting clients stay as they are.
    fn answer_port_request(&mut self, key: usize, request: Result<u16, ProtocolError>) {
        let port = match request {
            Ok(port) => port,
            Err(e) => return self.refuse(key, &format!("bad port request: {e}")),
        };
        let (lo, hi) = self.port_range();
        let Some(app) = self.conns.get_mut(key).and_then(Conn::app_mut) else {
            return;
        };
        let old = app.relayed_port;
        if port == old {
            return app.control.queue(&established_line(port));
        }
        if self.config.port_range.is_some() && !(lo..=hi).contains(&port) {
            return self.refuse(
                key,
                &format!("port {port} is outside the relay's range {lo}-{hi}"),
            );
        }
        if self.held_ports.contains(&port) || port == self.reg_addr.port() {
            return self.refuse(key, &format!("port {port} is taken"));
        }
        let mut relayed = match listen(SocketAddr::new(self.config.bind, port), self.config.backlog)
        {
            Ok(listener) => listener,
            Err(e) => return self.refuse(key, &format!("port {port} is unavailable: {e}")),
        };
        no_delay_listener(&relayed);
        if let Err(e) =
            self.registry
                .register(&mut relayed, token(key, RELAYED), Interest::READABLE)
        {
            return self.refuse(key, &format!("port {port} is unavailable: {e}"));
        }
        let _ = self.registry.deregister(&mut app.relayed);
        app.relayed = relayed; // the old listener closes here
        app.relayed_port = port;
        app.control.queue(&established_line(port));
        self.held_ports.remove(&old);
        self.held_ports.insert(port);
        log::info!(
            "app {} moved to relayed port {port} at its request; port {old} closed",
            app.control.peer
        );
    }

    /// The `ready` extension: keep this many dial-ins of the app ready. Any
    /// spares beyond a lowered count are closed; the rest are asked for.
    fn answer_ready(&mut self, key: usize, request: Result<usize, ProtocolError>, now: Instant) {
        let count = match request {
            Ok(count) => count,
            Err(e) => return self.refuse(key, &format!("bad ready request: {e}")),
        };
        let Some(app) = self.conns.get_mut(key).and_then(Conn::app_mut) else {
            return;
        };
        app.ready = count;
        let extra: Vec<usize> = app.spares.iter().skip(count).copied().collect();
        log::debug!("app {} keeps {count} dial-ins ready", app.control.peer);
        for spare in extra {
            self.close(spare, Ending::Done);
        }
        self.top_up(key, now);
    }

    /// Answers an app (authenticating or registered) with an error line and
    /// closes it. The line is tiny and the connection's send buffer nearly
    /// empty, so one write delivers it.
    pub(super) fn refuse(&mut self, key: usize, reason: &str) {
        let control = match self.conns.get_mut(key) {
            Some(Conn::Authenticating(applicant)) => &mut applicant.control,
            Some(Conn::Registering(app) | Conn::Registered(app)) => &mut app.control,
            _ => return,
        };
        log::warn!("app {}: refused: {reason}", control.peer);
        control.queue(&error_line(reason));
        let _ = control.flush();
        self.close(key, Ending::Refused);
    }
}

/// Registers an app's two listeners under its key.
fn register_listeners(
    registry: &Registry,
    key: usize,
    relayed: &mut TcpListener,
    dial: &mut TcpListener,
) -> io::Result<()> {
    registry.register(relayed, token(key, RELAYED), Interest::READABLE)?;
    registry.register(dial, token(key, DIAL), Interest::READABLE)
}

/// Tells a connection that never became an app why, in one write (its send
/// buffer is empty), before it is dropped.
fn refuse_unregistered(stream: &TcpStream, reason: &str) {
    // Whatever the write's outcome, the connection is dropped next.
    let _ = write_slice(stream, error_line(reason).as_bytes());
}
