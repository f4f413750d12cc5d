//! Population stability: how far a new population of applicants has moved from a reference
//! population (the training cohort), per input and in the scores (`mgkd-train monitor`,
//! docs/deploy.md "Monitoring").
//!
//! Both indices are the same sum over bands,
//!
//! ```text
//! index = Σ_b (n_b − r_b) · ln(n_b / r_b)
//! ```
//!
//! with `r_b` and `n_b` the reference's and the new population's shares of band `b`, each
//! floored at [`SHARE_FLOOR`] so that an empty band gives a large but finite term. The
//! population stability index (PSI) is the index of the scores, the characteristic
//! stability index (CSI) that of one input. Bands:
//!
//! - **scores and numeric inputs**: ten bands cut at the reference's deciles (the values at
//!   sorted positions ⌊k·n/10⌋, k = 1…9; band b holds the values in `(c_{b−1}, c_b]`, the
//!   first band everything up to `c_1`, the last everything above `c_9`); equal cut points
//!   are merged, so an input with few distinct values has fewer bands;
//! - **categorical inputs**: one band per id holding at least [`MIN_CATEGORY_SHARE`] of the
//!   reference, and one band `other` for all the rest (ids rarer than that, and ids never
//!   seen in the reference).
//!
//! Flags follow the usual reading: below [`WATCH`] stable, from [`WATCH`] to [`ACT`] watch
//! (a moderate shift: find out why), [`ACT`] and above act (a major shift: the model's
//! scores may no longer mean what they meant on the reference).

use serde::Serialize;

use crate::{Error, Result};

/// Index at and above which a population is flagged *watch*.
pub const WATCH: f64 = 0.10;
/// Index at and above which a population is flagged *act*.
pub const ACT: f64 = 0.25;
/// Floor of a band's share in the index (an empty band counts as this share).
pub const SHARE_FLOOR: f64 = 1e-4;
/// Share of the reference a categorical id needs for a band of its own.
pub const MIN_CATEGORY_SHARE: f64 = 0.01;
/// Bands of a numeric input or of the scores (deciles).
pub const BANDS: usize = 10;

/// How far an index says a population moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Flag {
    /// Index below [`WATCH`].
    Stable,
    /// Index in [`WATCH`, [`ACT`]).
    Watch,
    /// Index at or above [`ACT`].
    Act,
}

impl Flag {
    /// The flag of index `x`.
    pub fn of(x: f64) -> Flag {
        if x >= ACT {
            Flag::Act
        } else if x >= WATCH {
            Flag::Watch
        } else {
            Flag::Stable
        }
    }

    /// `stable`, `watch` or `act`.
    pub fn name(self) -> &'static str {
        match self {
            Flag::Stable => "stable",
            Flag::Watch => "watch",
            Flag::Act => "act",
        }
    }
}

/// One band of a stability table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Band {
    /// What the band holds: `(lo, hi]` for numbers, an id or `other` for categories.
    pub label: String,
    /// Lower bound (exclusive) of a numeric band; `None` for the first band or a category.
    pub lo: Option<f64>,
    /// Upper bound (inclusive) of a numeric band; `None` for the last band or a category.
    pub hi: Option<f64>,
    /// Reference rows in the band.
    pub reference: u64,
    /// New rows in the band.
    pub new: u64,
    /// Reference share.
    pub reference_share: f64,
    /// New share.
    pub new_share: f64,
    /// The band's term `(n − r)·ln(n/r)` of the index (floored shares).
    pub contribution: f64,
}

/// The stability of one quantity between the reference and the new population.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stability {
    /// The quantity: a field name, `pre_service_length`, or `score`.
    pub name: String,
    /// `numeric` or `categorical`.
    pub kind: &'static str,
    /// The index, Σ of the bands' contributions.
    pub index: f64,
    /// Its flag.
    pub flag: Flag,
    /// The bands.
    pub bands: Vec<Band>,
}

