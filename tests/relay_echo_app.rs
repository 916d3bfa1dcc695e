//! End to end: the sample echo app (`tcp_relay::EchoApp`) behind the relay.

mod common;

use std::io::Write;
use std::net::Shutdown;
use std::thread;

use common::*;
use tcp_relay::EchoApp;

/// A client of the echo app gets each message back in turn; after it shuts
/// its write half, it still reads everything it sent, then EOF.
#[test]
fn echo_through_the_relay() {
    let relay = start_relay();
    let echo = EchoApp::connect(relay.reg_addr())
        .expect("register the echo app")
        .spawn()
        .expect("spawn the echo app");
    let mut client = connect(local(echo.relayed_port()));
    for i in 0..5 {
        let message = format!("message {i}: {}\n", "x".repeat(i * 100));
        client
            .write_all(message.as_bytes())
            .expect("send a message");
        assert_eq!(read_exactly(&mut client, message.len()), message.as_bytes());
    }
    // Sent from a thread: the echo comes back while the tail is still going out.
    let tail = Pattern::new(9).bytes(0, 4 * 1024 * 1024);
    let mut writer = client.try_clone().expect("clone the client stream");
    let sent = tail.clone();
    let sender = thread::spawn(move || {
        writer.write_all(&sent).expect("send the tail");
        writer
            .shutdown(Shutdown::Write)
            .expect("shut down the client's writes");
    });
    assert!(
        read_to_eof(&mut client) == tail,
        "the tail comes back whole, then EOF"
    );
    sender.join().expect("the sender panicked");
    assert_no_leftovers(&relay);
    assert_eq!(relay.stats().apps, 1);
    drop(echo);
    wait_for_stats(&relay, "the echo app is gone", |s| s.apps == 0);
}
