//! Dial-ins with a secret: each presents the one-time token of the client
//! it is for. Strangers, wrong tokens and reused tokens get nothing; the
//! app's own dial-in gets exactly its client, with the bytes it sent behind
//! the token intact; and [`RelayedApp`] does all this for its user.

use std::io::{Read, Write};
use std::net::Shutdown;
use std::thread;
use std::time::{Duration, Instant};

use tcp_relay::{RegisterOptions, RelayedApp};

use super::common::*;
use super::*;

/// A token of the right form that the relay never issued.
const FORGED_TOKEN: &str = "0123456789abcdef0123456789abcdef";

/// Strangers get nothing: dial-ins from 127.0.0.1 and 127.0.0.2 with a
/// forged token, a malformed token or a token line cut short are closed
/// without a byte, and the client they tried to take keeps waiting. The
/// app's own dial-in then gets that client, and bytes flow both ways
/// without a trace of what the strangers sent.
#[test]
fn strangers_with_wrong_tokens_get_nothing_and_the_app_gets_its_client() {
    let relay = start_secret_relay(|_| {});
    let (mut app, port) = RawApp::register(relay.reg_addr(), SECRET);
    let mut client = connect(local(port));
    client.write_all(b"from the client").expect("client writes");
    let (dial_port, token) = app.dial_line();

    let strangers = [
        (
            LOCALHOST,
            FORGED_TOKEN.to_owned(),
            "a forged token from 127.0.0.1",
        ),
        (
            OTHER_LOOPBACK,
            FORGED_TOKEN.to_owned(),
            "a forged token from 127.0.0.2",
        ),
        (LOCALHOST, "x".repeat(32), "a token that is not hex"),
        (
            LOCALHOST,
            token[..31].to_owned(),
            "a token line one digit short",
        ),
        (
            OTHER_LOOPBACK,
            token.to_uppercase() + "!",
            "the token, misterminated",
        ),
    ];
    for (from, forged, what) in strangers {
        let attempt = dial_in_with(from, dial_port, &forged, b"STRANGER BYTES");
        assert_turned_away(attempt, what);
    }
    wait_for_stats(&relay, "the client still waits, nothing pending", |s| {
        s.waiting_clients == 1 && s.pending == 0 && s.pipes == 0
    });

    let mut dial_in = dial_in_with(LOCALHOST, dial_port, &token, b"from the app").expect("dial in");
    assert_eq!(read_exactly(&mut client, 12), b"from the app");
    assert_eq!(read_exactly(&mut dial_in, 15), b"from the client");
    client.write_all(b" again").expect("client writes");
    assert_eq!(read_exactly(&mut dial_in, 6), b" again");

    client.shutdown(Shutdown::Write).expect("client ends");
    dial_in.shutdown(Shutdown::Write).expect("app ends");
    assert_eq!(read_to_eof(&mut client), b"", "nothing but the app's bytes");
    assert_eq!(
        read_to_eof(&mut dial_in),
        b"",
        "nothing but the client's bytes"
    );
    assert_no_leftovers(&relay);
}

/// A token is good once. With two clients waiting, replaying the first
/// client's token (after its dial-in used it) gets nothing, and does not
/// take the second client, whose own token still works.
#[test]
fn a_reused_token_gets_nothing() {
    let relay = start_secret_relay(|_| {});
    let (mut app, port) = RawApp::register(relay.reg_addr(), SECRET);
    let mut first = connect(local(port));
    let (dial_port, first_token) = app.dial_line();
    let mut second = connect(local(port));
    let (_, second_token) = app.dial_line();
    assert_ne!(first_token, second_token, "one token per client");

    let mut first_in = dial_in_with(LOCALHOST, dial_port, &first_token, b"1").expect("dial in");
    assert_eq!(read_exactly(&mut first, 1), b"1");
    wait_for_stats(&relay, "one pipe, one client waiting", |s| {
        s.pipes == 1 && s.waiting_clients == 1
    });

    for from in [LOCALHOST, OTHER_LOOPBACK] {
        let replay = dial_in_with(from, dial_port, &first_token, b"REPLAYED");
        assert_turned_away(replay, "a reused token");
    }
    wait_for_stats(&relay, "the second client still waits", |s| {
        s.pipes == 1 && s.waiting_clients == 1 && s.pending == 0
    });

    let mut second_in = dial_in_with(LOCALHOST, dial_port, &second_token, b"2").expect("dial in");
    assert_eq!(read_exactly(&mut second, 1), b"2");
    for (client, dial_in) in [(&mut first, &mut first_in), (&mut second, &mut second_in)] {
        client.write_all(b"ping").expect("client writes");
        assert_eq!(read_exactly(dial_in, 4), b"ping");
        client.shutdown(Shutdown::Write).expect("client ends");
        dial_in.shutdown(Shutdown::Write).expect("app ends");
        assert_eq!(read_to_eof(client), b"", "no replayed bytes reach a client");
        assert_eq!(read_to_eof(dial_in), b"");
    }
    assert_no_leftovers(&relay);
}

