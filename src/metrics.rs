//! Evaluation metrics of risk scores against 0/1 default labels (docs/model.md §6.6).
//!
//! Everything here is exact where the mathematics allows and deterministic always: the
//! ranking metrics (AUC, KS, PR-AUC, the ROC/KS curves, the approval and decile tables) come
//! from one `O(n log n)` sort into a total order — score descending, ties by input position
//! ascending — followed by integer counting, so they do not depend on thread counts or on the
//! sort algorithm. All results are `f64`.
//!
//! Conventions:
//! - Labels are `u8`, `1` = default (the positive class), `0` = good; any other value is an
//!   error.
//! - A higher score means a higher risk. Scores must be finite; `-0.0` and `0.0` are the same
//!   score (tied).
//! - The ranking metrics need both classes present; they return an [`Error`] (never a NaN,
//!   never a panic) otherwise, or when the lengths differ, or when the input is empty.
//!
//! Agreement with scikit-learn (checked against `tests/fixtures/metrics_sklearn.json`):
//! [`auc`] = `roc_auc_score`, [`log_loss`] = `log_loss` (as of scikit-learn 1.9: probabilities
//! clipped to `[ε, 1−ε]` with `ε` = `f64::EPSILON`, the float64 machine epsilon; versions
//! before 1.5 clipped with `eps=1e-15` instead), [`pr_auc`] = `average_precision_score`,
//! [`roc_curve`] = `roc_curve(..., drop_intermediate=False)`.

use serde::Serialize;

use crate::{Error, Result};

/// The approval rates of the standard report, in percent: approve the safest 10 %, 20 %, …,
/// 90 % of the population.
pub const APPROVAL_RATES_PCT: [u32; 9] = [10, 20, 30, 40, 50, 60, 70, 80, 90];

/// Number of bins of the lift table ([`decile_lift`]).
pub const DECILES: usize = 10;

/// One group of tied scores in the descending order.
#[derive(Debug, Clone, Copy)]
struct Group {
    /// The common score (with `-0.0` normalised to `0.0`).
    score: f64,
    /// First position of the group in [`Ranking::order`].
    start: usize,
    /// One past the last position of the group in [`Ranking::order`].
    end: usize,
    /// Positives (label 1) in the group.
    pos: u64,
}

impl Group {
    /// Negatives (label 0) in the group.
    fn neg(&self) -> u64 {
        self.len() - self.pos
    }

    /// Rows in the group.
    fn len(&self) -> u64 {
        (self.end - self.start) as u64
    }
}

/// Scores sorted once: the order (descending score, ties by ascending input index), the tied
/// groups, and the class totals. Every ranking metric is a function of this.
#[derive(Debug)]
struct Ranking<'a> {
    /// Labels in input order (validated to be 0 or 1).
    labels: &'a [u8],
    /// Input indices in the descending order.
    order: Vec<usize>,
    /// Tied groups, highest score first.
    groups: Vec<Group>,
    /// Number of positives.
    pos: u64,
    /// Number of negatives.
    neg: u64,
}

/// Checks the lengths and the labels (0 or 1) shared by every metric; returns the positives.
fn check_labels(what: &str, values: &str, n_values: usize, labels: &[u8]) -> Result<u64> {
    if n_values != labels.len() {
        return Err(Error::invalid(format!(
            "{what}: length mismatch: {n_values} {values} but {} labels",
            labels.len()
        )));
    }
    if labels.is_empty() {
        return Err(Error::invalid(format!("{what}: no rows (empty input)")));
    }
    let mut pos = 0u64;
    for (i, &y) in labels.iter().enumerate() {
        match y {
            0 => {}
            1 => pos += 1,
            other => {
                return Err(Error::invalid(format!(
                    "{what}: labels[{i}] = {other}, expected 0 or 1"
                )))
            }
        }
    }
    Ok(pos)
}

