//! A `TcpListener`-like API for custom apps: register with a relay, then take
//! each client as an ordinary blocking [`std::net::TcpStream`].
//!
//! This is the Rust counterpart of the original relay's `customFunction`:
//! any code that serves a `TcpStream` can be published through a relay.
//!
//! ```no_run
//! use std::io::{Read, Write};
//! use tcp_relay::RelayedApp;
//!
//! # fn main() -> std::io::Result<()> {
//! let app = RelayedApp::register("relay.example.com:8080")?;
//! println!("reachable at {}", app.public_addr());
//! for stream in app.incoming() {
//!     let mut stream = stream?;
//!     std::thread::spawn(move || {
//!         let mut buf = [0; 1024];
//!         while let Ok(n @ 1..) = stream.read(&mut buf) {
//!             let _ = stream.write_all(&buf[..n]);
//!         }
//!     });
//! }
//! # Ok(()) }
//! ```
//!
//! It is deliberately blocking and small: one control connection read by
//! whoever calls [`RelayedApp::accept`], one fresh dial-in per client. For
//! thousands of clients on one thread, use [`crate::Agent`] instead.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::auth;
use crate::config::Secret;
use crate::protocol::{
    LineReader, RelayLine, auth_line, parse_relay_line, port_request_line, token_line,
};

/// How long connecting, registering and each dial-in may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// An app registered with a relay; clients arrive through
/// [`accept`](RelayedApp::accept) or [`incoming`](RelayedApp::incoming).
pub struct RelayedApp {
    control: Mutex<Control>, // the registration connection, read by accept()
    relay: SocketAddr,       // the relay's address; dial-ins go to its IP
    relayed_port: u16,       // the public port the relay opened for us
}

/// The control connection and what has been read from it but not yet used.
struct Control {
    stream: TcpStream,         // blocking
    lines: LineReader,         // frames the relay's lines
    pending: VecDeque<String>, // complete lines not yet handled
    lost: bool,                // the relay closed it; every accept fails now
}

impl Control {
    /// The next line from the relay, blocking; until `deadline`, if given,
    /// however the line trickles in (each read waits only for what is left).
    fn next_line(&mut self, deadline: Option<Instant>) -> io::Result<String> {
        let mut buf = [0u8; 512];
        loop {
            if let Some(line) = self.pending.pop_front() {
                return Ok(line);
            }
            if self.lost {
                return Err(lost());
            }
            if let Some(deadline) = deadline {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(io::ErrorKind::TimedOut.into());
                }
                self.stream.set_read_timeout(Some(left))?;
            }
            let n = match self.stream.read(&mut buf) {
                Ok(0) => {
                    self.lost = true;
                    return Err(lost());
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            let pending = &mut self.pending;
            self.lines
                .feed(&buf[..n], |line| pending.push_back(line.to_owned()))
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        }
    }
}

/// How to register; see [`RelayedApp::register_with`].
#[derive(Debug, Clone, Default)]
pub struct RegisterOptions {
    /// Ask for this relayed port (the `port` extension).
    pub port: Option<u16>,
    /// The relay's shared secret.
    pub secret: Option<Secret>,
    /// How long connecting, and then registering, may each take (default:
    /// 10 s). A relay that answers too slowly, even byte by byte, fails the
    /// registration with `TimedOut`.
    pub timeout: Option<Duration>,
}

/// Answers the relay's first line: `auth` if it challenged us, then `port`
/// if we want one.
fn greet(stream: &TcpStream, nonce: Option<&[u8]>, options: &RegisterOptions) -> io::Result<()> {
    let mut lines = String::new();
    if let Some(nonce) = nonce {
        let Some(secret) = &options.secret else {
            return Err(refused("the relay requires a secret"));
        };
        lines += &auth_line(&auth::response(&secret.0, nonce));
    }
    if let Some(port) = options.port {
        lines += &port_request_line(port);
    }
    let mut stream = stream;
    stream.write_all(lines.as_bytes())
}

fn refused(reason: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionRefused,
        format!("the relay refused: {reason}"),
    )
}

fn registration_timeout(e: io::Error) -> io::Error {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
            io::ErrorKind::TimedOut,
            "the relay did not register us in time",
        ),
        _ => e,
    }
}

fn lost() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "the relay closed the control connection",
    )
}

impl RelayedApp {
    /// Registers with the relay at `relay` (its registration port) and takes
    /// whatever relayed port it assigns. Blocks at most 10 s to connect and
    /// 10 s more to register.
    pub fn register(relay: impl ToSocketAddrs) -> io::Result<RelayedApp> {
        Self::register_with(relay, &RegisterOptions::default())
    }

