//! The `auth` extension (`serve --secret`): an app proves it knows the
//! secret before it gets a port (`Authenticating`), and every dial-in
//! presents the one-time token of the client it was made for
//! (`Presenting`). The cryptography is in [`crate::auth`].

use std::net::SocketAddr;
use std::time::Instant;

use mio::Interest;
use mio::net::TcpStream;

use super::core::RelayCore;
use super::state::{App, CONTROL, ControlConn, DIAL, PRESENTER, RELAYED, RelayConn, Requests};
use super::status::{Listener, Refused};
use crate::auth::{self, DialToken, NONCE_LEN, TOKEN_LINE_LEN};
use crate::pipe::Flow;
use crate::protocol::{
    AppLine, Refusal, challenge_line, established_line, parse_app_line, parse_token_line,
};
use crate::reactor;
use crate::sockio::{Io, no_delay, read_slice, reset_on_close};
use crate::table::Id;

use super::state::Ending;

/// An app that has been challenged and has not answered yet.
pub(super) struct Applicant {
    pub(super) control: ControlConn,      // its control connection
    pub(super) nonce: [u8; NONCE_LEN],    // the challenge it must answer
    pub(super) answered: Option<Vec<u8>>, // its `auth` answer, once read
    pub(super) early: Requests,           // requests sent right after the answer
}

/// A dial-in reading its token line, byte-exact: nothing after the line is
/// consumed, so bytes the app sends right behind it reach the client.
pub(super) struct Presenter {
    pub(super) stream: TcpStream,          // the dial-in
    pub(super) peer: SocketAddr,           // for logs
    pub(super) app: Id,                    // the app it dialled
    pub(super) line: [u8; TOKEN_LINE_LEN], // the token line so far
    pub(super) got: usize,                 // bytes of it read
}

impl RelayCore {
    /// Sends a fresh nonce; the app has `register_timeout` to answer.
    pub(super) fn challenge(&mut self, mut control: ControlConn, now: Instant) {
        let nonce = match auth::random::<NONCE_LEN>() {
            Ok(nonce) => nonce,
            Err(e) => return log::error!("app {} dropped: {e}", control.peer),
        };
        control.queue(&challenge_line(&nonce));
        let inserted = self.table.insert(|id, registry| {
            let interest = Interest::READABLE | Interest::WRITABLE;
            registry.register(&mut control.stream, id.token(CONTROL), interest)?;
            Ok(RelayConn::Authenticating(Box::new(Applicant {
                control,
                nonce,
                answered: None,
                early: Requests::default(),
            })))
        });
        match inserted {
            Ok(id) => {
                self.table.arm(id, now + self.config.register_timeout);
                self.serve_applicant(id, now);
            }
            Err(e) => log::warn!("app dropped: cannot register its socket: {e}"),
        }
    }

    /// Writes the challenge and reads the answer; judges it once complete.
    pub(super) fn serve_applicant(&mut self, id: Id, now: Instant) {
        let Some(RelayConn::Authenticating(applicant)) = self.table.get_mut(id) else {
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
            Err(ending) => return self.close(id, ending),
            Ok(Flow::More) => self.table.requeue(id, CONTROL),
            Ok(Flow::Idle | Flow::Done) => {}
        }
        if let Some(answer) = answer {
            self.judge(id, &answer, now);
        }
    }

    /// Admits an app whose answer is right (Authenticating => App, on its
    /// freshly opened ports); refuses one whose answer is not.
    fn judge(&mut self, id: Id, answer: &[u8], now: Instant) {
        let Some(RelayConn::Authenticating(applicant)) = self.table.get(id) else {
            return;
        };
        let secret = self.config.secret.as_ref().map_or(&[][..], |s| &s.0[..]);
        if !auth::verify(secret, &applicant.nonce, answer) {
            self.metrics.auth_failures += 1;
            self.metrics.refused(Listener::Registration, Refused::Auth);
            return self.refuse(id, Refusal::SecretRefused);
        }
        let (mut listeners, ports) = match self.open_listeners() {
            Ok(opened) => opened,
            Err(e) => return self.refuse(id, Refusal::NoRelayedPort(e.to_string())),
        };
        let registry = self.table.registry();
        let registered = registry
            .register(&mut listeners.0, id.token(RELAYED), Interest::READABLE)
            .and_then(|()| registry.register(&mut listeners.1, id.token(DIAL), Interest::READABLE));
        if let Err(e) = registered {
            return self.refuse(id, Refusal::NoRelayedPort(e.to_string()));
        }
        self.table.transition(id, |conn| match conn {
            RelayConn::Authenticating(applicant) => {
                let applicant = *applicant;
                let mut app = App::new(applicant.control, listeners, ports);
                app.control.queue(&established_line(ports.0));
                app.requests = applicant.early;
                RelayConn::App(app)
            }
            other => other,
        });
        self.registered(id, now);
    }

