//! Tests per state transition: the relay's handler driven turn by turn over
//! real loopback sockets, on the test's own thread (no relay thread, no
//! process). Peers are blocking `std` sockets; the harness runs turns until
//! the expected state is reached. Time is passed in, so a deadline fires by
//! running a turn "later", without waiting for it.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll};

use std::num::NonZeroU32;

use super::core::{REG_LISTENER, RelayCore};
use super::status::{Listener, Refused};
use crate::access::RateLimit;
use crate::auth::{self, DialToken};
use crate::config::{Config, Secret};
use crate::protocol::{auth_line, token_line};
use crate::reactor::Handler;
use crate::sockio::listen;
use crate::table::State;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Longest any blocking socket call or any awaited condition may take.
const PATIENCE: Duration = Duration::from_secs(10);

/// A relay handler and the poll that feeds it, on this thread.
struct Harness {
    poll: Poll,
    events: Events,
    core: RelayCore,
    reg: SocketAddr,
}

impl Harness {
    fn new(tweak: impl FnOnce(&mut Config)) -> Harness {
        let mut config = Config {
            bind: LOCALHOST,
            reg_port: 0,
            ..Config::default()
        };
        tweak(&mut config);
        let poll = Poll::new().expect("a poll");
        let addr = SocketAddr::new(config.bind, config.reg_port);
        let mut reg = listen(addr, config.backlog).expect("listen");
        poll.registry()
            .register(&mut reg, REG_LISTENER, Interest::READABLE)
            .expect("register the registration port");
        let registry = poll.registry().try_clone().expect("a registry");
        let core = RelayCore::new(registry, config, reg).expect("a relay handler");
        let reg = core.reg_addr;
        Harness {
            poll,
            events: Events::with_capacity(256),
            core,
            reg,
        }
    }

    /// One turn of the loop at `now`, taking whatever events are ready.
    fn turn_at(&mut self, now: Instant) {
        self.poll
            .poll(&mut self.events, Some(Duration::from_millis(5)))
            .expect("poll");
        for event in self.events.iter() {
            self.core.on_event(event, now);
        }
        self.core.end_turn(now);
    }

    /// Runs turns until `cond` holds of the entries' states.
    fn until(&mut self, what: &str, cond: impl Fn(&[&'static str]) -> bool) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            self.turn_at(Instant::now());
            let states = self.states();
            if cond(&states) {
                return;
            }
            assert!(Instant::now() < deadline, "never {what}; states {states:?}");
        }
    }

    /// The names of the entries' states, sorted.
    fn states(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.core.table.iter().map(|(_, c)| c.name()).collect();
        names.sort_unstable();
        names
    }

    /// How many entries are in state `name`.
    fn count(&self, name: &str) -> usize {
        self.states().iter().filter(|&&n| n == name).count()
    }

    /// A registered app (no secret): its control connection and port.
    fn app(&mut self) -> (TcpStream, BufReader<TcpStream>, u16) {
        let control = connect(self.reg);
        self.until("the app registered", |s| s.contains(&"App"));
        let mut lines = BufReader::new(control.try_clone().expect("clone"));
        let port = established(&mut lines);
        (control, lines, port)
    }
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, PATIENCE).expect("connect");
    stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
    stream
}

fn local(port: u16) -> SocketAddr {
    SocketAddr::new(LOCALHOST, port)
}

fn line(lines: &mut BufReader<TcpStream>) -> String {
    let mut line = String::new();
    lines.read_line(&mut line).expect("a line from the relay");
    line
}

fn established(lines: &mut BufReader<TcpStream>) -> u16 {
    let line = line(lines);
    let port = line
        .trim_end()
        .strip_prefix("established relay address port:");
    port.and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("not an established line: {line:?}"))
}

/// The next dial line's port and token.
fn dial_line(lines: &mut BufReader<TcpStream>) -> (u16, Option<String>) {
    let line = line(lines);
    let mut fields = line.split_whitespace();
    let port = fields.next().and_then(|p| p.parse().ok());
    let port = port.unwrap_or_else(|| panic!("not a dial line: {line:?}"));
    (port, fields.next().map(str::to_owned))
}

fn read_n(stream: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0; n];
    stream.read_exact(&mut buf).expect("read");
    buf
}

