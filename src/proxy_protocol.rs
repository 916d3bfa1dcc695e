//! The HAProxy PROXY protocol (v1 text, v2 binary), pure: encoders and a bounded incremental parser.
//!
//! Spec: <https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>
//! (section numbers below are its). A PROXY header is the first bytes a
//! proxy sends on a connection it opened on behalf of a client: who the
//! client is (source) and which address it connected to (destination).
//!
//! The relay uses it both ways:
//!
//! * **Writing**, toward an app's dial-in ([`encode_v1`], [`encode_v2`]):
//!   source = the client's address, destination = the relayed port's local
//!   address, so the app sees its real client.
//! * **Reading**, at the start of a client connection from a trusted
//!   balancer (HAProxy `send-proxy`/`send-proxy-v2`, nginx stream
//!   `proxy_protocol on`, cloud L4 balancers) with [`parse`]: the caller
//!   peeks, parses, and consumes exactly the header's `len` bytes. A
//!   blocking app reads and strips it with [`read_header`].
//!
//! The spec (section 5) forbids guessing: a listener either always expects
//! a header or never does, and should accept it only from trusted sources.
//!
//! ## Mixed families
//!
//! A header carries one family for both addresses. The encoders follow
//! HAProxy's own rule (`make_proxy_line_v1`/`_v2` in `src/connection.c`):
//! both addresses IPv4 gives `TCP4`; otherwise both are written as IPv6
//! (`TCP6`), an IPv4 side as its IPv4-mapped form `::ffff:a.b.c.d`. Like
//! HAProxy, they never unmap: a dual-stack socket reports IPv4 clients as
//! `::ffff:a.b.c.d` and the header says so; a caller that prefers `TCP4`
//! there passes `SocketAddr::new(addr.ip().to_canonical(), addr.port())`.
//! IPv6 flow labels and scope ids have no place in the header and are
//! dropped. The parser returns addresses as written (a mapped address stays
//! mapped).
//!
//! ## Bounds
//!
//! A v1 line must end in CRLF within [`V1_MAX_LEN`] (107) bytes, the spec's
//! worst case (section 2.1). A v2 header may be at most [`V2_MAX_LEN`]
//! bytes, TLVs included (see there for why); TLVs within it (AWS's 0xEA
//! VPC endpoint, GCP's 0xE0, Azure's 0xEE, HAProxy's SSL, authority, unique
//! ID...) are checked for framing and skipped. [`MAX_HEADER_LEN`] is thus
//! all a caller must ever peek.
//!
//! ## Strictness
//!
//! Anything not exactly the protocol is refused (section 2.1: "must be
//! discarded and cause the receiver to abort the connection"), and as soon
//! as it is known: the first byte that cannot start either signature fails
//! at once, as does a v1 protocol word or a v2 version, command or family
//! that cannot become valid; every strict prefix of a valid header is
//! [`Parse::Incomplete`], never an error. v1 addresses are canonical (no
//! leading zeros in IPv4 octets; the family must match `TCP4`/`TCP6`), ports
//! decimal 0–65535 without sign or leading zeros.
//!
//! ## Why not a crate
//!
//! `ppp` and `proxy-header` both parse and build both versions, but neither
//! fits how the relay reads: it peeks at a socket and needs, from any
//! prefix, "need more bytes", "refuse now" or "a header of exactly `len`
//! bytes", under a cap of its own. Both report a partial v1 line as an error
//! the caller must tell apart from the others, and neither refuses early (a
//! client that is not a balancer is noticed only at its first CRLF or after
//! 107 bytes). Both parse v1 ports with `u16::from_str`, which takes `+80`
//! and `080`, against section 2.1. Neither lets the caller cap the v2
//! length, so the relay would check it before calling anyway, and each
//! brings types to convert at the edge (`proxy-protocol-rs` also has the
//! incremental verdicts, but is built around tokio). The format is small:
//! the encoders and the parser here are about 350 lines with their error
//! messages, have no dependencies, and are fuzzed
//! (`fuzz/fuzz_targets/proxy_header.rs`) and property-tested. Encoding
//! allocates one `Vec` per header, once per relayed connection.

use std::fmt;
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Which PROXY protocol header an app asks for on its dial-ins.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ProxyVersion {
    /// Version 1: one text line, `PROXY TCP4 <src> <dst> <sport> <dport>\r\n`.
    V1,
    /// Version 2: a binary header (12-byte signature, addresses in binary).
    V2,
}

impl ProxyVersion {
    /// The header of this version for a client at `source` that connected
    /// to `destination`.
    pub fn encode(self, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
        match self {
            ProxyVersion::V1 => encode_v1(source, destination),
            ProxyVersion::V2 => encode_v2(source, destination),
        }
    }
}

impl fmt::Display for ProxyVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ProxyVersion::V1 => "v1",
            ProxyVersion::V2 => "v2",
        })
    }
}

impl std::str::FromStr for ProxyVersion {
    type Err = String;

    /// `v1` or `v2` (also `1` and `2`), as `--proxy-protocol` takes them.
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "v1" | "1" => Ok(ProxyVersion::V1),
            "v2" | "2" => Ok(ProxyVersion::V2),
            _ => Err(format!(
                "unknown PROXY protocol version {text:?} (use v1 or v2)"
            )),
        }
    }
}

/// The first 12 bytes of every v2 header (section 2.2). It contains a NUL
/// and a bare CR LF so that no text protocol can mistake it for its own.
pub const V2_SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";

/// The longest v1 line, CRLF included (section 2.1): the worst case
/// `PROXY UNKNOWN` with two full IPv6 addresses and ports, 5+1+7+1+39+1+39
/// +1+5+1+5+2 = 107. A `TCP6` line is at most 104.
pub const V1_MAX_LEN: usize = 107;

/// The longest v2 header accepted, the 16 fixed bytes and TLVs included.
///
/// The address block is at most 36 bytes; the rest is TLVs. The largest set
/// HAProxy itself sends (authority up to 255, unique ID up to 128, ALPN, SSL
/// with version, client CN, cipher and algorithms, netns name, CRC32C) stays
/// under about 1 KiB; cloud balancers add a few dozen bytes (AWS 0xEA with
/// a VPC endpoint id, GCP 0xE0, Azure 0xEE). Twice the realistic worst case
/// leaves room for what we do not know of, while every connection's header
/// still fits one small stack buffer and one peek. The spec's 16-bit length
/// field alone would allow 64 KiB per connection before the first byte of
/// data.
pub const V2_MAX_LEN: usize = 2048;

