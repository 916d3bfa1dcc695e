//! The status endpoint's connections (`--metrics`), served on the loop they
//! report on: each reads one bounded request, gets its answer from the
//! loop's handler, writes it and is closed (`Connection: close`: no
//! keep-alive, nothing to frame after the head).
//!
//! Bounded like every other peer: a request head of at most
//! [`MAX_HEAD`](super::http::MAX_HEAD) bytes, [`DEADLINE`] to send it and
//! take the answer, at most [`MAX_CONNS`] connections at once (more are
//! closed as soon as they are accepted), so slow or hostile scrapers cost
//! the relay a handful of descriptors and nothing else.

use std::time::Duration;

use mio::event::Event;
use mio::net::TcpStream;

use super::http::{self, MAX_HEAD, Method, Parsed, Response, Status};
use crate::sockio::{Io, read_slice, write_slice};

/// Most status connections held at once: a scraper, a browser tab or two
/// and some slack; beyond it a connection is closed at once.
pub(crate) const MAX_CONNS: usize = 16;

/// Time a status connection has to send its request and take the answer.
pub(crate) const DEADLINE: Duration = Duration::from_secs(5);

/// One connection to the status endpoint.
pub(crate) struct StatusConn {
    pub(crate) stream: TcpStream, // the scraper's or browser's connection
    head: Vec<u8>,                // the request so far, at most MAX_HEAD bytes
    out: Vec<u8>,                 // the answer, once known
    sent: usize,                  // bytes of it written
    readable: bool,               // software readiness, as for every socket
    writable: bool,
    draining: bool, // answered and shut: discarding until the peer's EOF
}

/// Where a status connection stands.
pub(crate) enum Request {
    /// Wait for the next event.
    Pending,
    /// A whole, valid request: answer it with [`StatusConn::answer`].
    Route {
        method: Method, // GET or HEAD
        path: String,   // the target, query removed
    },
    /// The answer is out (or the peer left): close the connection.
    Done,
}

impl StatusConn {
    /// A connection just accepted (both halves worth a try).
    pub(crate) fn new(stream: TcpStream) -> Self {
        StatusConn {
            stream,
            head: Vec::new(),
            out: Vec::new(),
            sent: 0,
            readable: true,
            writable: true,
            draining: false,
        }
    }

    /// Records what an event says.
    pub(crate) fn note(&mut self, event: &Event) {
        self.readable |= event.is_readable() || event.is_read_closed() || event.is_error();
        self.writable |= event.is_writable() || event.is_write_closed() || event.is_error();
    }

    /// Reads the request while there is room for it; once its head is
    /// whole, says what was asked. A bad request is answered here (400,
    /// 405, 431, 505), and so is a request still incomplete at the cap.
    pub(crate) fn read(&mut self) -> Request {
        if self.draining {
            return self.drain();
        }
        if !self.out.is_empty() {
            return self.flush();
        }
        let mut buf = [0u8; 1024];
        while self.readable {
            let room = (MAX_HEAD - self.head.len()).min(buf.len());
            match read_slice(&self.stream, &mut buf[..room.max(1)]) {
                Io::Moved(n) => self.head.extend_from_slice(&buf[..n]),
                Io::WouldBlock => self.readable = false,
                Io::Eof | Io::Reset | Io::Failed(_) => return Request::Done,
            }
            match http::parse(&self.head) {
                Ok(Parsed::Incomplete) if self.head.len() < MAX_HEAD => {}
                Ok(Parsed::Incomplete) => return self.refuse(Status::HeadTooLarge),
                Ok(Parsed::Complete { method, path, .. }) => {
                    let path = path.to_owned();
                    return Request::Route { method, path };
                }
                Err(status) => return self.refuse(status),
            }
        }
        Request::Pending
    }

    /// Queues the answer to the request and writes what fits.
    pub(crate) fn answer(&mut self, response: &Response, method: Method) -> Request {
        self.out = response.to_bytes(Some(method));
        self.flush()
    }

    /// Answers a bad request with its status and writes what fits.
    fn refuse(&mut self, status: Status) -> Request {
        self.out = Response::error(status).to_bytes(None);
        self.flush()
    }

    /// Writes the answer; once all of it is out, shuts our half and drains
    /// (see [`drain`](Self::drain)). [`Request::Pending`] while the socket
    /// is full, [`Request::Done`] when the peer is gone.
    fn flush(&mut self) -> Request {
        while self.writable && self.sent < self.out.len() {
            match write_slice(&self.stream, &self.out[self.sent..]) {
                Io::Moved(n) => self.sent += n,
                Io::WouldBlock => self.writable = false,
                Io::Eof | Io::Reset | Io::Failed(_) => return Request::Done,
            }
        }
        if self.sent < self.out.len() {
            return Request::Pending;
        }
        self.draining = true;
        if self.stream.shutdown(std::net::Shutdown::Write).is_err() {
            return Request::Done;
        }
        self.drain()
    }

    /// The answer is out and our half shut: read and discard until the
    /// peer ends its side, then [`Request::Done`]. Closing at once would
    /// reset the connection if the peer's request (an oversized head, a
    /// body) was not all read, and a reset can destroy the answer in flight
    /// before the peer reads it (RFC 9112, section 9.6, "lingering close").
    /// The connection's deadline bounds the wait.
    fn drain(&mut self) -> Request {
        let mut buf = [0u8; 1024];
        while self.readable {
            match read_slice(&self.stream, &mut buf) {
                Io::Moved(_) => {}
                Io::WouldBlock => self.readable = false,
                Io::Eof | Io::Reset | Io::Failed(_) => return Request::Done,
            }
        }
        Request::Pending
    }
}

/// The answer for `path`: `/` the page, `/metrics` the Prometheus text
/// `metrics` makes, `/status` the JSON `status` makes, anything else 404.
pub(crate) fn route(
    path: &str,
    metrics: impl FnOnce() -> String,
    status: impl FnOnce() -> String,
) -> Response {
    match path {
        "/" => Response::ok(super::page::CONTENT_TYPE, super::page::PAGE),
        "/metrics" => Response::ok(super::prometheus::CONTENT_TYPE, metrics()),
        "/status" => Response::ok("application/json", status()),
        _ => Response::error(Status::NotFound),
    }
}
