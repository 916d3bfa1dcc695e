//! Several services in one agent (issue 13): each its own registration on
//! its own relayed port, on one reactor, and a fault in one service's local
//! side leaves the others served. Through the library and through the
//! `expose` command line (`--local` more than once, one address line per
//! registration).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;

use common::procs::ExposeProcess;
use common::*;
use tcp_relay::{Agent, AgentConfig, Registered, RunningAgent, Service, ServiceConfig};

/// A local TCP service on 127.0.0.1:0 serving each connection with
/// `serve` on a thread of its own, until stopped.
struct LocalService {
    addr: SocketAddr,
    stopping: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl LocalService {
    fn start(serve: fn(TcpStream)) -> LocalService {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a local service");
        let addr = listener.local_addr().expect("its address");
        let stopping = Arc::new(AtomicBool::new(false));
        let stop = stopping.clone();
        let thread = thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::Acquire) {
                    return; // the listener closes: connects are refused now
                }
                if let Ok(stream) = stream {
                    thread::spawn(move || serve(stream));
                }
            }
        });
        LocalService {
            addr,
            stopping,
            thread: Some(thread),
        }
    }

    /// Closes the listener: from now on connecting to it is refused.
    fn stop(&mut self) {
        self.stopping.store(true, Ordering::Release);
        let _ = TcpStream::connect(self.addr); // wakes the accept
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn echo(mut stream: TcpStream) {
    let mut buf = [0u8; 4096];
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 || stream.write_all(&buf[..n]).is_err() {
            return;
        }
    }
}

/// Answers one HTTP request with a fixed body.
fn http(stream: TcpStream) {
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
        if line == "\r\n" {
            let mut stream = reader.into_inner();
            let _ = stream.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\n\r\nhello");
            return;
        }
        line.clear();
    }
}

/// Speaks first (like SSH or SMTP), then echoes.
fn greeter(mut stream: TcpStream) {
    if stream.write_all(b"220 ready\r\n").is_ok() {
        echo(stream);
    }
}

fn named(name: &str, local: SocketAddr) -> ServiceConfig {
    ServiceConfig {
        name: name.into(),
        ..ServiceConfig::new(Service::Forward(local))
    }
}

fn start_agent(config: AgentConfig) -> RunningAgent {
    let mut agent = Agent::new(config).expect("create the agent");
    agent.register().expect("every service registers");
    agent.spawn().expect("spawn the agent")
}

fn port_of(registrations: &[Registered], service: &str) -> u16 {
    let found = registrations.iter().find(|r| r.service == service);
    found
        .unwrap_or_else(|| panic!("{service} not in {registrations:?}"))
        .port
}

fn http_get(addr: SocketAddr) -> String {
    let mut stream = connect(addr);
    stream
        .write_all(b"GET / HTTP/1.0\r\n\r\n")
        .expect("send the request");
    String::from_utf8_lossy(&read_to_eof(&mut stream)).into_owned()
}

fn greet_and_echo(addr: SocketAddr) {
    let mut stream = connect(addr);
    assert_eq!(read_exactly(&mut stream, 11), b"220 ready\r\n");
    stream.write_all(b"hi").expect("write");
    assert_eq!(read_exactly(&mut stream, 2), b"hi");
}

fn echo_round(stream: &mut TcpStream, data: &[u8]) {
    stream.write_all(data).expect("write");
    assert_eq!(read_exactly(stream, data.len()), data);
}

/// Echo, an HTTP responder and a server-first service, through one agent:
/// each on its own relayed port. When the HTTP service's local side goes
/// away its clients are reset, while an echo client connected before goes
/// on and new echo and greeter clients are served.
#[test]
fn one_agent_serves_three_services_and_a_failing_one_disturbs_none_other() {
    let relay = start_relay();
    let mut web = LocalService::start(http);
    let (echoer, greeting) = (LocalService::start(echo), LocalService::start(greeter));
    let agent = start_agent(AgentConfig {
        services: vec![
            named("echo", echoer.addr),
            named("web", web.addr),
            named("greet", greeting.addr),
        ],
        ..AgentConfig::new(relay.reg_addr().to_string(), Service::Echo)
    });
    let registrations = agent.registrations();
    assert_eq!(registrations.len(), 3, "{registrations:?}");
    let (echo_port, web_port, greet_port) = (
        port_of(&registrations, "echo"),
        port_of(&registrations, "web"),
        port_of(&registrations, "greet"),
    );
    wait_for_stats(&relay, "three apps", |s| s.apps == 3);

    let mut long_lived = connect(local(echo_port));
    echo_round(&mut long_lived, b"before");
    assert!(http_get(local(web_port)).ends_with("hello"));
    greet_and_echo(local(greet_port));

    web.stop();
    let mut broken = connect(local(web_port));
    let _ = broken.write_all(b"GET / HTTP/1.0\r\n\r\n"); // may meet the reset
    assert_closed_empty(&mut broken, "a client of the failed service");

    echo_round(&mut long_lived, b"during");
    for _ in 0..3 {
        let mut fresh = connect(local(echo_port));
        echo_round(&mut fresh, b"a new echo client");
        greet_and_echo(local(greet_port));
    }
    assert_eq!(
        agent.registrations().len(),
        3,
        "every registration stays up"
    );
    drop(long_lived);
    drop(agent);
}

