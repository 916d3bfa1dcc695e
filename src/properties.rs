//! Property tests for the pure parts of the relay: the ring buffer against a
//! `VecDeque` model, the line framer against a split-anywhere oracle, and the
//! control-line parsers and formatters (issue 5, "Proof"), the relay's
//! refusal codes and the app's control client (issue 10).
//!
//! Everything here is pure (no sockets, no time), so each property runs
//! proptest's default 256 cases in well under a second in the debug profile.
//! The same models back the cargo-fuzz targets in `fuzz/`.

use std::collections::VecDeque;

use crate::auth::{DialToken, TOKEN_LEN, TOKEN_LINE_LEN};
use crate::client::{Client, Event, Failure, Phase, Registration};
use crate::config::Secret;
use crate::protocol::{
    AppLine, ESTABLISHED_PREFIX, LineReader, MAX_LINE, ProtocolError, Refusal, RelayLine,
    auth_line, challenge_line, dial_line, error_line, established_line, parse_app_line, parse_dial,
    parse_established, parse_port, parse_relay_line, parse_token_line, port_request_line,
    token_line,
};
use crate::ring::RingBuffer;
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

// ---------------------------------------------------------------------------
// RingBuffer against VecDeque<u8>
// ---------------------------------------------------------------------------

/// One operation on a ring, with everything its closure will do decided up
/// front so a failing case shrinks and replays.
#[derive(Debug, Clone)]
enum RingOp {
    /// `enqueue_slice` of these bytes.
    EnqueueSlice(Vec<u8>),
    /// `dequeue_slice` into a buffer of this size.
    DequeueSlice(usize),
    /// `enqueue_with`: the closure fills all the offered space with bytes
    /// counting up from `seed`, then reports `count` written, or fails.
    EnqueueWith { seed: u8, count: usize, fail: bool },
    /// `dequeue_with`: the closure reports `count` consumed, or fails.
    DequeueWith { count: usize, fail: bool },
    /// `clear`.
    Clear,
}

/// Counts a closure reports: small ones, ones around every capacity tried
/// (1..=64), and absurd ones the ring must clamp.
fn reported_count() -> impl Strategy<Value = usize> {
    prop_oneof![0usize..=4, 0usize..=80, Just(usize::MAX)]
}

fn ring_op() -> impl Strategy<Value = RingOp> {
    let fail = prop::bool::weighted(0.15);
    prop_oneof![
        3 => vec(any::<u8>(), 0..=80).prop_map(RingOp::EnqueueSlice),
        3 => (0usize..=80).prop_map(RingOp::DequeueSlice),
        3 => (any::<u8>(), reported_count(), fail)
            .prop_map(|(seed, count, fail)| RingOp::EnqueueWith { seed, count, fail }),
        3 => (reported_count(), fail).prop_map(|(count, fail)| RingOp::DequeueWith { count, fail }),
        1 => Just(RingOp::Clear),
    ]
}

/// Applies `op` to both the ring and the model, checking what the ring
/// hands out and returns against the model.
fn apply(
    ring: &mut RingBuffer,
    model: &mut VecDeque<u8>,
    cap: usize,
    op: &RingOp,
) -> Result<(), TestCaseError> {
    match *op {
        RingOp::EnqueueSlice(ref data) => {
            let n = ring.enqueue_slice(data);
            prop_assert_eq!(n, data.len().min(cap - model.len()), "copies what fits");
            model.extend(&data[..n]);
        }
        RingOp::DequeueSlice(size) => {
            let mut out = vec![0; size];
            let n = ring.dequeue_slice(&mut out);
            let expected: Vec<u8> = model.drain(..size.min(model.len())).collect();
            prop_assert_eq!(&out[..n], &expected[..], "oldest bytes first");
        }
        RingOp::EnqueueWith { seed, count, fail } => {
            enqueue_with(ring, model, cap, seed, count, fail)?;
        }
        RingOp::DequeueWith { count, fail } => {
            let mut offered = Vec::new();
            let result = ring.dequeue_with(|first, second| {
                offered.extend_from_slice(first);
                offered.extend_from_slice(second);
                if fail { Err("refused") } else { Ok(count) }
            });
            let stored: Vec<u8> = model.iter().copied().collect();
            prop_assert_eq!(offered, stored, "offers every stored byte, in order");
            if fail {
                prop_assert_eq!(result, Err("refused"), "an error changes nothing");
            } else {
                let n = count.min(model.len());
                prop_assert_eq!(result, Ok(n), "the count is clamped to what is stored");
                model.drain(..n);
            }
        }
        RingOp::Clear => {
            ring.clear();
            model.clear();
        }
    }
    Ok(())
}

