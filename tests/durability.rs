//! Adapters survive anything: kill -9 at random moments of training, a disk that refuses the
//! save, a corrupt file at start, and hostile imports. Real processes.

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::server::{arithmetic_training, metric, Server};
use crate::common::{scratch_dir, unzip, zip_of};

const KEY: &str = "secret";

fn config(dir: &Path, text: &str) -> String {
    let path = dir.join("settings.toml");
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

/// Quick real training on the default model: answers that finish within the budget, and a
/// majority with dissent (so a step applies) on most questions.
const TRAIN: &str = "[engine]\ntrainer_nice = 0\n[adaptation]\nsamples = 6\nmax_tokens = 40\nkl_bound = 100.0\nmin_majority_votes = 2\n";

fn start_default(dir: &Path, settings: &str) -> Server {
    let data = dir.join("adapters");
    Server::start(&[
        "--config",
        &config(dir, settings),
        "--data-dir",
        data.to_str().unwrap(),
        "--admin-api-key",
        KEY,
    ])
}

fn train(server: &Server, adapter: &str) -> Value {
    let (status, r) = server.post("/v1/chat/completions", &arithmetic_training(adapter, 0));
    assert_eq!(status, 200, "{r}");
    r["adaptation"].clone()
}

fn admin(server: &Server, method: &str, path: &str) -> ureq::Request {
    ureq::request(method, &server.url(path)).set("authorization", &format!("Bearer {KEY}"))
}

/// (version, weights file bytes) of an export; `None` if the server died under it.
fn try_export(base: &str, name: &str) -> Option<(u64, Vec<u8>)> {
    let r = ureq::get(&format!("{base}/admin/adapters/{name}/export"))
        .set("authorization", &format!("Bearer {KEY}"))
        .call()
        .ok()?;
    let version = r.header("x-ttrl-adapter-version")?.parse().ok()?;
    let mut zip = Vec::new();
    r.into_reader().read_to_end(&mut zip).ok()?;
    let mut archive = zip::ZipArchive::new(std::io::Cursor::new(zip)).ok()?;
    let mut weights = Vec::new();
    archive
        .by_name("adapter_model.safetensors")
        .ok()?
        .read_to_end(&mut weights)
        .ok()?;
    Some((version, weights))
}

/// One adapted request; the version it was told, or `None` if the server died under it.
fn try_train(base: &str, adapter: &str, i: usize) -> Option<u64> {
    let r = ureq::post(&format!("{base}/v1/chat/completions"))
        .send_json(arithmetic_training(adapter, i))
        .ok()?;
    let r: Value = r.into_json().ok()?;
    r["adaptation"]["adapter_version"].as_u64()
}

#[test]
fn kill_9_at_random_moments_never_loses_a_version_a_client_was_told() {
    let dir = scratch_dir("durable-kill");
    let mut told = 0u64;
    let mut questions = 0..;
    let mut exports: HashMap<u64, Vec<u8>> = HashMap::new();
    // A fixed LCG: the kill moments differ between iterations, not between runs.
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next_delay = || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
        Duration::from_millis(8000 + (state >> 33) % 12000)
    };
    for round in 0..30 {
        let server = start_default(&dir, TRAIN);
        // What the restarted server serves: no older than anything a client was told, and
        // bit for bit what that version was when it was exported.
        if told > 0 {
            let (version, weights) = try_export(&server.base, "crash").unwrap();
            assert!(
                version >= told,
                "round {round}: v{version} after v{told} was told"
            );
            if let Some(seen) = exports.get(&version) {
                assert!(seen == &weights, "round {round}: v{version} changed");
            }
        }
        let delay = next_delay();
        let url = server.base.clone();
        let asked = &mut questions;
        let seen = std::thread::scope(|s| {
            // Trains and exports back to back until the process dies under it.
            let client = s.spawn(|| {
                let mut seen = Vec::new();
                while let Some(version) = try_train(&url, "crash", asked.next().unwrap()) {
                    match try_export(&url, "crash") {
                        Some(export) => seen.push((version, Some(export))),
                        None => {
                            seen.push((version, None));
                            break;
                        }
                    }
                }
                seen
            });
            std::thread::sleep(delay);
            unsafe { libc::kill(server.pid() as i32, libc::SIGKILL) };
            client.join().unwrap()
        });
        drop(server);
        for (version, export) in seen {
            told = told.max(version);
            if let Some((exported_version, weights)) = export {
                exports.entry(exported_version).or_insert(weights);
            }
        }
    }
    // Every round after the first applied step checked the version told before it.
    assert!(
        told >= 1,
        "no step was ever applied, so nothing was checked"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_save_the_disk_refuses_reports_no_new_version_and_serving_goes_on() {
    // The model is cached first: the limited process below cannot write it.
    ttrl_serve::model::assets::default_model().unwrap();
    let dir = scratch_dir("durable-full");
    let data = dir.join("adapters");
    let settings = config(&dir, TRAIN);
    let server = Server::start_with(
        &["--config", &settings, "--data-dir", data.to_str().unwrap()],
        |command| unsafe {
            // Files may not grow past 1 MB (an adapter is ~20 MB): writes fail with EFBIG.
            command.pre_exec(|| {
                libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
                let limit = libc::rlimit {
                    rlim_cur: 1 << 20,
                    rlim_max: 1 << 20,
                };
                if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        },
    );
    let report = train(&server, "full");
    assert_eq!(report["applied"], false, "{report}");
    assert_eq!(report["adapter_version"], 0, "{report}");
    let note = report["note"].as_str().unwrap_or_default();
    assert!(note.contains("could not be saved"), "{report}");
    let (status, r) = server.post(
        "/v1/completions",
        &json!({"prompt": "Hello", "max_tokens": 3}),
    );
    assert_eq!(status, 200, "{r}");
    let _ = std::fs::remove_dir_all(dir);
}

fn tiny(dir: &Path) -> Server {
    Server::tiny(&[
        "--data-dir",
        dir.join("adapters").to_str().unwrap(),
        "--admin-api-key",
        KEY,
    ])
}

#[test]
fn a_corrupt_adapter_is_quarantined_the_others_load_and_it_is_never_overwritten() {
    let dir = scratch_dir("durable-corrupt");
    let server = tiny(&dir);
    for name in ["good", "bad", "good"] {
        admin(&server, "POST", &format!("/admin/adapters/{name}/reset"))
            .call()
            .unwrap();
    }
    server.kill();
    let bad = dir.join("adapters/bad");
    std::fs::write(
        bad.join("v0/adapter_model.safetensors"),
        b"not a tensor file",
    )
    .unwrap();
    let server = tiny(&dir);
    let list: Value = admin(&server, "GET", "/admin/adapters")
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    assert_eq!(list["data"], json!([{"name": "good", "version": 1}]));
    let metrics = server.get_text("/metrics");
    assert_eq!(
        metric(&metrics, "ttrl_adapters_quarantined_total", &[]),
        1.0
    );
    let before: Vec<String> = std::fs::read_dir(&bad)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        before.iter().any(|n| n.starts_with("quarantine-v0-")),
        "{before:?}"
    );
    // Adapting under the name must not build a fresh adapter over it.
    let (status, r) = server.post(
        "/v1/completions",
        &json!({"prompt": "1+1=", "max_tokens": 2,
                "adaptation": {"enabled": true, "adapter": "bad"}}),
    );
    assert!(status >= 400, "{status} {r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not replaced"),
        "{r}"
    );
    let mut after: Vec<String> = std::fs::read_dir(&bad)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    let mut before = before;
    before.sort();
    after.sort();
    assert_eq!(before, after);
    let _ = std::fs::remove_dir_all(dir);
}

fn export_zip(server: &Server, name: &str) -> Vec<u8> {
    let mut zip = Vec::new();
    admin(server, "GET", &format!("/admin/adapters/{name}/export"))
        .call()
        .unwrap()
        .into_reader()
        .read_to_end(&mut zip)
        .unwrap();
    zip
}

fn import(server: &Server, name: &str, body: &[u8]) -> (u16, Value) {
    match admin(server, "POST", &format!("/admin/adapters/{name}/import")).send_bytes(body) {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap()),
        Err(e) => panic!("{e}"),
    }
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

#[test]
fn hostile_imports_get_4xx_and_the_server_keeps_serving() {
    let dir = scratch_dir("durable-imports");
    let server = tiny(&dir);
    admin(&server, "POST", "/admin/adapters/src/reset")
        .call()
        .unwrap();
    // A genuine export to start from.
    let zip = export_zip(&server, "src");
    let (weights, config) = (
        unzip(&zip, "adapter_model.safetensors"),
        unzip(&zip, "adapter_config.json"),
    );
    let config: Value = serde_json::from_slice(&config).unwrap();
    let with_config = |edit: &dyn Fn(&mut Value)| {
        let mut c = config.clone();
        edit(&mut c);
        zip_of(&[
            ("adapter_model.safetensors", weights.clone()),
            ("adapter_config.json", serde_json::to_vec(&c).unwrap()),
        ])
    };
    // The genuine one round-trips bit for bit.
    assert_eq!(import(&server, "copy", &zip).0, 200);
    let copied = unzip(&export_zip(&server, "copy"), "adapter_model.safetensors");
    let tensors = |bytes: &[u8]| {
        candle_core::safetensors::load_buffer(bytes, &candle_core::Device::Cpu).unwrap()
    };
    let (original, roundtrip) = (tensors(&weights), tensors(&copied));
    assert_eq!(original.len(), roundtrip.len());
    for (name, t) in &original {
        let (a, b) = (
            t.flatten_all().unwrap(),
            roundtrip[name].flatten_all().unwrap(),
        );
        assert_eq!(
            a.to_vec1::<f32>().unwrap(),
            b.to_vec1::<f32>().unwrap(),
            "{name}"
        );
    }

    let huge_rank = with_config(&|c| c["r"] = json!(1_000_000));
    let (status, r) = import(&server, "x", &huge_rank);
    assert_eq!(status, 400, "{r}");
    let other_base = with_config(&|c| c["base_model_name_or_path"] = json!("Qwen/Qwen2.5-1.5B"));
    let (status, r) = import(&server, "x", &other_base);
    assert_eq!(status, 400, "{r}");

    let mut tensors =
        candle_core::safetensors::load_buffer(&weights, &candle_core::Device::Cpu).unwrap();
    let first = tensors.keys().next().unwrap().clone();
    let nan = (tensors[&first].ones_like().unwrap() * f64::NAN).unwrap();
    tensors.insert(first, nan);
    let nan_file = dir.join("nan.safetensors");
    candle_core::safetensors::save(&tensors, &nan_file).unwrap();
    let nan_zip = zip_of(&[
        (
            "adapter_model.safetensors",
            std::fs::read(&nan_file).unwrap(),
        ),
        ("adapter_config.json", serde_json::to_vec(&config).unwrap()),
    ]);
    let (status, r) = import(&server, "x", &nan_zip);
    assert_eq!(status, 400, "{r}");

    // A zip bomb: small on the wire, far larger than any adapter of this model unpacked.
    let bomb = zip_of(&[
        ("adapter_model.safetensors", vec![0u8; 512 << 20]),
        ("adapter_config.json", serde_json::to_vec(&config).unwrap()),
    ]);
    assert!(bomb.len() < 4 << 20);
    let (status, r) = import(&server, "x", &bomb);
    assert_eq!(status, 413, "{r}");

    // A 1 GiB body without the key: refused before it is read, memory stays flat.
    let rss_before = rss_bytes(server.pid());
    let unauthenticated =
        ureq::post(&server.url("/admin/adapters/x/import")).send(std::io::repeat(0).take(1 << 30));
    match unauthenticated {
        Err(ureq::Error::Status(code, _)) => assert_eq!(code, 401),
        Err(ureq::Error::Transport(_)) => {} // the server hung up mid-body: also a refusal
        Ok(r) => panic!("accepted: {}", r.status()),
    }
    let grown = rss_bytes(server.pid()).saturating_sub(rss_before);
    assert!(grown < 64 << 20, "RSS grew by {grown} bytes");

    let list: Value = admin(&server, "GET", "/admin/adapters")
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    let names: Vec<&str> = list["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["copy", "src"]);
    let (status, r) = server.post(
        "/v1/completions",
        &json!({"prompt": "Hello", "max_tokens": 3}),
    );
    assert_eq!(status, 200, "{r}");
    let _ = std::fs::remove_dir_all(dir);
}
