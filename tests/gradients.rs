use candle_core::{DType, Device, Tensor, D};
use ttrl_serve::adapt::{AdamW, AdamWConfig};
use ttrl_serve::model::lora::lora_dtype;
use ttrl_serve::model::{Adapter, LogitsFor, LoraConfig, Model, SeqInput};

use crate::common::{
    expected, half_dtype, load_tiny, load_tiny_on, max_abs_diff, randomized_adapter, FAMILIES,
};

/// -mean_t A_seq * log p(token_t+1 | prefix), the shape of a policy-gradient loss.
fn pg_loss(model: &Model, adapter: Option<&Adapter>, ids: &[Vec<u32>]) -> Tensor {
    let advantages = [1.0, -0.5];
    let mut terms = Vec::new();
    for (seq, adv) in ids.iter().zip(advantages) {
        let logits = model
            .forward(&mut [SeqInput::new(seq)], adapter, LogitsFor::All)
            .unwrap();
        // Log-probs in f32 under a half-precision model, as the adaptation objective takes them.
        let logits = logits.to_dtype(lora_dtype(logits.dtype())).unwrap();
        let logp = candle_nn::ops::log_softmax(&logits, D::Minus1).unwrap();
        let n = seq.len() - 1;
        let next: Vec<u32> = seq[1..].to_vec();
        let next = Tensor::new(next.as_slice(), model.device())
            .unwrap()
            .reshape((n, 1))
            .unwrap();
        let picked = logp.narrow(0, 0, n).unwrap().gather(&next, 1).unwrap();
        terms.push((picked.mean_all().unwrap() * adv).unwrap());
    }
    (Tensor::stack(&terms, 0).unwrap().sum_all().unwrap() * -1.0).unwrap()
}

#[test]
fn every_lora_tensor_gets_a_gradient_and_no_base_weight_does() {
    for family in FAMILIES {
        let m = load_tiny(family, DType::F32);
        let adapter = randomized_adapter(&m.model, DType::F32, 0);
        let (ids, _) = expected(family);
        let grads = pg_loss(&m.model, Some(&adapter), &ids).backward().unwrap();
        for (i, var) in adapter.vars().iter().enumerate() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{family}: LoRA tensor {i} has no gradient"));
            let norm = g
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(norm > 0.0, "{family}: LoRA tensor {i} has a zero gradient");
        }
        for t in m.model.base_tensors() {
            assert!(
                grads.get(&t).is_none(),
                "{family}: a frozen tensor of shape {:?} got a gradient",
                t.dims()
            );
        }
    }
}

#[test]
fn finite_differences_agree_with_autograd_in_f64() {
    for family in FAMILIES {
        let m = load_tiny(family, DType::F64);
        let adapter = randomized_adapter(&m.model, DType::F64, 0);
        let (ids, _) = expected(family);
        let grads = pg_loss(&m.model, Some(&adapter), &ids).backward().unwrap();
        let vars = adapter.vars();
        let picks = [
            (0usize, 3usize),
            (1, 5),
            (vars.len() / 2, 7),
            (vars.len() - 1, 2),
        ];
        for (vi, elem) in picks {
            let var = &vars[vi];
            let autograd = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()[elem];
            let original = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            let eps = 1e-5;
            let loss_at = |delta: f64| {
                let mut v = original.clone();
                v[elem] += delta;
                var.set(&Tensor::from_vec(v, var.dims(), var.device()).unwrap())
                    .unwrap();
                pg_loss(&m.model, Some(&adapter), &ids)
                    .to_scalar::<f64>()
                    .unwrap()
            };
            let fd = (loss_at(eps) - loss_at(-eps)) / (2.0 * eps);
            loss_at(0.0);
            let rel = (fd - autograd).abs() / fd.abs().max(autograd.abs()).max(1e-12);
            assert!(
                rel < 1e-4,
                "{family} var {vi}[{elem}]: fd {fd} autograd {autograd} rel {rel}"
            );
        }
    }
}

