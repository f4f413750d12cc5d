//! The student's scoring graph as an ONNX model (opset 17): the pre-service sequence
//! encoder with its key-padding mask and the learned empty vector, the profile encoder, the
//! fusion layer and the head of docs/model.md §4.2–§4.5, and nothing of the distillation
//! (no auxiliary head, no coarse or fine projection). docs/deploy.md describes the inputs
//! and outputs for a scorer.
//!
//! The graph reproduces the engine's arithmetic operation by operation: LayerNormalization
//! with ε = 1e-5, the exact GELU `x/2·(1 + erf(x/√2))` built from `Erf`, attention whose
//! masked keys get probability exactly 0 (a row with no key at all gets a zero context, so
//! its attention output is the output bias alone, as in §4.3), and the masked mean that
//! falls back to `encoder.empty` for a row with no pre-service event.
//!
//! The inputs are the *encoded* applicant, as a dataset stores it (§2.2): standardised
//! numbers and categorical ids. The metadata (`metadata_props`) carries what a scorer needs
//! to encode a raw applicant: the schema with every field's vocabulary size and
//! normalisation, and, when given, the value → id maps of `import`'s `vocab.json`.

use std::collections::BTreeMap;

use protobuf::{EnumOrUnknown, Message, MessageField};

use crate::export::pb::onnx::{
    attribute_proto::AttributeType, tensor_proto::DataType, tensor_shape_proto, type_proto,
    AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};
use crate::model::checkpoint::Checkpoint;
use crate::model::config::{ModelConfig, Role};
use crate::model::params::ParamTable;
use crate::{Error, Result};

/// The ONNX operator set the graph uses (LayerNormalization needs 17).
pub const OPSET: i64 = 17;
/// The ONNX IR version that goes with opset 17.
pub const IR_VERSION: i64 = 8;
/// Value of the `mgkd.format` metadata key of an exported model.
pub const FORMAT: &str = "mgkd-student-onnx";
/// Version of the exported graph's interface (inputs, outputs, metadata keys).
pub const FORMAT_VERSION: &str = "1";
/// Input: standardised numeric profile fields, float32 `[batch, F_d]`.
pub const IN_PROFILE_NUM: &str = "profile_num";
/// Input: categorical profile ids, int64 `[batch, F_c]`.
pub const IN_PROFILE_CAT: &str = "profile_cat";
/// Input: categorical ids of the pre-service events, int64 `[batch, seq, E_c]`.
pub const IN_PRE_CAT: &str = "pre_cat";
/// Input: standardised numbers of the pre-service events, float32 `[batch, seq, E_d]`.
pub const IN_PRE_NUM: &str = "pre_num";
/// Input: the number of valid pre-service events of each row, int64 `[batch]`.
pub const IN_PRE_LEN: &str = "pre_len";
/// Output: the probability of default σ(z), float32 `[batch]`.
pub const OUT_PROBABILITY: &str = "probability";
/// Output: the logit z, float32 `[batch]`.
pub const OUT_LOGIT: &str = "logit";
/// ONNX Runtime and the protobuf format refuse a model file of 2 GiB or more.
const MAX_MODEL_BYTES: usize = (1 << 31) - 1;

/// What [`export_student`] produced.
#[derive(Debug, Clone)]
pub struct Exported {
    /// The serialised `ModelProto`.
    pub bytes: Vec<u8>,
    /// Scalars of the scoring graph's weights (every initializer taken from the checkpoint).
    pub graph_params: usize,
    /// Scalars of the checkpoint left out (the student-only loss parameters of §4.6).
    pub left_out_params: usize,
    /// Nodes in the graph.
    pub nodes: usize,
}

/// One input of the exported graph, as the `mgkd.inputs` metadata lists it.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct InputDoc {
    /// Input name.
    pub name: String,
    /// Element type (`float32` or `int64`).
    pub dtype: String,
    /// Shape, with `batch` and `seq` the dynamic dimensions.
    pub shape: Vec<String>,
    /// The fields along the last dimension, in order (empty for `pre_len`).
    pub fields: Vec<String>,
    /// What the input holds.
    pub doc: String,
}