fn enqueue_with(
    ring: &mut RingBuffer,
    model: &mut VecDeque<u8>,
    cap: usize,
    seed: u8,
    count: usize,
    fail: bool,
) -> Result<(), TestCaseError> {
    let window = cap - model.len();
    let was_empty = model.is_empty();
    let mut offered = Vec::new();
    let mut second_len = 0;
    let result = ring.enqueue_with(|first, second| {
        // Scribble over all the free space, even when about to fail: it
        // must not reach the stored bytes (checked by later dequeues).
        let free = first.iter_mut().chain(second.iter_mut());
        for (i, b) in free.enumerate() {
            *b = seed.wrapping_add(i as u8);
        }
        offered.extend_from_slice(first);
        offered.extend_from_slice(second);
        second_len = second.len();
        if fail { Err("refused") } else { Ok(count) }
    });
    prop_assert_eq!(offered.len(), window, "offers exactly the free space");
    if was_empty {
        prop_assert_eq!(second_len, 0, "an empty ring offers one contiguous slice");
    }
    if fail {
        prop_assert_eq!(result, Err("refused"), "an error changes nothing");
    } else {
        let n = count.min(window);
        prop_assert_eq!(result, Ok(n), "the count is clamped to the free space");
        model.extend(&offered[..n]);
    }
    Ok(())
}

fn check_observers(
    ring: &RingBuffer,
    model: &VecDeque<u8>,
    cap: usize,
) -> Result<(), TestCaseError> {
    prop_assert_eq!(ring.capacity(), cap);
    prop_assert_eq!(ring.len(), model.len());
    prop_assert_eq!(ring.is_empty(), model.is_empty());
    prop_assert_eq!(ring.is_full(), model.len() == cap);
    prop_assert_eq!(ring.window(), cap - model.len());
    Ok(())
}

proptest! {
    /// Any sequence of operations on a ring of any capacity 1..=64 behaves
    /// like a `VecDeque<u8>` bounded to that capacity: after every operation
    /// the observers agree with the model, and every byte handed out (by
    /// `dequeue_slice` or offered to a `dequeue_with` closure) is the model's.
    #[test]
    fn ring_buffer_behaves_like_a_bounded_deque(
        cap in 1usize..=64,
        ops in vec(ring_op(), 0..=64),
    ) {
        let mut ring = RingBuffer::new(cap);
        let mut model = VecDeque::new();
        check_observers(&ring, &model, cap)?;
        for op in &ops {
            apply(&mut ring, &mut model, cap, op)?;
            check_observers(&ring, &model, cap)?;
        }
    }
}

// LineReader
// ---------------------------------------------------------------------------
//
// What `LineReader::feed` guarantees, read off its code, for a reader made
// with limit `L` (`new()` is `MAX_LINE`; `with_limit` raises 0 and 1 to 2).
// Take the stream (all bytes ever fed, concatenated) and cut it at every
// `\n`. Every piece but the last is a terminated line; the last is the
// unterminated tail.
//
// * The reader fails (`LineTooLong`) iff some piece, counted in raw bytes
//   with any `\r` but without the `\n`, is at least `L` long. For a
//   terminated line that is "line plus `\n` longer than `L`"; for the tail
//   it is "no terminator could make it fit any more". So with `MAX_LINE`
//   (1024) a 1023-byte line plus `\n` passes, a 1023-byte line plus `\r\n`
//   fails, and a 1023-byte tail is held until its terminator comes.
// * Before failing, it emits exactly the terminated lines that precede the
//   first overlong piece, each with one trailing `\r` removed and decoded
//   as lossy UTF-8.
// * None of this depends on where the stream was split into `feed` calls.

/// The lines and the verdict a reader with `limit` must produce for `stream`.
fn oracle(stream: &[u8], limit: usize) -> (Vec<String>, Result<(), ProtocolError>) {
    let pieces: Vec<&[u8]> = stream.split(|&b| b == b'\n').collect();
    let mut lines = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        if piece.len() >= limit.max(2) {
            return (lines, Err(ProtocolError::LineTooLong));
        }
        if i + 1 < pieces.len() {
            let line = piece.strip_suffix(b"\r").unwrap_or(piece);
            lines.push(String::from_utf8_lossy(line).into_owned());
        }
    }
    (lines, Ok(()))
}

