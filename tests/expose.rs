//! End-to-end tests of the app side: `tcp-relay expose` (the [`Agent`]
//! forwarding to a local service), the `port` extension, reconnecting, and
//! the blocking [`RelayedApp`] API with its example.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread;

use common::*;
use tcp_relay::{
    Agent, AgentConfig, AgentError, Config, Relay, RelayedApp, RunningAgent, Service, ServiceConfig,
};

/// A local TCP service on 127.0.0.1:0, a thread per connection, serving
/// each with `service`. Its threads end with the test binary.
fn local_service(service: fn(TcpStream)) -> SocketAddr {
    let listener = TcpListener::bind((LOCALHOST, 0)).expect("bind the local service");
    let addr = listener.local_addr().expect("local service address");
    thread::spawn(move || serve_on(listener, service));
    addr
}

fn serve_on(listener: TcpListener, service: fn(TcpStream)) {
    for stream in listener.incoming().flatten() {
        let stream = with_timeouts(stream);
        thread::spawn(move || service(stream));
    }
}

/// A port on 127.0.0.1 that nothing listens on right now.
fn free_port() -> u16 {
    let listener = TcpListener::bind((LOCALHOST, 0)).expect("bind a probe listener");
    listener.local_addr().expect("probe address").port()
}

/// An HTTP/1.0-style responder: reads the request head, answers with the
/// request line echoed in the body, then ends the stream.
fn http_responder(mut stream: TcpStream) {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let first = String::from_utf8_lossy(&head)
        .lines()
        .next()
        .unwrap_or("")
        .to_owned();
    let body = format!("you asked for {first}\n");
    let response = format!(
        "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes());
    let _ = stream.shutdown(Shutdown::Write);
}

fn agent_config(relay: SocketAddr, local: SocketAddr) -> AgentConfig {
    AgentConfig {
        splice: false,
        reconnect: true,
        ..AgentConfig::new(relay.to_string(), Service::Forward(local))
    }
}

/// `config` with its one service changed by `tweak`.
fn with_service(mut config: AgentConfig, tweak: impl FnOnce(&mut ServiceConfig)) -> AgentConfig {
    tweak(&mut config.services[0]);
    config
}

/// Registers an agent and runs it on its own thread.
fn start_agent(config: AgentConfig) -> RunningAgent {
    let mut agent = Agent::new(config).expect("create the agent");
    agent.register().expect("register the agent");
    agent.spawn().expect("spawn the agent")
}

/// The `tcp-relay` binary with `args`, stdout piped, stderr captured.
fn cli(args: &[&str]) -> Child {
    Command::new(env!("CARGO_BIN_EXE_tcp-relay"))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start tcp-relay")
}

/// Lines of a child's stdout, delivered on a channel (so reading has a
/// deadline).
fn stdout_lines(stdout: ChildStdout) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn next_line(lines: &Receiver<String>, what: &str) -> String {
    lines
        .recv_timeout(WAIT)
        .unwrap_or_else(|e| panic!("no {what} on stdout within {WAIT:?}: {e}"))
}

/// Kills the child if a test fails before it ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `expose` prints exactly `<relay-host>:<port>` on stdout, and an HTTP
/// request through that address reaches the local server and gets its reply.
#[test]
fn expose_cli_prints_the_public_address_and_serves_http() {
    let relay = start_relay();
    let service = local_service(http_responder);
    let relay_arg = relay.reg_addr().to_string();
    let local_arg = service.to_string();
    let mut child = Reaped(cli(&[
        "expose", "--relay", &relay_arg, "--local", &local_arg, "-q",
    ]));
    let lines = stdout_lines(child.0.stdout.take().expect("piped stdout"));
    let public = next_line(&lines, "public address");
    let port: u16 = public
        .strip_prefix("127.0.0.1:")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("stdout line {public:?} is not 127.0.0.1:<port>"));
    let reply = exchange(local(port), b"GET /hello HTTP/1.0\r\nHost: x\r\n\r\n");
    let text = String::from_utf8(reply).expect("utf-8 reply");
    assert!(text.starts_with("HTTP/1.0 200 OK\r\n"), "reply: {text:?}");
    assert!(
        text.ends_with("you asked for GET /hello HTTP/1.0\n"),
        "reply: {text:?}"
    );
    assert_no_leftovers(&relay);
}

