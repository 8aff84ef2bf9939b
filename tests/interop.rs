//! An exported adapter is a PEFT adapter: HF transformers with peft load the export onto the
//! same base model and compute the same logits as this engine.

use candle_core::{DType, Device, Tensor};
use serde_json::Value;
use ttrl_serve::model::{Adapter, LogitsFor, SeqInput};

use crate::common::server::Server;
use crate::common::{fixture_dir, load_tiny, max_abs_diff, random_adapter_zip, scratch_dir, unzip};

const KEY: &str = "interop-admin-key";
const FILES: [&str; 2] = ["adapter_model.safetensors", "adapter_config.json"];

fn rows(value: &Value) -> Tensor {
    let rows: Vec<Vec<f32>> = serde_json::from_value(value.clone()).unwrap();
    let (n, v) = (rows.len(), rows[0].len());
    let flat: Vec<f32> = rows.into_iter().flatten().collect();
    Tensor::from_vec(flat, (n, v), &Device::Cpu).unwrap()
}

#[test]
fn an_exported_adapter_loads_in_peft_with_the_same_logits() {
    let Ok(python) = std::env::var("TTRL_TEST_PYTHON") else {
        panic!("TTRL_TEST_PYTHON must name a python with torch, transformers and peft (scripts/test.sh sets it)");
    };
    let dir = scratch_dir("interop-peft");
    let data = dir.join("adapters");
    let server = Server::tiny(&["--data-dir", data.to_str().unwrap(), "--admin-api-key", KEY]);
    let upload = random_adapter_zip(&dir.join("random"));
    let auth = format!("Bearer {KEY}");
    ureq::post(&server.url("/admin/adapters/team/import"))
        .set("authorization", &auth)
        .send_bytes(&upload)
        .unwrap();
    let mut zip = Vec::new();
    std::io::Read::read_to_end(
        &mut ureq::get(&server.url("/admin/adapters/team/export"))
            .set("authorization", &auth)
            .call()
            .unwrap()
            .into_reader(),
        &mut zip,
    )
    .unwrap();
    drop(server);
    let exported = dir.join("exported");
    std::fs::create_dir_all(&exported).unwrap();
    for file in FILES {
        std::fs::write(exported.join(file), unzip(&zip, file)).unwrap();
    }

    let loaded = load_tiny("llama", DType::F32);
    let model = &loaded.model;
    let adapter =
        Adapter::load("team", &exported, model.config(), DType::F32, &Device::Cpu).unwrap();
    let ids: Vec<u32> = vec![0, 17, 42, 99, 3, 250, 7, 128];
    let ours = model
        .forward(&mut [SeqInput::new(&ids)], Some(&adapter), LogitsFor::All)
        .unwrap();

    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/interop/peft_logits.py");
    let out = std::process::Command::new(python)
        .args([
            script,
            fixture_dir("llama").to_str().unwrap(),
            exported.to_str().unwrap(),
            &serde_json::to_string(&ids).unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (peft, base) = (rows(&theirs["lora"]), rows(&theirs["base"]));
    let same = max_abs_diff(&ours, &peft);
    let effect = max_abs_diff(&ours, &base);
    println!("max |ours - peft| = {same:.2e}; the adapter moves logits by up to {effect:.3}");
    assert!(
        effect > 1e-2,
        "the adapter must matter for the check to mean anything"
    );
    assert!(same < 1e-4, "logits differ from peft's by {same}");
    let _ = std::fs::remove_dir_all(dir);
}
