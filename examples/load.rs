//! Load tool for issue 4: drives a running relay (or any echo target) and
//! reports throughput, latency, connection rate and memory per client.
//!
//! ```sh
//! cargo run --release --example load -- rr    --addr 127.0.0.1:8081 --conns 100 --secs 5
//! cargo run --release --example load -- churn --addr 127.0.0.1:8081 --secs 5 --conns 4
//! cargo run --release --example load -- bulk  --addr 127.0.0.1:8081 --streams 8 --bytes 134217728
//! cargo run --release --example load -- idle  --addr 127.0.0.1:8081 --conns 8000 --pid 1234
//! cargo run --release --example load -- burst --addr 127.0.0.1:8081 --clients 1000 --pid 1234
//! cargo run --release --example load -- echo-server --listen 127.0.0.1:0 --secs 600
//! ```
//!
//! Every mode verifies each byte that comes back against what was sent,
//! stops by itself (bounded in time and count) and ends with one line
//! `RESULT <mode> key=value ...` for scripts (`benches/compare.sh`); the exit
//! status is non-zero when any transfer failed or was wrong.
//!
//! The client side is plain blocking `std::net` with a thread per
//! connection or stream: simple, and the same for every target measured
//! (a `burst` of 2,000 clients is 4,000 threads of 256 KiB stacks: 1 GiB of
//! address space, of which only the touched pages are resident).
//! The echo server is a small `mio` loop per thread (sockets shared out by
//! `SO_REUSEPORT`), so thousands of idle connections cost no threads.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};

/// How long any single read, write or connect may block before the
/// transfer counts as failed: a stuck target must not hang the tool.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Size of one bulk write and of the bulk read buffer.
const CHUNK: usize = 64 << 10;
/// Period of the bulk byte pattern: a prime, so it never lines up with
/// chunk or ring sizes and a byte delivered out of place is caught.
const PERIOD: usize = 251;
/// Bytes each churn and idle connection echoes.
const PROBE: usize = 16;
/// Stack of each client thread: they hold a few buffers, no deep calls.
const STACK: usize = 256 << 10;
/// How long a `burst` client's connect may take. A listener whose SYN
/// queue or accept backlog is full drops SYNs, and Linux sends them again
/// 1, 3, 7, 15 and 31 s after the first (the wait doubles from 1 s): 30 s
/// lets four retries through, so a client counted lost was refused or reset
/// by the target, not given up by us.
const BURST_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Period of the RSS sampler: short next to a burst (seconds), long next to
/// reading `/proc/PID/status` (tens of microseconds).
const RSS_PERIOD: Duration = Duration::from_millis(10);

/// Load tool for tcp-relay: request/response, churn, bulk, idle memory.
#[derive(Parser)]
#[command(name = "load")]
struct Cli {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    /// N connections doing request/response of a fixed-size message.
    Rr(RrArgs),
    /// Connect, echo 16 bytes, close, in a loop on N threads.
    Churn(ChurnArgs),
    /// K streams each sending B bytes while reading the echo back.
    Bulk(BulkArgs),
    /// Hold N echoing connections and report a process's RSS per client.
    Idle(IdleArgs),
    /// N clients connecting at once, each streaming B bytes full duplex;
    /// counts the clients served, lost and failed, and peak RSS.
    Burst(BurstArgs),
    /// Report a process's RSS and CPU use over a few seconds.
    Stat(StatArgs),
    /// An echo server (mio, one loop per thread); prints its address.
    EchoServer(EchoArgs),
    /// Print a loopback port that is free right now.
    FreePort,
}

#[derive(Args)]
struct RrArgs {
    /// Target address (a relayed port or an echo server).
    #[arg(long)]
    addr: String,
    /// Concurrent connections, a thread each.
    #[arg(long, default_value_t = 100)]
    conns: usize,
    /// Seconds to run.
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Message size in bytes (request and response alike).
    #[arg(long, default_value_t = 64)]
    size: usize,
}

#[derive(Args)]
struct ChurnArgs {
    #[arg(long)]
    addr: String,
    #[arg(long, default_value_t = 5.0)]
    secs: f64,
    /// Threads, each running connect/echo/close in a loop.
    #[arg(long, default_value_t = 4)]
    conns: usize,
}

#[derive(Args)]
struct BulkArgs {
    #[arg(long)]
    addr: String,
    /// Concurrent streams.
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// Bytes each stream sends (and must get back).
    #[arg(long, default_value_t = 1 << 30)]
    bytes: u64,
}

#[derive(Args)]
struct IdleArgs {
    #[arg(long)]
    addr: String,
    /// Connections to open and hold.
    #[arg(long, default_value_t = 8000)]
    conns: usize,
    /// Processes whose RSS to report (the relay first; repeatable).
    #[arg(long, required = true)]
    pid: Vec<u32>,
    /// Seconds to hold the connections idle before measuring.
    #[arg(long, default_value_t = 2.0)]
    hold: f64,
}

#[derive(Args)]
struct BurstArgs {
    #[arg(long)]
    addr: String,
    /// Clients, released together by one barrier (a thread pair each).
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Bytes each client sends (and must get back).
    #[arg(long, default_value_t = 4 << 20)]
    bytes: u64,
    /// Processes whose peak RSS to sample during the run (repeatable).
    #[arg(long)]
    pid: Vec<u32>,
    /// Seconds over which the connects are spread evenly (0: all at once).
    #[arg(long, default_value_t = 0.0)]
    ramp_secs: f64,
    /// Seconds after the release at which unfinished clients are cut off.
    #[arg(long, default_value_t = 120.0)]
    deadline_secs: f64,
    /// Seconds one read or write may block before the client counts as
    /// failed. Under kernel TCP memory pressure loopback drops segments and
    /// retransmission timers back off for seconds on every path alike; a
    /// longer limit tells a slow client from a dead one.
    #[arg(long, default_value_t = 10.0)]
    io_timeout_secs: f64,
}

#[derive(Args)]
struct StatArgs {
    #[arg(long, required = true)]
    pid: Vec<u32>,
    /// Seconds over which CPU use is measured.
    #[arg(long, default_value_t = 2.0)]
    secs: f64,
}

#[derive(Args)]
struct EchoArgs {
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: String,
    /// Event loops (threads), sharing the port with SO_REUSEPORT.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Seconds after which the server exits by itself.
    #[arg(long, default_value_t = 900.0)]
    secs: f64,
    /// Each connection begins with a PROXY protocol header (v1 or v2, as
    /// `expose --proxy-protocol` passes on): read and drop it, echo the rest.
    #[arg(long)]
    proxy_header: bool,
}

fn main() -> ExitCode {
    let outcome = match Cli::parse().mode {
        Mode::Rr(a) => rr(&a),
        Mode::Churn(a) => churn(&a),
        Mode::Bulk(a) => bulk(&a),
        Mode::Idle(a) => idle(&a),
        Mode::Burst(a) => burst::run(&a),
        Mode::Stat(a) => stat(&a),
        Mode::EchoServer(a) => echo::serve(&a),
        Mode::FreePort => free_port(),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("load: error: {e}");
            ExitCode::FAILURE
        }
    }
}

type Res<T> = Result<T, String>;

fn resolve(addr: &str) -> Res<SocketAddr> {
    addr.to_socket_addrs()
        .map_err(|e| format!("bad address {addr:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr:?} resolves to nothing"))
}