/// The longest header of either version: all a caller must be able to peek.
pub const MAX_HEADER_LEN: usize = V2_MAX_LEN;

/// What a v1 line starts with: `PROXY` and exactly one space (section 2.1).
const V1_PREFIX: &[u8] = b"PROXY ";
/// The shortest header of either version: `PROXY UNKNOWN\r\n` (a v2 header
/// is at least its 16 fixed bytes).
const MIN_HEADER_LEN: usize = 15;
/// The protocol words a v1 line may carry.
const V1_WORDS: [&[u8]; 3] = [b"TCP4", b"TCP6", b"UNKNOWN"];
/// Signature, version and command, family, length (section 2.2).
const V2_FIXED_LEN: usize = 16;
/// The only version (the high nibble of the 13th byte).
const V2_VERSION: u8 = 0x2;
/// `LOCAL`: the proxy's own connection (a health check); no addresses.
const CMD_LOCAL: u8 = 0x0;
/// `PROXY`: relayed on behalf of the client in the address block.
const CMD_PROXY: u8 = 0x1;
/// Unspecified family and protocol: use the connection's own addresses.
const FAM_UNSPEC: u8 = 0x00;
/// TCP over IPv4: 2×4 address bytes, 2×2 port bytes.
const FAM_TCP4: u8 = 0x11;
/// TCP over IPv6: 2×16 address bytes, 2×2 port bytes.
const FAM_TCP6: u8 = 0x21;
/// Address block of `FAM_TCP4`.
const TCP4_LEN: usize = 12;
/// Address block of `FAM_TCP6`.
const TCP6_LEN: usize = 36;

/// What a PROXY header says about the connection it starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Header {
    /// Relayed on behalf of a client.
    Proxied {
        source: SocketAddr,      // the client
        destination: SocketAddr, // the address the client connected to
    },
    /// v1 `UNKNOWN`, v2 `LOCAL`, or v2 `PROXY` with the UNSPEC family: the
    /// proxy's own connection (typically a health check); the socket's own
    /// addresses are the truth (sections 2.1, 2.2).
    Local,
}

impl Header {
    /// The client's address, if the header names one.
    pub fn source(&self) -> Option<SocketAddr> {
        match self {
            Header::Proxied { source, .. } => Some(*source),
            Header::Local => None,
        }
    }
}

/// The outcome of parsing a prefix of a connection's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parse {
    /// Everything so far may begin a valid header: wait for more bytes.
    Incomplete,
    /// A complete header: exactly the first `len` bytes; the rest is data.
    Complete { len: usize, header: Header },
}

/// Bytes that are not a valid PROXY header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyError {
    /// The first bytes match neither the v1 nor the v2 signature.
    NotProxy,
    /// No CRLF in the first [`V1_MAX_LEN`] bytes of a v1 line.
    LineTooLong,
    /// A v1 line ends in LF without CR (section 2.1 forbids tolerating it).
    BareLf,
    /// A v1 protocol word other than `TCP4`, `TCP6` or `UNKNOWN`.
    BadProtocol(String),
    /// A `TCP4`/`TCP6` line without exactly six space-separated fields.
    FieldCount(usize),
    /// A v1 address that is not canonical text of the line's family.
    BadAddress {
        family: &'static str, // "IPv4" or "IPv6"
        field: String,        // the field as received (lossy UTF-8)
    },
    /// A v1 port that is not decimal 0–65535 without sign or leading zero.
    BadPort(String),
    /// A v2 version other than 2.
    BadVersion(u8),
    /// A v2 command other than `LOCAL` or `PROXY`.
    BadCommand(u8),
    /// A valid v2 family this relay does not carry (UDP, UNIX).
    UnsupportedFamily(u8),
    /// A v2 family/protocol byte the spec does not define.
    BadFamily(u8),
    /// A v2 length shorter than its family's address block.
    ShortAddresses {
        family: u8, // the family/protocol byte
        len: usize, // the header's length field
    },
    /// A v2 header longer than [`V2_MAX_LEN`] (the total it announced).
    TooLong(usize),
    /// A v2 TLV that runs past the end of the header.
    BadTlv,
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProxyError::NotProxy => write!(f, "not a PROXY protocol header"),
            ProxyError::LineTooLong => {
                write!(
                    f,
                    "PROXY v1 line without CRLF in its first {V1_MAX_LEN} bytes"
                )
            }
            ProxyError::BareLf => write!(f, "PROXY v1 line ends in LF without CR"),
            ProxyError::BadProtocol(word) => {
                write!(f, "PROXY v1 protocol {word:?} is not TCP4, TCP6 or UNKNOWN")
            }
            ProxyError::FieldCount(n) => write!(f, "PROXY v1 line has {n} fields, not 6"),
            ProxyError::BadAddress { family, field } => {
                write!(
                    f,
                    "PROXY v1 address {field:?} is not a canonical {family} address"
                )
            }
            ProxyError::BadPort(field) => write!(
                f,
                "PROXY v1 port {field:?} is not decimal 0-65535 without sign or leading zero"
            ),
            ProxyError::BadVersion(v) => write!(f, "PROXY v2 header with version {v}, not 2"),
            ProxyError::BadCommand(c) => {
                write!(f, "PROXY v2 command {c:#x} is neither LOCAL nor PROXY")
            }
            ProxyError::UnsupportedFamily(fam) => write!(
                f,
                "PROXY v2 family {fam:#04x} ({}) is not supported, only TCP",
                family_name(*fam)
            ),
            ProxyError::BadFamily(fam) => write!(f, "PROXY v2 family {fam:#04x} is undefined"),
            ProxyError::ShortAddresses { family, len } => write!(
                f,
                "PROXY v2 length {len} is shorter than family {family:#04x}'s addresses"
            ),
            ProxyError::TooLong(total) => write!(
                f,
                "PROXY v2 header of {total} bytes is longer than the {V2_MAX_LEN} accepted"
            ),
            ProxyError::BadTlv => write!(f, "PROXY v2 TLV runs past the end of the header"),
        }
    }
}

impl std::error::Error for ProxyError {}

