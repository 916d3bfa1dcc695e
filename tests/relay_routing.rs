//! End to end: which app a client reaches, how relayed ports are chosen,
//! many clients at once, and the relay's own lifetime.

mod common;

use std::thread;

use common::*;
use tcp_relay::RelayStyle;

/// Many clients of one app at once each get their own dial-in: 100 clients
/// (more than the relay accepts per turn, so its accept requeue is used)
/// connect before any of them sends, then all exchange distinct data in
/// parallel, and each gets back exactly its own bytes.
#[test]
fn a_hundred_concurrent_clients_each_get_their_own_bytes_back() {
    const CLIENTS: usize = 100;
    let relay = start_relay();
    let app = TestApp::register(relay.reg_addr()).serve(echo);
    let clients: Vec<_> = (0..CLIENTS).map(|_| connect(app.relayed_addr())).collect();
    wait_for_stats(&relay, "every client is paired", |s| s.pipes == CLIENTS);
    thread::scope(|scope| {
        for (i, client) in clients.into_iter().enumerate() {
            scope.spawn(move || {
                let request = Pattern::new(i as u64).bytes(0, 32 * 1024 + i);
                let reply = exchange_on(client, &request);
                assert!(
                    reply == request,
                    "client {i} got {} bytes that are not its own",
                    reply.len()
                );
            });
        }
    });
    assert_eq!(app.served(), CLIENTS, "one dial line per client");
    assert_no_leftovers(&relay);
}

/// Two apps get two relayed ports, and a client reaches the app whose port
/// it connected to: one app echoes, the other upper-cases, and each client
/// sees its own app's answer.
#[test]
fn two_apps_have_their_own_ports_and_their_own_clients() {
    let relay = start_relay();
    let plain = TestApp::register(relay.reg_addr()).serve(echo);
    let upper = TestApp::register(relay.reg_addr()).serve(echo_upper);
    assert_ne!(plain.relayed_port, upper.relayed_port);
    wait_for_stats(&relay, "two apps are registered", |s| s.apps == 2);
    for round in 0..3 {
        let message = format!("hello from round {round}");
        assert_eq!(
            exchange(plain.relayed_addr(), message.as_bytes()),
            message.as_bytes()
        );
        assert_eq!(
            exchange(upper.relayed_addr(), message.as_bytes()),
            message.to_uppercase().as_bytes()
        );
    }
    assert_eq!(
        (plain.served(), upper.served()),
        (3, 3),
        "each app dialled in for its own clients only"
    );
    assert_no_leftovers(&relay);
}

/// Increment style (the default): each app gets a port above the
/// registration port, and a later app a higher one while the first holds its.
#[test]
fn increment_style_gives_rising_ports_above_the_registration_port() {
    let relay = start_relay_with(|c| c.relay_style = RelayStyle::Increment);
    let reg_port = relay.reg_addr().port();
    let first = TestApp::register(relay.reg_addr()).serve(echo);
    let second = TestApp::register(relay.reg_addr()).serve(echo);
    assert!(
        first.relayed_port > reg_port,
        "{} <= reg port {reg_port}",
        first.relayed_port
    );
    assert!(
        second.relayed_port > first.relayed_port,
        "{} <= {}",
        second.relayed_port,
        first.relayed_port
    );
    assert_eq!(exchange(first.relayed_addr(), b"first"), b"first");
    assert_eq!(exchange(second.relayed_addr(), b"second"), b"second");
    assert_no_leftovers(&relay);
}

/// Random style: the OS picks the relayed port, and it works.
#[test]
fn random_style_gives_a_working_port() {
    let relay = start_relay_with(|c| c.relay_style = RelayStyle::Random);
    let app = TestApp::register(relay.reg_addr()).serve(echo);
    assert_ne!(app.relayed_port, 0);
    assert_ne!(app.relayed_port, relay.reg_addr().port());
    assert_eq!(exchange(app.relayed_addr(), b"random"), b"random");
    assert_no_leftovers(&relay);
}

/// Dropping the running relay closes its registration port and every
/// relayed port it opened.
#[test]
fn stopping_the_relay_closes_its_ports() {
    let relay = start_relay();
    let reg_addr = relay.reg_addr();
    let app = TestApp::register(reg_addr);
    let relayed = app.relayed_addr();
    drop(relay);
    assert_refused(reg_addr);
    assert_refused(relayed);
    app.wait_control_closed();
}
