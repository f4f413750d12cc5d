//! Checkpoint round trip and refusals; configuration validation; class weights; the
//! parameter table's naming and init; batch validation; thread-count determinism.

mod model_common;
use model_common as common;

use std::collections::BTreeMap;

use common::{batch5, model, schema, upload};
use mgkd::backend::Backend;
use mgkd::loss::class_weights;
use mgkd::model::checkpoint;
use mgkd::model::{ModelConfig, ParamTable, Role, Teacher};

#[test]
fn round_trip_gives_identical_logits_and_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("student.safetensors");
    let (be, s) = model::<f32>(Role::Student, 2, 1);
    let mut extra = BTreeMap::new();
    extra.insert("mgkd.train".to_string(), "{\"lr\":0.001}".to_string());
    checkpoint::save(&be, &s, &extra, &path).unwrap();
    assert!(!dir.path().join("student.safetensors.tmp").exists());
    let ck = checkpoint::read(&path).unwrap();
    assert_eq!(ck.metadata["mgkd.format"], "mgkd-checkpoint");
    assert_eq!(ck.metadata["mgkd.version"], "1");
    assert_eq!(ck.metadata["mgkd.train"], "{\"lr\":0.001}");
    let loaded = checkpoint::load(&be, &path, Some(&s.config)).unwrap();
    let db = upload(&be, &batch5(3));
    let a = be.download(&s.forward(&be, &db).unwrap().logits).unwrap();
    let b = be
        .download(&loaded.forward(&be, &db).unwrap().logits)
        .unwrap();
    assert_eq!(a, b);
    assert_eq!(
        be.download(&s.params.values).unwrap(),
        be.download(&loaded.params.values).unwrap()
    );
    // The f32 file also loads into an f64 model.
    let be64 = mgkd::backend::cpu::CpuBackend::<f64>::new();
    let m64 = checkpoint::load(&be64, &path, None).unwrap();
    assert_eq!(m64.params.table, s.params.table);
}

#[test]
fn checkpoint_of_another_configuration_is_refused_with_the_difference() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.safetensors");
    let (be, t) = model::<f32>(Role::Teacher, 1, 1);
    checkpoint::save(&be, &t, &BTreeMap::new(), &path).unwrap();
    let wanted = ModelConfig::new(Role::Teacher, &schema(), 8, 2, 2, 3).unwrap();
    let err = match checkpoint::load(&be, &path, Some(&wanted)) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("a 1-block checkpoint loaded as a 2-block model"),
    };
    assert!(err.contains("t.safetensors"), "{err}");
    assert!(err.contains("blocks: 1 here, 2 wanted"), "{err}");
    let student = ModelConfig::new(Role::Student, &schema(), 8, 2, 1, 3).unwrap();
    let diff = checkpoint::read_config(&path).unwrap().diff(&student);
    assert!(diff
        .iter()
        .any(|l| l.starts_with("role: teacher here, student wanted")));
    assert!(diff
        .iter()
        .any(|l| l.starts_with("len_limit: 6 here, 4 wanted")));
}

#[test]
fn schema_differences_name_the_fields_not_the_whole_schema() {
    let a = schema();
    assert!(a.diff(&a).is_empty());
    let mut b = schema();
    b.profile_num.truncate(2);
    b.event_cat[0].vocab = 9;
    b.event_num[1].mean = 0.5;
    b.event_num[1].log1p = true;
    b.pre_len = 5;
    assert_eq!(
        a.diff(&b),
        [
            "profile numeric fields: [age, income, limit] here, [age, income] wanted",
            "event categorical fields `type`: vocabulary 6 here, vocabulary 9 wanted",
            "event numeric fields `gap`: mean 0, std 1 here, mean 0.5, std 1, log1p wanted",
            "pre-service length limit: 4 here, 5 wanted",
        ]
    );
    // Long lists are cut after six names; the derived sizes are not repeated.
    let mut c = schema();
    c.profile_num = (0..40)
        .map(|k| mgkd::data::NumField {
            name: format!("f{k}"),
            mean: 0.0,
            std: 1.0,
            log1p: false,
        })
        .collect();
    let ta = ModelConfig::new(Role::Teacher, &a, 8, 2, 1, 3).unwrap();
    let tc = ModelConfig::new(Role::Teacher, &c, 8, 2, 1, 3).unwrap();
    assert_eq!(
        ta.diff(&tc),
        ["profile numeric fields: [age, income, limit] here, [f0, f1, f2, f3, f4, f5, …] (40 fields) wanted"]
    );
}

