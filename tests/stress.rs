//! Randomized stress (issue 5, "Proof"): many clients through several apps at
//! once, each client and its dial-in following a script drawn from a seeded
//! generator: streams from nothing to a few MiB, random write and read sizes,
//! readers that stall while the other side keeps writing, half-closes from
//! either side in either order, and resets mid-transfer. Every byte that
//! should arrive arrives, in order; nothing that was not sent arrives; a reset
//! never looks like the clean end of a cut-short stream; and the relay ends up
//! holding no client, pipe or buffer.
//!
//! The seed is printed first and named in every failure:
//! `STRESS_SEED=<seed> cargo test --test stress <test name>` replays the same
//! scripts (the threads' timing, and so the interleaving, still differs from
//! run to run, so a timing-dependent failure may take a few runs to recur).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::RecvTimeoutError;
use std::thread::{self, Scope};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use tcp_relay::{EchoApp, RunningRelay};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;

/// Apps whose dial-ins this file answers with scripts; one `EchoApp` more.
const SCRIPTED_APPS: usize = 3;
/// Clients running at once, per test. A pair takes up to four threads (a
/// reader and a writer on each side), so both tests together stay under
/// 350 threads.
const CONCURRENT: usize = 40;
/// Pairs in which one side (or both) resets mid-transfer, in percent.
const RESET_PERCENT: u64 = 15;
/// Readers that stall now and then, in percent; a stall lasts 1 to
/// `MAX_STALL_MS`, at most four per reader, so stalls cost a pair < 0.25 s.
const STALL_PERCENT: u64 = 40;
const MAX_STALL_MS: u64 = 30;
/// Largest single read or write.
const MAX_CHUNK: u64 = 256 * KIB;
/// Fewest bytes per read or write on average for a stream of a given length,
/// as a divisor: keeps a 4 MiB stream to a few thousand syscalls (debug build).
const MAX_CALLS: u64 = 2048;

/// Every client stream starts with this header: `MAGIC` and the pair's id,
/// so the scripted app can tell which client a dial-in was paired with (the
/// relay pairs dial-ins with the oldest waiting client, not by line).
const HEADER_LEN: usize = 8;
const MAGIC: [u8; 4] = *b"STRS";

/// Length of the random table streams are cut from; odd, so that
/// power-of-two chunk sizes do not line up with its wrap.
const TABLE_LEN: usize = (1 << 20) + 7;

/// Interval for polling a condition (never a wait for an outcome: whatever
/// is polled is re-checked, under a deadline).
const POLL: Duration = Duration::from_millis(5);

/// How much one test runs.
#[derive(Debug, Clone, Copy)]
struct Load {
    clients_per_app: usize, // the echo app included
    max_stream: u64,        // longest stream one way
    tiny_rings: bool,       // relay rings of 64 B to 4 KiB instead of 64 KiB
    splice: bool,           // the relay splices through kernel pipes
}

/// The default relay: 200 clients, streams up to 4 MiB.
#[test]
fn random_clients_through_several_apps_get_exactly_their_bytes() {
    stress(Load {
        clients_per_app: 50,
        max_stream: 4 * MIB,
        tiny_rings: false,
        splice: false,
    });
}

/// The same through a relay that splices: bulk streams go through kernel
/// pipes, small messages through rings, and directions switch between them.
#[test]
fn random_clients_through_spliced_pipes_get_exactly_their_bytes() {
    stress(Load {
        clients_per_app: 40,
        max_stream: 2 * MIB,
        tiny_rings: false,
        splice: true,
    });
}

/// Rings of a few dozen bytes to 4 KiB (the seed picks the size), so that
/// every stream wraps its rings many times and backpressure is constant.
#[test]
fn random_clients_through_tiny_rings_get_exactly_their_bytes() {
    stress(Load {
        clients_per_app: 40,
        max_stream: 512 * KIB,
        tiny_rings: true,
        splice: false,
    });
}

