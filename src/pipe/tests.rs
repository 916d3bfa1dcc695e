//! Tests per transition of a [`Direction`], a [`Pipe`] (with its trial) and
//! an [`Echo`], over scripted streams: each test states the syscalls' and
//! the events' outcomes in order, and a syscall it did not script fails it.

use super::*;
use crate::ring::RingBuffer;
use crate::sockio::script::{Script, Step, data};
use io::ErrorKind::{BrokenPipe, ConnectionReset, Interrupted, PermissionDenied, WouldBlock};

/// Ring size for these tests: small, so that a few bytes fill it.
const RING: usize = 8;

fn pool() -> BufferPool {
    BufferPool::new(RING, 4)
}

/// An endpoint just registered: worth one read.
fn fresh() -> Endpoint<Script> {
    Endpoint::new(Script::new(), RxState::registered())
}

/// An endpoint with nothing to read until an event says so.
fn quiet() -> Endpoint<Script> {
    Endpoint::new(Script::new(), RxState::default())
}

fn readable() -> Readiness {
    Readiness {
        readable: true,
        ..Readiness::default()
    }
}

fn writable() -> Readiness {
    Readiness {
        writable: true,
        ..Readiness::default()
    }
}

/// The peer's FIN, as epoll reports it (`EPOLLIN | EPOLLRDHUP`).
fn peer_ended() -> Readiness {
    Readiness {
        readable: true,
        read_closed: true,
        ..Readiness::default()
    }
}

/// A socket error, as epoll reports a reset (`EPOLLERR | EPOLLHUP`).
fn failed() -> Readiness {
    Readiness {
        error: true,
        read_closed: true,
        write_closed: true,
        ..Readiness::default()
    }
}

/// One pump of `way`, from `src`'s read half to `dst`'s write half.
fn pump(
    way: &mut Direction,
    src: &mut Endpoint<Script>,
    dst: &mut Endpoint<Script>,
    pool: &mut BufferPool,
    last: bool,
) -> Result<Flow, (At, Broken)> {
    way.pump(
        (&src.stream, &mut src.rx),
        (&dst.stream, &mut dst.tx),
        pool,
        last,
    )
}

/// Every byte a replay buffer holds, oldest first.
fn contents(buffer: Option<Buffer>) -> Vec<u8> {
    match buffer {
        Some(Buffer::Ring(mut ring)) => drain(&mut ring),
        #[cfg(target_os = "linux")]
        Some(Buffer::Kernel(_)) => panic!("a replay is always a ring"),
        None => Vec::new(),
    }
}

fn drain(ring: &mut RingBuffer) -> Vec<u8> {
    let mut out = vec![0; ring.len()];
    let n = ring.dequeue_slice(&mut out);
    out.truncate(n);
    out
}

// A direction: readiness, backpressure, half-close, outcomes.

#[test]
fn a_short_read_clears_readability() {
    let (mut src, mut dst, mut pool) = (fresh(), quiet(), pool());
    src.stream.reads([data(b"hi")]);
    dst.stream.writes([Step::Take(9)]);
    let flow = pump(
        &mut Direction::default(),
        &mut src,
        &mut dst,
        &mut pool,
        false,
    );
    assert!(matches!(flow, Ok(Flow::Idle)));
    assert!(!src.rx.readable, "2 of 8 bytes: the socket is drained");
    assert_eq!(dst.stream.written(), b"hi");
    assert_eq!(pool.lent(), 0, "an empty ring goes back at once");
}

#[test]
fn a_short_read_while_ending_reads_on_to_the_end() {
    let (mut src, mut dst, mut pool) = (quiet(), quiet(), pool());
    src.note(peer_ended());
    src.stream.reads([data(b"hi"), Step::Eof]);
    dst.stream.writes([Step::Take(9)]);
    let flow = pump(
        &mut Direction::default(),
        &mut src,
        &mut dst,
        &mut pool,
        false,
    );
    assert!(matches!(flow, Ok(Flow::Idle)));
    assert!(src.rx.eof, "the FIN behind the bytes was read");
    assert_eq!(dst.stream.written(), b"hi");
    assert_eq!(dst.stream.shut_after(), Some(2), "FIN after the bytes");
    assert!(dst.tx.shut);
}

