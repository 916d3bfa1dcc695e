//! The relay's entries: what each connection is, by phase, and the data
//! each phase owns. The card's path comes first (an app, a client waiting
//! for its dial-in, a pipe); the extensions' states (`auth`, `ready`) hold
//! data defined in their own modules.
//!
//! ```text
//!  app connects ──► App ── EOF, reset, bad line, refused request ──► closed
//!                   (its listeners and waiting clients close with it)
//!
//!  client connects ──► AwaitingDialIn ──(dial-in paired)──► Piping ──► closed
//!                           ▲    └── dial-in timeout / app gone ──► closed
//!                           └── (ready) its ready dial-in lost on trial ─┘
//! ```
//!
//! A pipe done while its peers have not acknowledged every byte stays
//! `Flushing` until they have (`Piping ─► Flushing ─► closed`; see
//! `crate::flush`).
//!
//! With a secret (`auth`): `Authenticating ─(right answer)─► App`, and a
//! dial-in is `Presenting` its token until it joins its client's entry.
//! With ready dial-ins (`ready`): a dial-in waits in `Standby` until a
//! client joins its entry (`Standby ─► Piping`). From a trusted balancer
//! (`proxy`): a client is `Unwrapping` until its PROXY header is read, then
//! admitted as if it had connected itself.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::{Instant, SystemTime};

use mio::event::Event;
use mio::net::{TcpListener, TcpStream};

use super::access::AppAccess;
use super::auth::{Applicant, Presenter};
use super::proxy::Unwrap;
use super::ready::{ReadyPool, Spare};
use crate::access::{AllowList, RateLimit};
use crate::auth::DialToken;
use crate::buffer::Buffer;
use crate::flush::Flush;
use crate::ops::server::StatusConn;
use crate::pipe::{Endpoint, Flow, Pipe};
use crate::protocol::{AppLine, LineReader, ProtocolError, parse_app_line};
use crate::proxy_protocol::ProxyVersion;
use crate::sockio::{Io, read_slice, write_slice};
use crate::table::{Id, State};

/// Most control bytes queued toward one app. A dial line is at most 40
/// bytes (with a token), so this holds hundreds of requests; an app that
/// reads none of them has its new clients refused rather than growing this
/// without bound.
pub(super) const OUTBOX_MAX: usize = 16 * 1024;

/// Control reads per event before yielding to other sockets.
const CONTROL_READ_BUDGET: usize = 8;

/// One entry of the relay's table.
pub(super) enum RelayConn {
    /// An app: its control connection and the two listeners opened for it.
    /// Boxed: an app is the largest state by far, and every entry of the
    /// table (mostly clients and pipes) is as large as its largest state.
    App(Box<App>),
    /// A client accepted on a relayed port, waiting for its app's dial-in.
    /// Its bytes wait in the kernel: nothing is read until there is a peer.
    AwaitingDialIn(Waiting),
    /// A client and its dial-in, piped both ways.
    Piping(Piped),
    /// A finished pipe whose peers have not acknowledged every byte yet
    /// (see `crate::flush`); counted as a pipe until they have.
    Flushing(Flushing),
    /// (`auth`) An app that must answer the challenge before it gets a port.
    /// Boxed, as an app is: a control connection is larger than a pipe.
    Authenticating(Box<Applicant>),
    /// (`auth`) A dial-in that must present its client's token first.
    Presenting(Presenter),
    /// (`ready`) A dial-in kept ready for the next client.
    Standby(Spare),
    /// (`proxy`) A client from a trusted balancer, its PROXY header (which
    /// names the real client) not read yet.
    Unwrapping(Unwrap),
    /// (`status`) A connection to the status endpoint (`--metrics`).
    Observer(StatusConn),
    /// Placeholder for the instant of a transition; never seen by a handler.
    Vacant,
}

/// Census buckets, by state.
pub(super) const APPS: usize = 0;
pub(super) const WAITING: usize = 1;
pub(super) const PIPES: usize = 2;
pub(super) const APPLICANTS: usize = 3;
pub(super) const PRESENTING: usize = 4;
pub(super) const SPARES: usize = 5;
pub(super) const UNWRAPPING: usize = 6;
pub(super) const OBSERVERS: usize = 7;

