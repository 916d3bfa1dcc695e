//! Lends ring buffers to pipe directions only while bytes are in flight.
//!
//! An idle pipe holds no buffer (invariant *Idle pipes hold no buffers*): a
//! direction borrows one when its source becomes readable and gives it back
//! the moment the ring is empty again. Thousands of idle clients therefore
//! cost a slab entry each, not two rings each. Returned buffers are kept for
//! reuse up to `max_idle`, so a busy relay does not allocate per read, and a
//! burst that needed many buffers gives the memory back once it is over.

use crate::ring::RingBuffer;

/// A free list of equally sized ring buffers.
pub struct BufferPool {
    free: Vec<RingBuffer>, // empty rings ready to lend
    buffer_size: usize,    // capacity of every ring this pool lends
    max_idle: usize,       // most rings kept on the free list
    lent: usize,           // rings currently held by directions
}

impl BufferPool {
    /// A pool of rings of `buffer_size` bytes that keeps at most `max_idle`
    /// returned rings around.
    pub fn new(buffer_size: usize, max_idle: usize) -> Self {
        BufferPool {
            free: Vec::new(),
            buffer_size,
            max_idle,
            lent: 0,
        }
    }

    /// An empty ring, reused when one is free.
    pub fn take(&mut self) -> RingBuffer {
        self.lent += 1;
        self.free
            .pop()
            .unwrap_or_else(|| RingBuffer::new(self.buffer_size))
    }

    /// Takes a ring back; its contents are discarded.
    pub fn give(&mut self, mut ring: RingBuffer) {
        self.lent = self.lent.saturating_sub(1);
        if self.free.len() < self.max_idle {
            ring.clear();
            self.free.push(ring);
        }
    }

    /// Rings currently lent out.
    pub fn lent(&self) -> usize {
        self.lent
    }

    /// Capacity of each ring.
    pub fn buffer_size(&self) -> usize {
        self.buffer_size
    }
}

#[cfg(test)]
mod tests {
    use super::BufferPool;

    #[test]
    fn reuses_returned_rings_and_counts_loans() {
        let mut pool = BufferPool::new(8, 1);
        let mut a = pool.take();
        a.enqueue_slice(b"abc");
        let b = pool.take();
        assert_eq!(pool.lent(), 2);
        pool.give(a);
        pool.give(b); // beyond max_idle: dropped
        assert_eq!(pool.lent(), 0);
        let again = pool.take();
        assert!(again.is_empty(), "a lent ring always starts empty");
        assert_eq!(again.capacity(), 8);
    }
}