/// One run: a relay, three scripted apps and an echo app, `load`'s clients
/// spread over them, `CONCURRENT` at a time; then every side's report is
/// judged, and the relay must be back to holding nothing but the apps.
fn stress(load: Load) {
    let seed = seed();
    let ring = load
        .tiny_rings
        .then(|| Rng(seed ^ 0x52_494E_4753).log_uniform(64, 4096) as usize); // "RINGS"
    eprintln!("stress seed {seed}, rings {ring:?} (rerun with STRESS_SEED={seed})");
    let relay = start_relay_with(|config| {
        if let Some(ring) = ring {
            config.buffer_size = ring;
        }
        config.splice = load.splice;
    });
    let mut apps: Vec<TestApp> = (0..SCRIPTED_APPS)
        .map(|_| TestApp::register(relay.reg_addr()))
        .collect();
    let echo = EchoApp::connect(relay.reg_addr()).expect("register the echo app");
    let mut addrs: Vec<SocketAddr> = apps.iter().map(|a| local(a.relayed_port)).collect();
    addrs.push(local(echo.relayed_port()));
    let echo = echo.spawn().expect("spawn the echo app");

    let run = Run::new(seed, load, addrs);
    let started = Instant::now();
    let max_pipes = run.go(&relay, &mut apps);
    let elapsed = started.elapsed();
    eprintln!(
        "stress seed {seed}, rings {ring:?}: {} pairs ({} with resets, {} MiB planned) \
         in {elapsed:?}, up to {max_pipes} pipes at once",
        run.pairs.len(),
        run.pairs.iter().filter(|p| p.resets()).count(),
        run.pairs.iter().map(Pair::planned).sum::<u64>() / MIB,
    );
    let problems = run.problems();
    assert!(
        problems.is_empty(),
        "stress seed {seed} (rerun with STRESS_SEED={seed}), {load:?}, rings {ring:?}: \
         {} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );

    // `assert_no_leftovers`, with the seed in the message.
    wait_for_stats(
        &relay,
        &format!("no waiting clients, pipes or lent buffers remain (seed {seed})"),
        |s| s.waiting_clients == 0 && s.pipes == 0 && s.buffers_lent == 0,
    );
    assert_eq!(
        relay.stats().apps,
        SCRIPTED_APPS + 1,
        "seed {seed}: every app is still registered"
    );
    drop(echo);
    drop(apps);
}

/// `STRESS_SEED` if set, else the clock.
fn seed() -> u64 {
    match std::env::var("STRESS_SEED") {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("STRESS_SEED={text:?} is not a u64: {e}")),
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("the clock is after 1970")
            .as_nanos() as u64,
    }
}

// ---------------------------------------------------------------------------
// Randomness

/// SplitMix64: tiny, seedable, good enough to draw scripts from.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(lo <= hi, "empty range {lo}..={hi}");
        match (hi - lo).checked_add(1) {
            Some(span) => lo + self.next() % span,
            None => self.next(),
        }
    }

    fn percent(&mut self, p: u64) -> bool {
        self.range(0, 99) < p
    }

    /// In `lo..=hi` (`lo >= 1`), uniform in the logarithm: small values as
    /// likely as large ones.
    fn log_uniform(&mut self, lo: u64, hi: u64) -> u64 {
        let (a, b) = ((lo as f64).ln(), ((hi + 1) as f64).ln());
        let unit = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((a + (b - a) * unit).exp() as u64).clamp(lo, hi)
    }

    /// An independent generator, so that one script's draws do not shift
    /// the next script's.
    fn fork(&mut self) -> Rng {
        Rng(self.next())
    }
}

// ---------------------------------------------------------------------------
// Streams and scripts

/// One direction's bytes: the header if any, then bytes of the shared random
/// table from `start` on, wrapping, up to `len` bytes in all. Senders and
/// receivers produce any part of it on demand, so nothing is buffered whole.
#[derive(Debug, Clone, Copy)]
struct Stream {
    header: Option<[u8; HEADER_LEN]>,
    start: usize,
    len: u64,
}

impl Stream {
    fn header_len(&self) -> usize {
        self.header.map_or(0, |h| h.len())
    }

    /// Fills `buf` with the stream's bytes from `offset` on.
    fn fill(&self, table: &[u8], offset: u64, buf: &mut [u8]) {
        let offset = offset as usize;
        let mut done = 0;
        if let Some(header) = &self.header
            && offset < HEADER_LEN
        {
            done = (HEADER_LEN - offset).min(buf.len());
            buf[..done].copy_from_slice(&header[offset..offset + done]);
            if done == buf.len() {
                return;
            }
        }
        let body = offset + done - self.header_len();
        let mut at = (self.start + body) % table.len();
        while done < buf.len() {
            let n = (buf.len() - done).min(table.len() - at);
            buf[done..done + n].copy_from_slice(&table[at..at + n]);
            done += n;
            at = 0;
        }
    }
}

