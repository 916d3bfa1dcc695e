//! Helpers for the end-to-end tests: a relay on `127.0.0.1:0`, a hand-written
//! blocking test app, deadline-bounded polling, and a deterministic byte
//! pattern for checking large transfers without holding them in memory.
//!
//! Every blocking socket made here has read and write timeouts, so a relay
//! bug fails a test instead of hanging it. Nothing waits by sleeping: tests
//! poll for a condition until a deadline ([`wait_until`]).

// Each `tests/*.rs` file is its own crate and uses only some of these helpers.
#![allow(dead_code)]

use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use tcp_relay::{Config, Relay, RunningRelay, Stats};

/// The loopback address everything binds and connects to.
pub const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// Another loopback address (Linux routes all of 127/8 to `lo`), for a
/// dial-in that does not come from the app's address.
pub const OTHER_LOOPBACK: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

/// How long any single blocking socket call may take before the test fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a condition polled by [`wait_until`] may take to become true.
pub const WAIT: Duration = Duration::from_secs(10);

/// The exact first line the relay writes to an app, minus the port and `\n`.
pub const ESTABLISHED_PREFIX: &str = "established relay address port:";

// ---------------------------------------------------------------------------
// The relay

/// A relay on `127.0.0.1:0` with every other setting at its default.
pub fn start_relay() -> RunningRelay {
    start_relay_with(|_| {})
}

/// A relay on `127.0.0.1:0` with settings adjusted by `tweak`.
pub fn start_relay_with(tweak: impl FnOnce(&mut Config)) -> RunningRelay {
    let mut config = Config {
        bind: LOCALHOST,
        reg_port: 0,
        ..Config::default()
    };
    tweak(&mut config);
    Relay::bind(config)
        .expect("bind the relay on 127.0.0.1:0")
        .spawn()
        .expect("spawn the relay thread")
}

/// Polls `cond` until it holds; panics naming `what` after [`WAIT`].
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting until {what}"
        );
        // A poll interval, not synchronisation: the condition is re-checked.
        thread::sleep(Duration::from_millis(2));
    }
}

/// Waits until the relay's counts satisfy `cond`; the panic shows the last counts.
pub fn wait_for_stats(relay: &RunningRelay, what: &str, mut cond: impl FnMut(&Stats) -> bool) {
    let mut last = relay.stats();
    let deadline = Instant::now() + WAIT;
    while !cond(&last) {
        assert!(
            Instant::now() < deadline,
            "timed out after {WAIT:?} waiting until {what}; last stats {last:?}"
        );
        thread::sleep(Duration::from_millis(2));
        last = relay.stats();
    }
}

/// Waits until the relay holds no client, pipe or buffer, and no timer but
/// at most one per app (for the ready dial-ins it asked for): every
/// scenario must end this way (no leaked connections, rings or deadlines).
pub fn assert_no_leftovers(relay: &RunningRelay) {
    wait_for_stats(
        relay,
        "no waiting clients, pipes, lent buffers or client timers remain",
        |s| s.waiting_clients == 0 && s.pipes == 0 && s.buffers_lent == 0 && s.timers <= s.apps,
    );
}

// ---------------------------------------------------------------------------
// Sockets

/// `127.0.0.1:port`.
pub fn local(port: u16) -> SocketAddr {
    SocketAddr::new(LOCALHOST, port)
}

/// Gives a blocking stream the test-wide timeouts.
pub fn with_timeouts(stream: TcpStream) -> TcpStream {
    stream
        .set_read_timeout(Some(IO_TIMEOUT))
        .expect("set read timeout");
    stream
        .set_write_timeout(Some(IO_TIMEOUT))
        .expect("set write timeout");
    stream
}

/// Connects to `addr` with the test-wide timeouts.
pub fn connect(addr: SocketAddr) -> TcpStream {
    try_connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
}

/// Connects to `addr`, returning the error instead of panicking, for
/// connections the relay may turn away (see [`assert_turned_away`]).
pub fn try_connect(addr: SocketAddr) -> io::Result<TcpStream> {
    TcpStream::connect_timeout(&addr, IO_TIMEOUT).map(with_timeouts)
}

/// Asserts that a connection the relay accepted was closed without a byte.
///
/// The relay may close it with RST; when that RST is processed before
/// `connect` returns, the connect itself fails with `ConnectionReset`,
/// which counts as turned away too.
pub fn assert_turned_away(connection: io::Result<TcpStream>, what: &str) {
    match connection {
        Ok(mut stream) => assert_closed_empty(&mut stream, what),
        Err(e) if e.kind() == ErrorKind::ConnectionReset => {}
        Err(e) => panic!("{what}: connect failed: {e}"),
    }
}

