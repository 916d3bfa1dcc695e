//! # tcp-relay
//!
//! A TCP relay that never initiates a connection. An **app** behind NAT
//! connects out to the relay's registration port; the relay opens a public
//! **relayed port** for it. Each **client** that connects there is announced
//! to the app over its control connection, the app **dials in** a fresh
//! connection, and the relay pipes client and dial-in both ways, byte-exact.
//! The control protocol ([`protocol`]) is wire-compatible with the original
//! Go relay.
//!
//! ## Lifecycle
//!
//! Every connection the relay holds is one entry of a `slab`, in one of the
//! states of [`state::Conn`]:
//!
//! ```text
//! app:      accept ─► [Authenticating] ─► Registering ─► Registered ─► closed
//!                      (with a secret)                  (its ports close with it)
//! client:   accept ─► AwaitingDialIn ─► Piping ─► closed
//!                         │   ▲            │ (on trial: a ready dial-in
//!                         │   └────────────┘  lost before its first byte)
//!                         └─ timeout / app gone ─► closed
//! dial-in:  accept ─► [Presenting] ─► joins its client's entry (or closed)
//!                     (with a secret: reads the token)
//! ```
//!
//! An app entry owns its control connection, its relayed listener and its
//! dial-in listener. A client entry owns the client socket and, once paired,
//! the dial-in: pairing turns `AwaitingDialIn` into `Piping` in place, so the
//! client keeps its slab key and token. Without a secret a dial-in must come
//! from the app's address and is paired with the oldest waiting client; with
//! a secret it presents the one-time token of the client it was made for
//! ([`auth`]).
//!
//! ## The loop
//!
//! One thread, one `mio::Poll`, edge-triggered ([`reactor::Reactor`]). A turn
//! waits for events no longer than the nearest deadline, dispatches each
//! event to the entry its token names, then runs requeued work, fires
//! expired timers and finally reaps the entries closed during the turn.
//! The relay's handler is in [`relay`] (split into its core, its app side
//! and its client side); the app side ([`app`]: the `expose` agent and the
//! sample echo app) has its own; both move bytes with the same
//! [`pipe::Direction`]. [`relayed`] offers a blocking, `TcpListener`-like
//! API for custom apps.
//!
//! ## Token scheme
//!
//! Fixed sources have named tokens at the top of the range
//! ([`reactor::WAKER`], the registration listener). A connection token is
//! `slab key << 2 | socket index` ([`reactor::token`], [`reactor::split`]);
//! an entry has at most four sockets (an app has three: control, relayed
//! listener, dial-in listener; a pipe has two: client and dial-in).
//!
//! ## Invariants
//!
//! Code comments refer to these by name.
//!
//! 1. **Tokens are keys.** Tokens and slab keys convert only through
//!    `reactor::token`/`reactor::split`. An entry is registered from its
//!    `vacant_entry()` key before it is inserted, so they cannot diverge;
//!    events for vacant keys are stale and ignored.
//! 2. **Readiness in software.** Every socket half has a flag that events
//!    set and only proof of exhaustion clears: a `WouldBlock`, or a short
//!    read (Linux raises a fresh edge for every later arrival), but never a
//!    short read while the peer's end may be pending unread.
//!    Edge-triggered polling reports a readiness once; the flag remembers it.
//!    A socket's flags start from what is known of it: events noted while
//!    it waited in an earlier state, or, just registered, "worth one read"
//!    (registering queues an event for whatever is already pending).
//! 3. **The writable invariant.** Bytes that enter a ring are written toward
//!    the peer in the same pump; nothing waits for a writable edge that may
//!    already have been consumed. Work cut short by a budget is requeued by
//!    the handler itself.
//! 4. **Backpressure.** A direction reads its source only while its ring has
//!    room. When the destination stalls, the ring fills, reading stops, the
//!    kernel's windows fill and the sender is slowed; when the ring drains,
//!    reading resumes at once because the source's flag is still set.
//! 5. **Bounded buffers.** Everything a peer controls is bounded: rings and
//!    splice pipes are fixed-size ([`buffer::Buffer`]), control lines are at most
//!    [`protocol::MAX_LINE`] bytes, an app's queue of waiting clients and of
//!    control bytes is capped.
//! 6. **Idle pipes hold no buffers.** A direction borrows a ring (or, for
//!    bulk with splice, a kernel pipe) from the [`pool::BufferPool`] only
//!    while bytes are in flight.
//! 7. **Deferred close.** Handlers only schedule closes; the loop reaps after
//!    the turn, so a slot is never reused while an event for its previous
//!    occupant may still be pending in the same batch.
//! 8. **A deadline belongs to its phase.** An entry has at most one timer;
//!    every transition and every reap cancels it, and a phase that needs one
//!    arms its own. Nothing outlives its entry (a relay that served a million
//!    short connections holds none of their timers), and no phase is judged
//!    by another's deadline (an open pipe has none: only a half-closed pipe
//!    is timed, for idling).
//! 9. **Errors close the pair, and only the pair.** An orderly end (FIN) is
//!    carried as a half-close after every buffered byte is delivered; a
//!    reset or error on either side closes both sides with RST. No error on
//!    one connection escapes its entry.
//! 10. **An app owns its ports.** When the control connection ends, the
//!     relayed and dial-in listeners close at once and waiting clients are
//!     closed; established pipes run on.
//! 11. **The relay never dials.** Every socket the relay holds was accepted.
//! 12. **Secrets stay secret.** The shared secret never crosses the wire
//!     (only HMACs over fresh nonces do) and never reaches a log or a
//!     `Debug` output; tokens are compared in constant time.
//! 13. **A dial-in is never dropped.** An app has at most as many dial
//!     lines outstanding (sent, and not yet answered by an accepted
//!     dial-in) as its dial-in listener's backlog holds, so an app that
//!     dials in for all of them at once cannot overflow the kernel's accept
//!     queue; clients beyond that wait, in order, to be asked for.
//! 14. **Promised room is kept.** Under the connection limit, a waiting
//!     client counts with the dial-in it will get, and an asked ready
//!     dial-in counts from the moment it is asked for; a dial-in the relay
//!     asked for is then always let in. New clients are refused at the
//!     limit, never the dial-in of an admitted one.
//!
//! ## Using the library
//!
//! ```no_run
//! use tcp_relay::{Config, Relay};
//! # fn main() -> std::io::Result<()> {
//! let relay = Relay::bind(Config { reg_port: 0, ..Config::default() })?;
//! println!("apps register on {}", relay.reg_addr());
//! let running = relay.spawn()?; // or relay.run() on this thread
//! println!("{:?}", running.stats());
//! # Ok(()) }
//! ```

pub mod access;
pub mod app;
pub mod auth;
pub mod buffer;
pub mod client;
pub mod config;
pub mod ops;
pub mod pipe;
pub mod pool;
pub mod protocol;
pub mod proxy_protocol;
pub mod reactor;
pub mod relay;
pub mod relayed;
pub mod ring;
pub mod sockio;
pub(crate) mod table;

pub use app::{Agent, AgentConfig, AgentError, EchoApp, RunningAgent, RunningEcho, Service};
pub use config::{Config, RelayStyle, Secret};
pub use relay::{Relay, RelayHandle, RunningRelay, Stats};
pub use relayed::{Incoming, RegisterOptions, RelayedApp};