/// Feeds `chunks` in order into `reader`, stopping at the first error as a
/// connection would.
fn feed_chunks<'a>(
    mut reader: LineReader,
    chunks: impl IntoIterator<Item = &'a [u8]>,
) -> (Vec<String>, Result<(), ProtocolError>) {
    let mut lines = Vec::new();
    for chunk in chunks {
        if let Err(e) = reader.feed(chunk, |l| lines.push(l.to_owned())) {
            return (lines, Err(e));
        }
    }
    (lines, Ok(()))
}

/// A reader for `limit`, built the way the relay builds its default one.
fn reader(limit: usize) -> LineReader {
    if limit == MAX_LINE {
        LineReader::new()
    } else {
        LineReader::with_limit(limit)
    }
}

/// `stream` cut at the given points (any order, repeats give empty feeds).
fn split_at_points(stream: &[u8], cuts: &[Index]) -> Vec<Vec<u8>> {
    let mut points: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
    points.sort_unstable();
    let mut chunks = Vec::new();
    let mut start = 0;
    for p in points {
        chunks.push(stream[start..p].to_vec());
        start = p;
    }
    chunks.push(stream[start..].to_vec());
    chunks
}

/// Streams that reach every branch: raw bytes (where `\n` is rare, so long
/// pieces are common), and lines of text with stray `\r`s and bytes,
/// some just under and just over `MAX_LINE`.
fn stream() -> impl Strategy<Value = Vec<u8>> {
    let byte = prop_oneof![8 => b'a'..=b'z', 1 => Just(b'\r'), 1 => any::<u8>()];
    let short = vec(byte, 0..=20);
    let near_bound = (MAX_LINE - 2..=MAX_LINE + 1, any::<bool>()).prop_map(|(n, cr)| {
        let mut piece = vec![b'x'; n];
        if cr {
            piece.push(b'\r');
        }
        piece
    });
    let piece = prop_oneof![6 => short, 1 => near_bound];
    let lines = (vec(piece, 0..=8), any::<bool>()).prop_map(|(pieces, terminated)| {
        let mut stream = pieces.join(&b'\n');
        if terminated {
            stream.push(b'\n');
        }
        stream
    });
    prop_oneof![vec(any::<u8>(), 0..=2 * MAX_LINE + 100), lines]
}

proptest! {
    /// Feeding a stream whole, split at arbitrary points, or one byte at a
    /// time yields the same lines and the same verdict, and both are the
    /// oracle's, for the default limit and for small ones (where every
    /// stream crosses the bound often); no line contains `\n`; the only
    /// error is `LineTooLong`. (That it never panics on arbitrary bytes is
    /// implied by reaching the assertions.)
    #[test]
    fn line_reader_ignores_how_the_stream_is_split(
        limit in prop_oneof![Just(MAX_LINE), 0usize..=24],
        stream in stream(),
        cuts in vec(any::<Index>(), 0..=8),
    ) {
        let want = oracle(&stream, limit);
        let whole = feed_chunks(reader(limit), [&stream[..]]);
        let chunks = split_at_points(&stream, &cuts);
        let split = feed_chunks(reader(limit), chunks.iter().map(Vec::as_slice));
        let bytewise = feed_chunks(reader(limit), stream.chunks(1));
        for got in [&whole, &split, &bytewise] {
            prop_assert_eq!(got, &want);
            prop_assert!(got.0.iter().all(|l| !l.contains('\n')));
        }
    }
}

/// Whether `bytes`, fed at once, stays within `limit`.
fn fits(limit: usize, bytes: &[u8]) -> bool {
    feed_chunks(reader(limit), [bytes]).1.is_ok()
}

#[test]
fn line_reader_bound_is_exact() {
    let line = |n: usize, end: &[u8]| [vec![b'x'; n], end.to_vec()].concat();
    assert!(fits(MAX_LINE, &line(MAX_LINE - 1, b"\n")), "1023 + LF");
    assert!(!fits(MAX_LINE, &line(MAX_LINE, b"\n")), "1024 + LF");
    assert!(fits(MAX_LINE, &line(MAX_LINE - 2, b"\r\n")), "1022 + CRLF");
    assert!(!fits(MAX_LINE, &line(MAX_LINE - 1, b"\r\n")), "1023 + CRLF");
    assert!(fits(MAX_LINE, &line(MAX_LINE - 1, b"")), "1023-byte tail");
    assert!(!fits(MAX_LINE, &line(MAX_LINE, b"")), "1024-byte tail");
}

