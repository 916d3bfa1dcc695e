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
//!
//! Nothing here needs a real socket: an endpoint holds any [`Stream`]
//! (mio's `TcpStream` by default) and learns from [`Readiness`], what an
//! event says, so the tests beside this module drive every transition with
//! scripted syscalls and scripted events.

use std::io;

use mio::event::Event;
use mio::net::TcpStream;

use crate::buffer::Buffer;
use crate::flush::Flush;
use crate::pool::BufferPool;
use crate::sockio::{Io, Stream};

#[cfg(test)]
mod tests;

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

    /// Records what an event says (an `&Event`, or a [`Readiness`]).
    /// Closed and error flags are hints: they mark the half ready so that
    /// the next syscall learns the truth.
    pub fn note(&mut self, event: impl Into<Readiness>) {
        let said = event.into();
        if said.readable || said.read_closed || said.error {
            self.readable = true;
        }
        if said.read_closed || said.error {
            self.ending = true;
        }
    }
}

/// What one event says about a socket: the flags of mio's [`Event`] that
/// matter here. Apart from the poll, a test can state them itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct Readiness {
    pub readable: bool,     // there may be bytes to read
    pub writable: bool,     // there may be room to write
    pub read_closed: bool,  // hint: the peer shut its write half, or failed
    pub write_closed: bool, // hint: our writes can no longer be delivered
    pub error: bool,        // hint: the socket has a pending error
}

impl From<&Event> for Readiness {
    fn from(event: &Event) -> Self {
        Readiness {
            readable: event.is_readable(),
            writable: event.is_writable(),
            read_closed: event.is_read_closed(),
            write_closed: event.is_write_closed(),
            error: event.is_error(),
        }
    }
}

/// The write half of a socket, as far as we know.
#[derive(Debug, Default)]
pub struct TxState {
    pub writable: bool, // set by events, cleared only by WouldBlock
    pub shut: bool,     // we shut our write half toward the peer
}

/// A connected socket (any [`Stream`]; in tests a script) and its software
/// readiness.
pub struct Endpoint<S = TcpStream> {
    pub stream: S,
    pub rx: RxState,
    pub tx: TxState,
    error_hint: bool, // an event reported a socket error: check before pumping
}

impl<S: Stream> Endpoint<S> {
    /// Wraps a connected socket whose read half is as far as known: from the
    /// events the state it comes from noted, or [`RxState::registered`]. (A
    /// socket whose earlier events went unnoted would start `readable` and
    /// `ending`, so that its first reads go on until `WouldBlock` or EOF
    /// proves what is there; nothing here has such a socket.) The write half
    /// starts out ready: a write that finds no room returns `WouldBlock` and
    /// clears the flag, which is cheaper and safer than trusting that the
    /// first edge has not been missed.
    pub fn new(stream: S, rx: RxState) -> Self {
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
    pub fn reset_pending(&mut self) -> bool {
        if !std::mem::take(&mut self.error_hint) {
            return false;
        }
        !matches!(self.stream.take_error(), Ok(None))
    }

    /// Records what an event (an `&Event`, or a [`Readiness`]) says about
    /// both halves (see [`RxState::note`]).
    pub fn note(&mut self, event: impl Into<Readiness>) {
        let said = event.into();
        self.rx.note(said);
        self.error_hint |= said.error;
        if said.writable || said.write_closed || said.error {
            self.tx.writable = true;
        }
    }

    /// Makes the coming close send RST instead of FIN
    /// ([`reset_on_close`](crate::sockio::reset_on_close)).
    pub fn abort_on_close(&self) {
        self.stream.reset_on_close();
    }
}

/// Why a direction cannot go on.
#[derive(Debug)]
pub enum Broken {
    /// A peer reset or vanished: ordinary, not worth an error log.
    Reset,
    /// Some other socket error.
    Failed(io::Error),
    /// A pipe's dial-in on trial (see [`Pipe::on_trial`]) ended or failed
    /// before the app sent a byte: its client can be given another
    /// dial-in, with every byte it sent ([`Pipe::into_replay`]).
    Lost,
}

/// Which socket of a direction a failure came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum At {
    Src, // reading the source
    Dst, // writing (or shutting) the destination
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
    keep: bool,             // written bytes stay in the ring, for a replay
    kept: usize,            // bytes at the ring's head written but kept
    hold_eof: bool,         // the source's EOF is noted but not carried yet
}

