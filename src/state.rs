//! The relay's connection states: what each slab entry is, and the data each
//! phase owns.
//!
//! ```text
//!  app connects ─┬─(secret set)──► Authenticating ──(right answer)──┐
//!                └─(no secret)───────────────────────────────────────┴─► Registering
//!                                                                            │
//!        Registered ◄──────────────── (established line written) ───────────┘
//!  Authenticating / Registering / Registered ── EOF, reset, bad line, wrong
//!        answer, timeout ──► closed (with its listeners and waiting clients)
//!
//!  client connects ──► AwaitingDialIn ──(dial-in paired)──► Piping ──► closed
//!                           └── dial-in timeout / app gone ──► closed
//!
//!  dial-in (secret set) ──► Presenting ──(its client's token)──► moves into
//!                               └── wrong token / timeout ──► closed    that client's entry
//! ```
//!
//! `Closed` is only a placeholder: it fills a slot for the instant a
//! transition moves the old state's data into the new one, or while an entry
//! whose sockets moved elsewhere waits to be reaped.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::time::Instant;

use mio::event::Event;
use mio::net::{TcpListener, TcpStream};

use crate::auth::{DialToken, NONCE_LEN, TOKEN_LINE_LEN};
use crate::buffer::Buffer;
use crate::pipe::{Endpoint, Flow, Pipe, RxState};
use crate::protocol::{AppLine, LineReader, ProtocolError, parse_app_line};
use crate::sockio::{Io, read_slice, write_slice};

/// Most control bytes queued toward one app. A dial line is at most 40
/// bytes (with a token), so this holds hundreds of requests; an app that
/// reads none of them has its new clients refused rather than growing this
/// without bound.
pub const OUTBOX_MAX: usize = 16 * 1024;

/// Control reads per event before yielding to other sockets.
const CONTROL_READ_BUDGET: usize = 8;

/// One slab entry.
pub enum Conn {
    /// An app that must answer the challenge before it gets any port.
    Authenticating(Applicant),
    /// An app's control connection whose `established` line is not yet fully
    /// written. Clients may already arrive; their dial lines queue behind it.
    Registering(App),
    /// An app that knows its relayed port.
    Registered(App),
    /// A client accepted on a relayed port, waiting for its app's dial-in.
    /// Its bytes wait in the kernel: we do not read until there is a peer.
    AwaitingDialIn(Waiting),
    /// A dial-in that must present its client's token first.
    Presenting(Presenter),
    /// A dial-in kept ready for the next client.
    Standby(Spare),
    /// A client and its dial-in, piped both ways.
    Piping(Piped),
    /// Placeholder; never seen by a handler.
    Closed,
}

impl Conn {
    /// The state's name, for transition logs.
    pub fn name(&self) -> &'static str {
        match self {
            Conn::Authenticating(_) => "Authenticating",
            Conn::Registering(_) => "Registering",
            Conn::Registered(_) => "Registered",
            Conn::AwaitingDialIn(_) => "AwaitingDialIn",
            Conn::Presenting(_) => "Presenting",
            Conn::Standby(_) => "Standby",
            Conn::Piping(_) => "Piping",
            Conn::Closed => "Closed",
        }
    }

    /// The app, in either of its registered phases.
    pub fn app(&self) -> Option<&App> {
        match self {
            Conn::Registering(app) | Conn::Registered(app) => Some(app),
            _ => None,
        }
    }

    /// The app, in either of its registered phases.
    pub fn app_mut(&mut self) -> Option<&mut App> {
        match self {
            Conn::Registering(app) | Conn::Registered(app) => Some(app),
            _ => None,
        }
    }

    /// Sockets this entry holds for peers (listeners not counted).
    pub fn peer_sockets(&self) -> usize {
        match self {
            Conn::Piping(_) => 2,
            Conn::Closed => 0,
            _ => 1,
        }
    }
}

/// An app's control connection: software readiness, line framing and a
/// bounded outbox. Shared by the authenticating and registered phases.
pub struct Control {
    pub stream: TcpStream, // the connection the app registered on
    pub peer: SocketAddr,  // where it came from
    readable: bool,        // read half ready (software readiness)
    writable: bool,        // write half ready
    lines: LineReader,     // frames what the app sends
    outbox: Vec<u8>,       // bytes not yet written, at most OUTBOX_MAX
}

