//! The playground page, embedded at build time so it works from any working directory and
//! needs no network: plain HTML, CSS and JavaScript of our own.

use axum::http::header;
use axum::response::{Html, IntoResponse, Response};

const INDEX: &str = include_str!("../../static/index.html");
const STYLE: &str = include_str!("../../static/style.css");
const SCRIPT: &str = include_str!("../../static/app.js");

#[utoipa::path(get, path = "/", tag = "playground", summary = "The playground page",
    responses((status = 200, description = "HTML", body = String, content_type = "text/html")))]
pub async fn index() -> Html<&'static str> {
    Html(INDEX)
}

#[utoipa::path(get, path = "/static/style.css", tag = "playground", summary = "The playground's stylesheet",
    responses((status = 200, description = "CSS", body = String, content_type = "text/css")))]
pub async fn style() -> Response {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], STYLE).into_response()
}

#[utoipa::path(get, path = "/static/app.js", tag = "playground", summary = "The playground's script",
    responses((status = 200, description = "JavaScript", body = String, content_type = "text/javascript")))]
pub async fn script() -> Response {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        SCRIPT,
    )
        .into_response()
}