/// One agent carries 100 concurrent clients, each byte-exact.
#[test]
fn a_hundred_concurrent_clients_through_one_agent() {
    let relay = start_relay();
    let service = local_service(echo);
    let agent = start_agent(agent_config(relay.reg_addr(), service));
    let public = local(agent.relayed_port());
    let clients: Vec<_> = (0..100u64)
        .map(|i| {
            thread::spawn(move || {
                let request = Pattern::new(i).bytes(0, 20_000 + i as usize * 97);
                let reply = exchange(public, &request);
                assert!(reply == request, "client {i}: reply differs from request");
            })
        })
        .collect();
    for client in clients {
        client.join().expect("a client thread panicked");
    }
    assert_no_leftovers(&relay);
}

/// Half-close through the tunnel: the client ends its request and still
/// gets the whole (large) reply, which the local service sends only after
/// it saw the request's end.
#[test]
fn half_close_carries_through_the_tunnel() {
    fn reply_after_eof(mut stream: TcpStream) {
        let mut request = Vec::new();
        stream.read_to_end(&mut request).expect("read the request");
        let reply = Pattern::new(request.len() as u64).bytes(0, 3 * 1024 * 1024);
        stream.write_all(&reply).expect("send the reply");
        stream.shutdown(Shutdown::Write).expect("end the reply");
    }
    let relay = start_relay();
    let agent = start_agent(agent_config(
        relay.reg_addr(),
        local_service(reply_after_eof),
    ));
    let reply = exchange(local(agent.relayed_port()), b"twelve bytes");
    assert!(
        reply == Pattern::new(12).bytes(0, 3 * 1024 * 1024),
        "reply differs"
    );
    assert_no_leftovers(&relay);
}

/// While the local service is down its clients are closed without a byte;
/// the agent keeps running, and serves again once the service is back.
#[test]
fn local_service_down_then_up_again() {
    let relay = start_relay();
    let port = free_port();
    let agent = start_agent(agent_config(relay.reg_addr(), local(port)));
    let public = local(agent.relayed_port());
    for _ in 0..3 {
        assert_turned_away(try_connect(public), "a client of a dead service");
    }
    assert!(!agent.is_finished(), "the agent keeps running");
    let listener = TcpListener::bind((LOCALHOST, port)).expect("bring the local service up");
    thread::spawn(move || serve_on(listener, echo));
    assert_eq!(exchange(public, b"back again"), b"back again");
    assert_no_leftovers(&relay);
}

/// The same with a secret, and a relay whose dial-in timeout no test
/// outlives: the agent still dials in for each client, presents its token
/// and then resets the dial-in, so the relay resets that client at once
/// (a dial-in dropped before its token would leave the client waiting for
/// the timeout).
#[test]
fn local_service_down_with_a_secret_resets_clients_at_once() {
    let secret = || tcp_relay::Secret(b"down service".to_vec());
    let relay = start_relay_with(|c| {
        c.secret = Some(secret());
        c.dial_in_timeout = std::time::Duration::from_secs(3600);
    });
    let agent = start_agent(AgentConfig {
        secret: Some(secret()),
        ..agent_config(relay.reg_addr(), local(free_port()))
    });
    let public = local(agent.relayed_port());
    for _ in 0..3 {
        assert_turned_away(try_connect(public), "a client of a dead service");
    }
    assert!(!agent.is_finished(), "the agent keeps running");
    assert_no_leftovers(&relay);
}

