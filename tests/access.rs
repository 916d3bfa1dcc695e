//! Who may connect (issue 13), end to end against the real binary: allow
//! lists for apps and clients, and the per-source rate limit, with peers
//! bound to other loopback addresses (127.0.0.2, 127.0.0.3, 127.0.1.x).
//! A refused peer gets nothing and the relay keeps no descriptor for it
//! (counted in `/proc/<pid>/fd`); a flood from 10,000 source ports on one
//! address and from 200 addresses leaves the relay's memory where it was
//! (`VmRSS`) and its legitimate clients served.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::daemons::free_port;
use common::procs::RelayProcess;
use common::*;
use tcp_relay::{Agent, AgentConfig, EchoApp, RateLimit, Service};

const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2));
const STRANGER: IpAddr = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 3));

/// A relay process on 127.0.0.1 with `flags` and a status endpoint; its
/// registration address. Ports picked free may be taken before the relay
/// binds them (tests run in parallel): then again, with others.
fn start_relay_process(flags: &[&str]) -> (RelayProcess, SocketAddr) {
    for _ in 0..5 {
        let reg = local(free_port());
        let reg_port = reg.port().to_string();
        let mut args = vec!["--bind", "127.0.0.1", "--reg-port", &reg_port];
        args.extend(["--relay-style", "random"]);
        args.extend(flags);
        if let Some(relay) = RelayProcess::try_start(&args, local(free_port())) {
            return (relay, reg);
        }
    }
    panic!("no relay started in five tries: its ports taken each time");
}

/// An echo app registered from 127.0.0.1, on its own thread.
fn echo_app(reg: SocketAddr) -> (tcp_relay::RunningEcho, SocketAddr) {
    let app = EchoApp::connect(reg).expect("the echo app registers");
    let port = app.relayed_port();
    (app.spawn().expect("spawn the app"), local(port))
}

/// Whether a client from `source` is echoed.
fn echoed_from(source: IpAddr, addr: SocketAddr) -> bool {
    let Ok(mut stream) = connect_from(source, addr) else {
        return false;
    };
    let mut got = [0u8; 5];
    stream.write_all(b"hello").is_ok() && stream.read_exact(&mut got).is_ok() && &got == b"hello"
}

/// A connection from `source` that the relay turns away: it reads nothing
/// before the end (the reset may even beat the end of our connect). The
/// socket, if any, stays open on our side.
fn turned_away_from(source: IpAddr, addr: SocketAddr) -> Option<TcpStream> {
    let mut stream = match connect_from(source, addr) {
        Ok(stream) => stream,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
        Err(e) => panic!("connect from {source}: {e}"),
    };
    let (_, bytes) = read_until_closed(&mut stream);
    assert_eq!(bytes, 0, "a refused peer from {source} got bytes");
    Some(stream)
}

/// Polls until the relay holds at most `count` descriptors (it may hold
/// fewer: kernel pipes kept for splicing are let go when idle).
fn until_descriptors_at_most(relay: &RelayProcess, count: usize) {
    let deadline = Instant::now() + WAIT;
    while relay.descriptors() > count {
        assert!(
            Instant::now() < deadline,
            "the relay holds {} descriptors, more than {count}",
            relay.descriptors()
        );
        std::thread::sleep(Duration::from_millis(5)); // a poll interval: re-checked
    }
}

/// Apps and clients from unlisted sources get nothing, and once refused
/// cost the relay no descriptor, even while they keep their end open;
/// listed ones are served.
#[test]
fn refused_peers_get_nothing_and_cost_no_descriptor() {
    let (relay, reg) =
        start_relay_process(&["--allow-apps", "127.0.0.1", "--allow-clients", "127.0.0.2"]);
    let (_app, public) = echo_app(reg);
    assert!(echoed_from(CLIENT, public), "a listed client is served");
    wait_until("the served client is gone", || {
        relay.metric("tcp_relay_pipes") == 0.0
    });
    let settled = relay.descriptors();

    let mut held = Vec::new();
    for _ in 0..200 {
        held.push(turned_away_from(STRANGER, public));
        held.push(turned_away_from(LOCALHOST, public));
    }
    for _ in 0..50 {
        held.push(turned_away_from(STRANGER, reg));
    }
    until_descriptors_at_most(&relay, settled);
    let refused = |listener: &str| {
        let sample = format!(
            "tcp_relay_connections_refused_total{{listener=\"{listener}\",reason=\"allow_list\"}}"
        );
        relay.metric(&sample)
    };
    assert_eq!(refused("relayed"), 400.0);
    assert_eq!(refused("registration"), 50.0);
    assert!(echoed_from(CLIENT, public), "still served");
    drop(held);
}