/// Names must tell several services apart: none missing, none twice.
#[test]
fn several_services_need_names_of_their_own() {
    let relay = start_relay();
    let addr = local(1);
    for (services, why) in [
        (vec![named("a", addr), named("", addr)], "each needs a name"),
        (vec![named("a", addr), named("a", addr)], "named \"a\""),
        (vec![], "no service"),
    ] {
        let config = AgentConfig {
            services,
            ..AgentConfig::new(relay.reg_addr().to_string(), Service::Echo)
        };
        let Err(e) = Agent::new(config) else {
            panic!("an agent with a bad service list");
        };
        assert!(e.to_string().contains(why), "{e}");
    }
}

/// With several `--local`s, one line per registration: the service's
/// name, a space, the public address; `@PORT` asks for that port.
#[test]
fn expose_prints_one_named_line_per_registration() {
    let relay = start_relay();
    let (echoer, web) = (LocalService::start(echo), LocalService::start(http));
    let wanted = common::daemons::free_port();
    let relay_arg = relay.reg_addr().to_string();
    let echo_arg = format!("echo={}", echoer.addr);
    let web_arg = format!("web={}@{wanted}", web.addr);
    let args = [
        "--relay", &relay_arg, "--local", &echo_arg, "--local", &web_arg,
    ];
    let expose = ExposeProcess::start(&args);
    let mut lines = [expose.line(), expose.line()];
    lines.sort();
    let (echo_line, web_line) = (&lines[0], &lines[1]);
    assert_eq!(web_line, &format!("web 127.0.0.1:{wanted}"));
    let echo_addr = echo_line.strip_prefix("echo ").expect("a line for echo");
    let echo_addr: SocketAddr = echo_addr.parse().expect("an address");
    assert_eq!(exchange(echo_addr, b"through expose"), b"through expose");
    assert!(http_get(local(wanted)).ends_with("hello"));
}

/// One round trip on a fresh connection.
fn exchange(addr: SocketAddr, data: &[u8]) -> Vec<u8> {
    let mut stream = connect(addr);
    stream.write_all(data).expect("write");
    read_exactly(&mut stream, data.len())
}

/// `--port` is for one service: with several, each says its port with
/// `@PORT`. Two services of one name are refused too, before anything
/// connects, whether named or named after the same local address, and by
/// `--print-config` as well (what it prints must run).
#[test]
fn expose_refuses_ambiguous_services() {
    for (args, why) in [
        (
            vec![
                "--local",
                "a=127.0.0.1:1",
                "--local",
                "b=127.0.0.1:2",
                "--port",
                "9000",
            ],
            "--port is for one service",
        ),
        (
            vec!["--local", "a=127.0.0.1:1", "--local", "a=127.0.0.1:2"],
            "two services are named \"a\"",
        ),
        (
            vec!["--local", "127.0.0.1:1", "--local", "127.0.0.1:1@9000"],
            "two services are named \"127.0.0.1:1\"",
        ),
        (
            vec![
                "--print-config",
                "--local",
                "127.0.0.1:1",
                "--local",
                "127.0.0.1:1@9000",
            ],
            "two services are named \"127.0.0.1:1\"",
        ),
        (vec!["--local", "a b=127.0.0.1:1"], "bad service name"),
        (vec![], "nothing to expose"),
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_tcp-relay"))
            .arg("expose")
            .args(["--relay", "127.0.0.1:1"])
            .args(&args)
            .output()
            .expect("run expose");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?} must fail");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
    }
}
