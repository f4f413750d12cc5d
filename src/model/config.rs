//! The model configuration: which network (teacher or student), its widths, and the data
//! shapes it reads, derived from the dataset [`Schema`] (docs/model.md §4).

use serde::{Deserialize, Serialize};

use crate::data::Schema;
use crate::{Error, Result};

/// Which of the two networks a configuration describes (docs/model.md §1, §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads the in-service sequence; length limit `L = schema.in_len`.
    Teacher,
    /// Reads the pre-service sequence; length limit `Lp = schema.pre_len`; has the auxiliary
    /// heads and the coarse/fine projections.
    Student,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Teacher => "teacher",
            Role::Student => "student",
        })
    }
}

/// Default model width d.
pub const DEFAULT_D: usize = 128;
/// Default number of attention heads.
pub const DEFAULT_HEADS: usize = 4;
/// Default number of Transformer blocks N.
pub const DEFAULT_BLOCKS: usize = 2;
/// Default width of each profile embedding `d_cat`.
pub const DEFAULT_D_CAT: usize = 16;

/// The widths of a network: d, attention heads, Transformer blocks and the profile
/// embedding width (a teacher and its students share them in the ablation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Widths {
    /// Model width d.
    pub d: usize,
    /// Attention heads.
    pub heads: usize,
    /// Transformer blocks.
    pub blocks: usize,
    /// Width of each profile categorical embedding.
    pub d_cat: usize,
}

impl Widths {
    /// The library defaults (d 128, 4 heads, 2 blocks, d_cat 16).
    pub fn defaults() -> Widths {
        Widths {
            d: DEFAULT_D,
            heads: DEFAULT_HEADS,
            blocks: DEFAULT_BLOCKS,
            d_cat: DEFAULT_D_CAT,
        }
    }

    /// The widths of an existing configuration.
    pub fn of(cfg: &ModelConfig) -> Widths {
        Widths {
            d: cfg.d,
            heads: cfg.heads,
            blocks: cfg.blocks,
            d_cat: cfg.d_cat,
        }
    }
}

/// Largest model width `d`.
pub const MAX_D: usize = 4096;
/// Most attention heads.
pub const MAX_HEADS: usize = 256;
/// Most transformer blocks per encoder.
pub const MAX_BLOCKS: usize = 64;
/// Largest profile embedding width `d_cat`.
pub const MAX_D_CAT: usize = 1024;

/// Upper bound on a network's parameter count (2³³ scalars, 32 GiB in f32): a guard
/// against configurations read from damaged files.
pub const MAX_PARAMS: u128 = 1 << 33;

/// Everything that fixes the parameter table of one network. The field counts, vocabularies
/// and length limit are copies of the schema's (kept explicit so a checkpoint's JSON says
/// them at a glance); [`ModelConfig::validate`] checks they agree with `schema`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// Teacher or student.
    pub role: Role,
    /// Model width d.
    pub d: usize,
    /// Attention heads H (d % H = 0, head width d/H).
    pub heads: usize,
    /// Transformer blocks N ≥ 1.
    pub blocks: usize,
    /// Width of each profile categorical embedding.
    pub d_cat: usize,
    /// F_d, dense profile fields.
    pub profile_num: usize,
    /// Vocabulary of each categorical profile field (F_c entries).
    pub profile_vocabs: Vec<u32>,
    /// Vocabulary of each categorical event field (E_c entries).
    pub event_vocabs: Vec<u32>,
    /// E_d, numeric event fields.
    pub event_num: usize,
    /// Sequence length limit of this network's encoder (`in_len` teacher, `pre_len` student).
    pub len_limit: usize,
    /// The full data schema the model was built for.
    pub schema: Schema,
}