/// A connected client socket with timeouts and `TCP_NODELAY` (small
/// messages must not wait for Nagle on our side).
fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    connect_within(addr, IO_TIMEOUT)
}

/// [`connect`] with its own limit on the connect itself.
fn connect_within(addr: SocketAddr, limit: Duration) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, limit)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    Ok(stream)
}

fn spawn<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> io::Result<thread::JoinHandle<T>> {
    thread::Builder::new().stack_size(STACK).spawn(f)
}

/// Fills `msg` with bytes unique to (connection, sequence number), so a
/// response that belongs to another request or connection is caught.
fn stamp(msg: &mut [u8], conn: usize, seq: u64) {
    let seed = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (conn as u64);
    for (i, b) in msg.iter_mut().enumerate() {
        *b = (seed >> ((i % 8) * 8)) as u8 ^ (i as u8);
    }
}

/// Writes `msg`, reads as many bytes back and checks them.
fn echo_once(stream: &mut TcpStream, msg: &[u8], back: &mut [u8]) -> Res<()> {
    stream.write_all(msg).map_err(|e| format!("write: {e}"))?;
    stream.read_exact(back).map_err(|e| format!("read: {e}"))?;
    if back != msg {
        return Err("echoed bytes differ from those sent".into());
    }
    Ok(())
}

/// Latencies in nanoseconds; percentiles by sorting at the end.
#[derive(Default)]
struct Samples(Vec<u32>);

impl Samples {
    fn record(&mut self, d: Duration) {
        self.0.push(d.as_nanos().min(u32::MAX as u128) as u32);
    }

    fn merge(&mut self, other: Samples) {
        self.0.extend(other.0);
    }

    /// The `q` quantile in microseconds (0 when empty).
    fn quantile_us(&mut self, q: f64) -> f64 {
        if self.0.is_empty() {
            return 0.0;
        }
        self.0.sort_unstable();
        f64::from(self.0[rank(self.0.len(), q)]) / 1000.0
    }
}

/// Index of the `q` quantile in `len` sorted samples (nearest rank);
/// `len` must not be 0.
fn rank(len: usize, q: f64) -> usize {
    ((len as f64 * q).ceil() as usize).clamp(1, len) - 1
}

/// What one client thread did.
struct Tally {
    done: u64,
    samples: Samples,
    error: Option<String>,
}

impl Tally {
    /// A worker that could not run at all.
    fn failed(why: &str) -> Tally {
        Tally {
            done: 0,
            samples: Samples::default(),
            error: Some(why.into()),
        }
    }

    /// Counts one finished operation that started at `*since`, and moves
    /// `*since` to now (the start of the next one).
    fn count_since(&mut self, since: &mut Instant) {
        let then = *since;
        *since = Instant::now();
        self.samples.record(*since - then);
        self.done += 1;
    }
}

/// Joins worker threads, folding their tallies; errors are counted and the
/// first is kept.
fn join_all(handles: Vec<thread::JoinHandle<Tally>>) -> (u64, Samples, usize, Option<String>) {
    let (mut done, mut samples, mut errors, mut first) = (0, Samples::default(), 0, None);
    for handle in handles {
        let tally = handle
            .join()
            .unwrap_or_else(|_| Tally::failed("worker panicked"));
        done += tally.done;
        samples.merge(tally.samples);
        if let Some(e) = tally.error {
            errors += 1;
            first.get_or_insert(e);
        }
    }
    (done, samples, errors, first)
}

/// Starts `n` workers made by `make(index, barrier)`, releases them at once
/// through the barrier, and folds their tallies; also returns the seconds
/// from release to the last worker's end.
fn run_workers<W>(
    n: usize,
    mut make: impl FnMut(usize, Arc<Barrier>) -> W,
) -> Res<(u64, Samples, usize, Option<String>, f64)>
where
    W: FnOnce() -> Tally + Send + 'static,
{
    let barrier = Arc::new(Barrier::new(n + 1));
    let mut handles = Vec::with_capacity(n);
    for i in 0..n {
        handles.push(spawn(make(i, barrier.clone())).map_err(|e| format!("spawn: {e}"))?);
    }
    barrier.wait();
    let start = Instant::now();
    let (done, samples, errors, first) = join_all(handles);
    Ok((done, samples, errors, first, start.elapsed().as_secs_f64()))
}

fn report_errors(mode: &str, errors: usize, first: Option<String>) -> Res<()> {
    match first {
        None => Ok(()),
        Some(e) => Err(format!("{mode}: {errors} worker(s) failed; first: {e}")),
    }
}

// ---- rr ------------------------------------------------------------------

fn rr(a: &RrArgs) -> Res<()> {
    let addr = resolve(&a.addr)?;
    // Connect (and check one echo on) every connection before the clock
    // starts: set-up is churn's business, not this measure's.
    let mut streams = Vec::with_capacity(a.conns);
    for conn in 0..a.conns {
        let mut s = connect(addr).map_err(|e| format!("connect {addr}: {e}"))?;
        let mut msg = vec![0; a.size];
        stamp(&mut msg, conn, u64::MAX);
        echo_once(&mut s, &msg, &mut vec![0; a.size])?;
        streams.push(s);
    }
    let run_for = Duration::from_secs_f64(a.secs);
    let size = a.size;
    let mut streams = streams.into_iter();
    let (done, mut lat, errors, first, secs) = run_workers(a.conns, |conn, barrier| {
        let stream = streams.next();
        move || match stream {
            Some(stream) => rr_worker(stream, conn, size, &barrier, run_for),
            None => Tally::failed("no connection"),
        }
    })?;
    let rate = done as f64 / secs;
    let (p50, p99, p999) = (
        lat.quantile_us(0.5),
        lat.quantile_us(0.99),
        lat.quantile_us(0.999),
    );
    println!(
        "rr {addr}: {} conns x {} B, {done} round trips in {secs:.2} s = {rate:.0} req/s; \
         latency p50 {p50:.1} us, p99 {p99:.1} us, p99.9 {p999:.1} us; {errors} errors",
        a.conns, a.size
    );
    println!(
        "RESULT rr req_per_s={rate:.0} p50_us={p50:.1} p99_us={p99:.1} p999_us={p999:.1} \
         done={done} errors={errors}"
    );
    report_errors("rr", errors, first)
}

fn rr_worker(
    mut stream: TcpStream,
    conn: usize,
    size: usize,
    barrier: &Barrier,
    run_for: Duration,
) -> Tally {
    let (mut msg, mut back) = (vec![0; size], vec![0; size]);
    let mut tally = Tally {
        done: 0,
        samples: Samples(Vec::with_capacity(1 << 16)),
        error: None,
    };
    barrier.wait();
    let deadline = Instant::now() + run_for;
    let mut now = Instant::now();
    while now < deadline {
        stamp(&mut msg, conn, tally.done);
        if let Err(e) = echo_once(&mut stream, &msg, &mut back) {
            tally.error = Some(format!("conn {conn}, request {}: {e}", tally.done));
            break;
        }
        tally.count_since(&mut now);
    }
    tally
}

// ---- churn ---------------------------------------------------------------

