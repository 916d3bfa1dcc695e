//! A finished pipe whose last bytes are not delivered yet.
//!
//! When both ways of a pipe are done, every byte has been written to the
//! kernel, not necessarily received: a slow reader's window can hold back
//! megabytes in the send queue. Closing the socket then leaves them to an
//! orphan, and Linux resets orphans when TCP memory runs short ("TCP: out of
//! memory -- consider tuning tcp_mem") or there are more than
//! `tcp_max_orphans`: the peer, which had read part of its stream, gets
//! `ECONNRESET` and loses the rest. In issue 9's burst (2,000 clients each
//! echoing 4 MiB, kernel TCP memory at 150 % of its pressure mark) that cut
//! one to nine clients a run short.
//!
//! So a pipe whose sockets still hold unacknowledged bytes when it is done
//! is kept, its descriptors open (they count against the connection limit
//! as the pipe's did), until its peers have acknowledged everything, one of
//! them resets, or nothing has been acknowledged for [`STALL`] (a peer that
//! stopped reading: closed then, as before). Checks run on the entry's timer,
//! 10 ms after the end and then at doubling intervals up to a second, and on
//! any event of its sockets. A pipe with nothing left unacknowledged, the
//! usual case, costs one `SIOCOUTQ` per socket and closes at once.

use std::time::{Duration, Instant};

use mio::net::TcpStream;

use crate::sockio::Stream;

/// How long a finished pipe is kept while its peers acknowledge nothing.
pub(crate) const STALL: Duration = Duration::from_secs(30);

/// The first check, after the end.
const FIRST_CHECK: Duration = Duration::from_millis(10);

/// The longest interval between two checks.
const LAST_CHECK: Duration = Duration::from_secs(1);

/// What a check found.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Check {
    /// Every byte acknowledged (or a peer reset): close now.
    Delivered,
    /// Bytes still in flight: check again at this instant.
    Again(Instant),
    /// Nothing acknowledged for [`STALL`]: close, leaving the rest to the
    /// kernel.
    Stalled,
}

/// The sockets of a finished pipe (or echo), kept until their peers have
/// every byte.
pub(crate) struct Flush<S = TcpStream> {
    ends: Vec<S>,       // the sockets, in the order the entry's sub-tokens name them
    unacked: usize,     // bytes unacknowledged at the last check
    progress: Instant,  // when that count last fell
    interval: Duration, // until the next check
    reset: bool,        // a peer reset: nothing more can be delivered
}

impl<S: Stream> Flush<S> {
    /// Bytes the peers of `ends` have not acknowledged.
    pub(crate) fn unacked(ends: &[&S]) -> usize {
        ends.iter().map(|end| end.unacked()).sum()
    }

    /// Keeps `ends` (whose peers have not acknowledged everything) until
    /// they have. Each write half is shut first: a pipe's last way closes
    /// without `shutdown` when the close is imminent (the close sends the
    /// FIN), and the peer must not wait for its EOF while we wait for its
    /// acknowledgements. A shutdown may fail (`ENOTCONN` on a socket whose
    /// FINs have both been acknowledged): the check that follows says
    /// whether anything is left to wait for.
    pub(crate) fn new(ends: Vec<S>, now: Instant) -> (Flush<S>, Check) {
        for end in &ends {
            let _ = end.shutdown_write();
        }
        let mut flush = Flush {
            ends,
            unacked: usize::MAX,
            progress: now,
            interval: FIRST_CHECK,
            reset: false,
        };
        let check = flush.check(now);
        (flush, check)
    }

    /// Counts what is still unacknowledged, and says what to do.
    pub(crate) fn check(&mut self, now: Instant) -> Check {
        self.reset |= self
            .ends
            .iter()
            .any(|end| !matches!(end.take_error(), Ok(None)));
        let unacked: usize = self.ends.iter().map(Stream::unacked).sum();
        if self.reset || unacked == 0 {
            return Check::Delivered;
        }
        if unacked < self.unacked {
            self.progress = now;
        }
        self.unacked = unacked;
        if now >= self.progress + STALL {
            return Check::Stalled;
        }
        let next = now + self.interval;
        self.interval = (self.interval * 2).min(LAST_CHECK);
        Check::Again(next)
    }

