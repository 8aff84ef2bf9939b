//! The contract every [`AdapterStore`] backend keeps, as one suite of checks: the unit tests
//! run it on the local folder and on in-memory object storage, the integration tests on a
//! real S3-compatible server. Each check panics with what broke.

use candle_core::{DType, Device};

use super::{AdapterStore, Publish};
use crate::model::{Adapter, LoraConfig, ModelConfig};

/// A two-layer model shape, enough to give adapters real tensors.
pub fn tiny_model() -> ModelConfig {
    ModelConfig::from_hf_json(
        r#"{"architectures": ["LlamaForCausalLM"], "vocab_size": 32, "hidden_size": 16,
            "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "rms_norm_eps": 1e-5, "max_position_embeddings": 64}"#,
    )
    .expect("a valid config")
}

/// An adapter named `name` whose weights depend on `seed`, B included (a fresh adapter's B
/// is zero, which would make every version look alike).
pub fn seeded_adapter(name: &str, seed: u64) -> Adapter {
    let lora = LoraConfig {
        rank: 2,
        ..Default::default()
    };
    let adapter = Adapter::new(name, lora, &tiny_model(), DType::F32, &Device::Cpu, seed)
        .expect("an adapter");
    let values = adapter
        .named_tensors()
        .into_iter()
        .map(|(k, t)| {
            let shifted = t
                .ones_like()
                .and_then(|o| o.affine((seed as f64 + 1.0) * 1e-3, 0.0))
                .and_then(|s| t.add(&s))
                .expect("shifted");
            (k, shifted)
        })
        .collect();
    adapter.set_tensors(&values).expect("set");
    adapter
}

/// Whether two adapters hold the same values in every tensor.
pub fn same_weights(a: &Adapter, b: &Adapter) -> bool {
    let (a, b) = (a.named_tensors(), b.named_tensors());
    a.len() == b.len()
        && a.iter().all(|(k, t)| {
            let flat = |t: &candle_core::Tensor| t.flatten_all().and_then(|f| f.to_vec1::<f32>());
            b.get(k)
                .is_some_and(|u| matches!((flat(t), flat(u)), (Ok(x), Ok(y)) if x == y))
        })
}

fn load(store: &dyn AdapterStore, name: &str) -> (u64, Adapter) {
    let stored = store
        .load(name, &tiny_model(), DType::F32, &Device::Cpu)
        .unwrap_or_else(|e| panic!("loading `{name}`: {e}"));
    (stored.version, stored.adapter)
}

/// Runs every check. `open` gives a fresh handle on the same storage each call (a second
/// replica); the storage starts empty and keeps at most `keep_versions` = 3 versions.
pub fn run(open: &dyn Fn() -> Box<dyn AdapterStore>) {
    publishes_read_back_and_export(&*open());
    a_stale_writer_loses_and_publishes_nothing(&*open(), &*open());
    of_racing_writers_exactly_one_wins(open);
    old_versions_are_pruned_and_kept_ones_roll_back(&*open());
}

fn publishes_read_back_and_export(store: &dyn AdapterStore) {
    let name = "team@first";
    assert_eq!(store.current(name).unwrap(), None);
    assert!(!store.exists(name));
    let v1 = seeded_adapter(name, 1);
    assert_eq!(store.publish(&v1, 1, None).unwrap(), Publish::Published);
    assert_eq!(store.current(name).unwrap(), Some(1));
    assert!(store.exists(name) && store.bytes(name) > 0);
    assert!(store.names().contains(&name.to_string()));
    let (version, loaded) = load(store, name);
    assert_eq!(version, 1);
    assert!(same_weights(&loaded, &v1), "v1 reads back as written");
    let v2 = seeded_adapter(name, 2);
    assert_eq!(store.publish(&v2, 2, Some(1)).unwrap(), Publish::Published);
    let exported = store.export(name).unwrap();
    assert_eq!(exported.version, 2);
    let files: Vec<&str> = exported.files.iter().map(|(f, _)| f.as_str()).collect();
    assert_eq!(
        files,
        ["adapter_model.safetensors", "adapter_config.json"],
        "an export carries PEFT's files"
    );
    assert!(exported.files.iter().all(|(_, bytes)| !bytes.is_empty()));
}

fn a_stale_writer_loses_and_publishes_nothing(a: &dyn AdapterStore, b: &dyn AdapterStore) {
    let name = "stale";
    let base = seeded_adapter(name, 10);
    assert_eq!(a.publish(&base, 1, None).unwrap(), Publish::Published);
    assert_eq!(
        b.publish(&seeded_adapter(name, 11), 1, None).unwrap(),
        Publish::Lost { current: Some(1) },
        "a first version when one exists"
    );
    let winner = seeded_adapter(name, 12);
    assert_eq!(a.publish(&winner, 2, Some(1)).unwrap(), Publish::Published);
    assert_eq!(
        b.publish(&seeded_adapter(name, 13), 2, Some(1)).unwrap(),
        Publish::Lost { current: Some(2) },
        "a version built on one that is no longer current"
    );
    let (version, loaded) = load(b, name);
    assert_eq!(version, 2);
    assert!(same_weights(&loaded, &winner), "the winner's weights stay");
}

fn of_racing_writers_exactly_one_wins(open: &dyn Fn() -> Box<dyn AdapterStore>) {
    let name = "race";
    let first = open();
    assert_eq!(
        first.publish(&seeded_adapter(name, 20), 1, None).unwrap(),
        Publish::Published
    );
    for round in 1..=4u64 {
        let writers: Vec<Box<dyn AdapterStore>> = (0..3).map(|_| open()).collect();
        let outcomes: Vec<(u64, Publish)> = std::thread::scope(|scope| {
            let handles: Vec<_> = writers
                .into_iter()
                .enumerate()
                .map(|(i, store)| {
                    let seed = 100 * round + i as u64;
                    scope.spawn(move || {
                        let adapter = seeded_adapter(name, seed);
                        (
                            seed,
                            store.publish(&adapter, round + 1, Some(round)).unwrap(),
                        )
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let winners: Vec<u64> = outcomes
            .iter()
            .filter(|(_, p)| *p == Publish::Published)
            .map(|(seed, _)| *seed)
            .collect();
        assert_eq!(winners.len(), 1, "round {round}: {outcomes:?}");
        for (_, outcome) in &outcomes {
            if *outcome != Publish::Published {
                assert_eq!(
                    *outcome,
                    Publish::Lost {
                        current: Some(round + 1)
                    }
                );
            }
        }
        let (version, loaded) = load(&*first, name);
        assert_eq!(version, round + 1);
        assert!(
            same_weights(&loaded, &seeded_adapter(name, winners[0])),
            "round {round}: the current version holds the winner's weights"
        );
    }
}

fn old_versions_are_pruned_and_kept_ones_roll_back(store: &dyn AdapterStore) {
    let name = "kept";
    for v in 1..=5 {
        let expected = (v > 1).then(|| v - 1);
        assert_eq!(
            store
                .publish(&seeded_adapter(name, 30 + v), v, expected)
                .unwrap(),
            Publish::Published
        );
    }
    let model = tiny_model();
    assert!(store
        .load_version(name, 2, &model, DType::F32, &Device::Cpu)
        .is_err());
    let v3 = store
        .load_version(name, 3, &model, DType::F32, &Device::Cpu)
        .unwrap();
    assert!(same_weights(&v3, &seeded_adapter(name, 33)));
    assert!(
        store
            .publish(&seeded_adapter(name, 40), 5, Some(5))
            .is_err(),
        "a version that is not newer is refused"
    );
}