#[test]
fn line_reader_limits_below_two_are_two() {
    for limit in [0, 1, 2] {
        assert!(fits(limit, b"a\n"), "limit {limit}: one byte and LF");
        assert!(fits(limit, b"\r\n"), "limit {limit}: an empty CRLF line");
        assert!(!fits(limit, b"ab\n"), "limit {limit}: two bytes and LF");
        assert!(fits(limit, b"a"), "limit {limit}: a one-byte tail");
        assert!(!fits(limit, b"ab"), "limit {limit}: a two-byte tail");
    }
}

// ---------------------------------------------------------------------------
// Control-line parsers and formatters
// ---------------------------------------------------------------------------

/// What `parse_port` accepts, stated independently of its code: one to five
/// ASCII digits without a leading zero ("decimal without sign, padding or
/// spaces"), whose value is in 1..=65535.
fn port_field_value(field: &str) -> Option<u16> {
    let digits_only = !field.is_empty() && field.bytes().all(|b| b.is_ascii_digit());
    if !digits_only || field.len() > 5 || field.starts_with('0') {
        return None;
    }
    let value: u32 = field.bytes().fold(0, |v, b| v * 10 + u32::from(b - b'0'));
    u16::try_from(value).ok().filter(|&p| p != 0)
}

/// The bytes a hex field stands for: an even number of ASCII hex digits,
/// either case.
fn hex_value(field: &str) -> Option<Vec<u8>> {
    let ok = field.len().is_multiple_of(2) && field.bytes().all(|b| b.is_ascii_hexdigit());
    ok.then(|| {
        (0..field.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&field[i..i + 2], 16).unwrap_or_default())
            .collect()
    })
}

/// The token a field stands for: exactly `2 * TOKEN_LEN` hex digits.
fn token_value(field: &str) -> Option<DialToken> {
    let bytes = hex_value(field)?;
    bytes.try_into().ok().map(DialToken)
}

/// What `parse_relay_line` must make of `line`, from the wire format in the
/// protocol module's docs: the first matching rule wins.
fn relay_line_value(line: &str) -> Result<RelayLine, ProtocolError> {
    if let Some(reason) = line.strip_prefix("error ") {
        // Every reason parses, kept whole (`refusal_value` says as what).
        return Ok(RelayLine::Error(refusal_value(reason)));
    }
    if let Some(field) = line.strip_prefix(ESTABLISHED_PREFIX) {
        return parse_port(field).map(RelayLine::Established);
    }
    if let Some(field) = line.strip_prefix("challenge ") {
        return hex_value(field)
            .map(RelayLine::Challenge)
            .ok_or_else(|| ProtocolError::Unexpected(String::new()));
    }
    let dial = |field: &str, token| {
        port_field_value(field)
            .map(|p| RelayLine::Dial(p, token))
            .ok_or_else(|| ProtocolError::BadPort(String::new()))
    };
    match line.split_once(' ') {
        Some((port, token)) => match token_value(token) {
            Some(token) => dial(port, Some(token)),
            None => Err(ProtocolError::Unexpected(String::new())),
        },
        None => dial(line, None),
    }
}

/// What `parse_app_line` must make of `line`.
fn app_line_value(line: &str) -> Result<AppLine, ProtocolError> {
    if let Some(field) = line.strip_prefix("auth ") {
        return hex_value(field)
            .map(AppLine::Auth)
            .ok_or_else(|| ProtocolError::Unexpected(String::new()));
    }
    match line.strip_prefix("port ") {
        Some(field) => parse_port(field).map(AppLine::Port),
        None => Ok(AppLine::Other),
    }
}

/// Equal results, and for errors the same kind (the messages in errors
/// quote the input and are not part of the contract).
fn same<T: PartialEq + std::fmt::Debug>(
    got: &Result<T, ProtocolError>,
    want: &Result<T, ProtocolError>,
) -> Result<(), TestCaseError> {
    match (got, want) {
        (Ok(g), Ok(w)) => prop_assert_eq!(g, w),
        (Err(g), Err(w)) => prop_assert_eq!(
            std::mem::discriminant(g),
            std::mem::discriminant(w),
            "{:?} vs {:?}",
            g,
            w
        ),
        _ => prop_assert!(false, "got {:?}, want {:?}", got, want),
    }
    Ok(())
}