/// Connects to `addr` from a socket bound to `from` (port 0 first); like
/// [`try_connect`], returns the error.
pub fn connect_from(from: IpAddr, addr: SocketAddr) -> io::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).expect("create a socket");
    socket
        .bind(&SocketAddr::new(from, 0).into())
        .unwrap_or_else(|e| panic!("bind to {from}: {e}"));
    socket.connect_timeout(&addr.into(), IO_TIMEOUT)?;
    Ok(with_timeouts(socket.into()))
}

/// Waits until connecting to `addr` is refused (nothing listens there).
/// Connections that still succeed meanwhile are dropped at once.
pub fn wait_until_refused(addr: SocketAddr) {
    wait_until(
        &format!("connecting to {addr} is refused"),
        || match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
            Err(e) => e.kind() == ErrorKind::ConnectionRefused,
            Ok(_) => false,
        },
    );
}

/// Asserts that connecting to `addr` is refused right now.
pub fn assert_refused(addr: SocketAddr) {
    match TcpStream::connect_timeout(&addr, IO_TIMEOUT) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {}
        Err(e) => panic!("connect to {addr}: expected refused, got {e}"),
        Ok(_) => panic!("connect to {addr}: expected refused, but it was accepted"),
    }
}

/// Whether an error is a read or write timing out (not the peer's doing).
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// How a stream ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// An orderly end: `read` returned 0.
    Eof,
    /// An error other than a timeout, e.g. `ConnectionReset`.
    Error(ErrorKind),
}

/// Reads until the stream ends; returns how and how many bytes came first.
/// Panics if it does not end within [`IO_TIMEOUT`].
pub fn read_until_closed(stream: &mut TcpStream) -> (Ended, usize) {
    let mut buf = [0u8; 64 * 1024];
    let mut total = 0;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (Ended::Eof, total),
            Ok(n) => total += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if is_timeout(&e) => {
                panic!("stream not closed within {IO_TIMEOUT:?} ({total} bytes read)")
            }
            Err(e) => return (Ended::Error(e.kind()), total),
        }
    }
}

/// Asserts that the stream is closed without sending a single byte.
pub fn assert_closed_empty(stream: &mut TcpStream, what: &str) {
    let (ended, bytes) = read_until_closed(stream);
    assert_eq!(
        bytes, 0,
        "{what}: expected no bytes before the close ({ended:?})"
    );
}

/// Reads exactly `len` bytes.
pub fn read_exactly(stream: &mut TcpStream, len: usize) -> Vec<u8> {
    let mut buf = vec![0; len];
    stream
        .read_exact(&mut buf)
        .unwrap_or_else(|e| panic!("read {len} bytes: {e}"));
    buf
}

/// Reads until EOF; a reset or timeout fails the test.
pub fn read_to_eof(stream: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    stream.read_to_end(&mut out).expect("read to EOF");
    out
}

/// Sets `SO_LINGER` to zero, so dropping the stream sends RST instead of FIN.
pub fn set_reset_on_drop(stream: &TcpStream) {
    socket2::SockRef::from(stream)
        .set_linger(Some(Duration::ZERO))
        .expect("set SO_LINGER 0");
}

// ---------------------------------------------------------------------------
// The test app

/// A hand-written app: registers on the control connection, and hands every
/// dial request to the test, which dials in when and from where it likes.
///
/// A thread reads the control connection; each `<DIAL_PORT>\n` line becomes
/// one port on a channel. The channel disconnects when the relay closes the
/// control connection, which is how tests see an app being dropped.
pub struct TestApp {
    control: TcpStream,             // our end of the control connection
    pub relayed_port: u16,          // from the established line
    dial_ports: Receiver<u16>,      // one per dial line, in order
    reader: Option<JoinHandle<()>>, // the control reader thread
}

impl TestApp {
    /// Registers on `reg` and reads the established line, checking its exact form.
    pub fn register(reg: SocketAddr) -> TestApp {
        let control = connect(reg);
        let mut lines = BufReader::new(control.try_clone().expect("clone the control stream"));
        let mut line = String::new();
        lines
            .read_line(&mut line)
            .expect("read the established line");
        let port = parse_established(&line);
        let (tx, dial_ports) = mpsc::channel();
        let reader = thread::spawn(move || read_dial_lines(lines, tx));
        TestApp {
            control,
            relayed_port: port,
            dial_ports,
            reader: Some(reader),
        }
    }

    /// `127.0.0.1:<relayed port>`, where clients connect.
    pub fn relayed_addr(&self) -> SocketAddr {
        local(self.relayed_port)
    }

