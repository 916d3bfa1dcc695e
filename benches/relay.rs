//! Relay versus direct loopback: bulk throughput of one and of eight
//! concurrent full-duplex streams, and the round trip of a 64-byte message.
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

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, Criterion, SamplingMode, Throughput};
use tcp_relay::{Config, EchoApp, Relay, RunningEcho, RunningRelay};

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

/// Sends `bytes` pattern bytes on every stream and reads back and checks
/// the `bytes` echoed on each, all streams at once and both directions of
/// each at once, as real streams do.
fn bulk_round(streams: &[TcpStream], pattern: &[u8], bytes: usize) -> io::Result<()> {
    thread::scope(|s| {
        let rounds: Vec<_> = streams
            .iter()
            .map(|stream| s.spawn(move || duplex(stream, pattern, bytes)))
            .collect();
        // Join every stream before giving the first error, if any.
        let mut result = Ok(());
        for round in rounds {
            result = result.and(round.join().expect("stream thread panicked"));
        }
        result
    })
}

/// Sends `bytes` pattern bytes on one thread while reading and checking the
/// echoed `bytes` on this one.
fn duplex(stream: &TcpStream, pattern: &[u8], bytes: usize) -> io::Result<()> {
    let mut writer = stream.try_clone()?;
    thread::scope(|s| {
        let sender = s.spawn(move || -> io::Result<()> {
            let mut sent = 0;
            while sent < bytes {
                let n = CHUNK.min(bytes - sent);
                let at = sent % PERIOD;
                writer.write_all(&pattern[at..at + n])?;
                sent += n;
            }
            Ok(())
        });
        let received = check_echo(stream, pattern, bytes);
        if received.is_err() {
            // Unblock the sender, which may wait for room the echo never frees.
            let _ = stream.shutdown(Shutdown::Both);
        }
        let sent = sender.join().expect("sender thread panicked");
        sent.and(received)
    })
}

/// Reads exactly `bytes` bytes and compares them with the pattern.
fn check_echo(mut stream: &TcpStream, pattern: &[u8], bytes: usize) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0;
    while got < bytes {
        let want = CHUNK.min(bytes - got);
        let n = stream.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("stream ended after {got} of {bytes} bytes"),
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

/// A bulk benchmark: `streams` concurrent connections, each sending (and
/// getting back) `per_stream` bytes per iteration.
struct Bulk {
    streams: usize,
    per_stream: usize,
}

impl Bulk {
    /// Bytes each way per iteration, over all streams.
    fn total(&self) -> usize {
        self.streams * self.per_stream
    }

    fn describe(&self) -> String {
        let (n, mib) = (self.streams, self.per_stream >> 20);
        let streams = if n == 1 { "stream" } else { "streams" };
        format!("{n} {streams} x {mib} MiB each way")
    }
}

const BULKS: [Bulk; 2] = [
    Bulk {
        streams: 1,
        per_stream: 64 << 20,
    },
    Bulk {
        streams: 8,
        per_stream: 16 << 20,
    },
];

/// Samples per benchmark: criterion's minimum for the bulk rounds (taken
/// flat, so a slow iteration cannot stretch the run), more for the cheap
/// round trips.
const BULK_SAMPLES: usize = 10;
const PING_SAMPLES: usize = 50;

/// Benchmarks `round` on each path, on `connections` streams opened to that
/// path beforehand, and tallies what each path timed.
fn bench_paths(
    group: &mut BenchmarkGroup<'_, WallTime>,
    addrs: [SocketAddr; 2],
    tallies: &Tallies,
    connections: usize,
    round: impl Fn(&[TcpStream]) -> io::Result<()>,
) {
    for ((name, addr), tally) in PATHS.iter().zip(addrs).zip(tallies) {
        let streams: Vec<_> = (0..connections).map(|_| connect(addr)).collect();
        group.bench_function(*name, |b| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                for _ in 0..iters {
                    round(&streams).expect(name);
                }
                let elapsed = start.elapsed();
                tally.lock().expect("tally").add(iters, elapsed);
                elapsed
            })
        });
    }
}

fn bench_throughput(c: &mut Criterion, bulk: &Bulk, addrs: [SocketAddr; 2], tallies: &Tallies) {
    let pattern = pattern();
    let name = format!(
        "bulk_{}x{}MiB_echo_full_duplex",
        bulk.streams,
        bulk.per_stream >> 20
    );
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Bytes(bulk.total() as u64));
    group.sample_size(BULK_SAMPLES);
    group.sampling_mode(SamplingMode::Flat);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(6));
    bench_paths(&mut group, addrs, tallies, bulk.streams, |streams| {
        bulk_round(streams, &pattern, bulk.per_stream)
    });
    group.finish();
}

fn bench_latency(c: &mut Criterion, addrs: [SocketAddr; 2], tallies: &Tallies) {
    let mut message = [0u8; MESSAGE];
    message.copy_from_slice(&pattern()[..MESSAGE]);
    let mut group = c.benchmark_group("round_trip_64B");
    group.sample_size(PING_SAMPLES);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    bench_paths(&mut group, addrs, tallies, 1, |streams| {
        ping(&streams[0], &message)
    });
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
    let bulk = BULKS.each_ref().map(|_| Tallies::default());
    let latency = Tallies::default();

    let mut c = Criterion::default().configure_from_args();
    for (case, tallies) in BULKS.iter().zip(&bulk) {
        bench_throughput(&mut c, case, addrs, tallies);
    }
    bench_latency(&mut c, addrs, &latency);
    c.final_summary();

    for (case, tallies) in BULKS.iter().zip(&bulk) {
        let mib_per_s = |secs: f64| case.total() as f64 / secs / f64::from(1 << 20);
        if let Some((relay, direct)) = medians(tallies, BULK_SAMPLES) {
            println!(
                "throughput ({}): relay {:.0} MiB/s, direct {:.0} MiB/s, relay/direct {:.2}",
                case.describe(),
                mib_per_s(relay),
                mib_per_s(direct),
                direct / relay
            );
        }
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
