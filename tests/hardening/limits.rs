//! One test per limit: registered apps, peer connections, control-line
//! length, the relayed port range, time to register (slowloris), idle
//! half-closed pipes, and waiting clients under a flood.

use std::collections::BTreeSet;
use std::hash::{BuildHasher, RandomState};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::mpsc::{self, Receiver};
use std::thread;
use std::time::{Duration, Instant};

use tcp_relay::{AgentError, Config, RelayStyle, RelayedApp, Service};

use super::common::*;
use super::*;

/// `len` consecutive ports below the OS's ephemeral range (so no port-0
/// socket lands in them), each free right now. Each test passes its own
/// `lane`, a block of 2000 ports, so tests running in parallel never pick
/// overlapping ranges; the start within the lane is random.
fn quiet_range(lane: u16, len: u16) -> (u16, u16) {
    assert!(lane < 6 && len <= 100);
    for attempt in 0u64..50 {
        let offset = (RandomState::new().hash_one(attempt) % 1900) as u16;
        let start = 20_000 + lane * 2000 + offset;
        let end = start + len - 1;
        let free = (start..=end).all(|p| TcpListener::bind((LOCALHOST, p)).is_ok());
        if free {
            return (start, end);
        }
    }
    panic!("no {len} free consecutive ports found");
}

/// A relay with `max_apps = 2` turns a third app away with an `error`
/// line and closes it; the first two are served as usual, and once one
/// leaves, a new app registers again (the limit is on apps at once).
#[test]
fn max_apps_turns_away_apps_beyond_the_limit() {
    let relay = start_relay_with(|c| c.max_apps = 2);
    let first = TestApp::register(relay.reg_addr()).serve(echo);
    let second = TestApp::register(relay.reg_addr());
    wait_for_stats(&relay, "two apps", |s| s.apps == 2);
    let reason = refused_registration(relay.reg_addr());
    assert!(reason.contains("too many apps"), "reason: {reason:?}");

    assert_eq!(exchange(first.relayed_addr(), b"first"), b"first");
    second.disconnect();
    wait_for_stats(&relay, "one app left", |s| s.apps == 1);
    let third = TestApp::register(relay.reg_addr()).serve(echo_upper);
    assert_eq!(exchange(third.relayed_addr(), b"third"), b"THIRD");
    assert_eq!(exchange(first.relayed_addr(), b"still"), b"still");
}

/// With a secret, apps still answering the challenge count against
/// `max_apps` too: one silent applicant fills a limit of one, and the next
/// app is told `too many apps`.
#[test]
fn max_apps_counts_apps_still_authenticating() {
    let relay = start_secret_relay(|c| c.max_apps = 1);
    let mut silent = RawApp::connect(relay.reg_addr());
    silent.challenge();
    // Counts are published after each turn: see this one counted before
    // waiting for it to leave, or a stale zero could pass for its leaving.
    wait_for_stats(&relay, "one pending", |s| s.pending == 1);
    let reason = refused_registration(relay.reg_addr());
    assert!(reason.contains("too many apps"), "reason: {reason:?}");
    drop(silent);
    wait_for_stats(&relay, "nothing pending", |s| s.pending == 0);
    let (_app, _port) = RawApp::register(relay.reg_addr(), SECRET);
}

