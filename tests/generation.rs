use candle_core::DType;
use ttrl_serve::adapt::objective::{reference, TrainLeaf};
use ttrl_serve::generation::{decode_step, decode_step_mixed, run_to_end, Sequence, StopRules};
use ttrl_serve::interrupt::Interrupt;
use ttrl_serve::model::{Adapter, LoadedModel, LogitsFor, LoraConfig, SeqInput};
use ttrl_serve::reward::AnswerFormat;
use ttrl_serve::rollout::{self, Prompt, RolloutConfig, RolloutKind, TreeShape};
use ttrl_serve::sampling::{log_softmax_entropy, Sampler, Sampling};

use crate::common::{load_tiny, randomized_adapter};

fn rules(max_tokens: usize) -> StopRules {
    StopRules {
        max_tokens,
        stop_ids: Vec::new(),
        stop_strings: Vec::new(),
    }
}

fn prompts() -> Vec<Vec<u32>> {
    vec![
        vec![1, 40, 50, 60, 7],
        vec![1, 9, 9],
        vec![3, 200, 100, 17, 18, 19, 20],
        vec![42],
    ]
}

fn run_alone(m: &LoadedModel, prompt: &[u32], seed: u64, max_tokens: usize) -> Vec<u32> {
    let sampler = Sampler::new(Sampling::new(0.9, None, 0.95), seed);
    let mut seq = Sequence::new(&m.model, prompt.to_vec(), sampler, rules(max_tokens), 0);
    run_to_end(&m.model, &m.tokenizer, std::slice::from_mut(&mut seq), None).unwrap();
    seq.generated().iter().map(|t| t.id).collect()
}

#[test]
fn a_fixed_seed_reproduces_the_tokens() {
    let m = load_tiny("llama", DType::F32);
    let a = run_alone(&m, &prompts()[0], 11, 20);
    assert_eq!(a, run_alone(&m, &prompts()[0], 11, 20));
    assert_ne!(
        a,
        run_alone(&m, &prompts()[0], 12, 20),
        "another seed should differ on a random model"
    );
}

#[test]
fn batched_decoding_gives_the_same_tokens_as_one_at_a_time() {
    for family in ["llama", "qwen3"] {
        let m = load_tiny(family, DType::F32);
        let alone: Vec<Vec<u32>> = prompts()
            .iter()
            .enumerate()
            .map(|(i, p)| run_alone(&m, p, i as u64, 12 + i))
            .collect();
        let mut seqs: Vec<Sequence> = prompts()
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                Sequence::new(
                    &m.model,
                    p,
                    Sampler::new(Sampling::new(0.9, None, 0.95), i as u64),
                    rules(12 + i),
                    0,
                )
            })
            .collect();
        // Sequences join late too: the last one starts after three steps (continuous batching).
        let mut late = seqs.pop().unwrap();
        for step in 0.. {
            let mut batch: Vec<&mut Sequence> = seqs.iter_mut().collect();
            if step >= 3 {
                batch.push(&mut late);
            }
            if batch.iter().all(|s| s.is_finished()) {
                break;
            }
            decode_step(&m.model, &m.tokenizer, &mut batch, None).unwrap();
        }
        seqs.push(late);
        for (i, s) in seqs.iter().enumerate() {
            let ids: Vec<u32> = s.generated().iter().map(|t| t.id).collect();
            assert_eq!(ids, alone[i], "{family} sequence {i}");
        }
    }
}

#[test]
fn reported_entropy_and_logprob_equal_a_direct_computation_from_the_logits() {
    let m = load_tiny("qwen2", DType::F32);
    let t = 0.7;
    let mut seq = Sequence::new(
        &m.model,
        prompts()[2].clone(),
        Sampler::new(Sampling::new(t, None, 1.0), 5),
        rules(10),
        0,
    );
    run_to_end(&m.model, &m.tokenizer, std::slice::from_mut(&mut seq), None).unwrap();
    let all = seq.tokens().to_vec();
    let logits = m
        .model
        .forward(&mut [SeqInput::new(&all)], None, LogitsFor::All)
        .unwrap();
    let rows = logits.to_vec2::<f32>().unwrap();
    for (k, tok) in seq.generated().iter().enumerate() {
        let (logp, h) = log_softmax_entropy(&rows[seq.prompt_len() + k - 1], t);
        assert!(
            (tok.entropy as f64 - h).abs() < 1e-4,
            "token {k}: {} vs {h}",
            tok.entropy
        );
        assert!((tok.logprob as f64 - logp[tok.id as usize]).abs() < 1e-4);
        // And the direct formula: H = -sum p log p over the full vocabulary (the sampler's
        // weights are f32 exponentials).
        let direct: f64 = -logp.iter().map(|lp| lp.exp() * lp).sum::<f64>();
        assert!((direct - h).abs() < 1e-5);
    }
}