fn churn(a: &ChurnArgs) -> Res<()> {
    let addr = resolve(&a.addr)?;
    let run_for = Duration::from_secs_f64(a.secs);
    let (done, mut lat, errors, first, secs) = run_workers(a.conns, |worker, barrier| {
        move || churn_worker(addr, worker, &barrier, run_for)
    })?;
    let rate = done as f64 / secs;
    let (p50, p99) = (lat.quantile_us(0.5), lat.quantile_us(0.99));
    println!(
        "churn {addr}: {} threads, {done} connections in {secs:.2} s = {rate:.0} conn/s; \
         connect+echo+close p50 {p50:.1} us, p99 {p99:.1} us; {errors} errors",
        a.conns
    );
    println!(
        "RESULT churn conn_per_s={rate:.0} p50_us={p50:.1} p99_us={p99:.1} done={done} \
         errors={errors}"
    );
    report_errors("churn", errors, first)
}

fn churn_worker(addr: SocketAddr, worker: usize, barrier: &Barrier, run_for: Duration) -> Tally {
    let (mut msg, mut back) = ([0; PROBE], [0; PROBE]);
    let mut tally = Tally {
        done: 0,
        samples: Samples::default(),
        error: None,
    };
    barrier.wait();
    let deadline = Instant::now() + run_for;
    let mut now = Instant::now();
    while now < deadline {
        stamp(&mut msg, worker, tally.done);
        let outcome = connect(addr)
            .map_err(|e| format!("connect: {e}"))
            .and_then(|mut s| echo_once(&mut s, &msg, &mut back));
        if let Err(e) = outcome {
            tally.error = Some(format!("thread {worker}, connection {}: {e}", tally.done));
            break;
        }
        tally.count_since(&mut now);
    }
    tally
}

// ---- bulk ----------------------------------------------------------------

/// `PERIOD + CHUNK` bytes of `i % PERIOD`: the stream bytes from offset `o`
/// on are `pattern[o % PERIOD..]`, so sending and checking are slices.
fn pattern() -> Vec<u8> {
    (0..PERIOD + CHUNK).map(|i| (i % PERIOD) as u8).collect()
}

/// Seconds from the common start to when one stream finished each way.
struct StreamTimes {
    sent: f64,
    received: f64,
    eof: bool, // the echo's end of stream arrived after the bytes (half-close carried)
}

fn bulk(a: &BulkArgs) -> Res<()> {
    let addr = resolve(&a.addr)?;
    let mut streams = Vec::new();
    for _ in 0..a.streams {
        streams.push(connect(addr).map_err(|e| format!("connect {addr}: {e}"))?);
    }
    let pattern = Arc::new(pattern());
    let start = Instant::now();
    let mut handles = Vec::new();
    for (i, stream) in streams.into_iter().enumerate() {
        let (bytes, pattern) = (a.bytes, pattern.clone());
        let h = spawn(move || duplex(Arc::new(stream), pattern, offset(i), bytes, start))
            .map_err(|e| format!("spawn: {e}"))?;
        handles.push(h);
    }
    let (mut sent_at, mut recv_at, mut no_eof, mut first) = (0f64, 0f64, 0, None);
    for h in handles {
        match h
            .join()
            .unwrap_or_else(|_| Err(Cut::local("stream panicked")))
        {
            Ok(t) => {
                sent_at = sent_at.max(t.sent);
                recv_at = recv_at.max(t.received);
                no_eof += usize::from(!t.eof);
            }
            Err(cut) => {
                first.get_or_insert(cut.why);
            }
        }
    }
    let total = a.bytes as f64 * a.streams as f64;
    let (up, down) = (total / sent_at, total / recv_at);
    let gbit = |r: f64| r * 8.0 / 1e9;
    println!(
        "bulk {addr}: {} streams x {} B each way: sent at {:.0} MiB/s ({:.2} Gbit/s), \
         echoed back at {:.0} MiB/s ({:.2} Gbit/s); {} streams without EOF after the echo",
        a.streams,
        a.bytes,
        mib(up),
        gbit(up),
        mib(down),
        gbit(down),
        no_eof
    );
    println!(
        "RESULT bulk up_mib_s={:.0} down_mib_s={:.0} secs={recv_at:.3} no_eof={no_eof} errors={}",
        mib(up),
        mib(down),
        usize::from(first.is_some())
    );
    match first {
        Some(e) => Err(format!("bulk: {e}")),
        None => Ok(()),
    }
}

/// Bytes to MiB.
fn mib(bytes: f64) -> f64 {
    bytes / f64::from(1 << 20)
}

/// Where stream `i` starts in the pattern: neighbours differ, so bytes
/// delivered to the wrong stream are caught.
fn offset(i: usize) -> usize {
    i * 37 % PERIOD
}

/// Why a stream ended before its whole echo was back, and how far it got.
struct Cut {
    echoed: u64, // bytes echoed back and checked before the cut
    cause: Cause,
    why: String,
}

/// What ended a stream early (`burst` counts its lost clients by cause).
#[derive(Clone, Copy, PartialEq)]
enum Cause {
    Connect,  // the connect failed or timed out
    Reset,    // the target reset the connection (ECONNRESET, EPIPE)
    Eof,      // the echo ended before all bytes were back
    Timeout,  // one read or write blocked for IO_TIMEOUT
    Deadline, // cut off by `burst`'s global deadline
    Local,    // the tool's own failure (a thread, a descriptor)
    Other,    // wrong bytes, no EOF after the echo, any other error
}

impl Cause {
    fn of(e: &io::Error) -> Cause {
        match e.kind() {
            io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe => Cause::Reset,
            // An expired SO_RCVTIMEO/SO_SNDTIMEO reads as EAGAIN on Linux.
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Cause::Timeout,
            _ => Cause::Other,
        }
    }
}

impl Cut {
    /// A failure of the tool itself (thread, descriptor), not the target.
    fn local(why: &str) -> Cut {
        Cut {
            echoed: 0,
            cause: Cause::Local,
            why: why.into(),
        }
    }
}

/// Sends `bytes` of the pattern from `offset` on a second thread while
/// this one reads and checks the echo: both directions at once. The
/// socket is shared by `Arc` (both halves of a `TcpStream` work through
/// `&TcpStream`), so no descriptor is duplicated and whoever holds the
/// last reference closes it.
fn duplex(
    stream: Arc<TcpStream>,
    pattern: Arc<Vec<u8>>,
    offset: usize,
    bytes: u64,
    start: Instant,
) -> Result<StreamTimes, Cut> {
    let (writer, pat) = (stream.clone(), pattern.clone());
    let sender = spawn(move || send_pattern(&writer, &pat, offset, bytes, start))
        .map_err(|e| Cut::local(&format!("spawn: {e}")))?;
    let received = check_echo(&stream, &pattern, offset, bytes, start);
    if received.is_err() {
        // Unblock the sender, which may wait for room the echo never frees.
        let _ = stream.shutdown(Shutdown::Both);
    }
    let sent = sender
        .join()
        .unwrap_or_else(|_| Err((Cause::Local, "sender panicked".into())));
    let (eof, received) = received?;
    // The whole echo came back, so a failed send can only have failed late.
    let sent = sent.map_err(|(cause, why)| Cut {
        echoed: bytes,
        cause,
        why,
    })?;
    Ok(StreamTimes {
        sent,
        received,
        eof,
    })
}

/// Writes `bytes` of the pattern from `offset`, then half-closes; returns
/// seconds since `start` when the last byte was written.
fn send_pattern(
    mut writer: &TcpStream,
    pattern: &[u8],
    offset: usize,
    bytes: u64,
    start: Instant,
) -> Result<f64, (Cause, String)> {
    let mut sent = 0u64;
    while sent < bytes {
        let n = (bytes - sent).min(CHUNK as u64) as usize;
        let at = (offset + (sent % PERIOD as u64) as usize) % PERIOD;
        writer
            .write_all(&pattern[at..at + n])
            .map_err(|e| (Cause::of(&e), format!("write after {sent} B: {e}")))?;
        sent += n as u64;
    }
    let _ = writer.shutdown(Shutdown::Write);
    Ok(start.elapsed().as_secs_f64())
}