/// A relay restarted on the same port under a running agent: the agent
/// re-registers by itself and serves again.
#[test]
fn agent_re_registers_after_a_relay_restart() {
    let first = start_relay();
    let reg = first.reg_addr();
    let agent = start_agent(agent_config(reg, local_service(echo)));
    assert_eq!(exchange(local(agent.relayed_port()), b"before"), b"before");
    drop(first);
    let config = Config {
        bind: LOCALHOST,
        reg_port: reg.port(),
        ..Config::default()
    };
    let second = Relay::bind(config)
        .expect("restart the relay on its port")
        .spawn()
        .expect("spawn");
    wait_for_stats(&second, "the agent to re-register", |s| s.apps == 1);
    wait_until("the agent to learn its new port", || {
        agent.relayed_port() != 0
    });
    assert_eq!(exchange(local(agent.relayed_port()), b"after"), b"after");
    assert_no_leftovers(&second);
}

/// `--no-reconnect`: when the relay goes away, `expose` exits non-zero and
/// says why.
#[test]
fn no_reconnect_exits_non_zero_when_the_relay_goes() {
    let relay = start_relay();
    let relay_arg = relay.reg_addr().to_string();
    let local_arg = local_service(echo).to_string();
    let args = [
        "expose",
        "--relay",
        &relay_arg,
        "--local",
        &local_arg,
        "--no-reconnect",
    ];
    let mut child = Reaped(cli(&args));
    let lines = stdout_lines(child.0.stdout.take().expect("piped stdout"));
    next_line(&lines, "public address");
    drop(relay);
    let status = child.0.wait().expect("wait for expose");
    assert!(
        !status.success(),
        "expose must fail when the relay goes: {status}"
    );
    let mut stderr = String::new();
    let _ = child
        .0
        .stderr
        .take()
        .expect("piped stderr")
        .read_to_string(&mut stderr);
    assert!(
        stderr.contains("relay closed the control connection"),
        "stderr: {stderr}"
    );
}

/// SIGTERM makes `expose` exit cleanly (status 0).
#[test]
fn sigterm_stops_expose_cleanly() {
    let relay = start_relay();
    let relay_arg = relay.reg_addr().to_string();
    let local_arg = local_service(echo).to_string();
    let mut child = Reaped(cli(&[
        "expose", "--relay", &relay_arg, "--local", &local_arg,
    ]));
    let lines = stdout_lines(child.0.stdout.take().expect("piped stdout"));
    next_line(&lines, "public address");
    let pid = child.0.id().to_string();
    let kill = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(kill.success());
    let status = child.0.wait().expect("wait for expose");
    assert!(
        status.success(),
        "SIGTERM must end expose with status 0: {status}"
    );
    wait_for_stats(&relay, "the agent's registration to end", |s| s.apps == 0);
}

