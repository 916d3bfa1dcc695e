//! Non-blocking socket I/O with every outcome classified in one place.
//!
//! Each read or write ends in exactly one [`Io`] value, so callers `match`
//! instead of inspecting `io::ErrorKind`s. `Interrupted` is retried here and
//! never seen above. A reset, an abort or a broken pipe is the peer going
//! away, an ordinary event for a relay, so it is [`Io::Reset`] and is not
//! logged as an error; only the remaining kinds are [`Io::Failed`].
//!
//! Code that moves bytes sees a socket as a [`Stream`], which tests replace
//! with a script (`sockio::script`) that plays `WouldBlock`, short reads,
//! EOF and resets in order, as smoltcp's device traits let its stack run
//! over a scripted device.

use std::io::{self, IoSlice, IoSliceMut, Read, Write};
use std::net::Shutdown;
#[cfg(target_os = "linux")]
use std::os::fd::{AsRawFd, RawFd};

use mio::net::TcpStream;

use crate::ring::RingBuffer;

#[cfg(test)]
pub(crate) mod script;

/// A connected, non-blocking byte stream, as the code that moves bytes
/// ([`pipe`](crate::pipe), [`buffer`](crate::buffer)) sees it. Implemented
/// by mio's [`TcpStream`], and in tests by a script. That code is generic
/// over it, never `dyn`: a socket's path compiles to the same direct calls
/// as if it named `TcpStream`.
pub trait Stream {
    /// What reads and writes go through. For a socket it is `&TcpStream`,
    /// which reads and writes through a shared reference, as the kernel
    /// allows: a direction holds its source and destination by shared
    /// reference, and an echo's are one socket.
    type Io<'a>: Read + Write
    where
        Self: 'a;

    /// A reader and writer of this stream.
    fn io(&self) -> Self::Io<'_>;

    /// Shuts the write half: the peer reads EOF after every byte sent.
    fn shutdown_write(&self) -> io::Result<()>;

    /// Takes the pending socket error (`SO_ERROR`), if any.
    fn take_error(&self) -> io::Result<Option<io::Error>>;

    /// Makes the coming close send RST instead of FIN ([`reset_on_close`]).
    fn reset_on_close(&self);

    /// Bytes written that the peer has not acknowledged yet ([`unacked`]).
    fn unacked(&self) -> usize;

    /// The descriptor `splice(2)` moves bytes from or to, or `None` for a
    /// stream that is not a socket (a script), which only rings can serve.
    #[cfg(target_os = "linux")]
    fn splice_fd(&self) -> Option<RawFd>;
}

impl Stream for TcpStream {
    type Io<'a> = &'a TcpStream;

    #[inline]
    fn io(&self) -> &TcpStream {
        self
    }

    #[inline]
    fn shutdown_write(&self) -> io::Result<()> {
        self.shutdown(Shutdown::Write)
    }

    #[inline]
    fn take_error(&self) -> io::Result<Option<io::Error>> {
        TcpStream::take_error(self)
    }

    fn reset_on_close(&self) {
        reset_on_close(self);
    }

    #[inline]
    fn unacked(&self) -> usize {
        unacked(self)
    }

    #[cfg(target_os = "linux")]
    #[inline]
    fn splice_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }
}

/// What one read or write did.
#[derive(Debug)]
pub enum Io {
    /// Moved this many bytes (never zero).
    Moved(usize),
    /// The kernel has nothing (read) or no room (write) now; wait for an event.
    WouldBlock,
    /// Orderly end of stream: the peer shut its write half (read only).
    Eof,
    /// The peer reset or vanished.
    Reset,
    /// Any other error.
    Failed(io::Error),
}

/// Classifies the error of a syscall that was not retried.
fn classify(err: io::Error) -> Io {
    use io::ErrorKind::*;
    match err.kind() {
        WouldBlock => Io::WouldBlock,
        ConnectionReset | ConnectionAborted | BrokenPipe | NotConnected | UnexpectedEof => {
            Io::Reset
        }
        _ => Io::Failed(err),
    }
}

