//! Authentication: an app proves it knows the secret by answering a fresh
//! challenge, from the library, the agent and the command line; the secret
//! itself never crosses the wire, and a recorded answer cannot be replayed.

use std::net::{Shutdown, SocketAddr, TcpListener};
use std::thread;
use std::time::{Duration, Instant};

use tcp_relay::{AgentError, Service};

use super::common::*;
use super::*;

/// An agent with the right secret registers with a secret relay, and its
/// clients are served: the relay's tokens are presented for it.
#[test]
fn an_agent_with_the_right_secret_registers_and_echoes() {
    let relay = start_secret_relay(|_| {});
    let agent = start_echo_agent(relay.reg_addr(), Some(SECRET));
    let public = local(agent.relayed_port());
    for i in 0..3 {
        let request = format!("hello {i} through an authenticated relay");
        assert_eq!(exchange(public, request.as_bytes()), request.as_bytes());
    }
    assert_no_leftovers(&relay);
    let stats = relay.stats();
    assert_eq!((stats.apps, stats.pending), (1, 0), "{stats:?}");
}

/// A wrong secret gets `error secret refused`: `register` fails with
/// `AgentError::Refused` saying so, and the relay keeps nothing of the
/// attempt (no app, nothing pending). A right secret still works after.
#[test]
fn a_wrong_secret_is_refused_and_leaves_nothing_behind() {
    let relay = start_secret_relay(|_| {});
    let mut wrong = agent(relay.reg_addr(), Service::Echo, Some("not the secret"));
    match wrong.register() {
        Err(AgentError::Refused(reason)) => assert!(
            reason.contains("secret refused"),
            "the reason must say the secret was refused: {reason:?}"
        ),
        other => panic!("expected AgentError::Refused, got {other:?}"),
    }
    wait_for_stats(&relay, "no app and nothing pending", |s| {
        s.apps == 0 && s.pending == 0
    });

    let good = start_echo_agent(relay.reg_addr(), Some(SECRET));
    assert_eq!(exchange(local(good.relayed_port()), b"ok"), b"ok");
}

/// An agent without a secret, facing a relay that challenges it, fails at
/// once saying the relay requires a secret (rather than timing out), and
/// the relay is left with nothing pending.
#[test]
fn no_secret_against_a_secret_relay_says_one_is_required() {
    let relay = start_secret_relay(|_| {});
    let mut agent = agent(relay.reg_addr(), Service::Echo, None);
    let started = Instant::now();
    match agent.register() {
        Err(AgentError::Refused(reason)) => assert!(
            reason.contains("requires a secret"),
            "the reason must say a secret is required: {reason:?}"
        ),
        other => panic!("expected AgentError::Refused, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "refused at once, not after a timeout ({:?})",
        started.elapsed()
    );
    drop(agent);
    wait_for_stats(&relay, "no app and nothing pending", |s| {
        s.apps == 0 && s.pending == 0
    });
}

/// A local service on 127.0.0.1:0 that echoes each connection on a thread.
fn local_echo_service() -> SocketAddr {
    let listener = TcpListener::bind((LOCALHOST, 0)).expect("bind the local service");
    let addr = listener.local_addr().expect("local service address");
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            thread::spawn(move || echo(with_timeouts(stream)));
        }
    });
    addr
}

/// `expose --secret wrong` exits non-zero within seconds, saying the secret
/// was refused, although reconnecting is on by default: a refusal is not
/// retried. Without any secret it fails the same way, saying one is needed.
#[test]
fn expose_with_a_wrong_or_missing_secret_exits_at_once() {
    let relay = start_secret_relay(|_| {});
    let (relay_arg, local_arg) = (
        relay.reg_addr().to_string(),
        local_echo_service().to_string(),
    );
    let cases = [
        (Some("wrong"), "secret refused"),
        (None, "requires a secret"),
    ];
    for (secret, message) in cases {
        let mut args = vec!["expose", "--relay", &relay_arg, "--local", &local_arg];
        args.extend(secret.map(|s| ["--secret", s]).into_iter().flatten());
        let mut expose = Process::tcp_relay(&args, &[]);
        let status = expose.exit_status(Duration::from_secs(5), "expose with a bad secret");
        assert!(!status.success(), "expose must fail: {status:?}");
        let log = expose.final_log();
        assert!(
            log.iter().any(|l| l.contains(message)),
            "stderr must say {message:?}: {log:?}"
        );
    }
    wait_for_stats(&relay, "no app and nothing pending", |s| {
        s.apps == 0 && s.pending == 0
    });
}

/// `expose` takes the secret from `TCP_RELAY_SECRET`: it registers, prints
/// its public address, and clients reach the local service through it.
#[test]
fn expose_takes_the_secret_from_the_environment() {
    let relay = start_secret_relay(|_| {});
    let (relay_arg, local_arg) = (
        relay.reg_addr().to_string(),
        local_echo_service().to_string(),
    );
    let mut expose = Process::tcp_relay(
        &["expose", "--relay", &relay_arg, "--local", &local_arg],
        &[(SECRET_ENV, SECRET)],
    );
    let public = expose.stdout_line("the public address");
    let port: u16 = public
        .strip_prefix("127.0.0.1:")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("stdout line {public:?} is not 127.0.0.1:<port>"));
    assert_eq!(
        exchange(local(port), b"via the env secret"),
        b"via the env secret"
    );
}

