//! The bookkeeping of an activation arena: one device allocation (the *slab*) out of which a
//! training step's activations, gradients and scratch are carved, so that a step in steady
//! state allocates nothing (llm.c's `malloc_and_point_activations`, sized by measurement
//! instead of by formula).
//!
//! The plan is pure arithmetic; a backend owns the memory ([`crate::backend::cuda`]). A
//! window given back is free for the next request at once, so the slab needs what the step
//! holds at its peak (plus what placement leaves fragmented), not the sum of everything the
//! step asks for: a frozen teacher's forward that drops each block's activations once the
//! next block has them reuses the same bytes block after block. (On a device, "given back"
//! means the host dropped its handle; work already queued on the same stream still reads
//! the old contents before later work overwrites them, so stream order makes the reuse
//! safe.)
//!
//! A *round* runs from the first window handed out while none is held to the moment the
//! last held one is given back: one training step. Placement has two modes.
//! - **Online**, for a sequence of requests not seen before: a request goes to the smallest
//!   free gap that holds it (the lowest such gap on a tie), else on top of the highest held
//!   window. Online placement cannot know how long a window will be held, and fragments:
//!   the §8 student step in bf16 reaches 242 MiB for a peak of 213 MiB held.
//! - **Planned**: at the end of a round the plan keeps the round's sequence of takes and
//!   gives back (up to [`MAX_PLANS`] sequences, one per batch shape) with a placement for
//!   it, made knowing every window's lifetime: windows by decreasing size, each in the
//!   smallest gap left by the already placed windows whose lifetimes overlap its own
//!   (lowest on a tie), else above them ("greedy by size"). That placement is kept when it
//!   reaches lower than the online one did (the §8 student step in bf16: 213.8 MiB), the
//!   online one otherwise. A later round that makes the same requests in the same order
//!   follows the kept placement request by request; from the first request where it
//!   departs from every kept sequence it is placed online.
//!
//! So the same requests in the same order are placed at the same offsets from their
//! second round on. Placement does not depend on the slab's size: a window is placed in an
//! unbounded address range, and it is in the slab when it ends within the capacity. One
//! that does not is a *miss*: the backend serves it from its ordinary pool. When no window
//! is held and a finished round needs more than the slab (its kept placement's reach, or
//! its own when none is kept), [`ArenaPlan::wanted`] names a new capacity (rounded up to
//! [`ARENA_GRANULE`]); the backend replaces the slab and calls [`ArenaPlan::resized`], which
//! starts a new *generation* (anything recorded against the old slab, such as a CUDA graph,
//! must be recorded again). The first step of the largest batch shape sizes the slab once,
//! and every later step is served from it.

use std::cmp::Reverse;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

/// Alignment of every window, in bytes (cuBLAS and vector loads want 16; 256 keeps each
/// window on its own cache-line group and is what `cudaMalloc` guarantees).
pub const ARENA_ALIGN: usize = 256;
/// The slab's capacity is a multiple of this many bytes (2 MiB, the device's large page).
pub const ARENA_GRANULE: usize = 2 << 20;
/// Most request sequences whose placement the plan keeps (a round of a sequence beyond
/// them is placed online): enough for one per batch shape of a bucketed run.
pub const MAX_PLANS: usize = 64;
/// Most events (takes and gives back) a round records: a longer round (a window held
/// across steps keeps one round going) is placed online and not kept.
pub const MAX_ROUND_EVENTS: usize = 1 << 13;

/// One request of a round, as a kept sequence records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// A window of this many bytes (aligned) taken.
    Take(usize),
    /// The round's take of this index given back.
    GiveBack(usize),
}

/// A kept sequence of requests and where its windows go.
#[derive(Debug, Clone, PartialEq, Eq)]
struct RoundPlan {
    /// The round's events in order.
    events: Vec<Event>,
    /// The offset of each take, in take order.
    offsets: Vec<usize>,
    /// The end of the highest window.
    reach: usize,
}