/// The inputs of the graph exported for `cfg`, in graph order. An input whose field count
/// is 0 is left out (`profile_num` without numeric profile fields, and so on).
pub fn input_docs(cfg: &ModelConfig) -> Vec<InputDoc> {
    let s = &cfg.schema;
    let names = |v: Vec<&str>| v.into_iter().map(String::from).collect::<Vec<_>>();
    let mut out = Vec::new();
    if s.f_num() > 0 {
        out.push(InputDoc {
            name: IN_PROFILE_NUM.into(),
            dtype: "float32".into(),
            shape: names(vec!["batch", "F_d"]),
            fields: s.profile_num.iter().map(|f| f.name.clone()).collect(),
            doc: "Numeric profile fields, standardised: (f(raw) - mean) / std with f the signed \
                  log1p(|x|) when the field's log1p is set, identity otherwise (mean, std, \
                  log1p in mgkd.schema profile_num)."
                .into(),
        });
    }
    if s.f_cat() > 0 {
        out.push(InputDoc {
            name: IN_PROFILE_CAT.into(),
            dtype: "int64".into(),
            shape: names(vec!["batch", "F_c"]),
            fields: s.profile_cat.iter().map(|f| f.name.clone()).collect(),
            doc: "Categorical profile ids in 0..vocab-1 (vocab in mgkd.schema profile_cat); \
                  0 means missing or unknown. import's value -> id maps are in mgkd.vocab when \
                  the export was given them."
                .into(),
        });
    }
    if s.e_cat() > 0 {
        out.push(InputDoc {
            name: IN_PRE_CAT.into(),
            dtype: "int64".into(),
            shape: names(vec!["batch", "seq", "E_c"]),
            fields: s.event_cat.iter().map(|f| f.name.clone()).collect(),
            doc: format!(
                "Categorical ids of the pre-service events (vocab in mgkd.schema event_cat). \
                 Row b's events fill slots 0..pre_len[b]-1 in time order, oldest first: the \
                 pre_len[b] most recent events, at most {} (the limit pre_len of mgkd.schema). \
                 Slots from pre_len[b] on are padding, ignored whatever they hold; seq is any \
                 length from max(pre_len) to {}.",
                s.pre_len, s.pre_len
            ),
        });
    }
    if s.e_num() > 0 {
        out.push(InputDoc {
            name: IN_PRE_NUM.into(),
            dtype: "float32".into(),
            shape: names(vec!["batch", "seq", "E_d"]),
            fields: s.event_num.iter().map(|f| f.name.clone()).collect(),
            doc: "Numbers of the pre-service events, standardised as the profile numbers \
                  (mean, std, log1p in mgkd.schema event_num), in the same slots as pre_cat."
                .into(),
        });
    }
    out.push(InputDoc {
        name: IN_PRE_LEN.into(),
        dtype: "int64".into(),
        shape: names(vec!["batch"]),
        fields: Vec::new(),
        doc: format!(
            "Number of valid pre-service events of each row, 0..={} (0: no pre-service \
             event; the model then uses its learned empty-sequence vector).",
            s.pre_len
        ),
    });
    out
}

/// An attribute of a node.
fn attr_int(name: &str, v: i64) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.set_name(name.into());
    a.type_ = Some(EnumOrUnknown::new(AttributeType::INT));
    a.set_i(v);
    a
}

fn attr_ints(name: &str, v: &[i64]) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.set_name(name.into());
    a.type_ = Some(EnumOrUnknown::new(AttributeType::INTS));
    a.ints = v.to_vec();
    a
}

fn attr_float(name: &str, v: f32) -> AttributeProto {
    let mut a = AttributeProto::new();
    a.set_name(name.into());
    a.type_ = Some(EnumOrUnknown::new(AttributeType::FLOAT));
    a.set_f(v);
    a
}

