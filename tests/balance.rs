//! Several relays behind a balancer (issue 13): one `expose` registers its
//! service with two relays, on the same relayed port (the relays bind
//! 127.0.0.1 and 127.0.0.2), and HAProxy spreads clients over both with
//! health checks on the relayed port and `send-proxy-v2`. Killing a relay
//! leaves the service reachable through the other; restarting it, the
//! agent registers again on the same port and HAProxy brings it back.
//!
//! The relays and the agent are the real binary, HAProxy the Debian one,
//! all on ports the OS picked, with a configuration the test writes. Without
//! HAProxy the test says SKIPPED (and fails under CI, which installs it).

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::thread;
use std::time::{Duration, Instant};

use common::daemons::{Daemon, TempDir, free_port};
use common::procs::{ExposeProcess, RelayProcess};
use common::tools::tool;
use common::*;

/// Longest a relay, a registration or a fail-over may take; the agent's
/// reconnect back-off alone may wait several seconds.
const PATIENCE: Duration = Duration::from_secs(60);

/// A relay on `bind`, registration port `reg`, trusting PROXY headers
/// from loopback (HAProxy), any relayed port allowed.
fn start_relay_process(bind: IpAddr, reg: u16, metrics: u16) -> RelayProcess {
    RelayProcess::start(&relay_args(bind, reg), local(metrics))
}

/// A first relay on `bind` on ports picked free, and those ports: picked
/// again if one was taken before the relay could bind it (tests run in
/// parallel). Its registration port, then its status port.
fn start_relay_on_free_ports(bind: IpAddr) -> (RelayProcess, u16, u16) {
    for _ in 0..5 {
        let (reg, metrics) = (free_port(), free_port());
        if let Some(relay) = RelayProcess::try_start(&relay_args(bind, reg), local(metrics)) {
            return (relay, reg, metrics);
        }
    }
    panic!("no relay started on {bind} in five tries: its ports taken each time");
}

/// The flags of a relay on `bind` with registration port `reg`.
fn relay_args(bind: IpAddr, reg: u16) -> Vec<String> {
    let (bind, reg) = (bind.to_string(), reg.to_string());
    let args = [
        "--bind",
        &bind,
        "--reg-port",
        &reg,
        "--port-range",
        "1024-65535",
        "--accept-proxy-from",
        "127.0.0.0/8",
    ];
    args.map(String::from).to_vec()
}

/// Bytes a relay has carried from clients to the app.
fn bytes_to_app(relay: &RelayProcess) -> f64 {
    relay.metric("tcp_relay_bytes_total{direction=\"to_app\"}")
}

/// A local echo service, a thread per connection.
fn echo_service() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind the service");
    let addr = listener.local_addr().expect("its address");
    thread::spawn(move || {
        for mut stream in listener.incoming().map_while(Result::ok) {
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// HAProxy on `front` balancing over the two relays' relayed port `port`,
/// checking each every 200 ms (one failed check takes a relay out, one
/// good check brings it back) and naming clients with PROXY v2.
fn haproxy(dir: &TempDir, front: u16, port: u16) -> Option<Daemon> {
    let program = tool("haproxy", "apt-get install haproxy")?;
    let config = haproxy_config(
        front,
        &[local(port), SocketAddr::from(([127, 0, 0, 2], port))],
    );
    let path = dir.write("haproxy.cfg", &config);
    let args = ["-db", "-f", &path.display().to_string()];
    Some(Daemon::start("haproxy", &program, &args, dir, front))
}

/// The configuration the README shows, with a test's ports and a fast
/// check interval.
fn haproxy_config(front: u16, relays: &[SocketAddr]) -> String {
    let mut config = format!(
        "defaults\n  mode tcp\n  timeout connect 1s\n  timeout client 30s\n  timeout server 30s\n\
         \x20 retries 3\n  option redispatch\n\
         frontend public\n  bind 127.0.0.1:{front}\n  default_backend relays\n\
         backend relays\n  balance roundrobin\n\
         \x20 default-server check inter 200ms fall 1 rise 1 send-proxy-v2\n"
    );
    for (i, relay) in relays.iter().enumerate() {
        config += &format!("  server relay{i} {relay}\n");
    }
    config
}

/// One client through HAProxy: `data` echoed back whole.
fn served(front: SocketAddr, data: &[u8]) -> bool {
    let Ok(mut stream) = try_connect(front) else {
        return false;
    };
    let mut got = vec![0; data.len()];
    stream.write_all(data).is_ok() && stream.read_exact(&mut got).is_ok() && got == data
}

/// Runs clients until `count` in a row are served (failures reset the
/// count), within `PATIENCE`.
fn until_served_in_a_row(front: SocketAddr, count: usize, what: &str) {
    let deadline = Instant::now() + PATIENCE;
    let mut in_a_row = 0;
    while in_a_row < count {
        assert!(
            Instant::now() < deadline,
            "{what}: never {count} clients in a row"
        );
        in_a_row = if served(front, b"through the balancer") {
            in_a_row + 1
        } else {
            0
        };
    }
}

#[test]
fn two_relays_behind_haproxy_fail_over_and_come_back() {
    let dir = TempDir::new("balance");
    let (front, port) = (free_port(), free_port());
    let other = IpAddr::from([127, 0, 0, 2]);
    let (relay_a, reg_a, metrics_a) = start_relay_on_free_ports(LOCALHOST);
    let (relay_b, reg_b, _) = start_relay_on_free_ports(other);
    let service = echo_service();
    let (a, b, local_arg) = (
        format!("127.0.0.1:{reg_a}"),
        format!("127.0.0.2:{reg_b}"),
        format!("echo={service}@{port}"),
    );
    let expose = ExposeProcess::start(&["--relay", &a, "--relay", &b, "--local", &local_arg]);
    let mut lines = [expose.line_within(PATIENCE), expose.line_within(PATIENCE)];
    lines.sort();
    assert_eq!(
        lines,
        [format!("127.0.0.1:{port}"), format!("127.0.0.2:{port}")]
    );
    let Some(_haproxy) = haproxy(&dir, front, port) else {
        return;
    };
    let front = local(front);

    // Both relays serve clients through HAProxy.
    wait_until("clients through both relays", || {
        assert!(served(front, b"spread"), "a client through HAProxy");
        bytes_to_app(&relay_a) > 0.0 && bytes_to_app(&relay_b) > 0.0
    });

    // Relay A dies: every client is served through B once HAProxy saw it.
    relay_a.kill();
    let before = bytes_to_app(&relay_b);
    until_served_in_a_row(front, 20, "after relay A died");
    assert!(bytes_to_app(&relay_b) > before, "B carried them");

    // A comes back: the agent registers again on the same port, and
    // HAProxy sends clients to it again.
    let relay_a = start_relay_process(LOCALHOST, reg_a, metrics_a);
    assert_eq!(
        expose.line(),
        format!("127.0.0.1:{port}"),
        "the same port again"
    );
    wait_until_long("clients through the restarted relay", || {
        assert!(served(front, b"back"), "a client through HAProxy");
        bytes_to_app(&relay_a) > 0.0
    });
    until_served_in_a_row(front, 20, "with both relays back");
}

/// `wait_until` with this file's patience (a re-registration waits for the
/// agent's back-off).
fn wait_until_long(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "never {what}");
        thread::sleep(Duration::from_millis(20)); // a poll interval: re-checked
    }
}