#[test]
fn would_block_clears_readability_and_a_stale_end_hint() {
    let (mut src, mut dst, mut pool) = (quiet(), quiet(), pool());
    src.note(peer_ended());
    src.stream.reads([Step::Fail(WouldBlock)]);
    let flow = pump(
        &mut Direction::default(),
        &mut src,
        &mut dst,
        &mut pool,
        false,
    );
    assert!(matches!(flow, Ok(Flow::Idle)));
    assert!(!src.rx.readable && !src.rx.ending && !src.rx.eof);
    assert_eq!(pool.lent(), 0);
}

#[test]
fn eof_with_bytes_buffered_is_carried_only_after_them() {
    let (mut src, mut dst, mut pool) = (quiet(), quiet(), pool());
    let mut way = Direction::default();
    src.note(peer_ended());
    src.stream.reads([data(b"abc"), Step::Eof]);
    dst.stream.writes([Step::Fail(WouldBlock)]);
    let flow = pump(&mut way, &mut src, &mut dst, &mut pool, false);
    assert!(matches!(flow, Ok(Flow::Idle)));
    assert!(src.rx.eof && !dst.tx.writable);
    assert_eq!(dst.stream.shutdowns(), 0, "3 bytes still buffered");
    dst.note(writable());
    dst.stream.writes([Step::Take(2), Step::Take(9)]);
    let flow = pump(&mut way, &mut src, &mut dst, &mut pool, false);
    assert!(matches!(flow, Ok(Flow::Idle)));
    assert_eq!(dst.stream.written(), b"abc");
    assert_eq!(dst.stream.shut_after(), Some(3));
    assert_eq!(pool.lent(), 0);
}

#[test]
fn a_full_destination_stops_reading_and_its_draining_resumes_it() {
    let (mut src, mut dst, mut pool) = (fresh(), quiet(), pool());
    let mut way = Direction::default();
    src.stream.reads([data(b"12345678")]);
    dst.stream.writes([Step::Fail(WouldBlock)]);
    let flow = pump(&mut way, &mut src, &mut dst, &mut pool, false);
    assert!(matches!(flow, Ok(Flow::Idle)));
    // The ring is full, so no second read was made (none was scripted),
    // and the source's flag stays set: nothing proved it drained.
    assert!(src.rx.readable);
    assert_eq!(pool.lent(), 1);
    // Room at the destination; no new event for the source.
    dst.note(writable());
    dst.stream.writes([Step::Take(8), Step::Take(9)]);
    src.stream.reads([data(b"more")]);
    let flow = pump(&mut way, &mut src, &mut dst, &mut pool, false);
    assert!(matches!(flow, Ok(Flow::Idle)));
    assert_eq!(dst.stream.written(), b"12345678more");
    assert_eq!(src.stream.reads_left(), 0, "reading resumed at once");
}

#[test]
fn a_busy_way_yields_when_its_budget_is_spent() {
    let (mut src, mut dst, mut pool) = (fresh(), quiet(), pool());
    let mut way = Direction::default();
    src.stream
        .reads((0..PUMP_BUDGET).map(|_| data(b"8 bytes!")));
    dst.stream
        .writes((0..PUMP_BUDGET).map(|_| Step::Take(RING)));
    let flow = pump(&mut way, &mut src, &mut dst, &mut pool, false);
    assert!(matches!(flow, Ok(Flow::More)));
    assert!(src.rx.readable, "full reads: more may be waiting");
    assert_eq!(dst.stream.written().len(), PUMP_BUDGET * RING);
    src.stream.reads([data(b"end")]);
    dst.stream.writes([Step::Take(9)]);
    let flow = pump(&mut way, &mut src, &mut dst, &mut pool, false);
    assert!(matches!(flow, Ok(Flow::Idle)));
}

#[test]
fn interrupted_calls_are_retried() {
    let (mut src, mut dst, mut pool) = (fresh(), quiet(), pool());
    src.stream.reads([Step::Fail(Interrupted), data(b"x")]);
    dst.stream.writes([Step::Fail(Interrupted), Step::Take(1)]);
    let flow = pump(
        &mut Direction::default(),
        &mut src,
        &mut dst,
        &mut pool,
        false,
    );
    assert!(matches!(flow, Ok(Flow::Idle)));
    assert_eq!(dst.stream.written(), b"x");
}

#[test]
fn a_zero_byte_write_is_a_reset() {
    let (mut src, mut dst, mut pool) = (fresh(), quiet(), pool());
    src.stream.reads([data(b"x")]);
    dst.stream.writes([Step::Take(0)]);
    let flow = pump(
        &mut Direction::default(),
        &mut src,
        &mut dst,
        &mut pool,
        false,
    );
    assert!(matches!(flow, Err((At::Dst, Broken::Reset))));
}

