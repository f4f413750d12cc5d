//! The inference pass (`Model::infer`: scoring, the frozen teacher's live outputs) against
//! the training forward (`Model::forward`): the same operations in the same order, so on
//! the CPU the logits, the representation `H` and the tokens `T` must be the same bits, for
//! teacher and student, one and two blocks, on the f32, f64 and bf16-scheme CPU backends,
//! with the blocks run over the whole batch and over windows of rows, and the feed-forward
//! networks whole and in chunks of tokens that do not divide the batch's (padded token
//! slots included: they hold whatever the forward wrote there and must match too).

mod bf16_common;
mod model_common;

use bf16_common::{model, random_batch};
use mgkd::backend::cpu::CpuBackend;
use mgkd::backend::cpu_bf16::CpuBf16Backend;
use mgkd::backend::{Backend, Float};
use mgkd::model::{DeviceBatch, InferChunks, Role};
use model_common::schema;

/// The bit patterns of `buf`'s elements (as f64, which holds every f32 and bf16 exactly).
fn bits<B: Backend>(be: &B, buf: &B::Buf) -> Vec<u64> {
    be.download(buf)
        .expect("download")
        .iter()
        .map(|x| x.to_f64().to_bits())
        .collect()
}

/// Checks `infer` against `forward` for `role` with `blocks` blocks on `be`.
fn check<B: Backend>(be: &B, role: Role, blocks: usize, seed: u64) {
    let m = model(be, role, blocks, seed);
    let batch = DeviceBatch::upload(be, &random_batch(seed, 7), &schema()).expect("upload");
    let what = format!("{} {role} with {blocks} block(s)", be.name());
    let train = m.forward(be, &batch).expect("forward");
    let tokens = bits(be, &train.encoder.out.tokens);
    // Not a comparison of two empty or constant buffers.
    let distinct: std::collections::BTreeSet<u64> = tokens.iter().copied().collect();
    let d = m.config.d;
    assert!(
        distinct.len() > 4 * d,
        "{what}: T holds {} distinct values",
        distinct.len()
    );
    // 7 rows of random lengths (some empty): FFN chunks of 1, 7 and 13 tokens end mid-row;
    // block windows of 1 token (one row), 2 rows, and 3 rows (the last window short).
    let whole = m.infer(be, &batch).expect("infer");
    let len = batch.in_service.len.max(batch.pre.len);
    let chunks = [
        (usize::MAX, 1),
        (usize::MAX, 7),
        (1, 13),
        (2 * len, usize::MAX),
        (3 * len, 7),
    ];
    let parts = chunks.map(|(block_tokens, ffn_tokens)| {
        let c = InferChunks {
            block_tokens,
            ffn_tokens,
        };
        (m.infer_in_chunks(be, &batch, c).expect("infer"), c)
    });
    let runs = parts.iter().map(|(inf, c)| (inf, format!("{c:?}")));
    for (inf, how) in std::iter::once((&whole, "whole".to_string())).chain(runs) {
        let what = format!("{what}, {how}");
        assert_eq!(
            bits(be, &inf.logits),
            bits(be, &train.logits),
            "{what}: logits"
        );
        assert_eq!(bits(be, &inf.hidden), bits(be, &train.hidden), "{what}: H");
        assert_eq!(bits(be, &inf.tokens), tokens, "{what}: T");
    }
}

#[test]
fn inference_gives_the_training_forwards_bits() {
    for role in [Role::Teacher, Role::Student] {
        for blocks in [1, 2] {
            check(&CpuBackend::<f32>::new(), role, blocks, 7);
            check(&CpuBackend::<f64>::new(), role, blocks, 8);
            check(&CpuBf16Backend::new(), role, blocks, 9);
        }
    }
}
