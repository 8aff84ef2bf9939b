//! One error enum for the HTTP edge. Its single `match` derives the status, the OpenAI
//! `type` and `code`, and the `ttrl_request_errors_total{code}` label, so they cannot drift.

use std::collections::BTreeMap;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use utoipa::openapi::{self, RefOr};
use utoipa::IntoResponses;

use super::openai::{ErrorBody, ErrorResponse};
use crate::engine::{EngineError, SubmitError};

#[derive(Debug, Clone, thiserror::Error)]
pub enum ApiError {
    #[error("{message}")]
    InvalidRequest {
        message: String,
        param: Option<String>,
    },
    #[error("{0}")]
    ContextLength(String),
    #[error("The model `{0}` does not exist.")]
    ModelNotFound(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("Request body is too large: {0}")]
    BodyTooLarge(String),
    #[error("The server is busy: {message}. Retry in {retry_after} s.")]
    QueueFull { message: String, retry_after: u64 },
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    /// Over a cap on adapters; `cap` (the setting's name) is the error code.
    #[error("{message}")]
    CapReached { cap: &'static str, message: String },
    #[error("Internal error: {0}")]
    Internal(String),
}

/// The error code, kept on the response for the metrics middleware.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

impl ApiError {
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
            param: Some(param.into()),
        }
    }

    /// (status, OpenAI type, code, param)
    fn parts(&self) -> (StatusCode, &'static str, &'static str, Option<String>) {
        use ApiError::*;
        match self {
            InvalidRequest { param, .. } => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "invalid_value",
                param.clone(),
            ),
            ContextLength(_) => (
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                "context_length_exceeded",
                Some("messages".into()),
            ),
            ModelNotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "model_not_found",
                Some("model".into()),
            ),
            NotFound(_) => (
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                "not_found",
                None,
            ),
            MethodNotAllowed(_) => (
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request_error",
                "method_not_allowed",
                None,
            ),
            BodyTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "invalid_request_error",
                "body_too_large",
                None,
            ),
            QueueFull { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "queue_full",
                None,
            ),
            Unavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "service_unavailable_error",
                "unavailable",
                None,
            ),
            Unauthorized(_) => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid_api_key",
                None,
            ),
            Forbidden(_) => (
                StatusCode::FORBIDDEN,
                "permission_error",
                "insufficient_permissions",
                None,
            ),
            CapReached { cap, .. } => (StatusCode::FORBIDDEN, "insufficient_quota", cap, None),
            Internal(_) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                "internal_error",
                None,
            ),
        }
    }

    pub fn body(&self) -> ErrorResponse {
        let (_, kind, code, param) = self.parts();
        ErrorResponse {
            error: ErrorBody {
                message: self.to_string(),
                kind,
                param,
                code: Some(code),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, _, code, _) = self.parts();
        let retry_after = match &self {
            ApiError::QueueFull { retry_after, .. } => Some(*retry_after),
            _ => None,
        };
        let mut response = (status, Json(self.body())).into_response();
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response.extensions_mut().insert(ErrorCode(code));
        response
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        match e {
            EngineError::AdapterNotFound(name) => ApiError::ModelNotFound(name),
            EngineError::Invalid(message) => ApiError::InvalidRequest {
                message,
                param: None,
            },
            EngineError::CapReached { cap, message } => ApiError::CapReached { cap, message },
            EngineError::Unavailable(message) => ApiError::Unavailable(message),
            EngineError::Internal(message) => ApiError::Internal(message),
        }
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        match e {
            SubmitError::QueueFull { retry_after, .. } => ApiError::QueueFull {
                message: e.to_string(),
                retry_after,
            },
            SubmitError::Stopped => ApiError::Unavailable(e.to_string()),
        }
    }
}

impl From<crate::Error> for ApiError {
    fn from(e: crate::Error) -> Self {
        match e {
            crate::Error::Tokenizer(m) | crate::Error::Template(m) => ApiError::InvalidRequest {
                message: m,
                param: Some("messages".into()),
            },
            other => ApiError::Internal(other.to_string()),
        }
    }
}

/// The errors a generation endpoint may answer, for the OpenAPI document.
pub struct GenerationErrors;

impl IntoResponses for GenerationErrors {
    fn responses() -> BTreeMap<String, RefOr<openapi::Response>> {
        error_responses(&[
            (
                400,
                "Invalid request: the message and `param` name the field",
            ),
            (401, "Missing or unknown API key"),
            (
                403,
                "The key lacks the right, or a cap on adapters is reached",
            ),
            (404, "Unknown model or adapter"),
            (413, "Body over the limit"),
            (
                429,
                "The queue is full; `Retry-After` says when to come back",
            ),
            (500, "The engine failed this request"),
            (503, "Loading, shutting down, or the engine has stopped"),
        ])
    }
}

/// The errors an admin endpoint may answer, for the OpenAPI document.
pub struct AdminErrors;

impl IntoResponses for AdminErrors {
    fn responses() -> BTreeMap<String, RefOr<openapi::Response>> {
        error_responses(&[
            (400, "Invalid name, version, zip or adapter"),
            (401, "Missing or wrong admin key, or the admin API is off"),
            (403, "A cap on adapters is reached"),
            (404, "No such adapter or version"),
            (413, "An upload, or a file in it, over the limit"),
            (503, "Still loading, or the engine has stopped"),
        ])
    }
}

fn error_responses(statuses: &[(u16, &str)]) -> BTreeMap<String, RefOr<openapi::Response>> {
    statuses
        .iter()
        .map(|&(status, description)| {
            let response = openapi::ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    openapi::ContentBuilder::new()
                        .schema(Some(openapi::Ref::from_schema_name("ErrorResponse")))
                        .build(),
                )
                .build();
            (status.to_string(), RefOr::T(response))
        })
        .collect()
}