/// A tensor value (`elem` a `DataType`) with dimensions given as sizes or names.
fn value_info(name: &str, elem: DataType, dims: &[&str], doc: &str) -> ValueInfoProto {
    let mut shape = TensorShapeProto::new();
    for d in dims {
        let mut dim = tensor_shape_proto::Dimension::new();
        dim.value = Some(match d.parse::<i64>() {
            Ok(n) => tensor_shape_proto::dimension::Value::DimValue(n),
            Err(_) => tensor_shape_proto::dimension::Value::DimParam((*d).to_string()),
        });
        shape.dim.push(dim);
    }
    let mut tensor = type_proto::Tensor::new();
    tensor.set_elem_type(elem as i32);
    tensor.shape = MessageField::some(shape);
    let mut tp = TypeProto::new();
    tp.value = Some(type_proto::Value::TensorType(tensor));
    let mut v = ValueInfoProto::new();
    v.set_name(name.into());
    v.type_ = MessageField::some(tp);
    if !doc.is_empty() {
        v.set_doc_string(doc.into());
    }
    v
}

/// The graph under construction: nodes in topological order and initializers.
struct Builder<'a> {
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    /// Checkpoint values by parameter name (f32, table order).
    params: BTreeMap<&'a str, (&'a [usize], &'a [f32])>,
    /// Scalars taken from the checkpoint.
    used: usize,
    /// Names of constants already made, by value, so that each is made once.
    consts: BTreeMap<String, String>,
}

impl<'a> Builder<'a> {
    fn new(table: &'a ParamTable, values: &'a [f32]) -> Self {
        let params = table
            .entries()
            .iter()
            .map(|e| {
                (
                    e.name.as_str(),
                    (e.shape.as_slice(), &values[e.offset..e.offset + e.numel()]),
                )
            })
            .collect();
        Builder {
            nodes: Vec::new(),
            inits: Vec::new(),
            params,
            used: 0,
            consts: BTreeMap::new(),
        }
    }

    /// Adds node `op(inputs)` with one output named `out`, and returns `out`.
    fn op(&mut self, op: &str, inputs: &[&str], attrs: Vec<AttributeProto>, out: &str) -> String {
        let mut n = NodeProto::new();
        n.set_op_type(op.into());
        n.set_name(format!("{out}/{op}"));
        n.input = inputs.iter().map(|s| s.to_string()).collect();
        n.output = vec![out.to_string()];
        n.attribute = attrs;
        self.nodes.push(n);
        out.to_string()
    }

    fn init_f32(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        let mut t = TensorProto::new();
        t.set_name(name.into());
        t.set_data_type(DataType::FLOAT as i32);
        t.dims = dims.iter().map(|&d| d as i64).collect();
        t.set_raw_data(data.iter().flat_map(|x| x.to_le_bytes()).collect());
        self.inits.push(t);
        name.to_string()
    }

    fn init_i64(&mut self, name: &str, dims: &[usize], data: &[i64]) -> String {
        let mut t = TensorProto::new();
        t.set_name(name.into());
        t.set_data_type(DataType::INT64 as i32);
        t.dims = dims.iter().map(|&d| d as i64).collect();
        t.set_raw_data(data.iter().flat_map(|x| x.to_le_bytes()).collect());
        self.inits.push(t);
        name.to_string()
    }

    /// A float32 scalar constant (made once per value).
    fn scalar_f32(&mut self, v: f32) -> String {
        let key = format!("f32:{:08x}", v.to_bits());
        if let Some(n) = self.consts.get(&key) {
            return n.clone();
        }
        let name = format!("const.f32.{}", self.consts.len());
        self.init_f32(&name, &[], &[v]);
        self.consts.insert(key, name.clone());
        name
    }

    /// An int64 constant, a scalar (`scalar`) or a 1-D tensor (made once per value).
    fn const_i64(&mut self, v: &[i64], scalar: bool) -> String {
        let key = format!("i64:{scalar}:{v:?}");
        if let Some(n) = self.consts.get(&key) {
            return n.clone();
        }
        let name = format!("const.i64.{}", self.consts.len());
        let dims: Vec<usize> = if scalar { vec![] } else { vec![v.len()] };
        self.init_i64(&name, &dims, v);
        self.consts.insert(key, name.clone());
        name
    }

