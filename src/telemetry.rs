//! Metric names and buckets, in one place. Serving metrics mirror vLLM's meanings and
//! buckets so existing dashboards translate.

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const REQUESTS_RUNNING: &str = "ttrl_requests_running";
pub const REQUESTS_WAITING: &str = "ttrl_requests_waiting";
pub const TIME_TO_FIRST_TOKEN: &str = "ttrl_time_to_first_token_seconds";
pub const INTER_TOKEN_LATENCY: &str = "ttrl_inter_token_latency_seconds";
pub const E2E_REQUEST_LATENCY: &str = "ttrl_e2e_request_latency_seconds";
pub const PROMPT_TOKENS: &str = "ttrl_prompt_tokens_total";
pub const GENERATION_TOKENS: &str = "ttrl_generation_tokens_total";
pub const PREFIX_CACHE_QUERIES: &str = "ttrl_prefix_cache_queries_total";
pub const PREFIX_CACHE_HITS: &str = "ttrl_prefix_cache_hits_total";
pub const REQUEST_SUCCESS: &str = "ttrl_request_success_total";
pub const REQUEST_ERRORS: &str = "ttrl_request_errors_total";
pub const ADAPTATION_BATCHES: &str = "ttrl_adaptation_batches_total";
pub const ADAPTATION_DURATION: &str = "ttrl_adaptation_duration_seconds";
pub const ADAPTATION_ROLLOUT_TOKENS: &str = "ttrl_adaptation_rollout_tokens_total";
pub const ADAPTATION_VOTE_SHARE: &str = "ttrl_adaptation_vote_share";
pub const ADAPTATION_FORKING_FRACTION: &str = "ttrl_adaptation_forking_fraction";
pub const ADAPTATION_ENTROPY: &str = "ttrl_adaptation_entropy";
pub const ADAPTATION_LOSS: &str = "ttrl_adaptation_loss";
pub const ADAPTATION_KL: &str = "ttrl_adaptation_kl";
pub const ADAPTATION_ROLLBACKS: &str = "ttrl_adaptation_rollbacks_total";
pub const ADAPTATION_ROLLOUT_BATCH: &str = "ttrl_adaptation_rollout_batch_sequences";
/// 1 while an episode is out with the trainer.
pub const ADAPTATION_RUNNING: &str = "ttrl_adaptation_episodes_running";
pub const ADAPTER_VERSION: &str = "ttrl_adapter_version";
/// Adapter versions that did not load at start and were renamed aside.
pub const ADAPTERS_QUARANTINED: &str = "ttrl_adapters_quarantined_total";
/// Named adapters by `state`: resident (in memory) or stored (on disk only).
pub const ADAPTERS: &str = "ttrl_adapters";
/// Device memory by `kind`: weights, kv_cache, adaptation_peak (the name the GPU build is
/// watched by; on the CPU the same accounting in host memory).
pub const GPU_MEMORY: &str = "ttrl_gpu_memory_bytes";

/// Taken from vLLM's Prometheus exporter (seconds).
pub const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];
pub const ITL_BUCKETS: [f64; 19] = [
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0,
];
pub const E2E_BUCKETS: [f64; 21] = [
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
    480.0, 960.0, 1920.0, 7680.0,
];

/// Installs the process-wide Prometheus recorder (once, from `main`).
pub fn install_recorder() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(TIME_TO_FIRST_TOKEN.into()), &TTFT_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(INTER_TOKEN_LATENCY.into()), &ITL_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(E2E_REQUEST_LATENCY.into()), &E2E_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(ADAPTATION_DURATION.into()), &E2E_BUCKETS)?
        .install_recorder()?;
    describe();
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_gauge!(REQUESTS_RUNNING, "Requests whose sequences are decoding.");
    describe_gauge!(REQUESTS_WAITING, "Requests queued for a decode slot.");
    describe_histogram!(
        TIME_TO_FIRST_TOKEN,
        Unit::Seconds,
        "Arrival to first token."
    );
    describe_histogram!(
        INTER_TOKEN_LATENCY,
        Unit::Seconds,
        "Between consecutive tokens of a sequence."
    );
    describe_histogram!(E2E_REQUEST_LATENCY, Unit::Seconds, "Arrival to last token.");
    describe_counter!(PROMPT_TOKENS, "Prompt tokens prefilled.");
    describe_gauge!(
        GPU_MEMORY,
        Unit::Bytes,
        "Memory on the model's device: weights, live KV caches, and the highest use above \
         the start of an adaptation episode."
    );
    describe_gauge!(
        ADAPTERS,
        "Named adapters in memory (resident) and on disk only (stored)."
    );
    describe_counter!(GENERATION_TOKENS, "Tokens generated.");
    describe_counter!(
        PREFIX_CACHE_QUERIES,
        "Prompt tokens looked up in the prompt cache."
    );
    describe_counter!(
        PREFIX_CACHE_HITS,
        "Prompt tokens whose keys and values came from the prompt cache instead of a prefill."
    );
    describe_counter!(REQUEST_SUCCESS, "Requests finished, by finish reason.");
    describe_counter!(
        REQUEST_ERRORS,
        "Requests answered with an error, by error code."
    );
}
