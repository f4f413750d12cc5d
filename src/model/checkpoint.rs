//! Model checkpoints as safetensors files: one F32 tensor per named parameter (table
//! order), metadata `mgkd.format = "mgkd-checkpoint"`, `mgkd.version = "1"`,
//! `mgkd.config` = the [`ModelConfig`] as JSON, `mgkd.data_sha256` = the SHA-256 of the
//! tensor data (every byte after the header), plus free keys that callers add (training
//! configuration, …). Written atomically (temp file, then rename). [`read`] verifies the
//! checksum, so a corrupted weight (a flipped bit, a value scaled by 1e30) is refused naming
//! the file; a checkpoint written before the checksum existed is read with
//! [`Checkpoint::verified`] false, and the commands print a warning for it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::backend::{Backend, Float};
use crate::data::writer::{sha256_hex, write_atomic};
use crate::model::config::ModelConfig;
use crate::model::net::Model;
use crate::model::params::{ParamStore, ParamTable};
use crate::{Error, Result};

/// Value of the `mgkd.format` metadata key.
pub const FORMAT: &str = "mgkd-checkpoint";
/// Value of the `mgkd.version` metadata key.
pub const VERSION: &str = "1";
/// Metadata key of the format tag.
pub const KEY_FORMAT: &str = "mgkd.format";
/// Metadata key of the format version.
pub const KEY_VERSION: &str = "mgkd.version";
/// Metadata key of the model configuration JSON.
pub const KEY_CONFIG: &str = "mgkd.config";
/// Metadata key of the SHA-256 (lower-case hex) of the tensor data: every byte after the
/// header.
pub const KEY_DATA_SHA256: &str = "mgkd.data_sha256";

/// Writes `model`'s parameters (converted to f32) and `extra` metadata keys to `path`.
/// Keys of `extra` must not be `mgkd.format`/`mgkd.version`/`mgkd.config`/`mgkd.data_sha256`.
pub fn save<B: Backend>(
    be: &B,
    model: &Model<B>,
    extra: &BTreeMap<String, String>,
    path: &Path,
) -> Result<()> {
    let values = be.download(&model.params.values)?;
    let table = &model.params.table;
    let bytes: Vec<Vec<u8>> = table
        .entries()
        .iter()
        .map(|e| {
            let v: Vec<f32> = values[e.offset..e.offset + e.numel()]
                .iter()
                .map(|x| x.to_f64() as f32)
                .collect();
            bytemuck::cast_slice::<f32, u8>(&v).to_vec()
        })
        .collect();
    let mut tensors = Vec::with_capacity(bytes.len());
    for (e, b) in table.entries().iter().zip(&bytes) {
        let view = TensorView::new(Dtype::F32, e.shape.clone(), b)
            .map_err(|err| Error::format(path, format!("tensor {}: {err}", e.name)))?;
        tensors.push((e.name.as_str(), view));
    }
    let mut meta: HashMap<String, String> = HashMap::new();
    for (k, v) in extra {
        if [KEY_FORMAT, KEY_VERSION, KEY_CONFIG, KEY_DATA_SHA256].contains(&k.as_str()) {
            return Err(Error::invalid(format!(
                "checkpoint metadata key {k} is reserved"
            )));
        }
        meta.insert(k.clone(), v.clone());
    }
    meta.insert(KEY_FORMAT.into(), FORMAT.into());
    meta.insert(KEY_VERSION.into(), VERSION.into());
    let config = serde_json::to_string(&model.config)
        .map_err(|e| Error::invalid(format!("model config to JSON: {e}")))?;
    meta.insert(KEY_CONFIG.into(), config);
    let out = safetensors::tensor::serialize(tensors, &Some(meta))
        .map_err(|e| Error::format(path, format!("serialising the checkpoint: {e}")))?;
    let out = canonical_header(&out, true)
        .ok_or_else(|| Error::format(path, "serialising the checkpoint: unreadable header"))?;
    write_atomic(path, &out)
}