/// What one side of a pair does with its socket.
#[derive(Debug, Clone)]
struct Script {
    send: Stream,            // what it writes
    recv: Stream,            // what it expects to read
    write_max: u64,          // each write is 1..=write_max bytes
    read_max: u64,           // each read asks for 1..=read_max bytes
    stalls: Vec<(u64, u64)>, // (once this many bytes arrived, stop reading for ms)
    after_peer_eof: bool,    // write only once the peer's stream ended (request/response)
    reset: Option<Reset>,    // reset instead of ending cleanly
    seed: u64,               // for the chunk sizes
}

/// A reset mid-transfer: write `written` bytes of the stream (shutting the
/// write half first if `shut_first`), read at least `read` bytes of the
/// peer's, then close with `SO_LINGER` 0, which sends RST.
#[derive(Debug, Clone, Copy)]
struct Reset {
    written: u64,
    read: u64,
    shut_first: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Scripted(usize), // one of the apps answered by this file
    Echo,            // the library's `EchoApp`
}

/// A client and what the app side does with its dial-in.
#[derive(Debug)]
struct Pair {
    id: usize,
    target: Target,
    client: Script,
    server: Option<Script>, // None for the echo app, which has its own mind
}

impl Pair {
    fn random(id: usize, target: Target, max_stream: u64, rng: &mut Rng) -> Pair {
        let up = Stream {
            header: Some(header(id)),
            start: rng.range(0, TABLE_LEN as u64 - 1) as usize,
            len: HEADER_LEN as u64 + stream_len(max_stream, rng),
        };
        let down = match target {
            Target::Echo => up,
            Target::Scripted(_) => Stream {
                header: None,
                start: rng.range(0, TABLE_LEN as u64 - 1) as usize,
                len: stream_len(max_stream, rng),
            },
        };
        let (client_resets, server_resets) = match (rng.percent(RESET_PERCENT), target) {
            (false, _) => (false, false),
            (true, Target::Echo) => (true, false),
            (true, Target::Scripted(_)) => match rng.range(0, 9) {
                0..=4 => (true, false),
                5..=8 => (false, true),
                _ => (true, true),
            },
        };
        let mut client = Script::random(up, down, rng);
        let mut server = Script::random(down, up, rng);
        // What each side writes in all; a resetter reads no more than that
        // of its peer's stream, or it could wait for bytes that never come.
        let client_writes = if client_resets {
            written_before_reset(up.len, HEADER_LEN as u64, rng)
        } else {
            up.len
        };
        let server_writes = match target {
            Target::Echo => client_writes,
            Target::Scripted(_) if server_resets => written_before_reset(down.len, 0, rng),
            Target::Scripted(_) => down.len,
        };
        if client_resets {
            client.reset = Some(Reset {
                written: client_writes,
                read: rng.range(0, server_writes),
                shut_first: client_writes == up.len && rng.percent(50),
            });
        }
        if server_resets {
            server.reset = Some(Reset {
                written: server_writes,
                // The header is read before the script starts.
                read: rng.range(HEADER_LEN as u64, client_writes),
                shut_first: server_writes == down.len && rng.percent(50),
            });
        }
        // Without resets, who ends first: both at once, or one side
        // answering only after the other's whole stream (half-close first).
        if !client_resets && !server_resets && target != Target::Echo {
            match rng.range(0, 3) {
                0 => server.after_peer_eof = true,
                1 => client.after_peer_eof = true,
                _ => {}
            }
        }
        Pair {
            id,
            target,
            client,
            server: (target != Target::Echo).then_some(server),
        }
    }

    fn resets(&self) -> bool {
        self.client.reset.is_some() || self.server.as_ref().is_some_and(|s| s.reset.is_some())
    }

    /// Bytes through the relay if every stream ran to its end.
    fn planned(&self) -> u64 {
        self.client.send.len + self.client.recv.len
    }
}

