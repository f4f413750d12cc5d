//! `mgkd-train export`: the student's scoring graph as ONNX.
//!
//! - The file itself (no Python needed): opset 17, the named inputs with a dynamic batch and
//!   sequence dimension, the two outputs, LayerNormalization and Erf in the graph, none of
//!   the distillation parameters, the schema in the metadata; a teacher, a damaged
//!   checkpoint and a bad `--vocab` are refused with an error, never a panic.
//! - Scored by onnxruntime (`tools/onnx_score.py`, which reads the dataset with numpy and
//!   safetensors, independently of the engine): every probability of the test split of a
//!   trained student matches `mgkd-train predict` within 1e-5, including rows without a
//!   pre-service event and rows at the length limit, with batches padded to their longest
//!   row or to the limit, padding filled with junk, and batches of empty rows only.
//!
//! The interpreter is `$MGKD_PYTHON`, else `python3`. Without numpy, safetensors or
//! onnxruntime the second test prints `skipped: <reason>` and passes, except under `CI`
//! (CI installs them through `.ci/run`), where it fails.

mod skip;
mod train_common;

use std::path::Path;
use std::process::{Command, Output};

use mgkd::export::pb::onnx::{tensor_proto::DataType, tensor_shape_proto, type_proto, ModelProto};
use protobuf::Message;
use train_common::Spec;

