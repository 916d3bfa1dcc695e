//! Lends buffers (rings, or kernel pipes for splice) to pipe directions only
//! while bytes are in flight.
//!
//! An idle pipe holds no buffer (invariant *Idle pipes hold no buffers*): a
//! direction borrows one when its source becomes readable and gives it back
//! the moment the ring is empty again. Thousands of idle clients therefore
//! cost a slab entry each, not two rings each. Returned buffers are kept for
//! reuse up to `max_idle`, so a busy relay does not allocate per read, and a
//! burst that needed many buffers gives the memory back once it is over.

use crate::buffer::Buffer;
#[cfg(target_os = "linux")]
use crate::buffer::KernelPipe;
use crate::ring::RingBuffer;

/// A free list of equally sized buffers: rings, or kernel pipes for splice.
pub struct BufferPool {
    free_rings: Vec<RingBuffer>, // empty rings ready to lend
    #[cfg(target_os = "linux")]
    free_pipes: Vec<KernelPipe>, // empty kernel pipes ready to lend
    buffer_size: usize,          // capacity of the kernel pipes, and of rings without splice
    ring_size: usize,            // capacity of the rings this pool lends
    max_idle: usize,             // most buffers of each kind kept free
    lent: usize,                 // buffers currently held by directions
    splice: bool,                // lend kernel pipes (Linux; falling back to rings)
}

impl BufferPool {
    /// A pool of rings of `buffer_size` bytes that keeps at most `max_idle`
    /// returned rings around.
    pub fn new(buffer_size: usize, max_idle: usize) -> Self {
        BufferPool {
            free_rings: Vec::new(),
            #[cfg(target_os = "linux")]
            free_pipes: Vec::new(),
            buffer_size,
            ring_size: buffer_size,
            max_idle,
            lent: 0,
            splice: false,
        }
    }

    /// Lends kernel pipes for `splice(2)` instead of rings, on Linux (a
    /// no-op elsewhere: there is no `splice`). When a pipe cannot be made
    /// (out of descriptors), a ring is lent instead.
    pub fn with_splice(mut self, splice: bool) -> Self {
        self.splice = splice && cfg!(target_os = "linux");
        if self.splice {
            // Splicing, a ring only carries small messages and a
            // direction's first read (bulk moves to a kernel pipe as soon as
            // a read fills a ring): a quarter of the size is plenty, and a
            // burst of thousands of streams, each starting on a ring, holds
            // a quarter of the memory (56 MiB peak for 2,000 clients with
            // 64 KiB rings).
            self.ring_size = crate::pipe::BULK_READ.min(self.buffer_size);
        }
        self
    }

    /// An empty buffer, reused when one is free: a kernel pipe if the pool
    /// splices and the caller expects `bulk` traffic, else a ring.
    pub fn take(&mut self, bulk: bool) -> Buffer {
        self.lent += 1;
        if self.splice
            && bulk
            && let Some(pipe) = self.take_pipe()
        {
            return pipe;
        }
        Buffer::Ring(
            self.free_rings
                .pop()
                .unwrap_or_else(|| RingBuffer::new(self.ring_size)),
        )
    }

    /// A free kernel pipe, or a new one if it can be made.
    #[cfg(target_os = "linux")]
    fn take_pipe(&mut self) -> Option<Buffer> {
        let pipe = match self.free_pipes.pop() {
            Some(pipe) => pipe,
            None => KernelPipe::new(self.buffer_size).ok()?,
        };
        Some(Buffer::Kernel(pipe))
    }

    /// No kernel pipes without `splice` (and `splice` is never set here).
    #[cfg(not(target_os = "linux"))]
    fn take_pipe(&mut self) -> Option<Buffer> {
        None
    }

    /// Takes a buffer back. A ring's contents are discarded; a kernel pipe
    /// that still holds bytes cannot be emptied cheaply, so it is closed.
    pub fn give(&mut self, buffer: Buffer) {
        self.lent = self.lent.saturating_sub(1);
        match buffer {
            Buffer::Ring(mut ring) if self.free_rings.len() < self.max_idle => {
                ring.clear();
                self.free_rings.push(ring);
            }
            #[cfg(target_os = "linux")]
            Buffer::Kernel(pipe) if pipe.is_empty() && self.free_pipes.len() < self.max_idle => {
                self.free_pipes.push(pipe);
            }
            _ => {}
        }
    }

    /// Buffers currently lent out.
    pub fn lent(&self) -> usize {
        self.lent
    }
}

#[cfg(test)]
mod tests {
    use super::BufferPool;
    use crate::buffer::Buffer;

    #[test]
    // Without kernel pipes (off Linux) a buffer is always a ring.
    #[cfg_attr(not(target_os = "linux"), allow(irrefutable_let_patterns))]
    fn reuses_returned_rings_and_counts_loans() {
        let mut pool = BufferPool::new(8, 1);
        let mut a = pool.take(false);
        if let Buffer::Ring(ring) = &mut a {
            ring.enqueue_slice(b"abc");
        }
        let b = pool.take(false);
        assert_eq!(pool.lent(), 2);
        pool.give(a);
        pool.give(b); // beyond max_idle: dropped
        assert_eq!(pool.lent(), 0);
        let again = pool.take(false);
        assert!(again.is_empty(), "a lent ring always starts empty");
        assert_eq!(again.window(), 8);
    }
}
