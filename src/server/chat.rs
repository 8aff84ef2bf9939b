//! `POST /v1/chat/completions`.

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
use super::openai::{
    AdaptationReport, AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion,
    ChatCompletionChunk, ChatCompletionRequest, Delta, Usage,
};
use super::validation::validate_chat;
use super::{logprobs, AppState, Ready};
use crate::generation::FinishReason;
use crate::sampling::SampledToken;

#[utoipa::path(
    post,
    path = "/v1/chat/completions",
    tag = "openai",
    summary = "Chat completion (SSE when `stream` is true)",
    request_body = ChatCompletionRequest,
    responses(
        (status = 200, description = "The completion, or its chunks as server-sent events",
            content((ChatCompletion = "application/json"), (ChatCompletionChunk = "text/event-stream"))),
        GenerationErrors
    ),
    security(("apiKey" = []), ())
)]
pub async fn chat_completions(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let ready = state.ready()?;
    log_ignored_fields(&req.extra);
    let valid = caller.scope(validate_chat(&req, &ready.limits())?)?;
    let submitted = submit(&ready, &valid)?;
    let id = request_id("chatcmpl");
    if valid.stream {
        let format = ChatChunks {
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
    let choices = results
        .into_iter()
        .enumerate()
        .map(|(index, r)| ChatChoice {
            index,
            logprobs: valid
                .logprobs
                .map(|_| logprobs::chat(&ready.tokenizer, &r.tokens)),
            message: AssistantMessage {
                role: "assistant",
                content: r.text,
            },
            finish_reason: r.finish.map_or("stop", |f| f.as_str()),
        })
        .collect();
    Ok(Json(ChatCompletion {
        id,
        object: "chat.completion",
        created: unix_now(),
        model: ready.model_name.clone(),
        choices,
        usage: Usage::new(prompt_tokens, completion_tokens),
        adaptation,
    })
    .into_response())
}

/// Chat chunks: the assistant role first, then one content delta per token.
struct ChatChunks {
    ready: Arc<Ready>,
    id: String,
    created: u64,
    logprobs: bool,
}

impl ChunkFormat for ChatChunks {
    type Choice = ChatChunkChoice;
    type Chunk = ChatCompletionChunk;

    fn token(&self, index: usize, token: &SampledToken, text: String) -> ChatChunkChoice {
        ChatChunkChoice {
            index,
            logprobs: self
                .logprobs
                .then(|| logprobs::chat(&self.ready.tokenizer, std::slice::from_ref(token))),
            delta: Delta {
                role: None,
                content: Some(text),
            },
            finish_reason: None,
        }
    }

    fn finished(&self, index: usize, reason: FinishReason, text: String) -> ChatChunkChoice {
        ChatChunkChoice {
            index,
            delta: Delta {
                role: None,
                content: (!text.is_empty()).then_some(text),
            },
            logprobs: None,
            finish_reason: Some(reason.as_str()),
        }
    }

    fn chunk(
        &self,
        choices: Vec<ChatChunkChoice>,
        usage: Option<Usage>,
        adaptation: Option<AdaptationReport>,
    ) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk",
            created: self.created,
            model: self.ready.model_name.clone(),
            choices,
            usage,
            adaptation,
        }
    }

    fn opening(&self, choices: usize) -> Vec<ChatCompletionChunk> {
        (0..choices)
            .map(|index| {
                let role = ChatChunkChoice {
                    index,
                    delta: Delta {
                        role: Some("assistant"),
                        content: Some(String::new()),
                    },
                    logprobs: None,
                    finish_reason: None,
                };
                self.chunk(vec![role], None, None)
            })
            .collect()
    }
}
