//! Turns wire requests into validated jobs. Code after this point accepts only the
//! validated types; every message names the parameter, the limit and the value given.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::error::ApiError;
use super::openai::{
    AdaptationSpec, ChatCompletionRequest, CompletionRequest, MessageContent, PromptSpec,
    SamplingFields, StopSpec,
};
use crate::adapt::config::{SAMPLES, STEPS};
use crate::adapt::store::valid_name;
use crate::adapt::{AdaptConfig, Question, Reversed};
use crate::engine::AdaptRequest;
use crate::generation::StopRules;
use crate::model::{ChatMessage, TextTokenizer};
use crate::reward::{reverse_options, AnswerFormat};
use crate::sampling::Sampling;

pub const MAX_N: i64 = 16;
pub const MAX_TOP_LOGPROBS: i64 = 20;
pub const MAX_COMPLETION_LOGPROBS: i64 = 5;
pub const MAX_STOP_STRINGS: usize = 16;

/// What the engine needs, for one or more prompts.
#[derive(Debug, Clone)]
pub struct ValidRequest {
    pub prompts: Vec<Vec<u32>>,
    pub n: usize,
    pub sampling: Sampling,
    pub seed: u64,
    pub rules: StopRules,
    /// Alternatives per token to report; `None` = no log-probs at all.
    pub logprobs: Option<usize>,
    pub stream: bool,
    pub include_usage: bool,
    /// Named adapter to answer with.
    pub adapter: Option<String>,
    /// Adapt first: one request per prompt (each prompt is one question).
    pub adaptation: Vec<AdaptRequest>,
}

/// The `adaptation` object as validated, before it meets a prompt.
#[derive(Debug, Clone)]
struct AdaptChoice {
    enabled: bool,
    config: AdaptConfig,
    adapter: Option<String>,
    format: AnswerFormat,
}

/// Limits and defaults that come from the served model and the settings.
pub struct Limits<'a> {
    pub model_name: &'a str,
    pub max_model_len: usize,
    pub kv_cache_positions: Option<usize>,
    pub tokenizer: &'a TextTokenizer,
    pub adapt_defaults: &'a AdaptConfig,
}

/// Suffix of the model alias that switches adaptation on for clients that cannot send
/// extra fields: `"<model>+ttrl"`.
pub const ADAPT_ALIAS_SUFFIX: &str = "+ttrl";

/// What `model` selects: (adapter, adaptation switched on by alias).
/// `<model>` is the base, `<model>:<adapter>` a named adapter, `<model>+ttrl` the alias.
fn check_model(
    requested: &Option<String>,
    limits: &Limits<'_>,
) -> Result<(Option<String>, bool), ApiError> {
    let Some(name) = requested.as_deref().filter(|n| !n.is_empty()) else {
        return Ok((None, false));
    };
    if name == limits.model_name {
        return Ok((None, false));
    }
    if name.strip_suffix(ADAPT_ALIAS_SUFFIX) == Some(limits.model_name) {
        return Ok((None, true));
    }
    match name
        .strip_prefix(limits.model_name)
        .and_then(|r| r.strip_prefix(':'))
    {
        Some(adapter) if valid_name(adapter) => Ok((Some(adapter.to_string()), false)),
        _ => Err(ApiError::ModelNotFound(name.to_string())),
    }
}

/// Reads the `adaptation` object into its wire type; an error names the field it is in
/// (`adaptation.samples`), or `adaptation` itself.
fn adaptation_spec(value: &Option<Value>) -> Result<AdaptationSpec, ApiError> {
    let Some(value) = value.as_ref().filter(|v| !v.is_null()) else {
        return Ok(AdaptationSpec::default());
    };
    serde_path_to_error::deserialize(value).map_err(|e| {
        let param = match e.path().to_string().as_str() {
            "." => "adaptation".to_string(),
            path => format!("adaptation.{path}"),
        };
        ApiError::invalid(&param, format!("`{param}`: {}", e.inner()))
    })
}

