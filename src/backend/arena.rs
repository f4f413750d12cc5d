//! The bookkeeping of an activation arena: one device allocation (the *slab*) out of which a
//! training step's activations, gradients and scratch are carved by a bump pointer, so that
//! a step in steady state allocates nothing (llm.c's `malloc_and_point_activations`, sized by
//! measurement instead of by formula).
//!
//! The plan is pure arithmetic; a backend owns the memory ([`crate::backend::cuda`]). It works
//! in *rounds*: a round begins with the first window handed out while none is held, and ends
//! when the last held window is given back, which rewinds the bump pointer to the start of
//! the slab. Between two rounds nothing of the slab is in use, so the next round may reuse
//! all of it. (On a device, "given back" means the host dropped its handle; work already
//! queued on the same stream still reads the old contents before later work overwrites
//! them, so stream order makes the reuse safe.)
//!
//! A request that does not fit is a *miss*: the backend serves it from its ordinary pool and
//! the plan remembers the round's whole demand. When no window is held and some finished
//! round asked for more than the slab holds, [`ArenaPlan::wanted`] names a new capacity (the
//! largest demand seen, rounded up to [`ARENA_GRANULE`]); the backend replaces the slab and
//! calls [`ArenaPlan::resized`], which starts a new *generation* (anything recorded against
//! the old slab, such as a CUDA graph, must be recorded again). So the first step of the
//! largest batch shape sizes the slab once, and every later step is served from it.

/// Alignment of every window, in bytes (cuBLAS and vector loads want 16; 256 keeps each
/// window on its own cache-line group and is what `cudaMalloc` guarantees).
pub const ARENA_ALIGN: usize = 256;
/// The slab's capacity is a multiple of this many bytes (2 MiB, the device's large page).
pub const ARENA_GRANULE: usize = 2 << 20;

/// The state of an arena (see the module documentation). Sizes are in bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArenaPlan {
    /// Bytes the slab holds.
    capacity: usize,
    /// Bump pointer: bytes of the slab handed out in this round.
    top: usize,
    /// Bytes asked for in this round, in the slab or not.
    demand: usize,
    /// The largest demand of a finished round.
    wanted: usize,
    /// Windows handed out and not yet given back (misses included).
    live: usize,
    /// Incremented by every [`ArenaPlan::resized`].
    generation: u64,
    /// Requests that did not fit, since the arena was created.
    misses: u64,
}

/// What an [`ArenaPlan`] reports: its size and how it has served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArenaStats {
    /// Bytes the slab holds.
    pub capacity: usize,
    /// The largest demand of a finished round, in bytes.
    pub high_water: usize,
    /// Requests served outside the slab, since the arena was created (0 in steady state).
    pub misses: u64,
    /// How many times the slab was replaced by a larger one.
    pub generation: u64,
}

/// `x` rounded up to a multiple of `m`.
fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m).saturating_mul(m)
}

impl ArenaPlan {
    /// An arena with an empty slab: the first round only measures.
    pub fn new() -> ArenaPlan {
        ArenaPlan::default()
    }

    /// Takes a window of `bytes` bytes: `Some(byte offset)` into the slab, or `None` for a
    /// miss (the caller serves it elsewhere). Either way the window counts as held until
    /// [`ArenaPlan::give_back`].
    pub fn take(&mut self, bytes: usize) -> Option<usize> {
        let size = round_up(bytes.max(1), ARENA_ALIGN);
        self.live += 1;
        self.demand = self.demand.saturating_add(size);
        if size <= self.capacity - self.top {
            let at = self.top;
            self.top += size;
            Some(at)
        } else {
            self.misses += 1;
            None
        }
    }

    /// Gives back one held window; the last one ends the round (rewinds the bump pointer).
    /// Panics when none is held (a double release is a backend bug).
    pub fn give_back(&mut self) {
        self.live = self
            .live
            .checked_sub(1)
            .expect("arena: a window given back twice");
        if self.live == 0 {
            self.wanted = self.wanted.max(self.demand);
            self.demand = 0;
            self.top = 0;
        }
    }

