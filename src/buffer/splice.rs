//! A kernel pipe that `splice(2)` fills from a socket and drains into
//! another (Linux only: `pipe2`, `splice` and `F_SETPIPE_SZ` are Linux's).

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::sockio::Io;

/// A non-blocking kernel pipe used as a splice buffer.
pub struct KernelPipe {
    read: OwnedFd,   // the pipe's read end
    write: OwnedFd,  // the pipe's write end
    len: usize,      // bytes in the pipe (spliced in, not yet out)
    capacity: usize, // the pipe's size as the kernel reports it
}

impl KernelPipe {
    /// A pipe of (about) `capacity` bytes.
    pub fn new(capacity: usize) -> io::Result<KernelPipe> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: pipe2 writes two descriptors into the array we pass.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: pipe2 succeeded, so both are open descriptors we now own.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        let wanted = libc::c_int::try_from(capacity).unwrap_or(libc::c_int::MAX);
        // SAFETY: fcntl on a descriptor we own; a refused size keeps the default.
        let size = unsafe {
            libc::fcntl(write.as_raw_fd(), libc::F_SETPIPE_SZ, wanted);
            libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ)
        };
        let capacity = usize::try_from(size).map_err(|_| io::Error::last_os_error())?;
        Ok(KernelPipe {
            read,
            write,
            len: 0,
            capacity,
        })
    }

    /// Bytes in the pipe.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the pipe is empty, so it can be lent again.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Room left, in bytes, as far as the count goes (the kernel may run
    /// out of slots first: see [`Buffer::would_block_means_drained`](super::Buffer::would_block_means_drained)).
    pub fn window(&self) -> usize {
        self.capacity.saturating_sub(self.len)
    }

    /// One splice from `src` into the free room.
    pub(super) fn fill_from(&mut self, src: RawFd) -> Io {
        match splice(src, self.write.as_raw_fd(), self.window()) {
            Io::Moved(n) => {
                self.len += n;
                Io::Moved(n)
            }
            other => other,
        }
    }

    /// One splice of the held bytes into `dst`.
    pub(super) fn drain_to(&mut self, dst: RawFd) -> Io {
        match splice(self.read.as_raw_fd(), dst, self.len) {
            Io::Moved(n) => {
                self.len -= n.min(self.len);
                Io::Moved(n)
            }
            // Zero from a non-empty pipe into a socket: the socket is gone.
            Io::Eof => Io::Reset,
            other => other,
        }
    }
}

/// One `splice(2)` of up to `len` bytes, classified like every other I/O
/// ([`Io`]); `EINTR` is retried.
fn splice(from: RawFd, to: RawFd, len: usize) -> Io {
    let flags = libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK;
    loop {
        // SAFETY: both descriptors are open for the duration of the call;
        // null offsets mean "the descriptor's own position" (required for
        // sockets and pipes).
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                flags,
            )
        };
        match usize::try_from(n) {
            Ok(0) => return Io::Eof,
            Ok(n) => return Io::Moved(n),
            Err(_) => {
                let err = io::Error::last_os_error();
                match err.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return Io::WouldBlock,
                    io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::NotConnected => return Io::Reset,
                    _ => return Io::Failed(err),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffer::Buffer;
    use mio::net::TcpStream;

    #[test]
    fn a_kernel_pipe_reports_its_size() {
        let pipe = KernelPipe::new(64 * 1024).expect("a pipe");
        assert!(pipe.capacity >= 4096, "at least a page: {}", pipe.capacity);
        assert!(pipe.is_empty());
    }

    #[test]
    fn spliced_bytes_cross_sockets_intact() {
        use std::io::{Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut writer = std::net::TcpStream::connect(addr).unwrap();
        let (src, _) = listener.accept().unwrap();
        let mut reader_far = std::net::TcpStream::connect(addr).unwrap();
        let (dst, _) = listener.accept().unwrap();
        src.set_nonblocking(true).unwrap();
        dst.set_nonblocking(true).unwrap();
        let (src, dst) = (TcpStream::from_std(src), TcpStream::from_std(dst));
        let mut buffer = Buffer::Kernel(KernelPipe::new(64 * 1024).unwrap());
        writer.write_all(b"through the kernel").unwrap();
        writer.shutdown(std::net::Shutdown::Write).unwrap();
        let mut moved = 0;
        while moved < 18 {
            if let Io::Moved(n) = buffer.fill_from(&src) {
                moved += n;
            }
        }
        assert_eq!(buffer.len(), 18);
        assert!(matches!(buffer.drain_to(&dst), Io::Moved(18)));
        assert!(buffer.is_empty());
        assert!(matches!(buffer.fill_from(&src), Io::Eof));
        drop(dst);
        let mut got = String::new();
        reader_far.read_to_string(&mut got).unwrap();
        assert_eq!(got, "through the kernel");
    }

    /// Polls `stream` until `want` bytes wait in its receive queue.
    fn await_pending(stream: &TcpStream, want: usize) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let mut buf = [0; 8];
        while stream.peek(&mut buf).unwrap_or(0) < want {
            assert!(std::time::Instant::now() < deadline, "bytes never arrived");
            std::thread::yield_now();
        }
    }

    #[test]
    fn a_kernel_pipe_eagain_proves_the_source_drained_only_when_empty() {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a listener");
        let addr = listener.local_addr().expect("its address");
        let mut writer = std::net::TcpStream::connect(addr).expect("a connection");
        let (src, _) = listener.accept().expect("its other end");
        src.set_nonblocking(true).expect("non-blocking");
        let src = TcpStream::from_std(src);
        // Asking for one byte gets the smallest pipe: one slot of one page.
        let mut buffer = Buffer::Kernel(KernelPipe::new(1).expect("a pipe"));
        assert!(
            !buffer.short_fill_means_drained(),
            "splice stops at the slots"
        );
        assert!(buffer.would_block_means_drained(), "an empty pipe had room");
        writer.write_all(b"a").expect("a write");
        await_pending(&src, 1);
        assert!(matches!(buffer.fill_from(&src), Io::Moved(1)));
        writer.write_all(b"b").expect("a write");
        await_pending(&src, 1);
        // One byte fills the only slot: EAGAIN with the socket not drained,
        // though the count says the pipe has room.
        assert!(buffer.window() > 0);
        assert!(matches!(buffer.fill_from(&src), Io::WouldBlock));
        assert!(!buffer.would_block_means_drained());
        await_pending(&src, 1); // "b" still waits in the socket
    }

    #[test]
    fn a_stream_without_a_descriptor_cannot_be_spliced() {
        use crate::sockio::script::Script;
        let mut buffer = Buffer::Kernel(KernelPipe::new(1).expect("a pipe"));
        let script = Script::new(); // nothing scripted: a syscall would panic
        assert!(matches!(buffer.fill_from(&script), Io::Failed(_)));
        assert!(matches!(buffer.drain_to(&script), Io::Failed(_)));
    }
}