impl<'a> Ranking<'a> {
    /// Validates the input (`what` names the metric in error messages) and sorts it.
    fn new(what: &str, scores: &[f64], labels: &'a [u8]) -> Result<Self> {
        let pos = check_labels(what, "scores", scores.len(), labels)?;
        let n = labels.len() as u64;
        let neg = n - pos;
        if pos == 0 || neg == 0 {
            let missing = if pos == 0 {
                "positive (1)"
            } else {
                "negative (0)"
            };
            return Err(Error::invalid(format!(
                "{what}: undefined: no {missing} labels among {n} rows; both classes are needed"
            )));
        }
        let mut keyed = Vec::with_capacity(scores.len());
        for (i, &s) in scores.iter().enumerate() {
            if !s.is_finite() {
                return Err(Error::invalid(format!(
                    "{what}: scores[{i}] = {s} is not finite"
                )));
            }
            // `-0.0 + 0.0 == +0.0`: the two zeros must tie, and `total_cmp` would split them.
            keyed.push((s + 0.0, i));
        }
        keyed.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut groups = Vec::new();
        let mut start = 0;
        while start < keyed.len() {
            let score = keyed[start].0;
            let mut end = start;
            let mut gpos = 0u64;
            while end < keyed.len() && keyed[end].0 == score {
                gpos += u64::from(labels[keyed[end].1]);
                end += 1;
            }
            groups.push(Group {
                score,
                start,
                end,
                pos: gpos,
            });
            start = end;
        }
        let order = keyed.into_iter().map(|(_, i)| i).collect();
        Ok(Ranking {
            labels,
            order,
            groups,
            pos,
            neg,
        })
    }

    /// Number of rows.
    fn n(&self) -> usize {
        self.order.len()
    }

    /// Exact AUC: `U / (P·N)` with `2U = Σ_groups pos_g · (2·neg_below_g + neg_g)` counted in
    /// integers (a positive beats every negative scored below it and half-beats every
    /// negative tied with it), then one rounding division.
    fn auc(&self) -> f64 {
        let mut neg_below = u128::from(self.neg);
        let mut twice_u = 0u128;
        for g in &self.groups {
            neg_below -= u128::from(g.neg());
            twice_u += u128::from(g.pos) * (2 * neg_below + u128::from(g.neg()));
        }
        let pairs = 2 * u128::from(self.pos) * u128::from(self.neg);
        twice_u as f64 / pairs as f64
    }

    /// KS and the threshold where it is first reached (scanning thresholds from the highest):
    /// `max_t |tp(t)·N − fp(t)·P| / (P·N)`, the maximum taken over integers.
    fn ks(&self) -> (f64, f64) {
        let (p, n) = (i128::from(self.pos), i128::from(self.neg));
        let (mut tp, mut fp) = (0i128, 0i128);
        let mut best = 0i128;
        let mut at = f64::INFINITY;
        for g in &self.groups {
            tp += i128::from(g.pos);
            fp += i128::from(g.neg());
            let d = (tp * n - fp * p).abs();
            if d > best {
                best = d;
                at = g.score;
            }
        }
        (best as f64 / (p * n) as f64, at)
    }

    /// Average precision: `Σ_g (pos_g / P) · precision_g`, precision taken at each tied
    /// group's threshold (scikit-learn's step-wise, uninterpolated definition).
    fn average_precision(&self) -> f64 {
        let (mut tp, mut seen) = (0u64, 0u64);
        let mut sum = NeumaierSum::default();
        for g in &self.groups {
            tp += g.pos;
            seen += g.len();
            if g.pos > 0 {
                sum.add(g.pos as f64 * (tp as f64 / seen as f64));
            }
        }
        sum.value() / self.pos as f64
    }

    /// ROC curve points: `(0, 0)` at threshold `+∞`, then one point per distinct score.
    fn roc_curve(&self) -> RocCurve {
        let len = self.groups.len() + 1;
        let mut curve = RocCurve {
            fpr: Vec::with_capacity(len),
            tpr: Vec::with_capacity(len),
            thresholds: Vec::with_capacity(len),
        };
        curve.fpr.push(0.0);
        curve.tpr.push(0.0);
        curve.thresholds.push(f64::INFINITY);
        let (mut tp, mut fp) = (0u64, 0u64);
        for g in &self.groups {
            tp += g.pos;
            fp += g.neg();
            curve.fpr.push(fp as f64 / self.neg as f64);
            curve.tpr.push(tp as f64 / self.pos as f64);
            curve.thresholds.push(g.score);
        }
        curve
    }