/// `max_connections = 3` is one app plus one pipe. Further clients and
/// further apps are reset without a byte, while the established pipe keeps
/// flowing both ways; once it ends, a new client is admitted again.
#[test]
fn max_connections_resets_new_connections_but_keeps_pipes_flowing() {
    let relay = start_relay_with(|c| c.max_connections = 3);
    let app = TestApp::register(relay.reg_addr());
    let mut client = connect(app.relayed_addr());
    let mut dial_in = app.dial_in();
    client.write_all(b"in").expect("client writes");
    assert_eq!(read_exactly(&mut dial_in, 2), b"in");
    wait_for_stats(&relay, "one pipe", |s| s.pipes == 1);

    for _ in 0..5 {
        assert_turned_away(try_connect(app.relayed_addr()), "a client beyond the limit");
    }
    assert_turned_away(try_connect(relay.reg_addr()), "an app beyond the limit");
    app.assert_no_dial_line();

    for round in 0..3u8 {
        client.write_all(&[round; 100]).expect("client writes");
        assert_eq!(read_exactly(&mut dial_in, 100), [round; 100]);
        dial_in.write_all(&[round + 10; 100]).expect("app writes");
        assert_eq!(read_exactly(&mut client, 100), [round + 10; 100]);
    }
    drop((client, dial_in));
    assert_no_leftovers(&relay);

    let mut again = connect(app.relayed_addr());
    let mut dial_in = app.dial_in();
    again.write_all(b"admitted").expect("client writes");
    assert_eq!(read_exactly(&mut dial_in, 8), b"admitted");
}

/// With `max_line = 64`, a 64-byte line (terminator included) is accepted
/// and ignored, a 65-byte one closes that app, and an unterminated flood
/// closes it too, without waiting for a newline. Other apps carry on.
#[test]
fn max_line_closes_the_app_that_sends_a_longer_line() {
    let relay = start_relay_with(|c| c.max_line = 64);
    let bystander = TestApp::register(relay.reg_addr()).serve(echo);

    let app = TestApp::register(relay.reg_addr());
    let mut fits = vec![b'x'; 63];
    fits.push(b'\n');
    app.send_control(&fits).expect("send a line at the limit");
    let client = connect(app.relayed_addr());
    app.next_dial_port(); // the control connection still works
    drop(client);
    let mut too_long = vec![b'y'; 64];
    too_long.push(b'\n');
    app.send_control(&too_long)
        .expect("send a line over the limit");
    app.wait_control_closed();

    let flooder = TestApp::register(relay.reg_addr());
    // The relay may close before reading it all: the outcome does not matter.
    let _ = flooder.send_control(&[b'z'; 4096]);
    flooder.wait_control_closed();

    wait_for_stats(&relay, "only the bystander", |s| s.apps == 1);
    assert_eq!(exchange(bystander.relayed_addr(), b"unharmed"), b"unharmed");
}

/// An applicant (secret relay) that floods bytes with no newline is closed
/// as soon as the line outgrows `max_line`, not after `register_timeout`.
#[test]
fn max_line_applies_while_authenticating() {
    let relay = start_secret_relay(|c| c.max_line = 128);
    let mut app = RawApp::connect(relay.reg_addr());
    app.challenge();
    let started = Instant::now();
    let _ = app.stream.write_all(&[b'a'; 4096]);
    app.expect_closed("an overlong answer");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed at once, not at the 10 s registration timeout"
    );
    wait_for_stats(&relay, "nothing pending", |s| s.pending == 0 && s.apps == 0);
}

/// Increment style with `port_range = lo-lo+2`: apps get lo, lo+1, lo+2 in
/// order, and the ports serve clients; a fourth app is refused with an
/// `error` line naming the exhausted range; when the first app leaves, a
/// new app gets its port back.
#[test]
fn increment_style_allocates_inside_the_port_range() {
    let (lo, hi) = quiet_range(0, 3);
    let relay = start_relay_with(|c| c.port_range = Some((lo, hi)));
    let apps: Vec<TestApp> = (0..3)
        .map(|_| TestApp::register(relay.reg_addr()))
        .collect();
    let ports: Vec<u16> = apps.iter().map(|a| a.relayed_port).collect();
    assert_eq!(ports, [lo, lo + 1, hi]);

    let reason = refused_registration(relay.reg_addr());
    assert!(
        reason.contains(&format!("no free port in {lo}-{hi}")),
        "the refusal must name the exhausted range: {reason:?}"
    );

    wait_for_stats(&relay, "three apps", |s| s.apps == 3);
    let mut apps = apps.into_iter();
    apps.next().expect("the first app").disconnect();
    wait_for_stats(&relay, "two apps", |s| s.apps == 2);
    let back = TestApp::register(relay.reg_addr()).serve(echo);
    assert_eq!(back.relayed_port, lo, "the freed port is reused");
    assert_eq!(exchange(back.relayed_addr(), b"in range"), b"in range");
}