/// The v1 header for a connection from `source` to `destination`, e.g.
/// `PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n` (at most 104 bytes).
/// Mixed families become `TCP6` (see the module docs).
pub fn encode_v1(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (source, destination) = one_family(source, destination);
    let family = if source.is_ipv4() { "TCP4" } else { "TCP6" };
    // Rust prints addresses as inet_ntop does: IPv4 dotted without leading
    // zeros, IPv6 compressed, IPv4-mapped IPv6 as ::ffff:a.b.c.d.
    format!(
        "PROXY {family} {} {} {} {}\r\n",
        source.ip(),
        destination.ip(),
        source.port(),
        destination.port()
    )
    .into_bytes()
}

/// The v2 header for a connection from `source` to `destination`: the
/// signature, `PROXY` command (0x21), family `TCP4` (0x11, 28 bytes in all)
/// or `TCP6` (0x21, 52 bytes), the address block's length big-endian, then
/// the addresses and ports in network order; no TLVs.
pub fn encode_v2(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (source, destination) = one_family(source, destination);
    let (family, len) = match source {
        SocketAddr::V4(_) => (FAM_TCP4, TCP4_LEN),
        SocketAddr::V6(_) => (FAM_TCP6, TCP6_LEN),
    };
    let mut out = Vec::with_capacity(V2_FIXED_LEN + len);
    out.extend_from_slice(&V2_SIGNATURE);
    out.push(V2_VERSION << 4 | CMD_PROXY);
    out.push(family);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    for ip in [source.ip(), destination.ip()] {
        match ip {
            IpAddr::V4(ip) => out.extend_from_slice(&ip.octets()),
            IpAddr::V6(ip) => out.extend_from_slice(&ip.octets()),
        }
    }
    out.extend_from_slice(&source.port().to_be_bytes());
    out.extend_from_slice(&destination.port().to_be_bytes());
    out
}

/// Both addresses in one family, as HAProxy does: IPv4 if both are, else
/// IPv6 with IPv4 mapped.
fn one_family(source: SocketAddr, destination: SocketAddr) -> (SocketAddr, SocketAddr) {
    if source.is_ipv4() && destination.is_ipv4() {
        return (source, destination);
    }
    let v6 = |addr: SocketAddr| {
        let ip = match addr.ip() {
            IpAddr::V4(ip) => ip.to_ipv6_mapped(),
            IpAddr::V6(ip) => ip,
        };
        SocketAddr::new(IpAddr::V6(ip), addr.port())
    };
    (v6(source), v6(destination))
}

/// Parses a PROXY header at the start of `buf`, which holds every byte
/// received so far. Never looks past the header: the caller consumes
/// exactly `len` bytes on [`Parse::Complete`] and keeps the rest as data.
pub fn parse(buf: &[u8]) -> Result<Parse, ProxyError> {
    // The two signatures differ in their first byte ('P' and CR), so one
    // byte decides which to read (section 2.2, "identifying the version").
    match buf.first() {
        None => Ok(Parse::Incomplete),
        Some(b'P') => parse_v1(buf),
        Some(b'\r') => parse_v2(buf),
        Some(_) => Err(ProxyError::NotProxy),
    }
}

/// Checks that `buf` and `signature` agree on the bytes both have.
fn check_signature(buf: &[u8], signature: &[u8]) -> Result<(), ProxyError> {
    let agree = buf.iter().zip(signature).all(|(a, b)| a == b);
    if agree {
        Ok(())
    } else {
        Err(ProxyError::NotProxy)
    }
}

fn parse_v1(buf: &[u8]) -> Result<Parse, ProxyError> {
    check_signature(buf, V1_PREFIX)?;
    // Past 107 bytes nothing can belong to a valid line.
    let window = &buf[..buf.len().min(V1_MAX_LEN)];
    let rest = window.get(V1_PREFIX.len()..).unwrap_or_default();
    check_v1_word(rest)?;
    let Some(lf) = window.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= V1_MAX_LEN {
            Err(ProxyError::LineTooLong)
        } else {
            Ok(Parse::Incomplete)
        };
    };
    let line = window[..lf].strip_suffix(b"\r").ok_or(ProxyError::BareLf)?;
    // The prefix holds no LF, so a line that reached one starts with it.
    let fields = line.strip_prefix(V1_PREFIX).ok_or(ProxyError::NotProxy)?;
    let header = parse_v1_fields(fields)?;
    Ok(Parse::Complete {
        len: lf + 1,
        header,
    })
}

/// Refuses a protocol word that cannot become one of [`V1_WORDS`], as soon
/// as its bytes show it (`rest` follows `PROXY `, possibly cut short).
fn check_v1_word(rest: &[u8]) -> Result<(), ProxyError> {
    let end = rest.iter().position(|&b| matches!(b, b' ' | b'\r' | b'\n'));
    let word = &rest[..end.unwrap_or(rest.len())];
    let possible = match end {
        Some(_) => V1_WORDS.contains(&word),
        None => V1_WORDS.iter().any(|known| known.starts_with(word)),
    };
    if possible {
        Ok(())
    } else {
        Err(ProxyError::BadProtocol(lossy(word)))
    }
}

/// Parses what follows `PROXY ` on a complete line, CRLF removed.
fn parse_v1_fields(line: &[u8]) -> Result<Header, ProxyError> {
    let mut fields = line.split(|&b| b == b' ');
    let word = fields.next().unwrap_or_default();
    let v6 = match word {
        b"TCP4" => false,
        b"TCP6" => true,
        // Section 2.1: after UNKNOWN, the receiver ignores the rest.
        b"UNKNOWN" => return Ok(Header::Local),
        _ => return Err(ProxyError::BadProtocol(lossy(word))),
    };
    let mut taken: [&[u8]; 4] = [&[]; 4];
    let mut count = 0;
    for field in fields {
        if let Some(slot) = taken.get_mut(count) {
            *slot = field;
        }
        count += 1;
    }
    if count != taken.len() {
        return Err(ProxyError::FieldCount(count + 2));
    }
    let [source, destination, source_port, destination_port] = taken;
    Ok(Header::Proxied {
        source: SocketAddr::new(v1_ip(source, v6)?, v1_port(source_port)?),
        destination: SocketAddr::new(v1_ip(destination, v6)?, v1_port(destination_port)?),
    })
}

/// An address of the line's family (IPv6 if `v6`) in canonical text. The
/// standard parsers are as strict as section 2.1 asks: no leading zeros in
/// IPv4 octets (even inside `::ffff:a.b.c.d`), at most one `::`, exactly
/// 128 bits, no zone.
fn v1_ip(field: &[u8], v6: bool) -> Result<IpAddr, ProxyError> {
    let text = std::str::from_utf8(field).ok();
    let ip = if v6 {
        text.and_then(|t| t.parse::<Ipv6Addr>().ok())
            .map(IpAddr::V6)
    } else {
        text.and_then(|t| t.parse::<Ipv4Addr>().ok())
            .map(IpAddr::V4)
    };
    ip.ok_or_else(|| ProxyError::BadAddress {
        family: if v6 { "IPv6" } else { "IPv4" },
        field: lossy(field),
    })
}