/// Whether the stream was closed with a reset (or ended without a byte).
fn ended_without_a_byte(stream: &mut TcpStream) -> bool {
    let mut byte = [0u8; 1];
    match stream.read(&mut byte) {
        Ok(0) => true,
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

// ---- the card's path ---------------------------------------------------

/// (none) => App: the app is told its port, which then accepts clients.
#[test]
fn an_app_is_registered_on_a_port_of_its_own() {
    let mut h = Harness::new(|_| {});
    let (_control, _lines, port) = h.app();
    assert!(
        port > h.reg.port(),
        "increment style: above the registration port"
    );
    assert_eq!(h.states(), ["App"]);
    let _client = connect(local(port));
    h.until("the client waiting", |s| s.contains(&"AwaitingDialIn"));
}

/// App => closed when its control connection ends; its port closes and
/// its waiting clients with it (AwaitingDialIn => closed).
#[test]
fn an_app_that_leaves_closes_its_port_and_waiting_clients() {
    let mut h = Harness::new(|_| {});
    let (control, _lines, port) = h.app();
    let mut client = connect(local(port));
    h.until("the client waiting", |s| s == ["App", "AwaitingDialIn"]);
    control.shutdown(Shutdown::Both).expect("the app leaves");
    h.until("nothing left", <[&str]>::is_empty);
    assert!(ended_without_a_byte(&mut client));
    assert!(
        TcpStream::connect(local(port)).is_err(),
        "its port is closed"
    );
}

/// (none) => AwaitingDialIn => Piping: the app is asked to dial in, and
/// its dial-in is paired with the client; bytes the client sent while it
/// waited come first.
#[test]
fn a_client_waits_for_its_dial_in_and_is_piped_to_it() {
    let mut h = Harness::new(|_| {});
    let (_control, mut lines, port) = h.app();
    let mut client = connect(local(port));
    client.write_all(b"early").expect("client writes");
    h.until("the client waiting", |s| s.contains(&"AwaitingDialIn"));
    let (dial_port, token) = dial_line(&mut lines);
    assert_eq!(token, None, "no token without a secret");
    let mut dial_in = connect(local(dial_port));
    h.until("the pipe", |s| s == ["App", "Piping"]);
    assert_eq!(read_n(&mut dial_in, 5), b"early");
    dial_in.write_all(b"back").expect("app answers");
    h.until("bytes moved", |_| true);
    h.turn_at(Instant::now());
    assert_eq!(read_n(&mut client, 4), b"back");
}

/// Piping => closed once both ways are done, and the app stays.
#[test]
fn a_pipe_closes_when_both_ways_are_done() {
    let mut h = Harness::new(|_| {});
    let (_control, mut lines, port) = h.app();
    let client = connect(local(port));
    h.until("the client waiting", |s| s.contains(&"AwaitingDialIn"));
    let dial_in = connect(local(dial_line(&mut lines).0));
    h.until("the pipe", |s| s.contains(&"Piping"));
    client.shutdown(Shutdown::Write).expect("client ends");
    dial_in.shutdown(Shutdown::Write).expect("app ends");
    h.until("the pipe closed", |s| s == ["App"]);
}

/// A client with a receive window too small for what its app sent last:
/// the app's bytes and end are written, the client has read nothing.
/// Returns the app's control connection (the app stays while it is open)
/// and the client.
fn piped_to_a_client_that_does_not_read(h: &mut Harness, bytes: &[u8]) -> (TcpStream, TcpStream) {
    let (control, mut lines, port) = h.app();
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("a socket");
    socket.set_recv_buffer_size(1024).expect("a small window");
    socket.connect(&local(port).into()).expect("connect");
    let client = TcpStream::from(socket);
    client.set_read_timeout(Some(PATIENCE)).expect("timeout");
    h.until("the client waiting", |s| s.contains(&"AwaitingDialIn"));
    let mut dial_in = connect(local(dial_line(&mut lines).0));
    h.until("the pipe", |s| s.contains(&"Piping"));
    client.shutdown(Shutdown::Write).expect("client ends");
    dial_in.write_all(bytes).expect("the app's last bytes");
    dial_in.shutdown(Shutdown::Write).expect("app ends");
    (control, client)
}

/// Piping => Flushing => closed: a pipe done while its client has not
/// acknowledged every byte keeps its sockets until it has (a close would
/// leave them to an orphan, which the kernel resets when TCP memory runs
/// short), and the client gets every byte and its end.
#[test]
fn a_pipe_done_before_its_client_has_every_byte_waits_for_it() {
    let mut h = Harness::new(|_| {});
    let sent: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    let (_control, mut client) = piped_to_a_client_that_does_not_read(&mut h, &sent);
    h.until("flushing", |s| s.contains(&"Flushing"));
    h.turn_at(Instant::now() + Duration::from_secs(1));
    assert_eq!(
        h.count("Flushing"),
        1,
        "kept while the client reads nothing"
    );
    let mut got = Vec::new();
    client
        .read_to_end(&mut got)
        .expect("every byte, then the end");
    assert_eq!(got, sent);
    h.until("closed once delivered", |s| s == ["App"]);
}

/// Flushing => closed when the client acknowledges nothing for the stall
/// time: the close is orderly (the kernel goes on delivering), not a reset.
#[test]
fn a_finished_pipe_whose_client_never_reads_is_closed_after_the_stall_time() {
    let mut h = Harness::new(|_| {});
    let sent = vec![7u8; 8192];
    let (_control, mut client) = piped_to_a_client_that_does_not_read(&mut h, &sent);
    h.until("flushing", |s| s.contains(&"Flushing"));
    h.turn_at(Instant::now() + crate::flush::STALL + Duration::from_secs(1));
    assert_eq!(h.states(), ["App"]);
    let mut got = Vec::new();
    client
        .read_to_end(&mut got)
        .expect("the rest, from the kernel");
    assert_eq!(got, sent);
}

/// AwaitingDialIn => closed when the dial-in timeout passes: the client
/// gets a reset, not a byte. (The turn runs "later": no waiting.)
#[test]
fn a_client_whose_dial_in_never_comes_is_closed_at_its_deadline() {
    let mut h = Harness::new(|_| {});
    let (_control, _lines, port) = h.app();
    let mut client = connect(local(port));
    h.until("the client waiting", |s| s.contains(&"AwaitingDialIn"));
    h.turn_at(Instant::now() + Duration::from_secs(9));
    assert_eq!(h.count("AwaitingDialIn"), 1, "still within its 10 s");
    h.turn_at(Instant::now() + Duration::from_secs(11));
    assert_eq!(h.states(), ["App"]);
    assert!(ended_without_a_byte(&mut client));
}

/// AwaitingDialIn => closed when the client resets while it waits.
#[test]
fn a_waiting_client_that_resets_is_closed() {
    let mut h = Harness::new(|_| {});
    let (_control, _lines, port) = h.app();
    let client = connect(local(port));
    h.until("the client waiting", |s| s.contains(&"AwaitingDialIn"));
    socket2::SockRef::from(&client)
        .set_linger(Some(Duration::ZERO))
        .expect("linger 0");
    drop(client);
    h.until("the client gone", |s| s == ["App"]);
}

/// Piping, half-closed and idle past `--half-close-timeout` => closed;
/// an open pipe is never closed for idling.
#[test]
fn a_half_closed_pipe_idle_past_its_timeout_is_closed() {
    let mut h = Harness::new(|_| {});
    let (_control, mut lines, port) = h.app();
    let client = connect(local(port));
    h.until("the client waiting", |s| s.contains(&"AwaitingDialIn"));
    let _dial_in = connect(local(dial_line(&mut lines).0));
    h.until("the pipe", |s| s.contains(&"Piping"));
    h.turn_at(Instant::now() + Duration::from_secs(3600));
    assert_eq!(
        h.count("Piping"),
        1,
        "an open pipe idles as long as it likes"
    );
    client.shutdown(Shutdown::Write).expect("half-close");
    h.until("the half-close carried", |_| true);
    h.turn_at(Instant::now());
    h.turn_at(Instant::now() + Duration::from_secs(601));
    assert_eq!(h.states(), ["App"]);
}

// ---- the `auth` extension ----------------------------------------------

const SECRET: &[u8] = b"transition tests";

fn with_secret(config: &mut Config) {
    config.secret = Some(Secret(SECRET.to_vec()));
}

/// The challenge's nonce, read from its line.
fn challenge(lines: &mut BufReader<TcpStream>) -> Vec<u8> {
    let line = line(lines);
    let hex = line
        .trim_end()
        .strip_prefix("challenge ")
        .expect("a challenge");
    auth::unhex(hex).expect("hex")
}

/// (none) => Authenticating => App with the right answer.
#[test]
fn an_app_with_the_right_answer_is_admitted() {
    let mut h = Harness::new(with_secret);
    let mut control = connect(h.reg);
    h.until("the app challenged", |s| s == ["Authenticating"]);
    let mut lines = BufReader::new(control.try_clone().expect("clone"));
    let nonce = challenge(&mut lines);
    control
        .write_all(auth_line(&auth::response(SECRET, &nonce)).as_bytes())
        .expect("answer");
    h.until("the app admitted", |s| s == ["App"]);
    established(&mut lines);
}

/// Authenticating => closed: a wrong answer is refused, a silent app is
/// closed at its deadline.
#[test]
fn an_app_with_a_wrong_answer_or_none_is_closed() {
    let mut h = Harness::new(with_secret);
    let mut wrong = connect(h.reg);
    let _silent = connect(h.reg);
    h.until("two challenged", |s| {
        s == ["Authenticating", "Authenticating"]
    });
    wrong
        .write_all(&auth_line(&[0; 32]).into_bytes())
        .expect("answer");
    h.until("the wrong one refused", |s| s == ["Authenticating"]);
    let mut lines = BufReader::new(wrong);
    challenge(&mut lines);
    assert_eq!(line(&mut lines), "error secret refused\n");
    h.turn_at(Instant::now() + Duration::from_secs(11));
    assert!(h.states().is_empty(), "the silent one timed out");
}

/// A registered app with a secret, and its lines.
fn secret_app(h: &mut Harness) -> (TcpStream, BufReader<TcpStream>, u16) {
    let mut control = connect(h.reg);
    h.until("the app challenged", |s| s == ["Authenticating"]);
    let mut lines = BufReader::new(control.try_clone().expect("clone"));
    let nonce = challenge(&mut lines);
    let answer = auth_line(&auth::response(SECRET, &nonce));
    control.write_all(answer.as_bytes()).expect("answer");
    h.until("the app admitted", |s| s == ["App"]);
    let port = established(&mut lines);
    (control, lines, port)
}

/// (none) => Presenting => (moves into its client's entry, Piping): the
/// right token pairs the dial-in with exactly its client.
#[test]
fn a_dial_in_presenting_its_token_joins_its_client() {
    let mut h = Harness::new(with_secret);
    let (_control, mut lines, port) = secret_app(&mut h);
    let mut client = connect(local(port));
    h.until("the client waiting", |s| s.contains(&"AwaitingDialIn"));
    let (dial_port, token) = dial_line(&mut lines);
    let token = DialToken::parse(&token.expect("a token")).expect("hex");
    let mut dial_in = connect(local(dial_port));
    h.until("presenting", |s| s.contains(&"Presenting"));
    dial_in
        .write_all(token_line(&token).as_bytes())
        .expect("present");
    dial_in.write_all(b"hello").expect("app speaks first");
    h.until("paired", |s| s == ["App", "Piping"]);
    assert_eq!(read_n(&mut client, 5), b"hello");
}

/// Presenting => closed: a wrong token, and no token at the deadline.
#[test]
fn a_dial_in_with_a_wrong_token_or_none_is_closed() {
    let mut h = Harness::new(with_secret);
    let (_control, mut lines, port) = secret_app(&mut h);
    let _client = connect(local(port));
    h.until("the client waiting", |s| s.contains(&"AwaitingDialIn"));
    let dial_port = dial_line(&mut lines).0;
    let mut wrong = connect(local(dial_port));
    let _silent = connect(local(dial_port));
    h.until("two presenting", |s| {
        s.iter().filter(|&&n| n == "Presenting").count() == 2
    });
    let bogus = DialToken([7; crate::auth::TOKEN_LEN]);
    wrong
        .write_all(token_line(&bogus).as_bytes())
        .expect("present");
    h.until("the wrong one closed", |s| {
        s.iter().filter(|&&n| n == "Presenting").count() == 1
    });
    assert!(ended_without_a_byte(&mut wrong));
    h.turn_at(Instant::now() + Duration::from_secs(9));
    assert_eq!(h.count("Presenting"), 1, "still within its 10 s");
    h.turn_at(Instant::now() + Duration::from_secs(10) + Duration::from_millis(500));
    assert_eq!(h.count("Presenting"), 0);
}

// ---- the `ready` extension ---------------------------------------------

/// An app keeping one dial-in ready, and that dial-in (in Standby).
fn ready_app(h: &mut Harness) -> (TcpStream, BufReader<TcpStream>, u16, TcpStream) {
    let (mut control, mut lines, port) = h.app();
    control
        .write_all(b"ready 1\n")
        .expect("ask for a ready dial-in");
    h.until("a dial line", |_| true);
    let spare = connect(local(dial_line(&mut lines).0));
    h.until("one standing by", |s| s == ["App", "Standby"]);
    (control, lines, port, spare)
}

/// (none) => Standby => Piping: a client joins a ready dial-in's entry at
/// once, and a replacement is asked for.
#[test]
fn a_client_joins_a_ready_dial_in() {
    let mut h = Harness::new(|_| {});
    let (_control, mut lines, port, mut spare) = ready_app(&mut h);
    let mut client = connect(local(port));
    client.write_all(b"now").expect("client writes");
    h.until("piped at once", |s| s == ["App", "Piping"]);
    assert_eq!(read_n(&mut spare, 3), b"now");
    spare.write_all(b"ok").expect("app answers");
    h.until("answered", |_| true);
    assert_eq!(read_n(&mut client, 2), b"ok");
    dial_line(&mut lines); // the replacement asked for
}

/// Standby => closed when the ready dial-in dies; it is replaced.
#[test]
fn a_ready_dial_in_that_dies_is_closed_and_replaced() {
    let mut h = Harness::new(|_| {});
    let (_control, mut lines, _port, spare) = ready_app(&mut h);
    drop(spare);
    h.until("the dead one closed", |s| s == ["App"]);
    dial_line(&mut lines); // its replacement asked for
}

/// Piping (on trial) => AwaitingDialIn: a ready dial-in that ends before
/// the app's first byte sends its client back to waiting, with its bytes.
#[test]
fn a_client_whose_ready_dial_in_is_lost_on_trial_waits_again() {
    let mut h = Harness::new(|_| {});
    let (_control, mut lines, port, mut spare) = ready_app(&mut h);
    let mut client = connect(local(port));
    client.write_all(b"request").expect("client writes");
    h.until("handed the ready one", |s| s.contains(&"Piping"));
    assert_eq!(read_n(&mut spare, 7), b"request");
    drop(spare);
    h.until("waiting again", |s| s == ["App", "AwaitingDialIn"]);
    let mut fresh = None;
    while fresh.is_none() {
        let (dial_port, _) = dial_line(&mut lines);
        let mut dial_in = connect(local(dial_port));
        h.until("paired or standing by", |s| {
            !s.contains(&"AwaitingDialIn") || s.contains(&"Standby")
        });
        if h.count("Piping") == 1 {
            assert_eq!(read_n(&mut dial_in, 7), b"request", "the bytes kept");
            fresh = Some(dial_in);
        }
    }
}

// ---- the `port` extension ----------------------------------------------

/// App => App on another port at its request; App => closed when the port
/// it asks for is taken.
#[test]
fn a_port_request_moves_the_app_or_closes_it() {
    let mut h = Harness::new(|_| {});
    let (mut first, mut first_lines, first_port) = h.app();
    let (mut second, mut second_lines, _) = h.app();
    let wanted = {
        let probe = std::net::TcpListener::bind((LOCALHOST, 0)).expect("probe");
        probe.local_addr().expect("addr").port()
    };
    first
        .write_all(format!("port {wanted}\n").as_bytes())
        .expect("ask");
    h.until("answered", |_| true);
    h.turn_at(Instant::now());
    assert_eq!(established(&mut first_lines), wanted);
    assert!(
        TcpStream::connect(local(first_port)).is_err(),
        "the old port closed"
    );
    second
        .write_all(format!("port {wanted}\n").as_bytes())
        .expect("ask");
    h.until("the second refused", |s| s == ["App"]);
    assert_eq!(
        line(&mut second_lines),
        format!("error port {wanted} is taken\n")
    );
}

// ---- the `proxy` extension -----------------------------------------------

/// A PROXY header read from a stream, byte-exact; its source address.
fn header_source(stream: &mut TcpStream) -> SocketAddr {
    let header = crate::proxy_protocol::read_header(stream).expect("a PROXY header");
    header.source().expect("a header naming the client")
}

/// An app asking for `proxy vN` is told yes, and each of its dial-ins then
/// begins with a header naming its client, before any client byte.
#[test]
fn an_app_asking_for_proxy_headers_gets_one_on_each_dial_in() {
    for version in ["v1", "v2"] {
        let mut h = Harness::new(|_| {});
        let (mut control, mut lines, port) = h.app();
        control
            .write_all(format!("proxy {version}\n").as_bytes())
            .expect("ask");
        h.until("answered", |_| true);
        h.turn_at(Instant::now());
        assert_eq!(line(&mut lines), format!("proxy {version}\n"));
        let mut client = connect(local(port));
        client.write_all(b"hello").expect("client writes");
        h.until("the client waiting", |s| s.contains(&"AwaitingDialIn"));
        let mut dial_in = connect(local(dial_line(&mut lines).0));
        h.until("the pipe", |s| s.contains(&"Piping"));
        let source = header_source(&mut dial_in);
        assert_eq!(source, client.local_addr().expect("addr"), "{version}");
        assert_eq!(read_n(&mut dial_in, 5), b"hello", "right after the header");
    }
}

/// A ready dial-in handed a client gets the client's header first too.
#[test]
fn a_ready_dial_in_gets_the_header_of_the_client_it_is_handed() {
    let mut h = Harness::new(|_| {});
    let (mut control, mut lines, port) = h.app();
    control.write_all(b"proxy v2\nready 1\n").expect("ask");
    h.until("answered", |_| true);
    assert_eq!(line(&mut lines), "proxy v2\n");
    let mut spare = connect(local(dial_line(&mut lines).0));
    h.until("one standing by", |s| s.contains(&"Standby"));
    let mut client = connect(local(port));
    client.write_all(b"x").expect("client writes");
    h.until("piped", |s| s.contains(&"Piping"));
    assert_eq!(
        header_source(&mut spare),
        client.local_addr().expect("addr")
    );
    assert_eq!(read_n(&mut spare, 1), b"x");
}

/// `proxy v3` is refused, and the app closed.
#[test]
fn a_bad_proxy_request_is_refused() {
    let mut h = Harness::new(|_| {});
    let (mut control, mut lines, _) = h.app();
    control.write_all(b"proxy v3\n").expect("ask");
    h.until("refused", <[&str]>::is_empty);
    assert!(line(&mut lines).starts_with("error bad proxy request: "));
}

/// (none) => Unwrapping => AwaitingDialIn: a client from a trusted balancer
/// is admitted under the address its header names, which is what the app's
/// header then says; the client's bytes after the header are untouched.
#[test]
fn a_trusted_balancers_client_is_admitted_under_the_address_it_names() {
    let mut h = Harness::new(|c| c.accept_proxy_from = Some("127.0.0.0/8".parse().expect("cidr")));
    let (mut control, mut lines, port) = h.app();
    control.write_all(b"proxy v1\n").expect("ask");
    h.until("answered", |_| true);
    assert_eq!(line(&mut lines), "proxy v1\n");
    let mut balancer = connect(local(port));
    h.until("unwrapping", |s| s.contains(&"Unwrapping"));
    let real: SocketAddr = "198.51.100.7:4242".parse().expect("addr");
    let header = crate::proxy_protocol::encode_v2(real, local(port));
    balancer.write_all(&header).expect("header");
    balancer.write_all(b"GET /").expect("data");
    h.until("admitted", |s| s.contains(&"AwaitingDialIn"));
    let mut dial_in = connect(local(dial_line(&mut lines).0));
    h.until("the pipe", |s| s.contains(&"Piping"));
    assert_eq!(header_source(&mut dial_in), real);
    assert_eq!(read_n(&mut dial_in, 5), b"GET /");
}

/// Unwrapping => closed: garbage instead of a header is reset at once, and
/// a trusted client that says nothing is closed at the registration
/// deadline.
#[test]
fn a_trusted_client_without_a_valid_header_is_reset() {
    let mut h = Harness::new(|c| c.accept_proxy_from = Some("127.0.0.1".parse().expect("cidr")));
    let (_control, _lines, port) = h.app();
    let mut garbage = connect(local(port));
    let _silent = connect(local(port));
    h.until("two unwrapping", |s| {
        s.iter().filter(|&&n| n == "Unwrapping").count() == 2
    });
    garbage.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
    h.until("the garbage reset", |s| {
        s.iter().filter(|&&n| n == "Unwrapping").count() == 1
    });
    assert!(ended_without_a_byte(&mut garbage));
    h.turn_at(Instant::now() + Duration::from_secs(11));
    assert_eq!(h.states(), ["App"]);
}

/// From a source not trusted, a header is client data: it reaches the
/// dial-in as it was sent.
#[test]
fn a_header_from_an_untrusted_source_is_client_data() {
    let mut h = Harness::new(|c| c.accept_proxy_from = Some("192.0.2.0/24".parse().expect("cidr")));
    let (_control, mut lines, port) = h.app();
    let mut client = connect(local(port));
    let forged = b"PROXY TCP4 203.0.113.9 127.0.0.1 1 2\r\n";
    client.write_all(forged).expect("write");
    h.until("waiting", |s| s.contains(&"AwaitingDialIn"));
    let mut dial_in = connect(local(dial_line(&mut lines).0));
    h.until("the pipe", |s| s.contains(&"Piping"));
    assert_eq!(read_n(&mut dial_in, forged.len()), forged);
}

// ---- access (who may connect) -------------------------------------------

/// A connection to `addr` from `source` (another loopback address).
fn connect_from(source: IpAddr, addr: SocketAddr) -> TcpStream {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("a socket");
    socket
        .bind(&SocketAddr::new(source, 0).into())
        .expect("bind the source address");
    socket
        .connect_timeout(&addr.into(), PATIENCE)
        .expect("connect");
    let stream = TcpStream::from(socket);
    stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
    stream
}

const OTHER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));

