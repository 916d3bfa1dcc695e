//! The relay's connection states: what each slab entry is, and the data each
//! phase owns.
//!
//! ```text
//!  app connects ──► Registering ──(established line written)──► Registered
//!                        │                                          │
//!                        └──── control EOF / reset / bad line ──────┴──► closed
//!                                                                  (closes its listeners
//!                                                                   and waiting clients)
//!
//!  client connects ──► AwaitingDialIn ──(dial-in from the app)──► Piping ──► closed
//!                           │                                        (both ways done,
//!                           └── dial-in timeout / app gone ──► closed  or a reset)
//! ```
//!
//! `Closed` is only a placeholder: it fills a slot for the instant a
//! transition moves the old state's data into the new one.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::SocketAddr;

use mio::event::Event;
use mio::net::{TcpListener, TcpStream};

use crate::pipe::{Endpoint, Flow, Pipe};
use crate::protocol::{AppLine, LineReader, ProtocolError, parse_app_line};
use crate::sockio::{Io, read_slice, write_slice};

/// Most control bytes queued toward one app. A dial line is at most six
/// bytes, so this holds thousands of requests; an app that reads none of
/// them has its new clients refused rather than growing this without bound.
pub const OUTBOX_MAX: usize = 16 * 1024;

/// Control reads per event before yielding to other sockets.
const CONTROL_READ_BUDGET: usize = 8;

/// One slab entry.
pub enum Conn {
    /// An app's control connection whose `established` line is not yet fully
    /// written. Clients may already arrive; their dial lines queue behind it.
    Registering(App),
    /// An app that knows its relayed port.
    Registered(App),
    /// A client accepted on a relayed port, waiting for its app's dial-in.
    /// Its bytes wait in the kernel: we do not read until there is a peer.
    AwaitingDialIn(Waiting),
    /// A client and its dial-in, piped both ways.
    Piping(Pipe),
    /// Placeholder during a transition; never seen by a handler.
    Closed,
}

impl Conn {
    /// The state's name, for transition logs.
    pub fn name(&self) -> &'static str {
        match self {
            Conn::Registering(_) => "Registering",
            Conn::Registered(_) => "Registered",
            Conn::AwaitingDialIn(_) => "AwaitingDialIn",
            Conn::Piping(_) => "Piping",
            Conn::Closed => "Closed",
        }
    }

    /// The app, in either of its phases.
    pub fn app_mut(&mut self) -> Option<&mut App> {
        match self {
            Conn::Registering(app) | Conn::Registered(app) => Some(app),
            _ => None,
        }
    }
}

/// A registered app: its control connection and the two listeners opened
/// for it. They live and die together (invariant *An app owns its ports*).
pub struct App {
    pub control: TcpStream,       // the connection the app registered on
    pub peer: SocketAddr,         // where it came from; dial-ins must share the IP
    pub relayed: TcpListener,     // the public port clients connect to
    pub relayed_port: u16,        // its number, announced in the established line
    pub dial: TcpListener,        // where the app dials in, one connection per client
    pub dial_port: u16,           // its number, sent in every dial line
    pub waiting: VecDeque<usize>, // keys of clients awaiting a dial-in, oldest first
    pub refusing: bool,           // clients are being refused (logged once per episode)
    pub request: Option<Result<u16, ProtocolError>>, // a `port` request not yet answered
    pub refused: bool,            // a request was refused: close once the outbox is out
    readable: bool,               // control read half ready (software readiness)
    writable: bool,               // control write half ready
    lines: LineReader,            // frames what the app sends
    outbox: Vec<u8>,              // control bytes not yet written, at most OUTBOX_MAX
    ignored_lines: u64,           // lines the original protocol has no meaning for
}

impl App {
    /// A new app; both halves of its control connection start out ready.
    pub fn new(
        control: TcpStream,
        peer: SocketAddr,
        relayed: TcpListener,
        dial: TcpListener,
        ports: (u16, u16),
    ) -> Self {
        App {
            control,
            peer,
            relayed,
            relayed_port: ports.0,
            dial,
            dial_port: ports.1,
            waiting: VecDeque::new(),
            refusing: false,
            request: None,
            refused: false,
            readable: true,
            writable: true,
            lines: LineReader::new(),
            outbox: Vec::new(),
            ignored_lines: 0,
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

    /// Whether every queued control byte has been written.
    pub fn flushed(&self) -> bool {
        self.outbox.is_empty()
    }

    /// Writes queued control bytes until done or the socket is full.
    pub fn flush(&mut self) -> Result<(), Ending> {
        while self.writable && !self.outbox.is_empty() {
            match write_slice(&self.control, &self.outbox) {
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

    /// Reads what the app sent. The original protocol has no app-to-relay
    /// lines; a `port` request (the one extension) is kept in `request`,
    /// other lines are counted and ignored (logged once). A line past the
    /// length bound ends the app; so do EOF and reset.
    pub fn read_control(&mut self) -> Result<Flow, Ending> {
        let mut buf = [0u8; 512];
        for _ in 0..CONTROL_READ_BUDGET {
            if !self.readable {
                return Ok(Flow::Idle);
            }
            match read_slice(&self.control, &mut buf) {
                Io::Moved(n) => self.take_lines(&buf[..n])?,
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

    /// Frames what the app sent: a `port` request is kept for the relay to
    /// answer (the last one wins); other lines are counted and ignored.
    fn take_lines(&mut self, data: &[u8]) -> Result<(), Ending> {
        let (peer, ignored, request) = (self.peer, &mut self.ignored_lines, &mut self.request);
        self.lines
            .feed(data, |line| match parse_app_line(line) {
                Ok(AppLine::Port(port)) => *request = Some(Ok(port)),
                Err(e) => *request = Some(Err(e)),
                Ok(AppLine::Other) => {
                    if *ignored == 0 {
                        log::info!(
                            "app {peer} sent {line:.64?}; ignored (not a line this relay knows)"
                        );
                    }
                    *ignored += 1;
                }
            })
            .map_err(Ending::Protocol)
    }
}

/// A client accepted on a relayed port, waiting for its app's dial-in.
pub struct Waiting {
    pub client: Endpoint, // its socket; not read until paired
    pub peer: SocketAddr, // for logs
    pub app: usize,       // slab key of its app
    pub id: u64,          // identity, to recognise this client's timer
}

impl Waiting {
    /// A socket error while waiting (e.g. the client reset): the client is
    /// gone and must not be paired.
    pub fn failed(&self) -> Option<io::Error> {
        self.client.stream.take_error().unwrap_or_else(Some)
    }
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
    /// No dial-in came in time.
    TimedOut,
    /// The client's app closed before a dial-in came.
    AppGone,
    /// The app's request was refused (it was told why).
    Refused,
}

impl Ending {
    /// Whether the other side of a pair must see a reset, not an orderly end.
    pub fn is_abort(&self) -> bool {
        matches!(self, Ending::Reset | Ending::Failed(_))
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
            Ending::TimedOut => f.write_str("no dial-in in time"),
            Ending::AppGone => f.write_str("its app went away"),
            Ending::Refused => f.write_str("its request was refused"),
        }
    }
}
