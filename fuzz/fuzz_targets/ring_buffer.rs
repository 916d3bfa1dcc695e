//! Fuzzes `RingBuffer` against a `VecDeque<u8>` model: the input is a
//! capacity and a sequence of operations; after each one the observers
//! agree with the model and every byte handed out is the model's.
//!
//! Input layout: one byte for the capacity (mod 64, plus 1), then pairs
//! `(op, arg)`. `op % 5` picks enqueue_slice / dequeue_slice / enqueue_with /
//! dequeue_with / clear; bit 7 of `op` makes a closure fail; `arg` is a
//! length or the count a closure reports (255 stands for `usize::MAX`).

#![no_main]

use std::collections::VecDeque;

use libfuzzer_sys::fuzz_target;
use tcp_relay::ring::RingBuffer;

fuzz_target!(|data: &[u8]| {
    let Some((&cap, mut ops)) = data.split_first() else {
        return;
    };
    let mut model = Model {
        ring: RingBuffer::new(usize::from(cap % 64) + 1),
        deque: VecDeque::new(),
        cap: usize::from(cap % 64) + 1,
        next: 0,
    };
    while let [op, arg, rest @ ..] = ops {
        ops = rest;
        let count = if *arg == u8::MAX {
            usize::MAX
        } else {
            usize::from(*arg)
        };
        model.step(op % 5, count, op & 0x80 != 0);
        model.check();
    }
});

struct Model {
    ring: RingBuffer,
    deque: VecDeque<u8>,
    cap: usize,
    next: u8, // the next byte to enqueue: distinct from stale bytes nearby
}

impl Model {
    fn fresh(&mut self, n: usize) -> Vec<u8> {
        (0..n)
            .map(|_| {
                self.next = self.next.wrapping_add(1);
                self.next
            })
            .collect()
    }

    fn step(&mut self, op: u8, count: usize, fail: bool) {
        match op {
            0 => {
                let data = self.fresh(count.min(200));
                let n = self.ring.enqueue_slice(&data);
                assert_eq!(n, data.len().min(self.cap - self.deque.len()));
                self.deque.extend(&data[..n]);
            }
            1 => {
                let mut out = vec![0; count.min(200)];
                let n = self.ring.dequeue_slice(&mut out);
                let want: Vec<u8> = self
                    .deque
                    .drain(..out.len().min(self.deque.len()))
                    .collect();
                assert_eq!(out[..n], want[..]);
            }
            2 => self.enqueue_with(count, fail),
            3 => self.dequeue_with(count, fail),
            _ => {
                self.ring.clear();
                self.deque.clear();
            }
        }
    }

    fn enqueue_with(&mut self, count: usize, fail: bool) {
        let window = self.cap - self.deque.len();
        let was_empty = self.deque.is_empty();
        let fill = self.fresh(window);
        let mut shape = (0, 0);
        let result = self.ring.enqueue_with(|first, second| {
            shape = (first.len(), second.len());
            let (a, b) = fill.split_at(first.len().min(fill.len()));
            first.copy_from_slice(a);
            second.copy_from_slice(b);
            if fail { Err(()) } else { Ok(count) }
        });
        assert_eq!(shape.0 + shape.1, window, "offers exactly the free space");
        assert!(!was_empty || shape.1 == 0, "an empty ring offers one slice");
        if fail {
            assert_eq!(result, Err(()));
        } else {
            let n = count.min(window);
            assert_eq!(result, Ok(n));
            self.deque.extend(&fill[..n]);
        }
    }

    fn dequeue_with(&mut self, count: usize, fail: bool) {
        let mut offered = Vec::new();
        let result = self.ring.dequeue_with(|first, second| {
            offered.extend_from_slice(first);
            offered.extend_from_slice(second);
            if fail { Err(()) } else { Ok(count) }
        });
        assert!(
            offered.iter().eq(self.deque.iter()),
            "offers all stored bytes"
        );
        if fail {
            assert_eq!(result, Err(()));
        } else {
            let n = count.min(self.deque.len());
            assert_eq!(result, Ok(n));
            self.deque.drain(..n);
        }
    }

    fn check(&self) {
        assert_eq!(self.ring.capacity(), self.cap);
        assert_eq!(self.ring.len(), self.deque.len());
        assert_eq!(self.ring.is_empty(), self.deque.is_empty());
        assert_eq!(self.ring.is_full(), self.deque.len() == self.cap);
        assert_eq!(self.ring.window(), self.cap - self.deque.len());
    }
}