/// Validates the `adaptation` object against the server's defaults.
fn adaptation(
    value: &Option<Value>,
    alias_on: bool,
    defaults: &AdaptConfig,
) -> Result<AdaptChoice, ApiError> {
    let explicit = value.as_ref().is_some_and(|v| !v.is_null());
    let spec = adaptation_spec(value)?;
    let enabled = match spec.enabled {
        Some(on) => on || alias_on,
        None if alias_on || !explicit => alias_on,
        None => {
            return Err(ApiError::invalid(
                "adaptation.enabled",
                "`adaptation.enabled` must be true or false. Given: nothing",
            ))
        }
    };
    let mut config = defaults.clone();
    if let Some(m) = spec.method {
        config.method = m.into();
    }
    if let Some(r) = spec.rollout {
        config.rollout = r.into();
    }
    config.samples = range_i(
        "adaptation.samples",
        spec.samples,
        *SAMPLES.start() as i64,
        *SAMPLES.end() as i64,
        config.samples as i64,
    )? as usize;
    let default_steps = match spec.adapter {
        Some(_) => config.steps,
        None => config.ephemeral_steps,
    };
    config.steps = range_i(
        "adaptation.steps",
        spec.steps,
        *STEPS.start() as i64,
        *STEPS.end() as i64,
        default_steps as i64,
    )? as usize;
    if let Some(name) = spec.adapter.as_deref().filter(|n| !valid_name(n)) {
        return Err(ApiError::invalid(
            "adaptation.adapter",
            format!("`adaptation.adapter` must be 1-64 letters, digits, `.`, `_` or `-`. Given: {name:?}"),
        ));
    }
    Ok(AdaptChoice {
        enabled,
        config,
        adapter: spec.adapter,
        format: spec.answer_format.map_or(AnswerFormat::Auto, Into::into),
    })
}

fn range_f(
    param: &str,
    v: Option<f64>,
    lo: f64,
    hi: f64,
    lo_open: bool,
    default: f64,
) -> Result<f64, ApiError> {
    let Some(v) = v else { return Ok(default) };
    let below = if lo_open { v <= lo } else { v < lo };
    if !v.is_finite() || below || v > hi {
        let open = if lo_open { "(" } else { "[" };
        return Err(ApiError::invalid(
            param,
            format!("`{param}` must be in {open}{lo}, {hi}]. Given: {v}"),
        ));
    }
    Ok(v)
}

fn range_i(param: &str, v: Option<i64>, lo: i64, hi: i64, default: i64) -> Result<i64, ApiError> {
    let Some(v) = v else { return Ok(default) };
    if v < lo || v > hi {
        return Err(ApiError::invalid(
            param,
            format!("`{param}` must be in [{lo}, {hi}]. Given: {v}"),
        ));
    }
    Ok(v)
}

/// The prompt with its multiple-choice options reversed, if they can be and it still fits the
/// adaptation's prompt limit.
fn reversed_prompt(text: &str, limits: &Limits<'_>) -> Result<Option<Reversed>, ApiError> {
    let Some((text, options)) = reverse_options(text) else {
        return Ok(None);
    };
    let prompt = limits.tokenizer.encode(&text)?;
    let fits = prompt.len() <= limits.adapt_defaults.max_prompt_tokens
        && prompt.len() < limits.max_model_len;
    Ok(fits.then_some(Reversed { prompt, options }))
}

/// Completion tokens the KV-cache budget leaves each of `n` choices after the prompt.
fn kv_room(limits: &Limits<'_>, n: usize, prompt: usize) -> usize {
    limits
        .kv_cache_positions
        .map_or(usize::MAX, |cap| (cap / n).saturating_sub(prompt))
}