/// `--port N`: granted when free (the old relayed port is given up), and
/// refused with the relay's reason when taken, by the library and the CLI.
#[test]
fn requested_port_is_granted_or_refused() {
    let relay = start_relay();
    let local_addr = local_service(echo);
    let wanted = free_port();
    let agent = start_agent(with_service(
        agent_config(relay.reg_addr(), local_addr),
        |s| s.port = Some(wanted),
    ));
    assert_eq!(agent.relayed_port(), wanted);
    assert_eq!(exchange(local(wanted), b"on my port"), b"on my port");
    wait_for_stats(&relay, "one app", |s| s.apps == 1);

    let mut second = Agent::new(with_service(
        agent_config(relay.reg_addr(), local_addr),
        |s| s.port = Some(wanted),
    ))
    .expect("create the second agent");
    match second.register() {
        Err(AgentError::Refused(reason)) => {
            assert!(
                reason.contains(&format!("port {wanted} is taken")),
                "reason: {reason}"
            );
        }
        other => panic!(
            "a taken port must be refused, got {:?}",
            other.map_err(|e| e.to_string())
        ),
    }

    let relay_arg = relay.reg_addr().to_string();
    let local_arg = local_addr.to_string();
    let port_arg = wanted.to_string();
    let args = [
        "expose", "--relay", &relay_arg, "--local", &local_arg, "--port", &port_arg,
    ];
    let output = Command::new(env!("CARGO_BIN_EXE_tcp-relay"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run expose");
    assert!(
        !output.status.success(),
        "a refused --port must exit non-zero"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("port {wanted} is taken")),
        "stderr: {stderr}"
    );
    assert!(
        output.stdout.is_empty(),
        "no address line for a refused port"
    );
    wait_for_stats(&relay, "refused apps to be closed", |s| s.apps == 1);
    assert_eq!(exchange(local(wanted), b"still mine"), b"still mine");
}

/// An app of the original protocol never sends a line; one that does
/// `port` gets the extension, one that does not gets exactly the original
/// established line and nothing more.
#[test]
fn an_app_that_does_not_ask_gets_the_original_protocol() {
    let relay = start_relay();
    let app = TestApp::register(relay.reg_addr());
    assert!(app.relayed_port > relay.reg_addr().port());
    app.assert_no_dial_line();
    let _client = connect(app.relayed_addr());
    let _dial_in = app.dial_in();
}

/// The blocking library API: streams taken from `incoming()` are ordinary
/// `TcpStream`s piped to the relay's clients.
#[test]
fn relayed_app_yields_plain_tcp_streams() {
    let relay = start_relay();
    let app = RelayedApp::register(relay.reg_addr()).expect("register");
    let public = app.public_addr();
    assert_eq!(public.ip(), LOCALHOST);
    let server = thread::spawn(move || {
        for stream in app.incoming().take(5) {
            let stream = with_timeouts(stream.expect("a client's stream"));
            thread::spawn(move || echo_upper(stream));
        }
    });
    for i in 0..5 {
        let message = format!("client {i} says hi");
        assert_eq!(
            exchange(public, message.as_bytes()),
            message.to_uppercase().as_bytes()
        );
    }
    server.join().expect("the serving thread panicked");
    assert_no_leftovers(&relay);
}

/// `RelayedApp::register_on_port` gets the port asked for, and a taken port
/// is refused with the relay's reason.
#[test]
fn relayed_app_on_a_requested_port() {
    let relay = start_relay();
    let wanted = free_port();
    let app = RelayedApp::register_on_port(relay.reg_addr(), wanted).expect("register");
    assert_eq!(app.relayed_port(), wanted);
    let err = match RelayedApp::register_on_port(relay.reg_addr(), wanted) {
        Ok(_) => panic!("a taken port must be refused"),
        Err(e) => e,
    };
    assert!(err.to_string().contains("is taken"), "error: {err}");
}

/// The `http_hello` example (built by `cargo test`) serves a request through
/// a relay and exits after the number of requests it was given.
#[test]
fn http_hello_example_runs_through_a_relay() {
    let relay = start_relay();
    let exe = std::env::current_exe().expect("test binary path");
    let example = exe
        .parent()
        .and_then(|deps| deps.parent())
        .map(|dir| dir.join("examples").join("http_hello"))
        .expect("target directory");
    let relay_arg = relay.reg_addr().to_string();
    let mut child = Reaped(
        Command::new(&example)
            .args([relay_arg.as_str(), "1"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "start {}: {e} (plain `cargo test` builds the examples; \
                     a filtered run needs `cargo build --examples` first)",
                    example.display()
                )
            }),
    );
    let lines = stdout_lines(child.0.stdout.take().expect("piped stdout"));
    let url = next_line(&lines, "the example's URL");
    let addr: SocketAddr = url
        .strip_prefix("http://")
        .and_then(|rest| rest.strip_suffix('/'))
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("bad URL line {url:?}"));
    let reply = exchange(addr, b"GET / HTTP/1.1\r\nHost: relay\r\n\r\n");
    let text = String::from_utf8(reply).expect("utf-8 reply");
    assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "reply: {text:?}");
    assert!(
        text.ends_with("hello from behind the relay\n"),
        "reply: {text:?}"
    );
    let status = child.0.wait().expect("wait for the example");
    assert!(
        status.success(),
        "the example must exit 0 after its one request"
    );
}