/// The index of two count vectors over the same bands: `Σ (n − r)·ln(n/r)` with floored
/// shares, and each band's term. An error when either population is empty.
pub fn index(reference: &[u64], new: &[u64]) -> Result<(f64, Vec<f64>)> {
    let (rt, nt) = (
        reference.iter().sum::<u64>() as f64,
        new.iter().sum::<u64>() as f64,
    );
    if rt == 0.0 || nt == 0.0 {
        return Err(Error::invalid(
            "a stability index needs rows in both the reference and the new population",
        ));
    }
    let terms: Vec<f64> = reference
        .iter()
        .zip(new)
        .map(|(&r, &n)| {
            let (r, n) = (
                (r as f64 / rt).max(SHARE_FLOOR),
                (n as f64 / nt).max(SHARE_FLOOR),
            );
            (n - r) * (n / r).ln()
        })
        .collect();
    Ok((terms.iter().sum(), terms))
}

/// The decile cut points of `reference` (finite values), merged where equal: at most
/// `BANDS − 1` increasing values.
pub fn decile_cuts(reference: &[f64]) -> Vec<f64> {
    let mut v: Vec<f64> = reference.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let mut cuts: Vec<f64> = Vec::new();
    if n == 0 {
        return cuts;
    }
    for k in 1..BANDS {
        let c = v[(k * n / BANDS).min(n - 1)];
        if cuts.last().is_none_or(|&l| c > l) {
            cuts.push(c);
        }
    }
    // A cut at the maximum would leave the last band empty by construction.
    if cuts.last() == v.last() {
        cuts.pop();
    }
    cuts
}

/// The band of `x` among `cuts`: the number of cut points below `x`.
pub fn band_of(cuts: &[f64], x: f64) -> usize {
    cuts.partition_point(|&c| c < x)
}

/// Counts per band of `values` for `cuts` (`cuts.len() + 1` bands).
pub fn band_counts(cuts: &[f64], values: &[f64]) -> Vec<u64> {
    let mut c = vec![0u64; cuts.len() + 1];
    for &x in values {
        c[band_of(cuts, x)] += 1;
    }
    c
}

fn shares(counts: &[u64]) -> Vec<f64> {
    let t = counts.iter().sum::<u64>().max(1) as f64;
    counts.iter().map(|&c| c as f64 / t).collect()
}

/// The numeric bounds of the bands of `cuts`: `(lo, hi)` per band.
pub fn band_bounds(cuts: &[f64]) -> Vec<(Option<f64>, Option<f64>)> {
    (0..=cuts.len())
        .map(|b| (b.checked_sub(1).map(|i| cuts[i]), cuts.get(b).copied()))
        .collect()
}

fn bound_label(lo: Option<f64>, hi: Option<f64>) -> String {
    let f = |x: f64| format!("{x:.4}");
    match (lo, hi) {
        (None, None) => "all".into(),
        (None, Some(h)) => format!("≤ {}", f(h)),
        (Some(l), None) => format!("> {}", f(l)),
        (Some(l), Some(h)) => format!("({}, {}]", f(l), f(h)),
    }
}

/// The stability of a numeric quantity, banded at the reference's deciles.
pub fn numeric(name: &str, reference: &[f64], new: &[f64]) -> Result<Stability> {
    let cuts = decile_cuts(reference);
    let (rc, nc) = (band_counts(&cuts, reference), band_counts(&cuts, new));
    let (idx, terms) = index(&rc, &nc).map_err(|e| Error::invalid(format!("{name}: {e}")))?;
    let (rs, ns) = (shares(&rc), shares(&nc));
    let bands = band_bounds(&cuts)
        .into_iter()
        .enumerate()
        .map(|(b, (lo, hi))| Band {
            label: bound_label(lo, hi),
            lo,
            hi,
            reference: rc[b],
            new: nc[b],
            reference_share: rs[b],
            new_share: ns[b],
            contribution: terms[b],
        })
        .collect();
    Ok(Stability {
        name: name.to_string(),
        kind: "numeric",
        index: idx,
        flag: Flag::of(idx),
        bands,
    })
}

