//! End to end: how connections end: resets, apps going away, dial-ins that
//! come late, from the wrong address or not at all, and apps that send
//! garbage on their control connection.

mod common;

use std::io::{ErrorKind, Write};
use std::net::Shutdown;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// A dial-in timeout no test outlives, so that only the app's departure can
/// close a waiting client.
const NEVER: Duration = Duration::from_secs(3600);

/// A client that resets mid-transfer ends the whole pipe: the app's dial-in
/// sees the stream end (reset or EOF), and the relay holds nothing after.
#[test]
fn a_client_reset_mid_transfer_closes_the_pipe() {
    let relay = start_relay();
    let app = TestApp::register(relay.reg_addr());
    let mut client = connect(app.relayed_addr());
    let mut dial_in = app.dial_in();
    // The app reads only the start, so bytes are still in flight in the
    // relay; 256 KiB fits in loopback socket buffers, so the write returns.
    let sent = Pattern::new(7).bytes(0, 256 * 1024);
    client.write_all(&sent).expect("send");
    assert!(
        read_exactly(&mut dial_in, 1024) == sent[..1024],
        "the transfer started"
    );
    set_reset_on_drop(&client);
    drop(client);

    let (ended, _) = read_until_closed(&mut dial_in);
    eprintln!("dial-in ended with {ended:?}");
    assert_no_leftovers(&relay);
    assert_eq!(relay.stats().apps, 1, "the app itself is unaffected");
}

/// A reset from the app's side reaches the client as a reset, not as a
/// clean EOF it could mistake for a complete stream.
#[test]
fn an_app_side_reset_reaches_the_client_as_a_reset() {
    let relay = start_relay();
    let app = TestApp::register(relay.reg_addr());
    let mut client = connect(app.relayed_addr());
    let mut dial_in = app.dial_in();
    dial_in.write_all(b"partial answ").expect("send");
    assert_eq!(read_exactly(&mut client, 12), b"partial answ");
    set_reset_on_drop(&dial_in);
    drop(dial_in);

    let (ended, bytes) = read_until_closed(&mut client);
    assert_eq!(bytes, 0);
    assert_eq!(
        ended,
        Ended::Error(ErrorKind::ConnectionReset),
        "the client must see the abort"
    );
    assert_no_leftovers(&relay);
}

/// When an app's control connection ends, its relayed and dial-in ports
/// close at once, its waiting clients are closed, its established pipes run
/// on, and a new registration gets the same port back (increment style).
#[test]
fn app_disconnect_closes_its_ports_and_waiting_clients_but_not_its_pipes() {
    let relay = start_relay_with(|c| c.dial_in_timeout = NEVER);
    let app = TestApp::register(relay.reg_addr());
    let port = app.relayed_port;

    let mut piped = connect(app.relayed_addr());
    let mut dial_in = app.dial_in();
    let mut waiting = connect(app.relayed_addr());
    let dial_port = app.next_dial_port();
    wait_for_stats(&relay, "one pipe and one waiting client", |s| {
        s.pipes == 1 && s.waiting_clients == 1
    });

    app.disconnect();
    wait_for_stats(&relay, "the app is gone", |s| s.apps == 0);
    wait_until_refused(local(port));
    assert_refused(local(dial_port));
    assert_closed_empty(&mut waiting, "a client waiting on a departed app");

    // The established pipe still works both ways, and ends normally.
    piped.write_all(b"still there?").expect("client writes");
    assert_eq!(read_exactly(&mut dial_in, 12), b"still there?");
    dial_in.write_all(b"yes").expect("app writes");
    dial_in.shutdown(Shutdown::Write).expect("app ends");
    assert_eq!(read_exactly(&mut piped, 3), b"yes");
    piped.shutdown(Shutdown::Write).expect("client ends");
    assert_eq!(read_to_eof(&mut piped), b"");
    assert_eq!(read_to_eof(&mut dial_in), b"");
    assert_no_leftovers(&relay);

    let again = TestApp::register(relay.reg_addr()).serve(echo);
    assert_eq!(
        again.relayed_port, port,
        "the lowest free port above the registration port"
    );
    assert_eq!(exchange(again.relayed_addr(), b"back"), b"back");
    assert_no_leftovers(&relay);
}

