//! `/admin/adapters`: list, reset, export (PEFT files in a zip) and import named adapters.
//! Behind a bearer token; with no token configured the admin API stays off.

use std::fs::File;
use std::io::{Cursor, Read, Write};

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderName};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::Value;
use subtle::ConstantTimeEq;
use utoipa::{IntoParams, ToSchema};

use super::error::{AdminErrors, ApiError};
use super::extract::{ApiPath, ApiQuery};
use super::AppState;
use crate::adapt::store::valid_key;
use crate::engine::{self, Engine, EngineError, SubmitError};
use crate::model::lora::{CONFIG_FILE, PEFT_FILES};

/// The exported version, on an export's response.
const VERSION_HEADER: &str = "x-ttrl-adapter-version";

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<Engine, ApiError> {
    let Some(key) = state.admin_key.as_deref() else {
        return Err(ApiError::Unauthorized(
            "The admin API is disabled: set server.admin_api_key.".into(),
        ));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let matches = given.is_some_and(|g| bool::from(g.as_bytes().ct_eq(key.as_bytes())));
    if !matches {
        return Err(ApiError::Unauthorized(
            "Missing or wrong admin API key.".into(),
        ));
    }
    state
        .engine()
        .ok_or_else(|| ApiError::Unavailable("The model is still loading.".into()))
}

/// The operator names any adapter: `name`, or `tenant@name` for a tenant's.
fn checked(name: &str) -> Result<(), ApiError> {
    if valid_key(name) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "name",
            format!(
                "`{name}` is not a valid adapter name (1-64 letters, digits, `.`, `_`, `-`; \
                 `tenant@name` for a tenant's)"
            ),
        ))
    }
}

fn engine_gone(_: SubmitError) -> ApiError {
    ApiError::Unavailable("The engine has stopped.".into())
}

fn adapter_error(e: EngineError) -> ApiError {
    match e {
        EngineError::AdapterNotFound(name) => ApiError::NotFound(format!("No adapter `{name}`.")),
        other => other.into(),
    }
}

/// A named adapter and the version it serves.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AdapterInfo {
    /// `name`, or `tenant@name` for a tenant's adapter.
    pub name: String,
    pub version: u64,
}

impl From<engine::AdapterInfo> for AdapterInfo {
    fn from(a: engine::AdapterInfo) -> Self {
        Self {
            name: a.name,
            version: a.version,
        }
    }
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AdapterList {
    pub object: &'static str,
    pub data: Vec<AdapterInfo>,
}

#[utoipa::path(
    get,
    path = "/admin/adapters",
    tag = "admin",
    summary = "Named adapters and their versions",
    responses(
        (status = 200, description = "Every named adapter", body = AdapterList),
        AdminErrors
    ),
    security(("admin" = []))
)]
pub async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<AdapterList>, ApiError> {
    let engine = authorize(&state, &headers)?;
    let adapters = engine.adapters().await.map_err(engine_gone)?;
    Ok(Json(AdapterList {
        object: "list",
        data: adapters.into_iter().map(AdapterInfo::from).collect(),
    }))
}

#[utoipa::path(
    post,
    path = "/admin/adapters/{name}/reset",
    tag = "admin",
    summary = "Replace a named adapter with a fresh one, published as its next version",
    params(("name" = String, Path, description = "`name`, or `tenant@name` for a tenant's adapter")),
    responses(
        (status = 200, description = "The new version", body = AdapterInfo),
        AdminErrors
    ),
    security(("admin" = []))
)]
pub async fn reset(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(name): ApiPath<String>,
) -> Result<Json<AdapterInfo>, ApiError> {
    let engine = authorize(&state, &headers)?;
    checked(&name)?;
    let info = engine
        .reset_adapter(name)
        .await
        .map_err(engine_gone)?
        .map_err(adapter_error)?;
    Ok(Json(info.into()))
}

#[derive(serde::Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct RollbackQuery {
    /// A kept version of the adapter.
    version: u64,
}

