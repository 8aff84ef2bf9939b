use std::collections::HashMap;
use std::io::Read;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};
use ttrl_serve::adapt::{run_episode, AdaptConfig, EpisodeLimits, Learner, Question};
use ttrl_serve::interrupt::Interrupt;
use ttrl_serve::model::{assets, loader, Adapter, ChatMessage};
use ttrl_serve::reward::{canonical, extract_answer, unreverse, AnswerFormat};
use ttrl_serve::rollout::RolloutKind;

use crate::common::max_abs_diff;
use crate::common::server::{logprobs, Server};

/// The default model: learning needs answers that end (a truncated leaf abstains), and the
/// tiny random checkpoints never stop before their budget.
const MODEL: &str = "SmolLM2-135M-Instruct";

/// A question SmolLM2 answers with a majority and some dissent at T = 0.8, so an episode
/// has a learning signal.
const QUESTION: &str = "What is 2 plus 3? Answer with just the number.";

/// A learning rate that moves the adapter visibly in one step.
const LEARN: &str = "lr = 0.002\n";

/// Small rollouts, one round, so an episode takes a few seconds.
fn config_file(extra: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!(
        "ttrl-adapt-{}-{}.toml",
        std::process::id(),
        extra.len()
    ));
    std::fs::write(
        &path,
        format!(
            "[adaptation]\nmax_tokens = 64\nsamples = 8\nsteps = 1\nephemeral_steps = 1\nkl_bound = 100.0\n{extra}"
        ),
    )
    .unwrap();
    path
}

fn server_args<'a>(config: &'a str, data_dir: &'a str) -> Vec<&'a str> {
    vec![
        "--config",
        config,
        "--data-dir",
        data_dir,
        "--admin-api-key",
        "secret",
    ]
}

/// A server on the default model.
fn start(data_dir: &std::path::Path, extra: &str) -> Server {
    let config = config_file(extra);
    Server::start(&server_args(
        config.to_str().unwrap(),
        data_dir.to_str().unwrap(),
    ))
}

fn ask(server: &Server, model: &str, adaptation: Value) -> Value {
    ask_about(server, QUESTION, model, adaptation)
}

fn ask_about(server: &Server, question: &str, model: &str, adaptation: Value) -> Value {
    let body = json!({
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "temperature": 0, "max_tokens": 6, "logprobs": true, "seed": 11,
        "adaptation": adaptation,
    });
    let (status, r) = server.post("/v1/chat/completions", &body);
    assert_eq!(status, 200, "{r}");
    r
}

fn admin_get(server: &Server, path: &str) -> ureq::Response {
    ureq::get(&server.url(path))
        .set("authorization", "Bearer secret")
        .call()
        .unwrap()
}

/// The adapter's tensors as exported (PEFT zip), by name.
fn exported(server: &Server, name: &str) -> HashMap<String, Tensor> {
    let mut bytes = Vec::new();
    admin_get(server, &format!("/admin/adapters/{name}/export"))
        .into_reader()
        .read_to_end(&mut bytes)
        .unwrap();
    let mut zip = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    let mut st = Vec::new();
    zip.by_name("adapter_model.safetensors")
        .unwrap()
        .read_to_end(&mut st)
        .unwrap();
    candle_core::safetensors::load_buffer(&st, &candle_core::Device::Cpu).unwrap()
}

