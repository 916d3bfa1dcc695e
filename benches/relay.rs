//! Relay versus direct loopback: bulk throughput of one full-duplex stream,
//! and the round trip of a 64-byte message.
//!
//! Both sides run in this process, in the same run, so the ratio printed at
//! the end compares like with like on whatever machine runs it:
//!
//! - **relay**: a [`Relay`] on `127.0.0.1:0`, the sample [`EchoApp`]
//!   registered with it, and the client on the app's relayed port. Every byte
//!   crosses the relay twice (client -> dial-in, then the echo back).
//! - **direct**: the client on a plain echo server (a thread per connection,
//!   blocking `read`/`write_all`), which is what the relay's path is measured
//!   against.
//!
//! Every byte that comes back is checked against the pattern that was sent.

use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant};

use criterion::{Criterion, Throughput};
use tcp_relay::{Config, EchoApp, Relay, RunningEcho, RunningRelay};

/// Bytes sent (and echoed back) per bulk iteration.
const BULK: usize = 64 << 20;
/// Size of one write and of the read buffer.
const CHUNK: usize = 64 << 10;
/// Period of the byte pattern: a prime, so it never lines up with chunk
/// sizes or ring boundaries and a byte delivered out of place is caught.
const PERIOD: usize = 251;
/// Size of the latency probe.
const MESSAGE: usize = 64;

/// `PERIOD` + `CHUNK` bytes of the pattern `i % PERIOD`: the bytes from
/// stream offset `o` on are `pattern[o % PERIOD..]`, so sending and checking
/// a chunk are both a slice, with no per-byte arithmetic.
fn pattern() -> Vec<u8> {
    (0..PERIOD + CHUNK).map(|i| (i % PERIOD) as u8).collect()
}

/// Sends `BULK` pattern bytes on one thread while reading and checking the
/// echoed `BULK` on this one: both directions at once, as a real stream does.
fn bulk_round(stream: &TcpStream, pattern: &[u8]) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    thread::scope(|s| {
        let sender = s.spawn(move || -> io::Result<()> {
            let mut sent = 0;
            while sent < BULK {
                let n = CHUNK.min(BULK - sent);
                let at = sent % PERIOD;
                writer.write_all(&pattern[at..at + n])?;
                sent += n;
            }
            Ok(())
        });
        let received = check_echo(stream, pattern);
        if received.is_err() {
            // Unblock the sender, which may wait for room the echo never frees.
            let _ = stream.shutdown(Shutdown::Both);
        }
        let sent = sender.join().expect("sender thread panicked");
        sent.and(received)
    })
}

/// Reads exactly `BULK` bytes and compares them with the pattern.
fn check_echo(mut stream: &TcpStream, pattern: &[u8]) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0;
    while got < BULK {
        let want = CHUNK.min(BULK - got);
        let n = stream.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("stream ended after {got} of {BULK} bytes"),
            ));
        }
        let at = got % PERIOD;
        if buf[..n] != pattern[at..at + n] {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("echoed bytes differ near offset {got}"),
            ));
        }
        got += n;
    }
    Ok(())
}

/// One 64-byte message out and back, checked.
fn ping(mut stream: &TcpStream, message: &[u8; MESSAGE]) -> io::Result<()> {
    stream.write_all(message)?;
    let mut reply = [0u8; MESSAGE];
    stream.read_exact(&mut reply)?;
    if &reply != message {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "bad echo"));
    }
    Ok(())
}

/// A plain echo server for the direct baseline: a thread per connection.
fn direct_echo_server() -> io::Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    let addr = listener.local_addr()?;
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || echo_blocking(stream));
        }
    });
    Ok(addr)
}

fn echo_blocking(mut stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; CHUNK];
    loop {
        match stream.read(&mut buf)? {
            0 => return stream.shutdown(Shutdown::Write),
            n => stream.write_all(&buf[..n])?,
        }
    }
}

/// The in-process relay with an echo app registered on it.
struct RelayedEcho {
    addr: SocketAddr,    // the app's relayed port: where clients connect
    _app: RunningEcho,   // dropped before the relay (field order)
    relay: RunningRelay, // kept running for the whole bench
}

fn relayed_echo() -> io::Result<RelayedEcho> {
    let relay = Relay::bind(Config {
        bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
        reg_port: 0,
        ..Config::default()
    })?
    .spawn()?;
    let app = EchoApp::connect(relay.reg_addr())?.spawn()?;
    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), app.relayed_port());
    Ok(RelayedEcho {
        addr,
        _app: app,
        relay,
    })
}

