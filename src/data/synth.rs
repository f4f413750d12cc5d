//! Synthetic credit-default cohort generator (`mgkd-train synth`), in the reference schema of
//! docs/model.md §8.
//!
//! The data are built so that the distillation question is real: the label is driven by a
//! latent risk that the application-time data (profile, pre-service events) reveal only
//! weakly, while the in-service behaviour reveals it strongly, and part of the in-service
//! behaviour is already visible, at the level of single behaviours, before the service.
//!
//! # Model
//!
//! Per user `i` (all draws from a ChaCha8 generator keyed by the seed, stream `i`, so a user
//! is the same whatever the thread count, the chunking or the number of users):
//!
//! - latents: risk `r ~ N(0,1)`; behaviour style `s = ρ·r + √(1−ρ²)·ε_s`, `ρ = 0.5`; activity
//!   `a ~ N(0,1)`, independent of `r` (a *shifted* cohort draws `r ~ N(risk_shift, 1)` and
//!   `a ~ N(activity_shift, 1)` and keeps everything else, the label bias and the stored
//!   normalisation included: drifted applicants encoded like the training cohort);
//! - label `y ~ Bernoulli(σ(A·r + b))`, `A = 2.5`, and `b` solved by bisection so that
//!   `E_r[σ(A·r + b)]` (trapezoid rule on `[−12, 12]`, step 1/256) equals the requested
//!   default rate;
//! - in-service distress `D = r + κ·y`, `κ = 0.5` (delinquency precedes the default flag);
//! - profile numbers `z_j = α_j·r + β_j·q(r) + γ_j·s + δ_j·a + √(1 − V_j)·ε_j` with
//!   `q(r) = (r² − 1)/√2` (non-linear: uncorrelated with `r`, `s` and `a`) and
//!   `V_j = α_j² + β_j² + γ_j² + 2ρ·α_j·γ_j + δ_j²`, so every `z_j` has mean 0 and variance 1
//!   exactly; the raw value is `μ_j + σ_j·z_j` and `z_j` is what is stored;
//! - profile categories: a driver `x ∈ {r, q(r), s, a, none}` with loading `λ`, a bucket
//!   `k = ⌊99·σ(1.7·(λ·x + √(1−λ²)·ε))⌋` (for `none`, `k = ⌊99·u²⌋`, skewed), id
//!   `1 + (m_f·k + 7f) mod 99` (`m_f` coprime with 99: a fixed permutation per field `f`, so
//!   the ids carry no order); id 0 (missing) with probability 2 %, plus 1 % when the driver is `r` and `r > 1`;
//! - pre-service length: empty with probability `σ(−1.75 − 0.4·a)` (≈ 15 %), otherwise
//!   `min(Lp, ⌈exp(1.7 + 0.5·a + 0.8·ε)⌉)`; in-service length
//!   `min(L, ⌊exp(2.9 + 0.5·a + 0.25·D + 0.7·ε)⌋)`: log-normal, heavy-tailed, clipped at the
//!   limits;
//! - event type: softmax over 14 groups with logits `c₀ + c_D·D + c_s·s` (in-service) or
//!   `c₀ + c_r·r + c_s·s` (pre-service), tables [`IN_TYPE_LOGITS`] and [`PRE_TYPE_LOGITS`]:
//!   late and missed payments, cash withdrawals, limit requests, fees and declines rise with
//!   `D` in-service, far more weakly with `r` before; group 13 is a background of ids
//!   `14 + ⌊50·v²⌋` (14..63, skewed);
//! - merchant category (purchases and declines only, 0 otherwise): gambling-like ids
//!   990..999 with probability `σ(−4.6 + D + 0.6·s)` in-service, `σ(−5.2 + 0.2·r + 0.7·s)`
//!   before; style ids 600..623 with `σ(−2.2 + s)` in both; otherwise a log-uniform
//!   (Zipf-like) background `⌊1023^u⌋`;
//! - channel (`c ~ U[0,1)`): card purchases and declines POS 1, cash withdrawals ATM 4;
//!   payments branch 5 when `c > 0.9`; online purchases, payments, transfers, logins and
//!   balance inquiries mobile 3 when `c < σ(0.2 + 0.8·s)`, web 2 otherwise; other types
//!   `1 + ⌊15·c⌋`;
//! - hour of week: day uniform, night hour (0–5 h) with probability `σ(−2.2 + 0.8·s + 0.5·D)`
//!   in-service, `σ(−2.4 + 0.8·s)` before, day hours 6–23 otherwise; hour `h = 24·day +
//!   hour` is stored as id `1 + min(h, 166)` (§8 gives the field a vocabulary of 168 with id
//!   0 reserved, so the last slot covers Sunday 22–24 h);
//! - event numbers: with the position score `u_t = (t − (n−1)/2) / √((n²−1)/12)` (so that
//!   `Σ_t u_t = 0` and `Σ_t u_t² = n`; `u = 0` when `n = 1`), the stored values are
//!   `log_amount = (β·u_t + ε_t)/√(β²+1)` with `β = 0.1 + 0.6·D` in-service (amounts trend up
//!   with distress) and `β = 0.15·s` before, and `log_dt = (−β'·u_t + ε'_t)/√(β'²+1)` with
//!   `β' = 0.4·D` in-service (gaps shrink) and 0 before.
//!
//! The shared style `s` drives night hours, style categories, mobile use and (with `D`)
//! gambling-like categories both before and during the service, so pre-service behaviours
//! predict in-service ones: behaviour-level knowledge a teacher can pass to a student.
//!
//! # Standardisation
//!
//! Every numeric field is stored already standardised with the **moments of the generating
//! distribution**, which are known exactly by construction: profile values have mean 0 and
//! variance 1 (see `V_j`), and the event numbers have, over all events pooled (whatever the
//! coupling between length and latents), mean 0 and variance 1, because within one sequence
//! `Σ_t u_t = 0` and `Σ_t u_t² = n`. The manifest records `mean = μ`, `std = σ` of the raw
//! (log) value, `raw = μ + σ·stored`; the train split's sample moments of the stored values
//! are 0 and 1 up to sampling noise. (This differs from import, which uses train-split
//! statistics; the generator knows the population moments and needs no second pass.)
//!
//! # Splits
//!
//! Stratified by label, by default 80/10/10 (`--split` sets other whole percentages): the
//! users of each class, in user order, form blocks of `100 / g` users, `g` the greatest
//! common divisor of the three percentages and 100 (10 for 80/10/10: 8 train, 1 valid, 1 test
//! slots); each block's slots are shuffled by a generator keyed by the seed. This runs
//! sequentially while the rows are pushed (it is O(1) per user) and so is deterministic and
//! exact to within one block per class.
//!
//! # Parallelism and determinism
//!
//! Users are generated in chunks of [`CHUNK_USERS`] in parallel (rayon), a wave of chunks
//! at a time; a writer thread pushes the waves in order through a bounded queue, so
//! generation goes on while a shard is hashed, written and synced. Because every
//! user has its own random stream and the rows are pushed in user order, the shards are
//! byte-identical for a given seed whatever `RAYON_NUM_THREADS`.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::mpsc;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::StandardNormal;
use rayon::prelude::*;

