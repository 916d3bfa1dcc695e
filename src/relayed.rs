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
use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::Duration;

use crate::protocol::{LineReader, RelayLine, parse_relay_line, port_request_line};

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
    /// The next line from the relay, blocking.
    fn next_line(&mut self) -> io::Result<String> {
        let mut buf = [0u8; 512];
        loop {
            if let Some(line) = self.pending.pop_front() {
                return Ok(line);
            }
            if self.lost {
                return Err(lost());
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

fn lost() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "the relay closed the control connection",
    )
}

impl RelayedApp {
    /// Registers with the relay at `relay` (its registration port) and takes
    /// whatever relayed port it assigns. Blocks at most about 10 s.
    pub fn register(relay: impl ToSocketAddrs) -> io::Result<RelayedApp> {
        Self::connect(relay, None)
    }

    /// Registers and asks for relayed port `port` (the protocol's `port`
    /// extension). Fails with the relay's reason if it cannot grant it, or
    /// if the relay does not answer (the original relay does not know the
    /// extension).
    pub fn register_on_port(relay: impl ToSocketAddrs, port: u16) -> io::Result<RelayedApp> {
        Self::connect(relay, Some(port))
    }

    fn connect(relay: impl ToSocketAddrs, port: Option<u16>) -> io::Result<RelayedApp> {
        let mut last = io::Error::new(
            io::ErrorKind::InvalidInput,
            "relay address resolves to nothing",
        );
        for addr in relay.to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, TIMEOUT) {
                Ok(stream) => return Self::handshake(stream, addr, port),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Reads the established line (and, after a port request, the relay's
    /// answer). Dial lines that arrive meanwhile are kept for `accept`.
    fn handshake(
        stream: TcpStream,
        relay: SocketAddr,
        port: Option<u16>,
    ) -> io::Result<RelayedApp> {
        use std::io::Write;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        if let Some(port) = port {
            (&stream).write_all(port_request_line(port).as_bytes())?;
        }
        let mut control = Control {
            stream,
            lines: LineReader::new(),
            pending: VecDeque::new(),
            lost: false,
        };
        let needed = if port.is_some() { 2 } else { 1 };
        let mut seen = 0;
        let mut dials = VecDeque::new();
        let relayed_port = loop {
            let line = control.next_line().map_err(|e| match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the relay did not register us in time",
                ),
                _ => e,
            })?;
            match parse_relay_line(&line) {
                Ok(RelayLine::Established(p)) => {
                    seen += 1;
                    if seen == needed {
                        break p;
                    }
                }
                Ok(RelayLine::Dial(_)) => dials.push_back(line),
                Ok(RelayLine::Error(reason)) => {
                    return Err(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        format!("the relay refused: {reason}"),
                    ));
                }
                Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
            }
        };
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
            let line = control.next_line()?;
            match parse_relay_line(&line) {
                Ok(RelayLine::Dial(port)) => {
                    drop(control);
                    let addr = SocketAddr::new(self.relay.ip(), port);
                    let stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
                    stream.set_nodelay(true)?;
                    return Ok(stream);
                }
                Ok(RelayLine::Error(reason)) => {
                    return Err(io::Error::other(format!("the relay said: {reason}")));
                }
                // Another established line, or one we do not know: not a client.
                Ok(RelayLine::Established(_)) | Err(_) => continue,
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