    /// The port of the next dial line; panics if none comes in time.
    pub fn next_dial_port(&self) -> u16 {
        match self.dial_ports.recv_timeout(IO_TIMEOUT) {
            Ok(port) => port,
            Err(RecvTimeoutError::Timeout) => panic!("no dial line within {IO_TIMEOUT:?}"),
            Err(RecvTimeoutError::Disconnected) => {
                panic!("control connection closed, no dial line")
            }
        }
    }

    /// The port of the next dial line if one comes within `wait`; a
    /// `Disconnected` error means the relay closed the control connection.
    pub fn poll_dial_port(&self, wait: Duration) -> Result<u16, RecvTimeoutError> {
        self.dial_ports.recv_timeout(wait)
    }

    /// Waits for the next dial line and dials in from 127.0.0.1.
    pub fn dial_in(&self) -> TcpStream {
        connect(local(self.next_dial_port()))
    }

    /// Waits until the relay closes the control connection, draining any
    /// dial lines still queued (panics if it stays open).
    pub fn wait_control_closed(&self) {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.dial_ports.recv_timeout(left) {
                Ok(_) => {}
                Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {
                    panic!("control connection still open after {WAIT:?}")
                }
            }
        }
    }

    /// Asserts that no dial line is queued right now.
    pub fn assert_no_dial_line(&self) {
        if let Ok(port) = self.dial_ports.try_recv() {
            panic!("unexpected dial line {port}");
        }
    }

    /// Writes raw bytes on the control connection.
    pub fn send_control(&self, bytes: &[u8]) -> io::Result<()> {
        (&self.control).write_all(bytes)
    }

    /// Serves every dial request with `service` on a thread of its own.
    pub fn serve(self, service: fn(TcpStream)) -> ServingApp {
        let served = Arc::new(AtomicUsize::new(0));
        let count = served.clone();
        let relayed_port = self.relayed_port;
        let control = self.control.try_clone().expect("clone the control stream");
        let thread = thread::spawn(move || {
            let mut workers = Vec::new();
            while let Ok(port) = self.dial_ports.recv() {
                let stream = connect(local(port));
                count.fetch_add(1, Ordering::Relaxed);
                workers.push(thread::spawn(move || service(stream)));
            }
            for worker in workers {
                worker.join().expect("a service thread panicked");
            }
            drop(self);
        });
        ServingApp {
            control,
            relayed_port,
            served,
            thread: Some(thread),
        }
    }

    /// Closes the control connection (FIN) and waits for the reader thread.
    pub fn disconnect(mut self) {
        self.close();
    }

    fn close(&mut self) {
        let _ = self.control.shutdown(Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            join_unless_panicking(reader, "the control reader thread");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.close();
    }
}

/// Joins a helper thread, failing the test if it panicked, unless the test
/// is already unwinding: a second panic then would abort the whole test
/// binary, and the first failure is the one to report.
pub fn join_unless_panicking<T>(handle: JoinHandle<T>, what: &str) {
    let result = handle.join();
    if !thread::panicking() {
        result.unwrap_or_else(|_| panic!("{what} panicked"));
    }
}

/// Parses the established line, insisting on the exact wire format.
fn parse_established(line: &str) -> u16 {
    let port = line
        .strip_prefix(ESTABLISHED_PREFIX)
        .and_then(|rest| rest.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("bad established line {line:?}"));
    assert!(
        port.bytes().all(|b| b.is_ascii_digit()),
        "bad port in {line:?}"
    );
    port.parse()
        .unwrap_or_else(|e| panic!("bad port in {line:?}: {e}"))
}

/// The control reader: forwards each dial line's port until the relay closes.
fn read_dial_lines(mut lines: BufReader<TcpStream>, tx: mpsc::Sender<u16>) {
    // The control connection is silent while no client comes; only the
    // relay's close (or ours) ends this thread.
    lines
        .get_ref()
        .set_read_timeout(None)
        .expect("clear the read timeout");
    let mut line = String::new();
    loop {
        line.clear();
        match lines.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let port = line
            .strip_suffix('\n')
            .filter(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("bad dial line {line:?}"));
        if tx.send(port).is_err() {
            return;
        }
    }
}

/// A [`TestApp`] answering every dial request on its own; dropping it closes
/// the control connection and waits for the service threads.
pub struct ServingApp {
    control: TcpStream,             // to close the control connection on drop
    pub relayed_port: u16,          // where its clients connect
    served: Arc<AtomicUsize>,       // dial-ins made so far
    thread: Option<JoinHandle<()>>, // the dialing thread
}

impl ServingApp {
    /// `127.0.0.1:<relayed port>`.
    pub fn relayed_addr(&self) -> SocketAddr {
        local(self.relayed_port)
    }