use super::manifest::{Manifest, SPLIT_NAMES};
use super::schema::{CatField, NumField, Schema};
use super::writer::{DatasetWriter, RowData, WriterOptions, DEFAULT_SHARD_BYTES};
use crate::{Error, Result};

/// Users generated per parallel work item (fixed: it never depends on the thread count).
pub const CHUNK_USERS: usize = 4096;
/// Chunks generated per wave (the unit handed to the writer thread).
const WAVE_CHUNKS: usize = 8;
/// Waves the generator may run ahead of the writer (bounds memory: a wave is about 32 MiB
/// at the default lengths).
const QUEUE_WAVES: usize = 8;

/// Slope `A` of the label's logit in the latent risk: `y ~ Bernoulli(σ(A·r + b))`.
pub const LABEL_SLOPE: f64 = 2.5;
/// Correlation `ρ` between the risk `r` and the behaviour style `s`.
pub const STYLE_RISK_CORR: f32 = 0.5;
/// Weight `κ` of the label in the in-service distress `D = r + κ·y`.
pub const DISTRESS_LABEL_WEIGHT: f32 = 0.5;

/// Number of event-type groups: types 1..=13 and one background group (ids 14..63).
const N_TYPE_GROUPS: usize = 14;

/// In-service event-type logits per group, `[c₀, c_D, c_s]`: logit `c₀ + c_D·D + c_s·s`.
/// Groups: card purchase, online purchase, payment on time, late payment, missed payment,
/// cash withdrawal, transfer out, transfer in, login, balance inquiry, limit-increase
/// request, fee, declined transaction, background.
pub const IN_TYPE_LOGITS: [[f32; 3]; N_TYPE_GROUPS] = [
    [1.5, 0.0, 0.0],
    [1.0, 0.0, 0.4],
    [0.6, -0.6, 0.0],
    [-2.8, 0.9, 0.0],
    [-4.2, 1.1, 0.0],
    [-1.8, 0.6, 0.3],
    [0.0, 0.1, 0.0],
    [-0.3, -0.3, 0.0],
    [0.8, 0.0, 0.2],
    [0.0, 0.2, 0.0],
    [-3.6, 0.8, 0.0],
    [-3.0, 0.8, 0.0],
    [-3.0, 0.9, 0.0],
    [0.5, 0.0, 0.0],
];

/// Pre-service event-type logits per group, `[c₀, c_r, c_s]`: logit `c₀ + c_r·r + c_s·s`
/// (same groups as [`IN_TYPE_LOGITS`]; missed payments and limit requests practically never
/// happen before the service).
pub const PRE_TYPE_LOGITS: [[f32; 3]; N_TYPE_GROUPS] = [
    [1.5, 0.0, 0.0],
    [1.0, 0.0, 0.4],
    [-0.5, -0.1, 0.0],
    [-4.0, 0.25, 0.0],
    [-9.0, 0.0, 0.0],
    [-1.8, 0.15, 0.35],
    [0.3, 0.0, 0.0],
    [0.3, -0.1, 0.0],
    [0.8, 0.0, 0.2],
    [0.0, 0.1, 0.0],
    [-9.0, 0.0, 0.0],
    [-3.5, 0.15, 0.0],
    [-3.5, 0.2, 0.0],
    [0.5, 0.0, 0.0],
];

/// Event-type ids (the group index + 1 for groups 0..13).
const T_PURCHASE_CARD: u32 = 1;
const T_PURCHASE_ONLINE: u32 = 2;
const T_PAY_ON_TIME: u32 = 3;
const T_PAY_MISSED: u32 = 5;
const T_CASH: u32 = 6;
const T_TRANSFER_OUT: u32 = 7;
const T_BALANCE: u32 = 10;
const T_DECLINED: u32 = 13;

/// First id of the gambling-like merchant categories (10 ids).
pub const GAMBLING_MERCHANT_FIRST: u32 = 990;
/// First id of the style merchant categories (24 ids: gaming, night life, …).
pub const STYLE_MERCHANT_FIRST: u32 = 600;

/// A profile numeric field: name, raw mean and std, loadings on `r`, `q(r)`, `s`, `a`.
struct ProfileNumSpec {
    name: &'static str,
    mean: f64,
    std: f64,
    r: f32,
    q: f32,
    s: f32,
    a: f32,
}