    /// A dial-in that must present its token: an entry of its own until
    /// the token is read, under the registration timeout.
    pub(super) fn present(
        &mut self,
        app: Id,
        mut stream: TcpStream,
        peer: SocketAddr,
        now: Instant,
    ) {
        let inserted = self.table.insert(|id, registry| {
            registry.register(&mut stream, id.token(PRESENTER), Interest::READABLE)?;
            Ok(RelayConn::Presenting(Presenter {
                stream,
                peer,
                app,
                line: [0; TOKEN_LINE_LEN],
                got: 0,
            }))
        });
        if let Ok(id) = inserted {
            if let Some(app) = self.app_mut(app) {
                app.presenting += 1;
            }
            self.table.arm(id, now + self.config.register_timeout);
            self.read_token(id, now);
        }
    }

    /// A presenting dial-in closed: it no longer counts for its app.
    pub(super) fn retire_presenter(&mut self, mut presenter: Presenter) {
        self.presented(presenter.app);
        reset_on_close(&presenter.stream);
        reactor::forget(self.table.registry(), &mut presenter.stream);
    }

    /// A presenting dial-in of `app` resolved (paired, kept or closed).
    fn presented(&mut self, app: Id) {
        if let Some(app) = self.app_mut(app) {
            app.presenting = app.presenting.saturating_sub(1);
        }
    }

    /// Reads a presenting dial-in's token line, never a byte past it (bytes
    /// the app sends right behind it belong to the client); then pairs it
    /// with the one client the token was made for, keeps it ready if it
    /// was asked for as a ready dial-in, or closes it.
    pub(super) fn read_token(&mut self, id: Id, now: Instant) {
        let Some(RelayConn::Presenting(presenter)) = self.table.get_mut(id) else {
            return;
        };
        while presenter.got < TOKEN_LINE_LEN {
            match read_slice(&presenter.stream, &mut presenter.line[presenter.got..]) {
                Io::Moved(n) => presenter.got += n,
                Io::WouldBlock => return,
                Io::Eof | Io::Reset | Io::Failed(_) => return self.close(id, Ending::Gone),
            }
        }
        let (app, peer) = (presenter.app, presenter.peer);
        let Some(token) = parse_token_line(&presenter.line) else {
            log::debug!("dial-in from {peer} refused: not a token");
            self.metrics.refused(Listener::DialIn, Refused::Token);
            return self.close(id, Ending::Refused);
        };
        let client = self.claim(app, &token);
        if client.is_none() && !self.claim_spare(app, &token) {
            log::debug!("dial-in from {peer} refused: wrong or used token");
            self.metrics.refused(Listener::DialIn, Refused::Token);
            return self.close(id, Ending::Refused);
        }
        self.admit_presenter(id, app, client, now);
    }

    /// Moves a dial-in whose token was good out of its own entry: to its
    /// client's, or to a ready dial-in's of its own.
    fn admit_presenter(&mut self, id: Id, app: Id, client: Option<Id>, now: Instant) {
        let Some(RelayConn::Presenting(presenter)) = self.table.take(id) else {
            return;
        };
        self.table.close(id, Ending::Done);
        self.presented(app);
        no_delay(&presenter.stream);
        match client {
            Some(client) => self.pair(client, presenter.stream, true, now),
            None => self.stand_by(app, presenter.stream, true, now),
        }
        if self.app(app).is_some() {
            self.ask_for_waiting(app, now);
        }
    }

    /// Removes and returns the waiting client of `app` whose token is
    /// `token` (a token is good once), taking its ask as answered.
    fn claim(&mut self, app: Id, token: &DialToken) -> Option<Id> {
        let waiting = &self.app(app)?.waiting;
        let client = waiting.iter().copied().find(|&k| {
            matches!(self.table.get(k), Some(RelayConn::AwaitingDialIn(w)) if w.token.is_some_and(|t| t.matches(token)))
        })?;
        self.unqueue_waiting(app, client);
        self.answer_ask(app, true);
        Some(client)
    }
}
