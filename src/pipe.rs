//! Moving bytes between sockets: endpoints with readiness kept in software,
//! one-way [`Direction`]s with backpressure and half-close, and the two
//! shapes built from them: a [`Pipe`] (two sockets, both ways) and an
//! [`Echo`] (one socket, back to itself).
//!
//! Readiness contract (see mio's `Poll` docs): with edge triggering the
//! kernel reports a socket ready once; it reports it again only when
//! something new happens (new data, freed send space, the peer's FIN). So
//! each half keeps a flag that an event sets and only proof of exhaustion
//! clears: `WouldBlock`, or for reads a short read, after which any new data
//! raises a new edge (invariant *Readiness in software*). A short read does
//! not clear the flag while the peer's end or an error may be pending (an
//! event said so): that news came before the read, and only a further read
//! reports it. A new endpoint starts from what is known of its socket (see
//! [`Endpoint::new`]). When a
//! destination is full we simply stop reading its source; the source's flag
//! stays set, and the moment the buffer drains reading resumes without waiting
//! for an event that will never come (invariant *Backpressure*).

use std::io;
use std::net::Shutdown;

use mio::event::Event;
use mio::net::TcpStream;

use crate::buffer::Buffer;
use crate::pool::BufferPool;
use crate::sockio::{Io, reset_on_close};

/// Read/write rounds one direction may run per pump before yielding, so one
/// fast pair cannot starve every other socket (at 64 KiB rings: up to 1 MiB).
const PUMP_BUDGET: usize = 16;

/// The read half of a socket, as far as we know.
#[derive(Debug, Default, Clone, Copy)]
pub struct RxState {
    pub readable: bool, // set by events, cleared by WouldBlock or a short read
    pub ending: bool,   // an event said the peer closed or failed: read to the end
    pub eof: bool,      // the peer shut its write half; never read again
}

impl RxState {
    /// A socket registered with the poll just now, and not read since:
    /// worth one read at once (a client's first bytes are usually there),
    /// and a short read may end reading. Registering queues an event for
    /// whatever is already pending, and the poll reports a socket's state
    /// as it is when it hands the event over, so a FIN that came with the
    /// bytes is reported by the next poll; anything later raises a new edge.
    /// This saves the `EAGAIN` read per new connection that reading until
    /// `WouldBlock` would cost.
    pub fn registered() -> Self {
        RxState {
            readable: true,
            ending: false,
            eof: false,
        }
    }

    /// Records what an event says. Closed and error flags are hints: they
    /// mark the half ready so that the next syscall learns the truth.
    pub fn note(&mut self, event: &Event) {
        if event.is_readable() || event.is_read_closed() || event.is_error() {
            self.readable = true;
        }
        if event.is_read_closed() || event.is_error() {
            self.ending = true;
        }
    }
}

/// The write half of a socket, as far as we know.
#[derive(Debug, Default)]
pub struct TxState {
    pub writable: bool, // set by events, cleared only by WouldBlock
    pub shut: bool,     // we shut our write half toward the peer
}

/// A connected socket and its software readiness.
pub struct Endpoint {
    pub stream: TcpStream,
    pub rx: RxState,
    pub tx: TxState,
    error_hint: bool, // an event reported a socket error: check before pumping
}

impl Endpoint {
    /// Wraps a connected socket whose read half is as far as known: from the
    /// events the state it comes from noted, or [`RxState::registered`]. (A
    /// socket whose earlier events went unnoted would start `readable` and
    /// `ending`, so that its first reads go on until `WouldBlock` or EOF
    /// proves what is there; nothing here has such a socket.) The write half
    /// starts out ready: a write that finds no room returns `WouldBlock` and
    /// clears the flag, which is cheaper and safer than trusting that the
    /// first edge has not been missed.
    pub fn new(stream: TcpStream, rx: RxState) -> Self {
        Endpoint {
            stream,
            rx,
            tx: TxState {
                writable: true,
                shut: false,
            },
            error_hint: false,
        }
    }

    /// Whether the socket has a pending error (a reset), if an event hinted
    /// at one. Needed because a reset that follows the peer's FIN would
    /// otherwise go unseen: a read half at EOF is never read again, and the
    /// other way may have nothing to write.
    fn reset_pending(&mut self) -> bool {
        if !std::mem::take(&mut self.error_hint) {
            return false;
        }
        !matches!(self.stream.take_error(), Ok(None))
    }

    /// Records what an event says about both halves (see [`RxState::note`]).
    pub fn note(&mut self, event: &Event) {
        self.rx.note(event);
        self.error_hint |= event.is_error();
        if event.is_writable() || event.is_write_closed() || event.is_error() {
            self.tx.writable = true;
        }
    }

    /// Makes the coming close send RST instead of FIN ([`reset_on_close`]).
    pub fn abort_on_close(&self) {
        reset_on_close(&self.stream);
    }
}