/// Rewrites a serialised safetensors file with its JSON header in a canonical form (keys,
/// metadata keys included, in sorted order; padded with spaces to 8 bytes). `safetensors`
/// writes the metadata from a `HashMap`, whose order changes from process to process, so
/// without this the same model would not always give the same bytes. With `checksum`, the
/// metadata gains [`KEY_DATA_SHA256`] of the tensor data. `None` when the header cannot be
/// read back.
pub(crate) fn canonical_header(bytes: &[u8], checksum: bool) -> Option<Vec<u8>> {
    let n = usize::try_from(u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?)).ok()?;
    let end = n.checked_add(8)?;
    let mut header: BTreeMap<String, serde_json::Value> =
        serde_json::from_slice(bytes.get(8..end)?).ok()?;
    let mut sorted: BTreeMap<String, String> = match header.remove("__metadata__") {
        Some(meta) => serde_json::from_value(meta).ok()?,
        None => BTreeMap::new(),
    };
    if checksum {
        sorted.insert(KEY_DATA_SHA256.into(), sha256_hex(bytes.get(end..)?));
    }
    if !sorted.is_empty() {
        header.insert("__metadata__".into(), serde_json::to_value(sorted).ok()?);
    }
    let mut json = serde_json::to_vec(&header).ok()?;
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut out = Vec::with_capacity(8 + json.len() + bytes.len() - end);
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    out.extend_from_slice(&json);
    out.extend_from_slice(&bytes[end..]);
    Some(out)
}

/// Checks the tensor data of the safetensors file `bytes` (read from `path`, header of
/// `header_len` bytes) against the [`KEY_DATA_SHA256`] of its `metadata`: `Ok(true)` when
/// they match, `Ok(false)` when there is no checksum, an error naming the file when they
/// differ.
pub(crate) fn verify_data(
    path: &Path,
    bytes: &[u8],
    header_len: usize,
    metadata: &BTreeMap<String, String>,
) -> Result<bool> {
    match metadata.get(KEY_DATA_SHA256) {
        None => Ok(false),
        Some(want) => {
            let data = header_len
                .checked_add(8)
                .and_then(|start| bytes.get(start..))
                .unwrap_or_default();
            let found = sha256_hex(data);
            if &found != want {
                return Err(Error::format(
                    path,
                    format!(
                        "the tensor data do not match their checksum ({KEY_DATA_SHA256} \
                         {want}, the data hash to {found}): the file is corrupted; restore \
                         it or train it again"
                    ),
                ));
            }
            Ok(true)
        }
    }
}

/// A checkpoint read from disk: its configuration, parameter values (f32, in the flat layout) and
/// every metadata key.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The model configuration.
    pub config: ModelConfig,
    /// The values laid out as the flat buffers of `ParamTable::new(&config)` (its alignment
    /// gaps zero).
    pub values: Vec<f32>,
    /// All metadata keys, the `mgkd.*` ones included.
    pub metadata: BTreeMap<String, String>,
    /// Whether the tensor data were checked against [`KEY_DATA_SHA256`]; false only for a
    /// checkpoint written before the checksum existed (a mismatch is an error).
    pub verified: bool,
}

fn parse_meta(
    path: &Path,
    st_meta: &Option<HashMap<String, String>>,
) -> Result<BTreeMap<String, String>> {
    let meta: BTreeMap<String, String> = st_meta
        .as_ref()
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    let get = |k: &str| {
        meta.get(k).ok_or_else(|| {
            Error::format(path, format!("not an mgkd checkpoint: no metadata key {k}"))
        })
    };
    if get(KEY_FORMAT)? != FORMAT {
        return Err(Error::format(
            path,
            format!(
                "{KEY_FORMAT} is {:?}, expected {FORMAT:?}",
                meta[KEY_FORMAT]
            ),
        ));
    }
    if get(KEY_VERSION)? != VERSION {
        return Err(Error::format(
            path,
            format!(
                "checkpoint version {:?} is not supported (this build reads {VERSION:?})",
                meta[KEY_VERSION]
            ),
        ));
    }
    get(KEY_CONFIG)?;
    Ok(meta)
}

fn parse_config(path: &Path, meta: &BTreeMap<String, String>) -> Result<ModelConfig> {
    let json = meta.get(KEY_CONFIG).map(String::as_str).unwrap_or("");
    let cfg: ModelConfig = serde_json::from_str(json)
        .map_err(|e| Error::format(path, format!("{KEY_CONFIG}: {e}")))?;
    cfg.validate()
        .map_err(|e| Error::format(path, format!("{KEY_CONFIG}: {e}")))?;
    Ok(cfg)
}

