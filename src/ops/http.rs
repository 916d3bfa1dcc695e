//! A bounded HTTP/1.1 request-head parser and response builder, enough for a
//! read-only status endpoint: `GET` and `HEAD`, one request per connection.
//!
//! The reactor reads a connection's bytes into a buffer of at most
//! [`MAX_HEAD`] bytes and calls [`respond`] (or [`parse`]) after each read:
//! `None` (or [`Parsed::Incomplete`]) means read more; anything else is the
//! whole response, after which the connection is closed (`Connection:
//! close`, so there is no pipelining, no keep-alive and no request body to
//! frame: bytes after the head are never looked at).
//!
//! Hand-written rather than `httparse`: the endpoint needs the request line
//! and no header's value, the checks that make a head well-formed
//! (RFC 9112) fit in this file, and the codebase parses its own control
//! protocol the same way (pure, bounded, tested with adversarial input).
//!
//! What is refused, and how:
//!
//! | input | status |
//! |---|---|
//! | a head longer than [`MAX_HEAD`] | 431 Request Header Fields Too Large |
//! | a malformed request line or header, a control byte, a bare LF, an obsolete line fold, a target not starting with `/`, HTTP/1.1 without exactly one `Host` | 400 Bad Request |
//! | a version other than HTTP/1.x | 505 HTTP Version Not Supported |
//! | a method other than `GET` and `HEAD` | 405 Method Not Allowed, with `Allow: GET, HEAD` |
//! | a path the caller does not route | 404 Not Found |
//!
//! A request that is bad from its first bytes (a TLS handshake sent to the
//! plain port, binary noise) is refused as soon as they arrive, not after
//! the peer has filled the buffer or timed out.

/// Longest request head accepted, request line and headers included. A
/// browser's GET is well under 2 KiB even with a few cookies for the host;
/// 8 KiB is the common server default (nginx's header buffers, Apache's
/// request-line limit), and it bounds what one connection can make us hold
/// and rescan.
pub const MAX_HEAD: usize = 8 * 1024;

/// The methods served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Fetch the resource.
    Get,
    /// The headers `GET` would send, without the body.
    Head,
}

/// What the bytes read so far hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parsed<'a> {
    /// A valid beginning; read more.
    Incomplete,
    /// A whole, valid head.
    Complete {
        method: Method,  // GET or HEAD
        path: &'a str,   // the target up to `?`, starting with `/`
        head_len: usize, // bytes up to and including the blank line
    },
}

/// The statuses this endpoint answers with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// 200: here it is.
    Ok,
    /// 400: the head is malformed.
    BadRequest,
    /// 404: no such path.
    NotFound,
    /// 405: only GET and HEAD are served.
    MethodNotAllowed,
    /// 431: the head is longer than [`MAX_HEAD`].
    HeadTooLarge,
    /// 505: not HTTP/1.x.
    VersionNotSupported,
}

impl Status {
    /// The status code.
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::BadRequest => 400,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::HeadTooLarge => 431,
            Status::VersionNotSupported => 505,
        }
    }

    /// The reason phrase of RFC 9110 (RFC 6585 for 431).
    pub fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::BadRequest => "Bad Request",
            Status::NotFound => "Not Found",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::HeadTooLarge => "Request Header Fields Too Large",
            Status::VersionNotSupported => "HTTP Version Not Supported",
        }
    }
}

/// Parses the request head at the start of `buf`; an error is the status
/// to answer with. Rescans from the start on every call, which the
/// [`MAX_HEAD`] cap keeps cheap.
pub fn parse(buf: &[u8]) -> Result<Parsed<'_>, Status> {
    let window = &buf[..buf.len().min(MAX_HEAD)];
    // RFC 9112 §2.2: a server SHOULD ignore empty lines before the request.
    let start = leading_empty_lines(window);
    let mut lines = Lines {
        buf: window,
        pos: start,
    };
    let Some(request_line) = lines.next()? else {
        return incomplete(&window[start..], buf.len());
    };
    let (method, path, http11) = parse_request_line(request_line)?;
    let mut hosts = 0;
    loop {
        let Some(line) = lines.next()? else {
            return incomplete(&window[lines.pos..], buf.len());
        };
        if line.is_empty() {
            break;
        }
        if parse_header_name(line)?.eq_ignore_ascii_case(b"host") {
            hosts += 1;
        }
    }
    // RFC 9112 §3.2: an HTTP/1.1 request without exactly one Host is a 400.
    if http11 && hosts != 1 {
        return Err(Status::BadRequest);
    }
    Ok(Parsed::Complete {
        method,
        path,
        head_len: lines.pos,
    })
}

