//! The bookkeeping of an activation arena: one device allocation (the *slab*) out of which a
//! training step's activations, gradients and scratch are carved, so that a step in steady
//! state allocates nothing (llm.c's `malloc_and_point_activations`, sized by measurement
//! instead of by formula).
//!
//! The plan is pure arithmetic; a backend owns the memory ([`crate::backend::cuda`]). A
//! window given back is free for the next request at once: requests are placed in the
//! smallest free gap that holds them (the lowest such gap on a tie), else on top of the
//! highest held window, and neighbouring free gaps merge. So the slab needs what the step
//! holds at its peak (plus what the order of requests leaves fragmented), not the sum of
//! everything the step asks for: a frozen teacher's forward that drops each block's
//! activations once the next block has them reuses the same bytes block after block. (On a
//! device, "given back" means the host dropped its handle; work already queued on the same
//! stream still reads the old contents before later work overwrites them, so stream order
//! makes the reuse safe.)
//!
//! Placement does not depend on the slab's size: a window is placed in an unbounded address
//! range, and it is in the slab when it ends within the capacity. One that does not is a
//! *miss*: the backend serves it from its ordinary pool, and the plan remembers how high the
//! placements reached. A *round* runs from the first window handed out while none is held
//! to the moment the last held one is given back. When no window is held and some finished
//! round reached above the slab, [`ArenaPlan::wanted`] names a new capacity (the highest
//! reach, rounded up to [`ARENA_GRANULE`]); the backend replaces the slab and calls
//! [`ArenaPlan::resized`], which starts a new *generation* (anything recorded against the
//! old slab, such as a CUDA graph, must be recorded again). The same requests in the same
//! order are placed at the same offsets, so the first step of the largest batch shape sizes
//! the slab once, and every later step is served from it.

/// Alignment of every window, in bytes (cuBLAS and vector loads want 16; 256 keeps each
/// window on its own cache-line group and is what `cudaMalloc` guarantees).
pub const ARENA_ALIGN: usize = 256;
/// The slab's capacity is a multiple of this many bytes (2 MiB, the device's large page).
pub const ARENA_GRANULE: usize = 2 << 20;

/// The state of an arena (see the module documentation). Sizes and offsets are in bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArenaPlan {
    /// Bytes the slab holds.
    capacity: usize,
    /// Free gaps below `top` as (offset, size), in increasing offset, none adjacent to
    /// another or to `top`.
    free: Vec<(usize, usize)>,
    /// End of the highest held window (0 when none is held).
    top: usize,
    /// The highest `top` of this round.
    reach: usize,
    /// The highest reach of a finished round.
    wanted: usize,
    /// Windows handed out and not yet given back (misses included).
    live: usize,
    /// Incremented by every [`ArenaPlan::resized`].
    generation: u64,
    /// Requests that did not fit, since the arena was created.
    misses: u64,
}

/// A window handed out by [`ArenaPlan::take`]: give it back with [`ArenaPlan::give_back`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a window must be given back"]
pub struct Window {
    /// Byte offset of the window in the arena's address range.
    at: usize,
    /// Bytes it covers (the request rounded up to [`ARENA_ALIGN`]).
    size: usize,
    /// Whether it lies within the slab (else the backend serves it elsewhere: a miss).
    in_slab: bool,
}

impl Window {
    /// The window's byte offset into the slab, or `None` for a miss.
    pub fn slab_offset(&self) -> Option<usize> {
        self.in_slab.then_some(self.at)
    }
}

