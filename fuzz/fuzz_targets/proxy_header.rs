//! Fuzzes the PROXY protocol parser: no input panics it; its verdict on a
//! prefix is final (once an error, always an error; once a header, the same
//! header of the same length, whatever follows); what it accepts is what the
//! encoders write; and `read_header` agrees with it without reading one
//! byte past the header.
//!
//! Input: any bytes, as a connection's first bytes.

#![no_main]

use std::io::{Cursor, ErrorKind};

use libfuzzer_sys::fuzz_target;
use tcp_relay::proxy_protocol::{
    Header, MAX_HEADER_LEN, Parse, V2_SIGNATURE, encode_v1, encode_v2, parse, read_header,
};

fuzz_target!(|data: &[u8]| {
    let verdict = settle(data);
    if let Some(Ok((len, header))) = verdict {
        check_header(&data[..len], header);
    }
    check_read_header(data, verdict);
});

/// Parses growing prefixes until the verdict settles, checking that none
/// before it was anything but incomplete and that the whole input agrees.
/// `None`: the whole input is still incomplete.
fn settle(data: &[u8]) -> Option<Result<(usize, Header), ()>> {
    for cut in 0..=data.len() {
        let verdict = match parse(&data[..cut]) {
            Ok(Parse::Incomplete) => continue,
            Ok(Parse::Complete { len, header }) => Ok((len, header)),
            Err(e) => {
                let text = e.to_string();
                assert!(!text.is_empty() && !text.contains('\n'), "{text:?}");
                Err(())
            }
        };
        assert!(cut <= MAX_HEADER_LEN, "undecided for {cut} bytes");
        if let Ok((len, _)) = verdict {
            assert_eq!(len, cut, "a header is complete at its last byte");
        }
        match parse(data) {
            Ok(Parse::Complete { len, header }) => assert_eq!(Ok((len, header)), verdict),
            Ok(Parse::Incomplete) => panic!("settled at {cut} but incomplete in full"),
            Err(_) => assert_eq!(verdict, Err(())),
        }
        return Some(verdict);
    }
    None
}

/// A parsed header `bytes` says what the encoders would: byte for byte for
/// a v1 `TCP4` line (its text is unique) and a v2 address block; for a v1
/// `TCP6` line (IPv6 has many spellings), the same addresses.
fn check_header(bytes: &[u8], header: Header) {
    let Header::Proxied {
        source,
        destination,
    } = header
    else {
        return;
    };
    for encoded in [encode_v1(source, destination), encode_v2(source, destination)] {
        let reparsed = parse(&encoded);
        assert_eq!(reparsed, Ok(Parse::Complete { len: encoded.len(), header }));
    }
    if bytes.starts_with(b"PROXY TCP4 ") {
        assert_eq!(encode_v1(source, destination), bytes);
    } else if bytes.starts_with(&V2_SIGNATURE) {
        let encoded = encode_v2(source, destination);
        assert_eq!(bytes[..14], encoded[..14], "signature, command, family");
        assert_eq!(bytes.get(16..encoded.len()), Some(&encoded[16..]), "addresses");
    }
}

/// `read_header` over the whole input gives the parser's verdict and stops
/// exactly at the header's end.
fn check_read_header(data: &[u8], verdict: Option<Result<(usize, Header), ()>>) {
    let mut cursor = Cursor::new(data);
    let got = read_header(&mut cursor);
    match (verdict, got) {
        (Some(Ok((len, header))), Ok(got)) => {
            assert_eq!(got, header);
            assert_eq!(cursor.position(), len as u64, "read past the header");
        }
        (Some(Err(())), Err(e)) => assert_eq!(e.kind(), ErrorKind::InvalidData),
        (None, Err(e)) => assert_eq!(e.kind(), ErrorKind::UnexpectedEof),
        (want, got) => panic!("parse settled on {want:?}, read_header gave {got:?}"),
    }
}
