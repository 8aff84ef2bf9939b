//! Our extractors: axum's own (`Json`, `Query`, `Path`) whose rejections (bad JSON, a wrong
//! content type, a body too large, a missing query field, a path that is not UTF-8) come back
//! in the OpenAI error shape instead of axum's plain text.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts};
use axum::http::StatusCode;

use super::error::ApiError;

#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct ApiJson<T>(pub T);

#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct ApiQuery<T>(pub T);

#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct ApiPath<T>(pub T);

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            return ApiError::BodyTooLarge(rejection.body_text());
        }
        let message = match &rejection {
            JsonRejection::MissingJsonContentType(_) => {
                "Expected request with `Content-Type: application/json`".to_string()
            }
            other => other.body_text(),
        };
        ApiError::InvalidRequest {
            message,
            param: None,
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> Self {
        ApiError::InvalidRequest {
            message: rejection.body_text(),
            param: None,
        }
    }
}

impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        ApiError::InvalidRequest {
            message: rejection.body_text(),
            param: None,
        }
    }
}
