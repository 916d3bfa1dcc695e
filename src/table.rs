//! The entry table: every connection an event loop holds, one slab entry
//! each, with the bookkeeping that must never drift from it: tokens, the
//! census by state, timers, requeued work and deferred closes. The relay
//! and the agent each keep one; neither touches the slab directly.
//!
//! A token names one socket of one entry *and the entry's generation*
//! ([`Id`]): a slot reused by a new entry gets a new generation, so an
//! event, a requeued token or a reference held by another entry that was
//! meant for the slot's previous occupant resolves to nothing instead of
//! reaching the new one (invariant *Tokens are keys*, by construction).
//! Every state change goes through [`Table::transition`], which logs it,
//! keeps the census and cancels the entry's timer (invariant *A deadline
//! belongs to its phase*); closes are only scheduled and carried out by
//! [`Table::pop_closed`] after the turn (invariant *Deferred close*).

use std::io;
use std::time::Instant;

use mio::{Registry, Token};
use slab::Slab;

use crate::reactor::Timers;

/// Sub-token bits: an entry may own up to four sockets (a relay app owns
/// its control connection and two listeners; a pipe, two streams).
const SUB_BITS: u32 = 2;
/// Slab key bits: up to a billion entries on 64-bit targets, a quarter of
/// a million on 32-bit ones (far above any descriptor limit either way).
const KEY_BITS: u32 = if usize::BITS >= 64 { 30 } else { 18 };
/// Generation bits: what is left below the top bit (kept clear, so no
/// connection token collides with the fixed tokens at the top of the
/// range). A stale token is mistaken only after 2^31 reuses of its slot.
const GEN_BITS: u32 = usize::BITS - 1 - KEY_BITS - SUB_BITS;
const SUB_MASK: usize = (1 << SUB_BITS) - 1;
const KEY_MASK: usize = (1 << KEY_BITS) - 1;
const GEN_MASK: usize = (1 << GEN_BITS) - 1;

/// Names one entry for as long as it lives: its slab key and generation.
/// Another entry that refers to it (a client to its app) holds an `Id`,
/// and [`Table::get`] tells whether it is still there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Id {
    key: usize,        // slab key
    generation: usize, // generation of the slot's occupant, < 2^GEN_BITS
}

impl Id {
    /// The token of socket `sub` (< 4) of this entry. With
    /// [`Table::resolve`], the only place tokens are made and read.
    pub(crate) fn token(self, sub: usize) -> Token {
        debug_assert!(sub <= SUB_MASK);
        Token((self.generation << (KEY_BITS + SUB_BITS)) | (self.key << SUB_BITS) | sub)
    }

    /// The slab key.
    #[cfg(test)]
    pub(crate) fn key(self) -> usize {
        self.key
    }
}

/// What a table needs to know about the states it holds.
pub(crate) trait State {
    /// Why an entry closes.
    type Ending;
    /// Census buckets: one per state worth counting.
    const KINDS: usize;
    /// The placeholder a slot holds for the instant a transition moves the
    /// old state's data into the new one.
    fn placeholder() -> Self;
    /// The state's name, for transition logs.
    fn name(&self) -> &'static str;
    /// Its census bucket (< `KINDS`), or none for the placeholder.
    fn kind(&self) -> Option<usize>;
    /// Sockets it holds for peers (listeners not counted).
    fn sockets(&self) -> usize;
}

/// One slot: its occupant and the occupant's generation.
struct Slot<S> {
    generation: usize, // matches the Id handed out for this occupant
    state: S,          // what the entry is
}

/// Entries by state, kept as states change.
pub(crate) struct Census {
    counts: Vec<usize>, // entries per kind
    sockets: usize,     // peer sockets held by all entries
}

impl Census {
    /// Entries of kind `kind`.
    pub(crate) fn count(&self, kind: usize) -> usize {
        self.counts.get(kind).copied().unwrap_or(0)
    }