/// Reads exactly `bytes` and compares them with the pattern; then waits for
/// the end of stream. Returns (EOF seen, seconds since `start` when the
/// last byte arrived).
fn check_echo(
    mut stream: &TcpStream,
    pattern: &[u8],
    offset: usize,
    bytes: u64,
    start: Instant,
) -> Result<(bool, f64), Cut> {
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0u64;
    let cut = |got, cause, why| Cut {
        echoed: got,
        cause,
        why,
    };
    while got < bytes {
        let want = (bytes - got).min(CHUNK as u64) as usize;
        let n = stream
            .read(&mut buf[..want])
            .map_err(|e| cut(got, Cause::of(&e), format!("read after {got} B: {e}")))?;
        if n == 0 {
            let why = format!("stream ended after {got} of {bytes} bytes");
            return Err(cut(got, Cause::Eof, why));
        }
        let at = (offset + (got % PERIOD as u64) as usize) % PERIOD;
        if buf[..n] != pattern[at..at + n] {
            let why = format!("wrong bytes in {got}..{}", got + n as u64);
            return Err(cut(got, Cause::Other, why));
        }
        got += n as u64;
    }
    let received = start.elapsed().as_secs_f64();
    // The end of stream follows the last byte at once on a path that
    // carries half-close; waiting IO_TIMEOUT tells a slow one from none.
    let eof = matches!(stream.read(&mut buf[..1]), Ok(0));
    Ok((eof, received))
}

// ---- idle ----------------------------------------------------------------

/// A process's resident set in KiB (`VmRSS` in `/proc/PID/status`).
fn rss_kib(pid: u32) -> Res<u64> {
    status_kib(pid, "VmRSS")
}

/// One `<field>: <n> kB` line of `/proc/PID/status`, in KiB.
fn status_kib(pid: u32, field: &str) -> Res<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map_err(|e| format!("cannot read /proc/{pid}/status: {e}"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| format!("no {field} for pid {pid}"))
}

/// CPU time (user + system) of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> Res<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| format!("cannot read /proc/{pid}/stat: {e}"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after ')'.
    match (field(11), field(12)) {
        (Some(u), Some(s)) => Ok(u + s),
        _ => Err(format!("cannot parse /proc/{pid}/stat")),
    }
}

/// CPU use of each process over `secs`, in percent of one core (assumes
/// the usual 100 ticks per second).
fn cpu_percent(pids: &[u32], secs: f64) -> Res<Vec<f64>> {
    let before: Vec<u64> = pids.iter().map(|&p| cpu_ticks(p)).collect::<Res<_>>()?;
    let t = Instant::now();
    thread::sleep(Duration::from_secs_f64(secs));
    let elapsed = t.elapsed().as_secs_f64();
    pids.iter()
        .zip(before)
        .map(|(&p, b)| Ok((cpu_ticks(p)? - b) as f64 / elapsed))
        .collect()
}

fn stat(a: &StatArgs) -> Res<()> {
    let cpu = cpu_percent(&a.pid, a.secs)?;
    for (&pid, cpu) in a.pid.iter().zip(cpu) {
        let rss = rss_kib(pid)?;
        println!(
            "pid {pid}: RSS {rss} KiB, CPU {cpu:.1} % over {:.1} s",
            a.secs
        );
        println!("RESULT stat pid={pid} rss_kib={rss} cpu_pct={cpu:.1}");
    }
    Ok(())
}

fn idle(a: &IdleArgs) -> Res<()> {
    let addr = resolve(&a.addr)?;
    let before: Vec<u64> = a.pid.iter().map(|&p| rss_kib(p)).collect::<Res<_>>()?;
    let opening = Instant::now();
    let mut conns = open_idle(addr, a.conns)?;
    let open_secs = opening.elapsed().as_secs_f64();
    // Let the targets finish their side (pairing, returning buffers).
    thread::sleep(Duration::from_secs_f64(a.hold));
    let held: Vec<u64> = a.pid.iter().map(|&p| rss_kib(p)).collect::<Res<_>>()?;
    let cpu = cpu_percent(&a.pid, 2.0)?;
    let checking = Instant::now();
    recheck(&mut conns)?;
    let check_secs = checking.elapsed().as_secs_f64();
    drop(conns);
    thread::sleep(Duration::from_secs(1));
    let after: Vec<u64> = a.pid.iter().map(|&p| rss_kib(p)).collect::<Res<_>>()?;
    println!(
        "idle {addr}: {} connections opened and echoed in {open_secs:.2} s; all echoed \
         again after {:.1} s held ({check_secs:.2} s)",
        a.conns, a.hold
    );
    for (i, &pid) in a.pid.iter().enumerate() {
        let per = (held[i] as f64 - before[i] as f64) * 1024.0 / a.conns as f64;
        println!(
            "  pid {pid}: RSS {} KiB before, {} KiB holding, {} KiB after closing; \
             {per:.0} B per client; CPU while held {:.1} %",
            before[i], held[i], after[i], cpu[i]
        );
        println!(
            "RESULT idle pid={pid} conns={} rss_before_kib={} rss_held_kib={} \
             rss_after_kib={} per_client_b={per:.0} cpu_held_pct={:.1} errors=0",
            a.conns, before[i], held[i], after[i], cpu[i]
        );
    }
    Ok(())
}

/// Opens `n` connections (on a few threads), each echoing once.
fn open_idle(addr: SocketAddr, n: usize) -> Res<Vec<TcpStream>> {
    const OPENERS: usize = 4;
    let per = n.div_ceil(OPENERS);
    let mut handles = Vec::new();
    for t in 0..OPENERS {
        let range = (t * per)..((t + 1) * per).min(n);
        let h = spawn(move || -> Res<Vec<TcpStream>> {
            let mut out = Vec::with_capacity(range.len());
            let (mut msg, mut back) = ([0; PROBE], [0; PROBE]);
            for i in range {
                let mut s = connect(addr).map_err(|e| format!("connection {i}: connect: {e}"))?;
                stamp(&mut msg, i, 0);
                echo_once(&mut s, &msg, &mut back).map_err(|e| format!("connection {i}: {e}"))?;
                out.push(s);
            }
            Ok(out)
        })
        .map_err(|e| format!("spawn: {e}"))?;
        handles.push(h);
    }
    let mut all = Vec::with_capacity(n);
    for h in handles {
        all.extend(h.join().unwrap_or_else(|_| Err("opener panicked".into()))?);
    }
    Ok(all)
}

/// Every held connection must still echo, with its own bytes.
fn recheck(conns: &mut [TcpStream]) -> Res<()> {
    let (mut msg, mut back) = ([0; PROBE], [0; PROBE]);
    for (i, s) in conns.iter_mut().enumerate() {
        stamp(&mut msg, i, 1);
        echo_once(s, &msg, &mut back).map_err(|e| format!("held connection {i}: {e}"))?;
    }
    Ok(())
}

fn free_port() -> Res<()> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    let port = listener.local_addr().map_err(|e| e.to_string())?.port();
    println!("{port}");
    Ok(())
}

// ---- burst ---------------------------------------------------------------