/// Validates the shared fields; `max_tokens` defaults to `default_max_tokens` or, when that
/// is `None`, to whatever context the longest prompt leaves (vLLM's chat default).
fn common(
    s: &SamplingFields,
    prompts: Vec<Vec<u32>>,
    texts: &[String],
    questions: &[String],
    logprobs: Option<usize>,
    default_max_tokens: Option<usize>,
    limits: &Limits<'_>,
) -> Result<ValidRequest, ApiError> {
    let (model_adapter, alias_on) = check_model(&s.model, limits)?;
    let choice = adaptation(&s.adaptation, alias_on, limits.adapt_defaults)?;
    let n = range_i("n", s.n, 1, MAX_N, 1)? as usize;
    let temperature = range_f("temperature", s.temperature, 0.0, 2.0, false, 1.0)?;
    let top_p = range_f("top_p", s.top_p, 0.0, 1.0, true, 1.0)?;
    let top_k = range_i("top_k", s.top_k, -1, i64::from(u32::MAX), -1)?;
    let seed = match s.seed {
        Some(seed) => seed as u64,
        None => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0),
    };
    let stop_strings = match &s.stop {
        None => Vec::new(),
        Some(StopSpec::One(s)) => vec![s.clone()],
        Some(StopSpec::Many(v)) => v.clone(),
    };
    if stop_strings.len() > MAX_STOP_STRINGS {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "`stop` takes at most {MAX_STOP_STRINGS} strings. Given: {}",
                stop_strings.len()
            ),
        ));
    }
    if s.stream_options.is_some() && !s.stream {
        return Err(ApiError::invalid(
            "stream_options",
            "`stream_options` is only allowed when `stream` is true",
        ));
    }
    if let Some(i) = prompts.iter().position(Vec::is_empty) {
        return Err(if prompts.len() == 1 {
            ApiError::invalid("prompt", "the prompt is empty")
        } else {
            ApiError::invalid(
                &format!("prompt[{i}]"),
                format!("prompt {i} of the list is empty"),
            )
        });
    }
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let adapt_cap = limits.adapt_defaults.max_prompt_tokens;
    if choice.enabled && longest > adapt_cap {
        return Err(ApiError::invalid(
            "adaptation",
            format!(
                "adaptation takes prompts of at most {adapt_cap} tokens (adaptation.max_prompt_tokens); this one has {longest}"
            ),
        ));
    }
    if longest >= limits.max_model_len {
        return Err(ApiError::ContextLength(format!(
            "This model's maximum context length is {} tokens. However, your prompt has {longest} tokens.",
            limits.max_model_len
        )));
    }
    let room = limits.max_model_len - longest;
    let max_tokens = match s.max_tokens {
        Some(m) if m < 1 => return Err(ApiError::invalid("max_tokens", format!("`max_tokens` must be at least 1. Given: {m}"))),
        Some(m) if m as usize > room => {
            return Err(ApiError::ContextLength(format!(
                "This model's maximum context length is {} tokens. However, you requested {} tokens ({longest} in the prompt, {m} for the completion).",
                limits.max_model_len,
                longest + m as usize
            )))
        }
        Some(m) => m as usize,
        // Without a limit, as much as the context and the KV-cache budget leave.
        None => default_max_tokens
            .unwrap_or(room)
            .min(room)
            .min(kv_room(limits, n, longest).max(1)),
    };
    // The engine reserves n x (prompt + max_tokens) positions; a request that could never
    // fit would wait forever.
    if let Some(cap) = limits.kv_cache_positions {
        if n * (longest + max_tokens) > cap {
            return Err(ApiError::invalid(
                "max_tokens",
                format!(
                    "n x (prompt + max_tokens) = {n} x ({longest} + {max_tokens}) positions is more than the KV-cache budget of {cap} positions (engine.kv_cache_bytes)"
                ),
            ));
        }
    }
    let stop_ids = if s.ignore_eos {
        Vec::new()
    } else {
        limits.tokenizer.stop_ids().to_vec()
    };
    let adapter = choice.adapter.clone().or(model_adapter);
    let adaptation = if choice.enabled {
        prompts
            .iter()
            .zip(texts)
            .zip(questions)
            .map(|((p, text), q)| {
                let mut question = Question::new(q.clone(), p.clone(), choice.format);
                if question.format == AnswerFormat::Choice {
                    question.reversed = reversed_prompt(text, limits)?;
                }
                Ok(AdaptRequest {
                    question,
                    config: choice.config.clone(),
                    adapter: adapter.clone(),
                })
            })
            .collect::<Result<_, ApiError>>()?
    } else {
        Vec::new()
    };
    Ok(ValidRequest {
        adapter,
        adaptation,
        prompts,
        n,
        sampling: Sampling::new(
            temperature as f32,
            (top_k > 0).then_some(top_k as usize),
            top_p as f32,
        ),
        seed,
        rules: StopRules {
            max_tokens,
            stop_ids,
            stop_strings,
        },
        logprobs,
        stream: s.stream,
        include_usage: s.stream_options.as_ref().is_some_and(|o| o.include_usage),
    })
}