/// Adaptation skips its reference pass for a fresh adapter and uses what the rollouts
/// recorded instead: that is sound only if they are the reference pass's numbers.
#[test]
fn a_fresh_adapters_sampled_logprobs_and_entropies_are_the_base_models_reference() {
    let m = load_tiny("llama", DType::F32);
    let t = 0.8;
    let fresh = Adapter::new(
        "fresh",
        LoraConfig::default(),
        m.model.config(),
        DType::F32,
        m.model.device(),
        3,
    )
    .unwrap();
    assert!(fresh.is_identity().unwrap());
    let prompt = prompts()[0].clone();
    let sampler = Sampler::new(Sampling::new(t, None, 0.95), 11);
    let mut seq = Sequence::new(&m.model, prompt.clone(), sampler, rules(12), 0);
    let seqs = std::slice::from_mut(&mut seq);
    run_to_end(&m.model, &m.tokenizer, seqs, Some(&fresh)).unwrap();
    let leaf = TrainLeaf {
        prompt,
        response: seq.generated().iter().map(|g| g.id).collect(),
        old_logprobs: Vec::new(),
        ref_logprobs: Vec::new(),
        mask: vec![true; seq.generated().len()],
        policy_from: 0,
        advantage: 0.0,
    };
    let (logp, entropy) = reference(&m.model, &[&leaf], 1, t).unwrap().remove(0);
    for (k, g) in seq.generated().iter().enumerate() {
        assert!(
            (g.logprob - logp[k]).abs() < 1e-4,
            "token {k}: {} vs {}",
            g.logprob,
            logp[k]
        );
        assert!((g.entropy - entropy[k]).abs() < 1e-4, "token {k}");
    }
    // A trained adapter is not the base model, and is not taken for one.
    assert!(!randomized_adapter(&m.model, DType::F32, 0)
        .is_identity()
        .unwrap());
}

#[test]
fn a_forks_first_logits_equal_teacher_forcing_of_the_parents_prefix() {
    let m = load_tiny("qwen3", DType::F32);
    let mut parent = Sequence::new(
        &m.model,
        prompts()[0].clone(),
        Sampler::new(Sampling::new(1.0, None, 1.0), 3),
        rules(12),
        8,
    );
    run_to_end(
        &m.model,
        &m.tokenizer,
        std::slice::from_mut(&mut parent),
        None,
    )
    .unwrap();
    for at in [0usize, 4, 9] {
        let mut child = parent
            .fork(
                at,
                Sampler::new(Sampling::new(1.0, None, 1.0), 100 + at as u64),
                &m.tokenizer,
            )
            .unwrap();
        decode_step(&m.model, &m.tokenizer, &mut [&mut child], None).unwrap();
        let first = &child.generated()[at];
        assert_eq!(
            &child.tokens()[..parent.prompt_len() + at],
            &parent.tokens()[..parent.prompt_len() + at]
        );
        // Teacher forcing of the parent's prefix, without any cache.
        let prefix = &parent.tokens()[..parent.prompt_len() + at];
        let logits = m
            .model
            .forward(&mut [SeqInput::new(prefix)], None, LogitsFor::Last)
            .unwrap();
        let row = &logits.to_vec2::<f32>().unwrap()[0];
        let (logp, h) = log_softmax_entropy(row, 1.0);
        assert!((first.entropy as f64 - h).abs() < 1e-4);
        // The fork token is a plain draw from the unmodified policy: the same sampler on the
        // teacher-forced logits picks it (the parent's token is not excluded).
        let replay = Sampler::new(Sampling::new(1.0, None, 1.0), 100 + at as u64).sample(row, 0);
        assert_eq!(first.id, replay.id, "fork at {at}");
        for (id, lp) in &first.top {
            assert!(
                (*lp as f64 - logp[*id as usize]).abs() < 1e-4,
                "fork at {at}: token {id}"
            );
        }
        // The parent's own record at that position saw the same distribution.
        assert_eq!(
            parent.generated()[at]
                .top
                .iter()
                .map(|t| t.0)
                .collect::<Vec<_>>(),
            first.top.iter().map(|t| t.0).collect::<Vec<_>>()
        );
    }
}