fn refused(bytes: &[u8], needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    std::fs::write(&path, bytes).unwrap();
    let be = mgkd::backend::cpu::CpuBackend::<f32>::new();
    match checkpoint::load(&be, &path, None) {
        Err(e) => {
            let msg = e.to_string();
            assert!(
                msg.contains("bad.safetensors") && msg.contains(needle),
                "{msg}"
            );
        }
        Ok(_) => panic!("damaged checkpoint accepted ({needle})"),
    }
}

#[test]
fn damaged_checkpoints_are_refused_without_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.safetensors");
    let (be, s) = model::<f32>(Role::Student, 2, 2);
    checkpoint::save(&be, &s, &BTreeMap::new(), &path).unwrap();
    let good = std::fs::read(&path).unwrap();
    refused(&good[..good.len() - 10], "truncated or damaged");
    refused(&good[..5], "truncated or damaged");
    refused(b"", "truncated or damaged");
    let text = String::from_utf8_lossy(&good).into_owned();
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let header = &text[8..8 + header_len];
    // Same-length edits of the JSON header keep the file parseable and change one thing.
    let edit = |from: &str, to: &str| {
        assert_eq!(from.len(), to.len());
        assert!(header.contains(from), "{from} not in the header");
        let mut b = good.clone();
        let h = header.replacen(from, to, 1);
        b[8..8 + header_len].copy_from_slice(h.as_bytes());
        b
    };
    refused(&edit("mgkd-checkpoint", "mgkd-chekpoint_"), "mgkd.format");
    refused(
        &edit("\"mgkd.version\":\"1\"", "\"mgkd.version\":\"9\""),
        "version",
    );
    refused(
        &edit("fine.v.bias", "fine.v.bia_"),
        "fine.v.bias is missing",
    );
    // The config JSON sits escaped inside the metadata string.
    refused(
        &edit(r#"\"heads\":2"#, r#"\"heads\":3"#),
        "multiple of heads",
    );
}

/// The header length and the header text of a checkpoint file.
fn header_of(bytes: &[u8]) -> (usize, String) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (n, String::from_utf8(bytes[8..8 + n].to_vec()).unwrap())
}

#[test]
fn corrupted_tensor_data_is_refused_by_the_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.safetensors");
    let (be, s) = model::<f32>(Role::Student, 2, 4);
    checkpoint::save(&be, &s, &BTreeMap::new(), &path).unwrap();
    let good = std::fs::read(&path).unwrap();
    let (n, header) = header_of(&good);
    let data = 8 + n;
    let ck = checkpoint::read(&path).unwrap();
    assert!(ck.verified);
    assert!(ck.unverified_warning(&path).is_none());
    let sum = &ck.metadata[checkpoint::KEY_DATA_SHA256];
    assert_eq!(sum, &mgkd::data::writer::sha256_hex(&good[data..]));
    assert!(header.contains(sum.as_str()));

    // Finite corruptions that every other check lets through.
    let mid = data + (good.len() - data) / 2 / 4 * 4;
    let mut flipped = good.clone();
    flipped[mid] ^= 1; // the lowest mantissa bit of one weight
    refused(&flipped, "do not match their checksum");
    let mut scaled = good.clone();
    let w = f32::from_le_bytes(good[mid..mid + 4].try_into().unwrap());
    scaled[mid..mid + 4].copy_from_slice(&(w * 1e30).to_le_bytes());
    refused(&scaled, "corrupted");
    let mut last = good.clone();
    let end = last.len() - 1;
    last[end] ^= 0x80;
    refused(&last, "checksum");
    // A damaged checksum value is a mismatch too.
    let mut bad_sum = good.clone();
    let at = 8 + header.find(sum.as_str()).unwrap();
    bad_sum[at] = if bad_sum[at] == b'0' { b'1' } else { b'0' };
    refused(&bad_sum, "checksum");
}