/// The relay reads the token line byte-exact: 1 MiB the app writes right
/// behind it, in the same write, reaches the client intact.
#[test]
fn bytes_right_behind_the_token_reach_the_client_intact() {
    const LEN: usize = 1024 * 1024;
    let relay = start_secret_relay(|_| {});
    let (mut app, port) = RawApp::register(relay.reg_addr(), SECRET);
    let mut client = connect(local(port));
    let (dial_port, token) = app.dial_line();

    let pattern = Pattern::new(33);
    let mut dial_in = connect(local(dial_port));
    let mut first_write = format!("{token}\n").into_bytes();
    first_write.extend(pattern.bytes(0, LEN));
    let writer = thread::spawn(move || {
        dial_in.write_all(&first_write).expect("token and payload");
        dial_in.shutdown(Shutdown::Write).expect("app ends");
        dial_in
    });
    assert_eq!(pattern.check(&mut client), LEN as u64);
    drop(client);
    drop(writer.join().expect("the writer panicked"));
    assert_no_leftovers(&relay);
}

/// A dial-in that never completes its token line (silent, or stalled half
/// way) is closed after `register_timeout`, with nothing sent to it; the
/// client it might have been for keeps waiting, and the app's real dial-in
/// still gets it.
#[test]
fn a_dial_in_that_never_presents_its_token_is_closed_after_the_timeout() {
    let timeout = Duration::from_millis(300);
    let relay = start_secret_relay(|c| c.register_timeout = timeout);
    let (mut app, port) = RawApp::register(relay.reg_addr(), SECRET);
    let mut client = connect(local(port));
    let (dial_port, token) = app.dial_line();

    let started = Instant::now();
    let mut silent = connect(local(dial_port));
    let mut stalled = connect(local(dial_port));
    stalled
        .write_all(&token.as_bytes()[..16])
        .expect("half a token");
    wait_for_stats(&relay, "two dial-ins presenting", |s| s.pending == 2);
    for (stream, what) in [
        (&mut silent, "a silent dial-in"),
        (&mut stalled, "a stalled dial-in"),
    ] {
        assert_closed_empty(stream, what);
    }
    let elapsed = started.elapsed();
    assert!(
        elapsed >= timeout,
        "closed after {elapsed:?}, before the {timeout:?} timeout"
    );
    wait_for_stats(&relay, "nothing pending, the client waits", |s| {
        s.pending == 0 && s.waiting_clients == 1
    });

    let mut dial_in =
        dial_in_with(LOCALHOST, dial_port, &token, b"late but real").expect("dial in");
    assert_eq!(read_exactly(&mut client, 13), b"late but real");
    client.write_all(b"thanks").expect("client writes");
    assert_eq!(read_exactly(&mut dial_in, 6), b"thanks");
    drop((client, dial_in));
    assert_no_leftovers(&relay);
}

/// `RelayedApp::register_with` answers the challenge, and `accept` presents
/// each client's token on its dial-in: clients are served. Asking for a
/// port works together with the secret. A wrong or missing secret fails
/// registration with an error saying why.
#[test]
fn relayed_app_registers_with_a_secret_and_accept_presents_tokens() {
    let relay = start_secret_relay(|_| {});
    let options = RegisterOptions {
        port: None,
        secret: Some(secret(SECRET)),
        ..RegisterOptions::default()
    };
    let app = RelayedApp::register_with(relay.reg_addr(), &options).expect("register");
    let public = app.public_addr();
    let server = thread::spawn(move || {
        for _ in 0..2 {
            let mut stream = with_timeouts(app.accept().expect("accept a client"));
            let mut buf = [0u8; 5];
            stream.read_exact(&mut buf).expect("read the request");
            buf.make_ascii_uppercase();
            stream.write_all(&buf).expect("answer");
        }
    });
    for request in [b"first", b"again"] {
        let mut client = connect(public);
        client.write_all(request).expect("send");
        assert_eq!(read_exactly(&mut client, 5), request.to_ascii_uppercase());
    }
    server.join().expect("the relayed app panicked");
    assert_no_leftovers(&relay);

    let wanted = free_port();
    let on_port = RegisterOptions {
        port: Some(wanted),
        secret: Some(secret(SECRET)),
        ..RegisterOptions::default()
    };
    let moved = RelayedApp::register_with(relay.reg_addr(), &on_port).expect("register on a port");
    assert_eq!(moved.relayed_port(), wanted);

    let refusals = [
        (Some(secret("guess")), "secret refused"),
        (None, "requires a secret"),
    ];
    for (secret, message) in refusals {
        let options = RegisterOptions {
            secret,
            ..RegisterOptions::default()
        };
        match RelayedApp::register_with(relay.reg_addr(), &options) {
            Ok(_) => panic!("registered without the secret"),
            Err(e) => assert!(e.to_string().contains(message), "{e} must say {message:?}"),
        }
    }
    wait_for_stats(&relay, "only the app on its port, nothing pending", |s| {
        s.apps == 1 && s.pending == 0
    });
}
