//! Shutting down on a signal: the relay binary under SIGTERM and SIGINT
//! closes its ports and apps at once, lets open pipes drain for the grace
//! period, and exits 0; a second signal ends it at once.

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use super::common::*;
use super::*;

/// How soon "at once" must be, with room for a loaded machine.
const PROMPTLY: Duration = Duration::from_secs(2);

/// A relay process with `extra` flags, an app registered on it, and one
/// client piped to that app's dial-in, with bytes exchanged both ways.
fn relay_with_a_pipe(extra: &[&str]) -> (Process, SocketAddr, TestApp, TcpStream, TcpStream) {
    let (relay, reg) = serve_process(&[], extra, &[]);
    let app = TestApp::register(reg);
    let mut client = connect(app.relayed_addr());
    let mut dial_in = app.dial_in();
    flows(&mut client, &mut dial_in, b"hello");
    (relay, reg, app, client, dial_in)
}

/// Bytes go from the client to the app and back.
fn flows(client: &mut TcpStream, dial_in: &mut TcpStream, bytes: &[u8]) {
    client.write_all(bytes).expect("client writes");
    assert_eq!(read_exactly(dial_in, bytes.len()), bytes);
    dial_in.write_all(bytes).expect("app writes");
    assert_eq!(read_exactly(client, bytes.len()), bytes);
}

/// On SIGTERM the registration and relayed ports are refused at once, the
/// app's control connection and its waiting client are closed, and the
/// relay keeps running while an established pipe flows; when the client
/// ends that pipe, the relay exits 0 without waiting out its 60 s grace.
#[test]
fn sigterm_closes_ports_at_once_and_exits_zero_once_pipes_finish() {
    let (mut relay, reg, app, mut client, mut dial_in) =
        relay_with_a_pipe(&["--grace", "60s", "--dial-in-timeout", "60s"]);
    let mut waiting = connect(app.relayed_addr());
    app.next_dial_port();

    relay.signal(libc::SIGTERM);
    let signalled = Instant::now();
    wait_until_refused(reg);
    wait_until_refused(app.relayed_addr());
    assert!(
        signalled.elapsed() < PROMPTLY,
        "ports closed after {:?}",
        signalled.elapsed()
    );
    app.wait_control_closed();
    assert_closed_empty(&mut waiting, "a client waiting at shutdown");

    for round in 0..3 {
        flows(
            &mut client,
            &mut dial_in,
            format!("draining {round}").as_bytes(),
        );
    }
    assert!(
        relay.is_running(),
        "exited with a pipe open: {:?}",
        relay.log()
    );

    client.shutdown(Shutdown::Write).expect("client ends");
    assert_eq!(read_to_eof(&mut dial_in), b"");
    dial_in.shutdown(Shutdown::Write).expect("app ends");
    assert_eq!(read_to_eof(&mut client), b"");
    let ended = Instant::now();
    let status = relay.exit_status(WAIT, "the drained relay");
    assert!(
        status.success(),
        "exit status {status:?}; log {:?}",
        relay.log()
    );
    assert!(
        ended.elapsed() < PROMPTLY,
        "exited only after {:?}",
        ended.elapsed()
    );
}

/// With `--grace 300ms` and a pipe left open, the relay exits 0 once the
/// grace period is over (not before), cutting the pipe: the client sees
/// its stream end.
#[test]
fn sigterm_exits_zero_after_the_grace_period() {
    let grace = Duration::from_millis(300);
    let (mut relay, _reg, _app, mut client, _dial_in) = relay_with_a_pipe(&["--grace", "300ms"]);
    let signalled = Instant::now();
    relay.signal(libc::SIGTERM);
    let status = relay.exit_status(WAIT, "the relay after its grace period");
    let elapsed = signalled.elapsed();
    assert!(
        status.success(),
        "exit status {status:?}; log {:?}",
        relay.log()
    );
    assert!(
        elapsed >= grace,
        "exited after {elapsed:?}, within the grace period"
    );
    assert!(elapsed < grace + PROMPTLY, "exited only after {elapsed:?}");
    let (ended, bytes) = read_until_closed(&mut client);
    assert_eq!(bytes, 0, "nothing after the cut ({ended:?})");
}

/// A second SIGTERM during the drain ends the relay at once, although a
/// pipe is open and 60 s of grace are left.
#[test]
fn a_second_sigterm_exits_at_once() {
    let (mut relay, reg, _app, _client, _dial_in) = relay_with_a_pipe(&["--grace", "60s"]);
    relay.signal(libc::SIGTERM);
    wait_until_refused(reg);
    assert!(relay.is_running(), "the first signal only starts the drain");
    let second = Instant::now();
    relay.signal(libc::SIGTERM);
    let status = relay.exit_status(PROMPTLY, "the relay after a second signal");
    eprintln!(
        "exit status after a second signal: {status:?} in {:?}",
        second.elapsed()
    );
}

/// SIGINT drains like SIGTERM: with nothing open, the relay exits 0 at once.
#[test]
fn sigint_with_nothing_open_exits_zero_at_once() {
    let (mut relay, reg) = serve_process(&[], &["--grace", "60s"], &[]);
    let app = TestApp::register(reg);
    relay.signal(libc::SIGINT);
    let status = relay.exit_status(PROMPTLY, "the idle relay after SIGINT");
    assert!(
        status.success(),
        "exit status {status:?}; log {:?}",
        relay.log()
    );
    app.wait_control_closed();
}
