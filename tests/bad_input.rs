use candle_core::{DType, Device};
use ttrl_serve::model::loader;

use crate::common::scratch_copy;

fn truncate(path: &std::path::Path, keep: f64) {
    let bytes = std::fs::read(path).unwrap();
    std::fs::write(path, &bytes[..(bytes.len() as f64 * keep) as usize]).unwrap();
}

#[test]
fn a_truncated_safetensors_file_is_a_clear_error() {
    let dir = scratch_copy("qwen2", "trunc-st");
    truncate(&dir.join("model.safetensors"), 0.6);
    let err = loader::load_hf_dir(&dir, DType::F32, &Device::Cpu)
        .err()
        .expect("must fail");
    let msg = err.to_string();
    assert!(
        msg.contains("model.safetensors") && msg.contains("safetensors"),
        "{msg}"
    );
}

#[test]
fn a_truncated_gguf_file_is_a_clear_error() {
    let dir = scratch_copy("llama", "trunc-gguf");
    truncate(&dir.join("model.gguf"), 0.7);
    let err = loader::load_gguf(&dir.join("model.gguf"), DType::F32, &Device::Cpu)
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("truncated"), "{err}");
    // Cut inside the header too.
    truncate(&dir.join("model.gguf"), 0.01);
    let err = loader::load_gguf(&dir.join("model.gguf"), DType::F32, &Device::Cpu)
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("GGUF"), "{err}");
}

#[test]
fn an_unknown_architecture_is_named_in_the_error() {
    let dir = scratch_copy("llama", "arch");
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    let config = config
        .replace("\"llama\"", "\"mamba\"")
        .replace("LlamaForCausalLM", "MambaForCausalLM");
    std::fs::write(dir.join("config.json"), config).unwrap();
    let err = loader::load_hf_dir(&dir, DType::F32, &Device::Cpu)
        .err()
        .expect("must fail");
    assert!(
        err.to_string().contains("unsupported architecture `mamba`"),
        "{err}"
    );
}

#[test]
fn a_missing_tokenizer_is_named_in_the_error() {
    let dir = scratch_copy("qwen3", "tok");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let err = loader::load_hf_dir(&dir, DType::F32, &Device::Cpu)
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
fn a_weight_of_the_wrong_shape_is_named_in_the_error() {
    let dir = scratch_copy("llama", "shape");
    let config = std::fs::read_to_string(dir.join("config.json")).unwrap();
    std::fs::write(
        dir.join("config.json"),
        config.replace("\"intermediate_size\": 96", "\"intermediate_size\": 100"),
    )
    .unwrap();
    let err = loader::load_hf_dir(&dir, DType::F32, &Device::Cpu)
        .err()
        .expect("must fail");
    assert!(err.to_string().contains("gate_proj.weight"), "{err}");
}
