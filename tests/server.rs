use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::server::{metric, stream_text, Server};

fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({"messages": [{"role": "user", "content": content}]});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

#[test]
fn the_official_openai_sdk_works_against_the_default_model() {
    let Ok(python) = std::env::var("TTRL_TEST_PYTHON") else {
        panic!(
            "TTRL_TEST_PYTHON must name a python with the openai package (scripts/test.sh sets it)"
        );
    };
    let server = Server::start(&[]);
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk/openai_sdk.py");
    let out = std::process::Command::new(python)
        .args([script, &server.base, "SmolLM2-135M-Instruct"])
        .output()
        .unwrap();
    println!("{}", String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sixteen_concurrent_streams_each_match_the_same_request_run_alone() {
    let server = Server::start(&[]);
    let body = |i: usize| {
        chat(
            &format!("Name a fruit number {i}."),
            json!({"stream": true, "seed": i, "temperature": 0.8, "max_tokens": 16}),
        )
    };
    let together: Vec<String> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..16)
            .map(|i| {
                let server = &server;
                s.spawn(move || stream_text(&server.stream("/v1/chat/completions", &body(i))))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (i, text) in together.iter().enumerate() {
        let alone = stream_text(&server.stream("/v1/chat/completions", &body(i)));
        assert_eq!(text, &alone, "client {i}");
        assert!(!text.is_empty());
    }
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let server = Server::tiny(&["--max-batch", "1", "--max-waiting", "1"]);
    let long = chat("hi", json!({"max_tokens": 100, "ignore_eos": true}));
    let statuses: Vec<(u16, Option<String>)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6)
            .map(|_| {
                let (server, long) = (&server, &long);
                s.spawn(move || {
                    match ureq::post(&server.url("/v1/chat/completions")).send_json(long.clone()) {
                        Ok(r) => (r.status(), None),
                        Err(ureq::Error::Status(code, r)) => {
                            (code, r.header("retry-after").map(str::to_string))
                        }
                        Err(e) => panic!("{e}"),
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert!(statuses.iter().any(|s| s.0 == 200), "{statuses:?}");
    let refused: Vec<_> = statuses.iter().filter(|s| s.0 == 429).collect();
    assert!(!refused.is_empty(), "{statuses:?}");
    // Retry-After is derived from the queue: whole seconds, at least one.
    assert!(
        refused
            .iter()
            .all(|s| s.1.as_deref().and_then(|v| v.parse::<u64>().ok()) >= Some(1)),
        "{statuses:?}"
    );
}

#[test]
fn a_client_that_disconnects_frees_its_sequence() {
    // The real model: its long context keeps the stream going far longer than the test.
    let server = Server::start(&[]);
    let body = chat(
        "hi",
        json!({"stream": true, "max_tokens": 4000, "ignore_eos": true}),
    );
    let mut reader = ureq::post(&server.url("/v1/chat/completions"))
        .send_json(body)
        .unwrap()
        .into_reader();
    let mut buf = [0u8; 2048];
    std::io::Read::read(&mut reader, &mut buf).unwrap();
    wait_for_running(&server, 1.0);
    drop(reader);
    wait_for_running(&server, 0.0);
}

/// Polls /metrics (bounded) until `ttrl_requests_running` shows `want`.
fn wait_for_running(server: &Server, want: f64) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let running = metric(&server.get_text("/metrics"), "ttrl_requests_running", &[]);
        if running == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "ttrl_requests_running stayed {running}, expected {want}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn sigterm_ends_in_flight_streams_cleanly_and_exits_zero() {
    let mut server = Server::start(&["--shutdown-grace-seconds", "1"]);
    let body = chat(
        "hi",
        json!({"stream": true, "max_tokens": 4000, "ignore_eos": true}),
    );
    let chunks = std::thread::scope(|s| {
        let h = s.spawn(|| server.stream("/v1/chat/completions", &body));
        std::thread::sleep(Duration::from_millis(800));
        unsafe { libc::kill(server.pid() as i32, libc::SIGTERM) };
        h.join().unwrap()
    });
    assert_eq!(chunks.last().map(String::as_str), Some("[DONE]"));
    let finish: Vec<String> = chunks
        .iter()
        .filter_map(|c| serde_json::from_str::<Value>(c).ok())
        .filter_map(|v| {
            v["choices"][0]["finish_reason"]
                .as_str()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(finish, vec!["abort".to_string()]);
    assert_eq!(server.wait_exit(Duration::from_secs(20)), Some(0));
}

#[test]
fn metrics_parse_as_prometheus_text_and_count_exactly() {
    let server = Server::tiny(&[]);
    let before = server.get_text("/metrics");
    let mut prompt_tokens = 0.0;
    for _ in 0..2 {
        let (status, r) = server.post(
            "/v1/chat/completions",
            &chat("count me", json!({"max_tokens": 5, "ignore_eos": true})),
        );
        assert_eq!(status, 200);
        prompt_tokens += r["usage"]["prompt_tokens"].as_f64().unwrap();
    }
    let (status, _) = server.post("/v1/chat/completions", &chat("x", json!({"top_p": 0})));
    assert_eq!(status, 400);
    let after = server.get_text("/metrics");
    for line in after.lines().filter(|l| !l.is_empty()) {
        if let Some(rest) = line.strip_prefix('#') {
            assert!(
                rest.starts_with(" HELP ") || rest.starts_with(" TYPE "),
                "{line}"
            );
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("{line}"));
        assert!(value.parse::<f64>().is_ok() || value == "+Inf", "{line}");
        let name_end = series.find('{').unwrap_or(series.len());
        assert!(
            series[..name_end]
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':'),
            "{line}"
        );
    }
    let delta = |name: &str, labels: &[(&str, &str)]| {
        metric(&after, name, labels) - metric(&before, name, labels)
    };
    assert_eq!(delta("ttrl_generation_tokens_total", &[]), 10.0);
    assert_eq!(delta("ttrl_prompt_tokens_total", &[]), prompt_tokens);
    assert_eq!(
        delta(
            "ttrl_request_success_total",
            &[("finished_reason", "length")]
        ),
        2.0
    );
    assert_eq!(
        delta("ttrl_request_errors_total", &[("code", "invalid_value")]),
        1.0
    );
    assert_eq!(delta("ttrl_e2e_request_latency_seconds_count", &[]), 2.0);
    assert!(
        after
            .contains("ttrl_time_to_first_token_seconds_bucket{model=\"tiny-llama\",le=\"0.001\"}"),
        "vLLM buckets"
    );
    assert!(after.contains("process_"), "process metrics");
}

#[test]
fn bad_input_gets_openai_shaped_errors_and_never_downs_the_server() {
    let config = std::env::temp_dir().join(format!("ttrl-limits-{}.toml", std::process::id()));
    std::fs::write(&config, "[server]\nbody_limit_bytes = 65536\n").unwrap();
    let server = Server::tiny(&[
        "--max-model-len",
        "64",
        "--config",
        config.to_str().unwrap(),
    ]);
    let url = server.url("/v1/chat/completions");
    let raw = |body: &str, content_type: &str| match ureq::post(&url)
        .set("content-type", content_type)
        .send_string(body)
    {
        Ok(r) => (r.status(), r.into_json::<Value>().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json::<Value>().unwrap()),
        Err(e) => panic!("{e}"),
    };
    let cases: Vec<(u16, Value, Option<&str>)> = vec![
        {
            let (s, v) = raw("{not json", "application/json");
            (s, v, None)
        },
        {
            let (s, v) = raw("{}", "text/plain");
            (s, v, None)
        },
        {
            let (s, v) = post_one_byte_over_the_limit(&server);
            (s, v, None)
        },
        {
            let (s, v) = server.post("/v1/chat/completions", &chat("x", json!({"model": "nope"})));
            (s, v, Some("model"))
        },
        {
            let (s, v) = server.post("/v1/chat/completions", &chat("x", json!({"n": 0})));
            (s, v, Some("n"))
        },
        {
            let (s, v) = server.post(
                "/v1/chat/completions",
                &chat("x", json!({"top_logprobs": 2})),
            );
            (s, v, Some("top_logprobs"))
        },
        {
            let (s, v) = server.post(
                "/v1/chat/completions",
                &chat("x", json!({"stream_options": {"include_usage": true}})),
            );
            (s, v, Some("stream_options"))
        },
        {
            let (s, v) = server.post(
                "/v1/chat/completions",
                &chat("x", json!({"max_tokens": 1000})),
            );
            (s, v, Some("messages"))
        },
        {
            let (s, v) = server.post("/v1/completions", &json!({"prompt": [1, 99999]}));
            (s, v, Some("prompt"))
        },
        {
            let (s, v) = server.post("/v1/chat/completions", &json!({"messages": []}));
            (s, v, Some("messages"))
        },
    ];
    let expected = [400, 400, 413, 404, 400, 400, 400, 400, 400, 400];
    for (i, ((status, body, param), want)) in cases.iter().zip(expected).enumerate() {
        assert_eq!(*status, want, "case {i}: {body}");
        let err = &body["error"];
        assert!(
            err["message"].as_str().is_some_and(|m| !m.is_empty()),
            "case {i}: {body}"
        );
        assert!(
            err["type"].is_string() && err.get("param").is_some() && err["code"].is_string(),
            "case {i}: {body}"
        );
        if let Some(p) = param {
            assert_eq!(err["param"], *p, "case {i}: {body}");
        }
    }
    assert!(cases[7].1["error"]["message"]
        .as_str()
        .unwrap()
        .contains("64 tokens"));
    let (s, v) = match ureq::get(&server.url("/no/such/route")).call() {
        Err(ureq::Error::Status(code, r)) => (code, r.into_json::<Value>().unwrap()),
        other => panic!("{other:?}"),
    };
    assert_eq!((s, v["error"]["code"].as_str()), (404, Some("not_found")));
    // Still serving.
    let (status, _) = server.post("/v1/completions", &json!({"prompt": "ok", "max_tokens": 2}));
    assert_eq!(status, 200);
}

/// A body one byte over the 64 KiB limit: the server has read all of it when it refuses,
/// so the client reads the 413 instead of racing the server's close while still writing.
fn post_one_byte_over_the_limit(server: &Server) -> (u16, Value) {
    let prefix = "{\"messages\": [{\"role\": \"user\", \"content\": \"";
    let suffix = "\"}]}";
    let filler = "a".repeat(65_536 + 1 - prefix.len() - suffix.len());
    let body = format!("{prefix}{filler}{suffix}");
    assert_eq!(body.len(), 65_537);
    match ureq::post(&server.url("/v1/chat/completions"))
        .set("content-type", "application/json")
        .send_string(&body)
    {
        Ok(r) => (r.status(), r.into_json().unwrap()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap()),
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn request_ids_are_echoed_or_generated() {
    let server = Server::tiny(&[]);
    let r = ureq::get(&server.url("/health"))
        .set("x-request-id", "abc-123")
        .call()
        .unwrap();
    assert_eq!(r.header("x-request-id"), Some("abc-123"));
    let r = ureq::get(&server.url("/health")).call().unwrap();
    assert!(r.header("x-request-id").is_some_and(|id| id.len() >= 16));
}

#[test]
fn a_repeated_prompt_starts_from_its_cached_keys_and_values_and_answers_the_same() {
    let server = Server::start(&[]);
    let request = |content: &str| {
        chat(
            content,
            json!({"max_tokens": 12, "temperature": 0.8, "seed": 3, "logprobs": true}),
        )
    };
    let hits = || {
        metric(
            &server.get_text("/metrics"),
            "ttrl_prefix_cache_hits_total",
            &[],
        )
    };
    let ask = |body: &Value| {
        let (status, r) = server.post("/v1/chat/completions", body);
        assert_eq!(status, 200, "{r}");
        r
    };
    let first = ask(&request("Name three colours of the sea."));
    assert_eq!(hits(), 0.0);
    // The whole prompt and the logits after it come from the cache: the same tokens with the
    // same log-probs, bit for bit.
    let again = ask(&request("Name three colours of the sea."));
    let prompt_tokens = first["usage"]["prompt_tokens"].as_f64().unwrap();
    assert_eq!(hits(), prompt_tokens);
    assert_eq!(first["choices"], again["choices"]);
    // Another question shares the chat template's opening: that much is reused.
    ask(&request("Name three colours of the sky."));
    let shared = hits() - prompt_tokens;
    assert!(
        shared >= 8.0 && shared < prompt_tokens,
        "{shared} of {prompt_tokens}"
    );
    let cached = metric(
        &server.get_text("/metrics"),
        "ttrl_gpu_memory_bytes",
        &[("kind", "prompt_cache")],
    );
    assert!(cached > 0.0, "{cached}");
}

#[test]
fn the_kv_cache_budget_queues_requests_instead_of_overcommitting() {
    // SmolLM2 in f32 takes 2 x 30 layers x 3 KV heads x 64 x 4 bytes = 46080 bytes a
    // position: room for one request of a few hundred positions, not two.
    let budget = (46080 * 360).to_string();
    let server = Server::start(&["--kv-cache-bytes", &budget]);
    let long = chat(
        "hi",
        json!({"stream": true, "max_tokens": 300, "ignore_eos": true}),
    );
    let short = chat("hi", json!({"max_tokens": 50, "ignore_eos": true}));
    let mut first = ureq::post(&server.url("/v1/chat/completions"))
        .send_json(long.clone())
        .unwrap()
        .into_reader();
    let mut buf = [0u8; 2048];
    std::io::Read::read(&mut first, &mut buf).unwrap();
    wait_for_running(&server, 1.0);

    let second = std::thread::spawn({
        let url = server.url("/v1/chat/completions");
        move || {
            ureq::post(&url)
                .send_json(short)
                .unwrap()
                .into_string()
                .unwrap()
        }
    });
    let metrics = || server.get_text("/metrics");
    let deadline = Instant::now() + Duration::from_secs(20);
    while metric(&metrics(), "ttrl_requests_waiting", &[]) < 1.0 {
        assert!(Instant::now() < deadline, "the second request never queued");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(metric(&metrics(), "ttrl_requests_running", &[]), 1.0);
    let kv = metric(&metrics(), "ttrl_gpu_memory_bytes", &[("kind", "kv_cache")]);
    assert!(kv > 0.0 && kv <= 46080.0 * 360.0, "{kv}");
    assert!(metric(&metrics(), "ttrl_gpu_memory_bytes", &[("kind", "weights")]) > 100e6);

    // The first client leaves; the queued request gets the room and finishes.
    drop(first);
    let text = second.join().unwrap();
    assert!(text.contains("\"finish_reason\":\"length\""), "{text}");

    // One request that could never fit is refused up front; without max_tokens, the budget
    // caps the default.
    let (status, body) = server.post(
        "/v1/chat/completions",
        &chat("hi", json!({"n": 2, "max_tokens": 300})),
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["param"], "max_tokens");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("engine.kv_cache_bytes"));
    let (status, body) = server.post(
        "/v1/chat/completions",
        &chat("hi", json!({"n": 4, "ignore_eos": true})),
    );
    assert_eq!(status, 200, "{body}");
    let used = body["usage"]["prompt_tokens"].as_u64().unwrap()
        + body["usage"]["completion_tokens"].as_u64().unwrap() / 4;
    assert!(4 * used <= 360, "{body}");
}