impl Harness {
    /// Runs turns until `count` connections were refused on `listener` for
    /// `reason`.
    fn until_refused(&mut self, listener: Listener, reason: Refused, count: u64) {
        let deadline = Instant::now() + PATIENCE;
        while self.core.metrics.refused_count(listener, reason) < count {
            assert!(Instant::now() < deadline, "never refused {count}");
            self.turn_at(Instant::now());
        }
        assert_eq!(self.core.metrics.refused_count(listener, reason), count);
    }
}

/// (none) => (none): an app from a source not in `--allow-apps` is reset
/// before it is an entry, on the registration and the dial-in port alike;
/// one from a listed source registers and is served.
#[test]
fn an_app_not_on_the_allow_list_is_reset_at_once() {
    let mut h = Harness::new(|c| c.allow_apps = Some("127.0.0.1".parse().expect("cidr")));
    let mut stranger = connect_from(OTHER, h.reg);
    h.until_refused(Listener::Registration, Refused::Allow, 1);
    assert!(ended_without_a_byte(&mut stranger));
    assert_eq!(h.states(), Vec::<&str>::new());
    let (_control, mut lines, port) = h.app();
    let _client = connect(local(port));
    h.until("waiting", |s| s.contains(&"AwaitingDialIn"));
    let (dial_port, _) = dial_line(&mut lines);
    let mut intruder = connect_from(OTHER, local(dial_port));
    h.until_refused(Listener::DialIn, Refused::Allow, 1);
    assert!(ended_without_a_byte(&mut intruder));
    assert_eq!(h.states(), ["App", "AwaitingDialIn"]);
    let _dial_in = connect(local(dial_port));
    h.until("the pipe", |s| s.contains(&"Piping"));
}

