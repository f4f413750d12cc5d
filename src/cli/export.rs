//! `mgkd-train export --model student.safetensors --out student.onnx [--vocab vocab.json]`:
//! the student's scoring graph as an ONNX model (opset 17) for a decision engine that does
//! not run Rust; docs/deploy.md says how to score it.

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;

use crate::data::import::Vocabularies;
use crate::data::writer::write_atomic;
use crate::data::Schema;
use crate::export::onnx::{export_student, OPSET};
use crate::model::checkpoint;
use crate::{Error, Result};

/// Arguments of `mgkd-train export`.
#[derive(Debug, Clone, Args)]
pub struct ExportArgs {
    /// Student checkpoint.
    #[arg(long)]
    pub model: PathBuf,
    /// Output ONNX file, written atomically.
    #[arg(long)]
    pub out: PathBuf,
    /// `vocab.json` of the dataset the student was trained on (written by `import`): its
    /// value → id maps are stored in the model's metadata (`mgkd.vocab`) so that a scorer
    /// can encode raw categorical values.
    #[arg(long)]
    pub vocab: Option<PathBuf>,
}

/// Checks that `text` (read from `path`) is a `vocab.json` of `import` whose fields are
/// those of `schema` (names and vocabulary sizes, in order).
fn check_vocab(path: &std::path::Path, text: &str, schema: &Schema) -> Result<()> {
    let v: Vocabularies = serde_json::from_str(text)
        .map_err(|e| Error::format(path, format!("not a valid vocabulary file: {e}")))?;
    for (what, found, wanted) in [
        ("profile_cat", &v.profile_cat, &schema.profile_cat),
        ("event_cat", &v.event_cat, &schema.event_cat),
    ] {
        let f: Vec<(&str, u32)> = found.iter().map(|f| (f.name.as_str(), f.vocab)).collect();
        let w: Vec<(&str, u32)> = wanted.iter().map(|f| (f.name.as_str(), f.vocab)).collect();
        if f != w {
            return Err(Error::format(
                path,
                format!(
                    "`{what}` holds fields (name, vocabulary) {f:?}, the student's schema has \
                     {w:?}: not the vocabulary of the student's training data"
                ),
            ));
        }
    }
    Ok(())
}

/// `mgkd-train export`.
pub fn run(args: &ExportArgs) -> Result<()> {
    let start = Instant::now();
    let ck = checkpoint::read(&args.model)?;
    let vocab = match &args.vocab {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
            check_vocab(p, &text, &ck.config.schema)?;
            Some(text)
        }
        None => None,
    };
    let out = export_student(&ck, vocab.as_deref())
        .map_err(|e| Error::format(&args.model, e.to_string()))?;
    write_atomic(&args.out, &out.bytes)?;
    let cfg = &ck.config;
    println!(
        "exported the student (d {}, {} heads, {} blocks, pre-service limit {}) to {}: \
         ONNX opset {OPSET}, {} nodes, {} weights ({} distillation-only weights left out), \
         {} bytes, {:.2} s",
        cfg.d,
        cfg.heads,
        cfg.blocks,
        cfg.len_limit,
        args.out.display(),
        out.nodes,
        out.graph_params,
        out.left_out_params,
        out.bytes.len(),
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
