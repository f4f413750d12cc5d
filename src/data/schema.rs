//! The dataset schema (docs/model.md §2.2): which profile and event fields a dataset has, their
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

    /// The differences between `self` (what is found) and `wanted`, one readable line per
    /// difference, naming fields rather than dumping them: a field list whose names differ
    /// (`"profile numeric fields: [income, age] here, [income_log, age, …] (32 fields) wanted"`), a
    /// field whose vocabulary or normalisation differs, a length limit. Empty when equal.
    pub fn diff(&self, wanted: &Schema) -> Vec<String> {
        let mut out = Vec::new();
        list_diff(
            &mut out,
            "profile numeric fields",
            &self.profile_num,
            &wanted.profile_num,
        );
        list_diff(
            &mut out,
            "profile categorical fields",
            &self.profile_cat,
            &wanted.profile_cat,
        );
        list_diff(
            &mut out,
            "event categorical fields",
            &self.event_cat,
            &wanted.event_cat,
        );
        list_diff(
            &mut out,
            "event numeric fields",
            &self.event_num,
            &wanted.event_num,
        );
        for (what, a, b) in [
            ("pre-service length limit", self.pre_len, wanted.pre_len),
            ("in-service length limit", self.in_len, wanted.in_len),
        ] {
            if a != b {
                out.push(format!("{what}: {a} here, {b} wanted"));
            }
        }
        out
    }
}

/// A schema field as [`Schema::diff`] compares it: its name and what else must agree.
trait Field {
    fn name(&self) -> &str;
    /// What must agree besides the name (vocabulary, normalisation), readable.
    fn encoding(&self) -> String;
}

impl Field for CatField {
    fn name(&self) -> &str {
        &self.name
    }
    fn encoding(&self) -> String {
        format!("vocabulary {}", self.vocab)
    }
}

impl Field for NumField {
    fn name(&self) -> &str {
        &self.name
    }
    fn encoding(&self) -> String {
        format!(
            "mean {}, std {}{}",
            self.mean,
            self.std,
            if self.log1p { ", log1p" } else { "" }
        )
    }
}

/// Field names, at most six of them, then the count.
fn names_of<F: Field>(fields: &[F]) -> String {
    const SHOWN: usize = 6;
    let names: Vec<&str> = fields.iter().take(SHOWN).map(Field::name).collect();
    if fields.len() > SHOWN {
        format!("[{}, …] ({} fields)", names.join(", "), fields.len())
    } else {
        format!("[{}]", names.join(", "))
    }
}

/// Appends the differences of one field list: the names when they differ, otherwise each
/// field whose encoding differs (at most three, then a count).
fn list_diff<F: Field>(out: &mut Vec<String>, what: &str, a: &[F], b: &[F]) {
    const SHOWN: usize = 3;
    if !a.iter().map(Field::name).eq(b.iter().map(Field::name)) {
        out.push(format!(
            "{what}: {} here, {} wanted",
            names_of(a),
            names_of(b)
        ));
        return;
    }
    let differing: Vec<String> = a
        .iter()
        .zip(b)
        .filter(|(x, y)| x.encoding() != y.encoding())
        .map(|(x, y)| {
            format!(
                "{what} `{}`: {} here, {} wanted",
                x.name(),
                x.encoding(),
                y.encoding()
            )
        })
        .collect();
    let more = differing.len().saturating_sub(SHOWN);
    out.extend(differing.into_iter().take(SHOWN));
    if more > 0 {
        out.push(format!("{what}: {more} more differ"));
    }
}