/// A connection to `addr`, with one round trip made so that a relayed
/// client is already paired with its dial-in before anything is timed.
fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    ping(&stream, &[7; MESSAGE]).expect("first round trip");
    stream
}

/// What `iter_custom` timed, per path, for the ratio printed at the end
/// (criterion keeps its estimates to itself).
#[derive(Default)]
struct Tally {
    per_iteration: Vec<f64>, // seconds per iteration, one entry per call
}

impl Tally {
    fn add(&mut self, iterations: u64, elapsed: Duration) {
        self.per_iteration
            .push(elapsed.as_secs_f64() / iterations.max(1) as f64);
    }

    /// Median seconds per iteration over the last `samples` calls: criterion
    /// makes one call per sample after its warm-up calls, and the median
    /// shrugs off the odd sample another process on a shared machine spoiled.
    fn median(&self, samples: usize) -> Option<f64> {
        let from = self.per_iteration.len().saturating_sub(samples);
        let mut last = self.per_iteration[from..].to_vec();
        last.sort_by(f64::total_cmp);
        last.get(last.len() / 2).copied()
    }
}

/// [relay, direct] tallies for one benchmark.
type Tallies = [Mutex<Tally>; 2];

const PATHS: [&str; 2] = ["relay", "direct"];

/// Samples per benchmark: criterion's minimum for the 64 MiB rounds, more
/// for the cheap round trips.
const BULK_SAMPLES: usize = 10;
const PING_SAMPLES: usize = 50;

fn bench_throughput(c: &mut Criterion, addrs: [SocketAddr; 2], tallies: &Tallies) {
    let pattern = pattern();
    let mut group = c.benchmark_group("bulk_64MiB_echo_full_duplex");
    group.throughput(Throughput::Bytes(BULK as u64));
    group.sample_size(BULK_SAMPLES);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(8));
    for ((name, addr), tally) in PATHS.iter().zip(addrs).zip(tallies) {
        let stream = connect(addr);
        group.bench_function(*name, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    bulk_round(&stream, &pattern).expect("bulk transfer");
                }
                let elapsed = start.elapsed();
                tally.lock().expect("tally").add(iters, elapsed);
                elapsed
            })
        });
    }
    group.finish();
}

fn bench_latency(c: &mut Criterion, addrs: [SocketAddr; 2], tallies: &Tallies) {
    let mut message = [0u8; MESSAGE];
    message.copy_from_slice(&pattern()[..MESSAGE]);
    let mut group = c.benchmark_group("round_trip_64B");
    group.sample_size(PING_SAMPLES);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    for ((name, addr), tally) in PATHS.iter().zip(addrs).zip(tallies) {
        let stream = connect(addr);
        group.bench_function(*name, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    ping(&stream, &message).expect("round trip");
                }
                let elapsed = start.elapsed();
                tally.lock().expect("tally").add(iters, elapsed);
                elapsed
            })
        });
    }
    group.finish();
}

/// Median seconds per iteration of [relay, direct], when both ran.
fn medians(tallies: &Tallies, samples: usize) -> Option<(f64, f64)> {
    let [relay, direct] = tallies
        .each_ref()
        .map(|t| t.lock().expect("tally").median(samples));
    relay.zip(direct)
}

fn main() {
    let relayed = relayed_echo().expect("start the relay and its echo app");
    let direct = direct_echo_server().expect("start the direct echo server");
    let addrs = [relayed.addr, direct];
    let bulk = Tallies::default();
    let latency = Tallies::default();

    let mut c = Criterion::default().configure_from_args();
    bench_throughput(&mut c, addrs, &bulk);
    bench_latency(&mut c, addrs, &latency);
    c.final_summary();

    let mib_per_s = |secs: f64| BULK as f64 / secs / f64::from(1 << 20);
    if let Some((relay, direct)) = medians(&bulk, BULK_SAMPLES) {
        println!(
            "throughput (64 MiB each way): relay {:.0} MiB/s, direct {:.0} MiB/s, relay/direct {:.2}",
            mib_per_s(relay),
            mib_per_s(direct),
            direct / relay
        );
    }
    if let Some((relay, direct)) = medians(&latency, PING_SAMPLES) {
        println!(
            "64 B round trip: relay {:.1} us, direct {:.1} us, relay/direct {:.2}",
            relay * 1e6,
            direct * 1e6,
            relay / direct
        );
    }
    let stats = relayed.relay.stats();
    println!(
        "relay after the run: {} apps, {} pipes, {} buffers lent",
        stats.apps, stats.pipes, stats.buffers_lent
    );
}
