//! Tests per state transition: the agent's handler driven turn by turn on
//! the test's own thread, against a fake relay and a local service made of
//! blocking `std` sockets. Time is passed in: a deadline fires by running
//! a turn "later".

use std::io::{BufReader, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use mio::{Events, Poll};

use super::core::AgentCore;
use super::{AgentConfig, AgentError, Service};
use crate::reactor::Handler;
use crate::table::State;

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
/// Longest any blocking socket call or any awaited condition may take.
const PATIENCE: Duration = Duration::from_secs(10);

/// An agent handler and the poll that feeds it, on this thread.
struct Harness {
    poll: Poll,
    events: Events,
    core: AgentCore,
}

impl Harness {
    fn new(relay: SocketAddr, service: Service, tweak: impl FnOnce(&mut AgentConfig)) -> Harness {
        let mut config = AgentConfig {
            splice: false,
            ..AgentConfig::new(relay.to_string(), service)
        };
        tweak(&mut config);
        let poll = Poll::new().expect("a poll");
        let registry = poll.registry().try_clone().expect("a registry");
        Harness {
            core: AgentCore::new(config, registry),
            poll,
            events: Events::with_capacity(64),
        }
    }

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

    fn states(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.core.table.iter().map(|(_, c)| c.name()).collect();
        names.sort_unstable();
        names
    }
}

/// A fake relay: a registration listener the test accepts from.
struct FakeRelay {
    listener: TcpListener,
}

impl FakeRelay {
    fn new() -> FakeRelay {
        FakeRelay {
            listener: TcpListener::bind((LOCALHOST, 0)).expect("bind"),
        }
    }

    fn addr(&self) -> SocketAddr {
        self.listener.local_addr().expect("addr")
    }

    /// Accepts the agent's control connection (once its connect is in).
    fn accept(&self) -> (TcpStream, BufReader<TcpStream>) {
        let (stream, _) = self.listener.accept().expect("accept");
        stream.set_read_timeout(Some(PATIENCE)).expect("timeout");
        let lines = BufReader::new(stream.try_clone().expect("clone"));
        (stream, lines)
    }
}

fn registered(h: &mut Harness, relay: &FakeRelay, port: u16) -> TcpStream {
    h.until("connecting", |s| {
        s == ["Connecting"] || s == ["Registering"]
    });
    let (mut control, _) = relay.accept();
    h.until("registering", |s| s == ["Registering"]);
    let line = format!("established relay address port:{port}\n");
    control.write_all(line.as_bytes()).expect("established");
    h.until("registered", |s| s == ["Registered"]);
    control
}

fn echo_service() -> (TcpListener, SocketAddr) {
    let listener = TcpListener::bind((LOCALHOST, 0)).expect("bind");
    let addr = listener.local_addr().expect("addr");
    (listener, addr)
}

/// Reconnecting => Connecting => Registering => Registered.
#[test]
fn a_registration_connects_registers_and_learns_its_port() {
    let relay = FakeRelay::new();
    let mut h = Harness::new(relay.addr(), Service::Echo, |_| {});
    assert_eq!(h.states(), ["Reconnecting"]);
    let _control = registered(&mut h, &relay, 4242);
    assert_eq!(h.core.relayed_port(), Some(4242));
}

/// Registered => Reconnecting when the relay closes; => Connecting again
/// once the back-off (at most 250 ms the first time) has passed.
#[test]
fn a_lost_relay_is_reconnected_after_a_back_off() {
    let relay = FakeRelay::new();
    let mut h = Harness::new(relay.addr(), Service::Echo, |_| {});
    let control = registered(&mut h, &relay, 4242);
    drop(control);
    h.until("reconnecting", |s| s == ["Reconnecting"]);
    assert_eq!(h.core.relayed_port(), None);
    h.turn_at(Instant::now() + Duration::from_millis(300));
    assert!(matches!(h.states()[..], ["Connecting"] | ["Registering"]));
}

/// Registering => Reconnecting after a refusal that may pass; a refusal
/// that stands ends the agent instead.
#[test]
fn refusals_are_retried_or_final_by_their_code() {
    let relay = FakeRelay::new();
    let mut h = Harness::new(relay.addr(), Service::Echo, |_| {});
    h.until("connecting", |s| s != ["Reconnecting"]);
    let (mut control, _) = relay.accept();
    control.write_all(b"error too many apps\n").expect("refuse");
    h.until("reconnecting", |s| s == ["Reconnecting"]);
    assert!(h.core.failure.is_none());
    h.turn_at(Instant::now() + Duration::from_millis(300));
    h.until("connecting again", |s| s != ["Reconnecting"]);
    let (mut control, _) = relay.accept();
    control
        .write_all(b"error secret refused\n")
        .expect("refuse");
    h.until("given up", |_| true);
    while h.core.failure.is_none() {
        h.turn_at(Instant::now());
    }
    assert!(matches!(&h.core.failure, Some(AgentError::Refused(r)) if r.contains("secret")));
}

/// Registering => Reconnecting when the relay says nothing in time.
#[test]
fn a_registration_that_takes_too_long_is_retried() {
    let relay = FakeRelay::new();
    let mut h = Harness::new(relay.addr(), Service::Echo, |_| {});
    h.until("registering", |s| s == ["Registering"]);
    let (_control, _) = relay.accept();
    h.turn_at(Instant::now() + Duration::from_secs(11));
    assert_eq!(h.states(), ["Reconnecting"]);
}

/// (none) => Dialing => Piping: a dial line makes a dial-in and a local
/// connection, then pipes them.
#[test]
fn a_dial_line_is_served_by_piping_to_the_local_service() {
    let relay = FakeRelay::new();
    let (service, addr) = echo_service();
    let mut h = Harness::new(relay.addr(), Service::Forward(addr), |_| {});
    let mut control = registered(&mut h, &relay, 4242);
    let dial = TcpListener::bind((LOCALHOST, 0)).expect("bind");
    let line = format!("{}\n", dial.local_addr().expect("addr").port());
    control.write_all(line.as_bytes()).expect("dial line");
    h.until("piping", |s| s.contains(&"Piping"));
    let (mut dial_in, _) = dial.accept().expect("the dial-in");
    let (mut local, _) = service.accept().expect("the local connection");
    dial_in.write_all(b"to the service").expect("write");
    h.until("moved", |_| true);
    let mut got = [0u8; 14];
    local.set_read_timeout(Some(PATIENCE)).expect("timeout");
    local.read_exact(&mut got).expect("read");
    assert_eq!(&got, b"to the service");
}

/// Piping => Flushing => closed: a client done while the relay's side has
/// not acknowledged every byte the service sent keeps its sockets until it
/// has (a close would leave them to an orphan, which the kernel resets when
/// TCP memory runs short); the relay's side gets every byte and the end.
#[test]
fn a_client_done_before_the_relay_has_every_byte_waits_for_it() {
    let relay = FakeRelay::new();
    let (service, addr) = echo_service();
    let mut h = Harness::new(relay.addr(), Service::Forward(addr), |_| {});
    let mut control = registered(&mut h, &relay, 4242);
    // Accepted dial-ins inherit a receive window too small for 8 KiB.
    let dial =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("a socket");
    dial.set_recv_buffer_size(1024).expect("a small window");
    dial.bind(&SocketAddr::new(LOCALHOST, 0).into())
        .expect("bind");
    dial.listen(8).expect("listen");
    let dial = TcpListener::from(dial);
    let line = format!("{}\n", dial.local_addr().expect("addr").port());
    control.write_all(line.as_bytes()).expect("dial line");
    h.until("piping", |s| s.contains(&"Piping"));
    let (mut dial_in, _) = dial.accept().expect("the dial-in");
    let (mut local, _) = service.accept().expect("the local connection");
    let sent: Vec<u8> = (0..8192u32).map(|i| (i % 253) as u8).collect();
    dial_in
        .shutdown(std::net::Shutdown::Write)
        .expect("the client ends");
    local.write_all(&sent).expect("the service's last bytes");
    local
        .shutdown(std::net::Shutdown::Write)
        .expect("the service ends");
    h.until("flushing", |s| s.contains(&"Flushing"));
    h.turn_at(Instant::now() + Duration::from_secs(1));
    assert!(
        h.states().contains(&"Flushing"),
        "kept while nothing is read"
    );
    let mut got = Vec::new();
    dial_in.set_read_timeout(Some(PATIENCE)).expect("timeout");
    dial_in
        .read_to_end(&mut got)
        .expect("every byte, then the end");
    assert_eq!(got, sent);
    h.until("closed once delivered", |s| s == ["Registered"]);
}

/// (none) => Dialing => Echoing for the sample app.
#[test]
fn a_dial_line_of_the_echo_app_is_echoed() {
    let relay = FakeRelay::new();
    let mut h = Harness::new(relay.addr(), Service::Echo, |_| {});
    let mut control = registered(&mut h, &relay, 4242);
    let dial = TcpListener::bind((LOCALHOST, 0)).expect("bind");
    let line = format!("{}\n", dial.local_addr().expect("addr").port());
    control.write_all(line.as_bytes()).expect("dial line");
    h.until("echoing", |s| s.contains(&"Echoing"));
    let (mut dial_in, _) = dial.accept().expect("the dial-in");
    dial_in.write_all(b"ping").expect("write");
    h.until("echoed", |_| true);
    let mut got = [0u8; 4];
    dial_in.set_read_timeout(Some(PATIENCE)).expect("timeout");
    dial_in.read_exact(&mut got).expect("read");
    assert_eq!(&got, b"ping");
}

/// Dialing => closed when the local service refuses: the dial-in still
/// connects and is then reset, so the relay learns at once.
#[test]
fn a_client_whose_local_service_refuses_is_reset() {
    let relay = FakeRelay::new();
    let dead = {
        let probe = TcpListener::bind((LOCALHOST, 0)).expect("probe");
        probe.local_addr().expect("addr")
    };
    let mut h = Harness::new(relay.addr(), Service::Forward(dead), |_| {});
    let mut control = registered(&mut h, &relay, 4242);
    let dial = TcpListener::bind((LOCALHOST, 0)).expect("bind");
    let line = format!("{}\n", dial.local_addr().expect("addr").port());
    control.write_all(line.as_bytes()).expect("dial line");
    h.until("the client closed", |s| s == ["Registered"]);
    let (mut dial_in, _) = dial.accept().expect("the dial-in still came");
    dial_in.set_read_timeout(Some(PATIENCE)).expect("timeout");
    let mut byte = [0u8; 1];
    assert!(dial_in.read(&mut byte).is_err(), "reset, not a clean end");
}

/// Dialing => closed at the connect deadline: a local service whose host
/// never answers the SYN (here: a listener whose queue is full).
#[test]
fn a_client_whose_connects_take_too_long_is_reset_at_the_deadline() {
    use socket2::{Domain, Socket, Type};
    let relay = FakeRelay::new();
    let full = Socket::new(Domain::IPV4, Type::STREAM, None).expect("socket");
    full.bind(&SocketAddr::new(LOCALHOST, 0).into())
        .expect("bind");
    full.listen(0).expect("listen");
    let addr = full.local_addr().expect("addr").as_socket().expect("inet");
    let _fill = TcpStream::connect(addr).expect("fill the queue");
    let mut h = Harness::new(relay.addr(), Service::Forward(addr), |_| {});
    let mut control = registered(&mut h, &relay, 4242);
    let dial = TcpListener::bind((LOCALHOST, 0)).expect("bind");
    let line = format!("{}\n", dial.local_addr().expect("addr").port());
    control.write_all(line.as_bytes()).expect("dial line");
    h.until("dialing", |s| s.contains(&"Dialing"));
    h.turn_at(Instant::now() + Duration::from_secs(11));
    assert_eq!(h.states(), ["Registered"]);
}

/// Dial lines beyond `max_clients` wait, and are served in order as
/// clients leave.
#[test]
fn dial_lines_beyond_max_clients_wait_their_turn() {
    let relay = FakeRelay::new();
    let mut h = Harness::new(relay.addr(), Service::Echo, |c| c.max_clients = Some(1));
    let mut control = registered(&mut h, &relay, 4242);
    let dial = TcpListener::bind((LOCALHOST, 0)).expect("bind");
    let line = format!("{}\n", dial.local_addr().expect("addr").port());
    control
        .write_all(line.repeat(2).as_bytes())
        .expect("two dial lines");
    h.until("one echoing", |s| s.contains(&"Echoing"));
    let (first, _) = dial.accept().expect("the first dial-in");
    assert_eq!(h.core.queued.len(), 1, "the second waits");
    drop(first);
    h.until("the second served", |_| true);
    while h.core.queued.len() == 1 {
        h.turn_at(Instant::now());
    }
    h.until("the second echoing", |s| {
        s.contains(&"Echoing") || s.contains(&"Dialing")
    });
    let _second = dial.accept().expect("the second dial-in");
}

/// With `proxy_protocol`, registration waits for the relay's `proxy`
/// answer; a relay that ignores the request (an old one) is left at the
/// registration deadline instead of leaving the local service to choke on
/// dial-ins without headers.
#[test]
fn a_proxy_request_registers_only_once_answered() {
    use crate::ProxyVersion;
    let relay = FakeRelay::new();
    let mut h = Harness::new(relay.addr(), Service::Echo, |c| {
        c.services[0].proxy_protocol = Some(ProxyVersion::V2);
    });
    h.until("registering", |s| s == ["Registering"]);
    let (mut control, mut lines) = relay.accept();
    control
        .write_all(b"established relay address port:4242\n")
        .expect("established");
    h.turn_at(Instant::now());
    let mut asked = String::new();
    std::io::BufRead::read_line(&mut lines, &mut asked).expect("the request");
    assert_eq!(asked, "proxy v2\n");
    h.turn_at(Instant::now());
    assert_eq!(h.states(), ["Registering"], "not without the answer");
    control.write_all(b"proxy v2\n").expect("answer");
    h.until("registered", |s| s == ["Registered"]);
    assert_eq!(h.core.relayed_port(), Some(4242));

    let relay = FakeRelay::new();
    let mut h = Harness::new(relay.addr(), Service::Echo, |c| {
        c.services[0].proxy_protocol = Some(ProxyVersion::V1);
    });
    h.until("registering", |s| s == ["Registering"]);
    let (mut control, _) = relay.accept();
    control
        .write_all(b"established relay address port:4242\n")
        .expect("established, and nothing more: an old relay");
    h.turn_at(Instant::now());
    h.turn_at(Instant::now() + Duration::from_secs(11));
    assert_eq!(h.states(), ["Reconnecting"]);
}
