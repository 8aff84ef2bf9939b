//! `/admin/adapters`: list, reset, export (PEFT files in a zip) and import named adapters.
//! Behind a bearer token; with no token configured the admin API stays off.

use std::io::{Cursor, Read, Write};

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};

use super::error::ApiError;
use super::AppState;
use crate::adapt::store::valid_name;
use crate::engine::{AdapterInfo, Engine, EngineError, SubmitError};

/// The PEFT files an export carries and an import expects.
const FILES: [&str; 2] = ["adapter_model.safetensors", "adapter_config.json"];

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
    if given != Some(key) {
        return Err(ApiError::Unauthorized(
            "Missing or wrong admin API key.".into(),
        ));
    }
    state
        .engine()
        .ok_or_else(|| ApiError::Unavailable("The model is still loading.".into()))
}

fn checked(name: &str) -> Result<(), ApiError> {
    if valid_name(name) {
        Ok(())
    } else {
        Err(ApiError::invalid(
            "name",
            format!("`{name}` is not a valid adapter name (1-64 letters, digits, `.`, `_`, `-`)"),
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

pub async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    let engine = authorize(&state, &headers)?;
    let data: Vec<AdapterInfo> = engine.adapters().await.map_err(engine_gone)?;
    Ok(Json(json!({"object": "list", "data": data})))
}

pub async fn reset(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Json<AdapterInfo>, ApiError> {
    let engine = authorize(&state, &headers)?;
    checked(&name)?;
    Ok(Json(
        engine
            .reset_adapter(name)
            .await
            .map_err(engine_gone)?
            .map_err(adapter_error)?,
    ))
}

pub async fn export(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let engine = authorize(&state, &headers)?;
    checked(&name)?;
    let dir = engine
        .export_adapter(name.clone())
        .await
        .map_err(engine_gone)?
        .map_err(adapter_error)?;
    let mut zip = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let internal =
        |e: &dyn std::fmt::Display| ApiError::Internal(format!("exporting `{name}`: {e}"));
    for file in FILES {
        let bytes = std::fs::read(dir.join(file)).map_err(|e| internal(&e))?;
        zip.start_file(file, zip::write::SimpleFileOptions::default())
            .map_err(|e| internal(&e))?;
        zip.write_all(&bytes).map_err(|e| internal(&e))?;
    }
    let bytes = zip.finish().map_err(|e| internal(&e))?.into_inner();
    let disposition = format!("attachment; filename=\"{name}.zip\"");
    Ok((
        [
            (header::CONTENT_TYPE, "application/zip".to_string()),
            (header::CONTENT_DISPOSITION, disposition),
        ],
        bytes,
    )
        .into_response())
}

pub async fn import(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<AdapterInfo>, ApiError> {
    let engine = authorize(&state, &headers)?;
    checked(&name)?;
    let bad = |e: &dyn std::fmt::Display| {
        ApiError::invalid(
            "body",
            format!("expected a zip of {}: {e}", FILES.join(" and ")),
        )
    };
    let mut zip = zip::ZipArchive::new(Cursor::new(body.to_vec())).map_err(|e| bad(&e))?;
    let dir = std::env::temp_dir().join(format!("ttrl-import-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).map_err(|e| ApiError::Internal(e.to_string()))?;
    let result = async {
        for file in FILES {
            let mut entry = zip.by_name(file).map_err(|e| bad(&e))?;
            let mut bytes = Vec::new();
            entry.read_to_end(&mut bytes).map_err(|e| bad(&e))?;
            std::fs::write(dir.join(file), bytes).map_err(|e| ApiError::Internal(e.to_string()))?;
        }
        engine
            .import_adapter(name, dir.clone())
            .await
            .map_err(engine_gone)?
            .map_err(adapter_error)
    }
    .await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(Json(result?))
}