    /// Peer sockets held by all entries.
    pub(crate) fn sockets(&self) -> usize {
        self.sockets
    }

    fn entered<S: State>(&mut self, state: &S) {
        self.sockets += state.sockets();
        if let Some(n) = state.kind().and_then(|k| self.counts.get_mut(k)) {
            *n += 1;
        }
    }

    fn left<S: State>(&mut self, state: &S) {
        self.sockets -= state.sockets();
        if let Some(n) = state.kind().and_then(|k| self.counts.get_mut(k)) {
            *n -= 1;
        }
    }
}

/// Every entry of one loop, and their bookkeeping.
pub(crate) struct Table<S: State> {
    slab: Slab<Slot<S>>,           // the entries
    next_gen: usize,               // generation of the next entry
    registry: Registry,            // where entries' sockets are registered
    census: Census,                // entries by state
    timers: Timers,                // at most one deadline per entry
    requeued: Vec<Token>,          // sockets whose budget ran out with work left
    closing: Vec<(Id, S::Ending)>, // entries to reap after the turn
}

impl<S: State> Table<S> {
    /// An empty table whose entries register with `registry`.
    pub(crate) fn new(registry: Registry) -> Self {
        Table {
            slab: Slab::new(),
            next_gen: 0,
            registry,
            census: Census {
                counts: vec![0; S::KINDS],
                sockets: 0,
            },
            timers: Timers::default(),
            requeued: Vec::new(),
            closing: Vec::new(),
        }
    }

    /// Inserts the entry `build` makes; `build` registers its sockets under
    /// the entry's own tokens first (`vacant_entry()` → key → register →
    /// insert), so tokens and keys cannot diverge.
    pub(crate) fn insert(
        &mut self,
        build: impl FnOnce(Id, &Registry) -> io::Result<S>,
    ) -> io::Result<Id> {
        let entry = self.slab.vacant_entry();
        if entry.key() > KEY_MASK {
            return Err(io::Error::other("entry table full"));
        }
        let id = Id {
            key: entry.key(),
            generation: self.next_gen,
        };
        let state = build(id, &self.registry)?;
        self.next_gen = (self.next_gen + 1) & GEN_MASK;
        self.census.entered(&state);
        log::trace!("#{}: => {}", id.key, state.name());
        entry.insert(Slot {
            generation: id.generation,
            state,
        });
        Ok(id)
    }

    /// The entry and socket a token names, if that entry is still there:
    /// events and requeued tokens for entries gone (or slots reused since)
    /// resolve to nothing.
    pub(crate) fn resolve(&self, token: Token) -> Option<(Id, usize)> {
        let id = Id {
            key: (token.0 >> SUB_BITS) & KEY_MASK,
            generation: (token.0 >> (KEY_BITS + SUB_BITS)) & GEN_MASK,
        };
        self.get(id).map(|_| (id, token.0 & SUB_MASK))
    }

    /// The entry `id` names, if it is still there.
    pub(crate) fn get(&self, id: Id) -> Option<&S> {
        self.slab
            .get(id.key)
            .filter(|slot| slot.generation == id.generation)
            .map(|slot| &slot.state)
    }

    /// The entry `id` names, if it is still there.
    pub(crate) fn get_mut(&mut self, id: Id) -> Option<&mut S> {
        self.slab
            .get_mut(id.key)
            .filter(|slot| slot.generation == id.generation)
            .map(|slot| &mut slot.state)
    }

    /// Replaces an entry's state with `f(old)`, logging `A => B`: the one
    /// place states change, so the census cannot drift, and every
    /// transition cancels the entry's timer (a phase that needs one arms
    /// its own).
    pub(crate) fn transition(&mut self, id: Id, f: impl FnOnce(S) -> S) {
        let Some(slot) = self
            .slab
            .get_mut(id.key)
            .filter(|s| s.generation == id.generation)
        else {
            return;
        };
        let old = std::mem::replace(&mut slot.state, S::placeholder());
        self.timers.cancel(id.key);
        self.census.left(&old);
        let from = old.name();
        slot.state = f(old);
        self.census.entered(&slot.state);
        log::trace!("#{}: {from} => {}", id.key, slot.state.name());
    }