/// Arbitrary text, plus text that gets past each prefix check so the deep
/// branches are reached.
fn control_text() -> impl Strategy<Value = String> {
    let anything = vec(any::<char>(), 0..=80).prop_map(String::from_iter);
    let field = prop_oneof![
        "[0-9]{0,7}",
        "[0-9 +\\-]{0,7}",
        "[0-9a-fA-Fx]{0,7}",
        "[0-9a-fA-F]{30,34}",
        "[0-9a-fA-Fg ]{0,34}",
        anything.clone(),
    ];
    prop_oneof![
        anything,
        field.clone(),
        field
            .clone()
            .prop_map(|f| format!("{ESTABLISHED_PREFIX}{f}")),
        field.clone().prop_map(|f| format!("port {f}")),
        field.clone().prop_map(|f| format!("auth {f}")),
        field.clone().prop_map(|f| format!("challenge {f}")),
        field.clone().prop_map(|f| format!("error {f}")),
        reason_text().prop_map(|r| format!("error {r}")),
        ("[0-9]{0,6}", field).prop_map(|(p, f)| format!("{p} {f}")),
        "(established relay address port|port|error|auth|challenge)[: ]?",
    ]
}

proptest! {
    /// No parser panics on any string, and each gives what the wire format
    /// says: `parse_port`/`parse_dial` accept exactly `port_field_value`,
    /// `parse_established` needs its prefix, and the two dispatchers follow
    /// `relay_line_value` and `app_line_value`.
    #[test]
    fn parsers_never_panic_and_follow_the_wire_format(line in control_text()) {
        let port = parse_port(&line);
        prop_assert_eq!(&parse_dial(&line), &port, "a dial port is just a port");
        prop_assert_eq!(port.clone().ok(), port_field_value(&line));
        prop_assert!(port.is_ok() || matches!(port, Err(ProtocolError::BadPort(_))));

        let established = parse_established(&line);
        match line.strip_prefix(ESTABLISHED_PREFIX) {
            Some(field) => prop_assert_eq!(&established, &parse_port(field)),
            None => prop_assert!(matches!(established, Err(ProtocolError::Unexpected(_)))),
        }

        same(&parse_app_line(&line), &app_line_value(&line))?;
        same(&parse_relay_line(&line), &relay_line_value(&line))?;
    }

    /// `parse_port` accepts exactly the strings `port_field_value` describes,
    /// with that value, and nothing else (signs, spaces, hex, overlong).
    #[test]
    fn parse_port_accepts_exactly_short_digit_strings_in_range(
        field in prop_oneof![
            "[0-9]{0,7}",
            "[0-9 +\\-]{1,7}",
            "0{0,3}[1-9][0-9]{0,5}",
            "0{1,6}",
        ],
    ) {
        prop_assert_eq!(parse_port(&field).ok(), port_field_value(&field));
    }

    /// A dial-in's first line is its token: `parse_token_line` accepts
    /// exactly `2 * TOKEN_LEN` hex digits then `\n`, and what `token_line`
    /// writes.
    #[test]
    fn token_lines_round_trip_and_nothing_else_parses(
        token in any::<[u8; TOKEN_LEN]>(),
        noise in prop_oneof![
            vec(any::<u8>(), 0..=40),
            "[0-9a-fA-Fg\r\n]{30,35}".prop_map(String::into_bytes),
        ],
    ) {
        let token = DialToken(token);
        let line = token_line(&token);
        prop_assert_eq!(line.len(), TOKEN_LINE_LEN);
        prop_assert_eq!(parse_token_line(line.as_bytes()), Some(token));
        let want = match noise.split_last() {
            Some((b'\n', field)) if noise.len() == TOKEN_LINE_LEN => {
                std::str::from_utf8(field).ok().and_then(token_value)
            }
            _ => None,
        };
        prop_assert_eq!(parse_token_line(&noise), want);
    }

    /// Dial lines with a token, challenges and auth answers parse back,
    /// through the framer, to what was formatted.
    #[test]
    fn authenticated_lines_round_trip(
        port in 1u16..=u16::MAX,
        token in any::<[u8; TOKEN_LEN]>(),
        nonce in vec(any::<u8>(), 0..=64),
    ) {
        let token = DialToken(token);
        let dial = framed(&dial_line(port, Some(&token)));
        prop_assert_eq!(parse_relay_line(&dial), Ok(RelayLine::Dial(port, Some(token))));
        let challenge = framed(&challenge_line(&nonce));
        prop_assert_eq!(parse_relay_line(&challenge), Ok(RelayLine::Challenge(nonce.clone())));
        let auth = framed(&auth_line(&nonce));
        prop_assert_eq!(parse_app_line(&auth), Ok(AppLine::Auth(nonce)));
    }

    /// An error line is one line; parsed back (after the framer strips its
    /// `\n`) it gives the refusal whose text is the reason with control
    /// characters flattened to spaces, whole.
    #[test]
    fn error_lines_round_trip(
        reason in vec(
            prop_oneof![3 => any::<char>(), 1 => prop::char::range('\0', '\u{9f}')],
            0..=100,
        ).prop_map(String::from_iter),
    ) {
        let line = error_line(&Refusal::Other(reason.clone()));
        prop_assert!(line.starts_with("error "));
        prop_assert_eq!(line.find('\n'), Some(line.len() - 1), "exactly one LF, at the end");
        let flat: String = reason
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let want = RelayLine::Error(refusal_value(&flat));
        prop_assert_eq!(parse_relay_line(&line[..line.len() - 1]), Ok(want.clone()));
        prop_assert_eq!(Refusal::parse(&flat).to_string(), flat);
        // Through the framer, as an app receives it (short enough to fit).
        prop_assume!(line.len() <= MAX_LINE);
        prop_assert_eq!(parse_relay_line(&framed(&line)), Ok(want));
    }
}