/// Random style with a range: every app's port is inside it and distinct,
/// and the start is not simply the bottom of the range every time.
#[test]
fn random_style_allocates_inside_the_port_range() {
    let (lo, hi) = quiet_range(1, 50);
    let relay = start_relay_with(|c| {
        c.relay_style = RelayStyle::Random;
        c.port_range = Some((lo, hi));
    });
    let apps: Vec<TestApp> = (0..6)
        .map(|_| TestApp::register(relay.reg_addr()))
        .collect();
    let ports: Vec<u16> = apps.iter().map(|a| a.relayed_port).collect();
    for &port in &ports {
        assert!((lo..=hi).contains(&port), "port {port} outside {lo}-{hi}");
    }
    let distinct: BTreeSet<u16> = ports.iter().copied().collect();
    assert_eq!(distinct.len(), ports.len(), "ports {ports:?} repeat");
    let sequential: Vec<u16> = (lo..).take(ports.len()).collect();
    assert_ne!(ports, sequential, "random style allocated like increment");
}

/// A `port N` request outside the range is refused with a reason naming the
/// range, from the library and from the agent; one inside is granted.
#[test]
fn a_port_request_outside_the_range_is_refused() {
    let (lo, hi) = quiet_range(2, 5);
    let relay = start_relay_with(|c| c.port_range = Some((lo, hi)));
    let outside = hi + 1;
    match RelayedApp::register_on_port(relay.reg_addr(), outside) {
        Ok(app) => panic!("got port {} outside the range", app.relayed_port()),
        Err(e) => assert!(
            e.to_string().contains(&format!(
                "port {outside} is outside the relay's range {lo}-{hi}"
            )),
            "the reason must name the range: {e}"
        ),
    }

    let mut config = AgentConfig {
        splice: false,
        ..AgentConfig::new(relay.reg_addr().to_string(), Service::Echo)
    };
    config.services[0].port = Some(lo - 1);
    let mut agent = Agent::new(config).expect("create the agent");
    match agent.register() {
        Err(AgentError::Refused(reason)) => assert!(reason.contains("outside"), "{reason:?}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    wait_for_stats(&relay, "no app", |s| s.apps == 0);

    let inside = RelayedApp::register_on_port(relay.reg_addr(), hi).expect("a port in range");
    assert_eq!(inside.relayed_port(), hi);
}

/// With a secret, a range with no free port refuses an app that proved the
/// secret with an `error no relayed port: ...` line naming the range; the
/// agent's registration fails with that reason.
#[test]
fn a_range_with_no_free_port_refuses_registration() {
    let (lo, hi) = quiet_range(3, 1);
    let squatter = TcpListener::bind((LOCALHOST, lo)).expect("occupy the only port");
    let relay = start_secret_relay(|c| c.port_range = Some((lo, hi)));

    let mut app = RawApp::connect(relay.reg_addr());
    let nonce = app.challenge();
    app.send(auth_line_for(SECRET.as_bytes(), &nonce).as_bytes());
    let reason = app.refusal();
    assert!(reason.starts_with("no relayed port"), "reason: {reason:?}");
    assert!(reason.contains(&format!("{lo}-{hi}")), "reason: {reason:?}");

    let mut agent = agent(relay.reg_addr(), Service::Echo, Some(SECRET));
    // Running out of ports may pass, so the agent may class it as lost
    // rather than final; either way it must carry the relay's reason.
    match agent.register() {
        Err(e) => assert!(e.to_string().contains("no relayed port"), "error: {e}"),
        Ok(port) => panic!("registered on port {port} with no free port in range"),
    }
    wait_for_stats(&relay, "nothing held", |s| s.apps == 0 && s.pending == 0);
    drop(squatter);
}

/// Slowloris: with `register_timeout = 300ms`, applicants that never answer
/// the challenge (silent, or stalled half way through their answer) are
/// closed after the timeout without ever getting a port, while an honest
/// app registers and is served in the meantime.
#[test]
fn register_timeout_closes_apps_that_never_authenticate() {
    let timeout = Duration::from_millis(300);
    let relay = start_secret_relay(|c| c.register_timeout = timeout);
    let started = Instant::now();
    let mut stallers: Vec<RawApp> = (0..5)
        .map(|_| {
            let mut app = RawApp::connect(relay.reg_addr());
            app.challenge();
            app
        })
        .collect();
    let mut halfway = RawApp::connect(relay.reg_addr());
    let nonce = halfway.challenge();
    halfway.send(&auth_line_for(SECRET.as_bytes(), &nonce).as_bytes()[..30]);
    stallers.push(halfway);

    let honest = start_echo_agent(relay.reg_addr(), Some(SECRET));
    assert_eq!(exchange(local(honest.relayed_port()), b"served"), b"served");

    for app in &mut stallers {
        app.expect_closed("an app that never authenticated");
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= timeout,
        "closed after {elapsed:?}, before {timeout:?}"
    );
    wait_for_stats(&relay, "only the honest app", |s| {
        s.apps == 1 && s.pending == 0
    });
}

/// A client connected through the relay to a dial-in, with a few bytes
/// exchanged each way, and the client's write half then shut down (the
/// app sees EOF): a half-closed pipe.
fn half_closed_pipe(app: &TestApp) -> (TcpStream, TcpStream) {
    let mut client = connect(app.relayed_addr());
    let mut dial_in = app.dial_in();
    client.write_all(b"request").expect("client writes");
    assert_eq!(read_exactly(&mut dial_in, 7), b"request");
    client
        .shutdown(Shutdown::Write)
        .expect("client ends its half");
    assert_eq!(
        read_to_eof(&mut dial_in),
        b"",
        "the app sees the client's EOF"
    );
    (client, dial_in)
}

/// A half-closed pipe where nothing moves is closed after
/// `half_close_timeout` (300 ms), so nothing lingers in CLOSE_WAIT: both
/// ends see the stream end, and the relay holds nothing.
#[test]
fn half_close_timeout_closes_an_idle_half_closed_pipe() {
    let timeout = Duration::from_millis(300);
    let relay = start_relay_with(|c| c.half_close_timeout = timeout);
    let app = TestApp::register(relay.reg_addr());
    // The relay's idle clock starts no earlier than this.
    let started = Instant::now();
    let (mut client, dial_in) = half_closed_pipe(&app);
    wait_for_stats(&relay, "one pipe", |s| s.pipes == 1);

    let (_, bytes) = read_until_closed(&mut client);
    assert_eq!(bytes, 0, "the client got nothing it was not sent");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= timeout,
        "closed after {elapsed:?}, before {timeout:?}"
    );
    assert_no_leftovers(&relay);
    drop(dial_in);
}

/// An open pipe (neither side has shut down) may idle as long as its peers
/// like: neither the dial-in timeout armed while its client waited nor the
/// half-close idle timeout (for half-closed pipes only) closes it. Both are
/// short here; the pipe idles for several times their sum, then still
/// carries bytes both ways.
#[test]
fn an_open_pipe_idles_past_every_timeout() {
    let timeout = Duration::from_millis(150);
    let relay = start_relay_with(|c| {
        c.dial_in_timeout = timeout;
        c.half_close_timeout = timeout;
    });
    let app = TestApp::register(relay.reg_addr());
    let mut client = connect(app.relayed_addr());
    let mut dial_in = app.dial_in();
    client.write_all(b"ping").expect("client writes");
    assert_eq!(read_exactly(&mut dial_in, 4), b"ping");

    // The behaviour under test is time passing with nothing moving.
    thread::sleep(timeout * 8);
    assert_eq!(relay.stats().pipes, 1, "the idle pipe is still there");
    dial_in.write_all(b"pong").expect("app writes");
    assert_eq!(read_exactly(&mut client, 4), b"pong");
    client.write_all(b"again").expect("client writes again");
    assert_eq!(read_exactly(&mut dial_in, 5), b"again");
    drop((client, dial_in));
    assert_no_leftovers(&relay);
}

/// A half-closed pipe that keeps moving bytes is not closed: the app sends
/// 16 bytes every ~50 ms for 3x the timeout (500 ms), the client reads
/// every one of them, and the stream ends with the app's own orderly EOF.
#[test]
fn half_close_timeout_spares_a_half_closed_pipe_that_moves() {
    let timeout = Duration::from_millis(500);
    let relay = start_relay_with(|c| c.half_close_timeout = timeout);
    let app = TestApp::register(relay.reg_addr());
    let (mut client, mut dial_in) = half_closed_pipe(&app);

    let pattern = Pattern::new(50);
    let sender = thread::spawn(move || {
        let started = Instant::now();
        let mut offset = 0u64;
        while started.elapsed() < timeout * 3 {
            dial_in
                .write_all(&pattern.bytes(offset, 16))
                .expect("the pipe is still open");
            offset += 16;
            // Pacing the sender, not synchronisation: the gaps are what the
            // idle timer must not mistake for idleness.
            thread::sleep(Duration::from_millis(50));
        }
        dial_in.shutdown(Shutdown::Write).expect("app ends");
        offset
    });
    let received = pattern.check(&mut client);
    let sent = sender.join().expect("the sender panicked");
    assert_eq!(received, sent, "every byte arrived and the end was orderly");
    assert_no_leftovers(&relay);
}

/// How a flood client ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Reset,
    Closed,
}

