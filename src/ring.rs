//! A fixed-capacity byte ring: the only place relayed bytes rest in user space.
//!
//! Pure data structure, no sockets. The shape follows smoltcp's `RingBuffer`:
//! storage, a read position and a length. Producers and consumers get the
//! free space or the stored bytes as (at most) two contiguous slices, so a
//! single `readv`/`writev` call can fill or drain the whole ring even when it
//! wraps. The capacity never changes after construction, which is what makes
//! memory per connection bounded (invariant *Bounded buffers* in the crate docs).

/// A byte ring buffer of fixed capacity.
pub struct RingBuffer {
    storage: Box<[u8]>, // never resized: the capacity is fixed for life
    read_at: usize,     // index of the oldest stored byte
    len: usize,         // number of stored bytes, <= storage.len()
}

impl RingBuffer {
    /// A ring that holds at most `capacity` bytes (at least one).
    pub fn new(capacity: usize) -> Self {
        RingBuffer {
            storage: vec![0; capacity.max(1)].into_boxed_slice(),
            read_at: 0,
            len: 0,
        }
    }

    /// The fixed number of bytes the ring can hold.
    pub fn capacity(&self) -> usize {
        self.storage.len()
    }

    /// Bytes stored and not yet dequeued.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No bytes are stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// No free space is left.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn is_full(&self) -> bool {
        self.len == self.capacity()
    }

    /// Free space in bytes.
    pub fn window(&self) -> usize {
        self.capacity() - self.len
    }

    /// Offers the free space as two slices (the second empty unless the free
    /// space wraps) to `f`, which returns how many bytes it wrote there, from
    /// the start of the first slice on. Those bytes become stored. A count
    /// larger than the free space is clamped: `f` cannot corrupt the ring.
    pub fn enqueue_with<E>(
        &mut self,
        f: impl FnOnce(&mut [u8], &mut [u8]) -> Result<usize, E>,
    ) -> Result<usize, E> {
        if self.is_empty() {
            // Rewinding an empty ring makes its whole capacity one contiguous
            // slice, so the next read needs no second iovec.
            self.read_at = 0;
        }
        let cap = self.capacity();
        let write_at = (self.read_at + self.len) % cap;
        let window = self.window();
        let first_len = window.min(cap - write_at);
        let (head, tail) = self.storage.split_at_mut(write_at);
        let (first, _) = tail.split_at_mut(first_len);
        let second_len = window - first_len;
        let n = f(first, &mut head[..second_len])?.min(window);
        self.len += n;
        Ok(n)
    }

    /// Offers the stored bytes, oldest first, as two slices (the second empty
    /// unless the data wraps) to `f`, which returns how many it consumed.
    /// Those bytes are removed. A larger count is clamped to what is stored.
    pub fn dequeue_with<E>(
        &mut self,
        f: impl FnOnce(&[u8], &[u8]) -> Result<usize, E>,
    ) -> Result<usize, E> {
        let cap = self.capacity();
        let first_len = self.len.min(cap - self.read_at);
        let second_len = self.len - first_len;
        let first = &self.storage[self.read_at..self.read_at + first_len];
        let second = &self.storage[..second_len];
        let n = f(first, second)?.min(self.len);
        self.read_at = (self.read_at + n) % cap;
        self.len -= n;
        Ok(n)
    }

    /// Offers the stored bytes from `skip` on (the oldest `skip` stay
    /// untouched), as two slices, to `f`, without removing any: for bytes
    /// written out but kept for a replay until [`consume`](Self::consume)d.
    /// Returns what `f` returns, clamped to the bytes offered.
    pub fn peek_with<E>(
        &self,
        skip: usize,
        f: impl FnOnce(&[u8], &[u8]) -> Result<usize, E>,
    ) -> Result<usize, E> {
        let cap = self.capacity();
        let skip = skip.min(self.len);
        let start = (self.read_at + skip) % cap;
        let len = self.len - skip;
        let first_len = len.min(cap - start);
        let first = &self.storage[start..start + first_len];
        let second = &self.storage[..len - first_len];
        Ok(f(first, second)?.min(len))
    }

    /// Removes the oldest `n` stored bytes (at most all of them).
    pub fn consume(&mut self, n: usize) {
        let n = n.min(self.len);
        self.read_at = (self.read_at + n) % self.capacity();
        self.len -= n;
    }

    /// Copies as much of `data` as fits; returns the count copied.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn enqueue_slice(&mut self, data: &[u8]) -> usize {
        let copied = self.enqueue_with(|first, second| {
            let a = first.len().min(data.len());
            first[..a].copy_from_slice(&data[..a]);
            let b = second.len().min(data.len() - a);
            second[..b].copy_from_slice(&data[a..a + b]);
            Ok::<_, ()>(a + b)
        });
        copied.unwrap_or(0)
    }

    /// Moves as many stored bytes as fit into `out`; returns the count moved.
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn dequeue_slice(&mut self, out: &mut [u8]) -> usize {
        let moved = self.dequeue_with(|first, second| {
            let a = first.len().min(out.len());
            out[..a].copy_from_slice(&first[..a]);
            let b = second.len().min(out.len() - a);
            out[a..a + b].copy_from_slice(&second[..b]);
            Ok::<_, ()>(a + b)
        });
        moved.unwrap_or(0)
    }

    /// Forgets all stored bytes.
    pub fn clear(&mut self) {
        self.read_at = 0;
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::RingBuffer;

    fn drain_all(ring: &mut RingBuffer) -> Vec<u8> {
        let mut out = vec![0; ring.len()];
        let n = ring.dequeue_slice(&mut out);
        out.truncate(n);
        out
    }

    #[test]
    fn capacity_one_holds_one_byte() {
        let mut ring = RingBuffer::new(1);
        assert_eq!(ring.enqueue_slice(b"ab"), 1);
        assert!(ring.is_full());
        assert_eq!(ring.enqueue_slice(b"c"), 0);
        assert_eq!(drain_all(&mut ring), b"a");
        assert!(ring.is_empty());
    }

    #[test]
    fn zero_capacity_is_raised_to_one() {
        assert_eq!(RingBuffer::new(0).capacity(), 1);
    }

    #[test]
    fn wrapped_data_comes_out_in_order() {
        let mut ring = RingBuffer::new(8);
        assert_eq!(ring.enqueue_slice(b"abcdef"), 6);
        let mut out = [0; 4];
        assert_eq!(ring.dequeue_slice(&mut out), 4);
        assert_eq!(&out, b"abcd");
        // 2 stored at offset 4; 6 free, wrapping past the end.
        assert_eq!(ring.enqueue_slice(b"ghijklmn"), 6);
        assert!(ring.is_full());
        assert_eq!(drain_all(&mut ring), b"efghijkl");
    }

    #[test]
    fn enqueue_with_offers_both_free_slices() {
        let mut ring = RingBuffer::new(8);
        ring.enqueue_slice(b"123456");
        let mut four = [0; 4];
        ring.dequeue_slice(&mut four);
        let sizes = ring.enqueue_with(|a, b| Ok::<_, ()>(a.len() + b.len()));
        assert_eq!(sizes, Ok(6));
        assert!(ring.is_full());
    }

    #[test]
    fn dequeue_with_offers_both_data_slices() {
        let mut ring = RingBuffer::new(4);
        ring.enqueue_slice(b"abc");
        let mut two = [0; 2];
        ring.dequeue_slice(&mut two);
        ring.enqueue_slice(b"def");
        let seen = ring.dequeue_with(|a, b| {
            assert_eq!(a, b"cd");
            assert_eq!(b, b"ef");
            Ok::<_, ()>(3)
        });
        assert_eq!(seen, Ok(3));
        assert_eq!(drain_all(&mut ring), b"f");
    }

    #[test]
    fn peeked_bytes_stay_until_consumed() {
        let mut ring = RingBuffer::new(4);
        ring.enqueue_slice(b"abc");
        ring.consume(2);
        ring.enqueue_slice(b"def"); // stored "cdef", wrapping after "cd"
        let seen = ring.peek_with(1, |a, b| {
            assert_eq!(a, b"d");
            assert_eq!(b, b"ef");
            Ok::<_, ()>(99)
        });
        assert_eq!(seen, Ok(3), "clamped to what was offered");
        assert_eq!(ring.len(), 4, "peeking removes nothing");
        assert_eq!(
            ring.peek_with(4, |a, b| Ok::<_, ()>(a.len() + b.len())),
            Ok(0)
        );
        ring.consume(3);
        assert_eq!(drain_all(&mut ring), b"f");
        ring.consume(5); // more than stored: empties, no panic
        assert!(ring.is_empty());
    }

    #[test]
    fn overlong_counts_are_clamped() {
        let mut ring = RingBuffer::new(2);
        assert_eq!(ring.enqueue_with(|_, _| Ok::<_, ()>(99)), Ok(2));
        assert_eq!(ring.dequeue_with(|_, _| Ok::<_, ()>(99)), Ok(2));
        assert!(ring.is_empty());
    }

    #[test]
    fn errors_change_nothing() {
        let mut ring = RingBuffer::new(4);
        ring.enqueue_slice(b"xy");
        assert_eq!(ring.enqueue_with(|_, _| Err::<usize, _>("e")), Err("e"));
        assert_eq!(ring.dequeue_with(|_, _| Err::<usize, _>("e")), Err("e"));
        assert_eq!(drain_all(&mut ring), b"xy");
    }

    #[test]
    fn empty_ring_rewinds_to_one_contiguous_window() {
        let mut ring = RingBuffer::new(8);
        ring.enqueue_slice(b"abcde");
        drain_all(&mut ring);
        let first_len = ring.enqueue_with(|a, b| {
            assert!(b.is_empty());
            Ok::<_, ()>(a.len())
        });
        assert_eq!(first_len, Ok(8));
    }

    #[test]
    fn many_small_cycles_keep_order() {
        // Capacities 1, 2, 3 and 8 against chunk sizes that straddle them.
        for cap in [1usize, 2, 3, 8] {
            let mut ring = RingBuffer::new(cap);
            let input: Vec<u8> = (0..=255).collect();
            let mut output = Vec::new();
            let mut fed = 0;
            let mut step = 0;
            while output.len() < input.len() {
                step += 1;
                let chunk = (step % 5) + 1;
                let end = (fed + chunk).min(input.len());
                fed += ring.enqueue_slice(&input[fed..end]);
                let mut buf = vec![0; (step % 3) + 1];
                let n = ring.dequeue_slice(&mut buf);
                output.extend_from_slice(&buf[..n]);
                assert!(ring.len() <= cap);
            }
            assert_eq!(output, input, "capacity {cap}");
        }
    }
}