/// The state of an arena (see the module documentation). Sizes and offsets are in bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ArenaPlan {
    /// Bytes the slab holds.
    capacity: usize,
    /// Windows handed out and not yet given back (misses included): offset → (size, the
    /// index of its take in the round).
    held: BTreeMap<usize, (usize, usize)>,
    /// Takes so far this round.
    takes: usize,
    /// The end of this round's highest window.
    reach: usize,
    /// What the finished rounds need: the highest reach of their kept placements, or of
    /// their own where none is kept.
    wanted: usize,
    /// This round's events, while it is recorded (see [`MAX_ROUND_EVENTS`]).
    round: Vec<Event>,
    /// This round's take offsets, while it is recorded.
    placed: Vec<usize>,
    /// Whether this round outgrew [`MAX_ROUND_EVENTS`] (it is then neither recorded nor
    /// kept).
    overflow: bool,
    /// The kept sequence this round has followed so far, `None` once it departed from all.
    follow: Option<usize>,
    /// The kept sequences.
    plans: Vec<RoundPlan>,
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
    /// The index of its take in its round.
    id: usize,
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
    /// What the slab needs, in bytes: how high the finished rounds' kept placements reach
    /// (or their own placements, where none is kept).
    pub high_water: usize,
    /// Requests served outside the slab, since the arena was created (0 in steady state).
    pub misses: u64,
    /// How many times the slab was replaced by a larger one.
    pub generation: u64,
    /// Request sequences whose placement is kept (at most [`MAX_PLANS`]): a round that
    /// follows a kept sequence to its end adds none.
    pub kept: usize,
}

/// A backend's arena state, shared by the backend and the windows it hands out: what holds
/// the [`ArenaPlan`] the windows are given back to.
pub trait HoldsPlan {
    /// The plan.
    fn plan_mut(&mut self) -> &mut ArenaPlan;
}

/// Locks an arena's state, recovering from a panic elsewhere (the plan is updated in one
/// step).
pub fn lock<S>(state: &Mutex<S>) -> MutexGuard<'_, S> {
    state.lock().unwrap_or_else(|p| p.into_inner())
}

/// A held window of the arena whose state is `S`: gives it back to the plan when dropped
/// (the last one ends the round).
#[derive(Debug)]
pub struct Lease<S: HoldsPlan> {
    state: Arc<Mutex<S>>,
    /// Always `Some` until dropped.
    window: Option<Window>,
}

impl<S: HoldsPlan> Lease<S> {
    /// `window`, taken from the plan of `state`, held until the lease drops.
    pub fn new(state: Arc<Mutex<S>>, window: Window) -> Lease<S> {
        Lease {
            state,
            window: Some(window),
        }
    }
}

impl<S: HoldsPlan> Drop for Lease<S> {
    fn drop(&mut self) {
        if let Some(w) = self.window.take() {
            lock(&self.state).plan_mut().give_back(w);
        }
    }
}

/// `x` rounded up to a multiple of `m`.
fn round_up(x: usize, m: usize) -> usize {
    x.div_ceil(m).saturating_mul(m)
}

/// The lowest offset of the smallest gap of at least `size` bytes below the end of
/// `busy` (byte ranges `[start, end)` in increasing order of start, possibly overlapping),
/// else that end: best fit, lowest on a tie.
fn best_fit(busy: impl IntoIterator<Item = (usize, usize)>, size: usize) -> usize {
    let (mut best, mut end): (Option<(usize, usize)>, usize) = (None, 0);
    for (start, stop) in busy {
        if start >= end {
            let gap = start - end;
            if gap >= size && best.is_none_or(|(g, _)| gap < g) {
                best = Some((gap, end));
            }
        }
        end = end.max(stop);
    }
    best.map_or(end, |(_, at)| at)
}