/// `--ready N`: the relay keeps N dial-ins of the agent ready; clients are
/// served from them (each replaced after use), byte-exact.
#[test]
fn ready_dial_ins_serve_clients_and_are_replaced() {
    let relay = start_relay();
    let agent = start_agent(with_service(
        agent_config(relay.reg_addr(), local_service(echo)),
        |s| s.ready = 4,
    ));
    wait_for_stats(&relay, "four ready dial-ins", |s| s.ready_dial_ins == 4);
    let public = local(agent.relayed_port());
    // Small and large: a large stream fills the socket buffers, so the
    // ready dial-in must deliver writable edges to the pipe it joins.
    for i in 0..10u64 {
        let size = if i % 3 == 0 { 8 << 20 } else { 10_000 };
        let request = Pattern::new(i).bytes(0, size);
        assert!(exchange(public, &request) == request, "client {i}");
    }
    wait_for_stats(&relay, "the ready dial-ins replaced", |s| {
        s.ready_dial_ins == 4
    });
    assert_no_leftovers(&relay);
}

/// A ready dial-in that dies is noticed (the relay asks for a new one) and
/// never handed a client: the next client gets a live dial-in.
#[test]
fn a_dead_ready_dial_in_is_replaced_not_handed_out() {
    let relay = start_relay();
    let app = TestApp::register(relay.reg_addr());
    app.send_control(b"ready 2\n")
        .expect("ask for two ready dial-ins");
    let first = app.dial_in();
    let second = app.dial_in();
    wait_for_stats(&relay, "two ready dial-ins", |s| s.ready_dial_ins == 2);
    set_reset_on_drop(&first);
    drop(first);
    let replacement = app.dial_in();
    wait_for_stats(&relay, "the dead one replaced", |s| s.ready_dial_ins == 2);
    let mut clients = Vec::new();
    for (i, mut dial_in) in [second, replacement].into_iter().enumerate() {
        let mut client = connect(app.relayed_addr());
        let message = format!("client {i}");
        client.write_all(message.as_bytes()).expect("client writes");
        assert_eq!(
            read_exactly(&mut dial_in, message.len()),
            message.as_bytes()
        );
        dial_in.write_all(b"ok").expect("app answers");
        assert_eq!(read_exactly(&mut client, 2), b"ok");
        clients.push((client, dial_in));
    }
    drop(clients);
    assert_no_leftovers(&relay);
}

/// The splice path end to end: relay and agent both splice; 8 concurrent
/// clients each send 4 MiB and get them back, byte-exact, with half-close.
#[test]
fn spliced_tunnel_is_byte_exact() {
    let relay = start_relay_with(|config| config.splice = true);
    let agent = start_agent(AgentConfig {
        splice: true,
        ..agent_config(relay.reg_addr(), local_service(echo))
    });
    let public = local(agent.relayed_port());
    let clients: Vec<_> = (0..8u64)
        .map(|i| {
            thread::spawn(move || {
                let request = Pattern::new(100 + i).bytes(0, 4 << 20);
                assert!(exchange(public, &request) == request, "client {i}");
            })
        })
        .collect();
    for client in clients {
        client.join().expect("a client thread panicked");
    }
    assert_no_leftovers(&relay);
}

/// A server-first service (it speaks before the client does) behind ready
/// dial-ins: its greeting, sent while the dial-in waits ready on both
/// sides, reaches each client without the client sending a byte.
#[test]
fn a_server_first_greeting_reaches_clients_of_ready_dial_ins() {
    greeting_through_ready_dial_ins(None);
}

