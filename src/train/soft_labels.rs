//! Soft labels from a file (`mgkd-train student --soft-labels CSV`): the targets of L_soft
//! (docs/model.md §5.4) read from another model's scores instead of computed by the frozen
//! teacher, e.g. an ensemble of teachers, a model the user already has, or, on synthetic
//! data, the generator's true default probability (`synth --latents`). The file is a score
//! file in `mgkd-train predict`'s format ([`crate::data::scores`]) that scores every train
//! row. The logits replace the teacher's in its cache ([`crate::model::TeacherCache`]), so
//! the other terms still read the teacher's representations.

use std::collections::HashMap;
use std::path::Path;

use crate::backend::{Backend, Float, Mut, Ref};
use crate::data::scores::SplitKeys;
use crate::data::writer::sha256_hex;
use crate::data::Dataset;
use crate::model::TeacherCache;
use crate::train::TRAIN;
use crate::{Error, Result};

/// Logits of the train rows read from a soft-label file.
#[derive(Debug, Clone, PartialEq)]
pub struct SoftLabels {
    /// Dataset row → logit, one entry per train row.
    pub logit_of_row: HashMap<u64, f64>,
    /// Lower-case hex SHA-256 of the file.
    pub sha256: String,
}

impl SoftLabels {
    /// Reads `path` for the train rows of `ds` (the checks of [`SplitKeys::read_logits`]).
    pub fn read(path: &Path, ds: &Dataset) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let logits = SplitKeys::of_split(ds, TRAIN)?.parse_logits(path, &bytes)?;
        Ok(SoftLabels {
            logit_of_row: ds.rows_of_split(TRAIN).into_iter().zip(logits).collect(),
            sha256: sha256_hex(&bytes),
        })
    }

    /// Writes these logits over the teacher's in `cache`, slot by slot (each rounded once to
    /// the backend's element type). Errors on a cached row without a logit.
    pub fn apply<B: Backend>(&self, be: &B, cache: &mut TeacherCache<B>) -> Result<()> {
        let rows = cache.index.rows_by_slot();
        let logits = rows
            .iter()
            .map(|row| {
                self.logit_of_row
                    .get(row)
                    .map(|&z| B::F::from_f64(z))
                    .ok_or_else(|| {
                        Error::invalid(format!("internal: no soft label for cached row {row}"))
                    })
            })
            .collect::<Result<Vec<B::F>>>()?;
        if logits.is_empty() {
            return Ok(());
        }
        let host = be.upload(&logits)?;
        be.copy(
            logits.len(),
            Ref::whole(&host),
            Mut::at(&mut cache.logits, 0),
        );
        be.synchronize()
    }
}