    /// The KS plot: per threshold, the flagged share of the population and both rates.
    fn ks_curve(&self) -> KsCurve {
        let roc = self.roc_curve();
        let n = self.n() as f64;
        let mut flagged = Vec::with_capacity(roc.thresholds.len());
        flagged.push(0.0);
        flagged.extend(self.groups.iter().map(|g| g.end as f64 / n));
        let (ks, ks_threshold) = self.ks();
        KsCurve {
            thresholds: roc.thresholds,
            flagged_share: flagged,
            tpr: roc.tpr,
            fpr: roc.fpr,
            ks,
            ks_threshold,
        }
    }

    /// Bad rate among the approved lowest-scored `k = ⌊pct·n/100⌉` rows, per rate.
    fn approval(&self, rates_pct: &[u32]) -> Result<Vec<ApprovalPoint>> {
        let n = self.n();
        let mut out = Vec::with_capacity(rates_pct.len());
        for (j, &pct) in rates_pct.iter().enumerate() {
            if pct == 0 || pct > 100 {
                return Err(Error::invalid(format!(
                    "approval_bad_rates: rates_pct[{j}] = {pct}, expected 1..=100"
                )));
            }
            // Nearest integer to pct·n/100, halves rounded up; exact integer arithmetic.
            let k = ((u128::from(pct) * n as u128 + 50) / 100) as usize;
            let mut left = k;
            let mut bad = 0u64;
            let mut cut_score = None;
            // Ascending order: groups from the lowest score; inside a tied group, input order.
            for g in self.groups.iter().rev() {
                if left == 0 {
                    break;
                }
                cut_score = Some(g.score);
                let len = g.end - g.start;
                if left >= len {
                    bad += g.pos;
                    left -= len;
                } else {
                    bad += self.order[g.start..g.start + left]
                        .iter()
                        .map(|&i| u64::from(self.labels[i]))
                        .sum::<u64>();
                    left = 0;
                }
            }
            out.push(ApprovalPoint {
                rate: f64::from(pct) / 100.0,
                approved: k,
                bad,
                bad_rate: (k > 0).then(|| bad as f64 / k as f64),
                cut_score,
            });
        }
        Ok(out)
    }

    /// The lift table: [`DECILES`] equal-count bins of the descending order.
    fn deciles(&self) -> Vec<DecileRow> {
        let n = self.n();
        let overall = self.pos as f64 / n as f64;
        let mut cum_pos = 0u64;
        (0..DECILES)
            .map(|b| {
                let lo = b * n / DECILES;
                let hi = (b + 1) * n / DECILES;
                let rows = &self.order[lo..hi];
                let positives: u64 = rows.iter().map(|&i| u64::from(self.labels[i])).sum();
                cum_pos += positives;
                let count = hi - lo;
                let bad_rate = (count > 0).then(|| positives as f64 / count as f64);
                DecileRow {
                    decile: b + 1,
                    count,
                    positives,
                    bad_rate,
                    cum_capture: cum_pos as f64 / self.pos as f64,
                    lift: bad_rate.map(|r| r / overall),
                    max_score: (count > 0).then(|| self.score_at(lo)).flatten(),
                    min_score: (count > 0).then(|| self.score_at(hi - 1)).flatten(),
                }
            })
            .collect()
    }

