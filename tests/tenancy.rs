//! API keys on inference and tenants that own their adapters. Real processes on the tiny model.

use serde_json::{json, Value};

use crate::common::server::Server;

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