/// (none) => (none): a client not in `--allow-clients` is reset before it
/// is an entry and before its app hears of it; a listed one waits.
#[test]
fn a_client_not_on_the_allow_list_is_reset_at_once() {
    let mut h = Harness::new(|c| c.allow_clients = Some("127.0.0.2/32".parse().expect("cidr")));
    let (_control, mut lines, port) = h.app();
    let mut stranger = connect(local(port));
    h.until_refused(Listener::Relayed, Refused::Allow, 1);
    assert!(ended_without_a_byte(&mut stranger));
    assert_eq!(h.states(), ["App"]);
    let _listed = connect_from(OTHER, local(port));
    h.until("waiting", |s| s.contains(&"AwaitingDialIn"));
    dial_line(&mut lines); // the first dial line is the listed client's
}

/// (none) => (none): beyond its burst, a source's clients are reset; the
/// bucket refills at the rate, and other sources have buckets of their own.
#[test]
fn clients_over_the_rate_are_reset_until_their_bucket_refills() {
    let mut h = Harness::new(|c| {
        c.client_rate = Some(RateLimit::new(
            "1/s".parse().expect("rate"),
            NonZeroU32::new(2),
        ));
    });
    let (_control, _lines, port) = h.app();
    let start = Instant::now();
    let _first = connect(local(port));
    let _second = connect(local(port));
    h.until("two waiting", |s| {
        s.iter().filter(|&&n| n == "AwaitingDialIn").count() == 2
    });
    let mut third = connect(local(port));
    h.until_refused(Listener::Relayed, Refused::Rate, 1);
    assert!(ended_without_a_byte(&mut third));
    let _other = connect_from(OTHER, local(port));
    h.until("another source", |s| {
        s.iter().filter(|&&n| n == "AwaitingDialIn").count() == 3
    });
    // A second later by the relay's clock, one more token.
    let _fourth = connect(local(port));
    let later = start + Duration::from_millis(1500);
    let deadline = Instant::now() + PATIENCE;
    while h.count("AwaitingDialIn") < 4 {
        assert!(
            Instant::now() < deadline,
            "the refilled token never admitted it"
        );
        h.turn_at(later);
    }
    assert_eq!(
        h.core
            .metrics
            .refused_count(Listener::Relayed, Refused::Rate),
        1
    );
}