#[test]
fn one_adamw_step_changes_the_next_token_distribution_and_lora_off_is_the_base() {
    let m = load_tiny("qwen2", DType::F32);
    let (ids, want) = expected("qwen2");
    let base = |adapter: Option<&Adapter>| {
        m.model
            .forward(&mut [SeqInput::new(&ids[0])], adapter, LogitsFor::All)
            .unwrap()
    };
    let before = base(None);
    let adapter = Adapter::new(
        "a",
        LoraConfig::default(),
        m.model.config(),
        DType::F32,
        m.model.device(),
        0,
    )
    .unwrap();
    // A fresh adapter (B = 0) is exactly the base model.
    assert_eq!(max_abs_diff(&base(Some(&adapter)), &before), 0.0);
    let mut opt = AdamW::new(
        adapter.vars(),
        AdamWConfig {
            lr: 1e-2,
            ..Default::default()
        },
    )
    .unwrap();
    let grads = pg_loss(&m.model, Some(&adapter), &ids).backward().unwrap();
    opt.step(&grads).unwrap();
    let after = base(Some(&adapter));
    let moved = max_abs_diff(&after, &before);
    assert!(moved > 1e-3, "the step moved the logits by only {moved}");
    // LoRA off reproduces the base logits bit for bit.
    assert_eq!(max_abs_diff(&base(None), &before), 0.0);
    assert!(max_abs_diff(&before, &want.get(0).unwrap()) < 1e-4);
}

/// Cosine similarity and norm ratio of two gradients, on the CPU in f64.
fn agreement(a: &Tensor, b: &Tensor) -> (f64, f64) {
    let host = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    let (a, b) = (host(a), host(b));
    let dot: f64 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
    (dot / (norm(&a) * norm(&b)), norm(&a) / norm(&b))
}

#[test]
fn lora_gradients_under_a_half_precision_base_on_the_test_device_match_f32_on_the_cpu() {
    for family in FAMILIES {
        let reference = load_tiny_on(family, DType::F32, &Device::Cpu);
        let adapter = randomized_adapter(&reference.model, DType::F32, 0);
        let (ids, _) = expected(family);
        let want = pg_loss(&reference.model, Some(&adapter), &ids)
            .backward()
            .unwrap();

        // The serving setup: 16-bit weights on the device, LoRA kept in f32 beside them.
        let half = load_tiny(family, half_dtype());
        let on_device = Adapter::new(
            "t",
            adapter.config().clone(),
            half.model.config(),
            lora_dtype(half_dtype()),
            half.model.device(),
            1,
        )
        .unwrap();
        on_device.set_tensors(&adapter.named_tensors()).unwrap();
        let got = pg_loss(&half.model, Some(&on_device), &ids)
            .backward()
            .unwrap();
        for (i, (w, g)) in adapter.vars().iter().zip(on_device.vars()).enumerate() {
            assert_eq!(g.dtype(), DType::F32);
            let (cosine, ratio) = agreement(
                want.get(w.as_tensor()).unwrap(),
                got.get(g.as_tensor()).unwrap(),
            );
            assert!(
                cosine > 0.99 && (0.95..1.05).contains(&ratio),
                "{family} LoRA tensor {i}: cosine {cosine}, norm ratio {ratio}"
            );
        }
    }
}

/// The update holds the logits of a few leaves at a time (the loss is taken chunk by chunk
/// from the final hidden states), and a large micro-batch keeps the graph of only as many of
/// its last layers as its budget holds (the others are recomputed in backward). Its value and
/// every LoRA gradient equal those of the whole loss computed directly, one unpacked forward
/// per leaf with the whole graph, with chunks of one leaf, two and all three, with the packed
/// batch's graph kept whole, with every layer recomputed, and with budgets in between
/// (doubling around the tiny model's ~55 KB per layer, so one of them keeps only the last
/// layer).
#[test]
fn the_training_loss_by_logit_chunks_kept_or_recomputed_has_the_value_and_gradients_of_the_whole_one(
) {
    for kept_activation_bytes in [usize::MAX, 0, 1 << 15, 1 << 16, 1 << 17] {
        let mut loaded = load_tiny("llama", DType::F32);
        loaded
            .model
            .set_kept_activation_bytes(kept_activation_bytes);
        chunked_loss_equals_the_whole_one(&loaded.model);
    }
}