/// The one line `formatted` frames to, through a fresh default `LineReader`.
fn framed(formatted: &str) -> String {
    let (mut lines, result) = feed_chunks(LineReader::new(), [formatted.as_bytes()]);
    assert_eq!(result, Ok(()), "{formatted:?} fits a line");
    assert_eq!(lines.len(), 1, "{formatted:?} is one line");
    lines.remove(0)
}

/// Every port, not a sample: 65535 values are cheap.
#[test]
fn every_port_round_trips_through_format_frame_and_parse() {
    for port in 1..=u16::MAX {
        assert_eq!(parse_port(&port.to_string()), Ok(port));

        let established = framed(&established_line(port));
        assert_eq!(parse_established(&established), Ok(port));
        assert_eq!(
            parse_relay_line(&established),
            Ok(RelayLine::Established(port))
        );

        let dial = framed(&dial_line(port, None));
        assert_eq!(parse_dial(&dial), Ok(port));
        assert_eq!(parse_relay_line(&dial), Ok(RelayLine::Dial(port, None)));

        let request = framed(&port_request_line(port));
        assert_eq!(parse_app_line(&request), Ok(AppLine::Port(port)));
    }
}

#[test]
fn ports_outside_the_range_are_refused() {
    for field in ["0", "00", "00000", "65536", "99999", "000000", "065535"] {
        assert!(parse_port(field).is_err(), "{field:?} must not parse");
    }
}

/// Zero-padded ports are not the wire format ("decimal without sign,
/// padding or spaces") and are refused, in every line that carries a port.
#[test]
fn zero_padded_ports_are_refused() {
    assert!(parse_port("080").is_err());
    assert!(parse_port("00001").is_err());
    assert!(parse_app_line("port 08080").is_err());
    assert!(parse_relay_line("0443").is_err());
}

// ---------------------------------------------------------------------------
// The relay's refusals (issue 10): codes, not text
// ---------------------------------------------------------------------------

/// A number field as the relay writes a `u16`: one that formats back to
/// itself.
fn number_value(field: &str) -> Option<u16> {
    field.parse::<u16>().ok().filter(|n| n.to_string() == field)
}

/// What `Refusal::parse` must make of `reason`, from the relay's words
/// (`relay/apps.rs`, README "The `port` extension"): a known shape whose
/// numbers are written as the relay writes them, or `Other`, verbatim.
fn refusal_value(reason: &str) -> Refusal {
    let detail = |prefix: &str| reason.strip_prefix(prefix).map(String::from);
    let known = if reason == "secret refused" {
        Some(Refusal::SecretRefused)
    } else if reason == "too many apps" {
        Some(Refusal::TooManyApps)
    } else if let Some(d) = detail("no relayed port: ") {
        Some(Refusal::NoRelayedPort(d))
    } else if let Some(d) = detail("bad port request: ") {
        Some(Refusal::BadPortRequest(d))
    } else if let Some(d) = detail("bad ready request: ") {
        Some(Refusal::BadReadyRequest(d))
    } else {
        port_refusal_value(reason)
    };
    known.unwrap_or_else(|| Refusal::Other(reason.into()))
}