#[test]
fn a_checkpoint_without_checksum_loads_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.safetensors");
    let (be, s) = model::<f32>(Role::Teacher, 1, 5);
    checkpoint::save(&be, &s, &BTreeMap::new(), &path).unwrap();
    let good = std::fs::read(&path).unwrap();
    let (n, header) = header_of(&good);
    // The header as an older build wrote it: without the checksum key, padded to 8 bytes.
    let sum = &checkpoint::read(&path).unwrap().metadata[checkpoint::KEY_DATA_SHA256];
    let entry = format!("\"{}\":\"{sum}\",", checkpoint::KEY_DATA_SHA256);
    assert!(header.contains(&entry), "{header}");
    let mut old = header.replacen(&entry, "", 1).trim_end().to_string();
    while old.len() % 8 != 0 {
        old.push(' ');
    }
    let mut bytes = (old.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(old.as_bytes());
    bytes.extend_from_slice(&good[8 + n..]);
    std::fs::write(&path, &bytes).unwrap();
    let ck = checkpoint::read(&path).unwrap();
    assert!(!ck.verified);
    let warning = ck.unverified_warning(&path).unwrap();
    assert!(
        warning.contains("old.safetensors") && warning.contains("cannot be verified"),
        "{warning}"
    );
    assert_eq!(ck.values, be.download(&s.params.values).unwrap());
    // The key is the checkpoint's own: callers cannot set it.
    let mut extra = BTreeMap::new();
    extra.insert(checkpoint::KEY_DATA_SHA256.to_string(), "0".to_string());
    let err = checkpoint::save(&be, &s, &extra, &path).unwrap_err();
    assert!(err.to_string().contains("reserved"), "{err}");
}

#[test]
fn invalid_configurations_are_refused() {
    let s = schema();
    let msg = |r: mgkd::Result<ModelConfig>| r.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg(ModelConfig::new(Role::Student, &s, 10, 4, 2, 3)).contains("multiple of heads"));
    assert!(msg(ModelConfig::new(Role::Student, &s, 8, 2, 0, 3)).contains("blocks"));
    assert!(msg(ModelConfig::new(Role::Student, &s, 8, 2, 1, 0)).contains("d_cat"));
    let mut c = ModelConfig::with_defaults(Role::Teacher, &s).unwrap();
    assert_eq!((c.d, c.heads, c.blocks, c.d_cat), (128, 4, 2, 16));
    c.len_limit = 5;
    assert!(c
        .validate()
        .unwrap_err()
        .to_string()
        .contains("len_limit: 6 here, 5 wanted"));
}

#[test]
fn table_naming_order_decay_and_seeded_init() {
    let cfg = ModelConfig::new(Role::Student, &schema(), 8, 2, 2, 3).unwrap();
    let t = ParamTable::new(&cfg);
    let names: Vec<&str> = t.entries().iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names[0], "encoder.embed.cat.0.weight");
    assert_eq!(
        names[2..5],
        [
            "encoder.embed.num.weight",
            "encoder.embed.num.bias",
            "encoder.embed.pos.weight"
        ]
    );
    assert_eq!(names.last(), Some(&"fine.v.bias"));
    assert!(names.contains(&"aux.0.weight") && !names.contains(&"aux.1.weight"));
    let e = t.get("encoder.blocks.1.attn.in_proj.weight").unwrap();
    assert_eq!(e.shape, vec![24, 8]);
    assert_eq!(
        t.get("profile.proj.weight").unwrap().shape,
        vec![8, 3 + 2 * 3]
    );
    for e in t.entries() {
        let linear_weight = e.name.ends_with(".weight")
            && !e.name.contains("embed.cat")
            && !e.name.contains("embed.pos")
            && !e.name.contains("profile.cat")
            && !e.name.contains(".ln");
        assert_eq!(e.decay, linear_weight, "{}", e.name);
    }
    let a = t.init_values::<f64>(7);
    assert_eq!(a, t.init_values::<f64>(7));
    assert_ne!(a, t.init_values::<f64>(8));
    let ln = t.get("encoder.ln_f.weight").unwrap();
    assert!(a[ln.offset..ln.offset + 8].iter().all(|&x| x == 1.0));
    let w = t.get("fuse.weight").unwrap();
    let v = &a[w.offset..w.offset + w.numel()];
    let sd = (v.iter().map(|x| x * x).sum::<f64>() / v.len() as f64).sqrt();
    assert!((sd - 0.02).abs() < 0.004, "init std {sd}");
}

