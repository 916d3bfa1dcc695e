//! End-to-end tests of the hardening in issue 5: authentication with a
//! shared secret, one-time dial-in tokens, every limit and every refusal,
//! running out of file descriptors, and shutting down on a signal.
//!
//! Everything runs over real loopback sockets bound to port 0 (or, for the
//! `tcp-relay` binary, to a port probed free just before), and nothing
//! waits by sleeping: tests poll for a condition until a deadline. The few
//! sleeps left pace a sender or measure CPU over a window; none of them
//! orders events.
//!
//! The modules, by concern:
//!
//! * `auth`: the challenge–response, from the library, the agent and the
//!   command line; the secret never on the wire; no replay.
//! * `dial_in`: one-time tokens: strangers and reused tokens get nothing,
//!   the app's own dial-in gets its client; [`tcp_relay::RelayedApp`] with
//!   a secret.
//! * `limits`: one test per limit (apps, connections, line length, port
//!   range, time to register, half-closed idle pipes, waiting clients).
//! * `exhaustion`: the relay binary under `prlimit --nofile=64`.
//! * `signals`: the relay binary under SIGTERM and SIGINT.

// The shared helpers live beside the other test crates; this crate's root is
// a directory of its own, so the path is spelled out.
#[path = "../common/mod.rs"]
mod common;

mod auth;
mod dial_in;
mod exhaustion;
mod limits;
mod signals;

use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread;
use std::time::{Duration, Instant};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tcp_relay::{Agent, AgentConfig, Config, RunningAgent, RunningRelay, Secret, Service};

use common::*;

/// The secret every authenticated relay in these tests is started with.
pub const SECRET: &str = "correct horse battery staple";

/// The environment variable the command line reads the secret from.
pub const SECRET_ENV: &str = "TCP_RELAY_SECRET";

/// What the HMAC covers before the nonce (the protocol's domain separation,
/// `tcp_relay::auth::DOMAIN`), spelled out so these tests pin the wire
/// format rather than restate the library.
const AUTH_DOMAIN: &[u8] = b"tcp-relay auth v1\0";

/// A relay on `127.0.0.1:0` requiring [`SECRET`], adjusted by `tweak`.
pub fn start_secret_relay(tweak: impl FnOnce(&mut Config)) -> RunningRelay {
    start_relay_with(|c| {
        c.secret = Some(secret(SECRET));
        tweak(c);
    })
}

/// `text` as a [`Secret`].
pub fn secret(text: &str) -> Secret {
    Secret(text.as_bytes().to_vec())
}

/// Lower-case hex, written out here so the tests do not lean on the
/// library's encoder.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes of a lower-case hex string; panics on anything else.
pub fn from_hex(text: &str) -> Vec<u8> {
    assert!(text.len().is_multiple_of(2), "odd hex length in {text:?}");
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex digits"))
        .collect()
}

/// The `auth` line that answers `nonce` with `secret`: HMAC-SHA256 over the
/// domain and the nonce, computed independently of the relay's code.
pub fn auth_line_for(secret: &[u8], nonce: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes any key");
    mac.update(AUTH_DOMAIN);
    mac.update(nonce);
    format!("auth {}\n", to_hex(&mac.finalize().into_bytes()))
}

/// An agent for the relay at `reg`, not yet registered.
pub fn agent(reg: SocketAddr, service: Service, secret: Option<&str>) -> Agent {
    Agent::new(AgentConfig {
        secret: secret.map(self::secret),
        reconnect: false,
        splice: false,
        ..AgentConfig::new(reg.to_string(), service)
    })
    .expect("create the agent")
}

/// An echoing agent with `secret`, registered and running on its thread.
pub fn start_echo_agent(reg: SocketAddr, secret: Option<&str>) -> RunningAgent {
    let mut agent = agent(reg, Service::Echo, secret);
    agent.register().expect("register the agent");
    agent.spawn().expect("spawn the agent")
}

// ---------------------------------------------------------------------------
// A raw app

/// An app driven by hand, line by line, that records every byte the relay
/// sends it (to check what crossed the wire) and every byte it sends.
pub struct RawApp {
    pub stream: TcpStream, // the control connection
    pub received: Vec<u8>, // everything the relay sent, in order
    pub sent: Vec<u8>,     // everything we sent, in order
    unread: Vec<u8>,       // received bytes not yet handed out as lines
}