/// A port: "0", or 1–5 decimal digits without a leading zero, at most 65535.
fn v1_port(field: &[u8]) -> Result<u16, ProxyError> {
    let canonical = field == b"0" || matches!(field.first(), Some(b'1'..=b'9'));
    let digits = field.len() <= 5 && field.iter().all(u8::is_ascii_digit);
    let value = (canonical && digits).then(|| {
        field
            .iter()
            .fold(0u32, |value, &d| value * 10 + u32::from(d - b'0'))
    });
    match value.map(u16::try_from) {
        Some(Ok(port)) => Ok(port),
        _ => Err(ProxyError::BadPort(lossy(field))),
    }
}

fn parse_v2(buf: &[u8]) -> Result<Parse, ProxyError> {
    check_signature(buf, &V2_SIGNATURE)?;
    // Refuse each fixed byte as soon as it arrives.
    let command = match buf.get(12) {
        Some(&ver_cmd) => v2_command(ver_cmd)?,
        None => return Ok(Parse::Incomplete),
    };
    let Some(&family) = buf.get(13) else {
        return Ok(Parse::Incomplete);
    };
    // Section 2.2: with LOCAL the family "is ignored", addresses skipped.
    let addresses = match command {
        CMD_PROXY => address_len(family)?,
        _ => None,
    };
    let Some(&[hi, lo]) = buf.get(14..V2_FIXED_LEN) else {
        return Ok(Parse::Incomplete);
    };
    let body = usize::from(u16::from_be_bytes([hi, lo]));
    let total = V2_FIXED_LEN + body;
    if total > V2_MAX_LEN {
        return Err(ProxyError::TooLong(total));
    }
    if addresses.is_some_and(|need| body < need) {
        return Err(ProxyError::ShortAddresses { family, len: body });
    }
    let Some(block) = buf.get(V2_FIXED_LEN..total) else {
        return Ok(Parse::Incomplete);
    };
    let header = match addresses {
        Some(_) => v2_addresses(family, block)?,
        None => Header::Local,
    };
    Ok(Parse::Complete { len: total, header })
}

/// The command of a version-and-command byte.
fn v2_command(ver_cmd: u8) -> Result<u8, ProxyError> {
    let (version, command) = (ver_cmd >> 4, ver_cmd & 0x0f);
    if version != V2_VERSION {
        return Err(ProxyError::BadVersion(version));
    }
    match command {
        CMD_LOCAL | CMD_PROXY => Ok(command),
        _ => Err(ProxyError::BadCommand(command)),
    }
}

/// Bytes of the address block a `PROXY` header of `family` needs; `None`
/// for UNSPEC, whose addresses (if any) are ignored.
fn address_len(family: u8) -> Result<Option<usize>, ProxyError> {
    match family {
        FAM_UNSPEC => Ok(None),
        FAM_TCP4 => Ok(Some(TCP4_LEN)),
        FAM_TCP6 => Ok(Some(TCP6_LEN)),
        0x12 | 0x22 | 0x31 | 0x32 => Err(ProxyError::UnsupportedFamily(family)),
        _ => Err(ProxyError::BadFamily(family)),
    }
}

/// What the spec calls a family/protocol byte, for error messages.
fn family_name(family: u8) -> &'static str {
    match family {
        0x12 => "UDP over IPv4",
        0x22 => "UDP over IPv6",
        0x31 => "UNIX stream",
        0x32 => "UNIX datagram",
        _ => "undefined",
    }
}

/// Decodes the address block of a complete `PROXY` header and checks that
/// the TLVs after it are well framed.
fn v2_addresses(family: u8, block: &[u8]) -> Result<Header, ProxyError> {
    let decoded = match family {
        FAM_TCP4 => tcp_addresses::<4>(block, |b| IpAddr::V4(Ipv4Addr::from(b))),
        _ => tcp_addresses::<16>(block, |b| IpAddr::V6(Ipv6Addr::from(b))),
    };
    let (header, tlvs) = decoded.ok_or(ProxyError::ShortAddresses {
        family,
        len: block.len(),
    })?;
    check_tlvs(tlvs)?;
    Ok(header)
}

/// Source address, destination address (`N` bytes each), source port,
/// destination port; and the bytes after them.
fn tcp_addresses<const N: usize>(
    block: &[u8],
    ip: impl Fn([u8; N]) -> IpAddr,
) -> Option<(Header, &[u8])> {
    let (source, rest) = block.split_first_chunk::<N>()?;
    let (destination, rest) = rest.split_first_chunk::<N>()?;
    let (source_port, rest) = rest.split_first_chunk::<2>()?;
    let (destination_port, tlvs) = rest.split_first_chunk::<2>()?;
    let header = Header::Proxied {
        source: SocketAddr::new(ip(*source), u16::from_be_bytes(*source_port)),
        destination: SocketAddr::new(ip(*destination), u16::from_be_bytes(*destination_port)),
    };
    Some((header, tlvs))
}

/// Walks the TLVs (type, 16-bit length, value) without interpreting them:
/// a receiver may ignore any (section 2.2), but they must tile the rest of
/// the header exactly, as HAProxy also requires.
fn check_tlvs(mut tlvs: &[u8]) -> Result<(), ProxyError> {
    while let [_kind, hi, lo, rest @ ..] = tlvs {
        let len = usize::from(u16::from_be_bytes([*hi, *lo]));
        tlvs = rest.get(len..).ok_or(ProxyError::BadTlv)?;
    }
    if tlvs.is_empty() {
        Ok(())
    } else {
        Err(ProxyError::BadTlv)
    }
}