    /// DeLong's placement values, in input order: for a positive, the share of negatives
    /// scored below it (ties half), `(neg_below + neg_tied/2)/N`; for a negative, the share of
    /// positives scored above it, `(pos_above + pos_tied/2)/P`. The mean of the positives'
    /// values, and that of the negatives', are both the AUC.
    fn placements(&self) -> Vec<f64> {
        let (p, n) = (self.pos as f64, self.neg as f64);
        let mut v = vec![0.0; self.n()];
        let (mut pos_above, mut neg_below) = (0u64, self.neg);
        for g in &self.groups {
            neg_below -= g.neg();
            let for_pos = (neg_below as f64 + 0.5 * g.neg() as f64) / n;
            let for_neg = (pos_above as f64 + 0.5 * g.pos as f64) / p;
            for &i in &self.order[g.start..g.end] {
                v[i] = if self.labels[i] == 1 {
                    for_pos
                } else {
                    for_neg
                };
            }
            pos_above += g.pos;
        }
        v
    }

    /// The (normalised) score at position `pos` of the descending order, if any.
    fn score_at(&self, pos: usize) -> Option<f64> {
        let g = self.groups.partition_point(|g| g.end <= pos);
        self.groups.get(g).map(|g| g.score)
    }
}

/// Compensated (Neumaier) summation: deterministic, and accurate to about one rounding of the
/// final value whatever the number of terms.
#[derive(Debug, Default, Clone, Copy)]
struct NeumaierSum {
    sum: f64,
    comp: f64,
}

impl NeumaierSum {
    /// Adds one term.
    fn add(&mut self, x: f64) {
        let t = self.sum + x;
        if self.sum.abs() >= x.abs() {
            self.comp += (self.sum - t) + x;
        } else {
            self.comp += (x - t) + self.sum;
        }
        self.sum = t;
    }

    /// The compensated total.
    fn value(&self) -> f64 {
        self.sum + self.comp
    }
}

/// ROC curve, as scikit-learn's `roc_curve(y, s, drop_intermediate=False)`: the first point
/// is `(0, 0)` at threshold `+∞` (serialised as `null` by JSON), then one point per distinct
/// score, highest first; a row is flagged at threshold `t` when its score is `≥ t`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RocCurve {
    /// False-positive rate `fp(t) / N` at each threshold.
    pub fpr: Vec<f64>,
    /// True-positive rate `tp(t) / P` at each threshold.
    pub tpr: Vec<f64>,
    /// Thresholds, decreasing; the first is `+∞`.
    pub thresholds: Vec<f64>,
}

/// The KS plot: at each threshold of [`RocCurve`], the share of the population flagged
/// (score `≥` threshold) and the two cumulative rates whose largest gap is the KS statistic.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KsCurve {
    /// Thresholds, decreasing; the first is `+∞` (nothing flagged).
    pub thresholds: Vec<f64>,
    /// Share of all rows with score `≥` the threshold.
    pub flagged_share: Vec<f64>,
    /// True-positive rate (cumulative share of the defaulters).
    pub tpr: Vec<f64>,
    /// False-positive rate (cumulative share of the goods).
    pub fpr: Vec<f64>,
    /// `max |tpr − fpr|`.
    pub ks: f64,
    /// The highest threshold at which the maximum is reached (`+∞` when KS is 0).
    pub ks_threshold: f64,
}

/// One row of the approval table ([`approval_bad_rates`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApprovalPoint {
    /// The approval rate, as a fraction (`pct / 100`).
    pub rate: f64,
    /// Rows approved: `⌊rate·n⌉`, the nearest integer with halves rounded up.
    pub approved: usize,
    /// Defaulters (label 1) among the approved.
    pub bad: u64,
    /// `bad / approved`; `None` when no row is approved (tiny `n`).
    pub bad_rate: Option<f64>,
    /// The highest approved score (the cut-off); `None` when no row is approved.
    pub cut_score: Option<f64>,
}

/// One bin of the lift table ([`decile_lift`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DecileRow {
    /// 1-based bin number; bin 1 holds the highest scores (highest risk).
    pub decile: usize,
    /// Rows in the bin.
    pub count: usize,
    /// Defaulters in the bin.
    pub positives: u64,
    /// `positives / count`; `None` for an empty bin (fewer than 10 rows in all).
    pub bad_rate: Option<f64>,
    /// Share of all defaulters in this bin and the bins above it.
    pub cum_capture: f64,
    /// `bad_rate / overall bad rate`; `None` for an empty bin.
    pub lift: Option<f64>,
    /// Highest score in the bin.
    pub max_score: Option<f64>,
    /// Lowest score in the bin.
    pub min_score: Option<f64>,
}