/// Runs `op` until it returns something other than `Interrupted` (EINTR).
fn retry(mut op: impl FnMut() -> io::Result<usize>) -> io::Result<usize> {
    loop {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Reads from `src` into the ring's free space with one `readv`, or one
/// plain `recv` when that space does not wrap (the usual case, and a
/// slightly shorter path in the kernel: no iovec array to import).
pub fn read_into(mut src: impl Read, ring: &mut RingBuffer) -> Io {
    let result = ring.enqueue_with(|first, second| {
        if second.is_empty() {
            retry(|| src.read(first))
        } else {
            retry(|| src.read_vectored(&mut [IoSliceMut::new(first), IoSliceMut::new(second)]))
        }
    });
    match result {
        Ok(0) => Io::Eof,
        Ok(n) => Io::Moved(n),
        Err(e) => classify(e),
    }
}

/// Writes the ring's stored bytes to `dst` with one `writev`, or one plain
/// `send` when they do not wrap.
pub fn write_from(mut dst: impl Write, ring: &mut RingBuffer) -> Io {
    let result = ring.dequeue_with(|first, second| {
        if second.is_empty() {
            retry(|| dst.write(first))
        } else {
            retry(|| dst.write_vectored(&[IoSlice::new(first), IoSlice::new(second)]))
        }
    });
    match result {
        // A zero-byte write of a non-empty buffer means the socket is gone.
        Ok(0) => Io::Reset,
        Ok(n) => Io::Moved(n),
        Err(e) => classify(e),
    }
}

/// Writes the ring's stored bytes from `skip` on to `dst`, keeping them all
/// stored (see [`RingBuffer::peek_with`]): for bytes that may have to be
/// written again to another peer.
pub fn write_kept(mut dst: impl Write, ring: &RingBuffer, skip: usize) -> Io {
    let result = ring.peek_with(skip, |first, second| {
        if second.is_empty() {
            retry(|| dst.write(first))
        } else {
            retry(|| dst.write_vectored(&[IoSlice::new(first), IoSlice::new(second)]))
        }
    });
    match result {
        Ok(0) => Io::Reset,
        Ok(n) => Io::Moved(n),
        Err(e) => classify(e),
    }
}

/// Writes `bytes` to `dst`, reporting how many went out.
pub fn write_slice(mut dst: impl Write, bytes: &[u8]) -> Io {
    match retry(|| dst.write(bytes)) {
        Ok(0) => Io::Reset,
        Ok(n) => Io::Moved(n),
        Err(e) => classify(e),
    }
}

/// Reads into `buf`, for control connections that parse what they read.
pub fn read_slice(mut src: impl Read, buf: &mut [u8]) -> Io {
    match retry(|| src.read(buf)) {
        Ok(0) => Io::Eof,
        Ok(n) => Io::Moved(n),
        Err(e) => classify(e),
    }
}

/// A non-blocking listener on `addr` with room for `backlog` connections
/// that completed their handshake but are not accepted yet. mio's own
/// `TcpListener::bind` asks for 128, as std does; a burst of clients (or of
/// dial-ins answering them) larger than that has SYNs dropped and retried
/// after 1 s, 3 s, 7 s, which outlives many connect timeouts. Linux caps the
/// value at `net.core.somaxconn` (see [`somaxconn`]). `SO_REUSEADDR` as mio
/// sets it, so a relayed port can be reopened while old connections to it
/// sit in TIME_WAIT.
pub fn listen(addr: std::net::SocketAddr, backlog: u32) -> io::Result<mio::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(mio::net::TcpListener::from_std(socket.into()))
}

/// The backlog the kernel granted `listener`, where it says (Linux: for a
/// listening socket, `TCP_INFO`'s `tcpi_sacked` holds its accept queue's
/// limit, what `ss -ltn` shows as Send-Q). Unlike reading `somaxconn`,
/// this works in a sandbox that hides `/proc/sys`.
#[cfg(target_os = "linux")]
pub fn granted_backlog(listener: &mio::net::TcpListener) -> Option<u32> {
    use std::os::fd::AsRawFd;
    // SAFETY: tcp_info is plain old data; all zeroes is a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = libc::socklen_t::try_from(std::mem::size_of::<libc::tcp_info>()).ok()?;
    // SAFETY: getsockopt writes at most `len` bytes into `info`, which is
    // that large, and updates `len`; the descriptor is open.
    let done = unsafe {
        libc::getsockopt(
            listener.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&raw mut info).cast(),
            &mut len,
        )
    };
    (done == 0 && info.tcpi_sacked > 0).then_some(info.tcpi_sacked)
}

/// Elsewhere the kernel does not say.
#[cfg(not(target_os = "linux"))]
pub fn granted_backlog(_listener: &mio::net::TcpListener) -> Option<u32> {
    None
}

/// The kernel's cap on every listen backlog (`net.core.somaxconn`), where
/// it can be read (Linux); `None` elsewhere.
pub fn somaxconn() -> Option<u32> {
    std::fs::read_to_string("/proc/sys/net/core/somaxconn")
        .ok()
        .and_then(|text| text.trim().parse().ok())
}

/// The soft limit on open descriptors of this process, if it can be read.
pub fn descriptor_limit() -> Option<usize> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return None;
    }
    usize::try_from(limit.rlim_cur).ok()
}

/// Sets `TCP_NODELAY` on a listener, so the sockets it accepts start with it
/// (Linux copies the listener's Nagle setting into each accepted socket):
/// one syscall per listener instead of one per connection. A relay forwards
/// whatever it has at once; Nagle would only add latency to small messages.
pub fn no_delay_listener(listener: &mio::net::TcpListener) {
    let _ = socket2::SockRef::from(listener).set_tcp_nodelay(true);
}