impl State for RelayConn {
    type Ending = Ending;
    const KINDS: usize = 8;

    fn placeholder() -> Self {
        RelayConn::Vacant
    }

    fn name(&self) -> &'static str {
        match self {
            RelayConn::App(_) => "App",
            RelayConn::AwaitingDialIn(_) => "AwaitingDialIn",
            RelayConn::Piping(_) => "Piping",
            RelayConn::Flushing(_) => "Flushing",
            RelayConn::Authenticating(_) => "Authenticating",
            RelayConn::Presenting(_) => "Presenting",
            RelayConn::Standby(_) => "Standby",
            RelayConn::Unwrapping(_) => "Unwrapping",
            RelayConn::Observer(_) => "Observer",
            RelayConn::Vacant => "Vacant",
        }
    }

    fn kind(&self) -> Option<usize> {
        match self {
            RelayConn::App(_) => Some(APPS),
            RelayConn::AwaitingDialIn(_) => Some(WAITING),
            RelayConn::Piping(_) | RelayConn::Flushing(_) => Some(PIPES),
            RelayConn::Authenticating(_) => Some(APPLICANTS),
            RelayConn::Presenting(_) => Some(PRESENTING),
            RelayConn::Standby(_) => Some(SPARES),
            RelayConn::Unwrapping(_) => Some(UNWRAPPING),
            RelayConn::Observer(_) => Some(OBSERVERS),
            RelayConn::Vacant => None,
        }
    }

    /// Peer sockets, for the connection limit (listeners not counted, nor
    /// status connections, which have a cap of their own).
    fn sockets(&self) -> usize {
        match self {
            RelayConn::Piping(_) | RelayConn::Flushing(_) => 2,
            RelayConn::Vacant | RelayConn::Observer(_) => 0,
            RelayConn::App(_)
            | RelayConn::AwaitingDialIn(_)
            | RelayConn::Authenticating(_)
            | RelayConn::Presenting(_)
            | RelayConn::Standby(_)
            | RelayConn::Unwrapping(_) => 1,
        }
    }
}

impl RelayConn {
    /// The app, if this entry is one.
    pub(super) fn app(&self) -> Option<&App> {
        match self {
            RelayConn::App(app) => Some(app),
            _ => None,
        }
    }

    /// The app, if this entry is one.
    pub(super) fn app_mut(&mut self) -> Option<&mut App> {
        match self {
            RelayConn::App(app) => Some(app),
            _ => None,
        }
    }
}

/// Sockets of an app entry, by sub-token (an authenticating app has only
/// its control connection, under the same sub-token).
pub(super) const CONTROL: usize = 0;
pub(super) const RELAYED: usize = 1;
pub(super) const DIAL: usize = 2;

/// Sockets of a client entry, by sub-token. A ready dial-in's entry holds
/// its socket at `DIAL_IN` too, so that a client can join it.
pub(super) const CLIENT: usize = 0;
pub(super) const DIAL_IN: usize = 1;

/// A presenting dial-in is an entry of its own, its socket alone.
pub(super) const PRESENTER: usize = 0;

/// An app's control connection: software readiness, line framing and a
/// bounded outbox. Shared by the authenticating and registered phases.
pub(super) struct ControlConn {
    pub(super) stream: TcpStream, // the connection the app registered on
    pub(super) peer: SocketAddr,  // where it came from
    readable: bool,               // read half ready (software readiness)
    writable: bool,               // write half ready
    lines: LineReader,            // frames what the app sends
    outbox: Vec<u8>,              // bytes not yet written, at most OUTBOX_MAX
}

impl ControlConn {
    /// A fresh control connection; both halves start out ready.
    pub(super) fn new(stream: TcpStream, peer: SocketAddr, max_line: usize) -> Self {
        ControlConn {
            stream,
            peer,
            readable: true,
            writable: true,
            lines: LineReader::with_limit(max_line),
            outbox: Vec::new(),
        }
    }