/// All evaluation metrics of one split ([`evaluate`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// Rows.
    pub n: usize,
    /// Defaulters (label 1).
    pub positives: u64,
    /// Overall default rate `positives / n`.
    pub bad_rate: f64,
    /// ROC AUC ([`auc`]).
    pub auc: f64,
    /// KS statistic ([`ks`]).
    pub ks: f64,
    /// The highest score threshold at which KS is reached (`+∞`, serialised as `null`, when
    /// KS is 0).
    pub ks_threshold: f64,
    /// Mean log-loss of the probabilities ([`log_loss`]).
    pub log_loss: f64,
    /// Average precision ([`pr_auc`]).
    pub pr_auc: f64,
    /// Bad rate among the approved at [`APPROVAL_RATES_PCT`] ([`approval_bad_rates`]).
    pub approval: Vec<ApprovalPoint>,
    /// The lift table ([`decile_lift`]).
    pub deciles: Vec<DecileRow>,
}

/// Exact ROC AUC, the Mann–Whitney statistic with ties counted half:
/// `AUC = (#{(i,j): y_i=1, y_j=0, s_i>s_j} + ½·#{…, s_i=s_j}) / (P·N)`.
///
/// Computed from one sort and integer counts, then a single division, so it is exactly
/// invariant under any strictly increasing transform of the scores. Errors when the lengths
/// differ, the input is empty, a label is not 0/1, a score is not finite, or a class is absent.
pub fn auc(scores: &[f64], labels: &[u8]) -> Result<f64> {
    Ok(Ranking::new("auc", scores, labels)?.auc())
}

/// Kolmogorov–Smirnov statistic `max_t |TPR(t) − FPR(t)|` over all thresholds `t`, rows with
/// score `≥ t` flagged (tied scores move together). Exact: the maximum is taken over the
/// integers `|tp·N − fp·P|`, then divided once by `P·N`. Errors as [`auc`].
pub fn ks(scores: &[f64], labels: &[u8]) -> Result<f64> {
    Ok(Ranking::new("ks", scores, labels)?.ks().0)
}

/// Average precision, as scikit-learn's `average_precision_score`: the step-wise sum
/// `Σ_k (R_k − R_{k−1}) · P_k` over the distinct score thresholds, highest first, with
/// `P_k`, `R_k` the precision and recall when all rows scored `≥` the k-th threshold are
/// flagged (tied scores enter together; no interpolation). Errors as [`auc`].
pub fn pr_auc(scores: &[f64], labels: &[u8]) -> Result<f64> {
    Ok(Ranking::new("pr_auc", scores, labels)?.average_precision())
}

/// Two scorings `a` and `b` of the same rows compared by AUC ([`paired_auc`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct PairedAuc {
    /// AUC of `a`.
    pub auc_a: f64,
    /// AUC of `b`.
    pub auc_b: f64,
    /// `auc_a − auc_b`.
    pub diff: f64,
    /// DeLong's standard error of the difference.
    pub se: f64,
    /// `diff / se`: 0 when both are 0, ±∞ when only `se` is (JSON writes ∞ as `null`).
    pub z: f64,
    /// Two-sided p-value of `z` under the normal approximation, `erfc(|z|/√2)`.
    pub p: f64,
    /// 95 % interval of the difference, `diff ± 1.959964·se`.
    pub ci95: [f64; 2],
}