    /// Takes an entry's state out, leaving the placeholder: for a state
    /// whose parts need `&mut self` elsewhere to come apart. The caller
    /// follows with a [`transition`](Self::transition) or a
    /// [`close`](Self::close).
    pub(crate) fn take(&mut self, id: Id) -> Option<S> {
        let mut taken = None;
        self.transition(id, |state| {
            taken = Some(state);
            S::placeholder()
        });
        taken
    }

    /// Schedules an entry to be reaped after the turn.
    pub(crate) fn close(&mut self, id: Id, ending: S::Ending) {
        self.closing.push((id, ending));
    }

    /// Removes one entry scheduled to close, with its timer, and hands it
    /// over to be taken apart; the caller loops until none is left (taking
    /// one apart may schedule more, e.g. an app's waiting clients).
    pub(crate) fn pop_closed(&mut self) -> Option<(Id, S, S::Ending)> {
        loop {
            let (id, ending) = self.closing.pop()?;
            // An entry may be listed twice in one turn; the second finds it gone.
            if self.get(id).is_none() {
                continue;
            }
            let slot = self.slab.remove(id.key);
            self.timers.cancel(id.key);
            self.census.left(&slot.state);
            log::trace!("#{}: {} => closed", id.key, slot.state.name());
            return Some((id, slot.state, ending));
        }
    }

    /// Asks for socket `sub` of entry `id` to be served again this turn or
    /// the next (its budget ran out with work left: the writable invariant).
    pub(crate) fn requeue(&mut self, id: Id, sub: usize) {
        let token = id.token(sub);
        if !self.requeued.contains(&token) {
            self.requeued.push(token);
        }
    }

    /// The tokens requeued so far, to serve now.
    pub(crate) fn take_requeued(&mut self) -> Vec<Token> {
        std::mem::take(&mut self.requeued)
    }

    /// Whether work is requeued (the next poll must not block).
    pub(crate) fn has_requeued(&self) -> bool {
        !self.requeued.is_empty()
    }

    /// Arms entry `id`'s one timer, replacing any it had.
    pub(crate) fn arm(&mut self, id: Id, deadline: Instant) {
        if self.get(id).is_some() {
            self.timers.add(deadline, id.key);
        }
    }

    /// Disarms entry `id`'s timer, if any.
    pub(crate) fn disarm(&mut self, id: Id) {
        if self.get(id).is_some() {
            self.timers.cancel(id.key);
        }
    }

    /// The nearest deadline of any entry.
    pub(crate) fn next_deadline(&self) -> Option<Instant> {
        self.timers.next()
    }