impl RawApp {
    /// Connects to the registration port; reads nothing yet.
    pub fn connect(reg: SocketAddr) -> RawApp {
        RawApp {
            stream: connect(reg),
            received: Vec::new(),
            sent: Vec::new(),
            unread: Vec::new(),
        }
    }

    /// Connects and authenticates with `secret`; returns the app and its
    /// relayed port (from the established line, which must follow).
    pub fn register(reg: SocketAddr, secret: &str) -> (RawApp, u16) {
        let mut app = RawApp::connect(reg);
        let nonce = app.challenge();
        app.send(auth_line_for(secret.as_bytes(), &nonce).as_bytes());
        let port = app.established();
        (app, port)
    }

    /// The next line from the relay, without its `\n`; `None` once the relay
    /// has closed the connection (EOF or reset). Panics after [`IO_TIMEOUT`].
    pub fn read_line(&mut self) -> Option<String> {
        let mut buf = [0u8; 4096];
        loop {
            if let Some(end) = self.unread.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.unread.drain(..=end).collect();
                let text = String::from_utf8(line[..end].to_vec()).expect("a UTF-8 line");
                return Some(text);
            }
            match self.stream.read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => {
                    self.received.extend_from_slice(&buf[..n]);
                    self.unread.extend_from_slice(&buf[..n]);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if is_timeout(&e) => panic!("no line from the relay within {IO_TIMEOUT:?}"),
                Err(_) => return None,
            }
        }
    }

    /// The next line, which must come.
    pub fn line(&mut self, what: &str) -> String {
        self.read_line()
            .unwrap_or_else(|| panic!("the relay closed the connection; expected {what}"))
    }

    /// Reads the challenge line, checking its exact form; returns the nonce.
    pub fn challenge(&mut self) -> Vec<u8> {
        let line = self.line("the challenge");
        let nonce = line
            .strip_prefix("challenge ")
            .unwrap_or_else(|| panic!("expected a challenge, got {line:?}"));
        assert_eq!(nonce.len(), 64, "a 32-byte nonce in hex: {line:?}");
        from_hex(nonce)
    }

    /// Reads the established line; returns the relayed port.
    pub fn established(&mut self) -> u16 {
        let line = self.line("the established line");
        line.strip_prefix(ESTABLISHED_PREFIX)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("expected the established line, got {line:?}"))
    }

    /// Reads a dial line `<DIAL_PORT> <TOKEN>`; returns both.
    pub fn dial_line(&mut self) -> (u16, String) {
        let line = self.line("a dial line");
        let (port, token) = line
            .split_once(' ')
            .unwrap_or_else(|| panic!("expected `<port> <token>`, got {line:?}"));
        assert_eq!(token.len(), 32, "a 128-bit token in hex: {line:?}");
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{line:?}");
        (port.parse().expect("a dial port"), token.to_owned())
    }

    /// Expects one `error <reason>` line and then the close; returns the
    /// reason.
    pub fn refusal(&mut self) -> String {
        let line = self.line("an error line");
        let reason = line
            .strip_prefix("error ")
            .unwrap_or_else(|| panic!("expected an error line, got {line:?}"))
            .to_owned();
        self.expect_closed("after the error line");
        reason
    }

    /// Expects the relay to close the connection with nothing more to say.
    pub fn expect_closed(&mut self, what: &str) {
        if let Some(line) = self.read_line() {
            panic!("{what}: expected the close, got {line:?}");
        }
        assert!(
            self.unread.is_empty(),
            "{what}: a partial line before the close"
        );
    }

    /// Sends raw bytes on the control connection.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write to the relay");
        self.sent.extend_from_slice(bytes);
    }
}

/// Connects to the registration port and expects to be turned away with an
/// `error` line, not registered; returns the reason.
pub fn refused_registration(reg: SocketAddr) -> String {
    RawApp::connect(reg).refusal()
}

/// A dial-in presenting `token` (and `then`, in the same write) from `from`.
pub fn dial_in_with(
    from: std::net::IpAddr,
    dial_port: u16,
    token: &str,
    then: &[u8],
) -> io::Result<TcpStream> {
    let mut stream = connect_from(from, local(dial_port))?;
    let mut first = format!("{token}\n").into_bytes();
    first.extend_from_slice(then);
    stream.write_all(&first)?;
    Ok(stream)
}

// ---------------------------------------------------------------------------
// The `tcp-relay` binary

/// A `tcp-relay` process; killed (and reaped) when dropped, so a failing
/// test leaves nothing running.
pub struct Process {
    child: Child,
    stdout: Receiver<String>, // its stdout, a line at a time
    stderr: Receiver<String>, // its stderr (the log), a line at a time
    seen: Vec<String>,        // stderr lines read so far, for failure messages
}