    /// The checkpoint tensor `name` (shape and values); counted as used.
    fn param(&mut self, name: &str) -> Result<(Vec<usize>, Vec<f32>)> {
        let (shape, values) = self.params.get(name).copied().ok_or_else(|| {
            Error::invalid(format!("the checkpoint has no parameter tensor {name}"))
        })?;
        self.used += values.len();
        Ok((shape.to_vec(), values.to_vec()))
    }

    /// The checkpoint tensor `name` as an initializer of the same name and shape.
    fn param_init(&mut self, name: &str) -> Result<String> {
        let (shape, values) = self.param(name)?;
        Ok(self.init_f32(name, &shape, &values))
    }

    /// `y = x·Wᵀ + b` over the last dimension of `x`, with `{prefix}.weight` (`[out, in]`,
    /// stored transposed as `{prefix}.weight.T`) and `{prefix}.bias`.
    fn linear(&mut self, x: &str, prefix: &str, out: &str) -> Result<String> {
        let (shape, w) = self.param(&format!("{prefix}.weight"))?;
        let [o, i] = shape[..] else {
            return Err(Error::invalid(format!("{prefix}.weight is not a matrix")));
        };
        let mut wt = vec![0f32; o * i];
        for r in 0..o {
            for c in 0..i {
                wt[c * o + r] = w[r * i + c];
            }
        }
        let wt = self.init_f32(&format!("{prefix}.weight.T"), &[i, o], &wt);
        let b = self.param_init(&format!("{prefix}.bias"))?;
        let xw = self.op("MatMul", &[x, &wt], vec![], &format!("{out}.xw"));
        Ok(self.op("Add", &[&xw, &b], vec![], out))
    }

    /// LayerNormalization over the last dimension with `{prefix}.weight`, `{prefix}.bias`
    /// and ε = 1e-5 (docs/model.md §4.1).
    fn layer_norm(&mut self, x: &str, prefix: &str, out: &str) -> Result<String> {
        let g = self.param_init(&format!("{prefix}.weight"))?;
        let b = self.param_init(&format!("{prefix}.bias"))?;
        let attrs = vec![attr_int("axis", -1), attr_float("epsilon", 1e-5)];
        Ok(self.op("LayerNormalization", &[x, &g, &b], attrs, out))
    }

    /// The exact GELU of docs/model.md §4.1, as the CPU reference computes it:
    /// `(x/2)·(1 + erf(x·(1/√2)))`.
    fn gelu(&mut self, x: &str, out: &str) -> String {
        let inv_sqrt2 = self.scalar_f32(std::f32::consts::FRAC_1_SQRT_2);
        let half = self.scalar_f32(0.5);
        let one = self.scalar_f32(1.0);
        let xs = self.op("Mul", &[x, &inv_sqrt2], vec![], &format!("{out}.xs"));
        let e = self.op("Erf", &[&xs], vec![], &format!("{out}.erf"));
        let e1 = self.op("Add", &[&e, &one], vec![], &format!("{out}.1p"));
        let hx = self.op("Mul", &[x, &half], vec![], &format!("{out}.hx"));
        self.op("Mul", &[&hx, &e1], vec![], out)
    }
}