    /// Dial-ins made so far.
    pub fn served(&self) -> usize {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for ServingApp {
    fn drop(&mut self) {
        let _ = self.control.shutdown(Shutdown::Both);
        if let Some(thread) = self.thread.take() {
            join_unless_panicking(thread, "the serving thread");
        }
    }
}

/// Echoes everything back, then ends its stream after the peer's.
pub fn echo(stream: TcpStream) {
    transform(stream, |_| {});
}

/// Echoes everything back in ASCII upper case.
pub fn echo_upper(stream: TcpStream) {
    transform(stream, |bytes| bytes.make_ascii_uppercase());
}

fn transform(mut stream: TcpStream, f: impl Fn(&mut [u8])) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                f(&mut buf[..n]);
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
}

/// Connects a client to `addr`, then [`exchange_on`] it.
pub fn exchange(addr: SocketAddr, request: &[u8]) -> Vec<u8> {
    exchange_on(connect(addr), request)
}

/// Sends `request` on `client`, ends the client's stream, and returns
/// everything that comes back until the relay ends it.
pub fn exchange_on(mut client: TcpStream, request: &[u8]) -> Vec<u8> {
    // Written on a thread so a large request cannot deadlock against a
    // large reply filling the buffers the other way.
    let mut writer = client.try_clone().expect("clone the client stream");
    let request = request.to_vec();
    let sender = thread::spawn(move || {
        writer.write_all(&request).expect("send the request");
        writer
            .shutdown(Shutdown::Write)
            .expect("shut down the write half");
    });
    let reply = read_to_eof(&mut client);
    sender.join().expect("the sending thread panicked");
    reply
}

// ---------------------------------------------------------------------------
// A deterministic byte stream

/// An endless pseudo-random byte stream determined by a seed: byte `i` is
/// byte `i % 8` of a hash of `i / 8`. Senders generate it chunk by chunk and
/// receivers regenerate it to compare, so a 64 MiB transfer needs no 64 MiB
/// buffer, and any offset can be produced on its own.
#[derive(Clone, Copy)]
pub struct Pattern {
    seed: u64,
}

impl Pattern {
    /// The stream for `seed`.
    pub fn new(seed: u64) -> Self {
        Pattern { seed }
    }

    /// SplitMix64 of word `index`: cheap enough for the debug profile.
    fn word(&self, index: u64) -> [u8; 8] {
        let mut z = self.seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (z ^ (z >> 31)).to_le_bytes()
    }

    /// Fills `buf` with the stream's bytes from `offset` on.
    pub fn fill(&self, offset: u64, buf: &mut [u8]) {
        let mut pos = offset;
        let mut rest = buf;
        // Unaligned head, byte by byte.
        while !pos.is_multiple_of(8) && !rest.is_empty() {
            rest[0] = self.word(pos / 8)[(pos % 8) as usize];
            rest = &mut rest[1..];
            pos += 1;
        }
        let mut words = rest.chunks_exact_mut(8);
        for chunk in &mut words {
            chunk.copy_from_slice(&self.word(pos / 8));
            pos += 8;
        }
        for (i, byte) in words.into_remainder().iter_mut().enumerate() {
            *byte = self.word(pos / 8)[i];
        }
    }

    /// `len` bytes from `offset` on.
    pub fn bytes(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0; len];
        self.fill(offset, &mut buf);
        buf
    }

    /// Writes the first `total` bytes to `stream` in chunks of up to 256 KiB.
    pub fn send(&self, stream: &mut TcpStream, total: u64) {
        let mut buf = vec![0u8; 256 * 1024];
        let mut sent = 0u64;
        while sent < total {
            let n = (total - sent).min(buf.len() as u64) as usize;
            self.fill(sent, &mut buf[..n]);
            stream
                .write_all(&buf[..n])
                .unwrap_or_else(|e| panic!("write at offset {sent} of {total}: {e}"));
            sent += n as u64;
        }
    }

    /// Reads `stream` to EOF, checking every byte against the pattern;
    /// returns the number of bytes read. Panics at the first wrong byte.
    pub fn check(&self, stream: &mut TcpStream) -> u64 {
        let mut buf = vec![0u8; 256 * 1024];
        let mut expected = vec![0u8; buf.len()];
        let mut received = 0u64;
        loop {
            let n = match stream.read(&mut buf) {
                Ok(0) => return received,
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => panic!("read at offset {received}: {e}"),
            };
            self.fill(received, &mut expected[..n]);
            if buf[..n] != expected[..n] {
                let at = (0..n).find(|&i| buf[i] != expected[i]).unwrap_or(0);
                panic!(
                    "byte {} differs: got {:#04x}, expected {:#04x}",
                    received + at as u64,
                    buf[at],
                    expected[at]
                );
            }
            received += n as u64;
        }
    }
}
pub mod daemons;
pub mod procs;
pub mod tools;
