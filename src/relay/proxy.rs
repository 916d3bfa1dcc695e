//! The `proxy` extension: clients' real addresses, both ways.
//!
//! * **Out, to an app that asks** (`proxy v1` or `proxy v2` on its control
//!   connection, answered with the same line): every dial-in paired with a
//!   client gets a PROXY protocol header naming that client before any of
//!   the client's bytes; source the client's address (as the relay saw it,
//!   or as a trusted balancer named it), destination the relayed port's
//!   address the client connected to.
//! * **In, from a balancer in front** (`serve --accept-proxy-from`): a
//!   client connection from a listed address must begin with a v1 or v2
//!   header (`Unwrapping`, under the registration timeout); the address in
//!   it replaces the balancer's for everything after. A header from any
//!   other source is never looked for: it is client data.
//!
//! The header format is in [`crate::proxy_protocol`].

use std::net::SocketAddr;
use std::time::Instant;

use mio::Interest;
use mio::net::TcpStream;

use super::core::RelayCore;
use super::state::{CLIENT, Ending, RelayConn};
use super::status::{Listener, Refused};
use crate::protocol::{ProtocolError, Refusal, proxy_line};
use crate::proxy_protocol::{self, MAX_HEADER_LEN, Parse};
use crate::reactor;
use crate::sockio::{Io, reset_on_close, write_slice};
use crate::table::Id;

/// A client from a trusted balancer whose PROXY header is being read.
pub(super) struct Unwrap {
    pub(super) stream: TcpStream, // the client connection, from the balancer
    pub(super) from: SocketAddr,  // the balancer's address
    pub(super) app: Id,           // the app whose relayed port it came to
}

/// What reading a trusted client's header found.
enum Unwrapped {
    Pending,            // not all of it yet
    Client(SocketAddr), // the client's address (the balancer's own for a health check)
    Broken(String),     // not a valid header: reset the connection
}

impl RelayCore {
    /// `proxy v1|v2`: begin the app's dial-ins with that header from now
    /// on, and say so with the same line; a bad version is refused.
    pub(super) fn answer_proxy_request(
        &mut self,
        id: Id,
        request: Result<proxy_protocol::ProxyVersion, ProtocolError>,
    ) {
        let version = match request {
            Ok(version) => version,
            Err(e) => return self.refuse(id, Refusal::BadProxyRequest(e.to_string())),
        };
        let Some(app) = self.app_mut(id) else {
            return;
        };
        app.proxy = Some(version);
        app.control.queue(&proxy_line(version));
        log::debug!(
            "app {}: dial-ins begin with PROXY {version} headers",
            app.control.peer
        );
    }

    /// The header a dial-in of app `app` must begin with for a client at
    /// `peer` on socket `client`, if the app asked for one.
    pub(super) fn proxy_header(
        &self,
        app: Id,
        client: &TcpStream,
        peer: SocketAddr,
    ) -> Option<Vec<u8>> {
        let app = self.app(app)?;
        let version = app.proxy?;
        // The address the client connected to: the relayed port on the
        // interface it came in on (the listener may be bound to all).
        let destination = client
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::new(self.config.bind, app.relayed_port));
        Some(version.encode(peer, destination))
    }

    /// A client on a relayed port from a source `--accept-proxy-from`
    /// trusts: its header names the real client. Read it first.
    pub(super) fn unwrap(
        &mut self,
        app: Id,
        mut stream: TcpStream,
        from: SocketAddr,
        now: Instant,
    ) {
        let inserted = self.table.insert(|id, registry| {
            registry.register(&mut stream, id.token(CLIENT), Interest::READABLE)?;
            Ok(RelayConn::Unwrapping(Unwrap { stream, from, app }))
        });
        match inserted {
            Ok(id) => {
                self.table.arm(id, now + self.config.register_timeout);
                self.read_proxy_header(id, now);
            }
            Err(e) => log::warn!("client from {from} dropped: cannot register: {e}"),
        }
    }

    /// Reads a trusted client's header, byte-exact (what follows it is the
    /// client's); once whole, the client is admitted under the address it
    /// names, as if it had connected itself.
    pub(super) fn read_proxy_header(&mut self, id: Id, now: Instant) {
        let Some(RelayConn::Unwrapping(unwrap)) = self.table.get(id) else {
            return;
        };
        let from = unwrap.from;
        let peer = match read_header(&unwrap.stream, from) {
            Unwrapped::Pending => return,
            Unwrapped::Client(peer) => peer,
            Unwrapped::Broken(why) => {
                log::warn!("client from {from} reset: {why}");
                self.metrics
                    .refused(Listener::Relayed, Refused::ProxyHeader);
                return self.close(id, Ending::Reset);
            }
        };
        let Some(RelayConn::Unwrapping(mut unwrap)) = self.table.take(id) else {
            return;
        };
        self.table.close(id, Ending::Done);
        // Admitting registers the socket under its new entry's token.
        let _ = self.table.registry().deregister(&mut unwrap.stream);
        self.admit_client(unwrap.app, unwrap.stream, peer, now);
    }

    /// A trusted client entry closed before its header was whole.
    pub(super) fn retire_unwrap(&mut self, mut unwrap: Unwrap) {
        reset_on_close(&unwrap.stream);
        reactor::forget(self.table.registry(), &mut unwrap.stream);
    }

    /// Whether a client connecting from `peer` comes through a balancer the
    /// relay trusts to name the real client.
    pub(super) fn is_trusted_balancer(&self, peer: SocketAddr) -> bool {
        self.config
            .accept_proxy_from
            .as_ref()
            .is_some_and(|trusted| trusted.allows(peer.ip()))
    }
}

/// Peeks at what a trusted client sent and parses it as a header; once it
/// is whole, reads exactly its bytes (never one of the client's after it).
fn read_header(stream: &TcpStream, from: SocketAddr) -> Unwrapped {
    let mut buf = [0u8; MAX_HEADER_LEN];
    let n = match stream.peek(&mut buf) {
        Ok(0) => return Unwrapped::Broken("closed before its PROXY header".into()),
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Unwrapped::Pending,
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Unwrapped::Pending,
        Err(e) => return Unwrapped::Broken(format!("reading its PROXY header: {e}")),
    };
    match proxy_protocol::parse(&buf[..n]) {
        Ok(Parse::Incomplete) => Unwrapped::Pending,
        Ok(Parse::Complete { len, header }) => match consume(stream, len) {
            true => Unwrapped::Client(header.source().unwrap_or(from)),
            false => Unwrapped::Broken("its PROXY header could not be read".into()),
        },
        Err(e) => Unwrapped::Broken(format!("bad PROXY header: {e}")),
    }
}

/// Reads exactly `len` bytes already peeked at (so they are there to read).
fn consume(stream: &TcpStream, len: usize) -> bool {
    let mut buf = [0u8; MAX_HEADER_LEN];
    let mut got = 0;
    while got < len {
        match crate::sockio::read_slice(stream, &mut buf[got..len]) {
            Io::Moved(n) => got += n,
            Io::WouldBlock | Io::Eof | Io::Reset | Io::Failed(_) => return false,
        }
    }
    true
}

/// Writes a PROXY header as the first bytes toward a dial-in. Nothing has
/// been written to that socket yet, so its send buffer is empty and a
/// header (at most 107 bytes for v1, 52 for v2) goes out whole in one
/// write; anything else means the dial-in is gone.
pub(super) fn send_header(dial_in: &TcpStream, header: &[u8]) -> bool {
    matches!(write_slice(dial_in, header), Io::Moved(n) if n == header.len())
}