/// One client of a flood: when its connect began and returned, and how
/// and when the relay ended it.
struct Flooder {
    stream: TcpStream,              // non-blocking
    began: Instant,                 // before connect
    connected: Instant,             // after connect returned
    ended: Option<(Fate, Instant)>, // once seen
}

impl Flooder {
    /// Checks, without blocking, whether the relay has ended this client;
    /// a byte from the relay fails the test (nobody dialed in).
    fn poll(&mut self) {
        if self.ended.is_some() {
            return;
        }
        let mut buf = [0u8; 16];
        self.ended = match (&self.stream).read(&mut buf) {
            Ok(0) => Some((Fate::Closed, Instant::now())),
            Ok(n) => panic!("a flood client received {n} bytes"),
            Err(e) if e.kind() == ErrorKind::WouldBlock => None,
            Err(e) if e.kind() == ErrorKind::ConnectionReset => Some((Fate::Reset, Instant::now())),
            Err(e) => panic!("a flood client failed: {e}"),
        };
    }
}

/// Connects `count` clients to `addr` on a thread of its own, sending each
/// (with when its connect began and returned) as soon as it is connected;
/// `None` for one the relay reset before `connect` returned.
fn flood(addr: SocketAddr, count: usize) -> Receiver<(Option<TcpStream>, Instant, Instant)> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for _ in 0..count {
            let began = Instant::now();
            let stream = match try_connect(addr) {
                Ok(stream) => Some(stream),
                Err(e) if e.kind() == ErrorKind::ConnectionReset => None,
                Err(e) => panic!("connect: {e}"),
            };
            if tx.send((stream, began, Instant::now())).is_err() {
                return;
            }
        }
    });
    rx
}