/// Reads a PROXY header from a blocking stream, and not one byte more: the
/// client's data after it stays unread for the caller. Parse errors are
/// `InvalidData`; a stream that ends inside the header is `UnexpectedEof`.
///
/// Each read asks only for bytes the header is sure to still have (15 at
/// first: no header is shorter; for v2 the rest of the 16 fixed bytes, then
/// exactly the announced length; for v1 one or two, up to the CRLF). `read`
/// returns what has arrived, so a peer that is no balancer and sends a few
/// bytes is refused at once rather than waited on.
pub fn read_header(stream: &mut impl Read) -> io::Result<Header> {
    let mut buf = [0u8; MAX_HEADER_LEN];
    let mut filled = 0;
    loop {
        let want = filled + still_needed(&buf[..filled]);
        let Some(space) = buf.get_mut(filled..want) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "PROXY header too long",
            ));
        };
        match stream.read(space) {
            Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
        match parse(&buf[..filled]) {
            Ok(Parse::Incomplete) => {}
            Ok(Parse::Complete { header, .. }) => return Ok(header),
            Err(e) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
        }
    }
}

/// A lower bound (at least 1) on the bytes a header that begins with
/// `prefix` (which parsed as incomplete) still has after it.
fn still_needed(prefix: &[u8]) -> usize {
    let at_least = match prefix.first() {
        None => MIN_HEADER_LEN,
        Some(b'\r') => match prefix.get(14..V2_FIXED_LEN) {
            Some(&[hi, lo]) => V2_FIXED_LEN + usize::from(u16::from_be_bytes([hi, lo])),
            _ => V2_FIXED_LEN,
        },
        // A v1 line still needs its CRLF: both bytes, or the LF after a CR.
        Some(_) => {
            let crlf = if prefix.ends_with(b"\r") { 1 } else { 2 };
            MIN_HEADER_LEN.max(prefix.len() + crlf)
        }
    };
    at_least.saturating_sub(prefix.len()).max(1)
}

