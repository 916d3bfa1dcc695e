//! Fuzzes `LineReader`: a stream fed whole and fed in fuzzer-chosen chunks
//! gives the same lines and verdict, and both match an oracle (the stream
//! cut at every `\n`; an error iff a piece is `MAX_LINE` bytes or longer).
//!
//! Input layout: a header byte `h`; if its bit 7 is set, the next byte mod 32
//! is the line limit (`LineReader::with_limit`, which raises 0 and 1 to 2),
//! else the limit is `MAX_LINE` (`LineReader::new`); then `h % 8` chunk
//! sizes (0 is an empty feed; they repeat in turn); then the stream itself.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tcp_relay::protocol::{LineReader, MAX_LINE, ProtocolError};

type Outcome = (Vec<String>, Result<(), ProtocolError>);

fuzz_target!(|data: &[u8]| {
    let Some((&header, rest)) = data.split_first() else {
        return;
    };
    let (limit, rest) = match rest.split_first() {
        Some((&limit, rest)) if header & 0x80 != 0 => (Some(usize::from(limit % 32)), rest),
        _ => (None, rest),
    };
    let (sizes, stream) = rest.split_at(usize::from(header % 8).min(rest.len()));
    let want = oracle(stream, limit.map_or(MAX_LINE, |l| l.max(2)));
    assert_eq!(feed(limit, &[stream]), want, "fed whole");
    let chunks = chunks(stream, sizes);
    assert_eq!(feed(limit, &chunks), want, "fed in chunks of {sizes:?}");
});

/// What a reader with `limit` must report for `stream`, however split.
fn oracle(stream: &[u8], limit: usize) -> Outcome {
    let pieces: Vec<&[u8]> = stream.split(|&b| b == b'\n').collect();
    let mut lines = Vec::new();
    for (i, piece) in pieces.iter().enumerate() {
        if piece.len() >= limit {
            return (lines, Err(ProtocolError::LineTooLong));
        }
        if i + 1 < pieces.len() {
            let line = piece.strip_suffix(b"\r").unwrap_or(piece);
            lines.push(String::from_utf8_lossy(line).into_owned());
        }
    }
    (lines, Ok(()))
}

/// Feeds `chunks` into a fresh reader, stopping at the first error.
fn feed(limit: Option<usize>, chunks: &[&[u8]]) -> Outcome {
    let mut reader = limit.map_or_else(LineReader::new, LineReader::with_limit);
    let mut lines = Vec::new();
    for chunk in chunks {
        if let Err(e) = reader.feed(chunk, |l| {
            assert!(!l.contains('\n'), "a line never contains LF");
            lines.push(l.to_owned());
        }) {
            return (lines, Err(e));
        }
    }
    (lines, Ok(()))
}

/// `stream` cut into pieces of the given sizes, used in turn.
fn chunks<'a>(stream: &'a [u8], sizes: &[u8]) -> Vec<&'a [u8]> {
    if sizes.iter().all(|&s| s == 0) {
        return vec![&[], stream, &[]];
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