    /// Records a control-connection event.
    pub(super) fn note(&mut self, event: &Event) {
        self.readable |= event.is_readable() || event.is_read_closed() || event.is_error();
        self.writable |= event.is_writable() || event.is_write_closed() || event.is_error();
    }

    /// Whether one more line of `len` bytes fits in the outbox.
    pub(super) fn has_room(&self, len: usize) -> bool {
        self.outbox.len() + len <= OUTBOX_MAX
    }

    /// Queues a control line; the caller flushes (the writable invariant).
    pub(super) fn queue(&mut self, line: &str) {
        self.outbox.extend_from_slice(line.as_bytes());
    }

    /// Writes queued bytes until done or the socket is full.
    pub(super) fn flush(&mut self) -> Result<(), Ending> {
        while self.writable && !self.outbox.is_empty() {
            match write_slice(&self.stream, &self.outbox) {
                Io::Moved(n) => {
                    self.outbox.drain(..n);
                }
                Io::WouldBlock => self.writable = false,
                Io::Eof | Io::Reset => return Err(Ending::Gone),
                Io::Failed(e) => return Err(Ending::Failed(e)),
            }
        }
        Ok(())
    }

    /// Whether every queued byte has been written.
    pub(super) fn flushed(&self) -> bool {
        self.outbox.is_empty()
    }

    /// Reads what the app sent, handing each complete line to `on_line`.
    /// A line past the length bound ends the app; so do EOF and reset.
    pub(super) fn read_lines(&mut self, mut on_line: impl FnMut(&str)) -> Result<Flow, Ending> {
        let mut buf = [0u8; 512];
        for _ in 0..CONTROL_READ_BUDGET {
            if !self.readable {
                return Ok(Flow::Idle);
            }
            match read_slice(&self.stream, &mut buf) {
                Io::Moved(n) => self
                    .lines
                    .feed(&buf[..n], &mut on_line)
                    .map_err(Ending::Protocol)?,
                Io::WouldBlock => self.readable = false,
                Io::Eof | Io::Reset => return Err(Ending::Gone),
                Io::Failed(e) => return Err(Ending::Failed(e)),
            }
        }
        Ok(if self.readable {
            Flow::More
        } else {
            Flow::Idle
        })
    }
}

/// A registered app: its control connection and the two listeners opened
/// for it. They live and die together (invariant *An app owns its ports*).
pub(super) struct App {
    pub(super) control: ControlConn,    // the connection it registered on
    pub(super) relayed: TcpListener,    // the public port clients connect to
    pub(super) relayed_port: u16,       // its number, announced in the established line
    pub(super) dial: TcpListener,       // where the app dials in, one connection per client
    pub(super) dial_port: u16,          // its number, sent in every dial line
    pub(super) waiting: VecDeque<Id>,   // clients awaiting a dial-in, oldest first
    pub(super) unasked: usize,          // the newest of them, not asked for yet (pacing)
    pub(super) asks: VecDeque<Instant>, // deadlines of dial lines sent for clients, oldest first
    pub(super) refusing: bool,          // clients are being refused (logged once per episode)
    pub(super) requests: Requests,      // what the app asked for, not yet acted on
    pub(super) presenting: usize,       // (auth) its dial-ins presenting their token
    pub(super) ready: ReadyPool,        // (ready) its ready dial-ins
    pub(super) proxy: Option<ProxyVersion>, // (proxy) the header its dial-ins begin with
    pub(super) access: Option<Box<AppAccess>>, // (access) its own allow-list and rate limit, if it asked
    pub(super) pipes: usize,                   // (status) its clients being piped
    pub(super) bytes: (u64, u64),              // (status) bytes relayed to it, and from it
    pub(super) since: SystemTime,              // (status) when it registered
}

impl App {
    /// A new app on its freshly opened listeners.
    pub(super) fn new(
        control: ControlConn,
        (relayed, dial): (TcpListener, TcpListener),
        (relayed_port, dial_port): (u16, u16),
    ) -> Box<Self> {
        Box::new(App {
            control,
            relayed,
            relayed_port,
            dial,
            dial_port,
            waiting: VecDeque::new(),
            unasked: 0,
            asks: VecDeque::new(),
            refusing: false,
            requests: Requests::default(),
            presenting: 0,
            ready: ReadyPool::default(),
            proxy: None,
            access: None,
            pipes: 0,
            bytes: (0, 0),
            since: SystemTime::now(),
        })
    }

