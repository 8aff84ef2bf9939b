//! The HTTP edge: axum routes, the OpenAI schema, SSE, errors, limits and metrics.
//! It knows nothing of tensors: it validates requests into jobs and hands them to the engine.

pub mod adaptation;
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
use axum::Router;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::classify::ServerErrorsFailureClass;
use tower_http::propagate_header::PropagateHeaderLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::telemetry;
use error::{ApiError, ErrorCode};

pub use state::{AppState, Ready};

/// Limits of the HTTP layer.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    pub body_limit_bytes: usize,
}

/// The document's frame; the paths and schemas come from the handlers and the wire types.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "ttrl-serve",
        description = "OpenAI-compatible inference server that can adapt LoRA weights to its questions by label-free test-time RL."
    ),
    components(schemas(openai::ErrorResponse)),
    modifiers(&SecuritySchemes)
)]
struct ApiFrame;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let bearer = |description: &str| {
            let mut scheme = Http::new(HttpAuthScheme::Bearer);
            scheme.description = Some(description.to_string());
            SecurityScheme::Http(scheme)
        };
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "apiKey",
            bearer("An API key from server.api_keys_file; a server without keys needs none."),
        );
        components.add_security_scheme("admin", bearer("The admin key (server.admin_api_key)."));
    }
}

/// Routes behind API keys, when the server has them.
fn inference_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(chat::chat_completions))
        .routes(routes!(completions::completions))
        .routes(routes!(info::models))
}

/// Routes without API keys: operations, the playground, and the admin API (its own key).
fn open_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(info::health))
        .routes(routes!(info::ready))
        .routes(routes!(info::metrics))
        .routes(routes!(info::version))
        .routes(routes!(info::openapi))
        .routes(routes!(info::docs))
        .routes(routes!(ui::index))
        .routes(routes!(ui::style))
        .routes(routes!(ui::script))
        .routes(routes!(admin::list))
        .routes(routes!(admin::reset))
        .routes(routes!(admin::export))
        .routes(routes!(admin::rollback))
        // The import handler reads its own body, after the key check, up to a limit from
        // the model's adapter size.
        .routes(routes!(admin::import))
}

/// The OpenAPI document of every route the router serves.
pub fn openapi() -> utoipa::openapi::OpenApi {
    OpenApiRouter::with_openapi(ApiFrame::openapi())
        .merge(inference_routes())
        .merge(open_routes())
        .into_openapi()
}

/// The adapter a request is for, set by clients behind a proxy with adapter affinity.
pub const ADAPTER_AFFINITY_HEADER: &str = "x-ttrl-adapter";

pub fn router(state: AppState, limits: HttpLimits) -> Router {
    let request_id = HeaderName::from_static("x-request-id");
    let inference = inference_routes().route_layer(middleware::from_fn_with_state(
        state.clone(),
        auth::authenticate,
    ));
    let (routes, _) = inference.merge(open_routes()).split_for_parts();
    routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), count_errors))
        .layer(DefaultBodyLimit::max(limits.body_limit_bytes))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::Internal("the handler panicked".into()).into_response()
        }))
        .layer(TraceLayer::new_for_http().on_failure(log_failure))
        // Affinity: a proxy in front of replicas hashes this header to pick one, so one
        // adapter's requests meet on one replica; it comes back so clients can see it.
        .layer(PropagateHeaderLayer::new(HeaderName::from_static(
            ADAPTER_AFFINITY_HEADER,
        )))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, MakeRequestUuid))
        .with_state(state)
}

/// Server errors as tower-http logs them, except 503s: those are expected while the model
/// loads and while the server stops (a load balancer polls `/ready` through both), so they are
/// logged at debug, not as errors.
fn log_failure(class: ServerErrorsFailureClass, latency: Duration, _span: &tracing::Span) {
    match class {
        ServerErrorsFailureClass::StatusCode(StatusCode::SERVICE_UNAVAILABLE) => {
            tracing::debug!(?latency, "503 Service Unavailable")
        }
        other => tracing::error!(classification = %other, ?latency, "response failed"),
    }
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
