//! Helpers shared by the integration tests: the committed tiny checkpoints and their
//! reference outputs from HF transformers (made by scripts/make_fixtures.py).

pub mod server;

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use ttrl_serve::model::{loader, Adapter, LoadedModel, LoraConfig, Model};

pub const FAMILIES: [&str; 3] = ["llama", "qwen2", "qwen3"];

/// `$TTRL_FIXTURES_DIR` (for a test binary run away from its checkout, as on a GPU
/// machine), else the checkout's tests/fixtures.
pub fn fixture_dir(family: &str) -> PathBuf {
    std::env::var_os("TTRL_FIXTURES_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures"))
        .join(format!("tiny-{family}"))
}

/// `$TTRL_TEST_DEVICE` (`cpu` or `cuda:N`, for scripts/device-check.sh), default cpu.
pub fn test_device() -> Device {
    match std::env::var("TTRL_TEST_DEVICE").as_deref() {
        Err(_) | Ok("cpu") => Device::Cpu,
        Ok(spec) => {
            let ordinal = spec
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .unwrap_or_else(|| panic!("TTRL_TEST_DEVICE={spec}: use cpu or cuda:N"));
            Device::new_cuda(ordinal).expect("the CUDA device opens")
        }
    }
}

/// The half precision the test device serves in: bf16 on a GPU; f16 on the CPU, whose
/// matmul has no bf16 kernel (same 16-bit path, more mantissa).
pub fn half_dtype() -> DType {
    if test_device().is_cuda() {
        DType::BF16
    } else {
        DType::F16
    }
}

/// A tiny checkpoint on the test device.
pub fn load_tiny(family: &str, dtype: DType) -> LoadedModel {
    load_tiny_on(family, dtype, &test_device())
}

pub fn load_tiny_on(family: &str, dtype: DType, device: &Device) -> LoadedModel {
    loader::load_hf_dir(&fixture_dir(family), dtype, device).expect("tiny checkpoint loads")
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

/// Across devices and dtypes (both are brought to f64 on the CPU).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let host = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    (host(a) - host(b))
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

/// A fresh adapter has B = 0 (so A gets no gradient); give every tensor values from N(0, 0.01),
/// drawn by a generator seeded with `seed`: a test meets the same adapter on every run (with
/// fresh draws, about one run in a hundred fell outside a gradient test's bounds).
pub fn randomized_adapter(model: &Model, dtype: DType, seed: u64) -> Adapter {
    use rand::{rngs::StdRng, Rng, SeedableRng};
    let adapter = Adapter::new(
        "t",
        LoraConfig {
            rank: 4,
            ..Default::default()
        },
        model.config(),
        dtype,
        model.device(),
        1,
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    // Box-Muller: two uniform draws, one normal one.
    let mut normal = move || {
        let (u, v): (f64, f64) = (rng.random(), rng.random());
        ((-2.0 * (1.0 - u).ln()).sqrt() * (std::f64::consts::TAU * v).cos()) as f32
    };
    let mut named: Vec<(String, Tensor)> = adapter.named_tensors().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let values: HashMap<String, Tensor> = named
        .into_iter()
        .map(|(k, t)| {
            let v: Vec<f32> = (0..t.elem_count()).map(|_| 0.1 * normal()).collect();
            let t = Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap();
            (k, t.to_dtype(dtype).unwrap())
        })
        .collect();
    adapter.set_tensors(&values).unwrap();
    adapter
}

/// A fresh, empty folder for one test of this process (data folders, settings files), so no
/// test touches a user's data.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ttrl-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A deflated zip of `(name, bytes)` files, as an adapter import takes.
pub fn zip_of(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
    use std::io::Write;
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    for (name, bytes) in files {
        zip.start_file(*name, options).unwrap();
        zip.write_all(bytes).unwrap();
    }
    zip.finish().unwrap().into_inner()
}

/// One file of a zip.
pub fn unzip(zip: &[u8], file: &str) -> Vec<u8> {
    use std::io::Read;
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(zip)).unwrap();
    let mut bytes = Vec::new();
    archive
        .by_name(file)
        .unwrap()
        .read_to_end(&mut bytes)
        .unwrap();
    bytes
}

/// A PEFT zip of random LoRA weights for the tiny llama (written out in `dir` first): answers
/// with it differ from the base model's.
pub fn random_adapter_zip(dir: &std::path::Path) -> Vec<u8> {
    let loaded = load_tiny("llama", DType::F32);
    let adapter = randomized_adapter(&loaded.model, DType::F32, 0);
    adapter.write_files(dir, None, &[]).unwrap();
    let file = |name: &'static str| (name, std::fs::read(dir.join(name)).unwrap());
    zip_of(&[
        file("adapter_model.safetensors"),
        file("adapter_config.json"),
    ])
}
