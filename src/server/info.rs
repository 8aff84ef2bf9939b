//! Small read-only endpoints: models, liveness, readiness, version, metrics, OpenAPI.

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;
use serde_json::json;

use super::auth::Caller;
use super::error::ApiError;
use super::generate::unix_now;
use super::openai::{ModelCard, ModelList};
use super::AppState;

/// The base model, then each of the caller's named adapters as `<model>:<adapter>` (as vLLM
/// lists LoRAs).
pub async fn models(
    State(state): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Result<Json<ModelList>, ApiError> {
    let ready = state.ready()?;
    let card = |id: String| ModelCard {
        id,
        object: "model",
        created: state.started,
        owned_by: "ttrl-serve",
        max_model_len: ready.max_model_len,
    };
    let adapters = ready.engine.adapters().await.unwrap_or_default();
    let mut data = vec![card(ready.model_name.clone())];
    data.extend(
        adapters
            .iter()
            .filter_map(|a| caller.own_adapter(&a.name))
            .map(|name| card(format!("{}:{name}", ready.model_name))),
    );
    Ok(Json(ModelList {
        object: "list",
        data,
    }))
}

/// What /health, /ready and requests say once the engine thread has died.
pub const ENGINE_DEAD: &str = "The engine has died; the server is restarting.";

/// Liveness: 200 while loading and serving, 503 once the engine has died (the process is
/// about to exit).
pub async fn health(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    if state.engine().is_some_and(|e| !e.is_alive()) {
        return Err(ApiError::Unavailable(ENGINE_DEAD.into()));
    }
    Ok(Json(json!({"status": "ok"})))
}

/// Readiness: 503 until the weights are loaded, and again while shutting down or once the
/// engine has died.
pub async fn ready(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    let ready = state.ready()?;
    Ok(Json(json!({"status": "ready", "model": ready.model_name})))
}

pub async fn version() -> Json<serde_json::Value> {
    Json(
        json!({"name": env!("CARGO_PKG_NAME"), "version": env!("CARGO_PKG_VERSION"), "time": unix_now()}),
    )
}

pub async fn metrics(State(state): State<AppState>) -> Response {
    state.process_metrics.collect();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.prometheus.render(),
    )
        .into_response()
}

/// The OpenAPI document, embedded at build time.
pub const OPENAPI: &str = include_str!("../../static/openapi.json");

pub async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}