/// What an [`ArenaPlan`] reports: its size and how it has served.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ArenaStats {
    /// Bytes the slab holds.
    pub capacity: usize,
    /// How high the placements of a finished round reached, in bytes: what the slab needs.
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

    /// Takes a window of `bytes` bytes: in the smallest free gap that holds it (the lowest
    /// on a tie), else on top. It counts as held until [`ArenaPlan::give_back`]; when it
    /// does not lie within the slab it is a miss, which the caller serves elsewhere.
    pub fn take(&mut self, bytes: usize) -> Window {
        let size = round_up(bytes.max(1), ARENA_ALIGN);
        self.live += 1;
        let best = (0..self.free.len())
            .filter(|&i| self.free[i].1 >= size)
            .min_by_key(|&i| (self.free[i].1, self.free[i].0));
        let at = match best {
            Some(i) => {
                let (at, gap) = self.free[i];
                if gap == size {
                    self.free.remove(i);
                } else {
                    self.free[i] = (at + size, gap - size);
                }
                at
            }
            None => {
                let at = self.top;
                self.top = self.top.saturating_add(size);
                self.reach = self.reach.max(self.top);
                at
            }
        };
        let in_slab = at.saturating_add(size) <= self.capacity;
        if !in_slab {
            self.misses += 1;
        }
        Window { at, size, in_slab }
    }

    /// Gives back a held window: its bytes are free for the next request. The last one
    /// ends the round. Panics when no window is held, or on a window that is not held (a
    /// double release is a backend bug).
    pub fn give_back(&mut self, w: Window) {
        self.live = self
            .live
            .checked_sub(1)
            .expect("arena: a window given back twice");
        let end = w.at + w.size;
        assert!(
            end <= self.top
                && !self
                    .free
                    .iter()
                    .any(|&(at, size)| w.at < at + size && at < end),
            "arena: a window given back twice"
        );
        // Where the gap goes among the free ones, and whether it joins its neighbours.
        let i = self.free.partition_point(|&(at, _)| at < w.at);
        let (mut at, mut size) = (w.at, w.size);
        if i < self.free.len() && self.free[i].0 == end {
            size += self.free.remove(i).1;
        }
        if i > 0 && self.free[i - 1].0 + self.free[i - 1].1 == at {
            let (prev_at, prev_size) = self.free.remove(i - 1);
            at = prev_at;
            size += prev_size;
        }
        if at + size == self.top {
            self.top = at;
        } else {
            let j = self.free.partition_point(|&(a, _)| a < at);
            self.free.insert(j, (at, size));
        }
        if self.live == 0 {
            debug_assert!(self.top == 0 && self.free.is_empty());
            self.wanted = self.wanted.max(self.reach);
            self.reach = 0;
        }
    }

    /// The capacity the slab should be replaced with, when no window is held and a finished
    /// round reached above it; `None` otherwise.
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

    /// A plan whose slab has been sized to `capacity` bytes (one round that reached it).
    fn sized(capacity: usize) -> ArenaPlan {
        let mut a = ArenaPlan::new();
        let w = a.take(capacity);
        a.give_back(w);
        a.resized(a.wanted().unwrap());
        a
    }

    #[test]
    fn first_round_measures_then_the_slab_serves_every_later_round() {
        let mut a = ArenaPlan::new();
        // Round 1: nothing fits an empty slab; all three are misses.
        let ws: Vec<Window> = [1000, 4, 300].into_iter().map(|b| a.take(b)).collect();
        assert!(ws.iter().all(|w| w.slab_offset().is_none()));
        assert_eq!(a.wanted(), None, "windows are still held");
        for w in ws {
            a.give_back(w);
        }
        // 1024 + 256 + 512 bytes were held at once; the slab grows to one granule.
        assert_eq!(a.stats().high_water, 1792);
        assert_eq!(a.wanted(), Some(ARENA_GRANULE));
        a.resized(ARENA_GRANULE);
        assert_eq!(a.wanted(), None);
        // Round 2: the same requests, each aligned, one after the other.
        let ws: Vec<Window> = [1000, 4, 300].into_iter().map(|b| a.take(b)).collect();
        let at: Vec<Option<usize>> = ws.iter().map(Window::slab_offset).collect();
        assert_eq!(at, [Some(0), Some(1024), Some(1280)]);
        for w in ws {
            a.give_back(w);
        }
        // Round 3 starts at the beginning of the slab again.
        let w = a.take(8);
        assert_eq!(w.slab_offset(), Some(0));
        a.give_back(w);
        let s = a.stats();
        assert_eq!((s.misses, s.generation, s.capacity), (3, 1, ARENA_GRANULE));
    }

    #[test]
    fn a_window_given_back_mid_round_is_reused_by_the_next_request_that_fits() {
        let mut a = sized(ARENA_GRANULE);
        let first = a.take(512);
        let second = a.take(256);
        let (f, s) = (first.slab_offset(), second.slab_offset());
        assert_eq!((f, s), (Some(0), Some(512)));
        a.give_back(first); // the round goes on: bytes 0..512 are free
        let big = a.take(1024);
        assert_eq!(
            big.slab_offset(),
            Some(768),
            "too large for the gap: on top"
        );
        let small = a.take(256);
        assert_eq!(
            small.slab_offset(),
            Some(0),
            "the freed gap, from its start"
        );
        let rest = a.take(256);
        assert_eq!(rest.slab_offset(), Some(256), "the rest of that gap");
        for w in [second, big, small, rest] {
            a.give_back(w);
        }
        assert_eq!(a.stats().high_water, ARENA_GRANULE);
    }

    #[test]
    fn the_smallest_gap_that_fits_is_chosen_and_neighbouring_gaps_merge() {
        let mut a = sized(ARENA_GRANULE);
        // Five windows: [0,1024) [1024,1280) [1280,1792) [1792,2048) [2048,2304).
        let w: Vec<Window> = [1024, 256, 512, 256, 256]
            .into_iter()
            .map(|b| a.take(b))
            .collect();
        let mut w = w.into_iter();
        let (w0, w1, w2, w3, w4) = (
            w.next().unwrap(),
            w.next().unwrap(),
            w.next().unwrap(),
            w.next().unwrap(),
            w.next().unwrap(),
        );
        a.give_back(w0); // gap [0,1024)
        a.give_back(w2); // gap [1280,1792)
        let x = a.take(400);
        assert_eq!(
            x.slab_offset(),
            Some(1280),
            "the 512-byte gap, not the 1024-byte one"
        );
        a.give_back(x);
        a.give_back(w1); // [0,1024) + [1024,1280) + [1280,1792) merge into [0,1792)
        let y = a.take(1792);
        assert_eq!(y.slab_offset(), Some(0), "one merged gap holds it");
        a.give_back(y);
        a.give_back(w4); // the top window: the top falls back to 2048
        a.give_back(w3); // joins [0,1792) and reaches the top: nothing is held
        let z = a.take(256);
        assert_eq!(z.slab_offset(), Some(0));
        a.give_back(z);
        assert_eq!(a.stats().high_water, ARENA_GRANULE);
    }

    #[test]
    fn a_round_reaching_above_the_slab_misses_there_and_asks_for_its_reach() {
        let mut a = sized(ARENA_GRANULE);
        let low = a.take(ARENA_GRANULE - 256);
        assert_eq!(low.slab_offset(), Some(0));
        let over = a.take(512);
        assert_eq!(over.slab_offset(), None, "beyond the slab");
        a.give_back(low);
        let again = a.take(256);
        assert_eq!(
            again.slab_offset(),
            Some(0),
            "the freed bytes are in the slab"
        );
        assert_eq!(a.wanted(), None);
        a.give_back(over);
        a.give_back(again);
        assert_eq!(a.stats().high_water, ARENA_GRANULE + 256);
        assert_eq!(a.wanted(), Some(2 * ARENA_GRANULE));
        a.resized(2 * ARENA_GRANULE);
        assert_eq!(a.generation(), 2);
        // The same requests again: all in the slab now.
        let ws = [a.take(ARENA_GRANULE - 256), a.take(512)];
        assert!(ws.iter().all(|w| w.slab_offset().is_some()));
        for w in ws {
            a.give_back(w);
        }
        assert_eq!(a.stats().misses, 2);
        // A smaller round later does not shrink it.
        let w = a.take(10);
        a.give_back(w);
        assert_eq!(a.wanted(), None);
    }

    /// A deterministic pseudo-random sequence of takes and gives back: no two held windows
    /// overlap, and a second round of the same sequence is placed identically, all in the
    /// slab the first sized.
    #[test]
    fn random_rounds_never_overlap_and_repeat_their_placements() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let ops: Vec<(bool, usize)> = (0..400)
            .map(|_| (next() % 3 != 0, 1 + (next() % 5000) as usize))
            .collect();
        let mut a = ArenaPlan::new();
        let mut placements = Vec::new();
        for round in 0..2 {
            let mut held: Vec<Window> = Vec::new();
            let mut at = Vec::new();
            for (k, &(take, bytes)) in ops.iter().enumerate() {
                if take || held.is_empty() {
                    let w = a.take(bytes);
                    for h in &held {
                        assert!(w.at + w.size <= h.at || h.at + h.size <= w.at, "overlap");
                    }
                    if round == 1 {
                        assert!(w.slab_offset().is_some(), "a miss in the second round");
                    }
                    at.push(w.at);
                    held.push(w);
                } else {
                    let w = held.remove(k % held.len());
                    a.give_back(w);
                }
            }
            for w in held {
                a.give_back(w);
            }
            placements.push(at);
            if let Some(cap) = a.wanted() {
                a.resized(cap);
            }
        }
        assert_eq!(placements[0], placements[1]);
    }

    #[test]
    #[should_panic(expected = "given back twice")]
    fn a_double_release_is_caught() {
        let mut a = ArenaPlan::new();
        let w = a.take(1);
        let copy = Window { ..w };
        a.give_back(w);
        a.give_back(copy);
    }

    #[test]
    #[should_panic(expected = "given back twice")]
    fn a_release_of_a_freed_window_while_others_are_held_is_caught() {
        let mut a = ArenaPlan::new();
        let w = a.take(256);
        let _other = a.take(256);
        let copy = Window { ..w };
        a.give_back(w);
        a.give_back(copy);
    }
}