/// The `port <P> ...` reasons: the shape is rebuilt from the numbers found
/// and must be the whole reason (or, with a detail, its start).
fn port_refusal_value(reason: &str) -> Option<Refusal> {
    let port = number_value(reason.strip_prefix("port ")?.split(' ').next()?)?;
    if reason == format!("port {port} is taken") {
        return Some(Refusal::PortTaken(port));
    }
    if let Some(d) = reason.strip_prefix(&format!("port {port} is unavailable: ")) {
        return Some(Refusal::PortUnavailable(port, d.into()));
    }
    let (lo, hi) = reason.rsplit_once(' ')?.1.split_once('-')?;
    let (lo, hi) = (number_value(lo)?, number_value(hi)?);
    let range = format!("port {port} is outside the relay's range {lo}-{hi}");
    (reason == range).then_some(Refusal::PortOutsideRange { port, lo, hi })
}

/// The rule the agent applied to the reason's text before reasons had
/// codes; every reason the relay sends keeps its verdict.
fn final_by_text(reason: &str) -> bool {
    reason.starts_with("secret") || reason.starts_with("port ") || reason.starts_with("bad ")
}

/// A detail as it reaches an app: any text but control characters (which
/// `error_line` flattens to spaces).
fn detail() -> impl Strategy<Value = String> {
    let printable = any::<char>().prop_filter("flattened on the wire", |c| !c.is_control());
    vec(printable, 0..=40).prop_map(String::from_iter)
}

/// Every refusal the relay can send, with any numbers and details.
fn refusal() -> impl Strategy<Value = Refusal> {
    prop_oneof![
        Just(Refusal::SecretRefused),
        Just(Refusal::TooManyApps),
        detail().prop_map(Refusal::NoRelayedPort),
        detail().prop_map(Refusal::BadPortRequest),
        any::<(u16, u16, u16)>().prop_map(|(port, lo, hi)| Refusal::PortOutsideRange {
            port,
            lo,
            hi
        }),
        any::<u16>().prop_map(Refusal::PortTaken),
        (any::<u16>(), detail()).prop_map(|(port, d)| Refusal::PortUnavailable(port, d)),
        detail().prop_map(Refusal::BadReadyRequest),
    ]
}

/// Reasons: arbitrary text, the relay's own, and near misses of each shape
/// (padded, signed or overlong numbers, missing or extra words).
fn reason_text() -> impl Strategy<Value = String> {
    let number = prop_oneof![
        any::<u16>().prop_map(|n| n.to_string()),
        "0[0-9]{0,4}",
        "[0-9]{1,6}",
        "[0-9+\\- ]{0,4}",
    ];
    let tail = prop_oneof![3 => Just(String::new()), 1 => "[ -~]{0,12}"];
    prop_oneof![
        vec(any::<char>(), 0..=40).prop_map(String::from_iter),
        "(secret refused|too many apps|no relayed port:|bad port request:|bad ready request:|bad|port|secret)[ !]?",
        (number.clone(), tail.clone()).prop_map(|(n, t)| format!("port {n} is taken{t}")),
        (number.clone(), tail.clone()).prop_map(|(n, t)| format!("port {n} is unavailable:{t}")),
        (number.clone(), number.clone(), number, tail).prop_map(|(p, lo, hi, t)| format!(
            "port {p} is outside the relay's range {lo}-{hi}{t}"
        )),
        refusal().prop_map(|r| r.to_string()),
    ]
}

proptest! {
    /// Every refusal the relay can send reads back as itself: its text
    /// parses to it, and so does the error line an app receives, through
    /// the framer. Whether it is final is what the text rule said.
    #[test]
    fn refusals_round_trip_through_their_line(refusal in refusal()) {
        let text = refusal.to_string();
        prop_assert_eq!(Refusal::parse(&text), refusal.clone());
        let line = framed(&error_line(&refusal));
        prop_assert_eq!(parse_relay_line(&line), Ok(RelayLine::Error(refusal.clone())));
        prop_assert_eq!(refusal.is_final(), final_by_text(&text));
    }

    /// Any reason parses to what the relay's words say and prints back as
    /// itself; a known one is final as the text rule said, an unknown one
    /// (a newer relay's) may pass.
    #[test]
    fn every_reason_parses_to_its_code_and_prints_back(reason in reason_text()) {
        let refusal = Refusal::parse(&reason);
        prop_assert_eq!(&refusal, &refusal_value(&reason));
        prop_assert_eq!(refusal.to_string(), reason.clone());
        match &refusal {
            Refusal::Other(_) => prop_assert!(!refusal.is_final()),
            known => prop_assert_eq!(known.is_final(), final_by_text(&reason)),
        }
    }
}

