//! The precision scheme (docs/model.md §7): the element type a run stores its activations,
//! activation gradients and matrix inputs in, chosen per run. Parameters, their gradients
//! and the Adam moments stay in f32 whatever the choice (master weights); a bf16 run reads
//! its weights from a bf16 copy made once per step ([`crate::model::ParamStore::compute`]).
//! LayerNorm statistics, logits, losses and every reduction are computed and kept in f32.

use std::fmt;
use std::str::FromStr;

/// The storage type of a run's activations (see the module documentation).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// Everything in the backend's own element type (f32, or f64 in gradient checks).
    #[default]
    F32,
    /// bfloat16 storage (8-bit significand, f32's exponent range) for activations and
    /// matrix inputs; arithmetic in f32, each stored value rounded to nearest even.
    Bf16,
}

impl Precision {
    /// The name used by `--precision` and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        }
    }

    /// Bytes per stored activation element on a backend whose element type takes `full`
    /// bytes (f32: `full`, which is 8 for the f64 backend; bf16: 2).
    pub fn act_bytes(self, full: usize) -> usize {
        match self {
            Precision::F32 => full,
            Precision::Bf16 => std::mem::size_of::<half::bf16>(),
        }
    }
}

impl FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim() {
            "f32" => Ok(Precision::F32),
            "bf16" => Ok(Precision::Bf16),
            other => Err(format!("precision `{other}`: expected f32 or bf16")),
        }
    }
}

impl fmt::Display for Precision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `x` rounded to the nearest bfloat16 (ties to even; NaN stays NaN, ±∞ stays ±∞), as an
/// f32: what a bf16 store followed by a load gives.
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    half::bf16::from_f32(x).to_f32()
}

/// Unit roundoff of bfloat16 (7 stored significand bits, 8 with the implicit one): a stored
/// value `x` becomes `x·(1 + δ)` with `|δ| ≤ 2⁻⁸`.
pub const BF16_UNIT_ROUNDOFF: f64 = 1.0 / 256.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_bad_names_are_errors() {
        for p in [Precision::F32, Precision::Bf16] {
            assert_eq!(p.as_str().parse::<Precision>(), Ok(p));
        }
        let e = "fp16".parse::<Precision>().unwrap_err();
        assert!(e.contains("fp16") && e.contains("bf16"), "{e}");
    }

    #[test]
    fn rounding_is_to_nearest_even_within_the_unit_roundoff() {
        // 1 + 2⁻⁸ lies halfway between 1 and 1 + 2⁻⁷: ties go to the even significand (1).
        assert_eq!(round_bf16(1.0 + 1.0 / 256.0), 1.0);
        // 1 + 3·2⁻⁸ lies halfway between 1 + 2⁻⁷ and 1 + 2⁻⁶: the even one is 1 + 2⁻⁶.
        assert_eq!(round_bf16(1.0 + 3.0 / 256.0), 1.0 + 1.0 / 64.0);
        assert_eq!(round_bf16(1.0 + 1.0 / 128.0), 1.0 + 1.0 / 128.0);
        assert!(round_bf16(f32::NAN).is_nan());
        assert_eq!(round_bf16(f32::INFINITY), f32::INFINITY);
        let mut x = 0.123_456_79_f32;
        for _ in 0..1000 {
            let r = round_bf16(x);
            assert!(
                ((r - x) / x).abs() as f64 <= BF16_UNIT_ROUNDOFF,
                "{x} → {r}"
            );
            assert_eq!(round_bf16(r), r, "rounding is idempotent");
            x = x * 1.618_034 + 0.1;
            if x > 1e30 {
                x = -x * 1e-31;
            }
        }
    }
}
