//! API keys on inference and tenants that own their adapters. Real processes on the tiny model.

use serde_json::{json, Value};

use crate::common::server::{metric, Server};
use crate::common::{random_adapter_zip, scratch_dir};

const ACME: &str = "acme-key-0123456789";
const BETA: &str = "beta-key-0123456789";
const READER: &str = "reader-key-0123456789";

fn keys_file() -> String {
    let path = std::env::temp_dir().join(format!("ttrl-keys-{}.toml", std::process::id()));
    std::fs::write(
        &path,
        format!(
            r#"
[[key]]
key = "{ACME}"
tenant = "acme"
rights = ["infer", "adapt", "train"]

[[key]]
key = "{BETA}"
tenant = "beta"
rights = ["infer", "adapt", "train"]

[[key]]
key = "{READER}"
tenant = "acme"
rights = ["infer"]
"#
        ),
    )
    .unwrap();
    path.to_string_lossy().into_owned()
}

fn post(server: &Server, key: Option<&str>, path: &str, body: Value) -> (u16, Value) {
    let mut req = ureq::post(&server.url(path));
    if let Some(key) = key {
        req = req.set("authorization", &format!("Bearer {key}"));
    }
    match req.send_json(body) {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap()),
        Err(e) => panic!("{e}"),
    }
}

fn models(server: &Server, key: &str) -> Vec<String> {
    let r: Value = ureq::get(&server.url("/v1/models"))
        .set("authorization", &format!("Bearer {key}"))
        .call()
        .unwrap()
        .into_json()
        .unwrap();
    r["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn api_keys_gate_inference_and_tenants_only_see_their_own_adapters() {
    let data = std::env::temp_dir().join(format!("ttrl-tenancy-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let keys = keys_file();
    let server = Server::tiny(&[
        "--api-keys-file",
        &keys,
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    let ask = json!({"prompt": "1+1=", "max_tokens": 2});
    // No key, a wrong key: 401 in the OpenAI shape.
    for key in [None, Some("not-a-key-at-all-000")] {
        let (status, r) = post(&server, key, "/v1/completions", ask.clone());
        assert_eq!(status, 401, "{r}");
        assert_eq!(r["error"]["code"], "invalid_api_key", "{r}");
    }
    assert_eq!(
        post(&server, Some(READER), "/v1/completions", ask.clone()).0,
        200
    );
    // Training a named adapter needs the `train` right; adapting at all needs `adapt`.
    let train = json!({"prompt": "1+1=", "max_tokens": 2,
                       "adaptation": {"enabled": true, "adapter": "team"}});
    let (status, r) = post(&server, Some(READER), "/v1/completions", train.clone());
    assert_eq!(status, 403, "{r}");
    let ephemeral = json!({"prompt": "1+1=", "max_tokens": 2, "adaptation": {"enabled": true}});
    assert_eq!(
        post(&server, Some(READER), "/v1/completions", ephemeral).0,
        403
    );
    let (status, r) = post(&server, Some(ACME), "/v1/completions", train.clone());
    assert_eq!(status, 200, "{r}");
    // acme sees and uses its adapter; beta does not see it and gets 404 for it.
    assert_eq!(models(&server, ACME), vec!["tiny-llama", "tiny-llama:team"]);
    assert_eq!(
        models(&server, READER),
        vec!["tiny-llama", "tiny-llama:team"]
    );
    assert_eq!(models(&server, BETA), vec!["tiny-llama"]);
    let use_team = json!({"model": "tiny-llama:team", "prompt": "1+1=", "max_tokens": 2});
    assert_eq!(
        post(&server, Some(READER), "/v1/completions", use_team.clone()).0,
        200
    );
    let (status, r) = post(&server, Some(BETA), "/v1/completions", use_team);
    assert_eq!(status, 404, "{r}");
    assert_eq!(r["error"]["code"], "model_not_found", "{r}");
    // beta training "team" makes its own, separate adapter.
    assert_eq!(post(&server, Some(BETA), "/v1/completions", train).0, 200);
    assert_eq!(models(&server, BETA), vec!["tiny-llama", "tiny-llama:team"]);
    // Health and metrics stay open.
    assert_eq!(
        ureq::get(&server.url("/health")).call().unwrap().status(),
        200
    );
    let _ = std::fs::remove_dir_all(data);
}

#[test]
fn without_keys_a_non_loopback_address_is_refused_unless_allowed() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_ttrl-serve"))
        .args([
            "serve",
            "--host",
            "0.0.0.0",
            "--port",
            "0",
            "--model",
            "random:none",
        ])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--allow-unauthenticated"), "{stderr}");
}

const ADMIN: &str = "admin-key-0123456789";

fn import(server: &Server, name: &str, zip: &[u8]) -> (u16, Value) {
    let req = ureq::post(&server.url(&format!("/admin/adapters/{name}/import")))
        .set("authorization", &format!("Bearer {ADMIN}"));
    match req.send_bytes(zip) {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap()),
        Err(e) => panic!("{e}"),
    }
}

fn greedy(server: &Server, key: &str, model: &str) -> String {
    let ask = json!({"model": model, "prompt": "1+1=", "max_tokens": 8, "temperature": 0.0});
    let (status, r) = post(server, Some(key), "/v1/completions", ask);
    assert_eq!(status, 200, "{r}");
    r["choices"][0]["text"].as_str().unwrap().to_string()
}

fn adapters_metric(server: &Server, state: &str) -> f64 {
    metric(
        &server.get_text("/metrics"),
        "ttrl_adapters",
        &[("state", state)],
    )
}

fn du(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                du(&e.path())
            } else {
                m.len()
            }
        })
        .sum()
}

