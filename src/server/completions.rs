//! `POST /v1/completions`.

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;

use super::error::ApiError;
use super::extract::ApiJson;
use super::generate::{collect, request_id, send_json, sse_response, submit, unix_now, Submitted};
use super::openai::{Completion, CompletionChoice, CompletionRequest, Usage};
use super::validation::{validate_completion, ValidRequest};
use super::{logprobs, AppState, Ready};
use crate::engine::Event;

pub async fn completions(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let ready = state.ready()?;
    let valid = validate_completion(&req, &ready.limits())?;
    let submitted = submit(&ready, &valid)?;
    let id = request_id("cmpl");
    if valid.stream {
        return Ok(stream(ready, valid, submitted, id));
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

fn stream(
    ready: std::sync::Arc<Ready>,
    valid: ValidRequest,
    mut submitted: Submitted,
    id: String,
) -> Response {
    sse_response(move |tx| async move {
        let created = unix_now();
        let chunk = |choices: Vec<CompletionChoice>, usage: Option<Usage>| Completion {
            id: id.clone(),
            object: "text_completion",
            created,
            model: ready.model_name.clone(),
            choices,
            usage,
            adaptation: None,
        };
        let mut open = submitted.choices;
        let mut completion_tokens = 0;
        while open > 0 {
            let Some((index, event)) = submitted.events.next().await else {
                break;
            };
            let choice = match event {
                Event::Token { token, text, .. } => {
                    completion_tokens += 1;
                    CompletionChoice {
                        index,
                        logprobs: valid.logprobs.map(|_| {
                            logprobs::completion(&ready.tokenizer, std::slice::from_ref(&token), 0)
                        }),
                        text,
                        finish_reason: None,
                    }
                }
                Event::Finished { reason, text, .. } => {
                    open -= 1;
                    CompletionChoice {
                        index,
                        text,
                        logprobs: None,
                        finish_reason: Some(reason.as_str()),
                    }
                }
                Event::Adapted(report) => {
                    if !send_json(
                        &tx,
                        &Completion {
                            adaptation: Some(*report),
                            ..chunk(Vec::new(), None)
                        },
                    )
                    .await
                    {
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
