//! `POST /v1/chat/completions`.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;

use super::error::ApiError;
use super::extract::ApiJson;
use super::generate::{collect, request_id, send_json, sse_response, submit, unix_now, Submitted};
use super::openai::{
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion, ChatCompletionChunk,
    ChatCompletionRequest, Delta, Usage,
};
use super::validation::{validate_chat, ValidRequest};
use super::{logprobs, AppState, Ready};
use crate::engine::Event;

pub async fn chat_completions(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let ready = state.ready()?;
    if !req.extra.is_empty() {
        tracing::debug!(fields = ?req.extra.keys().collect::<Vec<_>>(), "ignoring unknown request fields");
    }
    let valid = validate_chat(&req, &ready.limits())?;
    let submitted = submit(&ready, &valid)?;
    let id = request_id("chatcmpl");
    if valid.stream {
        return Ok(stream(ready, valid, submitted, id));
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

fn stream(
    ready: std::sync::Arc<Ready>,
    valid: ValidRequest,
    mut submitted: Submitted,
    id: String,
) -> Response {
    sse_response(move |tx| async move {
        let created = unix_now();
        let chunk = |choices: Vec<ChatChunkChoice>, usage: Option<Usage>| ChatCompletionChunk {
            id: id.clone(),
            object: "chat.completion.chunk",
            created,
            model: ready.model_name.clone(),
            choices,
            usage,
            adaptation: None,
        };
        for index in 0..submitted.choices {
            let first = ChatChunkChoice {
                index,
                delta: Delta {
                    role: Some("assistant"),
                    content: Some(String::new()),
                },
                logprobs: None,
                finish_reason: None,
            };
            if !send_json(&tx, &chunk(vec![first], None)).await {
                return;
            }
        }
        let mut open = submitted.choices;
        let mut completion_tokens = 0;
        while open > 0 {
            let Some((index, event)) = submitted.events.next().await else {
                break;
            };
            let choice = match event {
                Event::Token { token, text, .. } => {
                    completion_tokens += 1;
                    ChatChunkChoice {
                        index,
                        logprobs: valid.logprobs.map(|_| {
                            logprobs::chat(&ready.tokenizer, std::slice::from_ref(&token))
                        }),
                        delta: Delta {
                            role: None,
                            content: Some(text),
                        },
                        finish_reason: None,
                    }
                }
                Event::Finished { reason, text, .. } => {
                    open -= 1;
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
                Event::Adapted(report) => {
                    let note = ChatCompletionChunk {
                        adaptation: Some(*report),
                        ..chunk(Vec::new(), None)
                    };
                    if !send_json(&tx, &note).await {
                        return;
                    }
                    continue;
                }
                Event::Error(message) => {
                    send_json(&tx, &ApiError::Unavailable(message).body()).await;
                    return;
                }
            };
            if !send_json(&tx, &chunk(vec![choice], None)).await {
                return;
            }
        }
        if valid.include_usage {
            let p = submitted.prompt_tokens;
            let usage = Usage::new(p, completion_tokens);
            send_json(&tx, &chunk(Vec::new(), Some(usage))).await;
        }
    })
}