fn header(id: usize) -> [u8; HEADER_LEN] {
    let mut header = [0; HEADER_LEN];
    header[..4].copy_from_slice(&MAGIC);
    header[4..].copy_from_slice(&(id as u32).to_le_bytes());
    header
}

/// Mostly small streams, a few long ones: ~10% empty, ~25% up to 1 KiB,
/// ~35% up to 64 KiB, ~22% up to a quarter of `max` (1 MiB of 4), the
/// rest up to `max`.
fn stream_len(max: u64, rng: &mut Rng) -> u64 {
    let quarter = (max / 4).max(64 * KIB);
    match rng.range(0, 99) {
        0..=9 => 0,
        10..=34 => rng.range(1, KIB),
        35..=69 => rng.log_uniform(KIB, 64 * KIB),
        70..=91 => rng.log_uniform(64 * KIB, quarter),
        _ => rng.log_uniform(quarter, max.max(quarter)),
    }
}

/// How far a resetter gets: a quarter of them the whole stream.
fn written_before_reset(len: u64, min: u64, rng: &mut Rng) -> u64 {
    if rng.percent(25) {
        len
    } else {
        rng.range(min, len)
    }
}

impl Script {
    fn random(send: Stream, recv: Stream, rng: &mut Rng) -> Script {
        let mut stalls = Vec::new();
        if rng.percent(STALL_PERCENT) {
            for _ in 0..rng.range(1, 4) {
                stalls.push((rng.range(0, recv.len), rng.range(1, MAX_STALL_MS)));
            }
            stalls.sort_unstable();
        }
        Script {
            send,
            recv,
            write_max: chunk_max(send.len, rng),
            read_max: chunk_max(recv.len, rng),
            stalls,
            after_peer_eof: false,
            reset: None,
            seed: rng.next(),
        }
    }
}

/// From single bytes to `MAX_CHUNK`, but no fewer than a stream's length
/// over `MAX_CALLS`.
fn chunk_max(len: u64, rng: &mut Rng) -> u64 {
    rng.log_uniform(1, MAX_CHUNK).max(len / MAX_CALLS).max(1)
}

// ---------------------------------------------------------------------------
// Running one side

/// How a read or write half ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Eof,              // read returned 0
    Shut,             // everything written, then the write half shut
    Stopped,          // the script stopped there (a resetter, or a write never started)
    Error(ErrorKind), // the socket failed
    TimedOut,         // nothing moved for IO_TIMEOUT: something hangs
}

fn end_of(e: &std::io::Error) -> End {
    if is_timeout(e) {
        End::TimedOut
    } else {
        End::Error(e.kind())
    }
}

/// What one side saw.
#[derive(Debug, Clone)]
struct Report {
    received: u64,         // bytes read, each checked against the stream
    read_end: End,         // how reading ended
    wrong: Option<String>, // the first byte that was not the stream's
    written: u64,          // bytes the kernel took from our writes
    write_end: End,        // how writing ended
}

/// What a read loop saw.
struct Reading {
    received: u64,
    end: End,
    wrong: Option<String>,
}

/// Stop reading once `at` bytes arrived and the writer is done.
struct Stop<'a> {
    at: u64,
    writer_done: &'a AtomicBool,
}

struct Side<'a> {
    stream: &'a TcpStream,
    script: &'a Script,
    table: &'a [u8],
}

