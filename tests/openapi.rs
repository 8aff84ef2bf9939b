use serde_json::{json, Value};

use crate::common::scratch_dir;
use crate::common::server::Server;

/// The document the server serves, generated from its handlers and wire types.
fn doc() -> Value {
    serde_json::to_value(ttrl_serve::server::openapi()).expect("the OpenAPI document is JSON")
}

/// Checks `value` against `schema` (types, required fields, properties, items, $ref,
/// allOf, oneOf): enough of JSON Schema to hold the document to what the server sends.
fn check(doc: &Value, schema: &Value, value: &Value, path: &str) -> Result<(), String> {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.trim_start_matches("#/components/schemas/");
        return check(doc, &doc["components"]["schemas"][name], value, path);
    }
    if let Some(all) = schema["allOf"].as_array() {
        return all.iter().try_for_each(|s| check(doc, s, value, path));
    }
    if let Some(any) = schema["oneOf"].as_array().or(schema["anyOf"].as_array()) {
        return if any.iter().any(|s| check(doc, s, value, path).is_ok()) {
            Ok(())
        } else {
            Err(format!("{path}: matches no oneOf branch: {value}"))
        };
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    let type_ok = |t: &str| match t {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        "null" => value.is_null(),
        _ => false,
    };
    if !types.is_empty() && !types.iter().any(|t| type_ok(t)) {
        return Err(format!("{path}: expected {types:?}, got {value}"));
    }
    if let Some(obj) = value.as_object() {
        for req in schema["required"].as_array().into_iter().flatten() {
            let key = req.as_str().unwrap();
            if !obj.contains_key(key) {
                return Err(format!("{path}: missing required `{key}`"));
            }
        }
        if let Some(props) = schema["properties"].as_object() {
            for (k, v) in obj {
                if let Some(s) = props.get(k) {
                    check(doc, s, v, &format!("{path}.{k}"))?;
                }
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), value.as_array()) {
        for (i, v) in arr.iter().enumerate() {
            check(doc, items, v, &format!("{path}[{i}]"))?;
        }
    }
    Ok(())
}

#[test]
fn every_documented_operation_is_routed_and_served_as_documented() {
    let doc = doc();
    let server = Server::tiny(&["--admin-api-key", "k"]);
    let paths = doc["paths"].as_object().unwrap();
    assert!(paths.len() >= 17, "{:?}", paths.keys());
    for (path, ops) in paths {
        let url = server.url(&path.replace("{name}", "nobody"));
        for (method, op) in ops.as_object().unwrap() {
            let request = ureq::request(&method.to_uppercase(), &url)
                .set("authorization", "Bearer k")
                .set("content-type", "application/json");
            let response = match request.send_string("{}") {
                Ok(r) => r,
                Err(ureq::Error::Status(_, r)) => r,
                Err(e) => panic!("{method} {path}: {e}"),
            };
            let status = response.status();
            let body = response.into_string().unwrap();
            assert!(
                !body.contains("No route for") && status != 405,
                "{method} {path} is documented but not routed: {status} {body}"
            );
            assert!(
                op["responses"].get(status.to_string()).is_some(),
                "{method} {path} answered {status}, which it does not document: {body}"
            );
        }
    }
    // A route that is not documented is not served either.
    let (status, body) = server.post("/v1/embeddings", &json!({}));
    assert_eq!(status, 404, "{body}");
}

#[test]
fn real_responses_match_the_documented_schemas() {
    let doc = doc();
    let schema = |name: &str| json!({"$ref": format!("#/components/schemas/{name}")});
    let config = std::env::temp_dir().join(format!("ttrl-openapi-{}.toml", std::process::id()));
    std::fs::write(&config, "[adaptation]\nmax_tokens = 8\n").unwrap();
    let server = Server::tiny(&["--config", config.to_str().unwrap(), "--admin-api-key", "k"]);
    let get = |path: &str| -> Value {
        ureq::get(&server.url(path))
            .call()
            .unwrap()
            .into_json()
            .unwrap()
    };
    let chat = json!({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": 2, "logprobs": true, "top_logprobs": 2,
        "adaptation": {"enabled": true, "samples": 4}});
    let completion = json!({"prompt": ["a", "b"], "max_tokens": 3, "logprobs": 2});
    let mut cases: Vec<(&str, Value, Value)> = vec![
        (
            "chat",
            schema("ChatCompletion"),
            server.post("/v1/chat/completions", &chat).1,
        ),
        (
            "completion",
            schema("Completion"),
            server.post("/v1/completions", &completion).1,
        ),
        ("models", schema("ModelList"), get("/v1/models")),
        ("health", schema("Status"), get("/health")),
        ("ready", schema("Status"), get("/ready")),
        ("version", schema("Version"), get("/version")),
        (
            "error",
            schema("ErrorResponse"),
            server
                .post("/v1/chat/completions", &json!({"messages": []}))
                .1,
        ),
    ];
    let mut stream_body = chat.clone();
    stream_body["stream"] = json!(true);
    stream_body["stream_options"] = json!({"include_usage": true});
    for chunk in server
        .stream("/v1/chat/completions", &stream_body)
        .iter()
        .filter(|c| *c != "[DONE]")
    {
        cases.push((
            "chat chunk",
            schema("ChatCompletionChunk"),
            serde_json::from_str(chunk).unwrap(),
        ));
    }
    let mut completion_stream = completion.clone();
    completion_stream["stream"] = json!(true);
    for chunk in server
        .stream("/v1/completions", &completion_stream)
        .iter()
        .filter(|c| *c != "[DONE]")
    {
        cases.push((
            "completion chunk",
            schema("Completion"),
            serde_json::from_str(chunk).unwrap(),
        ));
    }
    assert!(
        cases[0].2.get("adaptation").is_some(),
        "the chat case exercises the adaptation report"
    );
    for (what, s, value) in &cases {
        check(&doc, s, value, what).unwrap_or_else(|e| panic!("{e}"));
    }
    // The checker itself rejects a wrong shape.
    assert!(check(&doc, &schema("ChatCompletion"), &json!({"id": 1}), "bad").is_err());
}

/// Runs schemathesis (from the test python's venv) against a live server, its checks bounded
/// by `examples` per operation and a fixed seed; panics with its report if anything failed.
fn schemathesis(server: &Server, bearer: &str, seed: &str) {
    let Ok(python) = std::env::var("TTRL_TEST_PYTHON") else {
        panic!("TTRL_TEST_PYTHON must name a python with schemathesis (scripts/test.sh sets it)");
    };
    let st = std::path::Path::new(&python).with_file_name("st");
    let out = std::process::Command::new(st)
        // Its caches go to a scratch folder, not the repo; the hooks come from tests/fuzz.
        .current_dir(scratch_dir(&format!("schemathesis-{seed}")))
        .env("PYTHONPATH", concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz"))
        .env("SCHEMATHESIS_HOOKS", "schemathesis_hooks")
        .args(["run", &server.url("/openapi.json")])
        .args(["--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance"])
        .args(["--max-examples", "30", "--seed", seed])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--header", &format!("Authorization: Bearer {bearer}")])
        .args(["--generation-database", "none", "--request-timeout", "120", "--no-color"])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    println!("{report}");
    assert!(
        out.status.success(),
        "schemathesis found failures:\n{report}"
    );
}

#[test]
fn schemathesis_finds_no_server_error_and_every_error_in_the_openai_shape() {
    let dir = scratch_dir("openapi-fuzz");
    let data = dir.join("adapters");
    // An open server, with the admin key on every request: every route, admin ones included.
    let server = Server::tiny(&[
        "--data-dir",
        data.to_str().unwrap(),
        "--admin-api-key",
        "fuzz-admin-key",
    ]);
    schemathesis(&server, "fuzz-admin-key", "1");
    drop(server);
    // API keys on: requests carry a tenant's key (the admin routes answer 401).
    let keys = dir.join("keys.toml");
    std::fs::write(
        &keys,
        "[[key]]\nkey = \"fuzz-tenant-key-0123\"\ntenant = \"acme\"\nrights = [\"infer\", \"adapt\", \"train\"]\n",
    )
    .unwrap();
    let server = Server::tiny(&[
        "--data-dir",
        data.to_str().unwrap(),
        "--api-keys-file",
        keys.to_str().unwrap(),
    ]);
    schemathesis(&server, "fuzz-tenant-key-0123", "2");
    let _ = std::fs::remove_dir_all(dir);
}