mod burst {
    //! Issue 9's load: N clients released at once by one barrier, each
    //! streaming B bytes full duplex through the target (bulk's pattern,
    //! checked byte for byte), while a sampler thread keeps the peak RSS of
    //! the processes serving them. A client is served (every byte and the
    //! end of stream came back), lost (refused, reset or ended before its
    //! first echoed byte: what the user saw) or failed (cut off later).

    use std::net::{Shutdown, SocketAddr, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
    use std::sync::{Arc, Barrier, Mutex, MutexGuard, OnceLock, PoisonError};
    use std::thread;
    use std::time::{Duration, Instant};

    use super::{
        BURST_CONNECT_TIMEOUT, BurstArgs, Cause, Cut, IO_TIMEOUT, RSS_PERIOD, Res, connect_within,
        duplex, mib, offset, pattern, rank, resolve, rss_kib, spawn, status_kib,
    };

    /// Every cause a client can be lost by, in the order reported.
    const CAUSES: [(Cause, &str); 7] = [
        (Cause::Connect, "connect"),
        (Cause::Reset, "reset"),
        (Cause::Eof, "eof"),
        (Cause::Timeout, "timeout"),
        (Cause::Deadline, "deadline"),
        (Cause::Local, "local"),
        (Cause::Other, "other"),
    ];
    /// Errors printed in full (the rest are only counted).
    const SHOWN_ERRORS: usize = 5;

    /// What every client thread shares.
    struct Shared {
        addr: SocketAddr,
        clients: usize,
        bytes: u64,
        ramp: Duration,
        io_timeout: Duration,
        pattern: Arc<Vec<u8>>,
        barrier: Barrier,
        release: OnceLock<Instant>, // set by the first thread past the barrier
        open: Open,
    }

    /// How one client ended.
    struct End {
        client: usize,
        secs: f64, // from its start (the release, plus its share of the ramp) to its end
        cut: Option<Cut>, // None: served
    }

    pub fn run(a: &BurstArgs) -> Res<()> {
        let shared = Arc::new(shared(a)?);
        let (tx, rx) = mpsc::channel();
        for i in 0..a.clients {
            let (s, tx) = (shared.clone(), tx.clone());
            spawn(move || {
                let _ = tx.send(client(i, &s));
            })
            .map_err(|e| format!("spawn client {i}: {e}"))?;
        }
        drop(tx);
        let sampler = Sampler::start(&a.pid)?;
        shared.barrier.wait();
        let release = *shared.release.get_or_init(Instant::now);
        let deadline = release + Duration::from_secs_f64(a.deadline_secs);
        let ends = collect(&rx, a.clients, deadline, &shared.open);
        let wall = release.elapsed().as_secs_f64();
        let (peaks, kernel) = sampler.finish();
        report(a, shared.addr, ends, wall, &peaks, &kernel)
    }

    fn shared(a: &BurstArgs) -> Res<Shared> {
        let sane = |x: f64| x.is_finite() && x >= 0.0;
        if a.clients == 0 || !sane(a.ramp_secs) || !sane(a.deadline_secs) {
            return Err("burst: --clients must be at least 1, seconds finite and >= 0".into());
        }
        if a.ramp_secs >= a.deadline_secs {
            return Err("burst: --ramp-secs must be shorter than --deadline-secs".into());
        }
        Ok(Shared {
            addr: resolve(&a.addr)?,
            clients: a.clients,
            bytes: a.bytes,
            ramp: Duration::from_secs_f64(a.ramp_secs),
            io_timeout: Duration::from_secs_f64(a.io_timeout_secs),
            pattern: Arc::new(pattern()),
            // Every client and the main thread, which starts the sampler first.
            barrier: Barrier::new(a.clients + 1),
            release: OnceLock::new(),
            open: Open::new(a.clients),
        })
    }

    /// One client: waits for the release, connects (client i of N a share
    /// i/N into the ramp), streams, and says how it ended.
    fn client(i: usize, s: &Shared) -> End {
        s.barrier.wait();
        let release = *s.release.get_or_init(Instant::now);
        let began = release + s.ramp.mul_f64(i as f64 / s.clients as f64);
        thread::sleep(began.saturating_duration_since(Instant::now()));
        let cut = stream(i, s, began).err().map(|mut cut| {
            if s.open.is_cut() && cut.cause != Cause::Connect {
                cut.cause = Cause::Deadline;
            }
            cut
        });
        End {
            client: i,
            secs: began.elapsed().as_secs_f64(),
            cut,
        }
    }

    /// Connects and runs bulk's full-duplex stream; served means every
    /// byte back and then the end of stream (half-close carried).
    fn stream(i: usize, s: &Shared, began: Instant) -> Result<(), Cut> {
        let stream = connect_within(s.addr, BURST_CONNECT_TIMEOUT).map_err(|e| Cut {
            echoed: 0,
            cause: Cause::Connect,
            why: format!("connect: {e}"),
        })?;
        let timeouts = stream
            .set_read_timeout(Some(s.io_timeout))
            .and_then(|()| stream.set_write_timeout(Some(s.io_timeout)));
        timeouts.map_err(|e| Cut {
            echoed: 0,
            cause: Cause::Local,
            why: format!("set timeouts: {e}"),
        })?;
        let stream = Arc::new(stream);
        s.open.hold(i, &stream);
        let times = duplex(stream, s.pattern.clone(), offset(i), s.bytes, began);
        s.open.release(i);
        if times?.eof {
            return Ok(());
        }
        Err(Cut {
            echoed: s.bytes,
            cause: Cause::Other,
            why: "no end of stream after the echo".into(),
        })
    }

    /// Gathers the clients' ends until all are in or the deadline passes;
    /// then cuts every open socket off and waits for the rest, which takes
    /// at most a connect still retrying SYNs and one blocked call.
    fn collect(rx: &Receiver<End>, n: usize, deadline: Instant, open: &Open) -> Vec<End> {
        let mut ends = Vec::with_capacity(n);
        let mut limit = deadline;
        while ends.len() < n {
            match rx.recv_timeout(limit.saturating_duration_since(Instant::now())) {
                Ok(end) => ends.push(end),
                Err(RecvTimeoutError::Timeout) if !open.is_cut() => {
                    open.cut_all();
                    limit = Instant::now() + BURST_CONNECT_TIMEOUT + IO_TIMEOUT;
                }
                // Grace spent, or every client thread gone.
                Err(_) => break,
            }
        }
        ends
    }

    /// The clients' sockets while they stream, so that the deadline can
    /// shut every one down (which unblocks its reader and writer).
    struct Open(Mutex<Sockets>);

    struct Sockets {
        cut: bool,                         // the deadline passed
        held: Vec<Option<Arc<TcpStream>>>, // by client
    }

    impl Open {
        fn new(n: usize) -> Open {
            Open(Mutex::new(Sockets {
                cut: false,
                held: vec![None; n],
            }))
        }

        fn lock(&self) -> MutexGuard<'_, Sockets> {
            self.0.lock().unwrap_or_else(PoisonError::into_inner)
        }

        /// Keeps client `i`'s socket, or shuts it at once past the deadline.
        fn hold(&self, i: usize, stream: &Arc<TcpStream>) {
            let mut open = self.lock();
            if open.cut {
                let _ = stream.shutdown(Shutdown::Both);
            } else {
                open.held[i] = Some(stream.clone());
            }
        }

        fn release(&self, i: usize) {
            let done = self.lock().held[i].take();
            drop(done); // the last reference closes the socket, outside the lock
        }

        fn cut_all(&self) {
            let mut open = self.lock();
            open.cut = true;
            for stream in open.held.iter().flatten() {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }

        fn is_cut(&self) -> bool {
            self.lock().cut
        }
    }

    /// Samples the RSS of some processes and the kernel's TCP memory every
    /// RSS_PERIOD on its own thread, keeping each one's peak.
    struct Sampler {
        pids: Vec<u32>,
        before: Vec<u64>,           // KiB at the start
        counters: Vec<Option<u64>>, // KERNEL_COUNTERS at the start
        stop: Arc<AtomicBool>,
        thread: thread::JoinHandle<(Vec<u64>, u64)>, // RSS peaks, TCP memory peak
    }

    /// One process's memory over the run, in KiB.
    struct Peak {
        pid: u32,
        before: u64,
        peak: u64,        // highest VmRSS sampled
        hwm: Option<u64>, // VmHWM: the peak over the process's whole life
    }

    impl Sampler {
        fn start(pids: &[u32]) -> Res<Sampler> {
            let before: Vec<u64> = pids.iter().map(|&p| rss_kib(p)).collect::<Res<_>>()?;
            let stop = Arc::new(AtomicBool::new(false));
            let (flag, watched, mut peak) = (stop.clone(), pids.to_vec(), before.clone());
            let thread = spawn(move || {
                let mut tcp_peak = 0;
                while !flag.load(Ordering::Relaxed) {
                    for (p, &pid) in peak.iter_mut().zip(&watched) {
                        // A process that exited keeps the peak it reached.
                        if let Ok(kib) = rss_kib(pid) {
                            *p = (*p).max(kib);
                        }
                    }
                    tcp_peak = tcp_peak.max(tcp_mem_pages().unwrap_or(0));
                    thread::sleep(RSS_PERIOD);
                }
                (peak, tcp_peak)
            })
            .map_err(|e| format!("spawn sampler: {e}"))?;
            Ok(Sampler {
                pids: pids.to_vec(),
                before,
                counters: tcp_ext(),
                stop,
                thread,
            })
        }

        fn finish(self) -> (Vec<Peak>, Kernel) {
            self.stop.store(true, Ordering::Relaxed);
            let (peaks, tcp_peak) = match self.thread.join() {
                Ok(sampled) => sampled,
                Err(_) => (self.before.clone(), 0),
            };
            let rows = self.pids.iter().zip(self.before.iter().zip(peaks));
            let peaks = rows
                .map(|(&pid, (&before, peak))| Peak {
                    pid,
                    before,
                    peak,
                    hwm: status_kib(pid, "VmHWM").ok(),
                })
                .collect();
            let grew = self.counters.iter().zip(tcp_ext());
            let kernel = Kernel {
                tcp_peak,
                limits: tcp_mem_limits(),
                grew: grew.map(|(was, now)| now?.checked_sub((*was)?)).collect(),
            };
            (peaks, kernel)
        }
    }

    /// TcpExt counters (`/proc/net/netstat`) that tell whether the kernel
    /// itself dropped or reset connections during the run, with the names
    /// they are reported under.
    const KERNEL_COUNTERS: [(&str, &str); 8] = [
        ("ListenOverflows", "listen_overflows"), // accept queue full: SYN or ACK dropped
        ("SyncookiesSent", "syncookies_sent"),   // SYN queue full
        ("TCPMemoryPressures", "mem_pressures"), // TCP memory went over tcp_mem[1]
        ("TCPRcvQDrop", "rcvq_drops"),           // segment dropped: no memory to queue it
        ("TCPAbortOnMemory", "aborts_on_memory"), // reset: out of TCP memory
        ("TCPTimeouts", "rto_timeouts"),         // retransmission timer fired
        ("TCPAbortOnClose", "resets_on_close"),  // reset: closed with bytes unread
        ("TCPAbortOnData", "resets_on_data"),    // reset: bytes came after the close
    ];

    /// The kernel's side of the run, system-wide (other processes' traffic
    /// counts too): loopback TCP over `tcp_mem` drops segments and stalls
    /// every path alike, so a loss means little without this.
    struct Kernel {
        tcp_peak: u64,              // pages allocated to TCP, highest sampled
        limits: Option<(u64, u64)>, // tcp_mem: pressure mark and hard limit, pages
        grew: Vec<Option<u64>>,     // growth of each of KERNEL_COUNTERS
    }

    /// The current value of each of KERNEL_COUNTERS (None: not found).
    fn tcp_ext() -> Vec<Option<u64>> {
        let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
        // A line of names, then a line of values, both starting "TcpExt:".
        let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
        let (names, values) = (lines.next().unwrap_or(""), lines.next().unwrap_or(""));
        let pairs: Vec<(&str, &str)> = names
            .split_whitespace()
            .zip(values.split_whitespace())
            .collect();
        let value = |name: &str| pairs.iter().find(|(n, _)| *n == name)?.1.parse().ok();
        KERNEL_COUNTERS
            .iter()
            .map(|(name, _)| value(name))
            .collect()
    }

    /// Pages allocated to TCP right now (`mem` of `/proc/net/sockstat`).
    fn tcp_mem_pages() -> Option<u64> {
        let text = std::fs::read_to_string("/proc/net/sockstat").ok()?;
        let tcp = text.lines().find_map(|l| l.strip_prefix("TCP:"))?;
        let mut words = tcp.split_whitespace();
        words.find(|w| *w == "mem")?;
        words.next()?.parse().ok()
    }

    /// `tcp_mem`'s pressure mark and hard limit, in pages.
    fn tcp_mem_limits() -> Option<(u64, u64)> {
        let text = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_mem").ok()?;
        let mut pages = text.split_whitespace().map(|w| w.parse().ok());
        let _low: Option<u64> = pages.next()?;
        Some((pages.next()??, pages.next()??))
    }

    /// The clients' ends, counted.
    struct Count {
        served: usize,
        lost: [usize; CAUSES.len()], // by cause, as CAUSES
        failed: usize,
        unfinished: usize, // never reported (counted as failed too)
        deadline: usize,   // cut off by the deadline, lost or failed, or unfinished
        echoed: u64,       // bytes echoed back and checked, all clients
        served_secs: Vec<f64>,
    }

    impl Count {
        fn of(ends: &[End], clients: usize, bytes: u64) -> Count {
            let unfinished = clients - ends.len();
            let mut c = Count {
                served: 0,
                lost: [0; CAUSES.len()],
                failed: unfinished,
                unfinished,
                deadline: unfinished,
                echoed: 0,
                served_secs: Vec::new(),
            };
            for end in ends {
                let cause = end.cut.as_ref().map(|cut| cut.cause);
                c.deadline += usize::from(cause == Some(Cause::Deadline));
                match &end.cut {
                    None => {
                        c.served += 1;
                        c.echoed += bytes;
                        c.served_secs.push(end.secs);
                    }
                    Some(cut) if cut.echoed == 0 => {
                        let at = CAUSES.iter().position(|(k, _)| *k == cut.cause);
                        c.lost[at.unwrap_or(CAUSES.len() - 1)] += 1;
                    }
                    Some(cut) => {
                        c.failed += 1;
                        c.echoed += cut.echoed;
                    }
                }
            }
            c.served_secs.sort_unstable_by(f64::total_cmp);
            c
        }

        fn lost(&self) -> usize {
            self.lost.iter().sum()
        }

        /// The `q` quantile of the served clients' times, in ms.
        fn quantile_ms(&self, q: f64) -> f64 {
            match self.served_secs.len() {
                0 => 0.0,
                n => self.served_secs[rank(n, q)] * 1000.0,
            }
        }
    }

    fn report(
        a: &BurstArgs,
        addr: SocketAddr,
        mut ends: Vec<End>,
        wall: f64,
        peaks: &[Peak],
        kernel: &Kernel,
    ) -> Res<()> {
        ends.sort_unstable_by_key(|e| e.client);
        let c = Count::of(&ends, a.clients, a.bytes);
        let rate = mib(c.echoed as f64) / wall;
        let times = [0.5, 0.99, 1.0].map(|q| c.quantile_ms(q));
        let [p50, p99, max] = times;
        println!(
            "burst {addr}: {} clients x {} B each way, connecting at once{}: {} served, {} lost, \
             {} failed ({} never ended); {:.0} MiB echoed in {wall:.2} s = {rate:.0} MiB/s; \
             served in p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms",
            a.clients,
            a.bytes,
            ramp_note(a.ramp_secs),
            c.served,
            c.lost(),
            c.failed,
            c.unfinished,
            mib(c.echoed as f64)
        );
        let by_cause: Vec<String> = CAUSES
            .iter()
            .zip(c.lost)
            .map(|((_, name), n)| format!("{name} {n}"))
            .collect();
        println!(
            "  lost by cause: {}; {} cut off by the {} s deadline",
            by_cause.join(", "),
            c.deadline,
            a.deadline_secs
        );
        print_errors(&ends);
        print_result(a, &c, wall, rate, times);
        print_peaks(peaks);
        print_kernel(kernel);
        match c.lost() + c.failed {
            0 => Ok(()),
            _ => Err(format!(
                "burst: {} of {} clients lost, {} failed",
                c.lost(),
                a.clients,
                c.failed
            )),
        }
    }

    /// The first few clients that were not served, and why.
    fn print_errors(ends: &[End]) {
        let cuts = ends
            .iter()
            .filter_map(|e| Some((e.client, e.cut.as_ref()?)));
        for (client, cut) in cuts.take(SHOWN_ERRORS) {
            println!(
                "  client {client}: {} (after {} B echoed)",
                cut.why, cut.echoed
            );
        }
    }

    fn ramp_note(secs: f64) -> String {
        if secs > 0.0 {
            format!(" (spread over {secs} s)")
        } else {
            String::new()
        }
    }

    /// `times`: p50, p99 and max of the served clients' times, in ms.
    fn print_result(a: &BurstArgs, c: &Count, wall: f64, rate: f64, times: [f64; 3]) {
        let [p50, p99, max] = times;
        let by_cause: String = CAUSES
            .iter()
            .zip(c.lost)
            .map(|((_, name), n)| format!(" lost_{name}={n}"))
            .collect();
        println!(
            "RESULT burst clients={} served={} lost={} failed={} mib_s={rate:.0} secs={wall:.3} \
             p50_ms={p50:.0} p99_ms={p99:.0} max_ms={max:.0}{by_cause} unfinished={} \
             cut_at_deadline={}",
            a.clients,
            c.served,
            c.lost(),
            c.failed,
            c.unfinished,
            c.deadline
        );
    }

    fn print_peaks(peaks: &[Peak]) {
        for p in peaks {
            let hwm = p.hwm.map_or("-".to_string(), |k| k.to_string());
            println!(
                "  pid {}: RSS {} KiB before, peak {} KiB (sampled every {} ms), VmHWM {hwm} KiB",
                p.pid,
                p.before,
                p.peak,
                super::RSS_PERIOD.as_millis()
            );
            println!(
                "RESULT burst_rss pid={} rss_before_kib={} peak_rss_kib={} hwm_kib={hwm}",
                p.pid, p.before, p.peak
            );
        }
    }

    fn print_kernel(k: &Kernel) {
        let show = |v: Option<u64>| v.map_or("-".to_string(), |n| n.to_string());
        let (pressure, max) = (k.limits.map(|l| l.0), k.limits.map(|l| l.1));
        let pct = pressure.map(|p| (k.tcp_peak * 100).div_ceil(p.max(1)));
        let counters: Vec<(&str, String)> = KERNEL_COUNTERS
            .iter()
            .zip(&k.grew)
            .map(|((_, key), n)| (*key, show(*n)))
            .collect();
        let listed: Vec<String> = counters.iter().map(|(k, n)| format!("{k} {n}")).collect();
        println!(
            "  kernel, system-wide: TCP memory peak {} pages = {} % of tcp_mem's pressure mark \
             ({} pages, hard limit {}); {}",
            k.tcp_peak,
            show(pct),
            show(pressure),
            show(max),
            listed.join(", ")
        );
        let keyed: String = counters.iter().map(|(k, n)| format!(" {k}={n}")).collect();
        println!(
            "RESULT burst_kernel tcp_mem_peak_pages={} tcp_mem_pressure_pages={} \
             tcp_mem_max_pages={} tcp_mem_peak_pct={}{keyed}",
            k.tcp_peak,
            show(pressure),
            show(max),
            show(pct)
        );
    }
}

// ---- echo server -----------------------------------------------------------

mod echo {
    //! A small echo server: one mio loop per thread, each with its own
    //! listener on the same port (`SO_REUSEPORT`: the kernel spreads
    //! connections over them). One read buffer per loop; a connection
    //! holds bytes only while its peer is not taking the echo (then we stop
    //! reading it: backpressure). Half-close is carried: the peer's EOF is
    //! answered with ours once everything was echoed, and the socket is
    //! kept until the peer has acknowledged every byte (as the relay does:
    //! a close would leave them to an orphan, which the kernel resets when
    //! TCP memory runs short, and the load would count the echo server's
    //! loss against the path it measures).

