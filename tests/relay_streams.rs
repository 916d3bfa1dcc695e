//! End to end: what a pipe does to the bytes: large full-duplex transfers,
//! backpressure toward a stalled reader, half-close in both directions, and
//! bytes a client sends before its dial-in exists.

mod common;

use std::io::{ErrorKind, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1024 * 1024;

/// A client and its dial-in, connected through `relay` by a fresh test app.
fn piped_pair(relay: &tcp_relay::RunningRelay) -> (TestApp, TcpStream, TcpStream) {
    let app = TestApp::register(relay.reg_addr());
    let client = connect(app.relayed_addr());
    let dial_in = app.dial_in();
    (app, client, dial_in)
}

/// Sends `pattern` (`total` bytes) on a thread, then shuts the write half.
fn spawn_sender(mut stream: TcpStream, pattern: Pattern, total: u64) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        pattern.send(&mut stream, total);
        stream
            .shutdown(Shutdown::Write)
            .expect("shut down the write half");
    })
}

/// Checks `pattern` on a thread, returning the byte count at EOF.
fn spawn_checker(mut stream: TcpStream, pattern: Pattern) -> thread::JoinHandle<u64> {
    thread::spawn(move || pattern.check(&mut stream))
}

/// 64 MiB each way at the same time arrive byte for byte, and each side's
/// FIN reaches the other only after its last byte.
#[test]
fn sixty_four_mib_each_way_full_duplex_arrive_intact() {
    const TOTAL: u64 = 64 * MIB;
    let relay = start_relay();
    let (_app, client, dial_in) = piped_pair(&relay);
    let (up, down) = (Pattern::new(1), Pattern::new(2));
    let started = Instant::now();
    let senders = [
        spawn_sender(client.try_clone().expect("clone client"), up, TOTAL),
        spawn_sender(dial_in.try_clone().expect("clone dial-in"), down, TOTAL),
    ];
    let at_app = spawn_checker(dial_in, up);
    let at_client = spawn_checker(client, down);
    for sender in senders {
        sender.join().expect("a sender panicked");
    }
    assert_eq!(at_app.join().expect("the app-side checker panicked"), TOTAL);
    assert_eq!(
        at_client.join().expect("the client-side checker panicked"),
        TOTAL
    );
    eprintln!("2 x {} MiB relayed in {:?}", TOTAL / MIB, started.elapsed());
    assert_no_leftovers(&relay);
}

/// Backpressure: while the app does not read, a client writing 64 MiB is
/// stopped by full buffers, and the relay holds at most its two rings for
/// the pipe (memory bounded by `Config::buffer_size`, not by the sender).
/// Once the app reads, every byte arrives intact.
#[test]
fn a_stalled_reader_stops_the_writer_and_bounds_relay_memory() {
    // Well past what loopback socket buffers absorb (about 10 MiB here, with
    // receive buffers allowed to grow to 32 MiB), so the writer must block.
    const TOTAL: u64 = 64 * MIB;
    let relay = start_relay();
    let (_app, client, dial_in) = piped_pair(&relay);
    let pattern = Pattern::new(3);
    let written = Arc::new(AtomicU64::new(0));
    let (stalled_tx, stalled) = mpsc::channel();
    let progress = written.clone();
    let writer =
        thread::spawn(move || write_reporting_stall(client, pattern, TOTAL, &progress, stalled_tx));

    stalled
        .recv_timeout(IO_TIMEOUT)
        .expect("the writer never stalled: something reads without bound");
    let blocked_at = written.load(Ordering::Relaxed);
    let stats = relay.stats();
    eprintln!("writer blocked after {blocked_at} bytes; {stats:?}");
    assert!(
        blocked_at < TOTAL,
        "the writer must be blocked before it is done"
    );
    assert_eq!(stats.pipes, 1);
    assert!(
        stats.buffers_lent <= 2,
        "a pipe holds at most two rings: {stats:?}"
    );

    let reader = spawn_checker(dial_in, pattern);
    writer.join().expect("the writer panicked");
    assert_eq!(reader.join().expect("the reader panicked"), TOTAL);
    assert_no_leftovers(&relay);
}

