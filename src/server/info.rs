//! Small read-only endpoints: models, liveness, readiness, version, metrics, OpenAPI.

use std::sync::LazyLock;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Extension;
use axum::Json;

use super::auth::Caller;
use super::error::ApiError;
use super::generate::unix_now;
use super::openai::{ErrorResponse, ModelCard, ModelList, Status, Version};
use super::AppState;

/// The base model, then each of the caller's named adapters as `<model>:<adapter>` (as vLLM
/// lists LoRAs).
#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "openai",
    summary = "The served model and the caller's named adapters",
    responses(
        (status = 200, description = "The models", body = ModelList),
        (status = 401, description = "Missing or unknown API key", body = ErrorResponse),
        (status = 503, description = "Still loading", body = ErrorResponse)
    ),
    security(("apiKey" = []), ())
)]
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
#[utoipa::path(
    get,
    path = "/health",
    tag = "operations",
    summary = "Liveness",
    responses(
        (status = 200, description = "Alive", body = Status),
        (status = 503, description = "The engine has died", body = ErrorResponse)
    )
)]
pub async fn health(State(state): State<AppState>) -> Result<Json<Status>, ApiError> {
    if state.engine().is_some_and(|e| !e.is_alive()) {
        return Err(ApiError::Unavailable(ENGINE_DEAD.into()));
    }
    Ok(Json(Status {
        status: "ok",
        model: None,
    }))
}

/// Readiness: 503 until the weights are loaded, and again while shutting down or once the
/// engine has died.
#[utoipa::path(
    get,
    path = "/ready",
    tag = "operations",
    summary = "Readiness: 503 until the weights are loaded",
    responses(
        (status = 200, description = "Serving", body = Status),
        (status = 503, description = "Loading, shutting down, or the engine has died", body = ErrorResponse)
    )
)]
pub async fn ready(State(state): State<AppState>) -> Result<Json<Status>, ApiError> {
    let ready = state.ready()?;
    Ok(Json(Status {
        status: "ready",
        model: Some(ready.model_name.clone()),
    }))
}

#[utoipa::path(
    get,
    path = "/version",
    tag = "operations",
    summary = "Server name and version",
    responses((status = 200, description = "Name, version and the server's clock", body = Version))
)]
pub async fn version() -> Json<Version> {
    Json(Version {
        name: env!("CARGO_PKG_NAME"),
        version: env!("CARGO_PKG_VERSION"),
        time: unix_now(),
    })
}

#[utoipa::path(
    get,
    path = "/metrics",
    tag = "operations",
    summary = "Prometheus text exposition",
    responses((status = 200, description = "Metrics", body = String, content_type = "text/plain"))
)]
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

#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "operations",
    summary = "This document",
    responses((status = 200, description = "The OpenAPI document", body = Object))
)]
pub async fn openapi() -> Response {
    openapi_json()
}

#[utoipa::path(
    get,
    path = "/docs",
    tag = "operations",
    summary = "This document (alias)",
    responses((status = 200, description = "The OpenAPI document", body = Object))
)]
pub async fn docs() -> Response {
    openapi_json()
}

fn openapi_json() -> Response {
    static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
        super::openapi()
            .to_pretty_json()
            .expect("the OpenAPI document serializes")
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        DOCUMENT.as_str(),
    )
        .into_response()
}
