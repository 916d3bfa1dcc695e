//! Fuzzes the app's control client (`tcp_relay::client`): fed any bytes, it
//! never panics, says the same fed whole or in fuzzer-chosen chunks, and
//! keeps its promises: one greeting at most, before `Registered`; one
//! `Registered` at most, on the established line that completes the
//! registration; `ExtraEstablished` only after it; one `Failed` at most,
//! last; and its phase agrees.
//!
//! Input layout: a header byte `h`: bit 0 asks for a port, bit 1 gives a
//! secret, bits 2..=4 a `ready` count; then `h >> 5` chunk sizes (0 is an
//! empty feed; they repeat in turn); then the relay's bytes.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tcp_relay::client::{Client, Event, Failure, Phase, Registration};
use tcp_relay::Secret;
use tcp_relay::protocol::parse_established;

fuzz_target!(|data: &[u8]| {
    let Some((&header, rest)) = data.split_first() else {
        return;
    };
    let registration = Registration {
        port: (header & 1 != 0).then_some(9000),
        secret: (header & 2 != 0).then(|| Secret(b"s".to_vec())),
        ready: usize::from((header >> 2) & 7),
    };
    let (sizes, stream) = rest.split_at(usize::from(header >> 5).min(rest.len()));
    let whole = run(&registration, &[stream]);
    let chunks = chunks(stream, sizes);
    assert_eq!(
        run(&registration, &chunks),
        whole,
        "fed in chunks of {sizes:?}"
    );
    check_promises(&registration, stream, &whole.0, whole.1);
});

fn run(registration: &Registration, chunks: &[&[u8]]) -> (Vec<Event>, Phase) {
    let mut client = Client::new(registration.clone());
    let events = chunks.iter().flat_map(|chunk| client.feed(chunk)).collect();
    (events, client.phase())
}

/// `stream` cut into pieces of the given sizes in turn (all zero: whole).
fn chunks<'a>(stream: &'a [u8], sizes: &[u8]) -> Vec<&'a [u8]> {
    if sizes.iter().all(|&s| s == 0) {
        return vec![stream];
    }
    let mut out = Vec::new();
    let mut rest = stream;
    for &size in sizes.iter().cycle() {
        if rest.is_empty() {
            break;
        }
        let (chunk, tail) = rest.split_at(usize::from(size).min(rest.len()));
        out.push(chunk);
        rest = tail;
    }
    out
}

fn check_promises(registration: &Registration, stream: &[u8], events: &[Event], phase: Phase) {
    let at = |want: fn(&Event) -> bool| events.iter().position(want);
    let count = |want: fn(&Event) -> bool| events.iter().filter(|e| want(e)).count();
    let registered = at(|e| matches!(e, Event::Registered(_)));
    assert!(count(|e| matches!(e, Event::Send(_))) <= 1);
    assert!(count(|e| matches!(e, Event::Registered(_))) <= 1);
    assert!(count(|e| matches!(e, Event::Failed(_))) <= 1);
    if let Some(send) = at(|e| matches!(e, Event::Send(_))) {
        assert!(registered.is_none_or(|r| send < r));
    }
    if let Some(extra) = at(|e| matches!(e, Event::ExtraEstablished(_))) {
        assert!(registered.is_some_and(|r| r < extra));
    }
    let failed = at(|e| matches!(e, Event::Failed(_)));
    if let Some(failed) = failed {
        assert_eq!(failed, events.len() - 1, "nothing after a failure");
        assert_eq!(phase, Phase::Failed);
    }
    if let Some(Event::Failed(Failure::NoSecret)) = failed.map(|f| &events[f]) {
        assert!(registration.secret.is_none());
    }
    let Some(Event::Registered(port)) = registered.map(|r| &events[r]) else {
        return;
    };
    // The established line that completes the registration: the first, or
    // the second after a port request (lines as `LineReader` frames them).
    let needed = 1 + usize::from(registration.port.is_some());
    let completing = String::from_utf8_lossy(stream)
        .split('\n')
        .filter_map(|line| parse_established(line.strip_suffix('\r').unwrap_or(line)).ok())
        .nth(needed - 1);
    assert_eq!(Some(*port), completing);
    if failed.is_none() {
        assert_eq!(phase, Phase::Registered(*port));
    }
}