#[test]
fn resets_are_resets_and_other_errors_failures() {
    let mut pool = pool();
    let (mut src, mut dst) = (fresh(), quiet());
    src.stream.reads([Step::Fail(ConnectionReset)]);
    let flow = pump(
        &mut Direction::default(),
        &mut src,
        &mut dst,
        &mut pool,
        false,
    );
    assert!(matches!(flow, Err((At::Src, Broken::Reset))));
    let (mut src, mut dst) = (fresh(), quiet());
    src.stream.reads([Step::Fail(PermissionDenied)]);
    let flow = pump(
        &mut Direction::default(),
        &mut src,
        &mut dst,
        &mut pool,
        false,
    );
    assert!(matches!(flow, Err((At::Src, Broken::Failed(_)))));
    let (mut src, mut dst) = (fresh(), quiet());
    src.stream.reads([data(b"x")]);
    dst.stream.writes([Step::Fail(BrokenPipe)]);
    let flow = pump(
        &mut Direction::default(),
        &mut src,
        &mut dst,
        &mut pool,
        false,
    );
    assert!(matches!(flow, Err((At::Dst, Broken::Reset))));
}

#[test]
fn a_fin_toward_a_reset_peer_is_a_reset() {
    let (mut src, mut dst, mut pool) = (quiet(), quiet(), pool());
    src.note(peer_ended());
    src.stream.reads([Step::Eof]);
    dst.stream.reset_by_peer();
    let flow = pump(
        &mut Direction::default(),
        &mut src,
        &mut dst,
        &mut pool,
        false,
    );
    assert!(matches!(flow, Err((At::Dst, Broken::Reset))));
}

// A pipe: both ways, the end, and failures.

#[test]
fn half_closes_are_carried_both_ways_then_done() {
    let mut pool = pool();
    let mut pipe = Pipe::new(quiet(), quiet());
    pipe.a.note(peer_ended());
    pipe.a.stream.reads([data(b"req"), Step::Eof]);
    pipe.b.stream.writes([Step::Take(9)]);
    assert!(matches!(pipe.pump(&mut pool), Ok(Flow::Idle)));
    assert_eq!(pipe.b.stream.shut_after(), Some(3));
    assert!(pipe.is_half_closed());
    pipe.b.note(peer_ended());
    pipe.b.stream.reads([data(b"resp"), Step::Eof]);
    pipe.a.stream.writes([Step::Take(9)]);
    assert!(matches!(pipe.pump(&mut pool), Ok(Flow::Done)));
    assert_eq!(pipe.a.stream.written(), b"resp");
    // The last way open: the close sends the FIN, no shutdown needed.
    assert_eq!(pipe.a.stream.shutdowns(), 0);
    assert!(!pipe.is_half_closed());
    assert_eq!(pipe.moved(), 7);
    assert_eq!(pool.lent(), 0);
}

#[test]
fn a_reset_after_fin_is_seen_through_the_error_hint() {
    let mut pool = pool();
    let mut pipe = Pipe::new(quiet(), quiet());
    pipe.b.note(peer_ended());
    pipe.b.stream.reads([Step::Eof]);
    assert!(matches!(pipe.pump(&mut pool), Ok(Flow::Idle)));
    assert_eq!(pipe.a.stream.shutdowns(), 1);
    // b is at EOF, never read again, and a has nothing to send: only the
    // pending error tells.
    pipe.b.stream.reset_by_peer();
    pipe.b.note(failed());
    assert!(matches!(pipe.pump(&mut pool), Err(Broken::Reset)));
}

#[test]
fn an_error_hint_without_an_error_is_no_reset() {
    let mut pool = pool();
    let mut pipe = Pipe::new(quiet(), quiet());
    pipe.a.note(failed());
    pipe.a.stream.reads([Step::Fail(WouldBlock)]);
    assert!(matches!(pipe.pump(&mut pool), Ok(Flow::Idle)));
}