    /// The capacity the slab should be replaced with, when no window is held and a finished
    /// round asked for more than it holds; `None` otherwise.
    pub fn wanted(&self) -> Option<usize> {
        (self.live == 0 && self.wanted > self.capacity)
            .then(|| round_up(self.wanted, ARENA_GRANULE))
    }

    /// Records that the slab now holds `capacity` bytes (a new generation). Panics while a
    /// window is held: the old slab may still be in use.
    pub fn resized(&mut self, capacity: usize) {
        assert_eq!(self.live, 0, "arena: resized while a window is held");
        self.capacity = capacity;
        self.generation += 1;
    }

    /// Which slab windows come from: changes with every [`ArenaPlan::resized`].
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Size and service so far.
    pub fn stats(&self) -> ArenaStats {
        ArenaStats {
            capacity: self.capacity,
            high_water: self.wanted,
            misses: self.misses,
            generation: self.generation,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_round_measures_then_the_slab_serves_every_later_round() {
        let mut a = ArenaPlan::new();
        // Round 1: nothing fits an empty slab; all three are misses.
        for bytes in [1000, 4, 300] {
            assert_eq!(a.take(bytes), None);
        }
        assert_eq!(a.wanted(), None, "windows are still held");
        for _ in 0..3 {
            a.give_back();
        }
        // 1024 + 256 + 512 bytes were asked for; the slab grows to one granule.
        assert_eq!(a.stats().high_water, 1792);
        assert_eq!(a.wanted(), Some(ARENA_GRANULE));
        a.resized(ARENA_GRANULE);
        assert_eq!(a.wanted(), None);
        // Round 2: the same requests, each aligned, one after the other.
        assert_eq!(a.take(1000), Some(0));
        assert_eq!(a.take(4), Some(1024));
        assert_eq!(a.take(300), Some(1280));
        for _ in 0..3 {
            a.give_back();
        }
        // Round 3 starts at the beginning of the slab again.
        assert_eq!(a.take(8), Some(0));
        a.give_back();
        let s = a.stats();
        assert_eq!((s.misses, s.generation, s.capacity), (3, 1, ARENA_GRANULE));
    }

    #[test]
    fn a_window_given_back_mid_round_is_not_reused_within_the_round() {
        let mut a = ArenaPlan::new();
        a.take(ARENA_GRANULE);
        a.give_back();
        a.resized(a.wanted().unwrap());
        let first = a.take(256).unwrap();
        let second = a.take(256).unwrap();
        a.give_back(); // one of the two: the round goes on
        let third = a.take(256).unwrap();
        assert!(first != third && second != third && first != second);
    }

    #[test]
    fn a_round_larger_than_the_slab_misses_and_asks_for_its_whole_demand() {
        let mut a = ArenaPlan::new();
        a.take(100);
        a.give_back();
        a.resized(a.wanted().unwrap());
        assert_eq!(a.take(ARENA_GRANULE - 256), Some(0));
        assert_eq!(a.take(512), None, "beyond the slab");
        assert_eq!(
            a.take(256),
            Some(ARENA_GRANULE - 256),
            "the tail still fits"
        );
        assert_eq!(a.wanted(), None);
        for _ in 0..3 {
            a.give_back();
        }
        assert_eq!(a.stats().high_water, ARENA_GRANULE + 512);
        assert_eq!(a.wanted(), Some(2 * ARENA_GRANULE));
        a.resized(2 * ARENA_GRANULE);
        assert_eq!(a.generation(), 2);
        // A smaller round later does not shrink it.
        a.take(10);
        a.give_back();
        assert_eq!(a.wanted(), None);
    }

    #[test]
    #[should_panic(expected = "given back twice")]
    fn a_double_release_is_caught() {
        let mut a = ArenaPlan::new();
        a.take(1);
        a.give_back();
        a.give_back();
    }
}