impl Side<'_> {
    /// Plays `script` on `stream`, of whose incoming stream `received` bytes
    /// were already read (the header, on the app side), then closes it.
    fn run(stream: TcpStream, script: &Script, table: &[u8], received: u64) -> Report {
        let side = Side {
            stream: &stream,
            script,
            table,
        };
        let report = match script.reset {
            Some(reset) => side.run_then_reset(received, reset),
            None if script.after_peer_eof => side.respond(received),
            None => side.duplex(received),
        };
        if script.reset.is_some() {
            set_reset_on_drop(&stream);
        }
        report
    }

    /// Writes and reads at once, each to its end.
    fn duplex(&self, received: u64) -> Report {
        thread::scope(|s| {
            let writer = s.spawn(|| self.write(0, self.script.send.len, true));
            let reading = self.read(received, None);
            let (written, write_end) = writer.join().expect("a writer panicked");
            report(reading, written, write_end)
        })
    }

    /// Reads the peer's whole stream, then writes its own (the client writes
    /// its header first, or the app could not tell which script to play).
    fn respond(&self, received: u64) -> Report {
        let eager = self.script.send.header_len() as u64;
        let (written, end) = self.write(0, eager, false);
        let reading = self.read(received, None);
        let (written, write_end) = if end == End::Stopped && reading.end == End::Eof {
            self.write(eager, self.script.send.len, true)
        } else {
            (written, End::Stopped)
        };
        report(reading, written, write_end)
    }

    /// Writes and reads at once as far as `reset` says; the caller resets.
    fn run_then_reset(&self, received: u64, reset: Reset) -> Report {
        let writer_done = AtomicBool::new(false);
        thread::scope(|s| {
            let writer = s.spawn(|| {
                let result = self.write(0, reset.written, reset.shut_first);
                writer_done.store(true, Ordering::Release);
                result
            });
            let stop = Stop {
                at: reset.read,
                writer_done: &writer_done,
            };
            let reading = self.read(received, Some(stop));
            let (written, write_end) = writer.join().expect("a writer panicked");
            report(reading, written, write_end)
        })
    }

    /// Writes the stream's bytes `from..to` in random chunks, then shuts the
    /// write half if `shut`. Returns where it got and how it ended.
    fn write(&self, from: u64, to: u64, shut: bool) -> (u64, End) {
        let mut rng = Rng(self.script.seed ^ 0x5752_4954_4552); // "WRITER"
        let mut buf = vec![0u8; self.script.write_max as usize];
        let mut sent = from;
        while sent < to {
            let n = rng.range(1, self.script.write_max).min(to - sent) as usize;
            self.script.send.fill(self.table, sent, &mut buf[..n]);
            match (&*self.stream).write(&buf[..n]) {
                Ok(0) => return (sent, End::Error(ErrorKind::WriteZero)),
                Ok(k) => sent += k as u64,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return (sent, end_of(&e)),
            }
        }
        if !shut {
            return (sent, End::Stopped);
        }
        match self.stream.shutdown(Shutdown::Write) {
            Ok(()) => (sent, End::Shut),
            Err(e) => (sent, End::Error(e.kind())),
        }
    }

    /// Reads in random chunks, with the script's stalls, checking every byte
    /// against the stream, until it ends (or `stop` says so).
    fn read(&self, mut received: u64, stop: Option<Stop>) -> Reading {
        let script = self.script;
        let mut rng = Rng(script.seed);
        let mut buf = vec![0u8; script.read_max as usize];
        let mut expected = buf.clone();
        let mut stalls = script.stalls.iter().peekable();
        let mut polling_since = None;
        let done = |received, end, wrong| Reading {
            received,
            end,
            wrong,
        };
        loop {
            if let Some(stop) = &stop
                && received >= stop.at
            {
                if stop.writer_done.load(Ordering::Acquire) {
                    return done(received, End::Stopped, None);
                }
                // Enough read; keep reading (an echo needs it to go on
                // taking our writes) but look at the writer now and then.
                if polling_since.is_none() {
                    polling_since = Some(Instant::now());
                    self.stream
                        .set_read_timeout(Some(POLL))
                        .expect("set a short read timeout");
                }
            }
            while let Some(&&(at, ms)) = stalls.peek() {
                if at > received {
                    break;
                }
                stalls.next();
                // The stall under test: the peer keeps writing meanwhile.
                thread::sleep(Duration::from_millis(ms));
            }
            let mut want = rng.range(1, script.read_max);
            if let Some(stop) = &stop
                && received < stop.at
            {
                want = want.min(stop.at - received);
            }
            let n = match (&*self.stream).read(&mut buf[..want as usize]) {
                Ok(0) => return done(received, End::Eof, None),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e)
                    if is_timeout(&e)
                        && polling_since.is_some_and(|t| t.elapsed() < IO_TIMEOUT) =>
                {
                    continue;
                }
                Err(e) => return done(received, end_of(&e), None),
            };
            if let Some(wrong) = self.mismatch(received, &buf[..n], &mut expected[..n]) {
                return done(received, End::Stopped, Some(wrong));
            }
            received += n as u64;
        }
    }

    /// Why `got`, read at `offset`, is not the expected stream, if it is not.
    fn mismatch(&self, offset: u64, got: &[u8], expected: &mut [u8]) -> Option<String> {
        let recv = &self.script.recv;
        let end = offset + got.len() as u64;
        if end > recv.len {
            return Some(format!(
                "{} bytes arrived at offset {offset}, past the stream's end at {}",
                got.len(),
                recv.len
            ));
        }
        recv.fill(self.table, offset, expected);
        let at = got.iter().zip(expected.iter()).position(|(a, b)| a != b)?;
        Some(format!(
            "byte {} differs: got {:#04x}, expected {:#04x}",
            offset + at as u64,
            got[at],
            expected[at]
        ))
    }
}