/// The largest difference allowed between onnxruntime's and predict's probabilities.
const TOL: f64 = 1e-5;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mgkd-train"))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn ok(args: &[&str]) -> String {
    let o = bin().args(args).output().expect("run mgkd-train");
    assert!(o.status.success(), "{args:?} failed:\n{}", text(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Runs a command that must be refused: non-zero exit, an `error:` line with every needle.
fn refused(args: &[&str], needles: &[&str]) {
    let o = bin().args(args).output().expect("run mgkd-train");
    let t = text(&o);
    assert!(!o.status.success(), "{args:?} should fail:\n{t}");
    assert!(!t.contains("panicked"), "{args:?} panicked:\n{t}");
    assert!(t.contains("error:"), "{args:?}: no error line:\n{t}");
    for n in needles {
        assert!(t.contains(n), "{args:?}: message lacks {n:?}:\n{t}");
    }
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// A labelled tiny dataset (pre-service limit 6; some rows empty, some longer than the
/// limit), a teacher and a student trained on it: (teacher, student) paths.
fn trained(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let data = dir.join("data");
    train_common::write(&data, Spec::labelled(900, 5));
    let t = dir.join("teacher.safetensors");
    let s = dir.join("student.safetensors");
    let widths = [
        "--d", "16", "--heads", "2", "--blocks", "2", "--d-cat", "4", "--batch", "64", "--lr",
        "5e-3", "--epochs", "3", "--device", "cpu",
    ];
    let mut a = vec!["teacher", "--data", p(&data), "--out", p(&t)];
    a.extend(widths);
    ok(&a);
    let mut a = vec![
        "student",
        "--data",
        p(&data),
        "--teacher",
        p(&t),
        "--out",
        p(&s),
    ];
    a.extend(&widths[8..]);
    ok(&a);
    (t, s)
}

fn dims(v: &mgkd::export::pb::onnx::ValueInfoProto) -> (i32, Vec<String>) {
    let Some(type_proto::Value::TensorType(t)) = &v.type_.value else {
        panic!("{} is not a tensor", v.name());
    };
    let d = t
        .shape
        .dim
        .iter()
        .map(|d| match &d.value {
            Some(tensor_shape_proto::dimension::Value::DimValue(n)) => n.to_string(),
            Some(tensor_shape_proto::dimension::Value::DimParam(s)) => s.clone(),
            _ => "?".into(),
        })
        .collect();
    (t.elem_type(), d)
}

#[test]
fn export_writes_the_student_scoring_graph_and_refuses_bad_input() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (teacher, student) = trained(tmp.path());
    let onnx = tmp.path().join("student.onnx");
    let vocab = tmp.path().join("vocab.json");
    std::fs::write(
        &vocab,
        r#"{"profile_cat":[{"name":"region","vocab":5,"ids":{"north":1}}],
            "event_cat":[{"name":"event_type","vocab":6,"ids":{}},
                         {"name":"channel","vocab":4,"ids":{"web":1}}]}"#,
    )
    .expect("write vocab");
    let out = ok(&[
        "export",
        "--model",
        p(&student),
        "--out",
        p(&onnx),
        "--vocab",
        p(&vocab),
    ]);
    assert!(out.contains("opset 17"), "{out}");

    let bytes = std::fs::read(&onnx).expect("read onnx");
    let m = ModelProto::parse_from_bytes(&bytes).expect("a ModelProto");
    assert_eq!(m.ir_version(), 8);
    assert_eq!(m.opset_import.len(), 1);
    assert_eq!(
        (m.opset_import[0].domain(), m.opset_import[0].version()),
        ("", 17)
    );
    let g = m.graph.as_ref().expect("graph");
    let inputs: Vec<(String, i32, Vec<String>)> = g
        .input
        .iter()
        .map(|v| {
            let (e, d) = dims(v);
            (v.name().to_string(), e, d)
        })
        .collect();
    let (f, i) = (DataType::FLOAT as i32, DataType::INT64 as i32);
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(
        inputs,
        vec![
            ("profile_num".into(), f, s(&["batch", "2"])),
            ("profile_cat".into(), i, s(&["batch", "1"])),
            ("pre_cat".into(), i, s(&["batch", "seq", "2"])),
            ("pre_num".into(), f, s(&["batch", "seq", "1"])),
            ("pre_len".into(), i, s(&["batch"])),
        ]
    );
    assert!(g.input.iter().all(|v| !v.doc_string().is_empty()));
    let outputs: Vec<(String, Vec<String>)> = g
        .output
        .iter()
        .map(|v| (v.name().to_string(), dims(v).1))
        .collect();
    assert_eq!(
        outputs,
        vec![
            ("probability".into(), s(&["batch"])),
            ("logit".into(), s(&["batch"]))
        ]
    );
    let ops: std::collections::BTreeSet<&str> = g.node.iter().map(|n| n.op_type()).collect();
    for want in ["LayerNormalization", "Erf", "Softmax", "Sigmoid"] {
        assert!(ops.contains(want), "no {want} node in {ops:?}");
    }
    assert!(!ops.contains("Tanh"), "GELU must be the exact, erf form");
    // Only the scoring graph's tensors: no auxiliary head, no coarse or fine projection.
    for t in &g.initializer {
        for bad in ["aux.", "coarse", "fine."] {
            assert!(
                !t.name().starts_with(bad),
                "distillation tensor {}",
                t.name()
            );
        }
    }
    assert!(g.initializer.iter().any(|t| t.name() == "encoder.empty"));

    let meta: std::collections::BTreeMap<String, String> = m
        .metadata_props
        .iter()
        .map(|e| (e.key().to_string(), e.value().to_string()))
        .collect();
    assert_eq!(meta["mgkd.format"], "mgkd-student-onnx");
    let schema: mgkd::data::Schema = serde_json::from_str(&meta["mgkd.schema"]).expect("schema");
    assert_eq!(schema, train_common::schema());
    let inputs: Vec<mgkd::export::onnx::InputDoc> =
        serde_json::from_str(&meta["mgkd.inputs"]).expect("inputs");
    assert_eq!(inputs[0].fields, ["income", "age"]);
    assert!(meta["mgkd.vocab"].contains("north"));

    // Refusals.
    refused(
        &[
            "export",
            "--model",
            p(&teacher),
            "--out",
            p(&tmp.path().join("t.onnx")),
        ],
        &["teacher.safetensors", "only a student can be exported"],
    );
    let damaged = tmp.path().join("damaged.safetensors");
    let full = std::fs::read(&student).expect("read student");
    std::fs::write(&damaged, &full[..full.len() / 2]).expect("write damaged");
    refused(
        &[
            "export",
            "--model",
            p(&damaged),
            "--out",
            p(&tmp.path().join("d.onnx")),
        ],
        &["damaged.safetensors"],
    );
    std::fs::write(&vocab, "{\"profile_cat\": 3").expect("write bad vocab");
    refused(
        &[
            "export",
            "--model",
            p(&student),
            "--out",
            p(&tmp.path().join("v.onnx")),
            "--vocab",
            p(&vocab),
        ],
        &["vocab.json", "not a valid vocabulary file"],
    );
    std::fs::write(&vocab, r#"{"profile_cat":[],"event_cat":[]}"#).expect("write vocab");
    refused(
        &[
            "export",
            "--model",
            p(&student),
            "--out",
            p(&tmp.path().join("v.onnx")),
            "--vocab",
            p(&vocab),
        ],
        &[
            "vocab.json",
            "not the vocabulary of the student's training data",
        ],
    );
    assert!(!tmp.path().join("v.onnx").exists());
}

fn python() -> String {
    std::env::var("MGKD_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// Why Python cannot run the check, or `None` when it can.
fn python_missing() -> Option<String> {
    let o = Command::new(python())
        .args(["-c", "import numpy, safetensors.numpy, onnxruntime"])
        .output();
    match o {
        Err(e) => Some(format!("cannot run {}: {e}", python())),
        Ok(o) if !o.status.success() => Some(format!(
            "{} lacks numpy, safetensors or onnxruntime: {}",
            python(),
            // The exception's last line (`ModuleNotFoundError: No module named 'numpy'`).
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .last()
                .unwrap_or("")
                .trim()
        )),
        Ok(_) => None,
    }
}

#[test]
fn onnxruntime_scores_match_predict() {
    if let Some(why) = python_missing() {
        skip::skip_unless_ci(&format!(
            "{why}; set MGKD_PYTHON to an interpreter with them"
        ));
        return;
    }
    let tmp = tempfile::tempdir().expect("tempdir");
    let (_, student) = trained(tmp.path());
    let data = tmp.path().join("data");
    let onnx = tmp.path().join("student.onnx");
    ok(&["export", "--model", p(&student), "--out", p(&onnx)]);
    let scores = tmp.path().join("scores.csv");
    ok(&[
        "predict",
        "--data",
        p(&data),
        "--model",
        p(&student),
        "--out",
        p(&scores),
        "--split",
        "test",
        "--device",
        "cpu",
    ]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tools/onnx_score.py");
    let layouts: [&[&str]; 3] = [
        // The whole split in one batch padded to its longest row.
        &["--batch", "4096"],
        // Small batches padded to the limit, padding filled with junk.
        &["--batch", "7", "--pad", "limit", "--junk-padding"],
        // Rows sorted by length: some batches hold only empty rows, others only full ones.
        &["--batch", "16", "--sort-by-length", "--junk-padding"],
    ];
    for extra in layouts {
        let mut args = vec![
            script,
            p(&onnx),
            p(&data),
            "--split",
            "test",
            "--compare",
            p(&scores),
            "--json",
        ];
        args.extend(extra);
        let o = Command::new(python())
            .args(&args)
            .output()
            .expect("run python");
        assert!(
            o.status.success(),
            "onnx_score.py {extra:?} failed:\n{}",
            text(&o)
        );
        let s: serde_json::Value = serde_json::from_slice(&o.stdout).expect("JSON summary");
        let n = s["rows"].as_u64().expect("rows");
        assert_eq!(n, 900 * 3 / 20, "{s}");
        assert!(s["empty_rows"].as_u64().unwrap() >= 5, "{s}");
        assert!(s["rows_at_limit"].as_u64().unwrap() >= 5, "{s}");
        assert_eq!(s["limit"], 6, "{s}");
        assert_eq!(s["over_tol"], 0, "{s}");
        for k in [
            "max_abs_diff",
            "max_abs_diff_empty",
            "max_abs_diff_at_limit",
        ] {
            let d = s[k].as_f64().expect(k);
            assert!(d <= TOL, "{k} = {d} > {TOL} with {extra:?}: {s}");
        }
        eprintln!("onnxruntime vs predict {extra:?}: {s}");
    }
}