// ---------------------------------------------------------------------------
// The app's control client (issue 10)
// ---------------------------------------------------------------------------

/// What a relay may say on a control connection, in any order, well formed
/// or not: established, dial, challenge and error lines, short garbage, and
/// a run of bytes longer than a line.
fn relay_script() -> impl Strategy<Value = Vec<String>> {
    let line = prop_oneof![
        4 => (1u16..=u16::MAX).prop_map(established_line),
        4 => (1u16..=u16::MAX, any::<Option<[u8; TOKEN_LEN]>>())
            .prop_map(|(port, token)| dial_line(port, token.map(DialToken).as_ref())),
        1 => vec(any::<u8>(), 0..=32).prop_map(|nonce| challenge_line(&nonce)),
        1 => refusal().prop_map(|r| error_line(&r)),
        1 => "[ -~]{0,10}\r?\n",
        1 => Just("x".repeat(MAX_LINE)),
    ];
    vec(line, 0..=8)
}

/// The client's events for `chunks`, fed in order, and its phase after.
fn run_client(registration: &Registration, chunks: &[&[u8]]) -> (Vec<Event>, Phase) {
    let mut client = Client::new(registration.clone());
    let events = chunks.iter().flat_map(|chunk| client.feed(chunk)).collect();
    (events, client.phase())
}

proptest! {
    /// However the relay's bytes are split, the client says the same; and
    /// what it says keeps its promises: one greeting at most, before we are
    /// registered; one `Registered` at most, on the established line that
    /// completes the registration (the second after a `port` request);
    /// `ExtraEstablished` only after it; one `Failed` at most, last; and its
    /// phase agrees.
    #[test]
    fn the_control_client_ignores_how_bytes_are_split_and_keeps_its_promises(
        script in relay_script(),
        cuts in vec(any::<Index>(), 0..=8),
        port in prop::option::of(1u16..=u16::MAX),
        secret in any::<bool>(),
        ready in 0usize..=70,
    ) {
        let registration = Registration {
            secret: secret.then(|| Secret(b"s".to_vec())),
            port,
            ready,
            ..Registration::default()
        };
        let stream = script.concat().into_bytes();
        let whole = run_client(&registration, &[&stream]);
        let chunks = split_at_points(&stream, &cuts);
        let chunks: Vec<&[u8]> = chunks.iter().map(Vec::as_slice).collect();
        prop_assert_eq!(&run_client(&registration, &chunks), &whole);
        let bytes: Vec<&[u8]> = stream.chunks(1).collect();
        prop_assert_eq!(&run_client(&registration, &bytes), &whole);

        let (events, phase) = whole;
        let at = |want: fn(&Event) -> bool| events.iter().position(want);
        let count = |want: fn(&Event) -> bool| events.iter().filter(|e| want(e)).count();
        let registered = at(|e| matches!(e, Event::Registered(_)));
        prop_assert!(count(|e| matches!(e, Event::Send(_))) <= 1);
        prop_assert!(count(|e| matches!(e, Event::Registered(_))) <= 1);
        prop_assert!(count(|e| matches!(e, Event::Failed(_))) <= 1);
        if let Some(send) = at(|e| matches!(e, Event::Send(_))) {
            prop_assert!(registered.is_none_or(|r| send < r));
        }
        if let Some(extra) = at(|e| matches!(e, Event::ExtraEstablished(_))) {
            prop_assert!(registered.is_some_and(|r| r < extra));
        }
        let failed = at(|e| matches!(e, Event::Failed(_)));
        if let Some(failed) = failed {
            prop_assert_eq!(failed, events.len() - 1, "nothing after a failure");
            prop_assert_eq!(phase, Phase::Failed);
        }
        let needed = 1 + usize::from(port.is_some());
        let completing = script
            .iter()
            .filter_map(|line| parse_established(line.strip_suffix('\n')?).ok())
            .nth(needed - 1);
        if let Some(Event::Registered(p)) = registered.map(|r| &events[r]) {
            prop_assert_eq!(Some(*p), completing);
            if failed.is_none() {
                prop_assert_eq!(phase, Phase::Registered(*p));
            }
        }
        if let Some(Event::Failed(Failure::NoSecret)) = failed.map(|f| &events[f]) {
            prop_assert!(!secret);
        }
    }
}