/// The stability of a categorical field with ids below `vocab`; `names(id)` labels an id.
pub fn categorical(
    name: &str,
    vocab: u32,
    reference: &[u32],
    new: &[u32],
    names: &dyn Fn(u32) -> String,
) -> Result<Stability> {
    let count = |ids: &[u32]| {
        let mut c = vec![0u64; vocab as usize];
        for &i in ids {
            if let Some(x) = c.get_mut(i as usize) {
                *x += 1;
            }
        }
        c
    };
    let (rall, nall) = (count(reference), count(new));
    let rt = reference.len().max(1) as f64;
    let own: Vec<usize> = (0..vocab as usize)
        .filter(|&i| rall[i] as f64 / rt >= MIN_CATEGORY_SHARE)
        .collect();
    let mut rc: Vec<u64> = own.iter().map(|&i| rall[i]).collect();
    let mut nc: Vec<u64> = own.iter().map(|&i| nall[i]).collect();
    let mut labels: Vec<String> = own.iter().map(|&i| names(i as u32)).collect();
    let other = |c: &[u64], total: usize| total as u64 - own.iter().map(|&i| c[i]).sum::<u64>();
    let (ro, no) = (other(&rall, reference.len()), other(&nall, new.len()));
    if ro > 0 || no > 0 {
        rc.push(ro);
        nc.push(no);
        labels.push("other".into());
    }
    let (idx, terms) = index(&rc, &nc).map_err(|e| Error::invalid(format!("{name}: {e}")))?;
    let (rs, ns) = (shares(&rc), shares(&nc));
    let bands = labels
        .into_iter()
        .enumerate()
        .map(|(b, label)| Band {
            label,
            lo: None,
            hi: None,
            reference: rc[b],
            new: nc[b],
            reference_share: rs[b],
            new_share: ns[b],
            contribution: terms[b],
        })
        .collect();
    Ok(Stability {
        name: name.to_string(),
        kind: "categorical",
        index: idx,
        flag: Flag::of(idx),
        bands,
    })
}

/// One band of the score-band table.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScoreBand {
    /// Band number, 1 (lowest scores, least risky) to 10.
    pub band: usize,
    /// Lower bound (exclusive) of the band's probability of default.
    pub lo: Option<f64>,
    /// Upper bound (inclusive).
    pub hi: Option<f64>,
    /// Share of the reference in the band.
    pub reference_share: f64,
    /// Share of the new population in the band.
    pub new_share: f64,
    /// Approval rate of the reference with the cut-off at this band's upper bound (every
    /// applicant scored at or below it approved): the cumulative share up to this band.
    pub reference_approval: f64,
    /// The same for the new population.
    pub new_approval: f64,
    /// Defaulters' share among the reference rows of the band (labels needed; `None` when
    /// unlabelled or empty).
    pub reference_bad_rate: Option<f64>,
    /// The same among the new rows (labels needed).
    pub new_bad_rate: Option<f64>,
    /// The band's term of the PSI.
    pub contribution: f64,
}