/// The difference of the AUCs of two scorings of the same rows and its standard error by
/// DeLong, DeLong & Clarke-Pearson (1988): with the placement values `V_a(i)` of each
/// positive (the share of negatives it outranks, ties half) and of each negative (the share
/// of positives that outrank it), and `d(i) = V_a(i) − V_b(i)`,
/// `Var(AUC_a − AUC_b) = s²(d over the P positives)/P + s²(d over the N negatives)/N`
/// (sample variances, `n − 1`). Pairing makes it much smaller than either AUC's own error
/// when the two scorings agree on most rows. Needs at least two rows of each class; errors
/// as [`auc`] otherwise, or when the lengths differ.
pub fn paired_auc(a: &[f64], b: &[f64], labels: &[u8]) -> Result<PairedAuc> {
    let ra = Ranking::new("paired_auc (a)", a, labels)?;
    let rb = Ranking::new("paired_auc (b)", b, labels)?;
    if ra.pos < 2 || ra.neg < 2 {
        return Err(Error::invalid(format!(
            "paired_auc: {} positives and {} negatives; the variance needs at least 2 of each",
            ra.pos, ra.neg
        )));
    }
    let (va, vb) = (ra.placements(), rb.placements());
    let variance = |class: u8, count: u64| {
        let d = || {
            labels
                .iter()
                .zip(va.iter().zip(&vb))
                .filter(move |(&y, _)| y == class)
                .map(|(_, (x, y))| x - y)
        };
        let mut mean = NeumaierSum::default();
        d().for_each(|x| mean.add(x));
        let mean = mean.value() / count as f64;
        let mut ss = NeumaierSum::default();
        d().for_each(|x| ss.add((x - mean) * (x - mean)));
        ss.value() / (count - 1) as f64
    };
    let (auc_a, auc_b) = (ra.auc(), rb.auc());
    let diff = auc_a - auc_b;
    let se = (variance(1, ra.pos) / ra.pos as f64 + variance(0, ra.neg) / ra.neg as f64).sqrt();
    let z = if diff == 0.0 { 0.0 } else { diff / se };
    let p = libm::erfc(z.abs() / std::f64::consts::SQRT_2);
    const Z975: f64 = 1.959_963_984_540_054;
    Ok(PairedAuc {
        auc_a,
        auc_b,
        diff,
        se,
        z,
        p,
        ci95: [diff - Z975 * se, diff + Z975 * se],
    })
}

/// ROC curve points, as scikit-learn's `roc_curve(..., drop_intermediate=False)`; see
/// [`RocCurve`]. Errors as [`auc`].
pub fn roc_curve(scores: &[f64], labels: &[u8]) -> Result<RocCurve> {
    Ok(Ranking::new("roc_curve", scores, labels)?.roc_curve())
}

/// KS curve points (see [`KsCurve`]). Errors as [`auc`].
pub fn ks_curve(scores: &[f64], labels: &[u8]) -> Result<KsCurve> {
    Ok(Ranking::new("ks_curve", scores, labels)?.ks_curve())
}

/// Bad rate among the approved: for each rate `pct` (percent, `1..=100`), approve the
/// `k = ⌊pct·n/100⌉` lowest-scored rows (nearest integer, halves rounded up, in exact integer
/// arithmetic) and report the share of defaulters among them. Ties at the cut are broken by
/// input order: rows are taken by ascending score, and among equal scores the earlier row
/// first. Errors as [`auc`], and for a rate outside `1..=100`.
pub fn approval_bad_rates(
    scores: &[f64],
    labels: &[u8],
    rates_pct: &[u32],
) -> Result<Vec<ApprovalPoint>> {
    Ranking::new("approval_bad_rates", scores, labels)?.approval(rates_pct)
}

/// The decile lift table: rows ranked by descending score (ties by input order, earlier row
/// first) and cut into [`DECILES`] bins, bin `b` (0-based) holding ranks
/// `⌊b·n/10⌋ .. ⌊(b+1)·n/10⌋`; per bin the count, defaulters, bad rate, cumulative capture of
/// defaulters and lift = bin bad rate / overall bad rate. Errors as [`auc`].
pub fn decile_lift(scores: &[f64], labels: &[u8]) -> Result<Vec<DecileRow>> {
    Ok(Ranking::new("decile_lift", scores, labels)?.deciles())
}

