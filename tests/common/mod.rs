//! Helpers shared by the integration tests: the committed tiny checkpoints and their
//! reference outputs from HF transformers (made by scripts/make_fixtures.py).

pub mod server;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use ttrl_serve::model::{loader, LoadedModel};

pub const FAMILIES: [&str; 3] = ["llama", "qwen2", "qwen3"];

pub fn fixture_dir(family: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(format!("tiny-{family}"))
}

pub fn load_tiny(family: &str, dtype: DType) -> LoadedModel {
    loader::load_hf_dir(&fixture_dir(family), dtype, &Device::Cpu).expect("tiny checkpoint loads")
}

/// (input ids per sequence, HF logits of shape (batch, seq, vocab)).
pub fn expected(family: &str) -> (Vec<Vec<u32>>, Tensor) {
    let t: HashMap<String, Tensor> = candle_core::safetensors::load(
        fixture_dir(family).join("expected.safetensors"),
        &Device::Cpu,
    )
    .expect("fixture loads");
    let ids = t["input_ids"].to_vec2::<i64>().expect("ids");
    let ids = ids
        .into_iter()
        .map(|row| row.into_iter().map(|x| x as u32).collect())
        .collect();
    (ids, t["logits"].clone())
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// A copy of a fixture in a fresh temp folder, for tests that damage files.
pub fn scratch_copy(family: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ttrl-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(fixture_dir(family)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    dir
}