    /// When the app's timer should fire: the deadline of the oldest dial
    /// line still unanswered, or the ready pool's next deadline.
    pub(super) fn next_deadline(&self) -> Option<Instant> {
        crate::reactor::earliest(self.asks.front().copied(), self.ready.next_deadline())
    }

    /// Dial lines sent and not answered by a dial-in yet: at most what the
    /// dial-in listener's backlog holds (invariant *A dial-in is never
    /// dropped*).
    pub(super) fn asks_out(&self) -> usize {
        self.asks.len() + self.ready.asks.len()
    }

    /// Dial-ins this app has been promised room for: those asked for and
    /// those of waiting clients still to be asked (invariant *Promised room
    /// is kept*).
    pub(super) fn reservations(&self) -> usize {
        self.asks_out() + self.unasked
    }

    /// Takes one waiting client out of the queue; returns whether its dial
    /// line had not been sent yet (then its promised dial-in is not needed).
    pub(super) fn unqueue(&mut self, client: Id) -> Option<bool> {
        let at = self.waiting.iter().position(|&k| k == client)?;
        let unasked = at >= self.waiting.len() - self.unasked;
        self.waiting.remove(at);
        if unasked {
            self.unasked -= 1;
        }
        Some(unasked)
    }

    /// Reads what the app sent into `requests`.
    pub(super) fn read_control(&mut self) -> Result<Flow, Ending> {
        let (peer, requests) = (self.control.peer, &mut self.requests);
        self.control.read_lines(|line| requests.take(line, peer))
    }
}

/// Requests an app made and the relay has not acted on yet. The original
/// protocol has no app-to-relay lines; the extensions are `port`, `ready`,
/// `proxy`, `allow` and `rate`. Other lines are counted and ignored (the
/// first is logged).
#[derive(Default)]
pub(super) struct Requests {
    pub(super) port: Option<Result<u16, ProtocolError>>, // `port N` (the last one wins)
    pub(super) ready: Option<Result<usize, ProtocolError>>, // `ready N` (the last one wins)
    pub(super) proxy: Option<Result<ProxyVersion, ProtocolError>>, // `proxy vN` (the last one wins)
    pub(super) allow: Option<Result<AllowList, ProtocolError>>, // `allow CIDR,...` (the last one wins)
    pub(super) rate: Option<Result<RateLimit, ProtocolError>>,  // `rate N/s B` (the last one wins)
    ignored: u64,                                               // lines this relay does not know
}

impl Requests {
    /// Takes one line from the app.
    pub(super) fn take(&mut self, line: &str, peer: SocketAddr) {
        match parse_app_line(line) {
            Ok(AppLine::Port(port)) => self.port = Some(Ok(port)),
            Ok(AppLine::Ready(n)) => self.ready = Some(Ok(n)),
            Ok(AppLine::Proxy(version)) => self.proxy = Some(Ok(version)),
            Ok(AppLine::Allow(list)) => self.allow = Some(Ok(list)),
            Ok(AppLine::Rate(limit)) => self.rate = Some(Ok(limit)),
            Err(e) if line.starts_with("port ") => self.port = Some(Err(e)),
            Err(e) if line.starts_with("allow ") => self.allow = Some(Err(e)),
            Err(e) if line.starts_with("rate ") => self.rate = Some(Err(e)),
            Err(e) if line.starts_with("ready ") => self.ready = Some(Err(e)),
            Err(e) if line.starts_with("proxy ") => self.proxy = Some(Err(e)),
            Ok(AppLine::Auth(_) | AppLine::Other) | Err(_) => {
                if self.ignored == 0 {
                    log::info!(
                        "app {peer} sent {line:.64?}; ignored (not a line this relay knows)"
                    );
                }
                self.ignored += 1;
            }
        }
    }
}