#[test]
fn a_broken_pipe_stays_broken() {
    let mut pool = pool();
    let mut pipe = Pipe::new(fresh(), quiet());
    // Linux reports a reset to one read; the next read returns 0.
    pipe.a
        .stream
        .reads([Step::Fail(ConnectionReset), Step::Eof]);
    assert!(matches!(pipe.pump(&mut pool), Err(Broken::Reset)));
    pipe.a.note(readable());
    assert!(matches!(pipe.pump(&mut pool), Err(Broken::Reset)));
    assert_eq!(pipe.a.stream.reads_left(), 1, "not read again");
    assert_eq!(pipe.b.stream.shutdowns(), 0, "no FIN for a cut stream");
    pipe.abort(&mut pool);
    assert!(pipe.a.stream.resets_on_close() && pipe.b.stream.resets_on_close());
}

// A pipe on trial (a ready dial-in b that may be dead).

#[test]
fn on_trial_bytes_written_to_b_are_kept() {
    let mut pool = pool();
    let mut pipe = Pipe::on_trial(fresh(), quiet());
    pipe.a.stream.reads([data(b"hello")]);
    pipe.b.stream.writes([Step::Take(9)]);
    assert!(matches!(pipe.pump(&mut pool), Ok(Flow::Idle)));
    assert_eq!(pipe.b.stream.written(), b"hello");
    assert_eq!(pool.lent(), 1, "the ring keeps what was written");
}

#[test]
fn b_ending_before_its_first_byte_loses_the_trial_and_replays_everything() {
    let mut pool = pool();
    let mut pipe = Pipe::on_trial(fresh(), quiet());
    pipe.a.stream.reads([data(b"hello")]);
    pipe.b
        .stream
        .writes([Step::Take(3), Step::Fail(WouldBlock)]);
    pipe.b.note(peer_ended());
    pipe.b.stream.reads([Step::Eof]);
    assert!(matches!(pipe.pump(&mut pool), Err(Broken::Lost)));
    assert_eq!(pipe.a.stream.shutdowns(), 0, "b's end is not passed on");
    let (a, b, replay) = pipe.into_replay(&mut pool);
    assert!(b.stream.resets_on_close());
    // The next dial-in gets every byte, kept ("hel") and unsent ("lo").
    let mut next = Pipe::with_replay(a, quiet(), replay);
    next.b.stream.writes([Step::Take(9)]);
    assert!(matches!(next.pump(&mut pool), Ok(Flow::Idle)));
    assert_eq!(next.b.stream.written(), b"hello");
    assert_eq!(pool.lent(), 0);
}

#[test]
fn a_trial_lost_before_a_sent_anything_replays_nothing() {
    let mut pool = pool();
    let mut pipe = Pipe::on_trial(quiet(), quiet());
    pipe.b.note(peer_ended());
    pipe.b.stream.reads([Step::Eof]);
    assert!(matches!(pipe.pump(&mut pool), Err(Broken::Lost)));
    let (_, _, replay) = pipe.into_replay(&mut pool);
    assert!(replay.is_none());
    assert_eq!(pool.lent(), 0);
}

#[test]
fn b_first_byte_ends_the_trial() {
    let mut pool = pool();
    let mut pipe = Pipe::on_trial(fresh(), quiet());
    pipe.a.stream.reads([data(b"hi")]);
    pipe.b.stream.writes([Step::Take(9)]);
    pipe.b.note(readable());
    pipe.b.stream.reads([data(b"ok")]);
    pipe.a.stream.writes([Step::Take(9)]);
    assert!(matches!(pipe.pump(&mut pool), Ok(Flow::More)));
    assert_eq!(pipe.a.stream.written(), b"ok");
    assert!(matches!(pipe.pump(&mut pool), Ok(Flow::Idle)));
    assert_eq!(pool.lent(), 0, "kept bytes were let go");
    // From now on b's end is an ordinary end.
    pipe.b.note(peer_ended());
    pipe.b.stream.reads([Step::Eof]);
    assert!(matches!(pipe.pump(&mut pool), Ok(Flow::Idle)));
    assert_eq!(pipe.a.stream.shut_after(), Some(2));
}

#[test]
fn b_end_with_its_first_bytes_is_carried_by_the_next_pump() {
    let mut pool = pool();
    let mut pipe = Pipe::on_trial(quiet(), quiet());
    pipe.b.note(peer_ended());
    pipe.b.stream.reads([data(b"bye"), Step::Eof]);
    pipe.a.stream.writes([Step::Take(9)]);
    assert!(matches!(pipe.pump(&mut pool), Ok(Flow::More)));
    assert_eq!(pipe.a.stream.shutdowns(), 0, "held during the trial");
    assert!(matches!(pipe.pump(&mut pool), Ok(Flow::Idle)));
    assert_eq!(pipe.a.stream.shut_after(), Some(3));
}