const fn pn(
    name: &'static str,
    mean: f64,
    std: f64,
    r: f32,
    q: f32,
    s: f32,
    a: f32,
) -> ProfileNumSpec {
    ProfileNumSpec {
        name,
        mean,
        std,
        r,
        q,
        s,
        a,
    }
}

/// The 32 profile numeric fields.
const PROFILE_NUM: [ProfileNumSpec; 32] = [
    pn("income_log", 10.5, 0.6, -0.05, 0.0, 0.0, 0.2),
    pn("age", 41.0, 12.0, -0.034, 0.0, -0.079, 0.0),
    pn("tenure_months", 60.0, 40.0, -0.045, 0.0, 0.0, 0.3),
    pn("debt_ratio", 0.35, 0.2, 0.062, 0.0, 0.0, 0.0),
    pn("inquiries_6m", 1.5, 1.4, 0.05, 0.0, 0.0, 0.1),
    pn("bureau_score", 680.0, 60.0, -0.073, 0.0, 0.0, 0.0),
    pn("revolving_util", 0.4, 0.25, 0.034, 0.09, 0.0, 0.0),
    pn("open_accounts", 4.0, 2.5, 0.0, 0.09, 0.0, 0.3),
    pn("months_since_delinq", 30.0, 20.0, 0.0, -0.12, 0.0, 0.0),
    pn("address_years", 8.0, 6.0, -0.022, 0.0, -0.053, 0.0),
    pn("employment_years", 9.0, 7.0, -0.028, 0.0, 0.0, 0.1),
    pn("savings_log", 7.0, 2.0, -0.034, -0.06, 0.0, 0.0),
    pn("mobile_sessions_30d", 25.0, 15.0, 0.0, 0.0, 0.131, 0.3),
    pn("night_login_share", 0.1, 0.08, 0.0, 0.0, 0.158, 0.0),
    pn("online_share", 0.5, 0.2, 0.0, 0.0, 0.105, 0.0),
    pn("device_age_months", 20.0, 12.0, 0.0, 0.0, -0.079, 0.0),
    pn("app_rating", 3.5, 1.0, 0.0, 0.0, 0.053, 0.0),
    pn("promo_responses_1y", 2.0, 2.0, 0.017, 0.0, 0.079, 0.0),
    pn("txn_count_90d", 120.0, 80.0, 0.0, 0.0, 0.0, 0.6),
    pn("avg_balance_log", 6.5, 1.5, -0.028, 0.0, 0.0, 0.3),
    pn("num_products", 2.0, 1.0, 0.0, 0.0, 0.0, 0.35),
    pn("branch_visits_1y", 3.0, 3.0, 0.0, 0.0, 0.0, -0.2),
    pn("aux_00", 0.0, 1.0, 0.0, 0.0, 0.0, 0.0),
    pn("aux_01", 0.0, 1.0, 0.0, 0.0, 0.0, 0.0),
    pn("aux_02", 0.0, 1.0, 0.0, 0.0, 0.0, 0.0),
    pn("aux_03", 0.0, 1.0, 0.0, 0.0, 0.0, 0.0),
    pn("aux_04", 0.0, 1.0, 0.0, 0.0, 0.0, 0.0),
    pn("aux_05", 0.0, 1.0, 0.0, 0.0, 0.0, 0.0),
    pn("aux_06", 0.0, 1.0, 0.0, 0.0, 0.0, 0.0),
    pn("aux_07", 0.0, 1.0, 0.0, 0.0, 0.0, 0.0),
    pn("aux_08", 0.0, 1.0, 0.0, 0.0, 0.0, 0.0),
    pn("aux_09", 0.0, 1.0, 0.0, 0.0, 0.0, 0.0),
];

/// What drives a categorical profile field.
#[derive(Clone, Copy)]
enum Driver {
    Risk,
    RiskSquared,
    Style,
    Activity,
    Noise,
}

/// The 16 categorical profile fields (vocabulary 100 each): name, driver, loading.
const PROFILE_CAT: [(&str, Driver, f32); 16] = [
    ("region", Driver::Noise, 0.0),
    ("occupation", Driver::Risk, 0.045),
    ("education", Driver::Risk, 0.039),
    ("housing", Driver::Risk, 0.039),
    ("marital_status", Driver::Noise, 0.0),
    ("employer_sector", Driver::RiskSquared, 0.09),
    ("acquisition_channel", Driver::Style, 0.15),
    ("device_os", Driver::Style, 0.112),
    ("product_variant", Driver::Activity, 0.3),
    ("branch", Driver::Noise, 0.0),
    ("income_band", Driver::Risk, 0.034),
    ("age_band", Driver::Style, 0.09),
    ("referral_source", Driver::RiskSquared, 0.06),
    ("campaign", Driver::Noise, 0.0),
    ("postal_district", Driver::Risk, 0.028),
    ("bureau_segment", Driver::Risk, 0.056),
];
/// Vocabulary of every categorical profile field.
const PROFILE_VOCAB: u32 = 100;
/// Multipliers of the per-field affine permutation of buckets (all coprime with 99).
const PERM_MUL: [u32; 16] = [2, 4, 5, 7, 8, 10, 13, 14, 16, 17, 19, 20, 23, 25, 26, 28];

/// Event categorical fields and vocabularies (§8).
const EVENT_CAT: [(&str, u32); 4] = [
    ("event_type", 64),
    ("merchant_category", 1024),
    ("channel", 16),
    ("hour_of_week", 168),
];
/// Event numeric fields: name, raw mean, raw std (log units).
const EVENT_NUM: [(&str, f64, f64); 2] = [("log_amount", 3.0, 1.2), ("log_dt", 2.0, 1.5)];