fn report(reading: Reading, written: u64, write_end: End) -> Report {
    Report {
        received: reading.received,
        read_end: reading.end,
        wrong: reading.wrong,
        written,
        write_end,
    }
}

// ---------------------------------------------------------------------------
// The run

/// Everything the threads of one run share.
struct Run {
    seed: u64,
    pairs: Vec<Pair>,
    order: Vec<usize>,                   // pair ids in the order clients start
    addrs: Vec<SocketAddr>,              // relayed address by app (echo last)
    table: Vec<u8>,                      // the bytes streams are cut from
    next: AtomicUsize,                   // the next entry of `order` to start
    finished: AtomicUsize,               // clients done (or panicked)
    clients: Mutex<Vec<Option<Report>>>, // by pair id
    servers: Mutex<Vec<Option<Report>>>, // by pair id, scripted apps only
    strangers: Mutex<Vec<(usize, End)>>, // dial-ins that never got a whole header
    problems: Mutex<Vec<String>>,        // found while running
}

impl Run {
    fn new(seed: u64, load: Load, addrs: Vec<SocketAddr>) -> Run {
        let mut rng = Rng(seed);
        let targets = (0..SCRIPTED_APPS)
            .map(Target::Scripted)
            .chain([Target::Echo]);
        let pairs: Vec<Pair> = targets
            .flat_map(|t| std::iter::repeat_n(t, load.clients_per_app))
            .enumerate()
            .map(|(id, target)| Pair::random(id, target, load.max_stream, &mut rng.fork()))
            .collect();
        // Fisher-Yates, so that every app has clients running at once.
        let mut order: Vec<usize> = (0..pairs.len()).collect();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.range(0, i as u64) as usize);
        }
        let count = pairs.len();
        Run {
            seed,
            pairs,
            order,
            addrs,
            table: Pattern::new(seed).bytes(0, TABLE_LEN),
            next: AtomicUsize::new(0),
            finished: AtomicUsize::new(0),
            clients: Mutex::new(vec![None; count]),
            servers: Mutex::new(vec![None; count]),
            strangers: Mutex::new(Vec::new()),
            problems: Mutex::new(Vec::new()),
        }
    }

    /// Runs every pair; returns the most pipes the relay held at once.
    fn go(&self, relay: &RunningRelay, apps: &mut [TestApp]) -> usize {
        thread::scope(|s| {
            // `&mut`: a channel's receiver may move between threads, not be shared.
            for (index, app) in apps.iter_mut().enumerate() {
                s.spawn(move || self.answer(s, index, app));
            }
            for _ in 0..CONCURRENT {
                s.spawn(|| self.clients());
            }
            self.watch(relay)
        })
    }

    fn all_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire) == self.pairs.len()
    }

    fn problem(&self, text: String) {
        self.problems.lock().expect("lock problems").push(text);
    }

    /// A client thread: takes the next pair until none is left.
    fn clients(&self) {
        loop {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(&id) = self.order.get(n) else { return };
            let _finished = Finished(&self.finished);
            let pair = &self.pairs[id];
            let app = match pair.target {
                Target::Scripted(index) => index,
                Target::Echo => SCRIPTED_APPS,
            };
            let client = connect(self.addrs[app]);
            let report = Side::run(client, &pair.client, &self.table, 0);
            self.clients.lock().expect("lock clients")[id] = Some(report);
        }
    }

    /// Dials in for every dial line of app `index`, each dial-in served on a
    /// thread of its own, until every client has finished. (Lines left then
    /// belong to clients that reset before they were paired.)
    fn answer<'s>(&'s self, s: &'s Scope<'s, '_>, index: usize, app: &mut TestApp) {
        loop {
            match app.poll_dial_port(POLL) {
                Ok(port) => {
                    let dial_in = connect(local(port));
                    s.spawn(move || self.serve(index, dial_in));
                }
                Err(RecvTimeoutError::Timeout) if self.all_finished() => return,
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return self.problem(format!(
                        "app {index}: the relay closed its control connection"
                    ));
                }
            }
        }
    }

    /// One dial-in: the header says which client it was paired with, and so
    /// which script to play.
    fn serve(&self, app: usize, mut dial_in: TcpStream) {
        let mut header = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match dial_in.read(&mut header[got..]) {
                Ok(0) => return self.stranger(got, End::Eof),
                Ok(n) => got += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return self.stranger(got, end_of(&e)),
            }
        }
        let id = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        let script = self
            .pairs
            .get(id)
            .filter(|p| header[..4] == MAGIC && p.target == Target::Scripted(app))
            .and_then(|p| p.server.as_ref());
        let Some(script) = script else {
            return self.problem(format!(
                "a dial-in of app {app} began with {header:02x?}: \
                 not the start of any of its clients' streams"
            ));
        };
        let report = Side::run(dial_in, script, &self.table, HEADER_LEN as u64);
        let mut servers = self.servers.lock().expect("lock servers");
        if servers[id].is_some() {
            drop(servers);
            return self.problem(format!("pair {id}: its client reached two dial-ins"));
        }
        servers[id] = Some(report);
    }

    fn stranger(&self, got: usize, end: End) {
        self.strangers
            .lock()
            .expect("lock strangers")
            .push((got, end));
    }

    /// Samples the relay's counts until every client has finished: a pipe
    /// holds at most two rings (bounded memory, idle pipes hold none).
    fn watch(&self, relay: &RunningRelay) -> usize {
        let mut most = 0;
        let mut reported = false;
        while !self.all_finished() {
            let stats = relay.stats();
            most = most.max(stats.pipes);
            if stats.buffers_lent > 2 * stats.pipes && !reported {
                reported = true;
                self.problem(format!("more rings lent than two per pipe: {stats:?}"));
            }
            thread::sleep(POLL);
        }
        most
    }

    /// Everything wrong, each line naming the seed and pair.
    fn problems(&self) -> Vec<String> {
        let seed = self.seed;
        let mut out: Vec<String> = self.problems.lock().expect("lock problems").clone();
        let clients = self.clients.lock().expect("lock clients");
        let servers = self.servers.lock().expect("lock servers");
        let mut unpaired = 0;
        for pair in &self.pairs {
            let mut found = Vec::new();
            let server = servers[pair.id].as_ref();
            if pair.server.is_some() && server.is_none() {
                unpaired += 1;
            }
            match &clients[pair.id] {
                Some(client) => check_pair(pair, client, server, &mut found),
                None => found.push("the client never finished".into()),
            }
            if !found.is_empty() {
                out.push(format!(
                    "seed {seed}, pair {}: {}\n    client {:?}\n    app {:?}\n    plan {pair:?}",
                    pair.id,
                    found.join("; "),
                    clients[pair.id],
                    server
                ));
            }
        }
        // A dial-in without a whole header was paired with a client that
        // reset first (it gets the reset), or found no client waiting at all
        // because one reset while it waited (it gets an empty clean close).
        let strangers = self.strangers.lock().expect("lock strangers");
        if strangers.len() > unpaired {
            out.push(format!(
                "{} dial-ins never got a client's header, but only {unpaired} clients lack a dial-in",
                strangers.len()
            ));
        }
        for &(got, end) in strangers.iter() {
            let reset = end == End::Error(ErrorKind::ConnectionReset);
            if !(reset || end == End::Eof && got == 0) {
                out.push(format!(
                    "a dial-in got {got} bytes of a header, then {end:?}"
                ));
            }
        }
        out.iter()
            .map(|p| {
                if p.starts_with("seed") {
                    p.clone()
                } else {
                    format!("seed {seed}: {p}")
                }
            })
            .collect()
    }
}