    use std::io::{self, Read, Write};
    use std::net::{Shutdown, SocketAddr};
    use std::time::{Duration, Instant};

    use mio::net::{TcpListener, TcpStream};
    use mio::{Events, Interest, Poll, Token};
    use slab::Slab;
    use socket2::{Domain, Socket, Type};

    use super::{EchoArgs, Res, resolve};

    const LISTENER: Token = Token(usize::MAX);
    /// Reads per connection per turn before others get a go.
    const BUDGET: usize = 16;
    const BUF: usize = 64 << 10;

    pub fn serve(a: &EchoArgs) -> Res<()> {
        let mut addr = resolve(&a.listen)?;
        let mut listeners = Vec::new();
        for _ in 0..a.threads.max(1) {
            let l = listen(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            addr = l.local_addr().map_err(|e| e.to_string())?;
            listeners.push(l);
        }
        println!("{addr}");
        let _ = io::stdout().flush();
        let deadline = Instant::now() + Duration::from_secs_f64(a.secs);
        let proxy = a.proxy_header;
        let handles: Vec<_> = listeners
            .into_iter()
            .map(|l| std::thread::spawn(move || run(l, deadline, proxy)))
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| "echo loop panicked".to_string())?
                .map_err(|e| format!("echo loop failed: {e}"))?;
        }
        Ok(())
    }