/// The student's scoring graph of `ck` as a serialised ONNX model, with `vocab` (the text
/// of `import`'s `vocab.json`, when known) stored as metadata. Refuses a teacher, a model
/// without event fields or with a pre-service limit of 0, and a model of 2 GiB or more.
pub fn export_student(ck: &Checkpoint, vocab: Option<&str>) -> Result<Exported> {
    let cfg = &ck.config;
    if cfg.role != Role::Student {
        return Err(Error::invalid(
            "only a student can be exported: it is the network that is deployed (it reads \
             application-time data); this checkpoint is a teacher",
        ));
    }
    let s = &cfg.schema;
    if s.e_cat() + s.e_num() == 0 {
        return Err(Error::invalid(
            "export needs at least one pre-service event field (the schema has none)",
        ));
    }
    if cfg.len_limit == 0 {
        return Err(Error::invalid(
            "export needs a pre-service length limit of at least 1 (the schema's pre_len is 0)",
        ));
    }
    let table = ParamTable::new(cfg);
    if ck.values.len() != table.total() {
        return Err(Error::invalid(format!(
            "checkpoint holds {} values, its configuration needs {}",
            ck.values.len(),
            table.total()
        )));
    }
    let mut g = Builder::new(&table, &ck.values);
    let (d, heads) = (cfg.d, cfg.heads);
    let dh = cfg.head_dim();

    // ---- the mask and the positions (docs/model.md §2.3) --------------------------------
    let seq_src = if s.e_cat() > 0 {
        IN_PRE_CAT
    } else {
        IN_PRE_NUM
    };
    let shape = g.op("Shape", &[seq_src], vec![], "seq.shape");
    let i1 = g.const_i64(&[1], true);
    let t_len = g.op(
        "Gather",
        &[&shape, &i1],
        vec![attr_int("axis", 0)],
        "seq.len",
    );
    let (z0, one_i) = (g.const_i64(&[0], true), g.const_i64(&[1], true));
    let slots = g.op("Range", &[&z0, &t_len, &one_i], vec![], "seq.slots");
    let ax0 = g.const_i64(&[0], false);
    let ax1 = g.const_i64(&[1], false);
    let ax2 = g.const_i64(&[2], false);
    let slots_row = g.op("Unsqueeze", &[&slots, &ax0], vec![], "seq.slots_row");
    let len_col = g.op("Unsqueeze", &[IN_PRE_LEN, &ax1], vec![], "seq.len_col");
    // valid[b, t] = t < ℓ_b
    let valid = g.op("Less", &[&slots_row, &len_col], vec![], "seq.valid");
    let valid3 = g.op("Unsqueeze", &[&valid, &ax2], vec![], "seq.valid3");
    // pos[b, t] = ℓ_b − 1 − t (clamped at 0 on padded slots, which are masked anyway)
    let last = g.op("Sub", &[&len_col, &one_i], vec![], "seq.last");
    let back = g.op("Sub", &[&last, &slots_row], vec![], "seq.back");
    let pos_idx = g.op("Max", &[&back, &z0], vec![], "seq.pos_index");

    // ---- event embedding (§4.2) ---------------------------------------------------------
    let mut h: Option<String> = None;
    for k in 0..s.e_cat() {
        let kk = g.const_i64(&[k as i64], true);
        let col = g.op(
            "Gather",
            &[IN_PRE_CAT, &kk],
            vec![attr_int("axis", 2)],
            &format!("embed.cat.{k}.ids_raw"),
        );
        let ids = g.op(
            "Where",
            &[&valid, &col, &z0],
            vec![],
            &format!("embed.cat.{k}.ids"),
        );
        let table = g.param_init(&format!("encoder.embed.cat.{k}.weight"))?;
        let e = g.op(
            "Gather",
            &[&table, &ids],
            vec![attr_int("axis", 0)],
            &format!("embed.cat.{k}"),
        );
        h = Some(match h {
            None => e,
            Some(prev) => g.op("Add", &[&prev, &e], vec![], &format!("embed.sum.{k}")),
        });
    }
    let zero_f = g.scalar_f32(0.0);
    let num_part = if s.e_num() > 0 {
        let x = g.op(
            "Where",
            &[&valid3, IN_PRE_NUM, &zero_f],
            vec![],
            "embed.num.input",
        );
        g.linear(&x, "encoder.embed.num", "embed.num")?
    } else {
        // W_num has no column: the projection is its bias alone.
        g.param("encoder.embed.num.weight")?;
        g.param_init("encoder.embed.num.bias")?
    };
    let h0 = match h {
        Some(prev) => g.op("Add", &[&prev, &num_part], vec![], "embed.events"),
        None => num_part,
    };
    let pos_table = g.param_init("encoder.embed.pos.weight")?;
    let pos = g.op(
        "Gather",
        &[&pos_table, &pos_idx],
        vec![attr_int("axis", 0)],
        "embed.pos",
    );
    let mut h = g.op("Add", &[&h0, &pos], vec![], "embed");

    // ---- the blocks (§4.3) --------------------------------------------------------------
    let ax12 = g.const_i64(&[1, 2], false);
    let keys = g.op("Unsqueeze", &[&valid, &ax12], vec![], "attn.key_mask");
    let neg = g.scalar_f32(-1e30);
    let scale = g.scalar_f32((1.0 / (dh as f64).sqrt()) as f32);
    let qkv_shape = g.const_i64(&[0, 0, 3, heads as i64, dh as i64], false);
    let ctx_shape = g.const_i64(&[0, 0, d as i64], false);
    for l in 0..cfg.blocks {
        let p = format!("encoder.blocks.{l}");
        let a = g.layer_norm(&h, &format!("{p}.ln1"), &format!("b{l}.ln1"))?;
        let qkv = g.linear(&a, &format!("{p}.attn.in_proj"), &format!("b{l}.qkv"))?;
        let qkv5 = g.op(
            "Reshape",
            &[&qkv, &qkv_shape],
            vec![],
            &format!("b{l}.qkv5"),
        );
        // [B, T, 3, H, dh] → [3, B, H, T, dh]
        let qkv_t = g.op(
            "Transpose",
            &[&qkv5],
            vec![attr_ints("perm", &[2, 0, 3, 1, 4])],
            &format!("b{l}.qkv_t"),
        );
        let mut qkv_parts = Vec::new();
        for (j, name) in ["q", "k", "v"].iter().enumerate() {
            let jj = g.const_i64(&[j as i64], true);
            qkv_parts.push(g.op(
                "Gather",
                &[&qkv_t, &jj],
                vec![attr_int("axis", 0)],
                &format!("b{l}.{name}"),
            ));
        }
        let kt = g.op(
            "Transpose",
            &[&qkv_parts[1]],
            vec![attr_ints("perm", &[0, 1, 3, 2])],
            &format!("b{l}.kT"),
        );
        let raw = g.op(
            "MatMul",
            &[&qkv_parts[0], &kt],
            vec![],
            &format!("b{l}.scores_raw"),
        );
        let scores = g.op("Mul", &[&raw, &scale], vec![], &format!("b{l}.scores"));
        let masked = g.op(
            "Where",
            &[&keys, &scores, &neg],
            vec![],
            &format!("b{l}.scores_masked"),
        );
        let soft = g.op(
            "Softmax",
            &[&masked],
            vec![attr_int("axis", -1)],
            &format!("b{l}.softmax"),
        );
        // Masked keys get exactly 0, also in a row with no key at all (§4.3).
        let probs = g.op(
            "Where",
            &[&keys, &soft, &zero_f],
            vec![],
            &format!("b{l}.probs"),
        );
        let ctx = g.op(
            "MatMul",
            &[&probs, &qkv_parts[2]],
            vec![],
            &format!("b{l}.ctx_heads"),
        );
        let ctx_t = g.op(
            "Transpose",
            &[&ctx],
            vec![attr_ints("perm", &[0, 2, 1, 3])],
            &format!("b{l}.ctx_t"),
        );
        let ctx = g.op(
            "Reshape",
            &[&ctx_t, &ctx_shape],
            vec![],
            &format!("b{l}.ctx"),
        );
        let att = g.linear(&ctx, &format!("{p}.attn.out_proj"), &format!("b{l}.attn"))?;
        let u = g.op("Add", &[&h, &att], vec![], &format!("b{l}.u"));
        let a2 = g.layer_norm(&u, &format!("{p}.ln2"), &format!("b{l}.ln2"))?;
        let f1 = g.linear(&a2, &format!("{p}.ffn.fc1"), &format!("b{l}.fc1"))?;
        let f1g = g.gelu(&f1, &format!("b{l}.gelu"));
        let f2 = g.linear(&f1g, &format!("{p}.ffn.fc2"), &format!("b{l}.fc2"))?;
        h = g.op("Add", &[&u, &f2], vec![], &format!("b{l}.out"));
    }

    // ---- final LayerNorm and the masked mean with s_∅ (§4.3) ----------------------------
    let tokens = g.layer_norm(&h, "encoder.ln_f", "tokens")?;
    let kept = g.op("Where", &[&valid3, &tokens, &zero_f], vec![], "pool.kept");
    let sum = g.op(
        "ReduceSum",
        &[&kept, &ax1],
        vec![attr_int("keepdims", 0)],
        "pool.sum",
    );
    let len_f = g.op(
        "Cast",
        &[&len_col],
        vec![attr_int("to", DataType::FLOAT as i64)],
        "pool.len_f",
    );
    let one_f = g.scalar_f32(1.0);
    let denom = g.op("Max", &[&len_f, &one_f], vec![], "pool.denom");
    let mean = g.op("Div", &[&sum, &denom], vec![], "pool.mean");
    let empty_row = g.op("Equal", &[&len_col, &z0], vec![], "pool.is_empty");
    let empty = g.param_init("encoder.empty")?;
    let s_vec = g.op("Where", &[&empty_row, &empty, &mean], vec![], "s");

    // ---- profile encoder (§4.4) ---------------------------------------------------------
    let mut parts: Vec<String> = Vec::new();
    if s.f_num() > 0 {
        parts.push(IN_PROFILE_NUM.to_string());
    }
    for j in 0..s.f_cat() {
        let jj = g.const_i64(&[j as i64], true);
        let ids = g.op(
            "Gather",
            &[IN_PROFILE_CAT, &jj],
            vec![attr_int("axis", 1)],
            &format!("profile.cat.{j}.ids"),
        );
        let table = g.param_init(&format!("profile.cat.{j}.weight"))?;
        parts.push(g.op(
            "Gather",
            &[&table, &ids],
            vec![attr_int("axis", 0)],
            &format!("profile.cat.{j}"),
        ));
    }
    let x = if parts.len() == 1 {
        parts.remove(0)
    } else {
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        g.op("Concat", &refs, vec![attr_int("axis", 1)], "profile.input")
    };
    let pre = g.linear(&x, "profile.proj", "profile.pre")?;
    let p = g.gelu(&pre, "p");

    // ---- fusion and head (§4.5) ---------------------------------------------------------
    let sp = g.op(
        "Concat",
        &[&s_vec, &p],
        vec![attr_int("axis", 1)],
        "fuse.input",
    );
    let fused = g.linear(&sp, "fuse", "fuse.pre")?;
    let hidden = g.gelu(&fused, "H");
    let z = g.linear(&hidden, "head", "head")?;
    let logit = g.op("Squeeze", &[&z, &ax1], vec![], OUT_LOGIT);
    g.op("Sigmoid", &[&logit], vec![], OUT_PROBABILITY);

    // ---- the model ----------------------------------------------------------------------
    let docs = input_docs(cfg);
    let mut graph = GraphProto::new();
    graph.set_name("mgkd_student".into());
    graph.set_doc_string(
        "MGKD student scoring graph (docs/model.md §4.2-§4.5): pre-service sequence encoder, \
         profile encoder, fusion and head. Outputs the probability of default and its logit."
            .into(),
    );
    for doc in &docs {
        let (elem, dims): (DataType, Vec<&str>) = match doc.name.as_str() {
            IN_PRE_LEN => (DataType::INT64, vec!["batch"]),
            IN_PROFILE_NUM => (DataType::FLOAT, vec!["batch", ""]),
            IN_PROFILE_CAT => (DataType::INT64, vec!["batch", ""]),
            IN_PRE_CAT => (DataType::INT64, vec!["batch", "seq", ""]),
            _ => (DataType::FLOAT, vec!["batch", "seq", ""]),
        };
        let width = doc.fields.len().to_string();
        let dims: Vec<&str> = dims
            .into_iter()
            .map(|x| if x.is_empty() { width.as_str() } else { x })
            .collect();
        let text = format!("{} Fields: [{}].", doc.doc, doc.fields.join(", "));
        graph.input.push(value_info(&doc.name, elem, &dims, &text));
    }
    graph.output.push(value_info(
        OUT_PROBABILITY,
        DataType::FLOAT,
        &["batch"],
        "Probability of default, sigma(logit); higher is riskier.",
    ));
    graph.output.push(value_info(
        OUT_LOGIT,
        DataType::FLOAT,
        &["batch"],
        "The logit z of docs/model.md §4.5.",
    ));
    let nodes = g.nodes.len();
    let graph_params = g.used;
    graph.node = std::mem::take(&mut g.nodes);
    graph.initializer = std::mem::take(&mut g.inits);

    let mut model = ModelProto::new();
    model.set_ir_version(IR_VERSION);
    let mut opset = OperatorSetIdProto::new();
    opset.set_domain(String::new());
    opset.set_version(OPSET);
    model.opset_import.push(opset);
    model.set_producer_name("mgkd".into());
    model.set_producer_version(env!("CARGO_PKG_VERSION").into());
    model.set_domain("mgkd".into());
    model.set_model_version(1);
    model.set_doc_string(
        "MGKD credit-default student. Inputs are the encoded applicant (standardised numbers, \
         categorical ids); mgkd.schema and mgkd.vocab say how to encode one. See docs/deploy.md."
            .into(),
    );
    model.graph = MessageField::some(graph);
    for (k, v) in metadata(ck, &docs, vocab)? {
        let mut e = StringStringEntryProto::new();
        e.set_key(k);
        e.set_value(v);
        model.metadata_props.push(e);
    }
    let bytes = model
        .write_to_bytes()
        .map_err(|e| Error::invalid(format!("serialising the ONNX model: {e}")))?;
    if bytes.len() > MAX_MODEL_BYTES {
        return Err(Error::invalid(format!(
            "the ONNX model would take {} bytes; ONNX files are limited to 2 GiB",
            bytes.len()
        )));
    }
    Ok(Exported {
        bytes,
        graph_params,
        left_out_params: table.count() - graph_params,
        nodes,
    })
}

