//! Authentication with a shared secret, pure: the challenge–response that
//! admits an app, and the one-time tokens that bind each dial-in to its
//! client.
//!
//! * **Registration.** The relay sends a fresh 32-byte nonce from the OS
//!   (`challenge <hex>`). The app answers `auth <hex>` with
//!   HMAC-SHA256(secret, [`DOMAIN`] ‖ nonce). The secret never crosses the
//!   wire, and since every connection gets a new nonce, a recorded answer is
//!   worthless on any other connection (no replay).
//! * **Dial-ins.** Each dial line carries a 128-bit random token bound to one
//!   waiting client (`<DIAL_PORT> <TOKEN>`). The dial-in's first bytes must be
//!   that token and a newline; the relay pairs it with exactly that client
//!   and forgets the token, so a token can be used once, by whoever read the
//!   control connection, i.e. the app.
//!
//! Comparisons of secrets and tokens run in constant time, so response time
//! leaks nothing about how much of a guess was right.

use std::fmt;
use std::io;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Bytes of a registration nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes of a dial-in token (128 bits: unguessable for the token's life of
/// seconds, and for far longer).
pub const TOKEN_LEN: usize = 16;
/// A dial-in's token line: the token in hex and `\n`.
pub const TOKEN_LINE_LEN: usize = 2 * TOKEN_LEN + 1;
/// Prefixed to the nonce before the HMAC, so that a response computed for
/// this protocol can never be a valid MAC in some other protocol using the
/// same secret.
pub const DOMAIN: &[u8] = b"tcp-relay auth v1\0";

/// `N` random bytes from the operating system.
pub fn random<const N: usize>() -> io::Result<[u8; N]> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes)
        .map_err(|e| io::Error::other(format!("no randomness from the OS: {e}")))?;
    Ok(bytes)
}

/// The MAC an app must answer `nonce` with.
pub fn response(secret: &[u8], nonce: &[u8]) -> [u8; 32] {
    mac(secret, nonce).finalize().into_bytes().into()
}

/// Whether `answer` is the right response to `nonce`, in constant time.
pub fn verify(secret: &[u8], nonce: &[u8], answer: &[u8]) -> bool {
    mac(secret, nonce).verify_slice(answer).is_ok()
}

fn mac(secret: &[u8], nonce: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length (long ones are hashed first), so this
    // constructor cannot fail; the all-zero key only satisfies the type.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret)
        .unwrap_or_else(|_| <Hmac<Sha256> as KeyInit>::new(&Default::default()));
    mac.update(DOMAIN);
    mac.update(nonce);
    mac
}

/// A dial-in token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct DialToken(pub [u8; TOKEN_LEN]);

impl DialToken {
    /// A fresh random token.
    pub fn random() -> io::Result<DialToken> {
        random().map(DialToken)
    }

    /// Parses the hex form (exactly 32 hex digits).
    pub fn parse(text: &str) -> Option<DialToken> {
        let bytes = unhex(text)?;
        bytes.try_into().ok().map(DialToken)
    }

    /// Constant-time equality: a token guessed byte by byte learns nothing
    /// from how fast it is refused.
    pub fn matches(&self, other: &DialToken) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl fmt::Display for DialToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for DialToken {
    /// Tokens are credentials: debug output never shows them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DialToken(..)")
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    bytes
        .iter()
        .flat_map(|b| {
            [
                DIGITS[(b >> 4) as usize] as char,
                DIGITS[(b & 15) as usize] as char,
            ]
        })
        .collect()
}

/// Bytes of a hex string (either case); `None` unless every character is a
/// hex digit and there is an even number of them.
pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    text.as_bytes()
        .chunks_exact(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_right_answer_verifies_and_others_do_not() {
        let nonce = [7u8; NONCE_LEN];
        let answer = response(b"s3cret", &nonce);
        assert!(verify(b"s3cret", &nonce, &answer));
        assert!(!verify(b"wrong", &nonce, &answer), "another secret");
        assert!(
            !verify(b"s3cret", &[8u8; NONCE_LEN], &answer),
            "another nonce: no replay"
        );
        assert!(
            !verify(b"s3cret", &nonce, &answer[..31]),
            "a truncated answer"
        );
        assert!(!verify(b"s3cret", &nonce, &[]), "an empty answer");
    }

    #[test]
    fn the_response_is_hmac_sha256_over_the_domain_and_nonce() {
        // RFC 4231 test case 2 shape: key "Jefe"; message is DOMAIN ‖ nonce.
        let nonce = b"what do ya want for nothing?";
        let expected = {
            let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(b"Jefe").unwrap();
            mac.update(DOMAIN);
            mac.update(nonce);
            mac.finalize().into_bytes()
        };
        assert_eq!(response(b"Jefe", nonce)[..], expected[..]);
        assert_ne!(response(b"Jefe", nonce), response(b"Jefe", b"other"));
    }

    #[test]
    fn random_values_differ() {
        assert_ne!(
            random::<NONCE_LEN>().unwrap(),
            random::<NONCE_LEN>().unwrap()
        );
        assert!(
            !DialToken::random()
                .unwrap()
                .matches(&DialToken::random().unwrap())
        );
    }

    #[test]
    fn tokens_round_trip_through_hex() {
        let token = DialToken::random().unwrap();
        let text = token.to_string();
        assert_eq!(text.len(), 2 * TOKEN_LEN);
        assert!(DialToken::parse(&text).unwrap().matches(&token));
        assert!(
            DialToken::parse(&text.to_uppercase())
                .unwrap()
                .matches(&token)
        );
        assert!(DialToken::parse(&text[1..]).is_none());
        assert!(DialToken::parse(&format!("{text}00")).is_none());
        assert!(DialToken::parse(&"zz".repeat(TOKEN_LEN)).is_none());
        assert_eq!(format!("{token:?}"), "DialToken(..)");
    }

    #[test]
    fn hex_round_trips() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(unhex(&hex(&bytes)).unwrap(), bytes);
        assert_eq!(unhex("0"), None);
        assert_eq!(unhex("0g"), None);
        assert_eq!(unhex(""), Some(vec![]));
    }
}