impl ModelConfig {
    /// A configuration for `role` over `schema` with the given widths, validated.
    pub fn new(
        role: Role,
        schema: &Schema,
        d: usize,
        heads: usize,
        blocks: usize,
        d_cat: usize,
    ) -> Result<ModelConfig> {
        let cfg = ModelConfig {
            role,
            d,
            heads,
            blocks,
            d_cat,
            profile_num: schema.f_num(),
            profile_vocabs: schema.profile_cat.iter().map(|f| f.vocab).collect(),
            event_vocabs: schema.event_cat.iter().map(|f| f.vocab).collect(),
            event_num: schema.e_num(),
            len_limit: match role {
                Role::Teacher => schema.in_len,
                Role::Student => schema.pre_len,
            },
            schema: schema.clone(),
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The defaults d = 128, 4 heads, 2 blocks, d_cat = 16.
    pub fn with_defaults(role: Role, schema: &Schema) -> Result<ModelConfig> {
        Self::new(
            role,
            schema,
            DEFAULT_D,
            DEFAULT_HEADS,
            DEFAULT_BLOCKS,
            DEFAULT_D_CAT,
        )
    }

    /// Head width `dh = d / heads`.
    pub fn head_dim(&self) -> usize {
        self.d / self.heads.max(1)
    }

    /// Width of the profile projection's input, `F_d + F_c·d_cat`.
    pub fn profile_in(&self) -> usize {
        self.profile_num + self.profile_vocabs.len() * self.d_cat
    }

    /// Checks the widths (d ≥ 1, heads ≥ 1, d % heads = 0, blocks ≥ 1, d_cat ≥ 1), that every
    /// vocabulary is ≥ 1 (id 0 is reserved), that the profile has at least one input, and
    /// that the derived fields agree with the schema.
    pub fn validate(&self) -> Result<()> {
        let bad = |msg: String| {
            Err(Error::invalid(format!(
                "model config ({}): {msg}",
                self.role
            )))
        };
        for (name, v, max) in [
            ("d", self.d, MAX_D),
            ("heads", self.heads, MAX_HEADS),
            ("blocks", self.blocks, MAX_BLOCKS),
            ("d_cat", self.d_cat, MAX_D_CAT),
        ] {
            if v > max {
                return bad(format!("{name} = {v} is more than the supported {max}"));
            }
        }
        if self.d == 0 {
            return bad("d must be at least 1".into());
        }
        if self.heads == 0 || !self.d.is_multiple_of(self.heads) {
            return bad(format!(
                "d = {} must be a positive multiple of heads = {}",
                self.d, self.heads
            ));
        }
        if self.blocks == 0 {
            return bad("blocks must be at least 1".into());
        }
        if self.d_cat == 0 {
            return bad("d_cat must be at least 1".into());
        }
        for (what, vocabs) in [
            ("profile", &self.profile_vocabs),
            ("event", &self.event_vocabs),
        ] {
            if let Some(k) = vocabs.iter().position(|&v| v == 0) {
                return bad(format!("{what} categorical field {k} has vocabulary 0"));
            }
        }
        let (d, lim) = (self.d as u128, self.len_limit as u128);
        let vocab_sum: u128 = self.event_vocabs.iter().map(|&v| v as u128).sum();
        let pvocab_sum: u128 = self.profile_vocabs.iter().map(|&v| v as u128).sum();
        let size = vocab_sum * d
            + lim * d
            + self.blocks as u128 * 12 * d * d
            + pvocab_sum * self.d_cat as u128
            + self.profile_in() as u128 * d
            + self.event_num as u128 * d;
        if size > MAX_PARAMS {
            return bad(format!(
                "about {size} parameters, more than the supported {MAX_PARAMS}"
            ));
        }
        if self.profile_in() == 0 {
            return bad("the profile has no fields (F_d + F_c = 0)".into());
        }
        let s = &self.schema;
        let derived = ModelConfig {
            role: self.role,
            d: self.d,
            heads: self.heads,
            blocks: self.blocks,
            d_cat: self.d_cat,
            profile_num: s.f_num(),
            profile_vocabs: s.profile_cat.iter().map(|f| f.vocab).collect(),
            event_vocabs: s.event_cat.iter().map(|f| f.vocab).collect(),
            event_num: s.e_num(),
            len_limit: match self.role {
                Role::Teacher => s.in_len,
                Role::Student => s.pre_len,
            },
            schema: s.clone(),
        };
        let diff = derived.diff(self);
        if !diff.is_empty() {
            return bad(format!(
                "fields disagree with its schema: {}",
                diff.join("; ")
            ));
        }
        Ok(())
    }

    /// The differences between `self` (what is found) and `wanted`, one readable line per
    /// difference (`"d: 64 here, 128 wanted"`); empty when they are equal. Data-schema
    /// differences are described field by field ([`Schema::diff`]); the sizes derived from
    /// the schema (`profile_num`, the vocabularies, `len_limit`) are compared only when the
    /// schemas agree, since otherwise they only repeat the schema's difference.
    pub fn diff(&self, wanted: &ModelConfig) -> Vec<String> {
        let mut out = Vec::new();
        let mut cmp = |name: &str, a: String, b: String| {
            if a != b {
                out.push(format!("{name}: {a} here, {b} wanted"));
            }
        };
        cmp("role", self.role.to_string(), wanted.role.to_string());
        cmp("d", self.d.to_string(), wanted.d.to_string());
        cmp("heads", self.heads.to_string(), wanted.heads.to_string());
        cmp("blocks", self.blocks.to_string(), wanted.blocks.to_string());
        cmp("d_cat", self.d_cat.to_string(), wanted.d_cat.to_string());
        let schema = self.schema.diff(&wanted.schema);
        if schema.is_empty() {
            cmp(
                "profile_num",
                self.profile_num.to_string(),
                wanted.profile_num.to_string(),
            );
            cmp(
                "profile_vocabs",
                format!("{:?}", self.profile_vocabs),
                format!("{:?}", wanted.profile_vocabs),
            );
            cmp(
                "event_vocabs",
                format!("{:?}", self.event_vocabs),
                format!("{:?}", wanted.event_vocabs),
            );
            cmp(
                "event_num",
                self.event_num.to_string(),
                wanted.event_num.to_string(),
            );
            cmp(
                "len_limit",
                self.len_limit.to_string(),
                wanted.len_limit.to_string(),
            );
        }
        out.extend(schema);
        out
    }
}