/// A client whose dial-in does not come within `dial_in_timeout` is closed
/// (no sooner), and a dial-in arriving after that finds no client and is
/// closed too.
#[test]
fn a_client_without_a_dial_in_is_closed_after_the_timeout() {
    const TIMEOUT: Duration = Duration::from_millis(300);
    let relay = start_relay_with(|c| c.dial_in_timeout = TIMEOUT);
    let app = TestApp::register(relay.reg_addr());
    let started = Instant::now();
    let mut client = connect(app.relayed_addr());
    let dial_port = app.next_dial_port();

    assert_closed_empty(&mut client, "a client whose dial-in never came");
    let waited = started.elapsed();
    assert!(
        waited >= TIMEOUT,
        "closed after {waited:?}, before the {TIMEOUT:?} timeout"
    );
    wait_for_stats(&relay, "the client is forgotten", |s| {
        s.waiting_clients == 0
    });

    assert_turned_away(
        try_connect(local(dial_port)),
        "a dial-in with no client waiting",
    );
    assert_no_leftovers(&relay);
    assert_eq!(relay.stats().apps, 1, "the app itself is unaffected");
}

/// A dial-in from an address other than the app's is closed at once and
/// gets nothing; the client keeps waiting and the real dial-in gets it.
#[test]
fn a_dial_in_from_another_address_gets_nothing() {
    let relay = start_relay();
    let app = TestApp::register(relay.reg_addr());
    let mut client = connect(app.relayed_addr());
    client.write_all(b"secret").expect("client writes");
    let dial_port = app.next_dial_port();

    let intruder = connect_from(OTHER_LOOPBACK, local(dial_port));
    assert_turned_away(intruder, "a dial-in from 127.0.0.2");
    assert_eq!(relay.stats().waiting_clients, 1, "the client still waits");

    let mut dial_in = connect(local(dial_port));
    assert_eq!(read_exactly(&mut dial_in, 6), b"secret");
    dial_in.write_all(b"ok").expect("app writes");
    assert_eq!(read_exactly(&mut client, 2), b"ok");
    drop((client, dial_in));
    assert_no_leftovers(&relay);
}

/// Lines an app sends are ignored, binary garbage included, but a line
/// longer than the 1024-byte bound closes that app (and only it): apps
/// registered before and after keep working.
#[test]
fn garbage_and_an_overlong_line_close_only_the_sender() {
    let relay = start_relay();
    let before = TestApp::register(relay.reg_addr()).serve(echo);
    let noisy = TestApp::register(relay.reg_addr());
    wait_for_stats(&relay, "two apps are registered", |s| s.apps == 2);

    // Short lines of binary garbage are ignored: the app still works.
    noisy
        .send_control(&binary_garbage(64 * 1024))
        .expect("send garbage");
    let mut client = connect(noisy.relayed_addr());
    let mut dial_in = noisy.dial_in();
    client.write_all(b"through").expect("client writes");
    assert_eq!(read_exactly(&mut dial_in, 7), b"through");
    drop((client, dial_in));

    // A 1 MiB line without a newline is not. The relay may close while we
    // are still writing, so a failed write is expected, not a test failure.
    let noisy_port = noisy.relayed_port;
    let _ = noisy.send_control(&vec![b'x'; 1024 * 1024]);
    noisy.wait_control_closed();
    wait_for_stats(&relay, "the noisy app is closed", |s| s.apps == 1);
    wait_until_refused(local(noisy_port));

    let after = TestApp::register(relay.reg_addr()).serve(echo);
    assert_eq!(exchange(before.relayed_addr(), b"before"), b"before");
    assert_eq!(exchange(after.relayed_addr(), b"after"), b"after");
    assert_no_leftovers(&relay);
}

/// Pseudo-random bytes of every value, with a `\n` at least every 700 bytes
/// so that no line reaches the length bound.
fn binary_garbage(len: usize) -> Vec<u8> {
    let mut bytes = Pattern::new(8).bytes(0, len);
    for chunk in bytes.chunks_mut(700) {
        let last = chunk.len() - 1;
        chunk[last] = b'\n';
    }
    bytes
}