/// Counts a client as finished when dropped, even by a panic, so that the
/// run's other threads do not wait for it forever.
struct Finished<'a>(&'a AtomicUsize);

impl Drop for Finished<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Release);
    }
}

// ---------------------------------------------------------------------------
// Judging what each side saw

/// What a sender did, as far as its receiver's check needs.
struct Sent {
    len: u64,     // the whole stream
    written: u64, // what the kernel took
    shut: bool,   // all of it, then FIN
}

impl Sent {
    fn by(report: &Report, script: &Script) -> Sent {
        Sent {
            len: script.send.len,
            written: report.written,
            shut: report.write_end == End::Shut,
        }
    }
}

fn check_pair(pair: &Pair, client: &Report, server: Option<&Report>, out: &mut Vec<String>) {
    let resets = pair.resets();
    check_writer("client", &pair.client, client, resets, out);
    match (&pair.server, server) {
        // The echo app sends back what the client wrote, and ends after it.
        (None, _) => {
            let sent = Sent::by(client, &pair.client);
            check_reader("echo to client", &pair.client, client, sent, resets, out);
        }
        (Some(script), Some(server)) => {
            check_writer("app", script, server, resets, out);
            let up = Sent::by(client, &pair.client);
            check_reader("client to app", script, server, up, resets, out);
            let down = Sent::by(server, script);
            check_reader("app to client", &pair.client, client, down, resets, out);
        }
        // No dial-in ever read this client's header: it must have reset
        // early, and nothing can have come back.
        (Some(script), None) => {
            if pair.client.reset.is_none() {
                out.push("no dial-in ever got this client's stream".into());
            }
            let nothing = Sent {
                len: script.send.len,
                written: 0,
                shut: false,
            };
            check_reader("app to client", &pair.client, client, nothing, resets, out);
        }
    }
}

