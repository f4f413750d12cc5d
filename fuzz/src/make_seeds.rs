//! Writes seed inputs for the fuzz targets into `corpus/<target>/valid`: a valid shard
//! prefixed by its three count bytes (`shard_reader`), its manifest (`manifest`), the CSV
//! fixture of `tests/fixtures/import` as users ‖ 0xFF ‖ events (`import_csv`), the import
//! config (`import_config`) and a small model's checkpoint (`checkpoint`). Run from `fuzz/`.

use std::collections::BTreeMap;

use mgkd::backend::cpu::CpuBackend;
use mgkd::data::{DatasetWriter, RowData, WriterOptions};
use mgkd::model::{checkpoint, Model, ModelConfig, Role};
use mgkd_fuzz::{import_config_text, schema};

fn main() -> mgkd::Result<()> {
    let dir = std::env::temp_dir().join(format!("mgkd-fuzz-seed-{}", std::process::id()));
    let mut w = DatasetWriter::create(
        &dir,
        schema(),
        WriterOptions {
            has_user_id: true,
            ..Default::default()
        },
    )?;
    let ids = ["a", "bé", "c3"];
    for (i, id) in ids.iter().enumerate() {
        let n_pre = i + 1;
        let n_in = 2 - i;
        let cat: Vec<u32> = (0..2 * n_pre.max(n_in) as u32).map(|k| k % 5 + 1).collect();
        let num: Vec<f32> = (0..2 * n_pre.max(n_in))
            .map(|k| k as f32 * 0.5 - 1.0)
            .collect();
        w.push(&RowData {
            label: Some((i % 2) as u8),
            split: 0,
            user_id: Some(id),
            profile_num: &[0.25, -1.5],
            profile_cat: &[1, 6],
            pre_cat: &cat[..2 * n_pre],
            pre_num: &num[..2 * n_pre],
            in_cat: &cat[..2 * n_in],
            in_num: &num[..2 * n_in],
        })?;
    }
    let m = w.finish()?;
    let info = &m.shards[0];
    let shard = std::fs::read(dir.join(&info.file)).map_err(|e| mgkd::Error::io(&dir, e))?;
    let mut seed = vec![info.rows as u8, info.pre_events as u8, info.in_events as u8];
    seed.extend_from_slice(&shard);
    let text = std::fs::read(dir.join("dataset.json")).map_err(|e| mgkd::Error::io(&dir, e))?;
    let fixture = std::path::Path::new("../tests/fixtures/import");
    let read = |name: &str| {
        let p = fixture.join(name);
        std::fs::read(&p).map_err(|e| mgkd::Error::io(&p, e))
    };
    let mut csv = read("users.csv")?;
    csv.push(0xFF);
    csv.extend(read("events.csv")?);
    let be = CpuBackend::<f32>::new();
    let cfg = ModelConfig::new(Role::Student, &schema(), 8, 2, 1, 4)?;
    let model = Model::new(&be, cfg, 1)?;
    let ck_path = dir.join("model.safetensors");
    checkpoint::save(&be, &model, &BTreeMap::new(), &ck_path)?;
    let ck = std::fs::read(&ck_path).map_err(|e| mgkd::Error::io(&ck_path, e))?;
    let config = import_config_text().as_bytes().to_vec();
    for (target, bytes) in [
        ("shard_reader", seed),
        ("manifest", text),
        ("import_csv", csv),
        ("import_config", config),
        ("checkpoint", ck),
    ] {
        let out = std::path::Path::new("corpus").join(target);
        std::fs::create_dir_all(&out).map_err(|e| mgkd::Error::io(&out, e))?;
        std::fs::write(out.join("valid"), bytes).map_err(|e| mgkd::Error::io(&out, e))?;
    }
    std::fs::remove_dir_all(&dir).map_err(|e| mgkd::Error::io(&dir, e))?;
    println!("seeds written to corpus/");
    Ok(())
}
