//! The dataset schema (SPEC §2): which profile and event fields a dataset has, their
//! vocabulary sizes and normalisation statistics, and the sequence-length limits.
//!
//! The same event schema serves the pre-service and the in-service sequences (an event is an
//! event, whenever it happened); the teacher's and the student's encoders have their own
//! parameters.

use serde::{Deserialize, Serialize};

/// A categorical field. Ids are in `0..vocab`; id 0 is reserved for missing/unknown.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatField {
    /// Field name (CSV column name, or the generator's name).
    pub name: String,
    /// Vocabulary size, including the reserved id 0.
    pub vocab: u32,
}

/// A numeric field, stored standardised: `stored = (f(raw) − mean) / std` where
/// `f = signed log1p` when `log1p` is set (`sign(x)·ln(1+|x|)`), identity otherwise.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NumField {
    /// Field name.
    pub name: String,
    /// Mean of `f(raw)` over the train split.
    pub mean: f64,
    /// Standard deviation of `f(raw)` over the train split (1 when it was 0).
    pub std: f64,
    /// Whether the signed log1p transform was applied before standardising.
    #[serde(default)]
    pub log1p: bool,
}

/// The full schema of a dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Schema {
    /// Dense profile fields (F_d of them).
    pub profile_num: Vec<NumField>,
    /// Categorical profile fields (F_c of them).
    pub profile_cat: Vec<CatField>,
    /// Categorical event fields (E_c of them), shared by pre- and in-service events.
    pub event_cat: Vec<CatField>,
    /// Numeric event fields (E_d of them), shared by pre- and in-service events.
    pub event_num: Vec<NumField>,
    /// Pre-service length limit Lp: batches keep at most the `pre_len` most recent events.
    pub pre_len: usize,
    /// In-service length limit L: batches keep at most the `in_len` most recent events.
    pub in_len: usize,
}

impl Schema {
    /// F_d, the number of dense profile fields.
    pub fn f_num(&self) -> usize {
        self.profile_num.len()
    }
    /// F_c, the number of categorical profile fields.
    pub fn f_cat(&self) -> usize {
        self.profile_cat.len()
    }
    /// E_c, the number of categorical event fields.
    pub fn e_cat(&self) -> usize {
        self.event_cat.len()
    }
    /// E_d, the number of numeric event fields.
    pub fn e_num(&self) -> usize {
        self.event_num.len()
    }
}