/// Writes `total` bytes of `pattern`, then shuts the write half. With a
/// short write timeout, a write that moves nothing for that long means the
/// writer is blocked; that is reported once on `stalled`, then it goes on.
fn write_reporting_stall(
    mut stream: TcpStream,
    pattern: Pattern,
    total: u64,
    written: &AtomicU64,
    stalled: mpsc::Sender<()>,
) {
    const STALL: Duration = Duration::from_millis(500);
    stream
        .set_write_timeout(Some(STALL))
        .expect("set write timeout");
    let mut buf = vec![0u8; 256 * 1024];
    let (mut sent, mut reported, started) = (0u64, false, Instant::now());
    while sent < total {
        let n = (total - sent).min(buf.len() as u64) as usize;
        pattern.fill(sent, &mut buf[..n]);
        let mut chunk = &buf[..n];
        while !chunk.is_empty() {
            match stream.write(chunk) {
                Ok(k) => {
                    chunk = &chunk[k..];
                    sent += k as u64;
                    written.store(sent, Ordering::Relaxed);
                }
                Err(e) if is_timeout(&e) && !reported => {
                    reported = true;
                    let _ = stalled.send(());
                }
                Err(e) if is_timeout(&e) || e.kind() == ErrorKind::Interrupted => {}
                Err(e) => panic!("write at offset {sent}: {e}"),
            }
            assert!(
                started.elapsed() < 4 * IO_TIMEOUT,
                "the writer is stuck at offset {sent}"
            );
        }
    }
    stream
        .shutdown(Shutdown::Write)
        .expect("shut down the write half");
}

/// Half-close from the client: it sends a request and shuts its write
/// half; the app sees exactly the request then EOF, and only then sends a
/// 4 MiB reply, which the client still receives whole before its EOF.
#[test]
fn client_half_close_still_gets_the_whole_reply() {
    const REPLY: u64 = 4 * MIB;
    let relay = start_relay();
    let (_app, mut client, mut dial_in) = piped_pair(&relay);
    client
        .write_all(b"GET /everything\n")
        .expect("send the request");
    client
        .shutdown(Shutdown::Write)
        .expect("shut down the client's writes");

    assert_eq!(
        read_to_eof(&mut dial_in),
        b"GET /everything\n",
        "the app sees the request, then EOF"
    );
    // Stats are published at the end of a relay turn, which may come after
    // the EOF we just read; the reply below is the real proof.
    wait_for_stats(&relay, "the half-closed pipe is still up", |s| {
        s.pipes == 1 && s.waiting_clients == 0
    });
    let reply = spawn_sender(dial_in, Pattern::new(4), REPLY);
    assert_eq!(Pattern::new(4).check(&mut client), REPLY);
    reply.join().expect("the reply sender panicked");
    assert_no_leftovers(&relay);
}

/// Half-close from the app: the dial-in sends a greeting and shuts its
/// write half; the client gets it then EOF, and its 4 MiB answer still
/// reaches the app whole.
#[test]
fn app_half_close_still_gets_the_whole_answer() {
    const ANSWER: u64 = 4 * MIB;
    let relay = start_relay();
    let (_app, mut client, mut dial_in) = piped_pair(&relay);
    dial_in
        .write_all(b"220 ready\n")
        .expect("send the greeting");
    dial_in
        .shutdown(Shutdown::Write)
        .expect("shut down the app's writes");

    assert_eq!(
        read_to_eof(&mut client),
        b"220 ready\n",
        "the client sees the greeting, then EOF"
    );
    // Stats are published at the end of a relay turn, which may come after
    // the EOF we just read; the reply below is the real proof.
    wait_for_stats(&relay, "the half-closed pipe is still up", |s| {
        s.pipes == 1 && s.waiting_clients == 0
    });
    let answer = spawn_sender(client, Pattern::new(5), ANSWER);
    assert_eq!(Pattern::new(5).check(&mut dial_in), ANSWER);
    answer.join().expect("the answer sender panicked");
    assert_no_leftovers(&relay);
}

/// Bytes, and even the FIN, a client sends before its dial-in arrives wait
/// for it: the app dials in only after the client has written and shut its
/// write half, and still gets every byte then EOF; its reply gets through.
#[test]
fn bytes_sent_before_the_dial_in_are_delivered() {
    let relay = start_relay();
    let app = TestApp::register(relay.reg_addr());
    let mut client = connect(app.relayed_addr());
    let early = Pattern::new(6).bytes(0, 16 * 1024);
    client.write_all(&early).expect("send before the dial-in");
    client
        .shutdown(Shutdown::Write)
        .expect("shut down the client's writes");
    wait_for_stats(&relay, "the client waits for its dial-in", |s| {
        s.waiting_clients == 1
    });

    let mut dial_in = app.dial_in();
    assert!(
        read_to_eof(&mut dial_in) == early,
        "the early bytes arrive whole, then EOF"
    );
    dial_in.write_all(b"got it").expect("reply");
    dial_in
        .shutdown(Shutdown::Write)
        .expect("shut down the app's writes");
    assert_eq!(read_to_eof(&mut client), b"got it");
    assert_no_leftovers(&relay);
}
