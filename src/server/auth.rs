//! API keys on inference. Each bearer token maps to a tenant and its rights: `infer` (answer),
//! `adapt` (ephemeral adaptation), `train` (create and update named adapters). A tenant's
//! named adapters live under its own namespace: it lists, uses and trains only those, and
//! another tenant's adapter does not exist for it (404, so names do not leak). With no keys
//! configured the server is open, as before, and says so at start.

use std::path::Path;

use axum::extract::{Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use subtle::ConstantTimeEq;

use super::error::ApiError;
use super::validation::ValidRequest;
use super::AppState;
use crate::adapt::store::valid_name;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Right {
    Infer,
    Adapt,
    Train,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    key: String,
    tenant: String,
    rights: Vec<Right>,
}

/// The keys file: `[[key]]` tables of `key`, `tenant`, `rights`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    key: Vec<KeyEntry>,
}

#[derive(Debug)]
pub struct ApiKeys {
    entries: Vec<KeyEntry>,
}

/// Between a tenant and an adapter name in the engine's adapter keys; never in a valid name.
pub const TENANT_SEPARATOR: char = '@';

impl ApiKeys {
    /// Reads and checks a keys file. Errors name the file and entry, never a key.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            anyhow::anyhow!("cannot read the API keys file {}: {e}", path.display())
        })?;
        let file: KeyFile = toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("the API keys file {}: {e}", path.display()))?;
        for (i, entry) in file.key.iter().enumerate() {
            if entry.key.len() < 16 {
                anyhow::bail!("{}: key {i} is shorter than 16 characters", path.display());
            }
            if !valid_name(&entry.tenant) {
                anyhow::bail!(
                    "{}: key {i}'s tenant is not 1-64 letters, digits, `.`, `_` or `-`",
                    path.display()
                );
            }
        }
        Ok(Self { entries: file.key })
    }

    /// The entry whose key equals `token`. Every key is compared, each in constant time, so
    /// the time taken does not tell how much of a key was right.
    fn find(&self, token: &str) -> Option<&KeyEntry> {
        let mut found = None;
        for entry in &self.entries {
            if bool::from(entry.key.as_bytes().ct_eq(token.as_bytes())) {
                found = Some(entry);
            }
        }
        found
    }
}

/// Who is asking: a tenant with rights, or anyone on an open server.
#[derive(Debug, Clone)]
pub struct Caller {
    tenant: Option<String>,
    rights: Vec<Right>,
}

impl Caller {
    fn open() -> Self {
        Self {
            tenant: None,
            rights: vec![Right::Infer, Right::Adapt, Right::Train],
        }
    }

    fn require(&self, right: Right, what: &str) -> Result<(), ApiError> {
        if self.rights.contains(&right) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "This API key may not {what} (it lacks the `{right:?}` right).",
            )))
        }
    }

    /// The engine's key for this caller's adapter `name`.
    pub fn adapter_key(&self, name: &str) -> String {
        match &self.tenant {
            Some(t) => format!("{t}{TENANT_SEPARATOR}{name}"),
            None => name.to_string(),
        }
    }

    /// The name under which this caller sees the engine's adapter `key`, if it is its own.
    pub fn own_adapter<'a>(&self, key: &'a str) -> Option<&'a str> {
        match &self.tenant {
            Some(t) => key
                .strip_prefix(t.as_str())
                .and_then(|r| r.strip_prefix(TENANT_SEPARATOR)),
            None => (!key.contains(TENANT_SEPARATOR)).then_some(key),
        }
    }

    /// Checks the request against this caller's rights and moves its adapter names into the
    /// caller's namespace.
    pub fn scope(&self, mut valid: ValidRequest) -> Result<ValidRequest, ApiError> {
        self.require(Right::Infer, "run inference")?;
        if !valid.adaptation.is_empty() {
            self.require(Right::Adapt, "adapt")?;
        }
        if valid.adaptation.iter().any(|a| a.adapter.is_some()) {
            self.require(Right::Train, "train a named adapter")?;
        }
        valid.adapter = valid.adapter.map(|n| self.adapter_key(&n));
        for a in &mut valid.adaptation {
            a.adapter = a.adapter.as_deref().map(|n| self.adapter_key(n));
        }
        Ok(valid)
    }
}

/// Middleware for `/v1/*`: finds the caller from its bearer token (401 without a valid one
/// when keys are configured) and hands it to the handler.
pub async fn authenticate(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let caller = match &state.api_keys {
        None => Caller::open(),
        Some(keys) => {
            let token = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            match token.and_then(|t| keys.find(t)) {
                Some(entry) => Caller {
                    tenant: Some(entry.tenant.clone()),
                    rights: entry.rights.clone(),
                },
                None => {
                    return ApiError::Unauthorized(
                        "Missing or invalid API key: send `Authorization: Bearer <key>`.".into(),
                    )
                    .into_response()
                }
            }
        }
    };
    req.extensions_mut().insert(caller);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> ApiKeys {
        ApiKeys {
            entries: vec![
                KeyEntry {
                    key: "a".repeat(20),
                    tenant: "acme".into(),
                    rights: vec![Right::Infer],
                },
                KeyEntry {
                    key: "b".repeat(20),
                    tenant: "beta".into(),
                    rights: vec![Right::Infer, Right::Adapt, Right::Train],
                },
            ],
        }
    }

    #[test]
    fn a_token_finds_its_own_entry_only() {
        let keys = keys();
        assert_eq!(keys.find(&"b".repeat(20)).unwrap().tenant, "beta");
        assert!(keys.find(&"a".repeat(19)).is_none());
        assert!(keys.find("").is_none());
    }

    #[test]
    fn tenants_see_only_their_own_adapters() {
        let acme = Caller {
            tenant: Some("acme".into()),
            rights: vec![Right::Infer],
        };
        assert_eq!(acme.adapter_key("team"), "acme@team");
        assert_eq!(acme.own_adapter("acme@team"), Some("team"));
        assert_eq!(acme.own_adapter("beta@team"), None);
        assert_eq!(acme.own_adapter("team"), None);
        assert_eq!(Caller::open().own_adapter("team"), Some("team"));
        assert_eq!(Caller::open().own_adapter("acme@team"), None);
    }
}