/// Settings of one synthetic dataset.
#[derive(Debug, Clone, PartialEq)]
pub struct SynthConfig {
    /// Number of users (rows), at least 1.
    pub users: u64,
    /// Seed of every random draw.
    pub seed: u64,
    /// Expected default rate, in (0, 1).
    pub default_rate: f64,
    /// In-service length limit L (longest generated in-service sequence).
    pub in_len: usize,
    /// Pre-service length limit Lp (longest generated pre-service sequence).
    pub pre_len: usize,
    /// Close a shard after this many rows (in addition to the byte bound).
    pub shard_rows: Option<usize>,
    /// Close a shard once its tensors reach this many bytes.
    pub shard_bytes: u64,
    /// Train, valid and test shares in whole percent, summing to 100.
    pub split: [u32; 3],
    /// Shift of the latent risk's mean: `r ~ N(risk_shift, 1)` (0 for the standard cohort).
    /// The schema, normalisation and label bias stay those of the standard cohort, so a
    /// shifted cohort is a drifted population of new applicants encoded as the training
    /// data was (for `monitor`).
    pub risk_shift: f64,
    /// Shift of the activity latent's mean: `a ~ N(activity_shift, 1)` (lengths, volumes).
    pub activity_shift: f64,
}

/// Largest accepted latent shift, in standard deviations.
pub const MAX_SHIFT: f64 = 5.0;

impl Default for SynthConfig {
    /// 100,000 users, seed 0, 4 % defaults, the §8 length limits, 256 MiB shards.
    fn default() -> Self {
        SynthConfig {
            users: 100_000,
            seed: 0,
            default_rate: 0.04,
            in_len: 128,
            pre_len: 32,
            shard_rows: None,
            shard_bytes: DEFAULT_SHARD_BYTES,
            split: DEFAULT_SPLIT,
            risk_shift: 0.0,
            activity_shift: 0.0,
        }
    }
}

/// The default train/valid/test percentages.
pub const DEFAULT_SPLIT: [u32; 3] = [80, 10, 10];

/// Most users one synthetic dataset holds (about 1 TB of shards at the §8 lengths).
pub const MAX_USERS: u64 = 1_000_000_000;
/// Largest shard size (64 GiB).
pub const MAX_SHARD_BYTES: u64 = 64 << 30;

/// Largest accepted sequence-length limit.
const MAX_LEN_LIMIT: usize = 1 << 16;

impl SynthConfig {
    /// Checks the settings; the error names the offending option.
    pub fn validate(&self) -> Result<()> {
        if self.users == 0 || self.users > MAX_USERS {
            return Err(Error::invalid(format!(
                "--users {} is out of range: it must be 1 to {MAX_USERS}",
                self.users
            )));
        }
        if self.shard_bytes > MAX_SHARD_BYTES {
            return Err(Error::invalid(format!(
                "--shard-mib {} is out of range: it must be 1 to {}",
                self.shard_bytes >> 20,
                MAX_SHARD_BYTES >> 20
            )));
        }
        if !(self.default_rate > 0.0 && self.default_rate < 1.0) {
            return Err(Error::invalid(format!(
                "--default-rate is {}, must be strictly between 0 and 1",
                self.default_rate
            )));
        }
        for (name, v) in [("--in-len", self.in_len), ("--pre-len", self.pre_len)] {
            if v == 0 || v > MAX_LEN_LIMIT {
                return Err(Error::invalid(format!(
                    "{name} is {v}, must be in 1..={MAX_LEN_LIMIT}"
                )));
            }
        }
        if self.shard_rows == Some(0) {
            return Err(Error::invalid("--shard-rows must be at least 1"));
        }
        if self.shard_bytes == 0 {
            return Err(Error::invalid("--shard-mib must be at least 1"));
        }
        for (name, v) in [
            ("--risk-shift", self.risk_shift),
            ("--activity-shift", self.activity_shift),
        ] {
            if !(v.is_finite() && v.abs() <= MAX_SHIFT) {
                return Err(Error::invalid(format!(
                    "{name} is {v}, must be a number in [-{MAX_SHIFT}, {MAX_SHIFT}]"
                )));
            }
        }
        if self.split.iter().sum::<u32>() != 100 || self.split[0] == 0 {
            return Err(Error::invalid(format!(
                "--split is {}, must be three whole percentages (train, valid, test) summing \
                 to 100 with train above 0",
                self.split.map(|p| p.to_string()).join(",")
            )));
        }
        Ok(())
    }

    /// The dataset schema: §8 fields, the generator's normalisation constants and the
    /// configured length limits.
    pub fn schema(&self) -> Schema {
        Schema {
            profile_num: PROFILE_NUM
                .iter()
                .map(|f| NumField {
                    name: f.name.to_string(),
                    mean: f.mean,
                    std: f.std,
                    log1p: false,
                })
                .collect(),
            profile_cat: PROFILE_CAT
                .iter()
                .map(|&(name, _, _)| CatField {
                    name: name.to_string(),
                    vocab: PROFILE_VOCAB,
                })
                .collect(),
            event_cat: EVENT_CAT
                .iter()
                .map(|&(name, vocab)| CatField {
                    name: name.to_string(),
                    vocab,
                })
                .collect(),
            event_num: EVENT_NUM
                .iter()
                .map(|&(name, mean, std)| NumField {
                    name: name.to_string(),
                    mean,
                    std,
                    log1p: false,
                })
                .collect(),
            pre_len: self.pre_len,
            in_len: self.in_len,
        }
    }
}