/// App => App: an app's `allow` and `rate` requests are answered with what
/// will apply (its rate made no looser than the relay's) and applied to its
/// port on top of the relay's own checks.
#[test]
fn an_app_may_tighten_who_connects_but_never_loosen_it() {
    let mut h = Harness::new(|c| {
        c.client_rate = Some(RateLimit::new("2/s".parse().expect("rate"), None));
    });
    let (mut control, mut lines, port) = h.app();
    control
        .write_all(b"allow 127.0.0.2\nrate 100/s 50\n")
        .expect("ask");
    h.until("answered", |_| true);
    assert_eq!(line(&mut lines), "allow 127.0.0.2/32\n");
    assert_eq!(
        line(&mut lines),
        "rate 2/s 2\n",
        "the relay's stricter limit"
    );
    let mut stranger = connect(local(port));
    h.until_refused(Listener::Relayed, Refused::Allow, 1);
    assert!(ended_without_a_byte(&mut stranger));
    let _a = connect_from(OTHER, local(port));
    let _b = connect_from(OTHER, local(port));
    h.until("two waiting", |s| {
        s.iter().filter(|&&n| n == "AwaitingDialIn").count() == 2
    });
    let mut over = connect_from(OTHER, local(port));
    h.until_refused(Listener::Relayed, Refused::Rate, 1);
    assert!(ended_without_a_byte(&mut over));
}

/// App => closed: an `allow` or `rate` request that does not parse is
/// refused with its own reason.
#[test]
fn a_bad_allow_or_rate_request_is_refused() {
    for (request, reason) in [
        ("allow 10.0.0.0/33\n", "error bad allow request: "),
        ("allow \n", "error bad allow request: "),
        ("rate 0/s\n", "error bad rate request: "),
        ("rate 5/h 2\n", "error bad rate request: "),
    ] {
        let mut h = Harness::new(|_| {});
        let (mut control, mut lines, _) = h.app();
        control.write_all(request.as_bytes()).expect("ask");
        h.until("refused", <[&str]>::is_empty);
        let answer = line(&mut lines);
        assert!(answer.starts_with(reason), "{request:?}: {answer:?}");
    }
}