pub fn validate_chat(
    req: &ChatCompletionRequest,
    limits: &Limits<'_>,
) -> Result<ValidRequest, ApiError> {
    let question = req
        .messages
        .iter()
        .rev()
        .find(|m| m.role == "user")
        .and_then(|m| match &m.content {
            Some(MessageContent::Text(t)) => Some(t.clone()),
            Some(MessageContent::Parts(p)) => {
                Some(p.iter().filter_map(|x| x.text.clone()).collect())
            }
            None => None,
        })
        .unwrap_or_default();
    check_model(&req.sampling.model, limits)?;
    if req.messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must hold at least one message",
        ));
    }
    let mut messages = Vec::with_capacity(req.messages.len());
    for (i, m) in req.messages.iter().enumerate() {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "developer" | "tool"
        ) {
            return Err(ApiError::invalid(
                &format!("messages[{i}].role"),
                format!("unknown role `{}`", m.role),
            ));
        }
        let content = match &m.content {
            None => String::new(),
            Some(MessageContent::Text(t)) => t.clone(),
            Some(MessageContent::Parts(parts)) => {
                let mut text = String::new();
                for p in parts {
                    if p.kind != "text" {
                        return Err(ApiError::invalid(
                            &format!("messages[{i}].content"),
                            format!("content part type `{}` is not supported", p.kind),
                        ));
                    }
                    text.push_str(p.text.as_deref().unwrap_or_default());
                }
                text
            }
        };
        let role = if m.role == "developer" {
            "system".to_string()
        } else {
            m.role.clone()
        };
        messages.push(ChatMessage { role, content });
    }
    let top = match (req.logprobs, req.top_logprobs) {
        (false, Some(_)) => {
            return Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` needs `logprobs` set to true",
            ))
        }
        (false, None) => None,
        (true, t) => Some(range_i("top_logprobs", t, 0, MAX_TOP_LOGPROBS, 0)? as usize),
    };
    let text = limits.tokenizer.apply_chat_template(&messages)?;
    let prompt = limits.tokenizer.encode(&text)?;
    common(
        &req.sampling,
        vec![prompt],
        &[text],
        &[question],
        top,
        None,
        limits,
    )
}

/// The OpenAI default for completions.
pub const COMPLETION_DEFAULT_MAX_TOKENS: usize = 16;

pub fn validate_completion(
    req: &CompletionRequest,
    limits: &Limits<'_>,
) -> Result<ValidRequest, ApiError> {
    check_model(&req.sampling.model, limits)?;
    let vocab = limits.tokenizer.vocab_size() as i64;
    let ids = |list: &[i64]| -> Result<Vec<u32>, ApiError> {
        list.iter()
            .map(|&t| {
                if (0..vocab).contains(&t) {
                    Ok(t as u32)
                } else {
                    Err(ApiError::invalid(
                        "prompt",
                        format!("token id {t} is outside the vocabulary of {vocab}"),
                    ))
                }
            })
            .collect()
    };
    let prompts: Vec<Vec<u32>> = match &req.prompt {
        PromptSpec::Text(t) => vec![limits.tokenizer.encode(t)?],
        PromptSpec::Texts(v) => v
            .iter()
            .map(|t| limits.tokenizer.encode(t))
            .collect::<Result<_, _>>()?,
        PromptSpec::Ids(v) => vec![ids(v)?],
        PromptSpec::IdLists(v) => v.iter().map(|l| ids(l)).collect::<Result<_, _>>()?,
    };
    if prompts.is_empty() {
        return Err(ApiError::invalid(
            "prompt",
            "`prompt` must not be an empty list",
        ));
    }
    let logprobs = req
        .logprobs
        .map(|l| range_i("logprobs", Some(l), 0, MAX_COMPLETION_LOGPROBS, 0).map(|v| v as usize))
        .transpose()?;
    let questions = prompts
        .iter()
        .map(|p| limits.tokenizer.decode(p))
        .collect::<Result<Vec<_>, _>>()?;
    common(
        &req.sampling,
        prompts,
        &questions,
        &questions,
        logprobs,
        Some(COMPLETION_DEFAULT_MAX_TOKENS),
        limits,
    )
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;

    #[test]
    fn an_ephemeral_adapter_defaults_to_its_own_rounds_and_a_named_one_to_steps() {
        let defaults = AdaptConfig {
            steps: 2,
            ephemeral_steps: 4,
            ..AdaptConfig::default()
        };
        let rounds = |spec: Value| {
            adaptation(&Some(spec), false, &defaults)
                .unwrap()
                .config
                .steps
        };
        assert_eq!(rounds(json!({"enabled": true})), 4);
        assert_eq!(rounds(json!({"enabled": true, "adapter": "team"})), 2);
        assert_eq!(rounds(json!({"enabled": true, "steps": 3})), 3);
        assert_eq!(
            rounds(json!({"enabled": true, "adapter": "team", "steps": 1})),
            1
        );
    }
}