/// Why a direction cannot go on.
#[derive(Debug)]
pub enum Broken {
    /// A peer reset or vanished: ordinary, not worth an error log.
    Reset,
    /// Some other socket error.
    Failed(io::Error),
}

/// What a pump left behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Flow {
    /// Everything ready was moved; wait for the next event.
    Idle,
    /// The budget ran out with work left; run me again soon.
    More,
    /// Both ways are finished: close the sockets.
    Done,
}

/// One way of a stream: bytes from a source read half to a destination
/// write half, through a buffer (a ring, or a kernel pipe for bulk) lent
/// by the pool only while bytes are in flight.
#[derive(Default)]
pub struct Direction {
    buffer: Option<Buffer>, // Some only while bytes are buffered or being read
    moved: u64,             // bytes written to the destination so far
    bulk: bool,             // the last read was large: splice (if on) pays off
}

/// A read at least this large marks a direction as bulk: its next buffer is
/// a kernel pipe (when splicing), whose fixed cost per call only pays off for
/// large transfers; small messages go through a ring, which is cheaper for
/// them than two splices.
const BULK_READ: usize = 16 * 1024;

impl Direction {
    /// Moves bytes until nothing more can move or the budget is spent, then
    /// carries a half-close: once the source is at EOF and every buffered
    /// byte is written, the destination's write half is shut.
    pub fn pump(
        &mut self,
        src: &TcpStream,
        rx: &mut RxState,
        dst: &TcpStream,
        tx: &mut TxState,
        pool: &mut BufferPool,
        last: bool,
    ) -> Result<Flow, Broken> {
        for _ in 0..PUMP_BUDGET {
            let read = self.fill(src, rx, pool)?;
            let written = self.drain(dst, tx)?;
            self.return_buffer_if_empty(pool);
            if rx.eof && self.buffer.is_none() && !tx.shut {
                // When this is the last way still open, the sockets close as
                // soon as it ends, and the close sends the FIN (every byte
                // was read, so it is not a reset): `shutdown` would be one
                // syscall per connection for nothing.
                if !last {
                    shut_write(dst)?;
                }
                tx.shut = true;
            }
            if !read && !written {
                return Ok(Flow::Idle);
            }
        }
        Ok(Flow::More)
    }

    /// One read into the buffer, if the source is readable and the buffer has
    /// room. Returns whether anything happened.
    fn fill(
        &mut self,
        src: &TcpStream,
        rx: &mut RxState,
        pool: &mut BufferPool,
    ) -> Result<bool, Broken> {
        if !rx.readable || rx.eof || self.buffer.as_ref().is_some_and(Buffer::is_full) {
            return Ok(false);
        }
        let bulk = self.bulk;
        let buffer = self.buffer.get_or_insert_with(|| pool.take(bulk));
        let offered = buffer.window();
        match buffer.fill_from(src) {
            Io::Moved(n) => {
                self.bulk = n >= BULK_READ;
                // A short read drained the socket: Linux raises a new edge
                // for every later arrival, so reading again now would only
                // earn an EAGAIN (a third of all syscalls in a profile of
                // small messages). Unless the peer already signalled its end
                // or an error: that arrived before this read, and only a
                // further read reports it.
                if n < offered && !rx.ending && buffer.short_fill_means_drained() {
                    rx.readable = false;
                }
                Ok(true)
            }
            Io::WouldBlock => {
                // Nothing pending, not even an end: any end hint was stale.
                if buffer.would_block_means_drained() {
                    rx.readable = false;
                    rx.ending = false;
                }
                Ok(false)
            }
            Io::Eof => {
                rx.eof = true;
                Ok(true)
            }
            Io::Reset => Err(Broken::Reset),
            Io::Failed(e) => Err(Broken::Failed(e)),
        }
    }

    /// One write from the buffer, if it holds bytes and the destination is
    /// writable. Returns whether anything happened.
    fn drain(&mut self, dst: &TcpStream, tx: &mut TxState) -> Result<bool, Broken> {
        let Some(buffer) = self.buffer.as_mut().filter(|r| !r.is_empty()) else {
            return Ok(false);
        };
        if !tx.writable {
            return Ok(false);
        }
        match buffer.drain_to(dst) {
            Io::Moved(n) => {
                self.moved += n as u64;
                Ok(true)
            }
            Io::WouldBlock => {
                tx.writable = false;
                Ok(false)
            }
            Io::Eof | Io::Reset => Err(Broken::Reset),
            Io::Failed(e) => Err(Broken::Failed(e)),
        }
    }

    fn return_buffer_if_empty(&mut self, pool: &mut BufferPool) {
        if self.buffer.as_ref().is_some_and(Buffer::is_empty)
            && let Some(buffer) = self.buffer.take()
        {
            pool.give(buffer);
        }
    }

