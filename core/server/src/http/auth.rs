//! Who may call `/api/v1`: the bearer-token check and the role each method needs.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use stagely_api::{ErrorBody, ErrorDetail};

use super::{ApiError, AppState};

/// Who may call `/api/v1`: bearer tokens, of which only SHA-256 hashes are held, compared in
/// constant time. With no token configured the API is open, which the configuration allows
/// only on a loopback address.
pub struct ApiAuth {
    tokens: Vec<crate::config::ApiToken>,
    /// Requests refused for a missing or wrong token since start.
    refused: std::sync::atomic::AtomicU64,
}

impl ApiAuth {
    pub fn new(tokens: Vec<crate::config::ApiToken>) -> ApiAuth {
        ApiAuth {
            tokens,
            refused: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// No token is configured: every caller is let in.
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// How many requests were refused (401) since the core started.
    pub fn refused(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether `headers` carry a token this core accepts (always, when the API is open).
    pub fn accepts(&self, headers: &HeaderMap) -> bool {
        self.is_open() || bearer_token(headers).is_some_and(|token| self.check(token).is_some())
    }

    /// The token `presented` is, if any. Every configured hash is compared, in constant
    /// time, whichever matches.
    pub fn check(&self, presented: &str) -> Option<&crate::config::ApiToken> {
        use subtle::ConstantTimeEq;
        let hash = crate::config::hash_token(presented);
        let mut found = None;
        for token in &self.tokens {
            if bool::from(token.sha256.ct_eq(&hash)) && found.is_none() {
                found = Some(token);
            }
        }
        found
    }
}

/// Who made an authenticated API request: its token's name (`anonymous` when the API is
/// open) and role. Set by the token check for the handlers behind it.
#[derive(Debug, Clone)]
pub struct Caller {
    pub name: Arc<str>,
    pub role: crate::config::Role,
}

/// The role a request needs: `read` for `GET` (and `HEAD`), `operate` for the rest (submit,
/// cancel, rebuild). `admin` is needed by nothing yet beyond `operate`.
pub fn role_needed(method: &axum::http::Method) -> crate::config::Role {
    use axum::http::Method;
    if method == Method::GET || method == Method::HEAD {
        crate::config::Role::Read
    } else {
        crate::config::Role::Operate
    }
}

pub(super) async fn require_api_token(
    State(state): State<AppState>,
    mut request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let auth = &state.auth;
    if auth.is_open() {
        request.extensions_mut().insert(Caller {
            name: "anonymous".into(),
            role: crate::config::Role::Admin,
        });
        return next.run(request).await;
    }
    let reason = match bearer_token(request.headers()) {
        None => "missing bearer token",
        Some(token) => match auth.check(token) {
            Some(token) => {
                let needed = role_needed(request.method());
                if token.role < needed {
                    tracing::warn!(
                        token = %token.name,
                        role = %token.role,
                        method = %request.method(),
                        path = %request.uri().path(),
                        "API request refused: the route needs the `{needed}` role"
                    );
                    return ApiError::Forbidden(format!(
                        "this request needs the `{needed}` role; the token `{}` has `{}`",
                        token.name, token.role
                    ))
                    .into_response();
                }
                if needed > crate::config::Role::Read {
                    // Every state-changing call, with who made it.
                    tracing::info!(
                        token = %token.name,
                        method = %request.method(),
                        path = %request.uri().path(),
                        "API call"
                    );
                } else {
                    tracing::debug!(token = %token.name, "API caller authenticated");
                }
                let caller = Caller {
                    name: token.name.as_str().into(),
                    role: token.role,
                };
                request.extensions_mut().insert(caller);
                return next.run(request).await;
            }
            None => "unknown API token",
        },
    };
    let refused = auth
        .refused
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        + 1;
    // The presented token is never logged, not even in part.
    tracing::warn!(
        method = %request.method(),
        path = %request.uri().path(),
        refused_total = refused,
        "API request refused: {reason}"
    );
    unauthorized_response(reason)
}

pub(super) fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ")?.trim();
    (!token.is_empty()).then_some(token)
}

pub(super) fn unauthorized(reason: &str) -> Response {
    tracing::warn!("agent connection refused: {reason}");
    unauthorized_response(reason)
}

fn unauthorized_response(reason: &str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(ErrorBody {
            error: ErrorDetail {
                code: "unauthorized".to_string(),
                message: reason.to_string(),
                field: None,
            },
        }),
    )
        .into_response()
}