/// What an unfinished head means: read more, unless the unfinished part
/// already holds a byte no head may carry, or the cap is reached.
fn incomplete(partial: &[u8], received: usize) -> Result<Parsed<'static>, Status> {
    if partial.iter().any(|&b| is_forbidden(b)) {
        return Err(Status::BadRequest);
    }
    if received >= MAX_HEAD {
        return Err(Status::HeadTooLarge);
    }
    Ok(Parsed::Incomplete)
}

/// Control bytes other than HTAB, CR and LF, and DEL: never valid in a head.
fn is_forbidden(byte: u8) -> bool {
    (byte < 0x20 && !matches!(byte, b'\t' | b'\r' | b'\n')) || byte == 0x7f
}

fn leading_empty_lines(buf: &[u8]) -> usize {
    let mut pos = 0;
    while buf[pos..].starts_with(b"\r\n") {
        pos += 2;
    }
    pos
}

/// The CRLF-terminated lines of a head; a bare LF is an error (RFC 9112
/// §2.2 lets a server refuse it, and accepting it invites disagreement
/// with whatever proxy sits in front).
struct Lines<'a> {
    buf: &'a [u8], // the bytes received, at most MAX_HEAD
    pos: usize,    // start of the next line
}

impl<'a> Lines<'a> {
    /// The next complete line without its CRLF, or `None` if it has not
    /// fully arrived.
    fn next(&mut self) -> Result<Option<&'a [u8]>, Status> {
        let rest = &self.buf[self.pos..];
        let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
            return Ok(None);
        };
        let line = rest[..lf].strip_suffix(b"\r").ok_or(Status::BadRequest)?;
        if line.iter().any(|&b| is_forbidden(b) || b == b'\r') {
            return Err(Status::BadRequest);
        }
        self.pos += lf + 1;
        Ok(Some(line))
    }
}

/// `METHOD SP /target SP HTTP/1.x`, checked in the order that gives the
/// most useful answer: syntax (400), version (505), then method (405).
fn parse_request_line(line: &[u8]) -> Result<(Method, &str, bool), Status> {
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Status::BadRequest);
    };
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return Err(Status::BadRequest);
    }
    let path = parse_target(target)?;
    let http11 = parse_version(version)?;
    let method = match method {
        b"GET" => Method::Get,
        b"HEAD" => Method::Head,
        _ => return Err(Status::MethodNotAllowed),
    };
    Ok((method, path, http11))
}

/// The path of an origin-form target (`/path?query`): printable ASCII, no
/// fragment. Absolute-form is for proxies, which this is not.
fn parse_target(target: &[u8]) -> Result<&str, Status> {
    let printable = target.iter().all(|&b| b.is_ascii_graphic() && b != b'#');
    if !printable || target.first() != Some(&b'/') {
        return Err(Status::BadRequest);
    }
    let path = target.split(|&b| b == b'?').next().unwrap_or(target);
    std::str::from_utf8(path).map_err(|_| Status::BadRequest)
}

/// Whether the version is HTTP/1.1 or later 1.x (which must send `Host`);
/// HTTP/1.0 is served too, other majors are refused with 505.
fn parse_version(version: &[u8]) -> Result<bool, Status> {
    match version {
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            match major {
                b'1' => Ok(*minor >= b'1'),
                _ => Err(Status::VersionNotSupported),
            }
        }
        _ => Err(Status::BadRequest),
    }
}

/// The name of a `name: value` header line. RFC 9112 §5.1: no whitespace
/// before the colon; §5.2: a line starting with whitespace (an obsolete
/// fold) may be refused, and is.
fn parse_header_name(line: &[u8]) -> Result<&[u8], Status> {
    let colon = line
        .iter()
        .position(|&b| b == b':')
        .ok_or(Status::BadRequest)?;
    let name = &line[..colon];
    if name.is_empty() || !name.iter().all(|&b| is_tchar(b)) {
        return Err(Status::BadRequest);
    }
    Ok(name)
}

/// A `tchar` of RFC 9110 §5.6.2: the characters of methods and header names.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// A response: status, content type and body; the headers are fixed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    status: Status,             // the status line's
    content_type: &'static str, // the body's media type
    body: Vec<u8>,              // sent for GET, counted (not sent) for HEAD
}

