//! What the chat and completions endpoints share: submitting validated prompts to the
//! engine and reading back per-choice results, whole or as a stream.

use std::time::Instant;

use futures::stream::{self, Stream, StreamExt};
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;

use super::error::ApiError;
use super::openai::{AdaptationReport, Usage};
use super::validation::ValidRequest;
use super::Ready;
use crate::engine::{Event, GenerateJob};
use crate::generation::FinishReason;
use crate::sampling::SampledToken;

/// One choice as it finished.
#[derive(Debug, Default)]
pub struct ChoiceResult {
    pub text: String,
    pub tokens: Vec<SampledToken>,
    pub finish: Option<FinishReason>,
}

/// An event of choice `index` across all prompts of the request (prompt p, sample i:
/// index p * n + i).
pub type IndexedEvent = (usize, Event);

pub struct Submitted {
    pub prompt_tokens: usize,
    pub events: std::pin::Pin<Box<dyn Stream<Item = IndexedEvent> + Send>>,
    pub choices: usize,
}

/// Queues one job per prompt; refuses with 429 when the queue is full.
pub fn submit(ready: &Ready, req: &ValidRequest) -> Result<Submitted, ApiError> {
    let arrived = Instant::now();
    let mut streams = Vec::with_capacity(req.prompts.len());
    for (p, prompt) in req.prompts.iter().enumerate() {
        let (tx, rx) = mpsc::unbounded_channel();
        let job = GenerateJob {
            prompt: prompt.clone(),
            n: req.n,
            sampling: req.sampling,
            seed: req.seed.wrapping_add((p * req.n) as u64),
            rules: req.rules.clone(),
            top_logprobs: req.logprobs.unwrap_or(0),
            adapter: req.adapter.clone(),
            adaptation: req.adaptation.get(p).cloned(),
            events: tx,
            arrived,
            span: tracing::Span::current(),
        };
        ready.engine.submit(job)?;
        let base = p * req.n;
        streams.push(
            UnboundedReceiverStream::new(rx).map(move |event| (base + event_index(&event), event)),
        );
    }
    Ok(Submitted {
        prompt_tokens: req.prompts.iter().map(Vec::len).sum(),
        events: Box::pin(stream::select_all(streams)),
        choices: req.prompts.len() * req.n,
    })
}

fn event_index(event: &Event) -> usize {
    match event {
        Event::Token { index, .. } | Event::Finished { index, .. } => *index,
        Event::Adapted(_) | Event::Error(_) => 0,
    }
}

/// Waits for every choice to finish; also returns the adaptation report (of the first
/// prompt), when the request adapted.
pub async fn collect(
    mut submitted: Submitted,
) -> Result<(Vec<ChoiceResult>, Option<AdaptationReport>), ApiError> {
    let mut report = None;
    let mut choices: Vec<ChoiceResult> = (0..submitted.choices)
        .map(|_| ChoiceResult::default())
        .collect();
    let mut open = submitted.choices;
    while open > 0 {
        let Some((i, event)) = submitted.events.next().await else {
            return Err(ApiError::Internal(
                "the engine stopped before the answer was complete".into(),
            ));
        };
        match event {
            Event::Token { token, text, .. } => {
                choices[i].tokens.push(token);
                choices[i].text.push_str(&text);
            }
            Event::Finished { reason, text, .. } => {
                choices[i].text.push_str(&text);
                choices[i].finish = Some(reason);
                open -= 1;
            }
            Event::Adapted(r) => {
                report.get_or_insert_with(|| AdaptationReport::from(*r));
            }
            Event::Error(e) => return Err(e.into()),
        }
    }
    Ok((choices, report))
}