impl Process {
    /// Runs `program args`, with `env` set and the secret variable unset
    /// unless `env` sets it.
    pub fn spawn(program: &str, args: &[&str], env: &[(&str, &str)]) -> Process {
        let mut command = Command::new(program);
        command
            .args(args)
            .env_remove(SECRET_ENV)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (key, value) in env {
            command.env(key, value);
        }
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("start {program}: {e}"));
        let stdout = lines_of(child.stdout.take().expect("piped stdout"));
        let stderr = lines_of(child.stderr.take().expect("piped stderr"));
        Process {
            child,
            stdout,
            stderr,
            seen: Vec::new(),
        }
    }

    /// Runs the `tcp-relay` binary with `args`.
    pub fn tcp_relay(args: &[&str], env: &[(&str, &str)]) -> Process {
        Process::spawn(env!("CARGO_BIN_EXE_tcp-relay"), args, env)
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends it `signal`.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.pid()).expect("a pid");
        // SAFETY: kill only sends a signal to the child we started (and
        // have not reaped, so the pid cannot have been reused).
        let sent = unsafe { libc::kill(pid, signal) };
        assert_eq!(sent, 0, "kill: {}", io::Error::last_os_error());
    }

    /// Its exit status, if it exits within `within`.
    pub fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            // A poll interval, not synchronisation: the exit is re-checked.
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Its exit status, which must come within `within`.
    pub fn exit_status(&mut self, within: Duration, what: &str) -> ExitStatus {
        match self.wait_exit(within) {
            Some(status) => status,
            None => panic!(
                "{what}: still running after {within:?}; log: {:?}",
                self.log()
            ),
        }
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }

    /// Waits for a stderr line containing `needle`; `None` if stderr ends
    /// (the process exited) or `within` passes first.
    pub fn find_in_log(&mut self, needle: &str, within: Duration) -> Option<String> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return Some(line);
                    }
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => return None,
            }
        }
    }

    /// Every stderr line, once the process has exited and its stderr has
    /// closed (or after [`WAIT`]): the reader thread may lag the exit.
    pub fn final_log(&mut self) -> Vec<String> {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stderr.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(_) => return self.seen.clone(),
            }
        }
    }

    /// Every stderr line so far (after collecting what is already there).
    pub fn log(&mut self) -> Vec<String> {
        while let Ok(line) = self.stderr.try_recv() {
            self.seen.push(line);
        }
        self.seen.clone()
    }

    /// The next stdout line, which must come within [`WAIT`].
    pub fn stdout_line(&mut self, what: &str) -> String {
        match self.stdout.recv_timeout(WAIT) {
            Ok(line) => line,
            Err(e) => panic!("no {what} on stdout ({e}); log: {:?}", self.log()),
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Lines of a child's output, delivered on a channel (so reading them has a
/// deadline).
fn lines_of(output: impl Read + Send + 'static) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        for line in BufReader::new(output).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// A port on 127.0.0.1 that nothing listens on right now.
pub fn free_port() -> u16 {
    let probe = TcpListener::bind((LOCALHOST, 0)).expect("bind a probe listener");
    probe.local_addr().expect("probe address").port()
}

/// `tcp-relay serve --bind 127.0.0.1 --reg-port <free> extra...`, run
/// through `wrapper` (e.g. `prlimit ...`, or nothing), once it listens.
/// The port is probed free first; if another process takes it in between,
/// the relay fails to bind and another port is tried.
pub fn serve_process(
    wrapper: &[&str],
    extra: &[&str],
    env: &[(&str, &str)],
) -> (Process, SocketAddr) {
    let binary = env!("CARGO_BIN_EXE_tcp-relay");
    for _ in 0..5 {
        let port = free_port().to_string();
        let mut args: Vec<&str> = wrapper.to_vec();
        args.extend([binary, "serve", "--bind", "127.0.0.1", "--reg-port", &port]);
        args.extend(extra);
        let (program, args) = args.split_first().expect("a program");
        let mut process = Process::spawn(program, args, env);
        if process.find_in_log("listening for apps on", WAIT).is_some() {
            let addr = local(port.parse().expect("a port"));
            return (process, addr);
        }
        let log = process.log();
        assert!(
            log.iter().any(|l| l.contains("cannot listen")),
            "the relay did not start: {log:?}"
        );
    }
    panic!("no free registration port in 5 tries");
}