#[test]
fn stop_strings_and_stop_tokens_end_a_sequence() {
    let m = load_tiny("llama", DType::F32);
    let free = run_alone(&m, &prompts()[1], 4, 16);
    let stop_id = free[5];
    let mut seq = Sequence::new(
        &m.model,
        prompts()[1].clone(),
        Sampler::new(Sampling::new(0.9, None, 0.95), 4),
        StopRules {
            max_tokens: 16,
            stop_ids: vec![stop_id],
            stop_strings: Vec::new(),
        },
        0,
    );
    run_to_end(&m.model, &m.tokenizer, std::slice::from_mut(&mut seq), None).unwrap();
    let n = free.iter().position(|&t| t == stop_id).unwrap() + 1;
    assert_eq!(seq.generated().len(), n);
    assert_eq!(seq.finish_reason().map(|f| f.as_str()), Some("stop"));

    let text = m.tokenizer.decode(&free).unwrap();
    let stop: String = text.chars().skip(3).take(2).collect();
    let mut seq = Sequence::new(
        &m.model,
        prompts()[1].clone(),
        Sampler::new(Sampling::new(0.9, None, 0.95), 4),
        StopRules {
            max_tokens: 16,
            stop_ids: Vec::new(),
            stop_strings: vec![stop.clone()],
        },
        0,
    );
    run_to_end(&m.model, &m.tokenizer, std::slice::from_mut(&mut seq), None).unwrap();
    assert!(
        !seq.text().contains(&stop),
        "{:?} still holds {stop:?}",
        seq.text()
    );
    assert!(text.starts_with(seq.text()));
}

#[test]
fn random_weights_of_any_config_build_a_model_that_decodes_every_id() {
    use ttrl_serve::model::{ModelConfig, ModelSource};
    let config = crate::common::fixture_dir("qwen3").join("config.json");
    let spec = format!("random:{}", config.display());
    let LoadedModel {
        model, tokenizer, ..
    } = ModelSource::parse(&spec)
        .load(DType::F32, &candle_core::Device::Cpu)
        .unwrap();
    assert_eq!(tokenizer.vocab_size(), model.config().vocab_size);
    let mut seq = Sequence::new(
        &model,
        vec![1, 2, 3],
        Sampler::new(Sampling::new(1.0, None, 1.0), 0),
        rules(8),
        0,
    );
    run_to_end(&model, &tokenizer, std::slice::from_mut(&mut seq), None).unwrap();
    assert_eq!(seq.generated().len(), 8);
    assert!(seq.text().starts_with('<'), "{}", seq.text());

    // The shipped shapes parse as the architectures they name.
    let shapes = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/shapes");
    for (shape, layers, vocab) in [("smollm2-135m", 30, 49152), ("qwen2.5-1.5b", 28, 151936)] {
        let text = std::fs::read_to_string(shapes.join(shape).join("config.json")).unwrap();
        let c = ModelConfig::from_hf_json(&text).unwrap();
        assert_eq!(
            (c.num_hidden_layers, c.vocab_size),
            (layers, vocab),
            "{shape}"
        );
    }
}