    fn listen(addr: SocketAddr) -> io::Result<TcpListener> {
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket.set_reuse_port(true)?;
        socket.bind(&addr.into())?;
        socket.listen(4096)?;
        socket.set_nonblocking(true)?;
        Ok(TcpListener::from_std(socket.into()))
    }

    struct Conn {
        stream: TcpStream,
        pending: Vec<u8>, // read but not yet echoed (the peer is slow)
        readable: bool,   // set by events, cleared by WouldBlock
        writable: bool,
        eof: bool,               // the peer shut its write half
        header: Option<Vec<u8>>, // (--proxy-header) the PROXY header so far, until whole
    }

    enum Step {
        Wait,  // nothing more until an event
        Again, // budget spent with work left
        Close,
        Linger, // done: close once the peer has every byte
    }

    /// How long a finished connection is kept for its peer to acknowledge
    /// the last bytes, and how often that is checked.
    const LINGER: Duration = Duration::from_secs(30);
    const LINGER_CHECK: Duration = Duration::from_millis(10);

    /// Bytes written to `stream` not yet acknowledged (`SIOCOUTQ`), or 0
    /// once the socket has an error (nothing more will be delivered).
    fn unacked(stream: &TcpStream) -> usize {
        use std::os::fd::AsRawFd;
        if !matches!(stream.take_error(), Ok(None)) {
            return 0;
        }
        let mut queued: libc::c_int = 0;
        // SAFETY: SIOCOUTQ writes one int through the pointer; the
        // descriptor is open while `stream` lives.
        let done = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &raw mut queued) };
        if done == 0 {
            usize::try_from(queued).unwrap_or(0)
        } else {
            0
        }
    }

    fn run(mut listener: TcpListener, deadline: Instant, proxy: bool) -> io::Result<()> {
        let mut poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let mut events = Events::with_capacity(1024);
        let mut conns: Slab<Conn> = Slab::new();
        let mut buf = vec![0u8; BUF];
        let mut again: Vec<usize> = Vec::new();
        let mut lingering: Vec<(TcpStream, Instant)> = Vec::new();
        let mut next_check = Instant::now();
        while Instant::now() < deadline {
            let now = Instant::now();
            // Two syscalls per lingering socket: every LINGER_CHECK, not on
            // every wake-up of a loop that is busy echoing.
            if now >= next_check {
                lingering.retain(|(stream, since)| now < *since + LINGER && unacked(stream) > 0);
                next_check = now + LINGER_CHECK;
            }
            let timeout = if !again.is_empty() {
                Duration::ZERO
            } else if !lingering.is_empty() {
                next_check.saturating_duration_since(now)
            } else {
                deadline.saturating_duration_since(now)
            };
            if let Err(e) = poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            let mut ready = std::mem::take(&mut again);
            for event in events.iter() {
                if event.token() == LISTENER {
                    accept(&listener, &poll, &mut conns, &mut ready, proxy);
                    continue;
                }
                if let Some(c) = conns.get_mut(event.token().0) {
                    c.readable |= event.is_readable() || event.is_read_closed() || event.is_error();
                    c.writable |=
                        event.is_writable() || event.is_write_closed() || event.is_error();
                    ready.push(event.token().0);
                }
            }
            for key in ready {
                let Some(c) = conns.get_mut(key) else {
                    continue;
                };
                match pump(c, &mut buf) {
                    Step::Wait => {}
                    Step::Again => again.push(key),
                    Step::Close => {
                        let mut c = conns.remove(key);
                        let _ = poll.registry().deregister(&mut c.stream);
                        again.retain(|&k| k != key);
                    }
                    Step::Linger => {
                        let mut c = conns.remove(key);
                        let _ = poll.registry().deregister(&mut c.stream);
                        again.retain(|&k| k != key);
                        if unacked(&c.stream) > 0 {
                            lingering.push((c.stream, Instant::now()));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    fn accept(
        listener: &TcpListener,
        poll: &Poll,
        conns: &mut Slab<Conn>,
        ready: &mut Vec<usize>,
        proxy: bool,
    ) {
        loop {
            match listener.accept() {
                Ok((mut stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    let entry = conns.vacant_entry();
                    let interest = Interest::READABLE | Interest::WRITABLE;
                    if poll
                        .registry()
                        .register(&mut stream, Token(entry.key()), interest)
                        .is_err()
                    {
                        continue;
                    }
                    ready.push(entry.key());
                    entry.insert(Conn {
                        stream,
                        pending: Vec::new(),
                        readable: true,
                        writable: true,
                        eof: false,
                        header: proxy.then(Vec::new),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Out of descriptors or similar: try again on the next event.
                Err(_) => return,
            }
        }
    }

    /// Echoes what is readable, keeping what the peer cannot take yet.
    fn pump(c: &mut Conn, buf: &mut [u8]) -> Step {
        for _ in 0..BUDGET {
            if !c.pending.is_empty() {
                if !c.writable {
                    return Step::Wait;
                }
                match c.stream.write(&c.pending) {
                    Ok(n) => {
                        c.pending.drain(..n);
                        if c.pending.is_empty() {
                            c.pending = Vec::new();
                        }
                        continue;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        c.writable = false;
                        return Step::Wait;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(_) => return Step::Close,
                }
            }
            if c.eof {
                let _ = c.stream.shutdown(Shutdown::Write);
                return Step::Linger;
            }
            if !c.readable {
                return Step::Wait;
            }
            match c.stream.read(buf) {
                Ok(0) => c.eof = true,
                Ok(n) => {
                    let data = match c.header.as_mut() {
                        Some(header) => match strip_header(header, &buf[..n]) {
                            Header::Partial => continue,
                            Header::Bad => return Step::Close,
                            Header::Rest(rest) => {
                                c.header = None;
                                rest
                            }
                        },
                        None => buf[..n].to_vec(),
                    };
                    if let Err(()) = echo_now(c, &data) {
                        return Step::Close;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.readable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Step::Close,
            }
        }
        Step::Again
    }

    enum Header {
        Partial,       // not all of it yet
        Bad,           // not a PROXY header
        Rest(Vec<u8>), // whole: what came after it
    }

    /// The v2 signature (HAProxy's PROXY protocol specification, 2.2).
    const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

    /// Adds `data` to the header read so far; once it is whole (a v1 line
    /// up to CRLF, or v2's 16 bytes and the length they give), the bytes
    /// after it. Only the framing is checked: the relay wrote it.
    fn strip_header(header: &mut Vec<u8>, data: &[u8]) -> Header {
        header.extend_from_slice(data);
        let len = if header.starts_with(b"PROXY ") {
            match header.windows(2).position(|w| w == b"\r\n") {
                Some(at) => at + 2,
                None if header.len() < 108 => return Header::Partial,
                None => return Header::Bad,
            }
        } else if header.len() < 16 {
            let prefix = |of: &[u8]| of.starts_with(header) || header.starts_with(of);
            return if prefix(V2_SIGNATURE) || prefix(b"PROXY ") {
                Header::Partial
            } else {
                Header::Bad
            };
        } else if header.starts_with(V2_SIGNATURE) {
            16 + usize::from(u16::from_be_bytes([header[14], header[15]]))
        } else {
            return Header::Bad;
        };
        if header.len() < len {
            return Header::Partial;
        }
        Header::Rest(header.split_off(len))
    }

    /// Writes `data` back at once; what does not fit waits in `pending`.
    fn echo_now(c: &mut Conn, data: &[u8]) -> Result<(), ()> {
        let mut at = 0;
        while at < data.len() && c.writable {
            match c.stream.write(&data[at..]) {
                Ok(n) => at += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return Err(()),
            }
        }
        c.pending.extend_from_slice(&data[at..]);
        Ok(())
    }
}
