//! A blocking OpenAI chat client for the eval: the same wire format whether the server is
//! ttrl-serve in this process, ttrl-serve elsewhere, or another OpenAI-compatible server.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::model::ChatMessage;
use crate::server::adaptation::{AdaptationReport, AdaptationSpec};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{url}: HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    #[error("{url}: {reason}")]
    Transport { url: String, reason: String },
    #[error("{url} was not ready after {seconds} s")]
    NotReady { url: String, seconds: u64 },
}

/// What one chat request asks for.
pub struct ChatRequest<'a> {
    pub messages: &'a [ChatMessage],
    pub n: usize,
    pub temperature: f32,
    pub max_tokens: usize,
    pub seed: u64,
    /// The `adaptation` object, for ttrl-serve.
    pub adaptation: Option<AdaptationSpec>,
}

pub struct ChatResponse {
    pub texts: Vec<String>,
    pub completion_tokens: usize,
    pub adaptation: Option<AdaptationReport>,
}

pub struct Client {
    base: String,
    api_key: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    /// `base` is the server root, e.g. `http://127.0.0.1:8000`.
    pub fn new(base: &str, api_key: Option<String>) -> Self {
        Self {
            base: base
                .trim_end_matches('/')
                .trim_end_matches("/v1")
                .to_string(),
            api_key,
            agent: ureq::AgentBuilder::new()
                .timeout_read(Duration::from_secs(3600))
                .build(),
        }
    }

    fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.send(self.agent.get(&format!("{}{path}", self.base)), None)
    }

    fn send(&self, request: ureq::Request, body: Option<Value>) -> Result<Value, ClientError> {
        let url = request.url().to_string();
        let request = match &self.api_key {
            Some(key) => request.set("authorization", &format!("Bearer {key}")),
            None => request,
        };
        let response = match body {
            Some(body) => request.send_json(body),
            None => request.call(),
        };
        match response {
            Ok(r) => r.into_json().map_err(|e| ClientError::Transport {
                url,
                reason: e.to_string(),
            }),
            Err(ureq::Error::Status(status, r)) => Err(ClientError::Status {
                url,
                status,
                body: r.into_string().unwrap_or_default(),
            }),
            Err(e) => Err(ClientError::Transport {
                url,
                reason: e.to_string(),
            }),
        }
    }

    /// Waits until `/v1/models` answers, then returns the first model id.
    pub fn wait_for_model(&self, timeout: Duration) -> Result<String, ClientError> {
        let start = Instant::now();
        loop {
            match self.get("/v1/models") {
                Ok(v) => {
                    if let Some(id) = v["data"][0]["id"].as_str() {
                        return Ok(id.to_string());
                    }
                }
                Err(e) if start.elapsed() >= timeout => {
                    tracing::warn!("{e}");
                    return Err(ClientError::NotReady {
                        url: self.base.clone(),
                        seconds: timeout.as_secs(),
                    });
                }
                Err(_) => {}
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    pub fn chat(&self, model: &str, req: &ChatRequest) -> Result<ChatResponse, ClientError> {
        let mut body = json!({
            "model": model,
            "messages": req.messages,
            "n": req.n,
            "temperature": req.temperature,
            "max_tokens": req.max_tokens,
            "seed": req.seed,
        });
        if let Some(adaptation) = &req.adaptation {
            body["adaptation"] = json!(adaptation);
        }
        let url = format!("{}/v1/chat/completions", self.base);
        let value = self.send(self.agent.post(&url), Some(body))?;
        let malformed = |what: &str| ClientError::Transport {
            url: url.clone(),
            reason: format!("response without {what}"),
        };
        let texts = value["choices"]
            .as_array()
            .ok_or_else(|| malformed("choices"))?
            .iter()
            .map(|c| c["message"]["content"].as_str().unwrap_or("").to_string())
            .collect();
        let completion_tokens = value["usage"]["completion_tokens"]
            .as_u64()
            .ok_or_else(|| malformed("usage"))? as usize;
        let adaptation = match value.get("adaptation") {
            Some(Value::Null) | None => None,
            Some(a) => Some(
                serde_json::from_value(a.clone())
                    .map_err(|e| malformed(&format!("a readable adaptation report ({e})")))?,
            ),
        };
        Ok(ChatResponse {
            texts,
            completion_tokens,
            adaptation,
        })
    }
}