/// A flood of 200 clients on an app that never dials in, with
/// `max_waiting_per_app = 50` and a 1 s dial-in timeout. The waiting count
/// reaches 50 and never passes it; every client beyond it is reset at once
/// (well within the timeout of its connect); every client let in is closed
/// after a full dial-in timeout, with the app sent one dial line for each;
/// when the flood arrives within one timeout, exactly 50 get in. Then the
/// relay holds nothing and still serves that app and a new one.
///
/// Clients are connected on a thread while this one watches them, so a
/// reset is timed when it happens even if a connect stalls (a SYN
/// retransmitted after a second is not rare on a busy loopback).
#[test]
fn a_flood_of_clients_is_bounded_and_times_out() {
    const FLOOD: usize = 200;
    const MAX_WAITING: usize = 50;
    let timeout = Duration::from_secs(1);
    let relay = start_relay_with(|c| {
        c.max_waiting_per_app = MAX_WAITING;
        c.dial_in_timeout = timeout;
    });
    let app = TestApp::register(relay.reg_addr());
    let arrivals = flood(app.relayed_addr(), FLOOD);

    let (mut flooders, mut arrived, mut reset_in_connect) = (Vec::new(), 0, 0);
    let mut most_waiting = 0;
    let deadline = Instant::now() + 2 * WAIT;
    while arrived < FLOOD || flooders.iter().any(|f: &Flooder| f.ended.is_none()) {
        assert!(
            Instant::now() < deadline,
            "the flood is still open after {:?}",
            2 * WAIT
        );
        while let Ok((stream, began, connected)) = arrivals.try_recv() {
            arrived += 1;
            let Some(stream) = stream else {
                reset_in_connect += 1;
                continue;
            };
            stream.set_nonblocking(true).expect("non-blocking");
            flooders.push(Flooder {
                stream,
                began,
                connected,
                ended: None,
            });
        }
        flooders.iter_mut().for_each(Flooder::poll);
        most_waiting = most_waiting.max(relay.stats().waiting_clients);
        // A poll interval: every client and the counts are checked again.
        thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(
        most_waiting, MAX_WAITING,
        "the waiting limit reached, never passed"
    );

    let mut let_in = 0;
    for flooder in &flooders {
        let (fate, at) = flooder.ended.expect("every client ended");
        match fate {
            Fate::Closed => {
                let_in += 1;
                // The relay starts the clock at the start of the turn that
                // accepts a client, which may be a little before that
                // client's connect began.
                let waited = at - flooder.began;
                assert!(
                    waited >= timeout * 9 / 10,
                    "closed after {waited:?}, before the dial-in timeout"
                );
            }
            Fate::Reset => {
                let after = at - flooder.connected;
                assert!(
                    after < timeout / 2,
                    "a client beyond the limit was reset after {after:?}"
                );
            }
        }
    }
    let flood_took = flooders.iter().map(|f| f.connected).max().expect("clients")
        - flooders.iter().map(|f| f.began).min().expect("clients");
    eprintln!(
        "flood of {FLOOD} in {flood_took:?}: {let_in} let in, {} reset ({reset_in_connect} in connect)",
        FLOOD - let_in
    );
    assert!(let_in >= MAX_WAITING, "only {let_in} clients were let in");
    if flood_took < timeout {
        assert_eq!(let_in, MAX_WAITING, "no room was freed during the flood");
    }
    for _ in 0..let_in {
        app.next_dial_port();
    }
    assert_no_leftovers(&relay);
    app.assert_no_dial_line();

    let mut client = connect(app.relayed_addr());
    let mut dial_in = app.dial_in();
    client.write_all(b"after the flood").expect("client writes");
    assert_eq!(read_exactly(&mut dial_in, 15), b"after the flood");
    let other = TestApp::register(relay.reg_addr()).serve(echo);
    assert_eq!(exchange(other.relayed_addr(), b"fresh"), b"fresh");
}

/// Every limit is on by default, with a sane value: generous enough for
/// honest use, finite against hostile peers.
#[test]
fn every_limit_has_a_sane_default() {
    let d = Config::default();
    assert!(d.max_apps >= 1 && d.max_waiting_per_app >= 1);
    assert!(d.max_connections >= 2 * d.max_waiting_per_app);
    // A burst the backlog queues for one app must fit its waiting queue:
    // below it, 2,000 clients at once through `expose --ready 8` lost
    // hundreds (benches/burst.sh, RELAY_ARGS="--max-waiting 1024").
    assert!(d.max_waiting_per_app >= d.backlog as usize);
    assert!(d.max_line >= 80, "room for the longest legitimate line");
    assert!(d.register_timeout >= Duration::from_secs(1));
    assert!(d.half_close_timeout >= Duration::from_secs(60), "generous");
    assert!(d.grace >= Duration::from_secs(1));
    assert_eq!(d.port_range, None);
}