/// A placement of one round's `events` knowing each window's lifetime ("greedy by size",
/// see the module documentation), its first takes at the offsets `fixed`: the offset of
/// each take, and the reach.
fn pack(events: &[Event], fixed: &[usize]) -> (Vec<usize>, usize) {
    // (size, first event, event that gives it back) per take.
    let mut life: Vec<(usize, usize, usize)> = Vec::new();
    for (t, ev) in events.iter().enumerate() {
        match *ev {
            Event::Take(size) => life.push((size, t, events.len())),
            Event::GiveBack(id) => life[id].2 = t,
        }
    }
    let mut offsets = vec![0; life.len()];
    offsets[..fixed.len()].copy_from_slice(fixed);
    let mut reach = (0..fixed.len())
        .map(|i| fixed[i] + life[i].0)
        .max()
        .unwrap_or(0);
    let mut order: Vec<usize> = (fixed.len()..life.len()).collect();
    order.sort_by_key(|&i| (Reverse(life[i].0), life[i].1));
    let mut done: Vec<usize> = (0..fixed.len()).collect();
    let mut busy: Vec<(usize, usize)> = Vec::with_capacity(life.len());
    for i in order {
        let (size, from, to) = life[i];
        busy.clear();
        busy.extend(
            done.iter()
                .filter(|&&j| life[j].1 < to && from < life[j].2)
                .map(|&j| (offsets[j], offsets[j] + life[j].0)),
        );
        busy.sort_unstable();
        let at = best_fit(busy.iter().copied(), size);
        offsets[i] = at;
        reach = reach.max(at + size);
        done.push(i);
    }
    (offsets, reach)
}

impl ArenaPlan {
    /// An arena with an empty slab: the first round only measures.
    pub fn new() -> ArenaPlan {
        ArenaPlan::default()
    }

    /// Takes a window of `bytes` bytes, where the kept placement being followed puts it,
    /// else online (see the module documentation). It counts as held until
    /// [`ArenaPlan::give_back`]; when it does not lie within the slab it is a miss, which
    /// the caller serves elsewhere.
    pub fn take(&mut self, bytes: usize) -> Window {
        let size = round_up(bytes.max(1), ARENA_ALIGN);
        if self.held.is_empty() {
            self.start_round();
        }
        let id = self.takes;
        self.takes += 1;
        self.note(Event::Take(size));
        let planned = self
            .follow
            .and_then(|k| self.plans[k].offsets.get(id).copied())
            .filter(|&at| self.is_free(at, size));
        let at = planned.unwrap_or_else(|| {
            self.follow = None;
            let busy = self.held.iter().map(|(&at, &(s, _))| (at, at + s));
            best_fit(busy, size)
        });
        self.held.insert(at, (size, id));
        if !self.overflow {
            self.placed.push(at);
        }
        self.reach = self.reach.max(at + size);
        let in_slab = at.saturating_add(size) <= self.capacity;
        if !in_slab {
            self.misses += 1;
        }
        Window {
            at,
            size,
            in_slab,
            id,
        }
    }

    /// Gives back a held window: its bytes are free for the next request. The last one
    /// ends the round. Panics on a window that is not held (a double release is a backend
    /// bug).
    pub fn give_back(&mut self, w: Window) {
        match self.held.get(&w.at) {
            Some(&held) if held == (w.size, w.id) => self.held.remove(&w.at),
            _ => panic!("arena: a window given back twice"),
        };
        self.note(Event::GiveBack(w.id));
        if self.held.is_empty() {
            self.end_round();
        }
    }

    /// Whether `[at, at + size)` overlaps no held window.
    fn is_free(&self, at: usize, size: usize) -> bool {
        let below = self.held.range(..at + size).next_back();
        below.is_none_or(|(&a, &(s, _))| a + s <= at)
    }

    /// Starts a round at its first take.
    fn start_round(&mut self) {
        self.round.clear();
        self.placed.clear();
        (self.takes, self.reach, self.overflow, self.follow) = (0, 0, false, None);
    }