/// The `metadata_props` of the exported model, sorted by key.
fn metadata(
    ck: &Checkpoint,
    docs: &[InputDoc],
    vocab: Option<&str>,
) -> Result<BTreeMap<String, String>> {
    fn json<T: serde::Serialize>(what: &str, v: &T) -> Result<String> {
        serde_json::to_string(v).map_err(|e| Error::invalid(format!("{what} to JSON: {e}")))
    }
    let cfg = &ck.config;
    let mut m = BTreeMap::new();
    m.insert("mgkd.format".to_string(), FORMAT.to_string());
    m.insert(
        "mgkd.format_version".to_string(),
        FORMAT_VERSION.to_string(),
    );
    m.insert("mgkd.schema".to_string(), json("schema", &cfg.schema)?);
    m.insert("mgkd.config".to_string(), json("model config", cfg)?);
    m.insert("mgkd.inputs".to_string(), json("input list", &docs)?);
    m.insert(
        "mgkd.outputs".to_string(),
        format!(
            "{OUT_PROBABILITY}: float32 [batch], probability of default sigma(z); \
             {OUT_LOGIT}: float32 [batch], the logit z"
        ),
    );
    m.insert("mgkd.pre_len".to_string(), cfg.schema.pre_len.to_string());
    if let Some(best) = ck.metadata.get("mgkd.best") {
        m.insert("mgkd.best".to_string(), best.clone());
    }
    if let Some(v) = vocab {
        m.insert("mgkd.vocab".to_string(), v.to_string());
    }
    Ok(m)
}

/// Reads an exported model's `metadata_props` back (for checks and tools).
pub fn read_metadata(bytes: &[u8]) -> Result<BTreeMap<String, String>> {
    let model = ModelProto::parse_from_bytes(bytes)
        .map_err(|e| Error::invalid(format!("not a readable ONNX model: {e}")))?;
    Ok(model
        .metadata_props
        .iter()
        .map(|e| (e.key().to_string(), e.value().to_string()))
        .collect())
}