/// The same with a secret: each ready dial-in first presents its token
/// (read exactly, then the socket moves to its Standby entry), and the
/// greeting right behind the token must not be lost in that move.
#[test]
fn a_server_first_greeting_reaches_clients_of_ready_dial_ins_with_a_secret() {
    greeting_through_ready_dial_ins(Some("greeting secret"));
}

fn greeting_through_ready_dial_ins(secret: Option<&str>) {
    fn greeter(mut stream: TcpStream) {
        let _ = stream.write_all(b"220 hello\r\n");
        let _ = stream.shutdown(Shutdown::Write);
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
    }
    let as_secret = |s: &str| tcp_relay::Secret(s.as_bytes().to_vec());
    let relay = start_relay_with(|config| config.secret = secret.map(as_secret));
    let agent = start_agent(with_service(
        AgentConfig {
            secret: secret.map(as_secret),
            ..agent_config(relay.reg_addr(), local_service(greeter))
        },
        |s| s.ready = 2,
    ));
    wait_for_stats(&relay, "two ready dial-ins", |s| s.ready_dial_ins == 2);
    let public = local(agent.relayed_port());
    for i in 0..6 {
        let mut client = connect(public);
        assert_eq!(read_to_eof(&mut client), b"220 hello\r\n", "client {i}");
    }
    wait_for_stats(&relay, "the ready dial-ins replaced", |s| {
        s.ready_dial_ins == 2
    });
    assert_no_leftovers(&relay);
}

/// Clients that send their request and their FIN at once, before the relay
/// has even accepted them, handed ready dial-ins: the bytes and the FIN
/// both arrive (the first read after registering is a short one, and the
/// FIN behind it must not be lost).
#[test]
fn request_and_fin_sent_before_accept_both_reach_a_ready_dial_in() {
    let relay = start_relay();
    let app = TestApp::register(relay.reg_addr());
    app.send_control(b"ready 1\n")
        .expect("ask for a ready dial-in");
    let mut dial_in = app.dial_in();
    for i in 0..20 {
        wait_for_stats(&relay, "a ready dial-in", |s| s.ready_dial_ins == 1);
        let mut client = connect(app.relayed_addr());
        let request = format!("request {i}");
        client.write_all(request.as_bytes()).expect("client writes");
        client.shutdown(Shutdown::Write).expect("client shuts down");
        let next = app.dial_in(); // the replacement the relay asks for
        assert_eq!(read_to_eof(&mut dial_in), request.as_bytes(), "client {i}");
        dial_in.write_all(b"done").expect("app answers");
        drop(dial_in);
        assert_eq!(read_to_eof(&mut client), b"done", "client {i}");
        dial_in = next;
    }
    assert_no_leftovers(&relay);
}

/// A local service whose host never answers the SYN: the client is reset
/// once the agent's connect timeout passes, instead of hanging for the
/// kernel's two minutes of SYN retries, and nothing is left behind.
#[test]
fn a_local_service_that_never_answers_resets_the_client_after_the_connect_timeout() {
    use socket2::{Domain, Socket, Type};
    // A listener with a backlog of 0 whose one slot is taken: Linux drops
    // every further SYN, as a firewall that drops packets would.
    let silent = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    silent
        .bind(&SocketAddr::from((LOCALHOST, 0)).into())
        .expect("bind the silent service");
    silent.listen(0).expect("listen");
    let silent_addr = silent
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .expect("silent service address");
    let _filler = connect(silent_addr);

    let relay = start_relay();
    let agent = start_agent(AgentConfig {
        connect_timeout: std::time::Duration::from_millis(300),
        ..agent_config(relay.reg_addr(), silent_addr)
    });
    let mut client = connect(local(agent.relayed_port()));
    client.write_all(b"anyone there?").expect("client writes");
    let (ended, bytes) = read_until_closed(&mut client);
    assert_eq!(bytes, 0, "nothing can have answered");
    assert_eq!(ended, Ended::Error(std::io::ErrorKind::ConnectionReset));
    assert_no_leftovers(&relay);
}