/// Sets `TCP_NODELAY` on an accepted socket where the listener's setting is
/// not inherited (everywhere but Linux).
pub fn no_delay(stream: &TcpStream) {
    if cfg!(not(target_os = "linux")) {
        let _ = stream.set_nodelay(true);
    }
}

/// Makes the coming close of `stream` send RST instead of FIN: for a peer
/// that is refused, or whose stream was cut short, so that it sees an error
/// rather than a clean end it could mistake for a complete (or empty) stream.
pub fn reset_on_close(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(std::time::Duration::ZERO));
}

/// Bytes written to `stream` that its peer has not acknowledged yet, FIN
/// included (Linux: `SIOCOUTQ`, the send queue from the first unacknowledged
/// byte). What a close would leave to an orphan socket, which the kernel
/// resets when TCP memory or `tcp_max_orphans` runs out. 0 where the
/// system does not say, or on error: then a close is as it always was.
#[cfg(target_os = "linux")]
pub fn unacked(stream: &TcpStream) -> usize {
    use std::os::fd::AsRawFd;
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int through the pointer, which
    // points at one; the descriptor is open for as long as `stream` lives.
    let done = unsafe { libc::ioctl(stream.as_raw_fd(), libc::TIOCOUTQ, &raw mut queued) };
    if done == 0 {
        usize::try_from(queued).unwrap_or(0)
    } else {
        0
    }
}

/// Elsewhere the kernel does not say (FreeBSD's `FIONWRITE` counts only
/// bytes not yet sent, not those unacknowledged).
#[cfg(not(target_os = "linux"))]
pub fn unacked(_stream: &TcpStream) -> usize {
    0
}

/// Turns on what a long-lived, mostly silent control connection needs:
/// `TCP_NODELAY` (a dial line must not wait for Nagle), and keepalive plus
/// `TCP_USER_TIMEOUT` so a peer that vanished without a FIN (power loss, NAT
/// state dropped) is noticed within about a minute: 30 s idle, then three
/// probes 10 s apart; or 60 s of unacknowledged data. Failures are ignored:
/// these are optimisations of detection, not correctness.
pub fn keep_alive(stream: &TcpStream) {
    use socket2::{SockRef, TcpKeepalive};
    use std::time::Duration;
    let _ = stream.set_nodelay(true);
    let sock = SockRef::from(stream);
    let probes = TcpKeepalive::new()
        .with_time(Duration::from_secs(30))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    let _ = sock.set_tcp_keepalive(&probes);
    #[cfg(target_os = "linux")]
    let _ = sock.set_tcp_user_timeout(Some(Duration::from_secs(60)));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(target_os = "linux")]
    #[test]
    fn the_kernel_says_what_backlog_it_granted() {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        let asked = listen(addr, 100).expect("listen");
        assert_eq!(granted_backlog(&asked), Some(100));
        let capped = listen(addr, u32::MAX).expect("listen");
        let cap = somaxconn().expect("somaxconn on Linux");
        assert_eq!(granted_backlog(&capped), Some(cap));
    }

    /// A reader or writer that replays scripted results.
    struct Script(Vec<io::Result<usize>>);

    impl Read for Script {
        fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
            self.0.remove(0)
        }
    }

    impl Write for Script {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            self.0.remove(0)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn err(kind: io::ErrorKind) -> io::Result<usize> {
        Err(io::Error::from(kind))
    }

    #[test]
    fn interrupted_is_retried() {
        let mut ring = RingBuffer::new(8);
        let script = Script(vec![err(io::ErrorKind::Interrupted), Ok(3)]);
        assert!(matches!(read_into(script, &mut ring), Io::Moved(3)));
        assert_eq!(ring.len(), 3);
    }

    #[test]
    fn zero_read_is_eof_and_resets_are_not_failures() {
        let mut ring = RingBuffer::new(8);
        assert!(matches!(read_into(Script(vec![Ok(0)]), &mut ring), Io::Eof));
        for kind in [
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::BrokenPipe,
            io::ErrorKind::ConnectionAborted,
        ] {
            assert!(matches!(
                read_into(Script(vec![err(kind)]), &mut ring),
                Io::Reset
            ));
        }
        let other = read_into(
            Script(vec![err(io::ErrorKind::PermissionDenied)]),
            &mut ring,
        );
        assert!(matches!(other, Io::Failed(_)));
    }

    #[test]
    fn would_block_moves_nothing() {
        let mut ring = RingBuffer::new(8);
        ring.enqueue_slice(b"abc");
        let outcome = write_from(Script(vec![err(io::ErrorKind::WouldBlock)]), &mut ring);
        assert!(matches!(outcome, Io::WouldBlock));
        assert_eq!(ring.len(), 3);
    }

    #[test]
    fn partial_write_keeps_the_rest() {
        let mut ring = RingBuffer::new(8);
        ring.enqueue_slice(b"abcdef");
        assert!(matches!(
            write_from(Script(vec![Ok(2)]), &mut ring),
            Io::Moved(2)
        ));
        assert_eq!(ring.len(), 4);
    }
}
