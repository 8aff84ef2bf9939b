//! The HTTP edge: axum routes, the OpenAI schema, SSE, errors, limits and metrics.
//! It knows nothing of tensors: it validates requests into jobs and hands them to the engine.

mod admin;
pub mod auth;
mod chat;
mod completions;
pub mod error;
mod extract;
mod generate;
mod info;
mod logprobs;
pub mod openai;
mod state;
mod ui;
pub mod validation;

use std::time::Duration;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderName, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use crate::telemetry;
use error::{ApiError, ErrorCode};

pub use info::OPENAPI;
pub use state::{AppState, Ready};

/// Limits of the HTTP layer.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub body_limit_bytes: usize,
}

/// Every route, for the router and for the test that holds the OpenAPI document to it.
pub const ROUTES: [(&str, &str); 17] = [
    ("post", "/v1/chat/completions"),
    ("post", "/v1/completions"),
    ("get", "/v1/models"),
    ("get", "/health"),
    ("get", "/ready"),
    ("get", "/metrics"),
    ("get", "/version"),
    ("get", "/openapi.json"),
    ("get", "/docs"),
    ("get", "/admin/adapters"),
    ("post", "/admin/adapters/{name}/reset"),
    ("get", "/admin/adapters/{name}/export"),
    ("post", "/admin/adapters/{name}/rollback"),
    ("post", "/admin/adapters/{name}/import"),
    ("get", "/"),
    ("get", "/static/style.css"),
    ("get", "/static/app.js"),
];

pub fn router(state: AppState, limits: HttpLimits) -> Router {
    let request_id = HeaderName::from_static("x-request-id");
    let inference = Router::new()
        .route("/v1/chat/completions", post(chat::chat_completions))
        .route("/v1/completions", post(completions::completions))
        .route("/v1/models", get(info::models))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::authenticate,
        ));
    Router::new()
        .merge(inference)
        .route("/health", get(info::health))
        .route("/ready", get(info::ready))
        .route("/metrics", get(info::metrics))
        .route("/version", get(info::version))
        .route("/openapi.json", get(info::openapi))
        .route("/docs", get(info::openapi))
        .route("/", get(ui::index))
        .route("/static/style.css", get(ui::style))
        .route("/static/app.js", get(ui::script))
        .route("/admin/adapters", get(admin::list))
        .route("/admin/adapters/{name}/reset", post(admin::reset))
        .route("/admin/adapters/{name}/export", get(admin::export))
        .route("/admin/adapters/{name}/rollback", post(admin::rollback))
        // The import handler reads its own body, after the key check, up to a limit from
        // the model's adapter size.
        .route("/admin/adapters/{name}/import", post(admin::import))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), count_errors))
        .layer(DefaultBodyLimit::max(limits.body_limit_bytes))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::Internal("the handler panicked".into()).into_response()
        }))
        .layer(TraceLayer::new_for_http())
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .with_state(state)
}

async fn not_found(req: Request) -> ApiError {
    ApiError::NotFound(format!(
        "No route for {} {}",
        req.method(),
        req.uri().path()
    ))
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::MethodNotAllowed(format!(
        "Method {} is not allowed on {}",
        req.method(),
        req.uri().path()
    ))
}

/// Counts every error response by its code (the code rides on the response).
async fn count_errors(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    if let Some(ErrorCode(code)) = response.extensions().get::<ErrorCode>() {
        metrics::counter!(telemetry::REQUEST_ERRORS, "model" => state.model_label(), "code" => *code).increment(1);
    } else if response.status() >= StatusCode::BAD_REQUEST {
        metrics::counter!(telemetry::REQUEST_ERRORS, "model" => state.model_label(), "code" => "other").increment(1);
    }
    response
}

/// Resolves on SIGTERM or Ctrl-C; then new requests get 503, work that has not started fails,
/// the episode in flight is cancelled and decoding finishes within `grace`. The process is
/// gone by `grace` plus half a second whatever still runs; a second signal exits at once.
pub async fn shutdown_signal(state: AppState, grace: Duration) {
    stop_signal().await;
    tracing::info!("shutting down: finishing in-flight requests for up to {grace:?}");
    state.begin_shutdown();
    if let Some(engine) = state.engine() {
        tokio::spawn(async move { engine.shutdown(grace).await });
    }
    tokio::spawn(async {
        stop_signal().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
    std::thread::spawn(move || {
        std::thread::sleep(grace + Duration::from_millis(500));
        tracing::warn!("the grace period is over: exiting");
        std::process::exit(0);
    });
}

/// SIGTERM or Ctrl-C.
async fn stop_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = terminate => {},
    }
}