/// Logistic sigmoid.
fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn sigmoid32(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Expected default rate `E_r[σ(slope·r + bias)]` for `r ~ N(0,1)`, by the trapezoid rule
/// on `[−12, 12]` with step 1/256 (the integrand is smooth and negligible outside).
pub fn expected_rate(slope: f64, bias: f64) -> f64 {
    let h = 1.0 / 256.0;
    let n = (24.0 / h) as i64;
    let norm = 1.0 / (2.0 * std::f64::consts::PI).sqrt();
    let mut sum = 0.0;
    for k in 0..=n {
        let r = -12.0 + k as f64 * h;
        let w = if k == 0 || k == n { 0.5 } else { 1.0 };
        sum += w * norm * (-0.5 * r * r).exp() * sigmoid(slope * r + bias);
    }
    sum * h
}

/// The bias `b` with `E_r[σ(slope·r + b)] = rate` (bisection, 200 steps over `[−60, 60]`;
/// the expectation increases with `b`). `rate` must be in (0, 1).
pub fn solve_bias(slope: f64, rate: f64) -> Result<f64> {
    if !(rate > 0.0 && rate < 1.0) {
        return Err(Error::invalid(format!(
            "default rate {rate} must be strictly between 0 and 1"
        )));
    }
    let (mut lo, mut hi) = (-60.0_f64, 60.0_f64);
    if expected_rate(slope, lo) > rate || expected_rate(slope, hi) < rate {
        return Err(Error::invalid(format!(
            "default rate {rate} is out of the generator's reach"
        )));
    }
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        if expected_rate(slope, mid) < rate {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(0.5 * (lo + hi))
}

/// SplitMix64 step (seed expansion).
fn splitmix(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// 32-byte ChaCha key derived from `seed` and a purpose tag.
fn key(seed: u64, purpose: u64) -> [u8; 32] {
    let mut state = seed ^ purpose.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    let mut out = [0u8; 32];
    for chunk in out.chunks_exact_mut(8) {
        chunk.copy_from_slice(&splitmix(&mut state).to_le_bytes());
    }
    out
}

/// Uniform in [0, 1) from 24 random bits.
#[inline]
fn unif(rng: &mut ChaCha8Rng) -> f32 {
    (rng.next_u32() >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// Uniform in [0, 1) from the 24 bits of `x` starting at bit `shift`.
#[inline]
fn unif_bits(x: u64, shift: u32) -> f32 {
    ((x >> shift) & 0xFF_FFFF) as f32 * (1.0 / 16_777_216.0)
}

#[inline]
fn normal(rng: &mut ChaCha8Rng) -> f32 {
    rand::Rng::sample(rng, StandardNormal)
}

/// Users generated in memory, column by column (the writer's row layout).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UserChunk {
    /// Global index of the first user.
    pub first_user: u64,
    /// Labels, one per user.
    pub labels: Vec<u8>,
    /// Standardised profile numbers, `[users, 32]`.
    pub profile_num: Vec<f32>,
    /// Profile category ids, `[users, 16]`.
    pub profile_cat: Vec<u32>,
    /// CSR offsets of the pre-service events, `users + 1` entries starting at 0.
    pub pre_offsets: Vec<usize>,
    /// Pre-service event ids, `[events, 4]`.
    pub pre_cat: Vec<u32>,
    /// Pre-service event numbers (standardised), `[events, 2]`.
    pub pre_num: Vec<f32>,
    /// CSR offsets of the in-service events, `users + 1` entries starting at 0.
    pub in_offsets: Vec<usize>,
    /// In-service event ids, `[events, 4]`.
    pub in_cat: Vec<u32>,
    /// In-service event numbers (standardised), `[events, 2]`.
    pub in_num: Vec<f32>,
    /// The latents each user was drawn from, one per user (never written to the dataset).
    pub latents: Vec<Latents>,
}

/// One user's latent variables (docs/synth.md, "Latents"): what the generator knows and
/// no model sees. Kept for analysis (`mgkd-train synth --latents`), e.g. to train a model
/// on the true default probability instead of the label.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Latents {
    /// Latent risk `r`.
    pub risk: f32,
    /// Behaviour style `s = ρ·r + √(1−ρ²)·ε_s`.
    pub style: f32,
    /// Activity `a`.
    pub activity: f32,
}

impl UserChunk {
    /// Number of users in the chunk.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether the chunk holds no user.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// User `i` of the chunk as a writer row with the given split (`i < len()`).
    pub fn row(&self, i: usize, split: u8) -> RowData<'_> {
        let (fd, fc) = (PROFILE_NUM.len(), PROFILE_CAT.len());
        let (ec, ed) = (EVENT_CAT.len(), EVENT_NUM.len());
        let (p0, p1) = (self.pre_offsets[i], self.pre_offsets[i + 1]);
        let (i0, i1) = (self.in_offsets[i], self.in_offsets[i + 1]);
        RowData {
            label: Some(self.labels[i]),
            split,
            user_id: None,
            profile_num: &self.profile_num[i * fd..(i + 1) * fd],
            profile_cat: &self.profile_cat[i * fc..(i + 1) * fc],
            pre_cat: &self.pre_cat[p0 * ec..p1 * ec],
            pre_num: &self.pre_num[p0 * ed..p1 * ed],
            in_cat: &self.in_cat[i0 * ec..i1 * ec],
            in_num: &self.in_num[i0 * ed..i1 * ed],
        }
    }
}

/// Per-user event probabilities of one sequence kind.
struct EventLaw {
    /// Cumulative probabilities of the 14 type groups.
    type_cdf: [f32; N_TYPE_GROUPS],
    p_gamble: f32,
    p_style: f32,
    p_night: f32,
    p_mobile: f32,
    /// Trend of log_amount (β) and of log_dt (β').
    beta_amount: f32,
    beta_dt: f32,
}

impl EventLaw {
    fn new(logits: &[[f32; 3]; N_TYPE_GROUPS], x: f32, s: f32) -> EventLaw {
        let mut type_cdf = [0f32; N_TYPE_GROUPS];
        let mut acc = 0f32;
        for (c, l) in type_cdf.iter_mut().zip(logits) {
            acc += (l[0] + l[1] * x + l[2] * s).exp();
            *c = acc;
        }
        for c in type_cdf.iter_mut() {
            *c /= acc;
        }
        EventLaw {
            type_cdf,
            p_gamble: 0.0,
            p_style: sigmoid32(-2.2 + s),
            p_night: 0.0,
            p_mobile: sigmoid32(0.2 + 0.8 * s),
            beta_amount: 0.0,
            beta_dt: 0.0,
        }
    }
}

/// The generator: configuration-derived constants shared by every chunk.
#[derive(Debug, Clone)]
pub struct Generator {
    key: [u8; 32],
    bias: f32,
    in_len: usize,
    pre_len: usize,
    risk_shift: f32,
    activity_shift: f32,
}

impl Generator {
    /// A generator for `cfg` (validated here); solves the label bias for the default rate.
    pub fn new(cfg: &SynthConfig) -> Result<Generator> {
        cfg.validate()?;
        Ok(Generator {
            key: key(cfg.seed, 1),
            bias: solve_bias(LABEL_SLOPE, cfg.default_rate)? as f32,
            in_len: cfg.in_len,
            pre_len: cfg.pre_len,
            risk_shift: cfg.risk_shift as f32,
            activity_shift: cfg.activity_shift as f32,
        })
    }

    /// The solved label bias `b`.
    pub fn bias(&self) -> f64 {
        self.bias as f64
    }

    /// The true default probability of a user of latent risk `r`: `σ(A·r + b)`, in the
    /// arithmetic (f32) the label is drawn with, so `y = [u < default_probability(r)]`.
    pub fn default_probability(&self, risk: f32) -> f32 {
        sigmoid32(LABEL_SLOPE as f32 * risk + self.bias)
    }

    /// Generates users `first_user .. first_user + n` (each from its own random stream, so
    /// the result does not depend on how users are grouped into chunks).
    pub fn generate_chunk(&self, first_user: u64, n: usize) -> UserChunk {
        let mut c = UserChunk::default();
        self.fill_chunk(first_user, n, &mut c);
        c
    }

    /// As [`Generator::generate_chunk`], into `c` (its previous content is replaced and its
    /// allocations reused).
    pub fn fill_chunk(&self, first_user: u64, n: usize, c: &mut UserChunk) {
        c.first_user = first_user;
        c.labels.clear();
        c.latents.clear();
        for v in [&mut c.profile_num, &mut c.pre_num, &mut c.in_num] {
            v.clear();
        }
        for v in [&mut c.profile_cat, &mut c.pre_cat, &mut c.in_cat] {
            v.clear();
        }
        for v in [&mut c.pre_offsets, &mut c.in_offsets] {
            v.clear();
            v.push(0);
        }
        let mut rng = ChaCha8Rng::from_seed(self.key);
        for k in 0..n as u64 {
            rng.set_stream(first_user + k);
            rng.set_word_pos(0);
            self.user(&mut rng, c);
        }
    }

    /// Draws one user and appends it to `c`.
    fn user(&self, rng: &mut ChaCha8Rng, c: &mut UserChunk) {
        let rho = STYLE_RISK_CORR;
        // A shift of 0 leaves the draws untouched (bit for bit).
        let shifted = |x: f32, by: f32| if by == 0.0 { x } else { x + by };
        let r = shifted(normal(rng), self.risk_shift);
        let s = rho * r + (1.0 - rho * rho).sqrt() * normal(rng);
        let a = shifted(normal(rng), self.activity_shift);
        let y = u8::from(unif(rng) < self.default_probability(r));
        let d = r + DISTRESS_LABEL_WEIGHT * y as f32;
        c.labels.push(y);
        c.latents.push(Latents {
            risk: r,
            style: s,
            activity: a,
        });

        // Profile numbers: exact mean 0, variance 1.
        let q = (r * r - 1.0) * std::f32::consts::FRAC_1_SQRT_2;
        for f in &PROFILE_NUM {
            let v = f.r * f.r + f.q * f.q + f.s * f.s + 2.0 * rho * f.r * f.s + f.a * f.a;
            let z = f.r * r + f.q * q + f.s * s + f.a * a + (1.0 - v).sqrt() * normal(rng);
            c.profile_num.push(z);
        }
        // Profile categories.
        for (k, &(_, driver, load)) in PROFILE_CAT.iter().enumerate() {
            let missing_p = match driver {
                Driver::Risk if r > 1.0 => 0.03,
                _ => 0.02,
            };
            let u_missing = unif(rng);
            let bucket = match driver {
                Driver::Noise => {
                    let u = unif(rng);
                    (99.0 * u * u) as u32
                }
                _ => {
                    let x = match driver {
                        Driver::Risk => r,
                        Driver::RiskSquared => q,
                        Driver::Style => s,
                        _ => a,
                    };
                    let l = load * x + (1.0 - load * load).sqrt() * normal(rng);
                    (99.0 * sigmoid32(1.7 * l)) as u32
                }
            }
            .min(98);
            let id = if u_missing < missing_p {
                0
            } else {
                1 + (PERM_MUL[k] * bucket + 7 * k as u32) % 99
            };
            c.profile_cat.push(id);
        }

        // Pre-service events.
        let n_pre = if unif(rng) < sigmoid32(-1.75 - 0.4 * a) {
            0
        } else {
            let len = (1.7 + 0.5 * a + 0.8 * normal(rng)).exp().ceil();
            (len.min(self.pre_len as f32) as usize).max(1)
        };
        let mut law = EventLaw::new(&PRE_TYPE_LOGITS, r, s);
        law.p_gamble = sigmoid32(-5.2 + 0.2 * r + 0.7 * s);
        law.p_night = sigmoid32(-2.4 + 0.8 * s);
        law.beta_amount = 0.15 * s;
        law.beta_dt = 0.0;
        events(rng, n_pre, &law, &mut c.pre_cat, &mut c.pre_num);
        c.pre_offsets.push(c.pre_cat.len() / EVENT_CAT.len());

        // In-service events.
        let len = (2.9 + 0.5 * a + 0.25 * d + 0.7 * normal(rng)).exp().floor();
        let n_in = len.min(self.in_len as f32).max(0.0) as usize;
        let mut law = EventLaw::new(&IN_TYPE_LOGITS, d, s);
        law.p_gamble = sigmoid32(-4.6 + d + 0.6 * s);
        law.p_night = sigmoid32(-2.2 + 0.8 * s + 0.5 * d);
        law.beta_amount = 0.1 + 0.6 * d;
        law.beta_dt = 0.4 * d;
        events(rng, n_in, &law, &mut c.in_cat, &mut c.in_num);
        c.in_offsets.push(c.in_cat.len() / EVENT_CAT.len());
    }
}

/// Draws `n` events under `law`, appending `[type, merchant, channel, hour]` ids to `cat`
/// and `[log_amount, log_dt]` (standardised) to `num`.
fn events(rng: &mut ChaCha8Rng, n: usize, law: &EventLaw, cat: &mut Vec<u32>, num: &mut Vec<f32>) {
    if n == 0 {
        return;
    }
    let (pos_scale, centre) = if n > 1 {
        let nf = n as f32;
        (1.0 / ((nf * nf - 1.0) / 12.0).sqrt(), (nf - 1.0) * 0.5)
    } else {
        (0.0, 0.0)
    };
    let norm_a = 1.0 / (law.beta_amount * law.beta_amount + 1.0).sqrt();
    let norm_d = 1.0 / (law.beta_dt * law.beta_dt + 1.0).sqrt();
    let ln_merchant = (1023f32).ln();
    for t in 0..n {
        // One 64-bit draw gives the type (bits 40..64), the channel (16..40) and the
        // background type (0..16); a second one the time of week; a third the merchant.
        let x = rng.next_u64();
        let u = unif_bits(x, 40);
        let group = law
            .type_cdf
            .iter()
            .position(|&c| u < c)
            .unwrap_or(N_TYPE_GROUPS - 1);
        let ty = if group + 1 == N_TYPE_GROUPS {
            let v = (x & 0xFFFF) as f32 * (1.0 / 65_536.0);
            14 + (50.0 * v * v) as u32
        } else {
            group as u32 + 1
        };
        let merchant = if ty == T_PURCHASE_CARD || ty == T_PURCHASE_ONLINE || ty == T_DECLINED {
            let m = rng.next_u64();
            let (u, v) = (unif_bits(m, 40), unif_bits(m, 0));
            if u < law.p_gamble {
                GAMBLING_MERCHANT_FIRST + (10.0 * v) as u32
            } else if u < law.p_gamble + law.p_style {
                STYLE_MERCHANT_FIRST + (24.0 * v) as u32
            } else {
                ((v * ln_merchant).exp() as u32).clamp(1, 1023)
            }
        } else {
            0
        };
        let uc = unif_bits(x, 16);
        let mobile_or_web = if uc < law.p_mobile { 3 } else { 2 };
        let channel = match ty {
            T_PURCHASE_CARD | T_DECLINED => 1,
            T_CASH => 4,
            T_PAY_ON_TIME..=T_PAY_MISSED if uc > 0.9 => 5,
            T_PURCHASE_ONLINE..=T_PAY_MISSED | T_TRANSFER_OUT..=T_BALANCE => mobile_or_web,
            _ => 1 + (15.0 * uc) as u32,
        };
        let w = rng.next_u64();
        let day = (7.0 * unif_bits(w, 0)) as u32;
        let uh = unif_bits(w, 24);
        let hour = if unif_bits(w, 40) < law.p_night {
            (6.0 * uh) as u32
        } else {
            6 + (18.0 * uh) as u32
        };
        let how = (24 * day.min(6) + hour.min(23)).min(166);
        cat.extend_from_slice(&[ty, merchant, channel, 1 + how]);
        let pos = (t as f32 - centre) * pos_scale;
        let za = (law.beta_amount * pos + normal(rng)) * norm_a;
        let zd = (-law.beta_dt * pos + normal(rng)) * norm_d;
        num.extend_from_slice(&[za, zd]);
    }
}

/// Sequential stratified split assignment (see the module documentation).
struct SplitAssigner {
    rng: ChaCha8Rng,
    count: [u64; 2],
    /// The slots of a fresh block, in split order (`split[k]·len/100` slots of split `k`).
    slots: Vec<u8>,
    block: [Vec<u8>; 2],
}

impl SplitAssigner {
    fn new(seed: u64, split: [u32; 3]) -> SplitAssigner {
        let g = split.iter().fold(100, |a, &b| gcd(a, b));
        let slots: Vec<u8> = (0u8..)
            .zip(split)
            .flat_map(|(k, p)| std::iter::repeat_n(k, (p / g) as usize))
            .collect();
        SplitAssigner {
            rng: ChaCha8Rng::from_seed(key(seed, 2)),
            count: [0; 2],
            block: [slots.clone(), slots.clone()],
            slots,
        }
    }

    /// Split of the next user of class `label` (0 or 1).
    fn next(&mut self, label: u8) -> u8 {
        let c = usize::from(label.min(1));
        let n = self.slots.len();
        let pos = (self.count[c] % n as u64) as usize;
        if pos == 0 {
            let b = &mut self.block[c];
            b.copy_from_slice(&self.slots);
            // Fisher–Yates.
            for i in (1..n).rev() {
                let j = (self.rng.next_u32() % (i as u32 + 1)) as usize;
                b.swap(i, j);
            }
        }
        self.count[c] += 1;
        self.block[c][pos]
    }
}

/// Greatest common divisor (`gcd(a, 0) = a`).
fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Generates `cfg.users` users into a new dataset directory `dir` and returns its manifest.
pub fn synthesize(dir: &Path, cfg: &SynthConfig) -> Result<Manifest> {
    synthesize_with_progress(dir, cfg, &|_| {})
}

/// The `--risk-shift` / `--activity-shift` flags of a shifted cohort (empty when unshifted).
fn shift_flags(cfg: &SynthConfig) -> String {
    let mut out = String::new();
    if cfg.risk_shift != 0.0 {
        out += &format!(" --risk-shift {}", cfg.risk_shift);
    }
    if cfg.activity_shift != 0.0 {
        out += &format!(" --activity-shift {}", cfg.activity_shift);
    }
    out
}

/// As [`synthesize`], calling `progress(users_written_so_far)` after each written chunk.
pub fn synthesize_with_progress(
    dir: &Path,
    cfg: &SynthConfig,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Manifest> {
    write_cohort(dir, cfg, progress, None)
}

/// Header of the latents table ([`synthesize_with_latents`]).
pub const LATENTS_HEADER: &str = "row,split,label,risk,style,activity,default_probability";

/// As [`synthesize_with_progress`], also returning the latents table: a CSV with the header
/// [`LATENTS_HEADER`] and one line per dataset row, in row order: the row index, its split
/// (`train`, `valid`, `test`), its label, the user's [`Latents`] and its true default
/// probability [`Generator::default_probability`] (f32 values written in full precision).
/// The table is held in memory (about 60 bytes per user).
pub fn synthesize_with_latents(
    dir: &Path,
    cfg: &SynthConfig,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<(Manifest, String)> {
    let mut table = String::with_capacity(64 * cfg.users.min(1 << 24) as usize);
    table += LATENTS_HEADER;
    table.push('\n');
    let manifest = write_cohort(dir, cfg, progress, Some(&mut table))?;
    Ok((manifest, table))
}

/// The body of [`synthesize_with_progress`] and [`synthesize_with_latents`]: appends the
/// latents table's lines to `latents` when given.
fn write_cohort(
    dir: &Path,
    cfg: &SynthConfig,
    progress: &(dyn Fn(u64) + Sync),
    mut latents: Option<&mut String>,
) -> Result<Manifest> {
    let gen = Generator::new(cfg)?;
    let options = WriterOptions {
        shard_bytes: cfg.shard_bytes,
        shard_rows: cfg.shard_rows,
        has_label: true,
        has_user_id: false,
        source: format!(
            "mgkd-train synth --users {} --seed {} --default-rate {} --in-len {} --pre-len {}{}{} \
             (generator model: docs/synth.md; label bias b = {:.6})",
            cfg.users,
            cfg.seed,
            cfg.default_rate,
            cfg.in_len,
            cfg.pre_len,
            if cfg.split == DEFAULT_SPLIT {
                String::new()
            } else {
                format!(" --split {}", cfg.split.map(|p| p.to_string()).join(","))
            },
            shift_flags(cfg),
            gen.bias()
        ),
    };
    let mut writer = DatasetWriter::create(dir, cfg.schema(), options)?;
    let mut splits = SplitAssigner::new(cfg.seed, cfg.split);
    let users = cfg.users;
    let chunk = CHUNK_USERS as u64;
    let n_chunks = users.div_ceil(chunk);
    let n_waves = n_chunks.div_ceil(WAVE_CHUNKS as u64);
    // The writer runs on its own thread, fed waves in user order through a bounded queue,
    // so that generation goes on while it blocks on a shard's fsync; emptied wave buffers
    // come back for reuse.
    let (to_writer, from_gen) = mpsc::sync_channel::<(Vec<UserChunk>, usize)>(QUEUE_WAVES);
    let (recycle, recycled) = mpsc::channel::<Vec<UserChunk>>();
    let generator = &gen;
    std::thread::scope(|scope| {
        let write = scope.spawn(move || -> Result<Manifest> {
            for (wave, used) in from_gen {
                for ch in &wave[..used] {
                    for i in 0..ch.len() {
                        let split = splits.next(ch.labels[i]);
                        if let Some(table) = latents.as_deref_mut() {
                            let l = &ch.latents[i];
                            let _ = writeln!(
                                table,
                                "{},{},{},{},{},{},{}",
                                writer.rows(),
                                SPLIT_NAMES[split as usize],
                                ch.labels[i],
                                l.risk,
                                l.style,
                                l.activity,
                                generator.default_probability(l.risk)
                            );
                        }
                        writer.push(&ch.row(i, split))?;
                    }
                    progress(writer.rows());
                }
                // The generator may have finished already; then the buffers just drop.
                let _ = recycle.send(wave);
            }
            writer.finish()
        });
        for w in 0..n_waves {
            let mut wave = recycled
                .try_recv()
                .unwrap_or_else(|_| vec![UserChunk::default(); WAVE_CHUNKS]);
            let lo = w * WAVE_CHUNKS as u64;
            let hi = (lo + WAVE_CHUNKS as u64).min(n_chunks);
            let used = (hi - lo) as usize;
            wave[..used].par_iter_mut().enumerate().for_each(|(j, ch)| {
                let first = (lo + j as u64) * chunk;
                gen.fill_chunk(first, (users - first).min(chunk) as usize, ch);
            });
            if to_writer.send((wave, used)).is_err() {
                break; // The writer stopped on an error; its result says which.
            }
        }
        drop(to_writer);
        write
            .join()
            .unwrap_or_else(|_| Err(Error::invalid("internal: the writer thread panicked")))
    })
}