#[test]
fn class_weights_average_one_over_train() {
    let [w0, w1] = class_weights(900, 100, 0.5, true).unwrap();
    assert!(((900.0 * w0 + 100.0 * w1) / 1000.0 - 1.0).abs() < 1e-12);
    // Before normalisation (N/(2N_c))^ρ: ratio w1/w0 = (900/100)^0.5 = 3.
    assert!((w1 / w0 - 3.0).abs() < 1e-12);
    assert_eq!(class_weights(900, 100, 0.5, false).unwrap(), [1.0, 1.0]);
    assert_eq!(class_weights(900, 100, 0.0, true).unwrap(), [1.0, 1.0]);
    assert!(class_weights(0, 0, 0.5, true).is_err());
}

#[test]
fn bad_batches_are_refused_with_the_place() {
    let be = mgkd::backend::cpu::CpuBackend::<f32>::new();
    let s = schema();
    let mut b = batch5(5);
    b.in_service.cat[1] = 3; // field 1 ("channel") has vocabulary 3
    let err = mgkd::model::DeviceBatch::upload(&be, &b, &s)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("in-service") && err.contains("row 0, event 0, field 1 has id 3"),
        "{err}"
    );
    let mut b = batch5(5);
    b.pre.lens[2] = 9;
    let err = mgkd::model::DeviceBatch::upload(&be, &b, &s)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("pre-service") && err.contains("row 2"),
        "{err}"
    );
    let mut b = batch5(5);
    b.profile_num[4] = f32::NAN;
    let err = mgkd::model::DeviceBatch::upload(&be, &b, &s)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("profile numbers") && err.contains("element 4 is NaN"),
        "{err}"
    );
}

#[test]
fn student_step_is_bit_identical_across_thread_counts() {
    use mgkd::loss::{student_objective, LossConfig};
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let (be, t) = model::<f32>(Role::Teacher, 2, 1);
            let (_, mut s) = model::<f32>(Role::Student, 2, 2);
            let db = upload(&be, &batch5(9));
            s.params.zero_grads(&be);
            let cfg = LossConfig::default();
            let l = student_objective(&be, &cfg, [0.8, 1.6], Teacher::live(&t), &mut s, &db, true)
                .unwrap();
            let g = be.download(&s.params.grads).unwrap();
            (
                l.total.to_bits(),
                g.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            )
        })
    };
    assert_eq!(run(1), run(3));
}

#[test]
fn grad_norm_clipping_and_step_count() {
    use mgkd::optim::{clip_factor, grad_norm, AdamWConfig, Optimizer};
    let (be, mut s) = model::<f64>(Role::Student, 1, 3);
    let n = s.params.table.total();
    let g: Vec<f64> = (0..n).map(|i| ((i % 7) as f64 - 3.0) * 0.5).collect();
    s.params.grads = be.upload(&g).unwrap();
    let want = g.iter().map(|x| x * x).sum::<f64>().sqrt();
    let norm = grad_norm(&be, &s.params).unwrap();
    assert!((norm - want).abs() <= 1e-12 * want);
    assert_eq!(clip_factor(0.5, 1.0).unwrap(), 1.0);
    assert_eq!(clip_factor(4.0, 1.0).unwrap(), 0.25);
    assert!(clip_factor(f64::NAN, 1.0).is_err());
    let mut opt = Optimizer::new(AdamWConfig::default());
    let before = be.download(&s.params.values).unwrap();
    let info = opt.step(&be, &mut s.params, 1e-2).unwrap();
    assert_eq!((info.step, info.scale), (1, 1.0 / want));
    // First AdamW step: m̂ = ĝ and √v̂ = |ĝ| for the clipped ĝ = g/‖g‖, so the Adam part is
    // lr·ĝ/(|ĝ| + ε) ≈ lr·sign(g).
    let after = be.download(&s.params.values).unwrap();
    let mask = s.params.table.decay_mask::<f64>();
    for i in 0..n {
        let gs = g[i] / want;
        let adam = 1e-2 * gs / (gs.abs() + 1e-8);
        let want = before[i] - adam - 1e-2 * 0.01 * mask[i] * before[i];
        assert!(
            (after[i] - want).abs() < 1e-12,
            "element {i}: {} vs {want}",
            after[i]
        );
    }
}

