//! The app side: the sample echo app, which registers with a relay, dials in
//! for every client the relay announces, and echoes that client's bytes.
//!
//! It runs on the same reactor ([`crate::reactor`]) and the same
//! [`Direction`](crate::pipe::Direction) code as the relay: one thread, no
//! thread per client, bounded rings, half-close carried (a client that shuts
//! its write half gets every echoed byte, then our FIN).

use std::io::{self, Read};
use std::net::{IpAddr, SocketAddr};
use std::thread;
use std::time::{Duration, Instant};

use mio::event::Event;
use mio::net::TcpStream;
use mio::{Interest, Poll, Registry, Token};
use slab::Slab;

use crate::pipe::{Broken, Echo, Endpoint, Flow};
use crate::pool::BufferPool;
use crate::protocol::{LineReader, MAX_LINE, parse_dial, parse_established};
use crate::reactor::{self, Handler, Stopper, split, token};
use crate::sockio::{Io, keep_alive, read_slice};

/// The control connection's token (fixed; echo tokens are slab keys).
const CONTROL: Token = Token(usize::MAX - 1);

/// How long registration may take: connect, then the established line.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(10);

/// Echo rings: small, since an echo holds at most one ring per client.
const ECHO_BUFFER: usize = 16 * 1024;

/// A sample app registered with a relay, ready to [`run`](EchoApp::run).
pub struct EchoApp {
    poll: Poll,
    stopper: Stopper,
    core: Core,
}

impl EchoApp {
    /// Connects to the relay's registration port and reads the
    /// `established` line (blocking, at most 10 s each).
    pub fn connect(relay: SocketAddr) -> io::Result<EchoApp> {
        let (control, relayed_port) = register(relay)?;
        let poll = Poll::new()?;
        let mut control = TcpStream::from_std(control);
        keep_alive(&control);
        poll.registry()
            .register(&mut control, CONTROL, Interest::READABLE)?;
        let stopper = Stopper::new(&poll)?;
        let core = Core {
            registry: poll.registry().try_clone()?,
            relay_ip: relay.ip(),
            relayed_port,
            control,
            control_readable: true,
            lines: LineReader::new(),
            conns: Slab::new(),
            pool: BufferPool::new(ECHO_BUFFER, 16),
            requeued: Vec::new(),
            closing: Vec::new(),
            ended: None,
            stopper: stopper.clone(),
        };
        Ok(EchoApp {
            poll,
            stopper,
            core,
        })
    }

    /// The public port the relay opened for this app.
    pub fn relayed_port(&self) -> u16 {
        self.core.relayed_port
    }

    /// Stops the app from another thread.
    pub fn stopper(&self) -> Stopper {
        self.stopper.clone()
    }

    /// Serves clients until stopped (`Ok`) or until the relay ends the
    /// control connection (`Err`, saying so).
    pub fn run(mut self) -> io::Result<()> {
        // Lines that arrived with the established line are already readable.
        self.core.serve_control();
        reactor::run(&mut self.poll, &mut self.core, self.stopper.flag())?;
        match self.core.ended.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Runs the app on a thread of its own; it stops when the result drops.
    pub fn spawn(self) -> io::Result<RunningEcho> {
        let stopper = self.stopper();
        let relayed_port = self.relayed_port();
        let thread = thread::Builder::new()
            .name("tcp-relay-echo".into())
            .spawn(move || self.run())?;
        Ok(RunningEcho {
            stopper,
            relayed_port,
            thread: Some(thread),
        })
    }
}

/// An echo app on its own thread; dropping it stops the app.
pub struct RunningEcho {
    stopper: Stopper,
    relayed_port: u16,
    thread: Option<thread::JoinHandle<io::Result<()>>>,
}

impl RunningEcho {
    /// The public port the relay opened for this app.
    pub fn relayed_port(&self) -> u16 {
        self.relayed_port
    }
}

impl Drop for RunningEcho {
    fn drop(&mut self) {
        self.stopper.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Connects and reads the established line, one byte at a time so that no
/// dial line behind it is consumed here (it stays in the socket for the loop).
fn register(relay: SocketAddr) -> io::Result<(std::net::TcpStream, u16)> {
    let mut control = std::net::TcpStream::connect_timeout(&relay, REGISTER_TIMEOUT)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot reach relay {relay}: {e}")))?;
    control.set_read_timeout(Some(REGISTER_TIMEOUT))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < MAX_LINE {
        match control.read(&mut byte)? {
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "relay closed before registering us",
                ));
            }
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
    }
    let text = String::from_utf8_lossy(&line);
    let port = parse_established(text.trim_end_matches('\r'))
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, format!("relay {relay}: {e}")))?;
    control.set_read_timeout(None)?;
    control.set_nonblocking(true)?;
    Ok((control, port))
}

/// A connection of the app.
enum Conn {
    /// A dial-in whose non-blocking connect has not completed yet.
    Dialing(TcpStream),
    /// A dial-in being echoed.
    Echoing(Echo),
    /// Placeholder for the instant of a transition.
    Closed,
}