/// A read at least this large marks a direction as bulk: its next buffer is
/// a kernel pipe (when splicing), whose fixed cost per call only pays off for
/// large transfers; small messages go through a ring, which is cheaper for
/// them than two splices.
pub(crate) const BULK_READ: usize = 16 * 1024;

impl Direction {
    /// A direction whose first bytes are already in `buffer` (a replay).
    fn with_buffer(buffer: Option<Buffer>) -> Self {
        Direction {
            buffer,
            ..Direction::default()
        }
    }

    /// Moves bytes until nothing more can move or the budget is spent, then
    /// carries a half-close: once the source is at EOF and every buffered
    /// byte is written, the destination's write half is shut.
    fn pump<S: Stream>(
        &mut self,
        (src, rx): (&S, &mut RxState),
        (dst, tx): (&S, &mut TxState),
        pool: &mut BufferPool,
        last: bool,
    ) -> Result<Flow, (At, Broken)> {
        for _ in 0..PUMP_BUDGET {
            let read = self.fill(src, rx, pool).map_err(|b| (At::Src, b))?;
            let written = self.drain(dst, tx).map_err(|b| (At::Dst, b))?;
            self.return_buffer_if_empty(pool);
            if rx.eof && !self.hold_eof && self.unsent() == 0 && !tx.shut {
                // When this is the last way still open, the sockets close as
                // soon as it ends, and the close sends the FIN (every byte
                // was read, so it is not a reset): `shutdown` would be one
                // syscall per connection for nothing.
                if !last {
                    shut_write(dst).map_err(|b| (At::Dst, b))?;
                }
                tx.shut = true;
            }
            if !read && !written {
                return Ok(Flow::Idle);
            }
        }
        Ok(Flow::More)
    }

    /// Bytes buffered and not yet written.
    fn unsent(&self) -> usize {
        self.buffer.as_ref().map_or(0, |b| b.len() - self.kept)
    }