/// The flat elements no tensor owns (the gaps that align each tensor to `TENSOR_ALIGN`).
fn gaps(table: &ParamTable) -> Vec<usize> {
    let mut owned = vec![false; table.total()];
    for e in table.entries() {
        owned[e.offset..e.offset + e.numel()].fill(true);
    }
    (0..table.total()).filter(|&i| !owned[i]).collect()
}

#[test]
fn tensors_start_aligned_and_the_gaps_stay_zero_through_training() {
    use mgkd::loss::{student_objective, LossConfig};
    use mgkd::model::params::TENSOR_ALIGN;
    use mgkd::optim::{AdamWConfig, Optimizer};
    // Odd widths everywhere: d 12 (3 heads), d_cat 3, a 1-wide head.
    let cfg = ModelConfig::new(Role::Student, &schema(), 12, 3, 2, 3).unwrap();
    let t = ParamTable::new(&cfg);
    let mut prev: Option<&mgkd::model::params::ParamEntry> = None;
    for e in t.entries() {
        let ln_shift = e.name.ends_with(".bias")
            && (e.name.contains(".ln") || e.name.starts_with("encoder.ln_f"));
        if ln_shift {
            let w = prev.unwrap();
            assert_eq!(
                e.offset,
                w.offset + w.numel(),
                "{} follows its scale",
                e.name
            );
        } else {
            assert_eq!(e.offset % TENSOR_ALIGN, 0, "{} at {}", e.name, e.offset);
        }
        prev = Some(e);
    }
    let count: usize = t.entries().iter().map(|e| e.numel()).sum();
    assert_eq!(t.count(), count);
    let g = gaps(&t);
    assert!(!g.is_empty() && t.total() == count + g.len());
    let (init, mask) = (t.init_values::<f64>(3), t.decay_mask::<f64>());
    assert!(g.iter().all(|&i| init[i] == 0.0 && mask[i] == 0.0));

    // Three optimiser steps of the whole student objective with random
    // parameters: the gaps' gradients, moments and values stay exactly 0.
    let (be, teacher) = model::<f64>(Role::Teacher, 2, 1);
    let (_, mut s) = model::<f64>(Role::Student, 2, 2);
    let g = gaps(&s.params.table);
    assert!(!g.is_empty());
    // The objective's gradient for batch `seed`, into zeroed gradients; returns the loss.
    let objective = |s: &mut mgkd::model::Model<_>, seed: u64| {
        s.params.zero_grads(&be);
        let db = upload(&be, &batch5(seed));
        let t = Teacher::live(&teacher);
        let l = student_objective(&be, &LossConfig::default(), [0.8, 1.6], t, s, &db, true);
        l.unwrap().total
    };
    // No operation reads a gap: with NaN there, the objective and every gradient are finite.
    let clean = be.download(&s.params.values).unwrap();
    let mut poisoned = clean.clone();
    g.iter().for_each(|&i| poisoned[i] = f64::NAN);
    s.params.set_values(&be, &poisoned).unwrap();
    assert!(objective(&mut s, 19).is_finite());
    let grads = be.download(&s.params.grads).unwrap();
    assert!(grads.iter().all(|x| x.is_finite()));
    s.params.set_values(&be, &clean).unwrap();

    let mut opt = Optimizer::new(AdamWConfig::default());
    for step in 0..3 {
        objective(&mut s, 20 + step);
        let grads = be.download(&s.params.grads).unwrap();
        assert!(grads.iter().any(|&x| x != 0.0));
        assert!(
            g.iter().all(|&i| grads[i] == 0.0),
            "step {step}: a gap's gradient"
        );
        opt.step(&be, &mut s.params, 1e-2).unwrap();
        for (what, buf) in [
            ("value", &s.params.values),
            ("first moment", &s.params.m),
            ("second moment", &s.params.v),
        ] {
            let host = be.download(buf).unwrap();
            assert!(
                g.iter().all(|&i| host[i] == 0.0),
                "step {step}: a gap's {what}"
            );
        }
    }
}