#[test]
fn an_adapted_request_reports_its_episode_and_a_named_adapter_learns_and_persists() {
    let data = std::env::temp_dir().join(format!("ttrl-adapters-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let mut server = start(&data, LEARN);
    let base_before = logprobs(&ask(&server, MODEL, Value::Null));

    // Ephemeral adaptation: a report, and the base model is untouched afterwards.
    let r = ask(
        &server,
        MODEL,
        json!({"enabled": true, "samples": 8, "rollout": "tree"}),
    );
    let a = &r["adaptation"];
    assert_eq!(a["method"], "ttrl", "the default method");
    assert_eq!(a["rollout"], "tree");
    assert_eq!(a["adapter"], Value::Null);
    // samples 8 with L = 3 rounds of N = 1 fork, B = 1: M = 2 roots, 2 * (1 + 3) = 8 leaves.
    assert_eq!(a["rollouts"], 8);
    assert!(a["rollout_tokens"].as_u64().unwrap() <= a["flat_equivalent_tokens"].as_u64().unwrap());
    for field in [
        "majority_answer",
        "vote_share",
        "forking_fraction",
        "mean_entropy",
        "loss",
        "kl",
        "duration_ms",
        "adapter_version",
        "steps",
        "applied",
    ] {
        assert!(a.get(field).is_some(), "report lacks {field}: {a}");
    }
    assert_eq!(a["tree"].as_array().unwrap().len(), 8);
    assert_eq!(
        logprobs(&ask(&server, MODEL, Value::Null)),
        base_before,
        "ephemeral adaptation changed the base"
    );
    // The answer method trains the final answer span alone: a share of the tokens.
    let a = &ask(
        &server,
        MODEL,
        json!({"enabled": true, "method": "answer", "samples": 8, "rollout": "flat"}),
    )["adaptation"];
    assert_eq!(a["method"], "answer");
    assert!(a["applied"].as_bool().unwrap(), "{a}");
    let share = a["forking_fraction"].as_f64().unwrap();
    assert!(share > 0.0 && share < 1.0, "{a}");

    // A named adapter: versions go up, the adapter serves plain requests, the base stays.
    let first = ask(
        &server,
        MODEL,
        json!({"enabled": true, "adapter": "team", "method": "ttrl", "rollout": "flat", "samples": 12}),
    );
    assert_eq!(first["adaptation"]["rollouts"], 12);
    assert_eq!(
        first["adaptation"]["rollout_tokens"],
        first["adaptation"]["flat_equivalent_tokens"]
    );
    let v1 = first["adaptation"]["adapter_version"].as_u64().unwrap();
    // Another question: after one step the adapter agrees with itself on the first one.
    let second = ask_about(
        &server,
        "What is 4 plus 5? Answer with just the number.",
        MODEL,
        json!({"enabled": true, "adapter": "team", "rollout": "flat", "samples": 12}),
    );
    let v2 = second["adaptation"]["adapter_version"].as_u64().unwrap();
    assert!(
        first["adaptation"]["applied"].as_bool().unwrap()
            && second["adaptation"]["applied"].as_bool().unwrap(),
        "{second}"
    );
    assert_eq!((v1, v2), (1, 2));
    let with_adapter = logprobs(&ask(&server, &format!("{MODEL}:team"), Value::Null));
    assert_ne!(
        with_adapter, base_before,
        "the adapter's change must show in plain requests"
    );
    assert_eq!(
        logprobs(&ask(
            &server,
            MODEL,
            json!({"enabled": false, "adapter": "team"})
        )),
        with_adapter
    );
    assert_eq!(
        logprobs(&ask(&server, MODEL, Value::Null)),
        base_before,
        "a named adapter changed the base"
    );
    let list: Value = admin_get(&server, "/admin/adapters").into_json().unwrap();
    assert_eq!(list["data"], json!([{"name": "team", "version": 2}]));
    let metrics = server.get_text("/metrics");
    assert!(
        metrics.contains(&format!(
            "ttrl_adapter_version{{model=\"{MODEL}\",adapter=\"team\"}} 2"
        )),
        "{metrics}"
    );
    assert!(metrics.contains(&format!(
        "ttrl_adaptation_batches_total{{model=\"{MODEL}\"}} 4"
    )));
    // The episodes' memory peak above their start is measured (host memory on the CPU).
    let peak = metrics
        .lines()
        .find(|l| l.starts_with("ttrl_gpu_memory_bytes{kind=\"adaptation_peak\",device=\"cpu\"}"))
        .unwrap_or_else(|| panic!("no adaptation_peak in\n{metrics}"));
    assert!(peak.rsplit(' ').next().unwrap().parse::<f64>().unwrap() >= 0.0);

    // A restart reloads the adapter bit for bit, with its version.
    let saved = exported(&server, "team");
    drop(server);
    server = start(&data, LEARN);
    let reloaded = exported(&server, "team");
    assert_eq!(saved.len(), reloaded.len());
    for (name, t) in &saved {
        assert_eq!(max_abs_diff(t, &reloaded[name]), 0.0, "{name}");
    }
    assert_eq!(
        logprobs(&ask(&server, &format!("{MODEL}:team"), Value::Null)),
        with_adapter
    );
    let list: Value = admin_get(&server, "/admin/adapters").into_json().unwrap();
    assert_eq!(list["data"][0]["version"], 2);

    // Reset: a fresh adapter (the base model again), published as the next version.
    let admin_post = |path: &str| -> Value {
        ureq::post(&server.url(path))
            .set("authorization", "Bearer secret")
            .call()
            .unwrap()
            .into_json()
            .unwrap()
    };
    assert_eq!(admin_post("/admin/adapters/team/reset")["version"], 3);
    assert_eq!(
        logprobs(&ask(&server, &format!("{MODEL}:team"), Value::Null)),
        base_before
    );
    // Rollback: version 2's weights come back, as version 4.
    assert_eq!(
        admin_post("/admin/adapters/team/rollback?version=2")["version"],
        4
    );
    assert_eq!(
        logprobs(&ask(&server, &format!("{MODEL}:team"), Value::Null)),
        with_adapter
    );
}

#[test]
fn a_non_finite_loss_is_rolled_back_and_the_server_keeps_serving() {
    let data = std::env::temp_dir().join(format!("ttrl-adapters-nan-{}", std::process::id()));
    let server = start(&data, "lr = 0.002\ntest_force_nonfinite_loss = true\n");
    let base = logprobs(&ask(&server, MODEL, Value::Null));
    let r = ask(
        &server,
        MODEL,
        json!({"enabled": true, "adapter": "broken", "rollout": "flat", "samples": 12}),
    );
    let a = &r["adaptation"];
    assert_eq!(a["rolled_back"], true, "{a}");
    assert_eq!(a["applied"], false);
    assert_eq!(a["adapter_version"], 0);
    assert!(a["note"].as_str().unwrap().contains("non-finite"));
    // JSON has no NaN: the round's loss is null, which the wire schema documents.
    assert!(a["loss"].is_null(), "{a}");
    assert!(a["step_metrics"][0]["loss"].is_null(), "{a}");
    assert_eq!(
        logprobs(&r),
        base,
        "the answer came from the unadapted weights"
    );
    let metrics = server.get_text("/metrics");
    assert!(
        metrics.contains(&format!(
            "ttrl_adaptation_rollbacks_total{{model=\"{MODEL}\"}} 1"
        )),
        "{metrics}"
    );
    assert_eq!(logprobs(&ask(&server, MODEL, Value::Null)), base);
}

/// The control arm of the efficacy eval: adaptation with a zero learning rate answers
/// exactly as no adaptation does (same sampling, same seed). If it did not, the answer path
/// after an episode (sampling settings, caches, weights) would be wrong.
#[test]
fn adaptation_with_a_zero_learning_rate_answers_exactly_like_none() {
    let data = std::env::temp_dir().join(format!("ttrl-adapters-lr0-{}", std::process::id()));
    let server = start(&data, "lr = 0.0\n");
    let sampled = |adaptation: Value| {
        let body = json!({
            "messages": [{"role": "user", "content": QUESTION}],
            "temperature": 0.8, "n": 4, "max_tokens": 24, "logprobs": true, "seed": 5,
            "adaptation": adaptation,
        });
        let (status, r) = server.post("/v1/chat/completions", &body);
        assert_eq!(status, 200, "{r}");
        r
    };
    let plain = sampled(Value::Null);
    let adapted = sampled(json!({"enabled": true, "rollout": "flat", "samples": 12}));
    assert_eq!(
        adapted["adaptation"]["applied"], true,
        "{}",
        adapted["adaptation"]
    );
    assert_eq!(adapted["choices"], plain["choices"]);
}

/// `ttrl-serve eval` sends a question's next pass with its seed plus 2^32. Under lr 0 the
/// weights never change, so that request's rollouts would be a two-round request's second
/// round again if each round offset the seed by 2^32 (a rolled-back pass was sampled again).
#[test]
fn a_later_passes_seed_does_not_replay_an_earlier_round() {
    let data = std::env::temp_dir().join(format!("ttrl-adapters-rounds-{}", std::process::id()));
    let server = start(&data, "lr = 0.0\n");
    let last_round = |seed: u64, steps: u64| {
        let body = json!({
            "messages": [{"role": "user", "content": QUESTION}],
            "max_tokens": 2, "seed": seed,
            "adaptation": {"enabled": true, "rollout": "flat", "samples": 8, "steps": steps},
        });
        let (status, r) = server.post("/v1/chat/completions", &body);
        assert_eq!(status, 200, "{r}");
        r["adaptation"]["tree"].clone()
    };
    let second_round = last_round(5, 2);
    assert_eq!(second_round.as_array().map(Vec::len), Some(8));
    assert_ne!(second_round, last_round(5 + (1 << 32), 1));
}

/// Ephemeral adaptation is per request: a question batched with another one that trains is
/// answered with its own adapter, so when it has no learning signal it answers exactly as the
/// base model does.
#[test]
fn an_ephemeral_request_is_not_changed_by_another_clients_question() {
    let data = std::env::temp_dir().join(format!("ttrl-adapters-own-{}", std::process::id()));
    // A long window, so both requests surely form one batch.
    let server = start(&data, "lr = 0.002\nbatch_window_ms = 3000\n");
    let other = "What is 2 plus 2? Answer with just the number.";
    let base = logprobs(&ask_about(&server, other, MODEL, Value::Null));
    let flat = json!({"enabled": true, "rollout": "flat", "samples": 12});
    let (trained, untouched) = std::thread::scope(|s| {
        let a = s.spawn(|| ask(&server, MODEL, flat.clone()));
        // No \boxed{} in SmolLM2's answers: no votes, so no signal for this question.
        let mut boxed = flat.clone();
        boxed["answer_format"] = json!("boxed");
        let b = s.spawn(|| ask_about(&server, other, MODEL, boxed));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert_eq!(
        trained["adaptation"]["applied"], true,
        "{}",
        trained["adaptation"]
    );
    let b = &untouched["adaptation"];
    assert_eq!(b["applied"], false, "{b}");
    assert!(b["no_signal"].is_string(), "{b}");
    for r in [&trained, &untouched] {
        assert_eq!(r["adaptation"]["batch_questions"], 1);
    }
    assert_eq!(logprobs(&untouched), base);
}

/// Two clients' requests for one adapter race to its batch; the episode they run must not
/// depend on which won.
#[test]
fn a_named_adapters_batch_learns_the_same_whichever_request_arrived_first() {
    let data = std::env::temp_dir().join(format!("ttrl-adapters-order-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    // A long window, so each adapter's two requests surely form one batch.
    let server = start(&data, "lr = 0.002\nbatch_window_ms = 3000\n");
    let other = "What is 4 plus 5? Answer with just the number.";
    let send = |question: &str, seed: u64, adapter: &str| {
        let body = json!({
            "model": MODEL,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 6, "seed": seed,
            "adaptation": {"enabled": true, "adapter": adapter, "rollout": "flat", "samples": 8},
        });
        let (status, r) = server.post("/v1/chat/completions", &body);
        assert_eq!(status, 200, "{r}");
        r["adaptation"].clone()
    };
    // The second request leaves half a second after the first, inside its window.
    let in_turn = |first: (&str, u64), second: (&str, u64), adapter: &str| {
        std::thread::scope(|s| {
            let early = s.spawn(|| send(first.0, first.1, adapter));
            std::thread::sleep(std::time::Duration::from_millis(500));
            let late = send(second.0, second.1, adapter);
            [early.join().unwrap(), late]
        })
    };
    // Adapter "ab" hears QUESTION (seed 11) first, "ba" the other question (seed 12).
    let reports = std::thread::scope(|s| {
        let ab = s.spawn(|| in_turn((QUESTION, 11), (other, 12), "ab"));
        let ba = s.spawn(|| in_turn((other, 12), (QUESTION, 11), "ba"));
        [ab.join().unwrap(), ba.join().unwrap()]
    });
    for r in reports.iter().flatten() {
        assert_eq!(r["batch_questions"], 2, "{r}");
        assert_eq!(r["applied"], true, "{r}");
    }
    assert_eq!(reports[0][0]["loss"], reports[1][0]["loss"]);
    let (ab, ba) = (exported(&server, "ab"), exported(&server, "ba"));
    assert_eq!(ab.len(), ba.len());
    for (name, t) in &ab {
        assert_eq!(max_abs_diff(t, &ba[name]), 0.0, "{name} differs");
    }
}

/// The same request with the same seed, sent twice, is answered the same: its fresh adapter
/// starts from its seed, not from a count of the episodes before it.
#[test]
fn an_ephemeral_episode_is_the_same_however_many_ran_before_it() {
    let data = std::env::temp_dir().join(format!("ttrl-adapters-again-{}", std::process::id()));
    let server = start(&data, LEARN);
    let flat = json!({"enabled": true, "rollout": "flat", "samples": 8});
    let first = ask(&server, MODEL, flat.clone());
    let again = ask(&server, MODEL, flat);
    assert_eq!(first["adaptation"]["applied"], true, "{first}");
    let after = |r: &Value| r["adaptation"]["step_metrics"][0]["kl_after"].clone();
    assert_eq!(after(&first), after(&again));
    assert_eq!(logprobs(&first), logprobs(&again));
}

/// The pseudo-label is the answer whose leaves weigh most, each finished leaf
/// exp(-vote_confidence x its mean entropy), as read back from the report's own leaves; the
/// votes list the label's leaves first. A steep weight makes the surest leaves decide: on
/// "What is 9 plus 8?" the label is 17 (three sure leaves) over 8 (four unsure ones).
#[test]
fn the_pseudo_label_is_the_answer_its_leaves_weigh_most() {
    let data = std::env::temp_dir().join(format!("ttrl-adapters-weigh-{}", std::process::id()));
    let server = start(&data, "vote_confidence = 8.0\n");
    for question in [
        "What is 7 plus 5? Answer with just the number.",
        "What is 6 times 3? Answer with just the number.",
        "What is 9 plus 8? Answer with just the number.",
    ] {
        let flat = json!({"enabled": true, "rollout": "flat", "samples": 16});
        let a = ask_about(&server, question, MODEL, flat)["adaptation"].clone();
        // (answer, weight, leaves), in order of first appearance.
        let mut tally: Vec<(String, f64, u64)> = Vec::new();
        for leaf in a["tree"].as_array().unwrap() {
            let Some(answer) = leaf["answer"]
                .as_str()
                .filter(|_| leaf["truncated"] == false)
            else {
                continue;
            };
            let h: Vec<f64> = leaf["entropies"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| h.as_f64().unwrap())
                .collect();
            let weight = (-8.0 * h.iter().sum::<f64>() / h.len().max(1) as f64).exp();
            match tally.iter_mut().find(|(k, ..)| k == answer) {
                Some((_, w, n)) => (*w, *n) = (*w + weight, *n + 1),
                None => tally.push((answer.to_string(), weight, 1)),
            }
        }
        let heaviest = tally.iter().max_by(|x, y| x.1.total_cmp(&y.1)).unwrap();
        assert_eq!(
            a["majority_answer"].as_str(),
            Some(heaviest.0.as_str()),
            "{a}"
        );
        assert_eq!(a["votes"][0], json!([heaviest.0, heaviest.2]), "{a}");
    }
}

/// Half of a multiple-choice question's leaves see its options in reverse order, and each
/// reports the option its letter names in the question as asked; an open question has none.
#[test]
fn a_multiple_choice_question_votes_over_both_orders_of_its_options() {
    let data = std::env::temp_dir().join(format!("ttrl-adapters-mc-{}", std::process::id()));
    let server = start(&data, "");
    let arc = "Which part of a plant takes in water and nutrients from the soil?\nA. root\nB. stem\nC. flower\nD. leaf\nAnswer with the letter of the correct option.";
    for rollout in ["flat", "tree"] {
        let r = ask_about(
            &server,
            arc,
            MODEL,
            json!({"enabled": true, "samples": 8, "rollout": rollout}),
        );
        let leaves = r["adaptation"]["tree"].as_array().unwrap().clone();
        assert_eq!(leaves.len(), 8, "{rollout}");
        let reversed = leaves.iter().filter(|l| l["options_reversed"] == true);
        assert_eq!(reversed.count(), 4, "{rollout}");
        let mut answered = 0;
        for leaf in &leaves {
            let text: String = leaf["tokens"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| t.as_str().unwrap())
                .collect();
            if leaf["truncated"] == true {
                continue;
            }
            let read = extract_answer(&text, AnswerFormat::Choice)
                .map(|a| canonical(&a, AnswerFormat::Choice));
            let named = match (&read, leaf["options_reversed"] == true) {
                (Some(letter), true) => Some(unreverse(letter, 4)),
                _ => read.clone(),
            };
            assert_eq!(leaf["answer"].as_str(), named.as_deref(), "{text:?}");
            answered += usize::from(named.is_some());
        }
        let votes: u64 = r["adaptation"]["votes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v[1].as_u64().unwrap())
            .sum();
        assert_eq!(votes as usize, answered, "{rollout}: {}", r["adaptation"]);
    }
    let open = ask(
        &server,
        MODEL,
        json!({"enabled": true, "samples": 8, "rollout": "flat"}),
    );
    let leaves = open["adaptation"]["tree"].as_array().unwrap();
    assert!(leaves.iter().all(|l| l["options_reversed"] == false));
}

#[test]
fn adaptation_fields_are_validated_with_their_names() {
    let data = std::env::temp_dir().join(format!("ttrl-adapters-val-{}", std::process::id()));
    let config = config_file("");
    let server = Server::tiny(&server_args(
        config.to_str().unwrap(),
        data.to_str().unwrap(),
    ));
    let cases = [
        (json!({"enabled": "yes"}), "adaptation.enabled"),
        (
            json!({"enabled": true, "method": "ppo"}),
            "adaptation.method",
        ),
        (
            json!({"enabled": true, "rollout": "beam"}),
            "adaptation.rollout",
        ),
        (json!({"enabled": true, "samples": 1}), "adaptation.samples"),
        (json!({"enabled": true, "steps": 99}), "adaptation.steps"),
        (
            json!({"enabled": true, "answer_format": "latex"}),
            "adaptation.answer_format",
        ),
        (
            json!({"enabled": true, "adapter": "../etc"}),
            "adaptation.adapter",
        ),
        (json!({"enabled": true, "colour": 1}), "adaptation.colour"),
        (json!(7), "adaptation"),
    ];
    for (adaptation, param) in cases {
        let body =
            json!({"messages": [{"role": "user", "content": "x"}], "adaptation": adaptation});
        let (status, r) = server.post("/v1/chat/completions", &body);
        assert_eq!(status, 400, "{r}");
        assert_eq!(r["error"]["param"], param, "{r}");
    }
    // The alias switches adaptation on for clients that cannot send extra fields.
    let (status, r) = server.post("/v1/chat/completions", &json!({"model": "tiny-llama+ttrl", "messages": [{"role": "user", "content": "1+1?"}], "max_tokens": 2}));
    assert_eq!(status, 200, "{r}");
    assert!(r["adaptation"]["rollouts"].as_u64().unwrap() > 0);
    // An adapter that does not exist is a model that does not exist.
    let (status, r) = server.post("/v1/chat/completions", &json!({"model": "tiny-llama:nobody", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}));
    assert_eq!(status, 404, "{r}");
    assert_eq!(r["error"]["code"], "model_not_found", "{r}");
    assert_eq!(r["error"]["type"], "invalid_request_error", "{r}");
}

fn smollm2() -> ttrl_serve::model::loader::LoadedModel {
    let path = assets::default_model().expect("the default model is fetched from the registry");
    loader::load_gguf(&path, DType::F32, &Device::Cpu).unwrap()
}

fn question(m: &ttrl_serve::model::loader::LoadedModel) -> Question {
    let text = m
        .tokenizer
        .apply_chat_template(&[ChatMessage::user(QUESTION)])
        .unwrap();
    let prompt = m.tokenizer.encode(&text).unwrap();
    Question::new(QUESTION.into(), prompt, AnswerFormat::Auto)
}

/// A fresh ephemeral-style adapter (seed 0) and its optimizer.
fn fresh_learner(m: &ttrl_serve::model::loader::LoadedModel, config: &AdaptConfig) -> Learner {
    let adapter = Adapter::new(
        "e",
        config.lora.clone(),
        m.model.config(),
        DType::F32,
        m.model.device(),
        0,
    )
    .unwrap();
    Learner::new(adapter, config, 0).unwrap()
}

#[test]
fn an_episode_changes_only_lora_weights() {
    let m = smollm2();
    let base: Vec<Vec<f32>> = m
        .model
        .base_tensors()
        .iter()
        .map(|t| t.flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    let config = AdaptConfig {
        max_tokens: 64,
        samples: 12,
        rollout: RolloutKind::Flat,
        steps: 1,
        lr: 0.01,
        kl_bound: 100.0,
        ..Default::default()
    };
    let mut learner = fresh_learner(&m, &config);
    let before: HashMap<String, Tensor> = learner.adapter.snapshot().unwrap();
    let q = question(&m);
    let report = run_episode(
        &m.model,
        &m.tokenizer,
        &mut learner,
        &[q],
        &config,
        7,
        &EpisodeLimits::default(),
    )
    .unwrap();
    assert!(report.applied, "{report:?}");
    assert_eq!(learner.version, 1);
    let after_base: Vec<Vec<f32>> = m
        .model
        .base_tensors()
        .iter()
        .map(|t| t.flatten_all().unwrap().to_vec1().unwrap())
        .collect();
    assert_eq!(base, after_base, "a frozen weight changed");
    let changed = learner
        .adapter
        .named_tensors()
        .iter()
        .filter(|(k, t)| max_abs_diff(t, &before[*k]) > 0.0)
        .count();
    assert!(changed > 0, "no LoRA tensor changed");
}

/// An episode that runs out of time in a later round keeps the rounds it finished, says so,
/// and counts only those in the adapter's version.
#[test]
fn an_episode_out_of_time_keeps_the_rounds_it_finished() {
    let m = smollm2();
    let config = |steps| AdaptConfig {
        max_tokens: 64,
        samples: 8,
        rollout: RolloutKind::Flat,
        steps,
        kl_bound: 100.0,
        ..Default::default()
    };
    let q = question(&m);
    // The same seed gives the eight-round episode the same first round, so a deadline of
    // 1.8 rounds falls after its first round and before its eighth.
    let one = config(1);
    let started = Instant::now();
    let report = run_episode(
        &m.model,
        &m.tokenizer,
        &mut fresh_learner(&m, &one),
        std::slice::from_ref(&q),
        &one,
        7,
        &EpisodeLimits::default(),
    )
    .unwrap();
    assert!(report.applied, "{report:?}");
    let round = started.elapsed().as_secs_f64();

    let eight = config(8);
    let mut late = fresh_learner(&m, &eight);
    let limits = EpisodeLimits {
        interrupt: Interrupt::after_seconds(1.8 * round),
        ..EpisodeLimits::default()
    };
    let report = run_episode(&m.model, &m.tokenizer, &mut late, &[q], &eight, 7, &limits).unwrap();
    let finished = report.steps.len();
    assert!(report.applied, "{report:?}");
    assert!((1..8).contains(&finished), "{finished} rounds finished");
    let applied = report.steps.iter().filter(|s| s.applied).count();
    assert_eq!(late.version, applied as u64);
    let note = report.note.unwrap_or_default();
    assert!(
        note.contains(&format!("stopped after {finished} of 8 rounds"))
            && note.contains("max_episode_seconds"),
        "{note}"
    );
}