/// Checks `probs` as probabilities: finite and in `[0, 1]`.
fn check_probs(what: &str, probs: &[f64]) -> Result<()> {
    match probs
        .iter()
        .enumerate()
        .find(|(_, p)| !(0.0..=1.0).contains(*p))
    {
        Some((i, p)) => Err(Error::invalid(format!(
            "{what}: probs[{i}] = {p} is not a probability in [0, 1]"
        ))),
        None => Ok(()),
    }
}

/// Mean log-loss `−(1/n) Σ [y ln p + (1−y) ln(1−p)]`, as scikit-learn's `log_loss` (1.9): `p`
/// and `1−p` are each clipped to `[ε, 1−ε]` with `ε = f64::EPSILON ≈ 2.22e-16` (the float64
/// machine epsilon; scikit-learn before 1.5 used `1e-15`), so a confident mistake costs at
/// most `−ln ε ≈ 36.04`. Summed with compensation, so the result is accurate and
/// deterministic. Errors when the lengths differ, the input is empty, a label is not 0/1 or a
/// probability is outside `[0, 1]` (or NaN). A single class is allowed.
pub fn log_loss(probs: &[f64], labels: &[u8]) -> Result<f64> {
    check_labels("log_loss", "probs", probs.len(), labels)?;
    check_probs("log_loss", probs)?;
    let eps = f64::EPSILON;
    let mut sum = NeumaierSum::default();
    for (&p, &y) in probs.iter().zip(labels) {
        let q = if y == 1 { p } else { 1.0 - p };
        sum.add(-q.clamp(eps, 1.0 - eps).ln());
    }
    Ok(sum.value() / probs.len() as f64)
}

/// `softplus(x) = ln(1 + eˣ)`, evaluated without overflow or cancellation.
fn softplus(x: f64) -> f64 {
    x.max(0.0) + (-x.abs()).exp().ln_1p()
}

/// Mean log-loss computed exactly from logits `z` (with `p = σ(z)`), no clipping:
/// `−[y ln σ(z) + (1−y) ln(1−σ(z))] = softplus(z) − y·z`, evaluated as `softplus(−z)` for
/// `y = 1` and `softplus(z)` for `y = 0`. Finite for every finite logit (a logit of 50 on a
/// good row costs ≈ 50, where the clipped [`log_loss`] would cap it at ≈ 36.04). Errors when
/// the lengths differ, the input is empty, a label is not 0/1 or a logit is not finite.
pub fn log_loss_from_logits(logits: &[f64], labels: &[u8]) -> Result<f64> {
    check_labels("log_loss_from_logits", "logits", logits.len(), labels)?;
    if let Some((i, z)) = logits.iter().enumerate().find(|(_, z)| !z.is_finite()) {
        return Err(Error::invalid(format!(
            "log_loss_from_logits: logits[{i}] = {z} is not finite"
        )));
    }
    let mut sum = NeumaierSum::default();
    for (&z, &y) in logits.iter().zip(labels) {
        sum.add(softplus(if y == 1 { -z } else { z }));
    }
    Ok(sum.value() / logits.len() as f64)
}

/// Every metric of docs/model.md §6.6 for predicted default probabilities `scores_prob`
/// (in `[0, 1]`): AUC, KS (with its threshold), log-loss, PR-AUC, the approval table at
/// [`APPROVAL_RATES_PCT`] and the decile lift table, from a single sort. Errors as [`auc`] and
/// [`log_loss`].
pub fn evaluate(scores_prob: &[f64], labels: &[u8]) -> Result<Report> {
    check_probs("evaluate", scores_prob)?;
    let ranking = Ranking::new("evaluate", scores_prob, labels)?;
    let (ks, ks_threshold) = ranking.ks();
    Ok(Report {
        n: ranking.n(),
        positives: ranking.pos,
        bad_rate: ranking.pos as f64 / ranking.n() as f64,
        auc: ranking.auc(),
        ks,
        ks_threshold,
        log_loss: log_loss(scores_prob, labels)?,
        pr_auc: ranking.average_precision(),
        approval: ranking.approval(&APPROVAL_RATES_PCT)?,
        deciles: ranking.deciles(),
    })
}