/// Publishes a kept version's weights as the adapter's next version.
#[utoipa::path(
    post,
    path = "/admin/adapters/{name}/rollback",
    tag = "admin",
    summary = "Publish a kept version's weights as the adapter's next version",
    params(("name" = String, Path, description = "`name`, or `tenant@name` for a tenant's adapter"), RollbackQuery),
    responses(
        (status = 200, description = "The new version", body = AdapterInfo),
        AdminErrors
    ),
    security(("admin" = []))
)]
pub async fn rollback(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(name): ApiPath<String>,
    ApiQuery(query): ApiQuery<RollbackQuery>,
) -> Result<Json<AdapterInfo>, ApiError> {
    let engine = authorize(&state, &headers)?;
    checked(&name)?;
    let info = engine
        .rollback_adapter(name, query.version)
        .await
        .map_err(engine_gone)?
        .map_err(adapter_error)?;
    Ok(Json(info.into()))
}

#[utoipa::path(
    get,
    path = "/admin/adapters/{name}/export",
    tag = "admin",
    summary = "PEFT files (adapter_model.safetensors, adapter_config.json) as a zip",
    params(("name" = String, Path, description = "`name`, or `tenant@name` for a tenant's adapter")),
    responses(
        (status = 200, description = "The zip; `x-ttrl-adapter-version` names the version", body = Vec<u8>, content_type = "application/zip"),
        AdminErrors
    ),
    security(("admin" = []))
)]
pub async fn export(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(name): ApiPath<String>,
) -> Result<Response, ApiError> {
    let engine = authorize(&state, &headers)?;
    checked(&name)?;
    let exported = engine
        .export_adapter(name.clone())
        .await
        .map_err(engine_gone)?
        .map_err(adapter_error)?;
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let internal =
        |e: &dyn std::fmt::Display| ApiError::Internal(format!("exporting `{name}`: {e}"));
    for (file, bytes) in &exported.files {
        zip.start_file(file.as_str(), zip::write::SimpleFileOptions::default())
            .map_err(|e| internal(&e))?;
        zip.write_all(bytes).map_err(|e| internal(&e))?;
    }
    let bytes = zip.finish().map_err(|e| internal(&e))?.into_inner();
    let disposition = format!("attachment; filename=\"{name}.zip\"");
    let version = exported.version.to_string();
    Ok((
        [
            (header::CONTENT_TYPE, "application/zip".to_string()),
            (header::CONTENT_DISPOSITION, disposition),
            (HeaderName::from_static(VERSION_HEADER), version),
        ],
        bytes,
    )
        .into_response())
}

/// The key is checked before the body is read; the body streams to a temporary file and it
/// and each unzipped file are capped at what an adapter of this model can weigh
/// (`Ready::import_limit_bytes`), so memory stays flat whatever is sent; the adapter's rank,
/// alpha, shapes and values are checked before it is built, and its base model compared.
#[utoipa::path(
    post,
    path = "/admin/adapters/{name}/import",
    tag = "admin",
    summary = "Load PEFT files (a zip body) as the named adapter's next version",
    params(("name" = String, Path, description = "`name`, or `tenant@name` for a tenant's adapter")),
    request_body(content = Vec<u8>, content_type = "application/zip"),
    responses(
        (status = 200, description = "The new version", body = AdapterInfo),
        AdminErrors
    ),
    security(("admin" = []))
)]
pub async fn import(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiPath(name): ApiPath<String>,
    body: Body,
) -> Result<Json<AdapterInfo>, ApiError> {
    let engine = authorize(&state, &headers)?;
    checked(&name)?;
    let ready = state.ready()?;
    let dir = std::env::temp_dir().join(format!("ttrl-import-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).map_err(|e| ApiError::Internal(e.to_string()))?;
    let result = async {
        let upload = receive(body, &dir.join("upload.zip"), ready.import_limit_bytes).await?;
        let (files, limit, served) = (
            dir.clone(),
            ready.import_limit_bytes,
            ready.model_name.clone(),
        );
        tokio::task::spawn_blocking(move || unpack(upload, &files, limit, &served))
            .await
            .map_err(|e| ApiError::Internal(format!("unpacking the upload: {e}")))??;
        engine
            .import_adapter(name, dir.clone())
            .await
            .map_err(engine_gone)?
            .map_err(adapter_error)
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Json(result?.into()))
}

/// Streams the request body to `path`, refusing it once it passes `limit` bytes.
async fn receive(body: Body, path: &std::path::Path, limit: usize) -> Result<File, ApiError> {
    use futures::StreamExt;
    use tokio::io::AsyncWriteExt;
    let io = |e: std::io::Error| ApiError::Internal(format!("storing the upload: {e}"));
    let mut file = tokio::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .await
        .map_err(io)?;
    let mut stream = body.into_data_stream();
    let mut received = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| ApiError::invalid("body", format!("reading it: {e}")))?;
        received += chunk.len();
        if received > limit {
            return Err(ApiError::BodyTooLarge(format!(
                "an adapter of this model is at most {limit} bytes"
            )));
        }
        file.write_all(&chunk).await.map_err(io)?;
    }
    file.flush().await.map_err(io)?;
    Ok(file.into_std().await)
}