    /// Registers and asks for relayed port `port` (the protocol's `port`
    /// extension). Fails with the relay's reason if it cannot grant it, or
    /// if the relay does not answer (the original relay does not know the
    /// extension).
    pub fn register_on_port(relay: impl ToSocketAddrs, port: u16) -> io::Result<RelayedApp> {
        let options = RegisterOptions {
            port: Some(port),
            ..RegisterOptions::default()
        };
        Self::register_with(relay, &options)
    }

    /// Registers with every option: a port to ask for, and the relay's
    /// secret (for a relay that challenges; its dial-ins then present the
    /// relay's tokens, which `accept` does for you).
    pub fn register_with(
        relay: impl ToSocketAddrs,
        options: &RegisterOptions,
    ) -> io::Result<RelayedApp> {
        let mut last = io::Error::new(
            io::ErrorKind::InvalidInput,
            "relay address resolves to nothing",
        );
        for addr in relay.to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, options.timeout.unwrap_or(TIMEOUT)) {
                Ok(stream) => return Self::handshake(stream, addr, options),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Answers the relay's first line (the challenge, if any) and sends the
    /// port request, then reads until registered: one established line, or
    /// two after a port request. Dial lines meanwhile are kept for `accept`.
    fn handshake(
        stream: TcpStream,
        relay: SocketAddr,
        options: &RegisterOptions,
    ) -> io::Result<RelayedApp> {
        stream.set_nodelay(true)?;
        let deadline = Instant::now() + options.timeout.unwrap_or(TIMEOUT);
        let mut control = Control {
            stream,
            lines: LineReader::new(),
            pending: VecDeque::new(),
            lost: false,
        };
        let needed = 1 + usize::from(options.port.is_some());
        let (mut seen, mut relayed_port, mut greeted) = (0, 0, false);
        let mut dials = VecDeque::new();
        while seen < needed {
            let line = control
                .next_line(Some(deadline))
                .map_err(registration_timeout)?;
            let parsed = parse_relay_line(&line)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let nonce = match parsed {
                RelayLine::Established(port) => {
                    (seen, relayed_port) = (seen + 1, port);
                    None
                }
                RelayLine::Challenge(nonce) => Some(nonce),
                RelayLine::Dial(..) => {
                    dials.push_back(line);
                    continue;
                }
                RelayLine::Error(reason) => return Err(refused(&reason)),
            };
            if !std::mem::replace(&mut greeted, true) {
                greet(&control.stream, nonce.as_deref(), options)?;
            }
        }
        dials.extend(control.pending.drain(..));
        control.pending = dials;
        control.stream.set_read_timeout(None)?;
        Ok(RelayedApp {
            control: Mutex::new(control),
            relay,
            relayed_port,
        })
    }

    /// The public port the relay opened for this app.
    pub fn relayed_port(&self) -> u16 {
        self.relayed_port
    }

    /// Where clients reach this app: the relay's address with the relayed
    /// port.
    pub fn public_addr(&self) -> SocketAddr {
        SocketAddr::new(self.relay.ip(), self.relayed_port)
    }

    /// Waits for the next client and returns its stream (a fresh dial-in to
    /// the relay, piped to that client). Fails for this client only if its
    /// dial-in cannot be made; once the relay has closed the control
    /// connection, every call fails with `ConnectionAborted`.
    pub fn accept(&self) -> io::Result<TcpStream> {
        let mut control = self
            .control
            .lock()
            .map_err(|_| io::Error::other("a previous accept panicked"))?;
        loop {
            let line = control.next_line(None)?;
            match parse_relay_line(&line) {
                Ok(RelayLine::Dial(port, token)) => {
                    drop(control);
                    let addr = SocketAddr::new(self.relay.ip(), port);
                    let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
                    stream.set_nodelay(true)?;
                    if let Some(token) = token {
                        stream.write_all(token_line(&token).as_bytes())?;
                    }
                    return Ok(stream);
                }
                Ok(RelayLine::Error(reason)) => {
                    return Err(io::Error::other(format!("the relay said: {reason}")));
                }
                // Another established line, or one we do not know: not a client.
                Ok(RelayLine::Established(_) | RelayLine::Challenge(_)) | Err(_) => continue,
            }
        }
    }

    /// An endless iterator of clients, as [`std::net::TcpListener::incoming`];
    /// it ends after yielding the error that says the relay is gone.
    pub fn incoming(&self) -> Incoming<'_> {
        Incoming {
            app: self,
            done: false,
        }
    }
}

/// The clients of a [`RelayedApp`]; see [`RelayedApp::incoming`].
pub struct Incoming<'a> {
    app: &'a RelayedApp,
    done: bool,
}

impl Iterator for Incoming<'_> {
    type Item = io::Result<TcpStream>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        let next = self.app.accept();
        if next.is_err() {
            self.done = self.app.control.lock().map_or(true, |c| c.lost);
        }
        Some(next)
    }
}