/// The score-band table of `scores` banded at the reference's deciles, with bad rates from
/// `labels` where given (one per score).
pub fn score_bands(
    stability: &Stability,
    reference: (&[f64], Option<&[u8]>),
    new: (&[f64], Option<&[u8]>),
) -> Vec<ScoreBand> {
    let cuts: Vec<f64> = stability.bands.iter().filter_map(|b| b.hi).collect();
    let bad = |scores: &[f64], labels: Option<&[u8]>| -> Vec<Option<f64>> {
        let Some(labels) = labels else {
            return vec![None; cuts.len() + 1];
        };
        let mut n = vec![0u64; cuts.len() + 1];
        let mut b = vec![0u64; cuts.len() + 1];
        for (&s, &y) in scores.iter().zip(labels) {
            let k = band_of(&cuts, s);
            n[k] += 1;
            b[k] += u64::from(y);
        }
        n.iter()
            .zip(&b)
            .map(|(&n, &b)| (n > 0).then(|| b as f64 / n as f64))
            .collect()
    };
    let (rb, nb) = (bad(reference.0, reference.1), bad(new.0, new.1));
    let (mut ra, mut na) = (0.0, 0.0);
    stability
        .bands
        .iter()
        .enumerate()
        .map(|(k, b)| {
            ra += b.reference_share;
            na += b.new_share;
            ScoreBand {
                band: k + 1,
                lo: b.lo,
                hi: b.hi,
                reference_share: b.reference_share,
                new_share: b.new_share,
                reference_approval: ra,
                new_approval: na,
                reference_bad_rate: rb[k],
                new_bad_rate: nb[k],
                contribution: b.contribution,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identical_populations_have_index_zero() {
        let v: Vec<f64> = (0..1000).map(|i| (i as f64 * 0.37).sin()).collect();
        let s = numeric("x", &v, &v).unwrap();
        assert_eq!(s.index, 0.0);
        assert_eq!(s.bands.len(), 10);
        assert_eq!(s.flag, Flag::Stable);
        for b in &s.bands {
            assert!((b.reference_share - 0.1).abs() < 0.002, "{b:?}");
        }
    }

    #[test]
    fn index_matches_a_hand_computation() {
        // Shares 0.5/0.5 against 0.8/0.2: 0.3·ln(1.6) + (−0.3)·ln(0.4).
        let (idx, terms) = index(&[50, 50], &[80, 20]).unwrap();
        let want = 0.3 * (1.6f64).ln() - 0.3 * (0.4f64).ln();
        assert!((idx - want).abs() < 1e-12, "{idx} vs {want}");
        assert_eq!(terms.len(), 2);
        assert!(index(&[0, 0], &[1, 1]).is_err());
        // An empty band is floored, not infinite.
        let (idx, _) = index(&[100, 0], &[50, 50]).unwrap();
        assert!(idx.is_finite() && idx > 1.0);
    }

    #[test]
    fn a_shifted_normal_sample_is_flagged() {
        // Quantiles of N(0,1) against N(0.5,1): PSI ≈ 0.25 (the textbook value for half a
        // standard deviation), N(0.2,1) ≈ 0.04.
        let q = |p: f64| {
            // Inverse normal CDF by bisection on erf.
            let (mut lo, mut hi) = (-9.0f64, 9.0f64);
            for _ in 0..100 {
                let m = 0.5 * (lo + hi);
                if 0.5 * (1.0 + libm::erf(m / std::f64::consts::SQRT_2)) < p {
                    lo = m;
                } else {
                    hi = m;
                }
            }
            0.5 * (lo + hi)
        };
        let n = 20000;
        let base: Vec<f64> = (0..n).map(|i| q((i as f64 + 0.5) / n as f64)).collect();
        let shifted = |d: f64| base.iter().map(|x| x + d).collect::<Vec<_>>();
        let big = numeric("x", &base, &shifted(0.5)).unwrap();
        let small = numeric("x", &base, &shifted(0.2)).unwrap();
        assert!((0.2..0.3).contains(&big.index), "{}", big.index);
        assert!(small.index < WATCH, "{}", small.index);
        assert_eq!(Flag::of(0.1), Flag::Watch);
        assert_eq!(Flag::of(0.25), Flag::Act);
        assert_eq!(Flag::of(0.0999), Flag::Stable);
    }

    #[test]
    fn ties_merge_bands_and_categories_pool_rare_ids() {
        let v: Vec<f64> = (0..100).map(|i| f64::from(i % 3)).collect();
        let s = numeric("len", &v, &v).unwrap();
        assert_eq!(s.bands.len(), 3, "{:?}", s.bands);
        // ids 1 and 2 frequent, 3 rare (0.5 %), 4 only in the new population.
        let mut r = vec![1u32; 100];
        r.extend(vec![2u32; 99]);
        r.push(3);
        let mut n = r.clone();
        n.extend([4, 4]);
        let c = categorical("f", 5, &r, &n, &|i| i.to_string()).unwrap();
        let labels: Vec<&str> = c.bands.iter().map(|b| b.label.as_str()).collect();
        assert_eq!(labels, ["1", "2", "other"]);
        assert_eq!(c.bands[2].new, 3);
    }
}