/// A client accepted on a relayed port, waiting for its app's dial-in.
pub(super) struct Waiting {
    pub(super) client: Endpoint,         // its socket; not read until paired
    pub(super) peer: SocketAddr,         // for logs
    pub(super) app: Id,                  // its app
    pub(super) token: Option<DialToken>, // what its dial-in must present (with a secret)
    pub(super) replay: Option<Buffer>,   // (ready) bytes it sent to a dial-in lost on trial
    pub(super) since: Instant,           // (status) when it arrived, for the pairing time
}

impl Waiting {
    /// A socket error while waiting (e.g. the client reset): the client is
    /// gone and must not be paired.
    pub(super) fn failed(&self) -> Option<io::Error> {
        self.client.stream.take_error().unwrap_or_else(Some)
    }
}

/// A client and its dial-in, piped; with what the idle timer needs.
pub(super) struct Piped {
    pub(super) pipe: Pipe,          // the sockets and their directions
    pub(super) peer: SocketAddr,    // the client's address, for logs
    pub(super) app: Id,             // the app it was paired through
    pub(super) trial: Option<Id>,   // (ready) the app whose ready dial-in it got, while on trial
    pub(super) last_moved: Instant, // when bytes last moved (either way)
    pub(super) moved: (u64, u64),   // bytes moved so far each way, to notice movement
    pub(super) timer_armed: bool,   // the half-close idle timer is pending
}

impl Piped {
    /// A new pipe of app `app`, nothing moved yet; `on_trial` when the
    /// dial-in is a ready one (see `Pipe::on_trial`).
    pub(super) fn new(pipe: Pipe, peer: SocketAddr, app: Id, on_trial: bool, now: Instant) -> Self {
        Piped {
            pipe,
            peer,
            app,
            trial: on_trial.then_some(app),
            last_moved: now,
            moved: (0, 0),
            timer_armed: false,
        }
    }
}

/// A finished pipe's sockets, kept until their peers have every byte.
pub(super) struct Flushing {
    pub(super) flush: Flush, // the client's socket, then the dial-in's
    pub(super) app: Id,      // the app it was paired through
}

/// Why an entry closes; decides log level and FIN versus RST.
#[derive(Debug)]
pub(super) enum Ending {
    /// Both ways finished in order.
    Done,
    /// The peer closed or reset.
    Gone,
    /// A pipe's peer reset: the other side gets a reset too.
    Reset,
    /// A socket error other than a reset.
    Failed(io::Error),
    /// The peer broke the line protocol.
    Protocol(ProtocolError),
    /// Its deadline passed (dial-in, authentication, token, idle half-close).
    TimedOut,
    /// The client's app closed before a dial-in came.
    AppGone,
    /// The app's request or credentials were refused (it was told why).
    Refused,
    /// The relay is shutting down.
    Shutdown,
}

impl Ending {
    /// Whether the other side of a pair must see a reset, not an orderly end.
    pub(super) fn is_abort(&self) -> bool {
        matches!(
            self,
            Ending::Reset | Ending::Failed(_) | Ending::TimedOut | Ending::Shutdown
        )
    }
}

impl fmt::Display for Ending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ending::Done => f.write_str("finished"),
            Ending::Gone => f.write_str("closed by peer"),
            Ending::Reset => f.write_str("reset by peer"),
            Ending::Failed(e) => write!(f, "error: {e}"),
            Ending::Protocol(e) => write!(f, "protocol error: {e}"),
            Ending::TimedOut => f.write_str("timed out"),
            Ending::AppGone => f.write_str("its app went away"),
            Ending::Refused => f.write_str("refused"),
            Ending::Shutdown => f.write_str("relay shutting down"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every entry of the table is as large as the largest state, and most
    /// entries are clients: a state larger than a pipe costs every client
    /// (an app is boxed for this).
    #[test]
    fn an_entry_is_no_larger_than_a_pipe() {
        let (entry, pipe) = (size_of::<RelayConn>(), size_of::<Piped>());
        assert!(
            entry <= pipe + size_of::<usize>(),
            "{entry} B, a pipe {pipe} B"
        );
    }
}
