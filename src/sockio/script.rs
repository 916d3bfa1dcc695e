//! A scripted [`Stream`] for tests: every read and write plays the next
//! outcome its script holds, so a test states, in order, what the kernel
//! would have said (bytes, a short read, `WouldBlock`, EOF, a reset,
//! `EINTR`, a write that takes only part of what is offered, a full
//! destination) and checks what the code under test did with it.
//!
//! A call beyond the script panics ("unscripted read"): a test lists every
//! syscall it expects, so one too many (say the read a short read should
//! have saved) fails it.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{self, IoSlice, IoSliceMut, Read, Write};
#[cfg(target_os = "linux")]
use std::os::fd::RawFd;

use super::Stream;

/// One scripted outcome of a read or a write.
#[derive(Debug)]
pub(crate) enum Step {
    /// A read returns these bytes (never none: that would be EOF). What the
    /// reader's buffer cannot take stays for the next read, as in a socket.
    Data(Vec<u8>),
    /// A read returns 0: the peer's FIN.
    Eof,
    /// A write takes at most this many bytes; 0 is a zero-byte write.
    Take(usize),
    /// The call fails: `WouldBlock` (nothing to read, or a full
    /// destination), `ConnectionReset`, `BrokenPipe`, `Interrupted`, ...
    Fail(io::ErrorKind),
}

/// A read of these bytes.
pub(crate) fn data(bytes: &[u8]) -> Step {
    Step::Data(bytes.to_vec())
}

/// A stream that replays scripted outcomes and records what was done to it.
#[derive(Default)]
pub(crate) struct Script {
    reads: RefCell<VecDeque<Step>>,     // outcomes of the coming reads
    writes: RefCell<VecDeque<Step>>,    // outcomes of the coming writes
    written: RefCell<Vec<u8>>,          // every byte a write took, in order
    shut_after: Cell<Option<usize>>,    // bytes written when the write half was shut
    shutdowns: Cell<usize>,             // calls to shutdown_write
    error: Cell<Option<io::ErrorKind>>, // the pending socket error (SO_ERROR)
    peer_reset: Cell<bool>,             // the peer reset: shutting down fails
    rst_on_close: Cell<bool>,           // reset_on_close was called
    unacked: Cell<usize>,               // bytes the peer has not acknowledged
}

impl Script {
    /// A stream with nothing scripted yet.
    pub(crate) fn new() -> Self {
        Script::default()
    }

    /// Appends outcomes for the coming reads.
    pub(crate) fn reads(&self, steps: impl IntoIterator<Item = Step>) {
        self.reads.borrow_mut().extend(steps);
    }

    /// Appends outcomes for the coming writes.
    pub(crate) fn writes(&self, steps: impl IntoIterator<Item = Step>) {
        self.writes.borrow_mut().extend(steps);
    }

    /// The peer resets the connection: the socket's pending error is set
    /// (what an event's error flag hints at), and a later `shutdown` fails
    /// with `ENOTCONN`, as Linux's does on a reset socket.
    pub(crate) fn reset_by_peer(&self) {
        self.error.set(Some(io::ErrorKind::ConnectionReset));
        self.peer_reset.set(true);
    }

    /// The peer has not acknowledged this many of the bytes written.
    pub(crate) fn set_unacked(&self, bytes: usize) {
        self.unacked.set(bytes);
    }

    /// Every byte written so far.
    pub(crate) fn written(&self) -> Vec<u8> {
        self.written.borrow().clone()
    }

    /// How many bytes had been written when the write half was shut (the
    /// FIN goes after exactly these), or `None` if it was not.
    pub(crate) fn shut_after(&self) -> Option<usize> {
        self.shut_after.get()
    }

    /// How many times the write half was shut.
    pub(crate) fn shutdowns(&self) -> usize {
        self.shutdowns.get()
    }

    /// Whether the stream was set to close with RST.
    pub(crate) fn resets_on_close(&self) -> bool {
        self.rst_on_close.get()
    }

    /// Scripted reads not played yet.
    pub(crate) fn reads_left(&self) -> usize {
        self.reads.borrow().len()
    }
}

impl Read for &Script {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.read_vectored(&mut [IoSliceMut::new(buf)])
    }

    fn read_vectored(&mut self, bufs: &mut [IoSliceMut<'_>]) -> io::Result<usize> {
        let mut reads = self.reads.borrow_mut();
        match reads.pop_front().expect("unscripted read") {
            Step::Data(bytes) => {
                let n = scatter(&bytes, bufs);
                if n < bytes.len() {
                    reads.push_front(Step::Data(bytes[n..].to_vec()));
                }
                Ok(n)
            }
            Step::Eof => Ok(0),
            Step::Fail(kind) => Err(kind.into()),
            Step::Take(_) => panic!("a write's outcome in a read script"),
        }
    }
}

impl Write for &Script {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self
            .writes
            .borrow_mut()
            .pop_front()
            .expect("unscripted write")
        {
            Step::Take(most) => Ok(gather(bufs, most, &mut self.written.borrow_mut())),
            Step::Fail(kind) => Err(kind.into()),
            step @ (Step::Data(_) | Step::Eof) => {
                panic!("a read's outcome {step:?} in a write script")
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Stream for Script {
    type Io<'a> = &'a Script;

    fn io(&self) -> &Script {
        self
    }

    fn shutdown_write(&self) -> io::Result<()> {
        if self.peer_reset.get() {
            return Err(io::ErrorKind::NotConnected.into());
        }
        self.shutdowns.set(self.shutdowns.get() + 1);
        self.shut_after.set(Some(self.written.borrow().len()));
        Ok(())
    }

    fn take_error(&self) -> io::Result<Option<io::Error>> {
        Ok(self.error.take().map(io::Error::from))
    }

    fn reset_on_close(&self) {
        self.rst_on_close.set(true);
    }

    /// As a reset socket's `SIOCOUTQ` may: what it said before the reset.
    fn unacked(&self) -> usize {
        self.unacked.get()
    }

    /// A script has no descriptor: it can only be read into a ring.
    #[cfg(target_os = "linux")]
    fn splice_fd(&self) -> Option<RawFd> {
        None
    }
}

/// Copies `bytes` into `bufs` in order, as far as they reach; the count.
fn scatter(bytes: &[u8], bufs: &mut [IoSliceMut<'_>]) -> usize {
    let mut n = 0;
    for buf in bufs {
        let k = buf.len().min(bytes.len() - n);
        buf[..k].copy_from_slice(&bytes[n..n + k]);
        n += k;
    }
    n
}

/// Appends at most `most` bytes of `bufs`, in order, to `out`; the count.
fn gather(bufs: &[IoSlice<'_>], most: usize, out: &mut Vec<u8>) -> usize {
    let mut n = 0;
    for buf in bufs {
        let k = buf.len().min(most - n);
        out.extend_from_slice(&buf[..k]);
        n += k;
    }
    n
}
