//! What a direction holds its in-flight bytes in: a user-space [`RingBuffer`]
//! (the default, portable) or, on Linux, a [`KernelPipe`] that `splice(2)`
//! fills from the source socket and drains into the destination, so bulk
//! bytes never cross into user space (the original Go relay gets the same
//! from `io.Copy`). Both are fixed in size, so memory stays bounded either
//! way; a kernel pipe costs two descriptors while it is lent. Elsewhere
//! (macOS, the BSDs) there is no `splice`, and every buffer is a ring.

use crate::ring::RingBuffer;
use crate::sockio::{Io, Stream, read_into, write_from, write_kept};

#[cfg(target_os = "linux")]
mod splice;
#[cfg(target_os = "linux")]
pub use splice::KernelPipe;

/// In-flight bytes of one direction.
pub enum Buffer {
    /// Bytes copied into user space and out again.
    Ring(RingBuffer),
    /// Bytes spliced through a kernel pipe (Linux).
    #[cfg(target_os = "linux")]
    Kernel(KernelPipe),
}

impl Buffer {
    /// Bytes held.
    pub fn len(&self) -> usize {
        match self {
            Buffer::Ring(ring) => ring.len(),
            #[cfg(target_os = "linux")]
            Buffer::Kernel(pipe) => pipe.len(),
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
            #[cfg(target_os = "linux")]
            Buffer::Kernel(pipe) => pipe.window(),
        }
    }

    /// Reads from `src` into the free room. A kernel pipe needs a socket's
    /// descriptor: from a stream without one (a test's script) it fails.
    pub fn fill_from<S: Stream>(&mut self, src: &S) -> Io {
        match self {
            Buffer::Ring(ring) => read_into(src.io(), ring),
            #[cfg(target_os = "linux")]
            Buffer::Kernel(pipe) => match src.splice_fd() {
                Some(fd) => pipe.fill_from(fd),
                None => unspliceable(),
            },
        }
    }

    /// Writes held bytes to `dst`.
    pub fn drain_to<S: Stream>(&mut self, dst: &S) -> Io {
        match self {
            Buffer::Ring(ring) => write_from(dst.io(), ring),
            #[cfg(target_os = "linux")]
            Buffer::Kernel(pipe) => match dst.splice_fd() {
                Some(fd) => pipe.drain_to(fd),
                None => unspliceable(),
            },
        }
    }

    /// Writes held bytes from `skip` on to `dst`, keeping them held. Only a
    /// ring can keep what it wrote (a kernel pipe's bytes are gone once
    /// spliced), so for a kernel pipe this is [`drain_to`](Self::drain_to)
    /// and its callers never ask it to keep.
    pub fn drain_kept_to<S: Stream>(&mut self, dst: &S, skip: usize) -> Io {
        match self {
            Buffer::Ring(ring) => write_kept(dst.io(), ring, skip),
            #[cfg(target_os = "linux")]
            Buffer::Kernel(_) => self.drain_to(dst),
        }
    }

    /// Drops the oldest `n` held bytes: kept bytes no longer needed.
    pub fn forget(&mut self, n: usize) {
        match self {
            Buffer::Ring(ring) => ring.consume(n),
            #[cfg(target_os = "linux")]
            Buffer::Kernel(_) => {}
        }
    }

    /// Whether a read that moved less than the room offered proves the
    /// source drained. For a ring, yes (the kernel copied all it had); not
    /// for a kernel pipe, whose `splice` stops when the pipe's slots run out.
    pub fn short_fill_means_drained(&self) -> bool {
        match self {
            Buffer::Ring(_) => true,
            #[cfg(target_os = "linux")]
            Buffer::Kernel(_) => false,
        }
    }

    /// Whether a `WouldBlock` from [`fill_from`](Self::fill_from) proves the
    /// source empty. Always for a ring (it offered room); for a kernel pipe
    /// only when the pipe is empty, since `splice` also says `EAGAIN` when the
    /// pipe has no free slot, which can happen before `len` reaches capacity
    /// (a pipe slot holds one page fragment, however small).
    pub fn would_block_means_drained(&self) -> bool {
        match self {
            Buffer::Ring(_) => true,
            #[cfg(target_os = "linux")]
            Buffer::Kernel(pipe) => pipe.is_empty(),
        }
    }
}

/// What splicing from or to a stream without a descriptor does.
#[cfg(target_os = "linux")]
fn unspliceable() -> Io {
    Io::Failed(std::io::ErrorKind::Unsupported.into())
}

#[cfg(test)]
mod tests {
    use super::Buffer;
    use crate::ring::RingBuffer;
    use crate::sockio::Io;
    use crate::sockio::script::{Script, Step, data};

    #[test]
    fn a_ring_short_fill_or_would_block_proves_the_source_drained() {
        let ring = Buffer::Ring(RingBuffer::new(8));
        assert!(ring.short_fill_means_drained());
        assert!(ring.would_block_means_drained());
    }

    #[test]
    fn a_ring_reads_and_writes_through_a_stream() {
        let mut ring = Buffer::Ring(RingBuffer::new(4));
        let src = Script::new();
        src.reads([data(b"abcdef")]);
        assert!(matches!(ring.fill_from(&src), Io::Moved(4)));
        assert!(ring.is_full());
        let dst = Script::new();
        dst.writes([Step::Take(1), Step::Take(9)]);
        assert!(matches!(ring.drain_kept_to(&dst, 0), Io::Moved(1)));
        assert_eq!(ring.len(), 4, "kept bytes stay held");
        assert!(matches!(ring.drain_kept_to(&dst, 1), Io::Moved(3)));
        ring.forget(4);
        assert!(ring.is_empty());
        assert_eq!(dst.written(), b"abcd");
        assert_eq!(src.reads_left(), 1, "what did not fit waits in the source");
    }
}