    /// One entry whose deadline has passed, its timer removed. Every
    /// transition and reap cancels a timer, so the entry is still in the
    /// phase that armed it.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<Id> {
        let key = self.timers.pop_due(now)?;
        let generation = self.slab.get(key)?.generation;
        Some(Id { key, generation })
    }

    /// Timers armed.
    pub(crate) fn timers(&self) -> usize {
        self.timers.len()
    }

    /// Entries by state.
    pub(crate) fn census(&self) -> &Census {
        &self.census
    }

    /// Every entry, for shutdown and consistency checks.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (Id, &S)> {
        self.slab.iter().map(|(key, slot)| {
            let id = Id {
                key,
                generation: slot.generation,
            };
            (id, &slot.state)
        })
    }

    /// Entries held.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.slab.len()
    }

    /// Where entries' sockets are registered.
    pub(crate) fn registry(&self) -> &Registry {
        &self.registry
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A two-state machine: enough to test the bookkeeping.
    #[derive(Debug, PartialEq)]
    enum Toy {
        Open(u32),
        Done,
        Gap,
    }

    impl State for Toy {
        type Ending = &'static str;
        const KINDS: usize = 2;
        fn placeholder() -> Self {
            Toy::Gap
        }
        fn name(&self) -> &'static str {
            match self {
                Toy::Open(_) => "Open",
                Toy::Done => "Done",
                Toy::Gap => "Gap",
            }
        }
        fn kind(&self) -> Option<usize> {
            match self {
                Toy::Open(_) => Some(0),
                Toy::Done => Some(1),
                Toy::Gap => None,
            }
        }
        fn sockets(&self) -> usize {
            match self {
                Toy::Open(_) => 2,
                Toy::Done | Toy::Gap => 0,
            }
        }
    }

    fn table() -> Table<Toy> {
        let poll = mio::Poll::new().expect("a poll");
        Table::new(poll.registry().try_clone().expect("a registry"))
    }

    fn open(table: &mut Table<Toy>, n: u32) -> Id {
        table.insert(|_, _| Ok(Toy::Open(n))).expect("insert")
    }

    #[test]
    fn tokens_resolve_to_their_entry_and_socket() {
        let mut table = table();
        let a = open(&mut table, 1);
        let b = open(&mut table, 2);
        for sub in 0..=SUB_MASK {
            assert_eq!(table.resolve(a.token(sub)), Some((a, sub)));
            assert_eq!(table.resolve(b.token(sub)), Some((b, sub)));
        }
        assert!(
            a.token(3).0 < crate::reactor::MAIN.0,
            "clear of fixed tokens"
        );
    }

    #[test]
    fn a_reused_slot_does_not_answer_to_its_previous_occupants_tokens() {
        let mut table = table();
        let old = open(&mut table, 1);
        table.close(old, "done");
        assert!(table.pop_closed().is_some());
        let new = open(&mut table, 2);
        assert_eq!(new.key(), old.key(), "the slot is reused");
        assert_eq!(table.resolve(old.token(1)), None);
        assert!(table.get(old).is_none());
        assert_eq!(table.get(new), Some(&Toy::Open(2)));
        table.close(old, "stale close"); // must not reach the new entry
        assert!(table.pop_closed().is_none());
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn transitions_keep_the_census_and_cancel_the_timer() {
        let mut table = table();
        let id = open(&mut table, 7);
        let t0 = Instant::now();
        table.arm(id, t0);
        assert_eq!((table.census().count(0), table.census().sockets()), (1, 2));
        table.transition(id, |state| match state {
            Toy::Open(_) => Toy::Done,
            other => other,
        });
        assert_eq!(table.census().count(0), 0);
        assert_eq!(table.census().count(1), 1);
        assert_eq!(table.census().sockets(), 0);
        assert_eq!(table.timers(), 0, "the old phase's deadline is gone");
        assert_eq!(table.pop_due(t0), None);
    }

    #[test]
    fn closes_are_deferred_and_counted_once() {
        let mut table = table();
        let id = open(&mut table, 1);
        table.arm(id, Instant::now());
        table.close(id, "first");
        table.close(id, "twice");
        assert!(table.get(id).is_some(), "still there until reaped");
        let (closed, state, ending) = table.pop_closed().expect("one close");
        assert_eq!((closed, state, ending), (id, Toy::Open(1), "twice"));
        assert!(table.pop_closed().is_none(), "the second finds it gone");
        assert_eq!((table.census().count(0), table.timers()), (0, 0));
    }

    #[test]
    fn requeued_tokens_are_kept_once_and_taken_together() {
        let mut table = table();
        let id = open(&mut table, 1);
        table.requeue(id, 0);
        table.requeue(id, 0);
        table.requeue(id, 1);
        assert!(table.has_requeued());
        assert_eq!(table.take_requeued(), vec![id.token(0), id.token(1)]);
        assert!(!table.has_requeued());
    }
}
