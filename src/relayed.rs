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

use crate::access::{AllowList, RateLimit};
use crate::auth::DialToken;
use crate::client::{Client, Event, Failure, Registration};
use crate::config::Secret;
use crate::protocol::token_line;
use crate::proxy_protocol::{self, ProxyVersion};

/// How long connecting, registering and each dial-in may take.
const TIMEOUT: Duration = Duration::from_secs(10);

/// An app registered with a relay; clients arrive through
/// [`accept`](RelayedApp::accept) or [`incoming`](RelayedApp::incoming).
pub struct RelayedApp {
    control: Mutex<Control>,     // the registration connection, read by accept()
    relay: SocketAddr,           // the relay's address; dial-ins go to its IP
    relayed_port: u16,           // the public port the relay opened for us
    proxy: Option<ProxyVersion>, // every dial-in begins with a PROXY header
}

/// The control connection and what has been read from it but not yet used.
struct Control {
    stream: TcpStream,        // blocking
    client: Client,           // the protocol: what the relay's bytes mean
    pending: VecDeque<Event>, // events read but not yet handled
    lost: bool,               // the relay closed (or garbled) it; every accept fails now
}

impl Control {
    /// The next event from the relay, blocking; until `deadline`, if given,
    /// however its line trickles in (each read waits only for what is left).
    fn next_event(&mut self, deadline: Option<Instant>) -> io::Result<Event> {
        let mut buf = [0u8; 512];
        loop {
            if let Some(event) = self.pending.pop_front() {
                return Ok(event);
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
            self.pending.extend(self.client.feed(&buf[..n]));
        }
    }

    /// Writes what the client says to send (our greeting) in full.
    fn send(&self, bytes: &[u8]) -> io::Result<()> {
        let mut stream = &self.stream;
        stream.write_all(bytes)
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
    /// Ask the relay to begin every dial-in with a PROXY protocol header
    /// naming its client (the `proxy` extension). [`RelayedApp::accept`]
    /// then reads and removes it, and [`RelayedApp::accept_client`] also
    /// gives the client's address. Registration fails if the relay does not
    /// answer the request.
    pub proxy_protocol: Option<ProxyVersion>,
    /// Ask the relay to admit to our port only clients from these sources
    /// (the `allow` extension), on top of its own `--allow-clients`.
    /// Registration fails if the relay does not answer the request.
    pub allow_clients: Option<AllowList>,
    /// Ask the relay to limit new clients per source address (the `rate`
    /// extension); it applies ours, or its own `--client-rate` where that
    /// is stricter. Registration fails if the relay does not answer.
    pub client_rate: Option<RateLimit>,
}

/// What failing to register (or, with a garbled line, to go on) gives.
fn failed(failure: &Failure) -> io::Error {
    match failure {
        Failure::Refused(_) | Failure::NoSecret => io::Error::new(
            io::ErrorKind::ConnectionRefused,
            format!("the relay refused: {failure}"),
        ),
        Failure::LineTooLong => io::Error::new(io::ErrorKind::InvalidData, failure.to_string()),
    }
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

    /// Runs the registration ([`Client`] has its rules: the challenge
    /// answered, the port request sent, one established line or two after
    /// it) until registered or the deadline. Any line that does not parse
    /// fails it; dial lines meanwhile are kept for `accept`.
    fn handshake(
        stream: TcpStream,
        relay: SocketAddr,
        options: &RegisterOptions,
    ) -> io::Result<RelayedApp> {
        stream.set_nodelay(true)?;
        let deadline = Instant::now() + options.timeout.unwrap_or(TIMEOUT);
        let registration = Registration {
            secret: options.secret.clone(),
            port: options.port,
            ready: 0,
            proxy: options.proxy_protocol,
            allow: options.allow_clients.clone(),
            rate: options.client_rate,
        };
        let mut control = Control {
            stream,
            client: Client::new(registration),
            pending: VecDeque::new(),
            lost: false,
        };
        let mut dials = VecDeque::new();
        let relayed_port = loop {
            match control
                .next_event(Some(deadline))
                .map_err(registration_timeout)?
            {
                Event::Send(bytes) => control.send(&bytes)?,
                Event::Registered(port) => break port,
                dial @ Event::Dial { .. } => dials.push_back(dial),
                Event::Unparsable(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
                // Only reported once registered.
                Event::ExtraEstablished(_) => {}
                Event::Failed(failure) => return Err(failed(&failure)),
            }
        };
        dials.extend(control.pending.drain(..));
        control.pending = dials;
        control.stream.set_read_timeout(None)?;
        Ok(RelayedApp {
            control: Mutex::new(control),
            relay,
            relayed_port,
            proxy: options.proxy_protocol,
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
    /// connection, every call fails with `ConnectionAborted`. With
    /// [`RegisterOptions::proxy_protocol`], the PROXY header is read and
    /// removed first (see [`accept_client`](Self::accept_client) for the
    /// address it names).
    pub fn accept(&self) -> io::Result<TcpStream> {
        self.accept_client().map(RelayedStream::into_stream)
    }

    /// As [`accept`](Self::accept), and with the client's address when the
    /// relay names it (the `proxy` extension, asked for with
    /// [`RegisterOptions::proxy_protocol`]).
    pub fn accept_client(&self) -> io::Result<RelayedStream> {
        let mut stream = self.accept_dial_in()?;
        let client_addr = match self.proxy {
            Some(_) => read_client_addr(&mut stream)?,
            None => None,
        };
        Ok(RelayedStream {
            stream,
            client_addr,
        })
    }

    /// The next client's dial-in, made.
    fn accept_dial_in(&self) -> io::Result<TcpStream> {
        let mut control = self
            .control
            .lock()
            .map_err(|_| io::Error::other("a previous accept panicked"))?;
        loop {
            match control.next_event(None)? {
                Event::Dial { port, token } => {
                    drop(control); // other callers may read while we dial
                    return self.dial_in(port, token);
                }
                // The relay closes the connection next; reading says so.
                Event::Failed(Failure::Refused(refusal)) => {
                    return Err(io::Error::other(format!("the relay said: {refusal}")));
                }
                // The relay's lines can no longer be told apart.
                Event::Failed(failure @ (Failure::LineTooLong | Failure::NoSecret)) => {
                    control.lost = true;
                    return Err(failed(&failure));
                }
                // Nothing to send once registered, but if there were, it is due.
                Event::Send(bytes) => control.send(&bytes)?,
                // Another established line, or one we do not know: not a client.
                Event::Registered(_) | Event::ExtraEstablished(_) | Event::Unparsable(_) => {}
            }
        }
    }

    /// A fresh dial-in for one client: to `port` at the relay's address,
    /// presenting the client's token first if it has one.
    fn dial_in(&self, port: u16, token: Option<DialToken>) -> io::Result<TcpStream> {
        let addr = SocketAddr::new(self.relay.ip(), port);
        let mut stream = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        stream.set_nodelay(true)?;
        if let Some(token) = token {
            stream.write_all(token_line(&token).as_bytes())?;
        }
        Ok(stream)
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

/// Reads the PROXY header that begins a dial-in (and nothing after it), under
/// the dial-in timeout; returns the client's address it names (none for a
/// `LOCAL` or `UNKNOWN` header).
fn read_client_addr(stream: &mut TcpStream) -> io::Result<Option<SocketAddr>> {
    stream.set_read_timeout(Some(TIMEOUT))?;
    let header = proxy_protocol::read_header(stream)?;
    stream.set_read_timeout(None)?;
    Ok(header.source())
}

/// A client's stream from [`RelayedApp::accept_client`], with the client's
/// address when the relay named it. Reads and writes go to the stream; it
/// dereferences to the [`TcpStream`] for everything else.
#[derive(Debug)]
pub struct RelayedStream {
    stream: TcpStream,               // the dial-in, piped to the client
    client_addr: Option<SocketAddr>, // from the PROXY header, if any
}

impl RelayedStream {
    /// The client's address as the relay saw it (or as a balancer in front
    /// of the relay told it), if the relay sent a PROXY header naming one.
    pub fn client_addr(&self) -> Option<SocketAddr> {
        self.client_addr
    }

    /// The plain stream.
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }
}

impl std::ops::Deref for RelayedStream {
    type Target = TcpStream;

    fn deref(&self) -> &TcpStream {
        &self.stream
    }
}

impl std::ops::DerefMut for RelayedStream {
    fn deref_mut(&mut self) -> &mut TcpStream {
        &mut self.stream
    }
}

impl Read for RelayedStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }
}

impl Write for RelayedStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.stream.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.stream.flush()
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
