//! The `port` extension (`port N` on the control connection): the app's
//! relayed port moves to the one it asked for, answered with a fresh
//! `established` line, or the app is told why not and closed. Its dial-in
//! listener and waiting clients stay as they are.

use std::net::SocketAddr;

use mio::Interest;
use mio::net::TcpListener;

use super::core::RelayCore;
use super::state::RELAYED;
use crate::protocol::{ProtocolError, Refusal, established_line};
use crate::reactor;
use crate::sockio::{listen, no_delay_listener};
use crate::table::Id;

impl RelayCore {
    /// Answers a `port` request: the same port is confirmed, a free one in
    /// the range is opened and swapped in, anything else is refused.
    pub(super) fn answer_port_request(&mut self, id: Id, request: Result<u16, ProtocolError>) {
        let port = match request {
            Ok(port) => port,
            Err(e) => return self.refuse(id, Refusal::BadPortRequest(e.to_string())),
        };
        let Some(old) = self.app(id).map(|app| app.relayed_port) else {
            return;
        };
        if port == old {
            if let Some(app) = self.app_mut(id) {
                app.control.queue(&established_line(port));
            }
            return;
        }
        match self.open_requested_port(id, port) {
            Ok(listener) => self.move_relayed_port(id, listener, port),
            Err(refusal) => self.refuse(id, refusal),
        }
    }

    /// A listener on `port` for app `id`, registered, if the port is in the
    /// relay's range, not held by another app and free.
    fn open_requested_port(&self, id: Id, port: u16) -> Result<TcpListener, Refusal> {
        let (lo, hi) = self.port_range();
        if self.config.port_range.is_some() && !(lo..=hi).contains(&port) {
            return Err(Refusal::PortOutsideRange { port, lo, hi });
        }
        if self.held_ports.contains(&port) || port == self.reg_addr.port() {
            return Err(Refusal::PortTaken(port));
        }
        let unavailable = |e: std::io::Error| Refusal::PortUnavailable(port, e.to_string());
        let mut relayed = listen(SocketAddr::new(self.config.bind, port), self.config.backlog)
            .map_err(unavailable)?;
        no_delay_listener(&relayed);
        self.table
            .registry()
            .register(&mut relayed, id.token(RELAYED), Interest::READABLE)
            .map_err(unavailable)?;
        Ok(relayed)
    }

    /// Swaps an app's relayed listener for `listener` on `port` and tells it.
    fn move_relayed_port(&mut self, id: Id, listener: TcpListener, port: u16) {
        let Some(app) = self.app_mut(id) else {
            return;
        };
        let mut closing = std::mem::replace(&mut app.relayed, listener);
        let old = std::mem::replace(&mut app.relayed_port, port);
        app.control.queue(&established_line(port));
        log::info!(
            "app {} moved to relayed port {port} at its request; port {old} closed",
            app.control.peer
        );
        reactor::forget(self.table.registry(), &mut closing); // closed when dropped here
        self.held_ports.remove(&old);
        self.held_ports.insert(port);
    }
}
