//! The agent's entries: its registrations with a relay (a control
//! connection each, by phase) and its clients (their connects, then the
//! service), with the data each phase owns.
//!
//! ```text
//!  registration:  Reconnecting ─(time)─► Connecting ─(connected)─► Registering
//!                      ▲                     │                         │
//!                      │                     │ failed       established (and the
//!                      │                     ▼              answer to `port N`)
//!                      └── back-off ◄──── lost ◄──────────────── Registered
//!                            (or give up: --no-reconnect, a refused request)
//!
//!  client:  dial line ─► Dialing ─(both connects done)─► Piping / Echoing ─► closed
//!                          └── a connect failed or timed out ──► closed (reset)
//!
//!  (a client done while its peers have not acknowledged every byte stays
//!   Flushing until they have: Piping / Echoing ─► Flushing ─► closed)
//! ```

use std::io;
use std::net::SocketAddr;
use std::time::SystemTime;

use mio::net::TcpStream;

use super::control::LinkConn;
use crate::auth::DialToken;
use crate::flush::Flush;
use crate::ops::server::StatusConn;
use crate::pipe::{Echo, Pipe, RxState};
use crate::table::{Id, State};

/// One entry of the agent's table.
pub(super) enum AgentConn {
    /// A registration waiting to (re)connect to its relay.
    Reconnecting(Link),
    /// A registration whose connect to the relay is under way.
    Connecting(Link, TcpStream),
    /// Connected; waiting for the established line (and the answer to a
    /// `port` request). The connection is boxed: with its registration's
    /// requests it is the largest part of any state, and every entry of the
    /// table (mostly clients) is as large as the largest state.
    Registering(Link, Box<LinkConn>),
    /// Registered on a relayed port; serving dial lines.
    Registered(Link, Box<LinkConn>),
    /// A client's connects under way: its dial-in, and the local service.
    Dialing(Dialing),
    /// A dial-in being echoed (the sample app).
    Echoing(Echo),
    /// A dial-in piped to the local service.
    Piping(Pipe),
    /// A finished client (piped or echoed) whose peers have not
    /// acknowledged every byte yet (see `crate::flush`); it holds its
    /// sockets, so it counts as served until they have.
    Flushing(Flush),
    /// (`status`) A connection to the status endpoint (`--metrics`).
    Observer(StatusConn),
    /// Placeholder for the instant of a transition.
    Vacant,
}

/// Census buckets, by state.
pub(super) const LINKS_DOWN: usize = 0;
pub(super) const LINKS_UP: usize = 1;
pub(super) const DIALING: usize = 2;
pub(super) const SERVING: usize = 3;
pub(super) const OBSERVERS: usize = 4;

impl State for AgentConn {
    type Ending = Ending;
    const KINDS: usize = 5;

    fn placeholder() -> Self {
        AgentConn::Vacant
    }

    fn name(&self) -> &'static str {
        match self {
            AgentConn::Reconnecting(_) => "Reconnecting",
            AgentConn::Connecting(..) => "Connecting",
            AgentConn::Registering(..) => "Registering",
            AgentConn::Registered(..) => "Registered",
            AgentConn::Dialing(_) => "Dialing",
            AgentConn::Echoing(_) => "Echoing",
            AgentConn::Piping(_) => "Piping",
            AgentConn::Flushing(_) => "Flushing",
            AgentConn::Observer(_) => "Observer",
            AgentConn::Vacant => "Vacant",
        }
    }

    fn kind(&self) -> Option<usize> {
        match self {
            AgentConn::Reconnecting(_) | AgentConn::Connecting(..) | AgentConn::Registering(..) => {
                Some(LINKS_DOWN)
            }
            AgentConn::Registered(..) => Some(LINKS_UP),
            AgentConn::Dialing(_) => Some(DIALING),
            AgentConn::Echoing(_) | AgentConn::Piping(_) | AgentConn::Flushing(_) => Some(SERVING),
            AgentConn::Observer(_) => Some(OBSERVERS),
            AgentConn::Vacant => None,
        }
    }

    fn sockets(&self) -> usize {
        match self {
            AgentConn::Reconnecting(_) | AgentConn::Observer(_) | AgentConn::Vacant => 0,
            AgentConn::Connecting(..)
            | AgentConn::Registering(..)
            | AgentConn::Registered(..)
            | AgentConn::Echoing(_) => 1,
            AgentConn::Dialing(dialing) => 1 + usize::from(dialing.local.is_some()),
            AgentConn::Piping(_) => 2,
            AgentConn::Flushing(flush) => flush.sockets(),
        }
    }
}

/// The socket of a registration's entry.
pub(super) const LINK: usize = 0;

/// Sockets of a client entry, by sub-token.
pub(super) const DIAL_IN: usize = 0;
pub(super) const LOCAL: usize = 1;

/// What a registration is, whatever its phase: where to, and how it fares.
pub(super) struct Link {
    pub(super) relay: String,     // the relay's registration address, HOST:PORT
    pub(super) service: usize,    // which service (index into the config's)
    pub(super) attempts: u32,     // failed (re)connects in a row, for back-off
    pub(super) since: SystemTime, // (status) when it last came up or went down
    pub(super) failed: Option<String>, // why it last failed, if it has (for `register`)
}

/// A client's connects: its dial-in to the relay and, when forwarding, its
/// connection to the local service, both non-blocking, under one deadline.
pub(super) struct Dialing {
    pub(super) dial_in: TcpStream,       // to the relay's dial-in port
    pub(super) local: Option<TcpStream>, // to the local service (forwarding)
    pub(super) connected: [bool; 2],     // by sub-token: dial-in, local
    pub(super) rx: [RxState; 2],         // their read halves, from every event since registered
    pub(super) token: Option<DialToken>, // to present first on the dial-in (with a secret)
    pub(super) refused: bool, // the local service failed: reset the dial-in once connected
    pub(super) service: usize, // its service (for the local side\'s logs)
}

/// Why an entry closes.
#[derive(Debug)]
pub(super) enum Ending {
    /// Finished in order (both ways done, or the local service's FIN).
    Done,
    /// Reset, or failed: its peers get a reset.
    Abort,
}

/// Where a client's dial line came from, and where it goes.
pub(super) struct DialLine {
    pub(super) link: Id,                 // the registration it came on
    pub(super) service: usize,           // its service
    pub(super) addr: SocketAddr,         // the relay's dial-in port
    pub(super) token: Option<DialToken>, // its token (with a secret)
}

/// A failed connect's error, made from a timeout.
pub(super) fn timed_out(what: std::time::Duration) -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!("connect timed out after {what:?}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every entry of the table is as large as the largest state, and most
    /// entries are clients: a state larger than a pipe costs every client
    /// (the registrations' connections are boxed for this).
    #[test]
    fn an_entry_is_no_larger_than_a_pipe() {
        let (entry, pipe) = (size_of::<AgentConn>(), size_of::<Pipe>());
        assert!(
            entry <= pipe + size_of::<usize>(),
            "{entry} B, a pipe {pipe} B"
        );
    }
}