impl Response {
    /// A 200 response with this body.
    pub fn ok(content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status: Status::Ok,
            content_type,
            body: body.into(),
        }
    }

    /// An error response whose plain-text body repeats the status line.
    pub fn error(status: Status) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: format!("{} {}\n", status.code(), status.reason()).into_bytes(),
        }
    }

    /// The bytes to send in answer to `method` (`None` when the request was
    /// too broken to have one): `HEAD` gets the headers only, with the
    /// `Content-Length` that `GET` would get.
    pub fn to_bytes(&self, method: Option<Method>) -> Vec<u8> {
        let mut head = format!(
            "HTTP/1.1 {} {}\r\n\
             Content-Type: {}\r\n\
             Content-Length: {}\r\n\
             Cache-Control: no-store\r\n\
             X-Content-Type-Options: nosniff\r\n\
             Connection: close\r\n",
            self.status.code(),
            self.status.reason(),
            self.content_type,
            self.body.len()
        );
        if self.status == Status::MethodNotAllowed {
            head.push_str("Allow: GET, HEAD\r\n");
        }
        head.push_str("\r\n");
        let mut bytes = head.into_bytes();
        if method != Some(Method::Head) {
            bytes.extend_from_slice(&self.body);
        }
        bytes
    }
}

#[cfg(test)] // only the tests read it
/// The whole answer to the request head at the start of `buf`, or `None`
/// while it is incomplete. `route` maps a path to its response; `None`
/// from it is a 404.
pub fn respond(buf: &[u8], route: impl FnOnce(&str) -> Option<Response>) -> Option<Vec<u8>> {
    match parse(buf) {
        Ok(Parsed::Incomplete) => None,
        Ok(Parsed::Complete { method, path, .. }) => {
            let response = route(path).unwrap_or_else(|| Response::error(Status::NotFound));
            Some(response.to_bytes(Some(method)))
        }
        Err(status) => Some(Response::error(status).to_bytes(None)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CURL: &[u8] =
        b"GET /status?x=1 HTTP/1.1\r\nHost: 127.0.0.1:9090\r\nUser-Agent: curl/8\r\nAccept: */*\r\n\r\n";

    fn status_of(head: &[u8]) -> Result<Parsed<'_>, Status> {
        parse(head)
    }

    #[test]
    fn a_curl_request_parses_with_its_path_and_length() {
        let mut buf = CURL.to_vec();
        buf.extend_from_slice(b"trailing bytes are not looked at");
        assert_eq!(
            parse(&buf),
            Ok(Parsed::Complete {
                method: Method::Get,
                path: "/status",
                head_len: CURL.len()
            })
        );
        let head = b"HEAD / HTTP/1.0\r\n\r\n";
        let parsed = parse(head).expect("HTTP/1.0 HEAD without Host");
        assert_eq!(
            parsed,
            Parsed::Complete {
                method: Method::Head,
                path: "/",
                head_len: head.len()
            }
        );
    }

    #[test]
    fn every_prefix_is_incomplete_and_the_whole_is_complete() {
        for n in 0..CURL.len() {
            assert_eq!(parse(&CURL[..n]), Ok(Parsed::Incomplete), "prefix {n}");
        }
        assert!(matches!(parse(CURL), Ok(Parsed::Complete { .. })));
    }

    #[test]
    fn leading_empty_lines_are_skipped() {
        let head = b"\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n";
        let Ok(Parsed::Complete { head_len, .. }) = parse(head) else {
            panic!("leading CRLFs are allowed");
        };
        assert_eq!(head_len, head.len());
    }

    #[test]
    fn other_methods_get_405_and_other_versions_505() {
        for method in ["POST", "PUT", "DELETE", "OPTIONS", "get", "BREW"] {
            let head = format!("{method} / HTTP/1.1\r\nHost: x\r\n\r\n");
            assert_eq!(
                status_of(head.as_bytes()),
                Err(Status::MethodNotAllowed),
                "{method}"
            );
        }
        for version in ["HTTP/2.0", "HTTP/0.9", "HTTP/3.0"] {
            let head = format!("GET / {version}\r\nHost: x\r\n\r\n");
            assert_eq!(status_of(head.as_bytes()), Err(Status::VersionNotSupported));
        }
    }

    #[test]
    fn malformed_heads_get_400() {
        let bad: &[&[u8]] = &[
            b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1 \r\nHost: x\r\n\r\n",
            b"GET /\r\n\r\n",
            b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET * HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /a#b HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /\xc3\xa9 HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\rY: z\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost : x\r\n\r\n",
            b"GET / HTTP/1.1\r\n: x\r\nHost: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\x00y\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n",
            b"GET / HTTP/1.x\r\nHost: x\r\n\r\n",
            b"G(T / HTTP/1.1\r\nHost: x\r\n\r\n",
            b" GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        ];
        for head in bad {
            let shown = String::from_utf8_lossy(head);
            assert_eq!(status_of(head), Err(Status::BadRequest), "{shown:?}");
        }
    }

    #[test]
    fn header_values_may_carry_tabs_and_non_ascii() {
        let head = b"GET / HTTP/1.1\r\nHost: x\r\nX-Note:\tcaf\xc3\xa9\r\n\r\n";
        assert!(matches!(parse(head), Ok(Parsed::Complete { .. })));
    }

    #[test]
    fn hopeless_input_is_refused_before_the_head_ends() {
        // A TLS ClientHello's first bytes, and a half-sent refused method.
        assert_eq!(parse(b"\x16\x03\x01\x02\x00\x01"), Err(Status::BadRequest));
        assert_eq!(
            parse(b"POST / HTTP/1.1\r\nHo"),
            Err(Status::MethodNotAllowed)
        );
        assert_eq!(parse(b"GET / HTTP/1.1\r\nA: \x01"), Err(Status::BadRequest));
        assert_eq!(parse(b"GET / HTTP/1.1\n"), Err(Status::BadRequest));
    }

    #[test]
    fn the_head_is_capped() {
        let mut head = b"GET / HTTP/1.1\r\nHost: x\r\nX: ".to_vec();
        head.resize(MAX_HEAD - 1, b'a');
        assert_eq!(
            parse(&head),
            Ok(Parsed::Incomplete),
            "one byte short of the cap"
        );
        head.push(b'a');
        assert_eq!(parse(&head), Err(Status::HeadTooLarge));
        head.truncate(MAX_HEAD - 4);
        head.extend_from_slice(b"\r\n\r\n");
        assert_eq!(head.len(), MAX_HEAD);
        assert!(matches!(
            parse(&head),
            Ok(Parsed::Complete {
                head_len: MAX_HEAD,
                ..
            })
        ));
        head.truncate(MAX_HEAD - 4);
        head.extend_from_slice(b"a\r\n\r\n");
        assert_eq!(
            parse(&head),
            Err(Status::HeadTooLarge),
            "the terminator past the cap"
        );
    }

    #[test]
    fn responses_carry_the_fixed_headers() {
        let response = Response::ok("application/json", &b"{}"[..]);
        let expected_head = "HTTP/1.1 200 OK\r\n\
                             Content-Type: application/json\r\n\
                             Content-Length: 2\r\n\
                             Cache-Control: no-store\r\n\
                             X-Content-Type-Options: nosniff\r\n\
                             Connection: close\r\n\r\n";
        let get = response.to_bytes(Some(Method::Get));
        assert_eq!(
            String::from_utf8_lossy(&get),
            format!("{expected_head}{{}}")
        );
        let head = response.to_bytes(Some(Method::Head));
        assert_eq!(String::from_utf8_lossy(&head), expected_head);
    }

    #[test]
    fn respond_routes_and_refuses() {
        let route = |path: &str| (path == "/status").then(|| Response::ok("text/plain", "up"));
        let text =
            |bytes: Option<Vec<u8>>| String::from_utf8(bytes.expect("complete")).expect("text");
        assert!(text(respond(CURL, route)).ends_with("\r\n\r\nup"));
        let missing = text(respond(b"GET /nope HTTP/1.0\r\n\r\n", route));
        assert!(
            missing.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{missing}"
        );
        assert!(missing.ends_with("\r\n\r\n404 Not Found\n"), "{missing}");
        let head_404 = text(respond(b"HEAD /nope HTTP/1.0\r\n\r\n", route));
        assert!(
            head_404.ends_with("Connection: close\r\n\r\n"),
            "{head_404}"
        );
        let post = text(respond(b"POST /status HTTP/1.0\r\n\r\n", route));
        assert!(
            post.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{post}"
        );
        assert!(post.contains("\r\nAllow: GET, HEAD\r\n"), "{post}");
        let big = text(respond(&[b'G'; MAX_HEAD], route));
        assert!(big.starts_with("HTTP/1.1 431 "), "{big}");
        assert_eq!(respond(b"GET /status HTTP/1.1\r\n", route), None);
    }
}