impl Control {
    /// A fresh control connection; both halves start out ready.
    pub fn new(stream: TcpStream, peer: SocketAddr, max_line: usize) -> Self {
        Control {
            stream,
            peer,
            readable: true,
            writable: true,
            lines: LineReader::with_limit(max_line),
            outbox: Vec::new(),
        }
    }

    /// Records a control-connection event.
    pub fn note(&mut self, event: &Event) {
        self.readable |= event.is_readable() || event.is_read_closed() || event.is_error();
        self.writable |= event.is_writable() || event.is_write_closed() || event.is_error();
    }

    /// Whether one more line of `len` bytes fits in the outbox.
    pub fn has_room(&self, len: usize) -> bool {
        self.outbox.len() + len <= OUTBOX_MAX
    }

    /// Queues a control line; the caller flushes (the writable invariant).
    pub fn queue(&mut self, line: &str) {
        self.outbox.extend_from_slice(line.as_bytes());
    }

    /// Whether every queued byte has been written.
    pub fn flushed(&self) -> bool {
        self.outbox.is_empty()
    }

    /// Writes queued bytes until done or the socket is full.
    pub fn flush(&mut self) -> Result<(), Ending> {
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

    /// Reads what the app sent, handing each complete line to `on_line`.
    /// A line past the length bound ends the app; so do EOF and reset.
    pub fn read_lines(&mut self, mut on_line: impl FnMut(&str)) -> Result<Flow, Ending> {
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

/// An app that has been challenged and has not answered yet.
pub struct Applicant {
    pub control: Control,          // its control connection
    pub nonce: [u8; NONCE_LEN],    // the challenge it must answer
    pub answered: Option<Vec<u8>>, // its `auth` answer, once read
    pub early: Requests,           // requests sent right after the answer
}

/// Names an app entry from another entry: its slab key, and the app's
/// identity, so that a key whose app has gone and whose slot now holds
/// another app is not mistaken for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppRef {
    pub key: usize, // the app's slab key
    pub id: u64,    // the app's identity (never reused)
}

/// A registered app: its control connection and the two listeners opened
/// for it. They live and die together (invariant *An app owns its ports*).
pub struct App {
    pub id: u64,                        // identity, unique for the relay's life
    pub control: Control,               // the connection it registered on
    pub relayed: TcpListener,           // the public port clients connect to
    pub relayed_port: u16,              // its number, announced in the established line
    pub dial: TcpListener,              // where the app dials in, one connection per client
    pub dial_port: u16,                 // its number, sent in every dial line
    pub waiting: VecDeque<usize>,       // keys of clients awaiting a dial-in, oldest first
    pub unasked: usize,                 // the newest of them, not asked for yet (pacing)
    pub client_asks: VecDeque<Instant>, // deadlines of dial lines sent for clients, oldest first
    pub presenting: usize,              // its dial-ins still presenting their token
    pub refusing: bool,                 // clients are being refused (logged once per episode)
    pub requests: Requests,             // what the app asked for, not yet acted on
    pub ready: usize,                   // dial-ins to keep ready (the `ready` extension)
    pub spares: VecDeque<usize>,        // keys of ready dial-ins, oldest first
    pub spare_asks: VecDeque<Instant>,  // deadlines of dial lines sent for spares, oldest first
    pub spare_tokens: Vec<DialToken>,   // tokens of those lines (with a secret), oldest first
    pub spares_lost: u32,               // ready dial-ins in a row that died young
    pub refill_at: Option<Instant>,     // replacements wait until then (back-off)
}

impl App {
    /// A new app on its freshly opened listeners.
    pub fn new(
        id: u64,
        control: Control,
        (relayed, dial): (TcpListener, TcpListener),
        ports: (u16, u16),
    ) -> Self {
        App {
            id,
            control,
            relayed,
            relayed_port: ports.0,
            dial,
            dial_port: ports.1,
            waiting: VecDeque::new(),
            unasked: 0,
            client_asks: VecDeque::new(),
            presenting: 0,
            refusing: false,
            requests: Requests::default(),
            ready: 0,
            spares: VecDeque::new(),
            spare_asks: VecDeque::new(),
            spare_tokens: Vec::new(),
            spares_lost: 0,
            refill_at: None,
        }
    }

    /// When the app's timer should fire: the end of a refill back-off, or
    /// the deadline of the oldest dial line still unanswered.
    pub fn next_deadline(&self) -> Option<Instant> {
        let asks = crate::reactor::earliest(
            self.client_asks.front().copied(),
            self.spare_asks.front().copied(),
        );
        crate::reactor::earliest(self.refill_at, asks)
    }

    /// Dial lines sent and not answered by a dial-in yet: at most what the
    /// dial-in listener's backlog holds (invariant *A dial-in is never
    /// dropped*).
    pub fn asks_out(&self) -> usize {
        self.client_asks.len() + self.spare_asks.len()
    }

    /// Dial-ins this app has been promised room for: those asked for and
    /// those of waiting clients still to be asked (see `Core::reserved`).
    pub fn reservations(&self) -> usize {
        self.asks_out() + self.unasked
    }

    /// Reads what the app sent into `requests`.
    pub fn read_control(&mut self) -> Result<Flow, Ending> {
        let (peer, requests) = (self.control.peer, &mut self.requests);
        self.control.read_lines(|line| requests.take(line, peer))
    }
}

/// Requests an app made and the relay has not acted on yet. The original
/// protocol has no app-to-relay lines; the extensions are `port` and
/// `ready`. Other lines are counted and ignored (the first is logged).
#[derive(Default)]
pub struct Requests {
    pub port: Option<Result<u16, ProtocolError>>, // `port N` (the last one wins)
    pub ready: Option<Result<usize, ProtocolError>>, // `ready N` (the last one wins)
    ignored: u64,                                 // lines this relay does not know
}

impl Requests {
    /// Takes one line from the app.
    pub fn take(&mut self, line: &str, peer: SocketAddr) {
        match parse_app_line(line) {
            Ok(AppLine::Port(port)) => self.port = Some(Ok(port)),
            Ok(AppLine::Ready(n)) => self.ready = Some(Ok(n)),
            Err(e) if line.starts_with("port ") => self.port = Some(Err(e)),
            Err(e) if line.starts_with("ready ") => self.ready = Some(Err(e)),
            _ => {
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
pub struct Waiting {
    pub client: Endpoint,         // its socket; not read until paired
    pub peer: SocketAddr,         // for logs
    pub app: AppRef,              // its app
    pub token: Option<DialToken>, // what its dial-in must present (with a secret)
    pub replay: Option<Buffer>,   // bytes it sent to a dial-in lost on trial
}

impl Waiting {
    /// A socket error while waiting (e.g. the client reset): the client is
    /// gone and must not be paired.
    pub fn failed(&self) -> Option<io::Error> {
        self.client.stream.take_error().unwrap_or_else(Some)
    }
}

/// A dial-in reading its token line, byte-exact: nothing after the line is
/// consumed, so bytes the app sends right behind it reach the client.
pub struct Presenter {
    pub stream: TcpStream,          // the dial-in
    pub peer: SocketAddr,           // for logs
    pub app: AppRef,                // the app it dialled
    pub line: [u8; TOKEN_LINE_LEN], // the token line so far
    pub got: usize,                 // bytes of it read
}

/// A dial-in kept ready for the next client of its app (the `ready`
/// extension). Not read: bytes a server-first app sends wait in the kernel
/// for the client; only its death is watched for, with `peek`.
pub struct Spare {
    pub stream: TcpStream, // the dial-in
    pub app: AppRef,       // its app
    pub rx: RxState,       // its read half, from every event since it was registered
    pub born: Instant,     // when it arrived, to tell a dial-in that died young
}

/// A client and its dial-in, piped; with what the idle timer needs.
pub struct Piped {
    pub pipe: Pipe,            // the sockets and their directions
    pub peer: SocketAddr,      // the client's address, for logs
    pub trial: Option<AppRef>, // the app whose ready dial-in it got, while on trial
    pub last_moved: Instant,   // when bytes last moved (either way)
    pub moved: u64,            // bytes moved so far, to notice movement
    pub timer_armed: bool,     // the half-close idle timer is pending
}

/// Why an entry closes; decides log level and FIN versus RST.
#[derive(Debug)]
pub enum Ending {
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
    pub fn is_abort(&self) -> bool {
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