/// Beyond the burst a source's clients are turned away; other sources
/// have buckets of their own.
#[test]
fn clients_beyond_the_burst_get_nothing() {
    let (relay, reg) = start_relay_process(&["--client-rate", "1/m", "--client-burst", "3"]);
    let (_app, public) = echo_app(reg);
    for i in 0..3 {
        assert!(echoed_from(CLIENT, public), "client {i} within the burst");
    }
    let _refused = turned_away_from(CLIENT, public);
    assert!(echoed_from(STRANGER, public), "another source is served");
    let sample = "tcp_relay_connections_refused_total{listener=\"relayed\",reason=\"rate\"}";
    assert_eq!(relay.metric(sample), 1.0);
}

/// 10,000 connections from one address (10,000 source ports) and 20 from
/// each of 200 addresses, against a limit of 5 per source: nearly all are
/// refused, the relay's memory stays where it was, its table of sources
/// holds one entry per address, and a client from elsewhere is served.
#[test]
fn a_flood_of_sources_keeps_the_relay_small() {
    let (relay, reg) = start_relay_process(&["--client-rate", "5/s", "--client-burst", "5"]);
    let (_app, public) = echo_app(reg);
    assert!(echoed_from(LOCALHOST, public));
    let before = relay.rss_kib();
    for _ in 0..10_000 {
        knock(CLIENT, public);
    }
    for host in 1..=200u8 {
        for _ in 0..20 {
            knock(IpAddr::V4(Ipv4Addr::new(127, 0, 1, host)), public);
        }
    }
    let refused =
        relay.metric("tcp_relay_connections_refused_total{listener=\"relayed\",reason=\"rate\"}");
    // At most a burst and a few seconds' refills of each source got in.
    assert!(refused >= 10_000.0, "only {refused} refused");
    let sources = relay.metric("tcp_relay_rate_limited_sources");
    assert!(sources <= 202.0, "{sources} sources tracked");
    let after = relay.rss_kib();
    eprintln!("flood: {refused} refused, {sources} sources, RSS {before} -> {after} KiB");
    assert!(
        after <= before + 8 * 1024,
        "RSS grew from {before} KiB to {after} KiB"
    );
    assert!(echoed_from(STRANGER, public), "a client from elsewhere");
}

/// Connects from `source` and closes at once (with a reset, leaving no
/// TIME_WAIT behind to exhaust the source's ports).
fn knock(source: IpAddr, addr: SocketAddr) {
    if let Ok(stream) = connect_from(source, addr) {
        set_reset_on_drop(&stream);
    }
}

/// An agent asking, for its service, clients only from 127.0.0.2 and a
/// rate looser than the relay's own: strangers are turned away, and the
/// relay's stricter rate is what applies.
#[test]
fn an_app_narrows_who_reaches_its_port_but_cannot_widen_it() {
    let relay_limit = RateLimit::new("3/m".parse().expect("a rate"), None);
    let relay = start_relay_with(|c| c.client_rate = Some(relay_limit));
    let mut config = AgentConfig::new(relay.reg_addr().to_string(), Service::Echo);
    config.services[0].allow_clients = Some("127.0.0.2".parse().expect("a list"));
    config.services[0].client_rate = Some(RateLimit::new("100/s".parse().expect("a rate"), None));
    let mut agent = Agent::new(config).expect("an agent");
    let port = agent
        .register()
        .expect("registered: both requests answered");
    let _agent = agent.spawn().expect("spawn the agent");
    let public = local(port);
    let _stranger = turned_away_from(STRANGER, public);
    let _local = turned_away_from(LOCALHOST, public);
    for i in 0..3 {
        assert!(
            echoed_from(CLIENT, public),
            "client {i} within the relay's burst"
        );
    }
    let _over = turned_away_from(CLIENT, public);
}
