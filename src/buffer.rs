//! What a direction holds its in-flight bytes in: a user-space [`RingBuffer`]
//! (the default, portable) or, on Linux, a [`KernelPipe`] that `splice(2)`
//! fills from the source socket and drains into the destination, so bulk
//! bytes never cross into user space (the original Go relay gets the same
//! from `io.Copy`). Both are fixed in size, so memory stays bounded either
//! way; a kernel pipe costs two descriptors while it is lent.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use mio::net::TcpStream;

use crate::ring::RingBuffer;
use crate::sockio::{Io, read_into, write_from, write_kept};

/// In-flight bytes of one direction.
pub enum Buffer {
    /// Bytes copied into user space and out again.
    Ring(RingBuffer),
    /// Bytes spliced through a kernel pipe.
    Kernel(KernelPipe),
}

impl Buffer {
    /// Bytes held.
    pub fn len(&self) -> usize {
        match self {
            Buffer::Ring(ring) => ring.len(),
            Buffer::Kernel(pipe) => pipe.len,
        }
    }

    /// Holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Can take no more bytes.
    pub fn is_full(&self) -> bool {
        self.window() == 0
    }

    /// Room left, in bytes.
    pub fn window(&self) -> usize {
        match self {
            Buffer::Ring(ring) => ring.window(),
            Buffer::Kernel(pipe) => pipe.capacity.saturating_sub(pipe.len),
        }
    }

    /// Reads from `src` into the free room.
    pub fn fill_from(&mut self, src: &TcpStream) -> Io {
        match self {
            Buffer::Ring(ring) => read_into(src, ring),
            Buffer::Kernel(pipe) => pipe.fill_from(src.as_raw_fd()),
        }
    }

    /// Writes held bytes to `dst`.
    pub fn drain_to(&mut self, dst: &TcpStream) -> Io {
        match self {
            Buffer::Ring(ring) => write_from(dst, ring),
            Buffer::Kernel(pipe) => pipe.drain_to(dst.as_raw_fd()),
        }
    }

    /// Writes held bytes from `skip` on to `dst`, keeping them held. Only a
    /// ring can keep what it wrote (a kernel pipe's bytes are gone once
    /// spliced), so for a kernel pipe this is [`drain_to`](Self::drain_to)
    /// and its callers never ask it to keep.
    pub fn drain_kept_to(&mut self, dst: &TcpStream, skip: usize) -> Io {
        match self {
            Buffer::Ring(ring) => write_kept(dst, ring, skip),
            Buffer::Kernel(pipe) => pipe.drain_to(dst.as_raw_fd()),
        }
    }

    /// Drops the oldest `n` held bytes: kept bytes no longer needed.
    pub fn forget(&mut self, n: usize) {
        match self {
            Buffer::Ring(ring) => ring.consume(n),
            Buffer::Kernel(_) => {}
        }
    }

    /// Whether a read that moved less than the room offered proves the
    /// source drained. For a ring, yes (the kernel copied all it had); not
    /// for a kernel pipe, whose `splice` stops when the pipe's slots run out.
    pub fn short_fill_means_drained(&self) -> bool {
        matches!(self, Buffer::Ring(_))
    }

    /// Whether a `WouldBlock` from [`fill_from`](Self::fill_from) proves the
    /// source empty. Always for a ring (it offered room); for a kernel pipe
    /// only when the pipe is empty, since `splice` also says `EAGAIN` when the
    /// pipe has no free slot, which can happen before `len` reaches capacity
    /// (a pipe slot holds one page fragment, however small).
    pub fn would_block_means_drained(&self) -> bool {
        match self {
            Buffer::Ring(_) => true,
            Buffer::Kernel(pipe) => pipe.len == 0,
        }
    }
}

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

    /// Whether the pipe is empty, so it can be lent again.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn fill_from(&mut self, src: RawFd) -> Io {
        let room = self.capacity.saturating_sub(self.len);
        match splice(src, self.write.as_raw_fd(), room) {
            Io::Moved(n) => {
                self.len += n;
                Io::Moved(n)
            }
            other => other,
        }
    }

    fn drain_to(&mut self, dst: RawFd) -> Io {
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
}