#[test]
fn caps_bound_adapters_per_tenant_in_all_in_memory_and_on_disk() {
    let dir = scratch_dir("tenancy-caps");
    let data = dir.join("adapters");
    let settings = dir.join("settings.toml");
    let caps =
        "[engine]\nmax_adapters = 3\nmax_adapters_per_tenant = 2\nmax_resident_adapters = 1\n";
    std::fs::write(&settings, caps).unwrap();
    let keys = keys_file();
    let args = [
        "--config",
        settings.to_str().unwrap(),
        "--api-keys-file",
        &keys,
        "--data-dir",
        data.to_str().unwrap(),
        "--admin-api-key",
        ADMIN,
    ];
    let server = Server::tiny(&args);
    let zip = random_adapter_zip(&dir.join("random"));
    let (status, r) = import(&server, "acme@a", &zip);
    assert_eq!(status, 200, "{r}");
    let base = greedy(&server, ACME, "tiny-llama");
    let with_a = greedy(&server, ACME, "tiny-llama:a");
    assert_ne!(with_a, base, "the adapter changes the answer");
    assert_eq!(import(&server, "acme@b", &zip).0, 200);
    // One adapter in memory: `b` pushed `a` to disk; using `a` loads it again, unchanged.
    assert_eq!(adapters_metric(&server, "resident"), 1.0);
    assert_eq!(adapters_metric(&server, "stored"), 1.0);
    assert_eq!(greedy(&server, ACME, "tiny-llama:b"), with_a);
    assert_eq!(greedy(&server, ACME, "tiny-llama:a"), with_a);
    assert_eq!(adapters_metric(&server, "resident"), 1.0);

    // acme has its two; a third is refused, saying which cap.
    let train = |name: &str| {
        json!({"prompt": "1+1=", "max_tokens": 2,
               "adaptation": {"enabled": true, "adapter": name}})
    };
    let (status, r) = post(&server, Some(ACME), "/v1/completions", train("c"));
    assert_eq!(status, 403, "{r}");
    assert_eq!(r["error"]["code"], "max_adapters_per_tenant", "{r}");
    // beta makes the third in all; a fourth is over the server's cap.
    assert_eq!(
        post(&server, Some(BETA), "/v1/completions", train("c")).0,
        200
    );
    let (status, r) = post(&server, Some(BETA), "/v1/completions", train("d"));
    assert_eq!(status, 403, "{r}");
    assert_eq!(r["error"]["code"], "max_adapters", "{r}");
    let (status, r) = import(&server, "beta@d", &zip);
    assert_eq!(status, 403, "{r}");
    // Training an existing adapter is not creating one.
    let (status, r) = post(&server, Some(ACME), "/v1/completions", train("a"));
    assert_eq!(status, 200, "{r}");
    drop(server);

    // A disk cap below what acme's adapters take plus one more version refuses the next.
    let acme_bytes = du(&data.join("acme@a")) + du(&data.join("acme@b"));
    std::fs::write(
        &settings,
        format!("[engine]\nmax_adapter_disk_bytes_per_tenant = {acme_bytes}\n"),
    )
    .unwrap();
    let server = Server::tiny(&args);
    let (status, r) = post(&server, Some(ACME), "/v1/completions", train("a"));
    assert_eq!(status, 403, "{r}");
    assert_eq!(
        r["error"]["code"], "max_adapter_disk_bytes_per_tenant",
        "{r}"
    );
    assert_eq!(greedy(&server, ACME, "tiny-llama:a"), with_a);
    let _ = std::fs::remove_dir_all(dir);
}