/// `serve` takes its secret from `TCP_RELAY_SECRET` too: an agent with that
/// secret is served, one with another secret is refused.
#[test]
fn serve_takes_the_secret_from_the_environment() {
    let (_relay, reg) = serve_process(&[], &[], &[(SECRET_ENV, SECRET)]);
    let mut wrong = agent(reg, Service::Echo, Some("guess"));
    assert!(
        matches!(wrong.register(), Err(AgentError::Refused(r)) if r.contains("secret refused")),
        "a wrong secret must be refused"
    );
    let good = start_echo_agent(reg, Some(SECRET));
    assert_eq!(exchange(local(good.relayed_port()), b"env"), b"env");
}

/// The secret never crosses the wire. A raw app sees a challenge of 32
/// fresh random bytes (different on every connection), answers with an
/// HMAC, and then only the established and dial lines: nothing the relay
/// sent contains the secret (raw, hex or in upper case), and neither does
/// the app's own answer.
#[test]
fn the_secret_never_crosses_the_wire() {
    let relay = start_secret_relay(|_| {});
    let mut app = RawApp::connect(relay.reg_addr());
    let nonce = app.challenge();
    let mut other = RawApp::connect(relay.reg_addr());
    assert_ne!(
        nonce,
        other.challenge(),
        "every connection gets a fresh nonce"
    );
    drop(other);

    app.send(auth_line_for(SECRET.as_bytes(), &nonce).as_bytes());
    let port = app.established();
    let client = connect(local(port));
    let (_dial_port, _token) = app.dial_line();
    set_reset_on_drop(&client);
    drop(client);

    let secret_forms = [
        SECRET.as_bytes().to_vec(),
        to_hex(SECRET.as_bytes()).into_bytes(),
        SECRET.to_uppercase().into_bytes(),
    ];
    for form in &secret_forms {
        let seen = |bytes: &[u8]| bytes.windows(form.len()).any(|w| w == &form[..]);
        assert!(!seen(&app.received), "the relay sent the secret");
        assert!(!seen(&app.sent), "the app sent the secret");
    }
    let received = String::from_utf8(app.received.clone()).expect("ASCII lines");
    assert_eq!(
        received.lines().count(),
        3,
        "challenge, established, dial: {received:?}"
    );
    assert_eq!(
        app.sent.len(),
        "auth \n".len() + 64,
        "the app sent only its answer"
    );
    assert_no_leftovers(&relay);
}

/// A recorded `auth` line is worthless on another connection: that one
/// gets a new nonce, so the replay is refused with `error secret refused`
/// and closed, while the original app stays registered.
#[test]
fn a_replayed_auth_line_is_refused() {
    let relay = start_secret_relay(|_| {});
    let (recorded, _port) = RawApp::register(relay.reg_addr(), SECRET);
    let answer = recorded.sent.clone();

    let mut replay = RawApp::connect(relay.reg_addr());
    let nonce = replay.challenge();
    assert_ne!(
        answer,
        auth_line_for(SECRET.as_bytes(), &nonce).into_bytes(),
        "a fresh nonce needs a fresh answer"
    );
    replay.send(&answer);
    assert_eq!(replay.refusal(), "secret refused");
    wait_for_stats(&relay, "only the original app, nothing pending", |s| {
        s.apps == 1 && s.pending == 0
    });
}

/// Anything but a well-formed `auth` line as the first answer is a wrong
/// answer: garbage, a truncated MAC, or a `port` request before proving
/// anything. Each is refused with `error secret refused`.
#[test]
fn a_malformed_answer_is_refused() {
    let relay = start_secret_relay(|_| {});
    for bad in [
        &b"hello\n"[..],
        b"auth zz\n",
        b"auth 0123\n",
        b"port 9999\n",
    ] {
        let mut app = RawApp::connect(relay.reg_addr());
        app.challenge();
        app.send(bad);
        let what = String::from_utf8_lossy(bad);
        assert_eq!(app.refusal(), "secret refused", "answer {what:?}");
    }
    wait_for_stats(&relay, "no app and nothing pending", |s| {
        s.apps == 0 && s.pending == 0
    });
}

/// An app that closes while challenged leaves nothing pending.
#[test]
fn an_app_leaving_mid_challenge_leaves_nothing_pending() {
    let relay = start_secret_relay(|_| {});
    let mut app = RawApp::connect(relay.reg_addr());
    app.challenge();
    wait_for_stats(&relay, "one pending", |s| s.pending == 1);
    app.stream.shutdown(Shutdown::Both).expect("shutdown");
    wait_for_stats(&relay, "nothing pending", |s| s.pending == 0 && s.apps == 0);
}