    /// One read into the buffer, if the source is readable and the buffer has
    /// room. Returns whether anything happened.
    fn fill<S: Stream>(
        &mut self,
        src: &S,
        rx: &mut RxState,
        pool: &mut BufferPool,
    ) -> Result<bool, Broken> {
        if self.keep && self.kept > 0 && self.buffer.as_ref().is_some_and(Buffer::is_full) {
            // A ring full of kept bytes would stall a client that sends
            // more before its app answers (an upload): stop keeping.
            self.stop_keeping();
        }
        if !rx.readable || rx.eof || self.buffer.as_ref().is_some_and(Buffer::is_full) {
            return Ok(false);
        }
        // Only a ring can keep what it wrote: no kernel pipe while keeping.
        let bulk = self.bulk && !self.keep;
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

    /// One write from the buffer, if it holds unsent bytes and the
    /// destination is writable. Returns whether anything happened.
    fn drain<S: Stream>(&mut self, dst: &S, tx: &mut TxState) -> Result<bool, Broken> {
        if self.unsent() == 0 || !tx.writable {
            return Ok(false);
        }
        let Some(buffer) = self.buffer.as_mut() else {
            return Ok(false);
        };
        let outcome = if self.keep {
            buffer.drain_kept_to(dst, self.kept)
        } else {
            buffer.drain_to(dst)
        };
        match outcome {
            Io::Moved(n) => {
                self.moved += n as u64;
                if self.keep {
                    self.kept += n;
                }
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

    /// Whether bytes came from the source (written on, or waiting to be).
    fn carried_any(&self) -> bool {
        self.moved > 0 || self.unsent() > 0
    }

    /// Forgets kept bytes and keeps no more.
    fn stop_keeping(&mut self) {
        if let Some(buffer) = self.buffer.as_mut() {
            buffer.forget(self.kept);
        }
        (self.keep, self.kept) = (false, 0);
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

/// Shuts `stream`'s write half: carries a FIN.
fn shut_write<S: Stream>(stream: &S) -> Result<(), Broken> {
    match stream.shutdown_write() {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotConnected => Err(Broken::Reset),
        Err(e) => Err(Broken::Failed(e)),
    }
}

/// Where a pipe's trial stands after a pump (see [`Pipe::on_trial`]).
enum Trial {
    Pending, // b has sent nothing yet, and has not ended
    Passed,  // b answered (or keeping stopped): an ordinary pipe from now on
    Lost,    // b ended without a byte
}

/// Two sockets piped both ways. Finished when both write halves are shut,
/// i.e. both peers ended their streams and every byte was delivered.
pub struct Pipe<S = TcpStream> {
    pub a: Endpoint<S>, // the side that arrived first (the relay's client)
    pub b: Endpoint<S>, // the side that joined it (the app's dial-in)
    a_to_b: Direction,  // bytes read from a, written to b
    b_to_a: Direction,  // bytes read from b, written to a
    broken: bool,       // a pump failed: the pipe is dead for good
    trial: bool,        // b has not sent a byte yet and may be swapped out
}

impl<S: Stream> Pipe<S> {
    /// Joins two endpoints; nothing moves until [`Pipe::pump`].
    pub fn new(a: Endpoint<S>, b: Endpoint<S>) -> Self {
        Pipe::with_replay(a, b, None)
    }

    /// Joins two endpoints, with bytes `a` sent before (kept from a
    /// dial-in that was lost on trial) to be written to `b` first.
    pub fn with_replay(a: Endpoint<S>, b: Endpoint<S>, replay: Option<Buffer>) -> Self {
        Pipe {
            a,
            b,
            a_to_b: Direction::with_buffer(replay),
            b_to_a: Direction::default(),
            broken: false,
            trial: false,
        }
    }

    /// Joins a client `a` with a dial-in `b` that was made before the client
    /// came (a ready dial-in), and that may turn out to be dead: until `b`
    /// sends its first byte, every byte written to it is kept, and if it
    /// ends or fails meanwhile the pump says [`Broken::Lost`] instead of
    /// passing the end on, so the client can be given another dial-in with
    /// nothing lost. Keeping stops early if a ring's worth of bytes is
    /// written without an answer (then a loss is an ordinary failure).
    pub fn on_trial(a: Endpoint<S>, b: Endpoint<S>) -> Self {
        let mut pipe = Pipe::new(a, b);
        pipe.trial = true;
        pipe.a_to_b.keep = true;
        pipe.b_to_a.hold_eof = true;
        pipe
    }

    /// Bytes delivered so far, both ways together.
    #[cfg(test)]
    pub fn moved(&self) -> u64 {
        let (ab, ba) = self.moved_each_way();
        ab + ba
    }

    /// Bytes delivered so far from a to b, and from b to a.
    pub fn moved_each_way(&self) -> (u64, u64) {
        (self.a_to_b.moved, self.b_to_a.moved)
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
        if self.a.reset_pending() {
            return Err(Broken::Reset);
        }
        if self.b.reset_pending() {
            return Err(self.lost_or(Broken::Reset));
        }
        let (ab, ba) = self.pump_ways(pool)?;
        if self.trial {
            match self.judge_trial() {
                Trial::Lost => return Err(Broken::Lost),
                // An end of b held back during the trial is carried by the
                // next pump, which no event would bring: ask for it.
                Trial::Passed => return Ok(Flow::More),
                Trial::Pending => {}
            }
        }
        if self.a.tx.shut && self.b.tx.shut {
            return Ok(Flow::Done);
        }
        Ok(ab.max(ba))
    }

    /// Pumps a to b, then b to a; a failure of b on trial is [`Broken::Lost`].
    fn pump_ways(&mut self, pool: &mut BufferPool) -> Result<(Flow, Flow), Broken> {
        let (a, b) = (&mut self.a, &mut self.b);
        let ab_last = a.tx.shut;
        let ab = self.a_to_b.pump(
            (&a.stream, &mut a.rx),
            (&b.stream, &mut b.tx),
            pool,
            ab_last,
        );
        let ab = match ab {
            Err((At::Dst, broken)) => return Err(self.lost_or(broken)),
            other => other.map_err(|(_, broken)| broken)?,
        };
        let ba_last = b.tx.shut;
        let ba = self.b_to_a.pump(
            (&b.stream, &mut b.rx),
            (&a.stream, &mut a.tx),
            pool,
            ba_last,
        );
        let ba = match ba {
            Err((At::Src, broken)) => return Err(self.lost_or(broken)),
            other => other.map_err(|(_, broken)| broken)?,
        };
        Ok((ab, ba))
    }

    /// After a pump on trial: ends the trial once b has sent a byte (or
    /// keeping stopped); says it is lost if b ended without a byte.
    fn judge_trial(&mut self) -> Trial {
        if self.b_to_a.carried_any() || !self.a_to_b.keep {
            self.trial = false;
            self.a_to_b.stop_keeping();
            self.b_to_a.hold_eof = false;
            return Trial::Passed;
        }
        if self.b.rx.eof {
            Trial::Lost
        } else {
            Trial::Pending
        }
    }

    /// What a failure of b means: a lost trial, or the failure itself.
    fn lost_or(&self, broken: Broken) -> Broken {
        if self.trial { Broken::Lost } else { broken }
    }

    /// Takes a pipe whose dial-in was lost on trial apart: the client's
    /// endpoint, the lost dial-in (set to close with RST), and every byte
    /// the client sent (kept, or not yet written), to be written to the
    /// next dial-in first.
    pub fn into_replay(
        mut self,
        pool: &mut BufferPool,
    ) -> (Endpoint<S>, Endpoint<S>, Option<Buffer>) {
        self.b.abort_on_close();
        self.b_to_a.release(pool);
        let replay = self.a_to_b.buffer.take();
        (self.a, self.b, replay)
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

    /// Bytes written to either socket that its peer has not acknowledged.
    pub fn unacked(&self) -> usize {
        Flush::unacked(&[&self.a.stream, &self.b.stream])
    }

    /// A finished pipe's sockets (a, then b), its buffers returned.
    pub fn into_streams(mut self, pool: &mut BufferPool) -> Vec<S> {
        self.release(pool);
        vec![self.a.stream, self.b.stream]
    }
}

/// One socket whose bytes are written back to it: the sample app's service.
/// It runs on the same [`Direction`] as a pipe, from the socket's read half
/// to its own write half, so it has the same backpressure and half-close.
pub struct Echo<S = TcpStream> {
    pub end: Endpoint<S>,
    back: Direction,
    broken: bool, // a pump failed: sticky, as for a pipe
}

impl<S: Stream> Echo<S> {
    /// Echoes everything `end` sends.
    pub fn new(end: Endpoint<S>) -> Self {
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
        let result = self
            .back
            .pump(
                (&end.stream, &mut end.rx),
                (&end.stream, &mut end.tx),
                pool,
                true,
            )
            .map_err(|(_, broken)| broken);
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

    /// Bytes echoed that the peer has not acknowledged.
    pub fn unacked(&self) -> usize {
        self.end.stream.unacked()
    }

    /// A finished echo's socket, its buffer returned.
    pub fn into_streams(mut self, pool: &mut BufferPool) -> Vec<S> {
        self.release(pool);
        vec![self.end.stream]
    }
}