/// A writer gets its whole stream out and shuts, unless a reset in the pair
/// cuts it short: after the peer's RST, writes fail with a reset or EPIPE,
/// and `shutdown` with ENOTCONN (the socket is closed).
fn check_writer(who: &str, script: &Script, r: &Report, resets: bool, out: &mut Vec<String>) {
    let ok = match (script.reset, r.write_end) {
        (None, End::Shut) => r.written == script.send.len,
        (Some(reset), End::Shut | End::Stopped) => r.written == reset.written,
        (_, End::Error(kind)) => {
            resets
                && matches!(
                    kind,
                    ErrorKind::ConnectionReset
                        | ErrorKind::BrokenPipe
                        | ErrorKind::ConnectionAborted
                        | ErrorKind::NotConnected
                )
        }
        // It waited for the peer's stream, which did not end cleanly; the
        // reader's check says so.
        (None, End::Stopped) => script.after_peer_eof,
        _ => false,
    };
    if !ok {
        out.push(format!(
            "{who}'s writes ended with {:?} after {} of {} bytes",
            r.write_end, r.written, script.send.len
        ));
    }
}

/// A receiver gets an in-order prefix of what was sent, never more. A clean
/// EOF means the sender wrote everything and shut, and all of it arrived: the
/// relay carries a reset as a reset. One exception: on Linux a reset is
/// reported once, to whichever call comes first, so when our own writer met
/// it, the reader sees only the end (`read` returns 0).
fn check_reader(
    what: &str,
    script: &Script,
    r: &Report,
    sent: Sent,
    resets: bool,
    out: &mut Vec<String>,
) {
    if let Some(wrong) = &r.wrong {
        out.push(format!("{what}: {wrong}"));
    }
    if r.received > sent.written {
        out.push(format!(
            "{what}: {} bytes arrived, but only {} were written",
            r.received, sent.written
        ));
    }
    let ok = match r.read_end {
        End::Eof => {
            let complete = sent.shut && r.received == sent.len;
            let reset_seen_by_writer = resets && matches!(r.write_end, End::Error(_));
            complete || reset_seen_by_writer
        }
        End::Error(ErrorKind::ConnectionReset) => resets,
        End::Stopped => script.reset.is_some() && r.wrong.is_none(),
        _ => false,
    };
    if !ok {
        out.push(format!(
            "{what}: the stream ended with {:?} after {} of {} bytes \
             (sender wrote {}{})",
            r.read_end,
            r.received,
            sent.len,
            sent.written,
            if sent.shut { " and shut" } else { ", no FIN" }
        ));
    }
}