/// Unknown top-level fields are logged and ignored, as vLLM does.
pub fn log_ignored_fields(extra: &std::collections::HashMap<String, serde_json::Value>) {
    if !extra.is_empty() {
        tracing::debug!(fields = ?extra.keys().collect::<Vec<_>>(), "ignoring unknown request fields");
    }
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

pub fn request_id(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

pub type SseItem = Result<axum::response::sse::Event, std::convert::Infallible>;

/// Runs `driver` in its own task, feeding an SSE response that ends with `data: [DONE]`.
/// When the client goes away the channel closes, the driver stops at its next send, and
/// dropping its engine receivers cancels the sequences.
pub fn sse_response<F, Fut>(driver: F) -> axum::response::Response
where
    F: FnOnce(mpsc::Sender<SseItem>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
    use axum::response::IntoResponse;
    let (tx, rx) = mpsc::channel::<SseItem>(64);
    tokio::spawn(async move {
        driver(tx.clone()).await;
        let _ = tx.send(Ok(SseEvent::default().data("[DONE]"))).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        // A comment every second keeps proxies and clients patient while an episode runs.
        .keep_alive(KeepAlive::new().interval(std::time::Duration::from_secs(1)))
        .into_response()
}

/// Sends one JSON chunk; false once the client is gone.
pub async fn send_json<T: serde::Serialize>(tx: &mpsc::Sender<SseItem>, value: &T) -> bool {
    let data = serde_json::to_string(value)
        .unwrap_or_else(|e| format!("{{\"error\":{{\"message\":\"{e}\"}}}}"));
    tx.send(Ok(axum::response::sse::Event::default().data(data)))
        .await
        .is_ok()
}

/// How one endpoint spells its streamed chunks; [`stream`] drives any of them.
pub trait ChunkFormat: Send + Sync + 'static {
    type Choice: Send + Sync;
    type Chunk: serde::Serialize + Send + Sync;
    fn token(&self, index: usize, token: &SampledToken, text: String) -> Self::Choice;
    fn finished(&self, index: usize, reason: FinishReason, text: String) -> Self::Choice;
    fn chunk(
        &self,
        choices: Vec<Self::Choice>,
        usage: Option<Usage>,
        adaptation: Option<AdaptationReport>,
    ) -> Self::Chunk;
    /// Chunks sent before any event (chat: the assistant role of each choice).
    fn opening(&self, _choices: usize) -> Vec<Self::Chunk> {
        Vec::new()
    }
}

/// Streams a submitted request: one chunk per token, the adaptation report as its own chunk
/// when the episode ends, usage last when asked, errors as an error chunk, then `[DONE]`.
pub fn stream<F: ChunkFormat>(
    format: F,
    mut submitted: Submitted,
    include_usage: bool,
) -> axum::response::Response {
    sse_response(move |tx| async move {
        for opening in format.opening(submitted.choices) {
            if !send_json(&tx, &opening).await {
                return;
            }
        }
        let mut open = submitted.choices;
        let mut completion_tokens = 0;
        while open > 0 {
            // A client that leaves while its job waits (behind an episode, say) receives
            // nothing to fail on; `closed` notices, and dropping the job's receiver frees it.
            let next = tokio::select! {
                next = submitted.events.next() => next,
                () = tx.closed() => return,
            };
            let Some((index, event)) = next else {
                break;
            };
            let chunk = match event {
                Event::Token { token, text, .. } => {
                    completion_tokens += 1;
                    format.chunk(vec![format.token(index, &token, text)], None, None)
                }
                Event::Finished { reason, text, .. } => {
                    open -= 1;
                    format.chunk(vec![format.finished(index, reason, text)], None, None)
                }
                Event::Adapted(report) => {
                    format.chunk(Vec::new(), None, Some(AdaptationReport::from(*report)))
                }
                Event::Error(e) => {
                    send_json(&tx, &ApiError::from(e).body()).await;
                    return;
                }
            };
            if !send_json(&tx, &chunk).await {
                return;
            }
        }
        if include_usage {
            let usage = Usage::new(submitted.prompt_tokens, completion_tokens);
            send_json(&tx, &format.chunk(Vec::new(), Some(usage), None)).await;
        }
    })
}
