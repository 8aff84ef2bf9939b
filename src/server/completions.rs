//! `POST /v1/completions`.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use std::sync::Arc;

use super::auth::Caller;
use super::error::{ApiError, GenerationErrors};
use super::extract::ApiJson;
use super::generate::{
    collect, log_ignored_fields, request_id, stream, submit, unix_now, ChunkFormat,
};
use super::openai::{AdaptationReport, Completion, CompletionChoice, CompletionRequest, Usage};
use super::validation::validate_completion;
use super::{logprobs, AppState, Ready};
use crate::generation::FinishReason;
use crate::sampling::SampledToken;

#[utoipa::path(
    post,
    path = "/v1/completions",
    tag = "openai",
    summary = "Text completion (SSE when `stream` is true)",
    request_body = CompletionRequest,
    responses(
        (status = 200, description = "The completion, or its chunks as server-sent events",
            content((Completion = "application/json"), (Completion = "text/event-stream"))),
        GenerationErrors
    ),
    security(("apiKey" = []), ())
)]
pub async fn completions(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let ready = state.ready()?;
    log_ignored_fields(&req.extra);
    let valid = caller.scope(validate_completion(&req, &ready.limits())?)?;
    let submitted = submit(&ready, &valid)?;
    let id = request_id("cmpl");
    if valid.stream {
        let format = CompletionChunks {
            ready,
            id,
            created: unix_now(),
            logprobs: valid.logprobs.is_some(),
        };
        return Ok(stream(format, submitted, valid.include_usage));
    }
    let prompt_tokens = submitted.prompt_tokens;
    let (results, adaptation) = collect(submitted).await?;
    let completion_tokens = results.iter().map(|r| r.tokens.len()).sum();
    let mut choices = Vec::with_capacity(results.len());
    for (index, r) in results.into_iter().enumerate() {
        let prefix = if req.echo {
            ready.tokenizer.decode(&valid.prompts[index / valid.n])?
        } else {
            String::new()
        };
        choices.push(CompletionChoice {
            index,
            logprobs: valid
                .logprobs
                .map(|_| logprobs::completion(&ready.tokenizer, &r.tokens, prefix.len())),
            text: prefix + &r.text,
            finish_reason: Some(r.finish.map_or("stop", |f| f.as_str())),
        });
    }
    Ok(Json(Completion {
        id,
        object: "text_completion",
        created: unix_now(),
        model: ready.model_name.clone(),
        choices,
        usage: Some(Usage::new(prompt_tokens, completion_tokens)),
        adaptation,
    })
    .into_response())
}

/// Completion chunks: one text piece per token.
struct CompletionChunks {
    ready: Arc<Ready>,
    id: String,
    created: u64,
    logprobs: bool,
}

impl ChunkFormat for CompletionChunks {
    type Choice = CompletionChoice;
    type Chunk = Completion;

    fn token(&self, index: usize, token: &SampledToken, text: String) -> CompletionChoice {
        CompletionChoice {
            index,
            logprobs: self.logprobs.then(|| {
                logprobs::completion(&self.ready.tokenizer, std::slice::from_ref(token), 0)
            }),
            text,
            finish_reason: None,
        }
    }

    fn finished(&self, index: usize, reason: FinishReason, text: String) -> CompletionChoice {
        CompletionChoice {
            index,
            text,
            logprobs: None,
            finish_reason: Some(reason.as_str()),
        }
    }

    fn chunk(
        &self,
        choices: Vec<CompletionChoice>,
        usage: Option<Usage>,
        adaptation: Option<AdaptationReport>,
    ) -> Completion {
        Completion {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.ready.model_name.clone(),
            choices,
            usage,
            adaptation,
        }
    }
}