    /// Records `event` and keeps following a kept sequence that begins with the round's
    /// events so far and placed its takes where this round did (another one, on a
    /// departure), or none.
    fn note(&mut self, event: Event) {
        if self.overflow {
            return;
        }
        if self.round.len() == MAX_ROUND_EVENTS {
            (self.overflow, self.follow) = (true, None);
            return;
        }
        let p = self.round.len();
        self.round.push(event);
        if let Some(k) = self.follow {
            if self.plans[k].events.get(p) == Some(&event) {
                return;
            }
        }
        // A departure (or the round's start): once no kept sequence matches, none will.
        self.follow = match (p, self.follow) {
            (0, _) | (_, Some(_)) => self.plans.iter().position(|plan| {
                plan.events.starts_with(&self.round) && plan.offsets.starts_with(&self.placed)
            }),
            _ => None,
        };
    }

    /// Ends a round: keeps a placement for its sequence unless it followed a kept one to
    /// the end, and notes what the slab needs. A new placement keeps the offsets of the
    /// takes the round shares with the kept sequence it has the longest common beginning
    /// with, so that every kept sequence beginning with the same requests places them
    /// alike, and a round can go on from one to the other where they part.
    fn end_round(&mut self) {
        let followed = self
            .follow
            .is_some_and(|k| self.plans[k].events.len() == self.round.len());
        let mut need = self.reach;
        if !followed && !self.overflow && self.plans.len() < MAX_PLANS {
            let common = |plan: &RoundPlan| {
                let n = plan.events.iter().zip(&self.round);
                n.take_while(|(a, b)| a == b).count()
            };
            let fixed: &[usize] = match self.plans.iter().max_by_key(|&p| common(p)) {
                Some(plan) => {
                    let shared = &plan.events[..common(plan)];
                    let takes = shared.iter().filter(|e| matches!(e, Event::Take(_)));
                    &plan.offsets[..takes.count()]
                }
                None => &[],
            };
            let (offsets, reach) = pack(&self.round, fixed);
            let placed_agrees = self.placed.starts_with(fixed);
            let (offsets, reach) = match reach < self.reach || !placed_agrees {
                true => (offsets, reach),
                false => (self.placed.clone(), self.reach),
            };
            need = reach;
            self.plans.push(RoundPlan {
                events: self.round.clone(),
                offsets,
                reach,
            });
        }
        self.wanted = self.wanted.max(need);
    }

    /// The capacity the slab should be replaced with, when no window is held and a finished
    /// round needs more than it; `None` otherwise.
    pub fn wanted(&self) -> Option<usize> {
        (self.held.is_empty() && self.wanted > self.capacity)
            .then(|| round_up(self.wanted, ARENA_GRANULE))
    }

