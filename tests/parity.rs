use candle_core::{DType, Device, Tensor};
use ttrl_serve::model::{loader, LogitsFor, SeqInput};

use crate::common::{expected, fixture_dir, half_dtype, load_tiny, max_abs_diff, FAMILIES};

#[test]
fn full_sequence_logits_match_transformers_for_every_family() {
    for family in FAMILIES {
        let m = load_tiny(family, DType::F32);
        let (ids, want) = expected(family);
        let mut inputs: Vec<SeqInput> = ids.iter().map(|s| SeqInput::new(s)).collect();
        let got = m.model.forward(&mut inputs, None, LogitsFor::All).unwrap();
        let got = got.reshape(want.dims()).unwrap();
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 1e-4, "{family}: max |diff| {diff}");
    }
}

#[test]
fn kv_cache_path_reproduces_full_sequence_logits_at_every_position() {
    for family in FAMILIES {
        let m = load_tiny(family, DType::F32);
        let (ids, want) = expected(family);
        for (b, seq) in ids.iter().enumerate() {
            let mut cache = m.model.new_cache();
            // Prefill 5 tokens at once, then one token per step.
            let prefill = m
                .model
                .forward(
                    &mut [SeqInput::cached(&seq[..5], &mut cache)],
                    None,
                    LogitsFor::All,
                )
                .unwrap();
            let mut rows = vec![prefill];
            for t in 5..seq.len() {
                let step = m
                    .model
                    .forward(
                        &mut [SeqInput::cached(&seq[t..t + 1], &mut cache)],
                        None,
                        LogitsFor::Last,
                    )
                    .unwrap();
                rows.push(step);
            }
            let got = Tensor::cat(&rows, 0).unwrap();
            let diff = max_abs_diff(&got, &want.get(b).unwrap());
            assert!(diff < 1e-4, "{family} seq {b}: max |diff| {diff}");
            assert_eq!(cache.len(), seq.len());
        }
    }
}

#[test]
fn gguf_of_the_same_weights_gives_the_same_logits() {
    for family in FAMILIES {
        let m = loader::load_gguf(
            &fixture_dir(family).join("model.gguf"),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        let (ids, want) = expected(family);
        let mut inputs: Vec<SeqInput> = ids.iter().map(|s| SeqInput::new(s)).collect();
        let got = m
            .model
            .forward(&mut inputs, None, LogitsFor::All)
            .unwrap()
            .reshape(want.dims())
            .unwrap();
        let diff = max_abs_diff(&got, &want);
        assert!(diff < 1e-4, "{family} gguf: max |diff| {diff}");
    }
}

#[test]
fn gguf_tokenizer_and_template_match_the_hf_files() {
    let hf = load_tiny("llama", DType::F32);
    let gguf = loader::load_gguf(
        &fixture_dir("llama").join("model.gguf"),
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    for text in [
        "the answer is 1234.",
        "<|im_start|>user\nHi there<|im_end|>\n",
        "  spaces\tand\nlines é",
    ] {
        assert_eq!(
            hf.tokenizer.encode(text).unwrap(),
            gguf.tokenizer.encode(text).unwrap(),
            "{text:?}"
        );
        let ids = hf.tokenizer.encode(text).unwrap();
        assert_eq!(
            hf.tokenizer.decode(&ids).unwrap(),
            gguf.tokenizer.decode(&ids).unwrap()
        );
    }
    let msgs = [ttrl_serve::model::ChatMessage::user("2+2?")];
    let rendered = hf.tokenizer.apply_chat_template(&msgs).unwrap();
    assert_eq!(
        rendered,
        "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    assert_eq!(rendered, gguf.tokenizer.apply_chat_template(&msgs).unwrap());
    // The special token is one id, not spelled out byte by byte.
    let ids = hf.tokenizer.encode(&rendered).unwrap();
    assert_eq!(ids[0], 1, "<|im_start|> is id 1 in the tiny vocabulary");
    assert_eq!(hf.tokenizer.stop_ids(), gguf.tokenizer.stop_ids());
}

#[test]
fn responses_sharing_a_prompt_prefix_get_the_logits_of_full_sequences() {
    for family in FAMILIES {
        let m = load_tiny(family, DType::F32);
        let (ids, _) = expected(family);
        let prompt = &ids[0][..9];
        let responses = [&ids[0][9..], &ids[1][3..11], &ids[1][..1]];
        let mut shared = vec![SeqInput::new(prompt)];
        shared.extend(responses.iter().map(|r| SeqInput::after(0, r)));
        let got = m.model.forward(&mut shared, None, LogitsFor::All).unwrap();
        let mut row = prompt.len();
        for r in responses {
            let full: Vec<u32> = [prompt, r].concat();
            let want = m
                .model
                .forward(&mut [SeqInput::new(&full)], None, LogitsFor::All)
                .unwrap();
            let diff = max_abs_diff(
                &got.narrow(0, row, r.len()).unwrap(),
                &want.narrow(0, prompt.len(), r.len()).unwrap(),
            );
            assert!(diff < 1e-4, "{family}: {diff}");
            row += r.len();
        }
        // A prefix must be an earlier plain sequence.
        let bad = m
            .model
            .forward(&mut [SeqInput::after(0, prompt)], None, LogitsFor::All);
        assert!(bad.is_err());
    }
}

#[test]
fn half_precision_logits_on_the_test_device_match_transformers_within_bf16_tolerance() {
    for family in FAMILIES {
        let m = load_tiny(family, half_dtype());
        let (ids, want) = expected(family);
        let mut inputs: Vec<SeqInput> = ids.iter().map(|s| SeqInput::new(s)).collect();
        let got = m.model.forward(&mut inputs, None, LogitsFor::All).unwrap();
        assert_eq!(got.dtype(), half_dtype());
        let got = got.reshape(want.dims()).unwrap();
        // bf16 keeps 8 bits of mantissa: allow a few ulps of the largest logit.
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let diff = max_abs_diff(&got, &want);
        assert!(
            diff < 0.03 * scale,
            "{family}: max |diff| {diff} (logits up to {scale})"
        );
    }
}
