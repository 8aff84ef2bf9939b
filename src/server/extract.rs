//! Our JSON extractor: axum's rejections (bad JSON, wrong content type, body too large)
//! come back in the OpenAI error shape instead of axum's plain text.

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::ApiError;

pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(rejection_to_error(rejection)),
        }
    }
}

fn rejection_to_error(rejection: JsonRejection) -> ApiError {
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
