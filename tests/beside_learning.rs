//! Serving never waits on learning: episodes run beside decoding, are bounded and
//! cancellable, and faults stay with the request that caused them. Real processes; the
//! default model where an episode must learn or take a while, the tiny one elsewhere.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::scratch_dir;
use crate::common::server::{metric, Server};

fn config(name: &str, text: &str) -> String {
    let path = scratch_dir(&format!("beside-config-{name}")).join("settings.toml");
    std::fs::write(&path, text).unwrap();
    path.to_string_lossy().into_owned()
}

fn data_dir(name: &str) -> String {
    let dir = scratch_dir(&format!("beside-data-{name}"));
    dir.to_string_lossy().into_owned()
}

fn chat(content: &str, extra: Value) -> Value {
    let mut body = json!({"messages": [{"role": "user", "content": content}], "seed": 3});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

fn episodes_running(server: &Server) -> f64 {
    metric(
        &server.get_text("/metrics"),
        "ttrl_adaptation_episodes_running",
        &[],
    )
}

/// Polls (bounded) until `probe` holds.
fn wait_until(what: &str, limit: Duration, mut probe: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !probe() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Long enough on two cores that a plain request has time to finish inside it.
const SLOW_EPISODE: &str =
    "[adaptation]\nsamples = 16\nmax_tokens = 64\nsteps = 2\nephemeral_steps = 2\n";

#[test]
fn plain_requests_finish_and_streams_keep_flowing_while_an_episode_runs() {
    let server = Server::start(&[
        "--config",
        &config("slow", SLOW_EPISODE),
        "--data-dir",
        &data_dir("slow"),
    ]);
    let stream_body = chat(
        "Tell me a long story.",
        json!({"stream": true, "max_tokens": 3000, "ignore_eos": true}),
    );
    let adapt_body = chat(
        "What is 2 plus 3? Answer with just the number.",
        json!({"max_tokens": 4, "adaptation": {"enabled": true}}),
    );
    let chunk_times: Mutex<Vec<Instant>> = Mutex::new(Vec::new());
    let answered = AtomicBool::new(false);
    let (episode_started, plain_done, adapted_done, report) = std::thread::scope(|s| {
        let streaming = s.spawn(|| {
            let r = ureq::post(&server.url("/v1/chat/completions"))
                .send_json(stream_body.clone())
                .unwrap();
            let mut lines = std::io::BufRead::lines(std::io::BufReader::new(r.into_reader()));
            // Reads until the adapted request has been answered, then leaves.
            while let Some(Ok(line)) = lines.next() {
                if line.starts_with("data: ") {
                    chunk_times.lock().unwrap().push(Instant::now());
                }
                if answered.load(Ordering::SeqCst) {
                    break;
                }
            }
        });
        wait_until("the stream to start", Duration::from_secs(60), || {
            !chunk_times.lock().unwrap().is_empty()
        });
        let adapting = s.spawn(|| {
            let (status, r) = server.post("/v1/chat/completions", &adapt_body);
            assert_eq!(status, 200, "{r}");
            (Instant::now(), r)
        });
        wait_until("the episode to start", Duration::from_secs(60), || {
            episodes_running(&server) == 1.0
        });
        let episode_started = Instant::now();
        let (status, r) = server.post(
            "/v1/chat/completions",
            &chat("Say hi.", json!({"max_tokens": 4})),
        );
        assert_eq!(status, 200, "{r}");
        let plain_done = Instant::now();
        assert_eq!(
            episodes_running(&server),
            1.0,
            "the episode ended before the plain request did: this test proves nothing"
        );
        let (adapted_done, report) = adapting.join().unwrap();
        answered.store(true, Ordering::SeqCst);
        streaming.join().unwrap();
        (episode_started, plain_done, adapted_done, report)
    });
    assert!(plain_done < adapted_done);
    assert!(
        report["adaptation"]["rollouts"].as_u64().unwrap() > 0,
        "{report}"
    );
    let during = chunk_times
        .lock()
        .unwrap()
        .iter()
        .filter(|&&t| t > episode_started && t < adapted_done)
        .count();
    assert!(
        during >= 10,
        "the stream got {during} chunks while the episode ran"
    );
}

#[test]
fn an_empty_prompt_in_a_list_is_a_400_naming_it_and_a_concurrent_request_completes() {
    let server = Server::tiny(&[]);
    let (long, bad) = std::thread::scope(|s| {
        let long = s.spawn(|| {
            server.post(
                "/v1/completions",
                &json!({"prompt": "once upon", "max_tokens": 100, "ignore_eos": true}),
            )
        });
        std::thread::sleep(Duration::from_millis(200));
        let bad = server.post(
            "/v1/completions",
            &json!({"prompt": ["", "x"], "max_tokens": 1}),
        );
        (long.join().unwrap(), bad)
    });
    assert_eq!(bad.0, 400, "{}", bad.1);
    assert_eq!(bad.1["error"]["param"], "prompt[0]", "{}", bad.1);
    assert_eq!(long.0, 200, "{}", long.1);
    assert_eq!(long.1["choices"][0]["finish_reason"], "length");
}

#[test]
fn more_requests_than_max_questions_form_several_batches_and_rollouts_stay_within_max_batch() {
    let server = Server::start(&[
        "--config",
        &config(
            "batches",
            "[adaptation]\nsamples = 4\nmax_tokens = 16\nmax_questions = 2\nbatch_window_ms = 3000\n",
        ),
        "--data-dir",
        &data_dir("batches"),
        "--max-batch",
        "4",
    ]);
    let questions = [
        "What is 1 plus 1?",
        "What is 2 plus 2?",
        "What is 3 plus 3?",
    ];
    let reports: Vec<Value> = std::thread::scope(|s| {
        let handles: Vec<_> = questions
            .iter()
            .map(|q| {
                let server = &server;
                s.spawn(move || {
                    let body = chat(
                        q,
                        json!({"max_tokens": 2, "adaptation": {"enabled": true, "adapter": "team"}}),
                    );
                    let (status, r) = server.post("/v1/chat/completions", &body);
                    assert_eq!(status, 200, "{r}");
                    r["adaptation"].clone()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut sizes: Vec<u64> = reports
        .iter()
        .map(|r| r["batch_questions"].as_u64().unwrap())
        .collect();
    sizes.sort();
    assert_eq!(sizes, vec![1, 2, 2], "{reports:?}");
    let widest = metric(
        &server.get_text("/metrics"),
        "ttrl_adaptation_rollout_batch_sequences",
        &[],
    );
    assert!(
        (1.0..=4.0).contains(&widest),
        "rollouts decoded {widest} sequences at once; max_batch is 4"
    );
}

#[test]
fn sigterm_mid_episode_exits_within_the_grace_period() {
    let mut server = Server::start(&[
        "--config",
        &config("term", SLOW_EPISODE),
        "--data-dir",
        &data_dir("term"),
        "--shutdown-grace-seconds",
        "2",
    ]);
    let body = chat(
        "What is 2 plus 3?",
        json!({"max_tokens": 4, "adaptation": {"enabled": true}}),
    );
    let url = server.url("/v1/chat/completions");
    std::thread::scope(|s| {
        let adapting = s.spawn(|| {
            // Answered with the old weights (the episode is cancelled) or refused: never hung.
            match ureq::post(&url).send_json(body.clone()) {
                Ok(r) => r.status(),
                Err(ureq::Error::Status(code, _)) => code,
                Err(_) => 0,
            }
        });
        wait_until("the episode to start", Duration::from_secs(60), || {
            episodes_running(&server) == 1.0
        });
        unsafe { libc::kill(server.pid() as i32, libc::SIGTERM) };
        let signalled = Instant::now();
        let code = server.wait_exit(Duration::from_secs(10));
        let took = signalled.elapsed();
        assert!(code.is_some(), "the server did not exit");
        assert!(
            took < Duration::from_secs(3),
            "exit took {took:?}; the grace period is 2 s"
        );
        let status = adapting.join().unwrap();
        assert!(matches!(status, 0 | 200 | 503), "{status}");
    });
}

#[test]
fn a_second_signal_exits_at_once() {
    // The default model: its long context keeps a stream going through the grace period.
    let mut server = Server::start(&["--shutdown-grace-seconds", "60"]);
    let body = chat(
        "hi",
        json!({"stream": true, "max_tokens": 4000, "ignore_eos": true}),
    );
    let url = server.url("/v1/chat/completions");
    std::thread::scope(|s| {
        let streaming = s.spawn(|| {
            let _ = ureq::post(&url)
                .send_json(body.clone())
                .map(|r| std::io::copy(&mut r.into_reader(), &mut std::io::sink()));
        });
        std::thread::sleep(Duration::from_millis(500));
        unsafe { libc::kill(server.pid() as i32, libc::SIGTERM) };
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(server.wait_exit(Duration::from_millis(200)), None);
        unsafe { libc::kill(server.pid() as i32, libc::SIGTERM) };
        assert_eq!(server.wait_exit(Duration::from_secs(5)), Some(130));
        streaming.join().unwrap();
    });
}

#[test]
fn a_panic_fails_only_its_request_and_a_dead_engine_turns_ready_to_503_and_exits() {
    let mut server = Server::tiny(&[
        "--config",
        &config(
            "faults",
            "[engine]\ntest_panic_marker = \"PANIC-HERE\"\ntest_exit_marker = \"EXIT-HERE\"\n",
        ),
    ]);
    let ask = |prompt: &str| {
        server.post(
            "/v1/completions",
            &json!({"prompt": prompt, "max_tokens": 3}),
        )
    };
    let (status, r) = ask("hello PANIC-HERE");
    assert_eq!(status, 500, "{r}");
    assert_eq!(r["error"]["type"], "server_error", "{r}");
    assert_eq!(r["error"]["code"], "internal_error", "{r}");
    let (status, r) = ask("hello");
    assert_eq!(status, 200, "{r}");
    // Now the engine loop itself: the request fails, the server says 503 and exits non-zero.
    let killed = ureq::post(&server.url("/v1/completions"))
        .send_json(json!({"prompt": "EXIT-HERE", "max_tokens": 3}));
    assert!(
        killed.is_err(),
        "a request that killed the engine succeeded"
    );
    let ready = ureq::get(&server.url("/ready")).call();
    assert!(
        matches!(
            ready,
            Err(ureq::Error::Status(503, _)) | Err(ureq::Error::Transport(_))
        ),
        "{ready:?}"
    );
    let code = server.wait_exit(Duration::from_secs(10));
    assert!(matches!(code, Some(c) if c != 0), "exit code {code:?}");
}

#[test]
fn clients_that_leave_while_queued_behind_an_episode_give_their_places_back() {
    let server = Server::start(&[
        "--config",
        &config(
            "leave",
            "[adaptation]\nsamples = 16\nmax_tokens = 64\nsteps = 2\nmax_questions = 1\nbatch_window_ms = 10\n",
        ),
        "--data-dir",
        &data_dir("leave"),
    ]);
    let body = |q: &str| {
        chat(
            q,
            json!({"stream": true, "max_tokens": 2, "adaptation": {"enabled": true, "adapter": "queue"}}),
        )
    };
    let leave = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        // The first holds the trainer; the others queue behind it, then leave.
        let first = s.spawn(|| {
            let _ = ureq::post(&server.url("/v1/chat/completions"))
                .send_json(body("What is 1 plus 1?"))
                .map(|r| std::io::copy(&mut r.into_reader(), &mut std::io::sink()));
        });
        wait_until("the episode to start", Duration::from_secs(60), || {
            episodes_running(&server) == 1.0
        });
        // The leavers stay connected (a keep-alive comment arrives every second) until all
        // three are seen queued, then hang up.
        let agent = ureq::AgentBuilder::new()
            .timeout_read(Duration::from_secs(30))
            .build();
        let leavers: Vec<_> = (0..3)
            .map(|i| {
                let (agent, body) = (agent.clone(), body(&format!("What is {i} plus 2?")));
                let (url, leave) = (server.url("/v1/chat/completions"), &leave);
                s.spawn(move || {
                    let mut reader = agent.post(&url).send_json(body).unwrap().into_reader();
                    let mut buf = [0u8; 16];
                    while !leave.load(std::sync::atomic::Ordering::SeqCst) {
                        std::io::Read::read(&mut reader, &mut buf).unwrap();
                    }
                })
            })
            .collect();
        wait_until("the leavers to queue", Duration::from_secs(60), || {
            metric(&server.get_text("/metrics"), "ttrl_requests_waiting", &[]) >= 3.0
        });
        leave.store(true, std::sync::atomic::Ordering::SeqCst);
        for l in leavers {
            l.join().unwrap();
        }
        // Only the first (in the episode) still holds a place.
        wait_until(
            "the leavers' places to come back",
            Duration::from_secs(30),
            || metric(&server.get_text("/metrics"), "ttrl_requests_waiting", &[]) <= 1.0,
        );
        first.join().unwrap();
    });
    wait_until("waiting to return to 0", Duration::from_secs(30), || {
        metric(&server.get_text("/metrics"), "ttrl_requests_waiting", &[]) == 0.0
    });
}

#[test]
fn an_episode_out_of_time_answers_with_the_weights_it_had() {
    let server = Server::tiny(&[
        "--config",
        &config(
            "deadline",
            "[adaptation]\nsamples = 4\nmax_episode_seconds = 0.0\n",
        ),
        "--data-dir",
        &data_dir("deadline"),
    ]);
    let (status, r) = server.post(
        "/v1/completions",
        &json!({"prompt": "1+1=", "max_tokens": 3, "seed": 5,
                "adaptation": {"enabled": true, "adapter": "late"}}),
    );
    assert_eq!(status, 200, "{r}");
    let report = &r["adaptation"];
    assert_eq!(report["applied"], false, "{report}");
    assert_eq!(report["adapter_version"], 0, "{report}");
    let note = report["note"].as_str().unwrap_or_default();
    assert!(note.contains("max_episode_seconds"), "{report}");
    // Answered with the adapter as it was: version 0, the base model's tokens.
    let (_, base) = server.post(
        "/v1/completions",
        &json!({"prompt": "1+1=", "max_tokens": 3, "seed": 5}),
    );
    assert_eq!(r["choices"][0]["text"], base["choices"][0]["text"]);
}
