//! API keys and tenants.
//!
//! Keys are configured as the SHA-256 of the key (the key itself is never stored). A request
//! names its key in `Authorization: Bearer KEY` or `X-API-Key: KEY`. Each key may be limited to
//! some views, scoped to some values of some dimensions (a tenant: `app_id` in its apps), and
//! limited in requests per minute. A scope is a filter added to every query the key asks,
//! whatever it filters or groups by, so rows, `other` rows and totals hold only what the key
//! may see; a view without a scoped dimension is refused to that key, since its rows would
//! mix tenants. With no keys configured, every request is served (the server then listens on
//! loopback only unless told otherwise).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::num::NonZeroU32;
use std::sync::Arc;

use axum::http::{header, HeaderMap, StatusCode};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};
use tandem_core::query::{Match, ViewQuery};
use tandem_core::view::ViewDef;
use tandem_core::Catalog;

use crate::error::ApiError;

/// A configured key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Who it is for (in logs and errors; not secret).
    pub name: String,
    /// SHA-256 of the key.
    pub sha256: [u8; 32],
    /// The views it may read; every view if `None`.
    pub views: Option<BTreeSet<String>>,
    /// Dimension values it is limited to: rows whose dimension holds one of these only.
    pub scope: BTreeMap<String, Vec<String>>,
    /// Requests a minute (a burst of as many); unlimited if `None`.
    pub requests_per_minute: Option<u32>,
}

impl ApiKey {
    /// Parses the hex SHA-256 of a key.
    pub fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
        let hex = hex.trim();
        if hex.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(out)
    }

    /// The SHA-256 of `key`.
    pub fn hash(key: &str) -> [u8; 32] {
        Sha256::digest(key.as_bytes()).into()
    }
}

/// The keys of a server, and their rate limiters.
#[derive(Default)]
pub struct Auth {
    keys: HashMap<[u8; 32], (Arc<ApiKey>, Option<DefaultDirectRateLimiter>)>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.keys.values().map(|(k, _)| &k.name))
            .finish()
    }
}

impl Auth {
    /// Checks `keys` against `catalog` (views and dimensions they name exist) and builds their
    /// limiters. Errors name the key.
    pub fn new(keys: Vec<ApiKey>, catalog: &Catalog) -> Result<Self, String> {
        let mut out = HashMap::new();
        for k in keys {
            if let Some(views) = &k.views {
                if let Some(v) = views.iter().find(|v| !catalog.views.contains_key(*v)) {
                    return Err(format!("api key `{}`: no view `{v}`", k.name));
                }
            }
            for dim in k.scope.keys() {
                if !catalog
                    .views
                    .values()
                    .any(|v| v.dimensions.iter().any(|d| d == dim))
                {
                    return Err(format!(
                        "api key `{}`: scope names `{dim}`, a dimension of no view",
                        k.name
                    ));
                }
            }
            let limiter = match k.requests_per_minute {
                None => None,
                Some(n) => Some(RateLimiter::direct(Quota::per_minute(
                    NonZeroU32::new(n).ok_or_else(|| {
                        format!(
                            "api key `{}`: requests_per_minute must be at least 1",
                            k.name
                        )
                    })?,
                ))),
            };
            if out
                .insert(k.sha256, (Arc::new(k.clone()), limiter))
                .is_some()
            {
                return Err(format!(
                    "api key `{}`: the same key is configured twice",
                    k.name
                ));
            }
        }
        Ok(Auth { keys: out })
    }

    /// Whether any key is configured (if none, every request is served).
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// The key a request presents: `None` when no keys are configured; 401 when keys are and
    /// the request has none or an unknown one; 429 when the key is over its rate.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Option<Arc<ApiKey>>, ApiError> {
        if self.keys.is_empty() {
            return Ok(None);
        }
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .or_else(|| headers.get("x-api-key").and_then(|v| v.to_str().ok()))
            .map(str::trim);
        let Some(key) = presented else {
            return Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "an API key is required: send `Authorization: Bearer KEY` or `X-API-Key: KEY`",
            ));
        };
        let Some((k, limiter)) = self.keys.get(&ApiKey::hash(key)) else {
            return Err(ApiError::new(StatusCode::UNAUTHORIZED, "unknown API key"));
        };
        if let Some(l) = limiter {
            if l.check().is_err() {
                return Err(ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "key `{}` is over its rate of {} requests a minute; retry shortly",
                        k.name,
                        k.requests_per_minute.unwrap_or_default()
                    ),
                ));
            }
        }
        Ok(Some(Arc::clone(k)))
    }
}

/// Whether `key` may read `view` at all.
pub fn may_read(key: Option<&ApiKey>, view: &ViewDef) -> bool {
    key.is_none_or(|k| {
        k.views.as_ref().is_none_or(|v| v.contains(&view.name))
            && k.scope.keys().all(|d| view.dimensions.contains(d))
    })
}

/// Refuses `view` to `key` (403) unless it may read it.
pub fn check_view(key: Option<&ApiKey>, view: &ViewDef) -> Result<(), ApiError> {
    let Some(k) = key else { return Ok(()) };
    if k.views.as_ref().is_some_and(|v| !v.contains(&view.name)) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!("key `{}` may not read view `{}`", k.name, view.name),
        ));
    }
    if let Some(d) = k.scope.keys().find(|d| !view.dimensions.contains(d)) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            format!(
                "key `{}` sees only some values of `{d}`, which view `{}` does not have: its \
                 rows would mix them",
                k.name, view.name
            ),
        ));
    }
    Ok(())
}

/// Adds `key`'s scope to `q` as filters (rows must pass them all, with the query's own).
pub fn scope(key: Option<&ApiKey>, view: &ViewDef, q: &mut ViewQuery) {
    let Some(k) = key else { return };
    for (dim, values) in &k.scope {
        if let Some(i) = view.dimension(dim) {
            q.filters.push((i, Match::In(values.clone())));
        }
    }
}