#[test]
fn a_batch_mixing_adapters_gives_each_sequence_the_tokens_of_its_adapter_alone() {
    let m = load_tiny("llama", DType::F32);
    let (a, b) = (
        randomized_adapter(&m.model, DType::F32, 1),
        randomized_adapter(&m.model, DType::F32, 2),
    );
    let lora: [Option<&Adapter>; 4] = [None, Some(&a), Some(&b), Some(&a)];
    let new_seq = |i: usize| {
        Sequence::new(
            &m.model,
            prompts()[i].clone(),
            Sampler::new(Sampling::new(0.9, None, 0.95), i as u64),
            rules(10),
            0,
        )
    };
    let alone: Vec<Vec<u32>> = (0..4)
        .map(|i| {
            let mut seq = new_seq(i);
            run_to_end(
                &m.model,
                &m.tokenizer,
                std::slice::from_mut(&mut seq),
                lora[i],
            )
            .unwrap();
            seq.generated().iter().map(|t| t.id).collect()
        })
        .collect();
    assert_ne!(
        alone[1],
        run_alone(&m, &prompts()[1], 1, 10),
        "the adapter must matter"
    );
    let mut seqs: Vec<Sequence> = (0..4).map(new_seq).collect();
    while seqs.iter().any(|s| !s.is_finished()) {
        let mut batch: Vec<&mut Sequence> = seqs.iter_mut().collect();
        decode_step_mixed(&m.model, &m.tokenizer, &mut batch, &lora).unwrap();
    }
    for (i, s) in seqs.iter().enumerate() {
        let ids: Vec<u32> = s.generated().iter().map(|t| t.id).collect();
        assert_eq!(ids, alone[i], "sequence {i}");
    }
}

#[test]
fn a_tree_grows_branches_from_roots_and_branches_that_share_their_parents_prefix() {
    let m = load_tiny("llama", DType::F32);
    let questions = prompts();
    let prompts: Vec<Prompt<'_>> = questions[..2]
        .iter()
        .enumerate()
        .map(|(q, p)| Prompt {
            tokens: p,
            format: AnswerFormat::Number,
            question: q,
            leaves: 8,
        })
        .collect();
    let config = RolloutConfig {
        kind: RolloutKind::Tree,
        tree: TreeShape::for_samples(8, 3, 1, 1),
        temperature: 1.0,
        top_p: 1.0,
        max_tokens: 14,
        seed: 5,
        max_batch: 16,
    };
    let out = rollout::run(
        &m.model,
        &m.tokenizer,
        None,
        &prompts,
        &config,
        &Interrupt::never(),
    )
    .unwrap();
    // Two roots per question, then three rounds of one fork each: 2 x (1 + 3) per question.
    assert_eq!(out.leaves.len(), 16);
    let mut counted = 0;
    let mut second_level = 0;
    for (i, leaf) in out.leaves.iter().enumerate() {
        let Some((parent, at)) = leaf.fork else {
            counted += leaf.response.len();
            continue;
        };
        let p = &out.leaves[parent];
        assert!(parent < i && p.question == leaf.question);
        assert_eq!(leaf.response[..at], p.response[..at], "leaf {i}");
        counted += leaf.response.len() - at;
        // A fork lies in its parent's own tokens, past (and not next to) the parent's fork.
        match p.fork {
            Some((_, parent_at)) => {
                assert!(at > parent_at + 1, "leaf {i} forks {parent} at {at}");
                second_level += 1;
            }
            None => assert!(at >= 1),
        }
        // Two forks of one leaf are never adjacent or equal.
        let mut earlier_forks = 0;
        for other in &out.leaves[..i] {
            if let Some((q, other_at)) = other.fork {
                assert!(q != parent || other_at.abs_diff(at) > 1, "leaf {i}");
                earlier_forks += usize::from(q == parent);
            }
        }
        // A leaf's first fork is its most surprising token (EPTree's -log p) among the ones
        // open to it before that point: its own, past its own fork's neighbour.
        if earlier_forks == 0 {
            let open = p.fork.map_or(1, |(_, parent_at)| parent_at + 2);
            for j in open..at {
                assert!(p.logprobs[j] >= p.logprobs[at], "leaf {i}: {j} beats {at}");
            }
        }
    }
    assert!(second_level > 0, "no branch was forked again");
    assert_eq!(out.generated_tokens, counted);
    assert_eq!(
        out.flat_equivalent_tokens,
        out.leaves.iter().map(|l| l.response.len()).sum::<usize>()
    );
    assert!(out.generated_tokens < out.flat_equivalent_tokens);
}