/// Reads only the configuration of the checkpoint at `path` (header and metadata).
pub fn read_config(path: &Path) -> Result<ModelConfig> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (_, m) = SafeTensors::read_metadata(&bytes).map_err(|e| {
        Error::format(
            path,
            format!("not a readable safetensors file (truncated or damaged): {e}"),
        )
    })?;
    let meta = parse_meta(path, m.metadata())?;
    parse_config(path, &meta)
}

/// Reads and checks the checkpoint at `path`: format and version metadata, the tensor data
/// against [`KEY_DATA_SHA256`] (when present), a valid configuration, and exactly the
/// tensors of its parameter table, each F32 with the right shape (errors name the file and
/// the tensor).
pub fn read(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let (header_len, m) = SafeTensors::read_metadata(&bytes).map_err(|e| {
        Error::format(
            path,
            format!("not a readable safetensors file (truncated or damaged): {e}"),
        )
    })?;
    let metadata = parse_meta(path, m.metadata())?;
    let verified = verify_data(path, &bytes, header_len, &metadata)?;
    let config = parse_config(path, &metadata)?;
    let st = SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::format(path, format!("truncated or damaged safetensors file: {e}")))?;
    let table = ParamTable::new(&config);
    // Laid out by the table: the gaps that align each tensor stay zero.
    let mut values = vec![0f32; table.total()];
    for e in table.entries() {
        let t = st
            .tensor(&e.name)
            .map_err(|_| Error::format(path, format!("tensor {} is missing", e.name)))?;
        if t.dtype() != Dtype::F32 {
            return Err(Error::format(
                path,
                format!("tensor {}: dtype {:?}, expected F32", e.name, t.dtype()),
            ));
        }
        if t.shape() != e.shape.as_slice() {
            return Err(Error::format(
                path,
                format!(
                    "tensor {}: shape {:?}, expected {:?}",
                    e.name,
                    t.shape(),
                    e.shape
                ),
            ));
        }
        let window = &mut values[e.offset..e.offset + e.numel()];
        for (x, c) in window.iter_mut().zip(t.data().chunks_exact(4)) {
            *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        }
        if let Some(i) = window.iter().position(|x| !x.is_finite()) {
            return Err(Error::format(
                path,
                format!("tensor {}: element {i} is not finite", e.name),
            ));
        }
    }
    if st.len() != table.entries().len() {
        let mut extra: Vec<String> = st
            .names()
            .into_iter()
            .filter(|n| table.get(n).is_err())
            .cloned()
            .collect();
        extra.sort();
        return Err(Error::format(
            path,
            format!(
                "unexpected tensors for this configuration: {}",
                extra.join(", ")
            ),
        ));
    }
    Ok(Checkpoint {
        config,
        values,
        metadata,
        verified,
    })
}

/// Checks that the checkpoint at `path` holds a model of configuration `wanted`; otherwise
/// an error naming the file and every field that differs.
pub fn check_config(path: &Path, wanted: &ModelConfig) -> Result<()> {
    let found = read_config(path)?;
    let diff = found.diff(wanted);
    if diff.is_empty() {
        Ok(())
    } else {
        Err(Error::format(
            path,
            format!("checkpoint of another configuration: {}", diff.join("; ")),
        ))
    }
}

impl Checkpoint {
    /// The warning the commands print for a checkpoint without a checksum, or `None`.
    pub fn unverified_warning(&self, path: &Path) -> Option<String> {
        (!self.verified).then(|| {
            format!(
                "warning: {}: no {KEY_DATA_SHA256} (written before checkpoints carried a \
                 checksum): its tensor data cannot be verified (checkpoints written by this \
                 version carry one)",
                path.display()
            )
        })
    }

    /// The model on backend `be` (values converted to its element type).
    pub fn into_model<B: Backend>(self, be: &B) -> Result<Model<B>> {
        let table = ParamTable::new(&self.config);
        let values: Vec<B::F> = self
            .values
            .iter()
            .map(|&x| <B::F as Float>::from_f64(x as f64))
            .collect();
        let store = ParamStore::from_values(be, table, &values)?;
        Model::with_params(self.config, store)
    }
}

/// Loads the checkpoint at `path` as a model on `be`, refusing it (with the differences)
/// when `wanted` is given and the checkpoint's configuration is another.
pub fn load<B: Backend>(be: &B, path: &Path, wanted: Option<&ModelConfig>) -> Result<Model<B>> {
    if let Some(w) = wanted {
        check_config(path, w)?;
    }
    read(path)?.into_model(be)
}