/// The app's state, driven by the reactor.
struct Core {
    registry: Registry,          // registers dial-ins as they start
    relay_ip: IpAddr,            // dial-ins go to this address
    relayed_port: u16,           // announced by the relay
    control: TcpStream,          // registration connection; the relay's orders
    control_readable: bool,      // software readiness of the control read half
    lines: LineReader,           // frames the relay's lines
    conns: Slab<Conn>,           // dial-ins, connecting or echoing
    pool: BufferPool,            // echo rings, lent while bytes are in flight
    requeued: Vec<Token>,        // echoes that used their budget with work left
    closing: Vec<(usize, bool)>, // (key, abort) to reap at the end of the turn
    ended: Option<io::Error>,    // why the control connection ended, if it did
    stopper: Stopper,            // stops our own loop when the relay goes
}

impl Handler for Core {
    fn poll_timeout(&self, _now: Instant) -> Option<Duration> {
        (!self.requeued.is_empty()).then_some(Duration::ZERO)
    }

    fn on_event(&mut self, event: &Event, _now: Instant) {
        self.dispatch(event.token(), Some(event));
    }

    fn end_turn(&mut self, _now: Instant) {
        for token in std::mem::take(&mut self.requeued) {
            self.dispatch(token, None);
        }
        self.reap();
    }
}

impl Core {
    fn dispatch(&mut self, token: Token, event: Option<&Event>) {
        if token == CONTROL {
            self.control_readable = true;
            return self.serve_control();
        }
        let (key, _) = split(token);
        match self.conns.get_mut(key) {
            // Connect finished (or failed): writable or error says so.
            Some(Conn::Dialing(_)) => self.finish_dial(key),
            Some(Conn::Echoing(echo)) => {
                if let Some(event) = event {
                    echo.end.note(event);
                }
                self.pump(key);
            }
            Some(Conn::Closed) | None => {}
        }
    }

    /// Reads the relay's dial lines and dials in for each.
    fn serve_control(&mut self) {
        let mut buf = [0u8; 512];
        while self.control_readable {
            match read_slice(&self.control, &mut buf) {
                Io::Moved(n) => self.take_lines(&buf[..n]),
                Io::WouldBlock => self.control_readable = false,
                Io::Eof | Io::Reset => {
                    return self.end(io::Error::new(
                        io::ErrorKind::ConnectionAborted,
                        "relay closed the control connection",
                    ));
                }
                Io::Failed(e) => return self.end(e),
            }
        }
    }

    fn take_lines(&mut self, data: &[u8]) {
        let mut ports = Vec::new();
        let fed = self.lines.feed(data, |line| match parse_dial(line) {
            Ok(port) => ports.push(port),
            Err(e) => log::warn!("relay sent a bad line: {e}; ignored"),
        });
        if let Err(e) = fed {
            return self.end(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("relay: {e}"),
            ));
        }
        for port in ports {
            self.dial(port);
        }
    }

    /// Starts a non-blocking connect to the relay's dial-in port.
    fn dial(&mut self, port: u16) {
        let addr = SocketAddr::new(self.relay_ip, port);
        let mut stream = match TcpStream::connect(addr) {
            Ok(stream) => stream,
            Err(e) => return log::warn!("dial-in to {addr} failed: {e}"),
        };
        let entry = self.conns.vacant_entry();
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) = self
            .registry
            .register(&mut stream, token(entry.key(), 0), interest)
        {
            return log::warn!("dial-in to {addr} dropped: {e}");
        }
        entry.insert(Conn::Dialing(stream));
    }

    /// Dialing => Echoing once the connect succeeded; closed if it failed.
    fn finish_dial(&mut self, key: usize) {
        let Some(Conn::Dialing(stream)) = self.conns.get(key) else {
            return;
        };
        if let Ok(Some(e)) | Err(e) = stream.take_error() {
            log::debug!("dial-in failed: {e}");
            return self.closing.push((key, false));
        }
        match stream.peer_addr() {
            Ok(_) => {}
            // Not connected yet: a spurious wake-up; the real one will come.
            Err(e) if e.kind() == io::ErrorKind::NotConnected => return,
            Err(e) => {
                log::debug!("dial-in failed: {e}");
                return self.closing.push((key, false));
            }
        }
        if let Some(slot) = self.conns.get_mut(key)
            && let Conn::Dialing(stream) = std::mem::replace(slot, Conn::Closed)
        {
            let _ = stream.set_nodelay(true);
            *slot = Conn::Echoing(Echo::new(Endpoint::new(stream)));
        }
        self.pump(key);
    }

    fn pump(&mut self, key: usize) {
        let Some(Conn::Echoing(echo)) = self.conns.get_mut(key) else {
            return;
        };
        match echo.pump(&mut self.pool) {
            Ok(Flow::Idle) => {}
            Ok(Flow::More) => self.requeued.push(token(key, 0)),
            Ok(Flow::Done) => self.closing.push((key, false)),
            Err(Broken::Reset) => self.closing.push((key, true)),
            Err(e) => {
                log::debug!("echo failed: {e:?}");
                self.closing.push((key, true));
            }
        }
    }

    /// Records why the control connection ended and stops the loop.
    fn end(&mut self, why: io::Error) {
        log::warn!("{why}");
        self.ended = Some(why);
        self.stopper.stop();
    }

    fn reap(&mut self) {
        while let Some((key, abort)) = self.closing.pop() {
            let Some(conn) = self.conns.try_remove(key) else {
                continue;
            };
            let mut stream = match conn {
                Conn::Dialing(stream) => stream,
                Conn::Closed => continue,
                Conn::Echoing(mut echo) => {
                    echo.release(&mut self.pool);
                    if abort {
                        echo.end.abort_on_close();
                    }
                    echo.end.stream
                }
            };
            let _ = self.registry.deregister(&mut stream);
        }
    }
}