    /// Gives the buffer (and any bytes in it) back; for closing.
    pub fn release(&mut self, pool: &mut BufferPool) {
        if let Some(buffer) = self.buffer.take() {
            pool.give(buffer);
        }
    }
}

fn shut_write(stream: &TcpStream) -> Result<(), Broken> {
    match stream.shutdown(Shutdown::Write) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Err(Broken::Reset),
        Err(e) => Err(Broken::Failed(e)),
    }
}

/// Two sockets piped both ways. Finished when both write halves are shut,
/// i.e. both peers ended their streams and every byte was delivered.
pub struct Pipe {
    pub a: Endpoint,   // the side that arrived first (the relay's client)
    pub b: Endpoint,   // the side that joined it (the app's dial-in)
    a_to_b: Direction, // bytes read from a, written to b
    b_to_a: Direction, // bytes read from b, written to a
    broken: bool,      // a pump failed: the pipe is dead for good
}

impl Pipe {
    /// Joins two endpoints; nothing moves until [`Pipe::pump`].
    pub fn new(a: Endpoint, b: Endpoint) -> Self {
        Pipe {
            a,
            b,
            a_to_b: Direction::default(),
            b_to_a: Direction::default(),
            broken: false,
        }
    }

    /// Bytes delivered so far, both ways together.
    pub fn moved(&self) -> u64 {
        self.a_to_b.moved + self.b_to_a.moved
    }

    /// Exactly one way is finished: one peer ended its stream, the other
    /// has not (yet).
    pub fn is_half_closed(&self) -> bool {
        self.a.tx.shut != self.b.tx.shut
    }

    /// Pumps both directions once.
    ///
    /// A failure is sticky: Linux reports a reset to one read only, and the
    /// next read of that socket returns 0, which a second pump (another event
    /// in the same turn, before the close is reaped) would take for an
    /// orderly end and carry on as a FIN, making a cut-short stream look
    /// complete. So once broken, a pipe only ever says so again.
    pub fn pump(&mut self, pool: &mut BufferPool) -> Result<Flow, Broken> {
        if self.broken {
            return Err(Broken::Reset);
        }
        let result = self.pump_both(pool);
        self.broken = result.is_err();
        result
    }

    fn pump_both(&mut self, pool: &mut BufferPool) -> Result<Flow, Broken> {
        let (a, b) = (&mut self.a, &mut self.b);
        if a.reset_pending() || b.reset_pending() {
            return Err(Broken::Reset);
        }
        let ab_last = a.tx.shut;
        let ab = self
            .a_to_b
            .pump(&a.stream, &mut a.rx, &b.stream, &mut b.tx, pool, ab_last)?;
        let ba_last = b.tx.shut;
        let ba = self
            .b_to_a
            .pump(&b.stream, &mut b.rx, &a.stream, &mut a.tx, pool, ba_last)?;
        if a.tx.shut && b.tx.shut {
            return Ok(Flow::Done);
        }
        Ok(ab.max(ba))
    }

    /// Closes with RST on both sides (after a reset or error on one of them:
    /// invariant *Errors close the pair*), returning any buffers.
    pub fn abort(&mut self, pool: &mut BufferPool) {
        self.a.abort_on_close();
        self.b.abort_on_close();
        self.release(pool);
    }

    /// Returns any buffers to the pool.
    pub fn release(&mut self, pool: &mut BufferPool) {
        self.a_to_b.release(pool);
        self.b_to_a.release(pool);
    }
}

/// One socket whose bytes are written back to it: the sample app's service.
/// It runs on the same [`Direction`] as a pipe, from the socket's read half
/// to its own write half, so it has the same backpressure and half-close.
pub struct Echo {
    pub end: Endpoint,
    back: Direction,
    broken: bool, // a pump failed: sticky, as for a pipe
}

impl Echo {
    /// Echoes everything `end` sends.
    pub fn new(end: Endpoint) -> Self {
        Echo {
            end,
            back: Direction::default(),
            broken: false,
        }
    }

    /// Pumps once; `Done` after the peer's EOF has been echoed and our write
    /// half shut.
    pub fn pump(&mut self, pool: &mut BufferPool) -> Result<Flow, Broken> {
        if self.broken {
            return Err(Broken::Reset);
        }
        let end = &mut self.end;
        if end.reset_pending() {
            self.broken = true;
            return Err(Broken::Reset);
        }
        let result = self.back.pump(
            &end.stream,
            &mut end.rx,
            &end.stream,
            &mut end.tx,
            pool,
            true,
        );
        self.broken = result.is_err();
        match result? {
            _ if end.tx.shut => Ok(Flow::Done),
            flow => Ok(flow),
        }
    }

    /// Returns any buffer to the pool.
    pub fn release(&mut self, pool: &mut BufferPool) {
        self.back.release(pool);
    }
}
