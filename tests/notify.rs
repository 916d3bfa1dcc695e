//! systemd notifications (issue 12): `serve` and `expose`, run with
//! `NOTIFY_SOCKET` pointing at a datagram socket this test owns, say
//! `READY=1` once they listen (the relay) or are registered (the agent),
//! `WATCHDOG=1` periodically when `WATCHDOG_USEC` asks for it, and
//! `STOPPING=1` on SIGTERM.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use common::daemons::{TempDir, free_port};
use common::*;

/// A child process, killed if a test fails before it ends.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `tcp-relay <args>` told to notify the socket at `socket`, with a
/// watchdog interval of 200 ms (pings every 100 ms).
fn spawn_notifying(args: &[&str], socket: &std::path::Path) -> Reaped {
    let child = Command::new(env!("CARGO_BIN_EXE_tcp-relay"))
        .args(args)
        .env("NOTIFY_SOCKET", socket)
        .env("WATCHDOG_USEC", "200000")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start tcp-relay");
    Reaped(child)
}

/// The next datagram, within `WAIT`.
fn next_message(socket: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = socket
        .recv(&mut buf)
        .expect("a notification within the timeout");
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Receives until a message contains `wanted`; returns what came before.
fn until_message(socket: &UnixDatagram, wanted: &str) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    let mut before = Vec::new();
    loop {
        assert!(
            Instant::now() < deadline,
            "no {wanted} within {WAIT:?}: {before:?}"
        );
        let message = next_message(socket);
        if message.lines().any(|line| line == wanted) {
            return before;
        }
        before.push(message);
    }
}

fn sigterm(child: &Child) {
    let pid = i32::try_from(child.id()).expect("a pid");
    // SAFETY: kill(2) with a pid we started and a valid signal number.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "send SIGTERM");
}

/// A datagram socket in a fresh temp dir, with a receive timeout.
fn notify_socket(dir: &TempDir) -> (UnixDatagram, std::path::PathBuf) {
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("bind the notify socket");
    socket.set_read_timeout(Some(WAIT)).expect("timeout");
    (socket, path)
}

/// The relay: READY=1, then watchdog pings, a status line for `systemctl
/// status` that follows its apps, then STOPPING=1 on SIGTERM.
#[test]
fn the_relay_says_ready_pings_its_watchdog_and_says_stopping() {
    let dir = TempDir::new("notify-relay");
    let (socket, path) = notify_socket(&dir);
    let port = free_port().to_string();
    let args = ["serve", "--bind", "127.0.0.1", "--reg-port", &port];
    let mut relay = spawn_notifying(&args, &path);
    until_message(&socket, "READY=1");
    until_message(&socket, "STATUS=0 apps, 0 clients piped, 0 waiting");
    for _ in 0..3 {
        until_message(&socket, "WATCHDOG=1");
    }
    let reg = format!("127.0.0.1:{port}").parse().expect("an address");
    let _app = tcp_relay::EchoApp::connect(reg).expect("an app registers");
    until_message(&socket, "STATUS=1 apps, 0 clients piped, 0 waiting");
    sigterm(&relay.0);
    until_message(&socket, "STOPPING=1");
    let status = relay.0.wait().expect("the relay exits");
    assert!(status.success(), "{status}");
}

/// The agent: READY=1 only once registered (after the relay is there),
/// pings, and STOPPING=1 on SIGTERM.
#[test]
fn the_agent_says_ready_once_registered() {
    let relay = start_relay();
    let dir = TempDir::new("notify-agent");
    let (socket, path) = notify_socket(&dir);
    let relay_arg = relay.reg_addr().to_string();
    let local = format!("127.0.0.1:{}", free_port());
    let args = ["expose", "--relay", &relay_arg, "--local", &local];
    let mut agent = spawn_notifying(&args, &path);
    until_message(&socket, "READY=1");
    until_message(&socket, "STATUS=1/1 registrations up, 0 clients");
    wait_for_stats(&relay, "the agent registered", |s| s.apps == 1);
    until_message(&socket, "WATCHDOG=1");
    sigterm(&agent.0);
    until_message(&socket, "STOPPING=1");
    let status = agent.0.wait().expect("the agent exits");
    assert!(status.success(), "{status}");
}

/// Without `NOTIFY_SOCKET`, nothing is sent and nothing breaks (the
/// relay runs as usual); checked by a relay that serves an echo app.
#[test]
fn without_notify_socket_the_relay_runs_as_usual() {
    let port = free_port().to_string();
    let mut relay = Reaped(
        Command::new(env!("CARGO_BIN_EXE_tcp-relay"))
            .args(["serve", "--bind", "127.0.0.1", "--reg-port", &port])
            .env_remove("NOTIFY_SOCKET")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start tcp-relay"),
    );
    let addr = local(port.parse().expect("a port"));
    wait_until("the relay listens", || {
        std::net::TcpStream::connect(addr).is_ok()
    });
    let app = TestApp::register(addr);
    drop(app);
    sigterm(&relay.0);
    let status = relay.0.wait().expect("the relay exits");
    assert!(status.success(), "{status}");
}