fn chunked_loss_equals_the_whole_one(model: &Model) {
    use ttrl_serve::adapt::objective::{
        leaf_loss, leaves_loss, Denominators, ObjectiveConfig, ObjectiveStats, TrainLeaf,
        LOGIT_ROWS,
    };
    let adapter = randomized_adapter(model, DType::F32, 0);
    let leaf = |prompt: &[u32], response: Vec<u32>, advantage: f32, policy_from: usize| {
        let n = response.len();
        TrainLeaf {
            prompt: prompt.to_vec(),
            old_logprobs: (0..n).map(|i| -5.4 - 0.05 * i as f32).collect(),
            ref_logprobs: (0..n).map(|i| -5.6 + 0.03 * i as f32).collect(),
            mask: (0..n).map(|i| i % 3 != 1).collect(),
            policy_from,
            response,
            advantage,
        }
    };
    // Two responses share a prompt (packed once); a third has its own. The first's policy
    // term reads only its selected tokens from position 2 on (3 of 4).
    let (a, b) = ([1u32, 5, 9, 13], [2u32, 7]);
    let leaves = vec![
        leaf(&a, vec![20, 30, 40, 50, 60], 1.0, 2),
        leaf(&a, vec![21, 31, 41], -0.5, 0),
        leaf(&b, vec![100, 120, 140, 160], 0.7, 0),
    ];
    let config = ObjectiveConfig {
        temperature: 0.8,
        clip_epsilon: 0.2,
        lambda_kl: 0.1,
        lambda_band: 0.5,
        logit_rows: LOGIT_ROWS,
    };
    // A band the tiny model's entropies (about ln 267) lie above: that term is active.
    let denom = Denominators {
        selected_tokens: 8.0,
        policy_tokens: 6.0,
        band: Some((1.0, 2.0)),
    };

    let mut whole = Tensor::zeros((), DType::F32, &Device::Cpu).unwrap();
    let mut stats = ObjectiveStats::default();
    for l in &leaves {
        let seq: Vec<u32> = l.prompt.iter().chain(&l.response).copied().collect();
        let logits = model
            .forward(&mut [SeqInput::new(&seq)], Some(&adapter), LogitsFor::All)
            .unwrap();
        let n = l.response.len();
        let rows = (logits.narrow(0, l.prompt.len() - 1, n).unwrap() / 0.8).unwrap();
        let logp_all = candle_nn::ops::log_softmax(&rows, D::Minus1).unwrap();
        let ids = Tensor::new(l.response.as_slice(), &Device::Cpu)
            .unwrap()
            .reshape((n, 1))
            .unwrap();
        let logp = logp_all.gather(&ids, 1).unwrap().squeeze(1).unwrap();
        let entropy = (logp_all.exp().unwrap() * &logp_all)
            .unwrap()
            .sum(D::Minus1)
            .unwrap()
            .neg()
            .unwrap();
        let selected: Vec<u32> = l.selected().iter().map(|&i| i as u32).collect();
        let selected = Tensor::new(selected.as_slice(), &Device::Cpu).unwrap();
        let (logp, entropy) = (
            logp.index_select(&selected, 0).unwrap(),
            entropy.index_select(&selected, 0).unwrap(),
        );
        let term = leaf_loss(l, &logp, &entropy, &config, denom, &mut stats).unwrap();
        whole = (whole + term).unwrap();
    }
    let value = f64::from(whole.to_scalar::<f32>().unwrap());
    let whole_grads = whole.backward().unwrap();
    // The leaves have 4, 2 and 3 selected tokens: logits of one leaf at a time, of the first
    // two and then the third, and of all three at once.
    for logit_rows in [1, 6, LOGIT_ROWS] {
        let config = ObjectiveConfig {
            logit_rows,
            ..config
        };
        let chunked = leaves_loss(model, &adapter, &leaves, &config, denom).unwrap();
        assert!(
            (value - chunked.value).abs() < 1e-5,
            "{value} vs {} ({logit_rows} logit rows)",
            chunked.value
        );
        let mut compared = 0;
        for (var, c) in adapter.vars().iter().zip(&chunked.grads) {
            let (w, c) = (
                whole_grads.get(var.as_tensor()).unwrap(),
                c.as_ref().unwrap(),
            );
            let scale = max_abs_diff(w, &w.zeros_like().unwrap()).max(1e-6);
            let diff = max_abs_diff(w, c);
            assert!(
                diff / scale < 1e-4,
                "gradient differs by {diff} (scale {scale}, {logit_rows} logit rows)"
            );
            compared += 1;
        }
        assert_eq!(compared, adapter.vars().len());
    }
}