#[test]
fn a_ring_full_of_kept_bytes_stops_keeping() {
    let mut pool = pool();
    let mut pipe = Pipe::on_trial(fresh(), quiet());
    pipe.a.stream.reads([data(b"12345678"), data(b"9")]);
    pipe.b.stream.writes([Step::Take(RING), Step::Take(9)]);
    assert!(matches!(pipe.pump(&mut pool), Ok(Flow::More)));
    assert_eq!(pipe.b.stream.written(), b"123456789");
    // The trial is over: b's end without a byte is an ordinary end.
    pipe.b.note(peer_ended());
    pipe.b.stream.reads([Step::Eof]);
    assert!(matches!(pipe.pump(&mut pool), Ok(Flow::Idle)));
    assert_eq!(pipe.a.stream.shutdowns(), 1);
    assert_eq!(pool.lent(), 0);
}

#[test]
fn a_write_error_toward_b_on_trial_is_a_loss() {
    for kind in [BrokenPipe, ConnectionReset, PermissionDenied] {
        let mut pool = pool();
        let mut pipe = Pipe::on_trial(fresh(), quiet());
        pipe.a.stream.reads([data(b"x")]);
        pipe.b.stream.writes([Step::Fail(kind)]);
        assert!(matches!(pipe.pump(&mut pool), Err(Broken::Lost)), "{kind}");
        let (_, _, replay) = pipe.into_replay(&mut pool);
        assert_eq!(contents(replay), b"x");
    }
}

#[test]
fn b_reset_on_trial_is_a_loss() {
    let mut pool = pool();
    let mut pipe = Pipe::on_trial(quiet(), quiet());
    pipe.b.stream.reset_by_peer();
    pipe.b.note(failed());
    assert!(matches!(pipe.pump(&mut pool), Err(Broken::Lost)));
}

#[test]
fn a_reset_of_a_on_trial_is_a_plain_reset() {
    let mut pool = pool();
    let mut pipe = Pipe::on_trial(fresh(), quiet());
    pipe.a.stream.reads([Step::Fail(ConnectionReset)]);
    assert!(matches!(pipe.pump(&mut pool), Err(Broken::Reset)));
}

// An echo: one socket, back to itself.

#[test]
fn an_echo_returns_every_byte_then_is_done() {
    let mut pool = pool();
    let mut echo = Echo::new(quiet());
    echo.end.note(peer_ended());
    echo.end.stream.reads([data(b"ping"), Step::Eof]);
    echo.end.stream.writes([Step::Take(2), Step::Take(9)]);
    assert!(matches!(echo.pump(&mut pool), Ok(Flow::Done)));
    assert_eq!(echo.end.stream.written(), b"ping");
    assert_eq!(echo.end.stream.shutdowns(), 0, "the close sends the FIN");
    assert_eq!(pool.lent(), 0);
}

#[test]
fn an_echo_waits_for_room_then_goes_on() {
    let mut pool = pool();
    let mut echo = Echo::new(fresh());
    echo.end.stream.reads([data(b"12345678")]);
    echo.end.stream.writes([Step::Fail(WouldBlock)]);
    assert!(matches!(echo.pump(&mut pool), Ok(Flow::Idle)));
    echo.end.note(writable());
    echo.end.stream.writes([Step::Take(9)]);
    echo.end.stream.reads([Step::Fail(WouldBlock)]);
    assert!(matches!(echo.pump(&mut pool), Ok(Flow::Idle)));
    assert_eq!(echo.end.stream.written(), b"12345678");
    echo.release(&mut pool);
    assert_eq!(pool.lent(), 0);
}

#[test]
fn an_echo_reset_is_sticky() {
    let mut pool = pool();
    let mut echo = Echo::new(fresh());
    echo.end
        .stream
        .reads([Step::Fail(ConnectionReset), Step::Eof]);
    assert!(matches!(echo.pump(&mut pool), Err(Broken::Reset)));
    echo.end.note(readable());
    assert!(matches!(echo.pump(&mut pool), Err(Broken::Reset)));
    assert_eq!(echo.end.stream.reads_left(), 1);
}

#[test]
fn an_echo_sees_a_reset_through_the_error_hint() {
    let mut pool = pool();
    let mut echo = Echo::new(quiet());
    echo.end.stream.reset_by_peer();
    echo.end.note(failed());
    assert!(matches!(echo.pump(&mut pool), Err(Broken::Reset)));
}