/// Writes the PEFT files of the uploaded zip into `dir`, each streamed to its file and capped
/// at `limit` bytes as it unpacks (the zip's own size fields can lie). Blocking: run it off
/// the async workers.
fn unpack(upload: File, dir: &std::path::Path, limit: usize, served: &str) -> Result<(), ApiError> {
    let bad = |e: &dyn std::fmt::Display| {
        ApiError::invalid(
            "body",
            format!("expected a zip of {}: {e}", PEFT_FILES.join(" and ")),
        )
    };
    let mut zip = zip::ZipArchive::new(upload).map_err(|e| bad(&e))?;
    for file in PEFT_FILES {
        let entry = zip.by_name(file).map_err(|e| bad(&e))?;
        let mut out =
            File::create(dir.join(file)).map_err(|e| ApiError::Internal(e.to_string()))?;
        let written =
            std::io::copy(&mut entry.take(limit as u64 + 1), &mut out).map_err(|e| bad(&e))?;
        if written > limit as u64 {
            return Err(ApiError::BodyTooLarge(format!(
                "{file} unpacks to more than {limit} bytes"
            )));
        }
    }
    let config =
        std::fs::read(dir.join(CONFIG_FILE)).map_err(|e| ApiError::Internal(e.to_string()))?;
    check_base_model(&config, served)
}

/// An adapter trained on another base model is refused (by the name's last path part, so
/// `HuggingFaceTB/SmolLM2-135M-Instruct` matches a server serving `SmolLM2-135M-Instruct`).
fn check_base_model(config: &[u8], served: &str) -> Result<(), ApiError> {
    let config: Value = serde_json::from_slice(config)
        .map_err(|e| ApiError::invalid("body", format!("{CONFIG_FILE}: {e}")))?;
    let last = |s: &str| {
        s.trim_end_matches('/')
            .rsplit('/')
            .next()
            .unwrap_or(s)
            .to_string()
    };
    match config["base_model_name_or_path"].as_str() {
        Some(base) if !base.is_empty() && last(base) != last(served) => Err(ApiError::invalid(
            "body",
            format!("the adapter was trained on `{base}`; this server serves `{served}`"),
        )),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::check_base_model;

    #[test]
    fn an_adapter_of_another_base_model_is_refused() {
        let config = |base: &str| format!(r#"{{"base_model_name_or_path": "{base}"}}"#);
        let served = "SmolLM2-135M-Instruct";
        assert!(check_base_model(
            config("HuggingFaceTB/SmolLM2-135M-Instruct").as_bytes(),
            served
        )
        .is_ok());
        assert!(check_base_model(config("Qwen/Qwen2.5-1.5B").as_bytes(), served).is_err());
        assert!(check_base_model(b"{}", served).is_ok());
    }
}