/// `bytes` as text for an error message (at most 107 bytes reach here).
fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;
    use std::net::{SocketAddrV6, TcpListener, TcpStream};

    use proptest::collection::vec;
    use proptest::prelude::*;

    fn addr(text: &str) -> SocketAddr {
        text.parse().expect("test address")
    }

    fn proxied(source: &str, destination: &str) -> Header {
        Header::Proxied {
            source: addr(source),
            destination: addr(destination),
        }
    }

    fn complete(bytes: &[u8]) -> (usize, Header) {
        match parse(bytes) {
            Ok(Parse::Complete { len, header }) => (len, header),
            other => panic!("{:?} gave {other:?}", String::from_utf8_lossy(bytes)),
        }
    }

    fn error(bytes: &[u8]) -> ProxyError {
        match parse(bytes) {
            Err(e) => e,
            other => panic!("{:?} gave {other:?}", String::from_utf8_lossy(bytes)),
        }
    }

    /// A v2 header: signature, `ver_cmd`, `family`, the length of `body`, `body`.
    fn v2(ver_cmd: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.extend_from_slice(&[ver_cmd, family]);
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    /// The TCP4 address block of 1.2.3.4:1000 → 5.6.7.8:80.
    const TCP4_BLOCK: [u8; 12] = [1, 2, 3, 4, 5, 6, 7, 8, 0x03, 0xe8, 0x00, 0x50];

    // --- encoders: exact wire bytes ---

    #[test]
    fn v1_encodes_the_specs_example_exactly() {
        let line = encode_v1(addr("192.168.0.1:56324"), addr("192.168.0.11:443"));
        assert_eq!(line, b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n");
    }

    #[test]
    fn v1_encodes_ipv6_and_mixed_families_as_tcp6() {
        let line = encode_v1(addr("[2001:db8::1]:1234"), addr("[2001:db8::2]:80"));
        assert_eq!(line, b"PROXY TCP6 2001:db8::1 2001:db8::2 1234 80\r\n");
        // An IPv4 client on a dual-stack listener: mapped, as HAProxy does.
        let mixed = encode_v1(addr("192.0.2.7:5000"), addr("[2001:db8::2]:80"));
        assert_eq!(
            mixed,
            b"PROXY TCP6 ::ffff:192.0.2.7 2001:db8::2 5000 80\r\n"
        );
        // Both v4-mapped stay TCP6: HAProxy does not unmap either.
        let mapped = encode_v1(
            addr("[::ffff:192.0.2.7]:5000"),
            addr("[::ffff:10.0.0.1]:80"),
        );
        assert_eq!(
            mapped,
            b"PROXY TCP6 ::ffff:192.0.2.7 ::ffff:10.0.0.1 5000 80\r\n"
        );
    }

    #[test]
    fn v1_longest_line_fits_the_specs_bound() {
        let max = "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff]:65535";
        let line = encode_v1(addr(max), addr(max));
        assert_eq!(
            line.len(),
            104,
            "section 2.1: a TCP6 line is at most 104 bytes"
        );
        assert_eq!(complete(&line), (104, proxied(max, max)));
    }

    #[test]
    fn v2_encodes_tcp4_as_the_specs_structure() {
        let header = encode_v2(addr("1.2.3.4:1000"), addr("5.6.7.8:80"));
        let mut want = b"\x0D\x0A\x0D\x0A\x00\x0D\x0A\x51\x55\x49\x54\x0A".to_vec();
        want.extend_from_slice(&[0x21, 0x11, 0x00, 0x0C]); // v2 PROXY, TCP4, 12
        want.extend_from_slice(&TCP4_BLOCK);
        assert_eq!(header, want);
        assert_eq!(header.len(), 28);
    }

    #[test]
    fn v2_encodes_tcp6_and_maps_a_lone_ipv4() {
        let header = encode_v2(addr("[2001:db8::1]:443"), addr("10.0.0.1:8080"));
        let mut want = V2_SIGNATURE.to_vec();
        want.extend_from_slice(&[0x21, 0x21, 0x00, 0x24]); // v2 PROXY, TCP6, 36
        want.extend_from_slice(&[0x20, 0x01, 0x0d, 0xb8]);
        want.extend_from_slice(&[0; 11]);
        want.push(1);
        want.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 10, 0, 0, 1]);
        want.extend_from_slice(&[0x01, 0xbb, 0x1f, 0x90]);
        assert_eq!(header, want);
        assert_eq!(header.len(), 52);
    }

    // --- parser: what it accepts ---

    #[test]
    fn v1_parses_and_stops_at_the_crlf() {
        let bytes = b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            complete(bytes),
            (47, proxied("192.168.0.1:56324", "192.168.0.11:443"))
        );
        let six = b"PROXY TCP6 ::ffff:1.2.3.4 ::1 0 65535\r\n";
        assert_eq!(
            complete(six),
            (six.len(), proxied("[::ffff:1.2.3.4]:0", "[::1]:65535"))
        );
        let upper = b"PROXY TCP6 2001:DB8::1 ::1 1 2\r\n";
        assert_eq!(complete(upper).1, proxied("[2001:db8::1]:1", "[::1]:2"));
    }

    #[test]
    fn v1_unknown_is_local_whatever_follows_it() {
        assert_eq!(complete(b"PROXY UNKNOWN\r\nhello"), (15, Header::Local));
        let worst = format!(
            "PROXY UNKNOWN {0} {0} 65535 65535\r\n",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        );
        assert_eq!(worst.len(), V1_MAX_LEN);
        assert_eq!(complete(worst.as_bytes()), (V1_MAX_LEN, Header::Local));
        assert_eq!(complete(b"PROXY UNKNOWN junk \xff\r\n").1, Header::Local);
    }

    #[test]
    fn v2_local_and_unspec_are_local_and_skip_their_block() {
        assert_eq!(complete(&v2(0x20, 0x00, &[])), (16, Header::Local));
        // LOCAL ignores the family, even one PROXY would refuse, and its bytes.
        assert_eq!(complete(&v2(0x20, 0x11, &TCP4_BLOCK)), (28, Header::Local));
        assert_eq!(complete(&v2(0x20, 0x31, &[7; 5])), (21, Header::Local));
        assert_eq!(complete(&v2(0x21, 0x00, &[9; 3])), (19, Header::Local));
    }

    #[test]
    fn v2_skips_tlvs_such_as_awss_vpc_endpoint() {
        let mut body = TCP4_BLOCK.to_vec();
        let vpce = b"\x01vpce-0123456789abcdef0"; // subtype 0x01, then the id
        body.extend_from_slice(&[0xEA, 0, vpce.len() as u8]);
        body.extend_from_slice(vpce);
        body.extend_from_slice(&[0x04, 0, 0]); // an empty NOOP
        let mut bytes = v2(0x21, 0x11, &body);
        let len = bytes.len();
        bytes.extend_from_slice(b"client data");
        assert_eq!(
            complete(&bytes),
            (len, proxied("1.2.3.4:1000", "5.6.7.8:80"))
        );
    }

    #[test]
    fn v2_accepts_exactly_its_cap() {
        let mut body = TCP4_BLOCK.to_vec();
        let value = V2_MAX_LEN - V2_FIXED_LEN - TCP4_LEN - 3;
        body.extend_from_slice(&[0xE0]);
        body.extend_from_slice(&(value as u16).to_be_bytes());
        body.resize(body.len() + value, 0);
        let bytes = v2(0x21, 0x11, &body);
        assert_eq!(complete(&bytes).0, V2_MAX_LEN);
        let over = v2(0x21, 0x11, &[0; V2_MAX_LEN - V2_FIXED_LEN + 1]);
        assert_eq!(error(&over[..16]), ProxyError::TooLong(V2_MAX_LEN + 1));
    }

    // --- parser: every refusal, as early as the bytes allow ---

    #[test]
    fn other_protocols_are_refused_at_their_first_wrong_byte() {
        for bytes in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"G",
            b"\x16\x03\x01\x02\x00", // a TLS ClientHello
            b"SSH-2.0-OpenSSH_9.6\r\n",
            b"PRX",
            b"PROXY\t",
            b"proxy ",
            b"\r\n\r\n\x00\r\nQUIX",
            b"\r\r",
        ] {
            assert_eq!(error(bytes), ProxyError::NotProxy, "{bytes:?}");
        }
        assert_eq!(parse(b""), Ok(Parse::Incomplete));
        assert_eq!(parse(b"PROX"), Ok(Parse::Incomplete));
        assert_eq!(parse(b"\r\n\r\n\x00"), Ok(Parse::Incomplete));
    }

    #[test]
    fn v1_needs_a_crlf_within_107_bytes() {
        let mut line = b"PROXY UNKNOWN ".to_vec();
        line.resize(V1_MAX_LEN - 1, b'x');
        assert_eq!(parse(&line), Ok(Parse::Incomplete));
        line.push(b'x');
        assert_eq!(error(&line), ProxyError::LineTooLong);
        // A CRLF just past the bound does not rescue it.
        line.extend_from_slice(b"\r\n");
        assert_eq!(error(&line), ProxyError::LineTooLong);
    }

    #[test]
    fn v1_refuses_a_bare_lf() {
        assert_eq!(
            error(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n"),
            ProxyError::BareLf
        );
        assert_eq!(error(b"PROXY UNKNOWN\n"), ProxyError::BareLf);
    }

    #[test]
    fn v1_refuses_unknown_protocol_words_early() {
        for (bytes, word) in [
            (&b"PROXY TCP5"[..], "TCP5"),
            (b"PROXY UNKNOWx", "UNKNOWx"),
            (b"PROXY tcp4 1.2.3.4", "tcp4"),
            (b"PROXY UDP4 ", "UDP4"),
            (b"PROXY TCP44", "TCP44"),
            (b"PROXY UNKNOWNX\r\n", "UNKNOWNX"),
            (b"PROXY TCP ", "TCP"),
            (b"PROXY \r\n", ""),
            (b"PROXY  TCP4", ""),
        ] {
            assert_eq!(
                error(bytes),
                ProxyError::BadProtocol(word.into()),
                "{bytes:?}"
            );
        }
        assert_eq!(parse(b"PROXY TCP"), Ok(Parse::Incomplete));
        assert_eq!(parse(b"PROXY UNKNOW"), Ok(Parse::Incomplete));
    }

    #[test]
    fn v1_needs_exactly_six_fields() {
        for (line, count) in [
            (&b"PROXY TCP4\r\n"[..], 2),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", 5),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", 7),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", 7),
            (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", 7),
        ] {
            assert_eq!(error(line), ProxyError::FieldCount(count), "{line:?}");
        }
    }

    #[test]
    fn v1_refuses_non_canonical_or_wrong_family_addresses() {
        for (line, family, field) in [
            (
                &b"PROXY TCP4 010.0.0.1 5.6.7.8 1 2\r\n"[..],
                "IPv4",
                "010.0.0.1",
            ),
            (b"PROXY TCP4 1.2.3.4 5.6.7.08 1 2\r\n", "IPv4", "5.6.7.08"),
            (b"PROXY TCP4 256.0.0.1 5.6.7.8 1 2\r\n", "IPv4", "256.0.0.1"),
            (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "IPv4", "1.2.3"),
            (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "IPv4", "::1"),
            (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "IPv6", "1.2.3.4"),
            (b"PROXY TCP6 ::1 1::2::3 1 2\r\n", "IPv6", "1::2::3"),
            (
                b"PROXY TCP6 ::ffff:01.2.3.4 ::1 1 2\r\n",
                "IPv6",
                "::ffff:01.2.3.4",
            ),
            (b"PROXY TCP6 fe80::1%1 ::1 1 2\r\n", "IPv6", "fe80::1%1"),
            (b"PROXY TCP6 [::1] ::1 1 2\r\n", "IPv6", "[::1]"),
            (
                b"PROXY TCP4 1.2.3.\xff 5.6.7.8 1 2\r\n",
                "IPv4",
                "1.2.3.\u{fffd}",
            ),
        ] {
            let want = ProxyError::BadAddress {
                family,
                field: field.into(),
            };
            assert_eq!(error(line), want, "{line:?}");
        }
    }

    #[test]
    fn v1_refuses_ports_that_are_not_plain_decimal() {
        for port in [
            "65536", "99999", "080", "00", "+80", "-1", "8o", "0x50", "123456", "1\r",
        ] {
            let line = format!("PROXY TCP4 1.2.3.4 5.6.7.8 {port} 2\r\n");
            assert_eq!(error(line.as_bytes()), ProxyError::BadPort(port.into()));
        }
        let line = b"PROXY TCP4 1.2.3.4 5.6.7.8 0 65535\r\n";
        assert_eq!(complete(line).1, proxied("1.2.3.4:0", "5.6.7.8:65535"));
    }

    #[test]
    fn v2_refuses_wrong_version_or_command_from_the_13th_byte() {
        let mut bytes = V2_SIGNATURE.to_vec();
        bytes.push(0x11);
        assert_eq!(error(&bytes), ProxyError::BadVersion(1));
        bytes[12] = 0x31;
        assert_eq!(error(&bytes), ProxyError::BadVersion(3));
        bytes[12] = 0x22;
        assert_eq!(error(&bytes), ProxyError::BadCommand(2));
        bytes[12] = 0x2f;
        assert_eq!(error(&bytes), ProxyError::BadCommand(0xf));
    }

    #[test]
    fn v2_refuses_udp_unix_and_undefined_families_from_the_14th_byte() {
        for family in [0x12, 0x22, 0x31, 0x32] {
            let bytes = v2(0x21, family, &[0; 216]);
            assert_eq!(error(&bytes[..14]), ProxyError::UnsupportedFamily(family));
        }
        for family in [0x01, 0x10, 0x13, 0x23, 0x41, 0xff] {
            let bytes = v2(0x21, family, &[]);
            assert_eq!(error(&bytes[..14]), ProxyError::BadFamily(family));
        }
        let udp = error(&v2(0x21, 0x12, &[0; 12]));
        assert!(udp.to_string().contains("UDP over IPv4"), "{udp}");
    }

    #[test]
    fn v2_refuses_a_length_short_of_the_addresses() {
        let four = v2(0x21, 0x11, &[0; 11]);
        let want = ProxyError::ShortAddresses {
            family: 0x11,
            len: 11,
        };
        assert_eq!(error(&four[..16]), want, "known from the fixed bytes");
        let six = v2(0x21, 0x21, &[0; 12]);
        let want = ProxyError::ShortAddresses {
            family: 0x21,
            len: 12,
        };
        assert_eq!(error(&six), want);
    }

    #[test]
    fn v2_refuses_badly_framed_tlvs() {
        for tlvs in [&[0xEA][..], &[0xEA, 0], &[0xEA, 0, 5, 1, 2], &[4, 0, 0, 4]] {
            let mut body = TCP4_BLOCK.to_vec();
            body.extend_from_slice(tlvs);
            assert_eq!(
                error(&v2(0x21, 0x11, &body)),
                ProxyError::BadTlv,
                "{tlvs:?}"
            );
        }
    }

    #[test]
    fn errors_read_as_one_line() {
        let errors = [
            error(b"GET"),
            error(b"PROXY TCP9"),
            error(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 080\r\n"),
            error(&v2(0x21, 0x31, &[])),
            error(&v2(0x21, 0x11, &[0; 3000])),
        ];
        for e in errors {
            let text = e.to_string();
            assert!(!text.is_empty() && !text.contains('\n'), "{text:?}");
        }
    }

    // --- read_header ---

    /// Hands out one byte per read; then `WouldBlock`, so a read past the
    /// end is an error the test sees rather than a hang.
    struct Trickle<'a>(&'a [u8]);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let (Some(first), Some(slot)) = (self.0.split_first(), buf.first_mut()) else {
                return Err(io::ErrorKind::WouldBlock.into());
            };
            *slot = *first.0;
            self.0 = first.1;
            Ok(1)
        }
    }

    #[test]
    fn read_header_leaves_the_clients_bytes_unread() {
        let headers = [
            encode_v1(addr("1.2.3.4:1000"), addr("5.6.7.8:80")),
            encode_v2(addr("[::1]:1000"), addr("[::2]:80")),
            b"PROXY UNKNOWN\r\n".to_vec(),
            v2(0x20, 0x00, &[]),
        ];
        for header in headers {
            let mut bytes = header.clone();
            bytes.extend_from_slice(b"\r\nclient bytes");
            let want = complete(&header).1;
            // A reader that returns as much as asked catches any over-read.
            let mut cursor = Cursor::new(&bytes[..]);
            assert_eq!(read_header(&mut cursor).expect("header"), want);
            assert_eq!(cursor.position() as usize, header.len());
            let mut trickle = Trickle(&bytes);
            assert_eq!(read_header(&mut trickle).expect("header"), want);
            assert_eq!(trickle.0, b"\r\nclient bytes");
        }
    }

    #[test]
    fn read_header_refuses_a_non_balancer_without_waiting_for_more() {
        // "hi" then WouldBlock: had it asked for more, the error would differ.
        let e = read_header(&mut Trickle(b"hi")).expect_err("not a header");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
        assert!(e.to_string().contains("not a PROXY"), "{e}");
        let e = read_header(&mut Cursor::new(&b"PROXY TCP4 1.2"[..])).expect_err("cut");
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn read_header_strips_the_header_from_a_tcp_stream() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr")).expect("dial");
        let (mut served, _) = listener.accept().expect("accept");
        let header = encode_v2(addr("203.0.113.9:40000"), addr("10.1.2.3:443"));
        io::Write::write_all(&mut client, &[&header[..], b"hello"].concat()).expect("send");
        drop(client);
        let got = read_header(&mut served).expect("header");
        assert_eq!(got, proxied("203.0.113.9:40000", "10.1.2.3:443"));
        let mut rest = Vec::new();
        served.read_to_end(&mut rest).expect("rest");
        assert_eq!(rest, b"hello");
    }

    // --- properties ---

    fn any_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            any::<([u8; 4], u16)>().prop_map(|(ip, port)| SocketAddr::from((ip, port))),
            any::<([u8; 16], u16)>().prop_map(|(ip, port)| SocketAddr::from((ip, port))),
            // IPv4-mapped IPv6, what a dual-stack socket reports.
            any::<([u8; 4], u16)>().prop_map(|(ip, port)| {
                let ip = Ipv4Addr::from(ip).to_ipv6_mapped();
                SocketAddr::V6(SocketAddrV6::new(ip, port, 0, 0))
            }),
        ]
    }

    /// What the header must say for `(source, destination)`: HAProxy's rule,
    /// written out independently of `one_family`.
    fn expected(source: SocketAddr, destination: SocketAddr) -> Header {
        let v6 = |a: SocketAddr| match a {
            SocketAddr::V4(a) => SocketAddr::from((a.ip().to_ipv6_mapped(), a.port())),
            SocketAddr::V6(a) => SocketAddr::from((*a.ip(), a.port())),
        };
        match (source, destination) {
            (SocketAddr::V4(_), SocketAddr::V4(_)) => Header::Proxied {
                source,
                destination,
            },
            _ => Header::Proxied {
                source: v6(source),
                destination: v6(destination),
            },
        }
    }

    /// Valid headers of every kind: both encodings, v1 UNKNOWN with a tail,
    /// v2 with TLVs, v2 LOCAL.
    fn any_header() -> impl Strategy<Value = Vec<u8>> {
        let tlv = (any::<u8>(), vec(any::<u8>(), 0..40));
        prop_oneof![
            (any_addr(), any_addr()).prop_map(|(s, d)| encode_v1(s, d)),
            (any_addr(), any_addr()).prop_map(|(s, d)| encode_v2(s, d)),
            "[ -~]{0,91}".prop_map(|tail| format!("PROXY UNKNOWN {tail}\r\n").into_bytes()),
            (any_addr(), any_addr(), vec(tlv, 0..6)).prop_map(|(s, d, tlvs)| {
                let mut body = encode_v2(s, d).split_off(V2_FIXED_LEN);
                for (kind, value) in tlvs {
                    body.push(kind);
                    body.extend_from_slice(&(value.len() as u16).to_be_bytes());
                    body.extend_from_slice(&value);
                }
                v2(
                    0x21,
                    if s.is_ipv4() && d.is_ipv4() {
                        0x11
                    } else {
                        0x21
                    },
                    &body,
                )
            }),
            vec(any::<u8>(), 0..64).prop_map(|body| v2(0x20, 0x00, &body)),
        ]
    }

    /// What any successfully parsed input must satisfy: re-encoding its
    /// addresses parses back to the same header in both versions, and a v2
    /// header without TLVs is byte for byte what `encode_v2` writes.
    fn check_reencoding(bytes: &[u8]) {
        let Ok(Parse::Complete { len, header }) = parse(bytes) else {
            return;
        };
        assert!(len <= bytes.len() && len <= MAX_HEADER_LEN);
        let Header::Proxied {
            source,
            destination,
        } = header
        else {
            return;
        };
        for encoded in [
            encode_v1(source, destination),
            encode_v2(source, destination),
        ] {
            assert_eq!(complete(&encoded), (encoded.len(), header));
        }
        let bare = match bytes.get(13) {
            Some(&FAM_TCP4) => len == V2_FIXED_LEN + TCP4_LEN,
            Some(&FAM_TCP6) => len == V2_FIXED_LEN + TCP6_LEN,
            _ => false,
        };
        if bytes.first() == Some(&b'\r') && bare {
            assert_eq!(encode_v2(source, destination), &bytes[..len]);
        }
    }

    proptest! {
        #[test]
        fn encodings_round_trip(source in any_addr(), destination in any_addr()) {
            let want = expected(source, destination);
            for encoded in [encode_v1(source, destination), encode_v2(source, destination)] {
                prop_assert!(encoded.len() <= MAX_HEADER_LEN);
                prop_assert_eq!(parse(&encoded), Ok(Parse::Complete { len: encoded.len(), header: want }));
            }
            prop_assert!(encode_v1(source, destination).len() <= 104);
        }

        #[test]
        fn every_strict_prefix_is_incomplete(header in any_header()) {
            let (len, _) = complete(&header);
            prop_assert_eq!(len, header.len());
            for cut in 0..len {
                prop_assert_eq!(parse(&header[..cut]), Ok(Parse::Incomplete), "cut at {}", cut);
            }
        }

        #[test]
        fn the_header_ends_where_the_clients_bytes_begin(
            header in any_header(),
            data in vec(any::<u8>(), 0..200),
        ) {
            let want = complete(&header);
            let bytes = [&header[..], &data[..]].concat();
            prop_assert_eq!(complete(&bytes), want);
            let mut trickle = Trickle(&bytes);
            prop_assert_eq!(read_header(&mut trickle).expect("header"), want.1);
            prop_assert_eq!(trickle.0, &data[..]);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..300)) {
            check_reencoding(&bytes);
            let _ = read_header(&mut Cursor::new(&bytes[..]));
        }

        #[test]
        fn mutated_headers_parse_consistently(
            header in any_header(),
            edits in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            data in vec(any::<u8>(), 0..16),
        ) {
            let mut bytes = [&header[..], &data[..]].concat();
            for (at, byte) in edits {
                let at = at.index(bytes.len());
                bytes[at] = byte;
            }
            check_reencoding(&bytes);
            // A verdict on a prefix is final: an error stays an error and a
            // header stays the same header as bytes are added.
            let mut settled: Option<Result<Parse, ProxyError>> = None;
            for cut in 0..=bytes.len() {
                let now = parse(&bytes[..cut]);
                match &settled {
                    Some(Err(_)) => prop_assert!(now.is_err(), "cut {}: {:?}", cut, now),
                    Some(Ok(done)) => prop_assert_eq!(&now, &Ok(*done)),
                    None => {}
                }
                if now != Ok(Parse::Incomplete) {
                    settled.get_or_insert(now);
                }
            }
        }
    }
}