/// Many clients waiting on one app that never dials in are all closed when
/// the app goes, and none is left behind.
#[test]
fn every_waiting_client_is_closed_when_its_app_goes() {
    let relay = start_relay_with(|c| c.dial_in_timeout = NEVER);
    let app = TestApp::register(relay.reg_addr());
    let mut clients: Vec<_> = (0..20).map(|_| connect(app.relayed_addr())).collect();
    wait_for_stats(&relay, "twenty clients wait", |s| s.waiting_clients == 20);
    app.disconnect();
    thread::scope(|scope| {
        for client in &mut clients {
            scope.spawn(|| assert_closed_empty(client, "a client waiting on a departed app"));
        }
    });
    assert_no_leftovers(&relay);
}

/// A client that resets while it waits for its dial-in is forgotten at
/// once (not at the dial-in timeout), and the dial-in that comes for it
/// later finds no client and is closed.
#[test]
fn a_client_reset_while_waiting_is_forgotten() {
    let relay = start_relay_with(|c| c.dial_in_timeout = NEVER);
    let app = TestApp::register(relay.reg_addr());
    let client = connect(app.relayed_addr());
    let dial_port = app.next_dial_port();
    wait_for_stats(&relay, "the client waits", |s| s.waiting_clients == 1);
    set_reset_on_drop(&client);
    drop(client);
    wait_for_stats(&relay, "the reset client is forgotten", |s| {
        s.waiting_clients == 0
    });

    assert_turned_away(
        try_connect(local(dial_port)),
        "a dial-in for a client that reset",
    );
    assert_no_leftovers(&relay);
}

/// An app may have at most `max_waiting_per_app` clients waiting for
/// dial-ins: one more is closed at once without a dial line, and the ones
/// already waiting are still served.
#[test]
fn clients_beyond_the_waiting_limit_are_closed() {
    let relay = start_relay_with(|c| {
        c.max_waiting_per_app = 2;
        c.dial_in_timeout = NEVER;
    });
    let app = TestApp::register(relay.reg_addr());
    let mut first = connect(app.relayed_addr());
    let mut second = connect(app.relayed_addr());
    let dial_port = app.next_dial_port();
    assert_eq!(app.next_dial_port(), dial_port, "one dial-in port per app");
    wait_for_stats(&relay, "two clients wait", |s| s.waiting_clients == 2);

    assert_turned_away(
        try_connect(app.relayed_addr()),
        "a client over the waiting limit",
    );
    assert_eq!(relay.stats().waiting_clients, 2);
    app.assert_no_dial_line();

    for client in [&mut first, &mut second] {
        let mut dial_in = connect(local(dial_port));
        client.write_all(b"ping").expect("client writes");
        assert_eq!(read_exactly(&mut dial_in, 4), b"ping");
    }
    drop((first, second));
    assert_no_leftovers(&relay);
}

/// A client that ends its stream (FIN) and then resets: the relay notices
/// the reset although it no longer reads that side, and resets the app's
/// dial-in at once instead of leaving the pipe half-closed until the idle
/// timeout.
#[test]
fn a_reset_after_a_fin_still_reaches_the_app() {
    let relay = start_relay();
    let app = TestApp::register(relay.reg_addr());
    let mut client = connect(app.relayed_addr());
    let mut dial_in = app.dial_in();
    client.write_all(b"last words").expect("client writes");
    client
        .shutdown(Shutdown::Write)
        .expect("client ends its stream");
    assert_eq!(read_exactly(&mut dial_in, 10), b"last words");
    let (ended, _) = read_until_closed(&mut dial_in.try_clone().expect("clone"));
    assert!(
        matches!(ended, Ended::Eof),
        "the FIN is carried first: {ended:?}"
    );
    set_reset_on_drop(&client);
    drop(client);
    wait_for_stats(&relay, "the reset pipe to be closed", |s| s.pipes == 0);
    assert_no_leftovers(&relay);
}