    /// Records that the slab now holds `capacity` bytes (a new generation). Panics while a
    /// window is held: the old slab may still be in use.
    pub fn resized(&mut self, capacity: usize) {
        assert!(
            self.held.is_empty(),
            "arena: resized while a window is held"
        );
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
            kept: self.plans.len(),
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

    /// The requests of a round, from a deterministic pseudo-random `seed`: takes (of 1 to
    /// 5 000 bytes) and gives back of a held window.
    fn random_ops(seed: u64, len: usize) -> Vec<(bool, usize)> {
        let mut state = seed;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        (0..len)
            .map(|_| (next() % 3 != 0, 1 + (next() % 5000) as usize))
            .collect()
    }

    /// Runs one round of `ops` (a give back picks a held window by the op's index; a first
    /// window held throughout keeps it one round), checks that no two held windows overlap,
    /// resizes the slab as a backend would, and returns the take offsets and the misses.
    fn run_round(a: &mut ArenaPlan, ops: &[(bool, usize)]) -> (Vec<usize>, usize) {
        let anchor = a.take(100);
        let (mut held, mut at, mut misses) = (vec![anchor], Vec::new(), 0);
        for (k, &(take, bytes)) in ops.iter().enumerate() {
            if take || held.len() == 1 {
                let w = a.take(bytes);
                for h in &held {
                    assert!(w.at + w.size <= h.at || h.at + h.size <= w.at, "overlap");
                }
                misses += usize::from(w.slab_offset().is_none());
                at.push(w.at);
                held.push(w);
            } else {
                let w = held.remove(1 + k % (held.len() - 1));
                a.give_back(w);
            }
        }
        for w in held {
            a.give_back(w);
        }
        if let Some(cap) = a.wanted() {
            a.resized(cap);
        }
        (at, misses)
    }

    /// A random round placed online, then the same requests again: the second round
    /// follows the kept placement, which reaches no higher, all in the slab the first
    /// sized, and every later round is placed the same.
    #[test]
    fn random_rounds_never_overlap_and_repeat_their_placements() {
        let ops = random_ops(0x2545_f491_4f6c_dd1d, 400);
        let mut a = ArenaPlan::new();
        let (first, _) = run_round(&mut a, &ops);
        let online = a.reach;
        let (second, misses) = run_round(&mut a, &ops);
        assert_eq!(misses, 0, "a miss in the second round");
        assert!(a.reach <= online, "the kept placement reaches higher");
        assert_eq!(a.stats().high_water, a.reach);
        let (third, misses) = run_round(&mut a, &ops);
        assert_eq!((misses, &third), (0, &second));
        assert_eq!(first.len(), second.len());
    }

    /// Windows held for different spans: online placement leaves a gap too small for a
    /// later window, the kept placement (largest first, knowing every lifetime) does not.
    #[test]
    fn a_kept_placement_knows_lifetimes_and_reaches_lower_than_online() {
        let round = |a: &mut ArenaPlan| {
            let short = a.take(512);
            let long = a.take(256);
            let short_at = short.at;
            a.give_back(short);
            let large = a.take(1024);
            let at = [short_at, long.at, large.at];
            a.give_back(long);
            a.give_back(large);
            at
        };
        let mut a = ArenaPlan::new();
        // Online: [0,512) then [512,768); the freed 512 bytes cannot hold 1024.
        assert_eq!(round(&mut a), [0, 512, 768]);
        assert_eq!(a.reach, 1792);
        // Kept: the 1024-byte window at 0 (its lifetime misses the first one's), the
        // first window at 0 too, the long-held 256 bytes above both.
        assert_eq!(a.stats().high_water, 1280);
        a.resized(a.wanted().unwrap());
        assert_eq!(round(&mut a), [0, 1024, 0]);
        assert_eq!(a.stats().misses, 3, "only the first round's windows missed");
    }

    /// Two request sequences (two batch shapes) alternating: each is kept and followed by
    /// its own rounds; a round that departs from both midway is placed online from there,
    /// without overlap.
    #[test]
    fn each_sequence_follows_its_own_placement_and_a_departure_goes_online() {
        let (x, y) = (random_ops(7, 300), random_ops(11, 300));
        let mut a = ArenaPlan::new();
        let (x1, _) = run_round(&mut a, &x);
        let (y1, _) = run_round(&mut a, &y);
        let (x2, mx) = run_round(&mut a, &x);
        let (y2, my) = run_round(&mut a, &y);
        assert_eq!((a.plans.len(), mx, my), (2, 0, 0));
        assert_eq!(run_round(&mut a, &x).0, x2);
        assert_eq!(run_round(&mut a, &y).0, y2);
        assert_eq!((x1.len(), y1.len()), (x2.len(), y2.len()));
        // The first half of x, then y's second half.
        let mixed: Vec<(bool, usize)> = x[..150].iter().chain(&y[150..]).copied().collect();
        let (m, _) = run_round(&mut a, &mixed);
        let takes = x[..150].iter().filter(|op| op.0).count();
        assert_eq!(
            m[..takes.min(20)],
            x2[..takes.min(20)],
            "followed x while it matched"
        );
        assert_eq!(a.plans.len(), 3, "the new sequence is kept");
    }

    /// A round longer than [`MAX_ROUND_EVENTS`] is placed online, not kept, and sizes the
    /// slab by its own reach.
    #[test]
    fn a_round_too_long_to_record_is_placed_online() {
        let mut a = ArenaPlan::new();
        let anchor = a.take(256);
        for _ in 0..MAX_ROUND_EVENTS {
            let w = a.take(512);
            a.give_back(w);
        }
        a.give_back(anchor);
        assert!(a.plans.is_empty());
        assert_eq!(a.stats().high_water, 768);
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