    /// The sockets kept (what the entry counts against its limits).
    pub(crate) fn sockets(&self) -> usize {
        self.ends.len()
    }

    /// Bytes unacknowledged at the last check.
    pub(crate) fn pending(&self) -> usize {
        self.unacked
    }

    /// The sockets, to close.
    pub(crate) fn into_ends(self) -> Vec<S> {
        self.ends
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sockio::script::Script;

    fn flushing(unacked: [usize; 2], now: Instant) -> (Flush<Script>, Check) {
        let ends: Vec<Script> = unacked
            .iter()
            .map(|&n| {
                let end = Script::new();
                end.set_unacked(n);
                end
            })
            .collect();
        Flush::new(ends, now)
    }

    #[test]
    fn both_write_halves_are_shut_first() {
        let (flush, _) = flushing([5, 0], Instant::now());
        let ends = flush.into_ends();
        assert!(ends.iter().all(|end| end.shutdowns() == 1));
    }

    #[test]
    fn waits_until_every_byte_is_acknowledged() {
        let t0 = Instant::now();
        let (mut flush, check) = flushing([1000, 10], t0);
        assert_eq!(check, Check::Again(t0 + FIRST_CHECK));
        assert_eq!(flush.pending(), 1010);
        flush.ends[0].set_unacked(0);
        assert_eq!(
            flush.check(t0 + FIRST_CHECK),
            Check::Again(t0 + FIRST_CHECK * 3)
        );
        flush.ends[1].set_unacked(0);
        assert_eq!(flush.check(t0 + FIRST_CHECK * 3), Check::Delivered);
    }

    #[test]
    fn checks_back_off_to_a_second() {
        let t0 = Instant::now();
        let (mut flush, _) = flushing([1, 0], t0);
        let mut now = t0;
        let mut intervals = Vec::new();
        for _ in 0..10 {
            let Check::Again(next) = flush.check(now) else {
                panic!("a byte is still unacknowledged");
            };
            intervals.push(next - now);
            now = next;
        }
        assert_eq!(intervals[0], FIRST_CHECK * 2);
        assert_eq!(*intervals.last().unwrap_or(&Duration::ZERO), LAST_CHECK);
        assert!(intervals.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn a_peer_that_acknowledges_nothing_for_the_stall_time_is_given_up() {
        let t0 = Instant::now();
        let (mut flush, _) = flushing([4096, 0], t0);
        assert!(matches!(flush.check(t0 + STALL / 2), Check::Again(_)));
        assert_eq!(flush.check(t0 + STALL), Check::Stalled);
    }

    #[test]
    fn progress_restarts_the_stall_clock() {
        let t0 = Instant::now();
        let (mut flush, _) = flushing([4096, 0], t0);
        flush.ends[0].set_unacked(2048);
        assert!(matches!(flush.check(t0 + STALL / 2), Check::Again(_)));
        assert!(matches!(flush.check(t0 + STALL), Check::Again(_)));
        assert_eq!(flush.check(t0 + STALL / 2 + STALL), Check::Stalled);
    }

    #[test]
    fn a_reset_peer_ends_the_wait() {
        let t0 = Instant::now();
        let (mut flush, _) = flushing([4096, 0], t0);
        flush.ends[0].reset_by_peer();
        assert_eq!(flush.check(t0 + FIRST_CHECK), Check::Delivered);
    }

    #[test]
    fn a_reset_before_the_end_is_not_waited_for() {
        let t0 = Instant::now();
        let end = Script::new();
        end.set_unacked(4096);
        end.reset_by_peer();
        let (_, check) = Flush::new(vec![end, Script::new()], t0);
        assert_eq!(check, Check::Delivered);
    }
}