/// `RelayedApp`'s registration has one deadline, not one per read: a
/// "relay" that trickles its established line a byte at a time, each byte
/// well inside the timeout, still fails the registration with `TimedOut`.
#[test]
fn relayed_app_registration_times_out_on_a_trickling_relay() {
    use std::time::Duration;
    use tcp_relay::RegisterOptions;
    let listener = TcpListener::bind((LOCALHOST, 0)).expect("bind the fake relay");
    let addr = listener.local_addr().expect("fake relay address");
    let trickler = thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept the app");
        for byte in format!("{ESTABLISHED_PREFIX}40000\n").bytes() {
            if stream.write_all(&[byte]).is_err() {
                return; // the app gave up: what this test wants
            }
            thread::sleep(Duration::from_millis(40)); // the trickle itself
        }
    });
    let options = RegisterOptions {
        timeout: Some(Duration::from_millis(300)),
        ..RegisterOptions::default()
    };
    match RelayedApp::register_with(addr, &options) {
        Ok(app) => panic!(
            "registered on port {} past the deadline",
            app.relayed_port()
        ),
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}"),
    }
    join_unless_panicking(trickler, "the fake relay");
}

/// An app whose ready dial-ins die as soon as they arrive (an agent whose
/// local service is down resets each one) does not make the relay ask for
/// replacements in a tight loop: after the second death in a row they come
/// with a growing back-off, so one second sees a handful of dial lines, not
/// thousands. Once the dial-ins live again, the ready pool refills and
/// serves clients.
#[test]
fn ready_dial_ins_that_die_young_are_replaced_with_back_off() {
    use std::time::{Duration, Instant};
    let relay = start_relay();
    let app = TestApp::register(relay.reg_addr());
    app.send_control(b"ready 2\n")
        .expect("ask for two ready dial-ins");
    let window = Instant::now() + Duration::from_secs(1);
    let mut dial_lines = 0;
    while let Some(left) = window.checked_duration_since(Instant::now()) {
        let Ok(port) = app.poll_dial_port(left) else {
            break; // no dial line in what was left of the window
        };
        dial_lines += 1;
        let dial_in = connect(local(port));
        set_reset_on_drop(&dial_in);
        drop(dial_in); // dies young, as behind a local service that is down
    }
    assert!(
        (2..=30).contains(&dial_lines),
        "{dial_lines} dial lines in one second of dying dial-ins"
    );

    // The service is back: dial-ins now live, and the pool refills.
    let mut ready = Vec::new();
    while ready.len() < 2 {
        ready.push(app.dial_in());
    }
    wait_for_stats(&relay, "two ready dial-ins again", |s| {
        s.ready_dial_ins == 2
    });
    let mut client = connect(app.relayed_addr());
    client.write_all(b"back").expect("client writes");
    // The relay hands out its oldest ready dial-in: the first made.
    assert_eq!(read_exactly(&mut ready[0], 4), b"back");
}

/// Ready dial-ins the relay asked for that never come (the app could not
/// dial: out of descriptors, a connect that timed out) are given up after
/// the dial-in timeout and asked for again, so the ready pool does not stay
/// short for the rest of the app's registration.
#[test]
fn asked_ready_dial_ins_that_never_come_are_asked_again() {
    let relay = start_relay_with(|c| c.dial_in_timeout = std::time::Duration::from_millis(200));
    let app = TestApp::register(relay.reg_addr());
    app.send_control(b"ready 2\n")
        .expect("ask for two ready dial-ins");
    // Two dial lines, ignored; then the relay must ask again, twice
    // (`next_dial_port` fails the test if no line comes within 10 s).
    for _ in 0..4 {
        app.next_dial_port();
    }
    // Answering now fills the pool.
    let _ready = [app.dial_in(), app.dial_in()];
    wait_for_stats(&relay, "two ready dial-ins", |s| s.ready_dial_ins == 2);
    assert_no_leftovers(&relay);
}
