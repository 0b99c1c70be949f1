//! The HTTP API (JSON) and the agent WebSocket endpoint.
//!
//! API boundary:
//! - `POST /api/v1/workflows` — submit a run (see [`SubmitRequest`]); `201` with the run.
//! - `GET /api/v1/workflows/{id}` — the run, its jobs and every job's attempts.
//! - `POST /api/v1/workflows/{id}/cancel` — cancel a run: `202` with the run; `409` when it
//!   already finished.
//! - `POST /api/v1/environments/{environment_id}/rebuild` — a new run from the environment's
//!   latest run (same repository, commit and jobs): `201` with the run.
//! - `GET /api/v1/queue` — jobs waiting for an instance, with their position.
//! - `GET /api/v1/jobs/{id}/logs/stream` — Server-Sent Events: the backlog, then live lines
//!   (`id:` = seq, resumable with `Last-Event-ID`), then an `end` event with the job's status.
//! - `GET /api/v1/jobs/{id}/logs?after=SEQ&limit=N` — one page of log lines (JSON), or
//!   `?format=text` for every line streamed as plain text.
//! - `GET /healthz` — liveness and database reachability.
//! - `GET /api/v1/agent/connect` — the agents' WebSocket; `Authorization: Bearer <token>`
//!   is checked before the upgrade, and a missing, wrong or spent token gets `401`.
//!
//! Every `/api/v1` route but the agent endpoint requires `Authorization: Bearer <token>`
//! ([`ApiAuth`]); `/healthz` is open (it says nothing but "ok").
//!
//! Client errors are answered precisely (naming the field) and are not logged as errors;
//! internal errors are logged with context and answered without details.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use stagely_protocol::MAX_FRAME_BYTES;

use crate::db::{AttemptRow, JobRow, LogRow, NewJob, NewRun, RunRow};
use crate::engine::{CancelReason, CommandError};
use crate::runner::{RunSecrets, Runner, RunnerError};
use crate::source;
use crate::stagely_yaml;

/// Largest `stagely.yaml` accepted.
pub const MAX_CONFIG_BYTES: usize = 256 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub runner: Runner,
    pub auth: Arc<ApiAuth>,
    pub limits: crate::config::ApiLimits,
    /// For the cost estimates of run views.
    pub prices: Arc<crate::cost::PriceTable>,
    /// Permits for reading `stagely.yaml` from git; sized `limits.max_concurrent_git_reads`.
    pub git_reads: Arc<tokio::sync::Semaphore>,
    /// Publishers of the runs watched through `GET /api/v1/workflows/{id}/events`.
    pub run_events: Arc<crate::run_events::RunEvents>,
    /// The event streams open (both SSE routes), capped in total and per token.
    pub streams: Arc<SseStreams>,
}

/// Largest `POST /api/v1/workflows` body (a `stagely.yaml` of [`MAX_CONFIG_BYTES`] and the
/// other fields, JSON-escaped).
pub const MAX_SUBMIT_BODY_BYTES: usize = 2 * MAX_CONFIG_BYTES + 64 * 1024;

/// Every route of the core.
pub fn app(state: AppState) -> Router {
    // Routes for API callers: each needs a token. The agent endpoint authenticates with its
    // own per-attempt token instead, and `/healthz` is open.
    let callers = Router::new()
        .route("/api/v1/workflows", post(submit_workflow))
        .route("/api/v1/workflows/{id}", get(get_workflow))
        .route("/api/v1/workflows/{id}/cancel", post(cancel_workflow))
        .route("/api/v1/workflows/{id}/events", get(stream_run_events))
        .route(
            "/api/v1/environments/{environment_id}/rebuild",
            post(rebuild_environment),
        )
        .route("/api/v1/queue", get(get_queue))
        .route("/api/v1/jobs/{id}/logs", get(get_logs))
        .route("/api/v1/jobs/{id}/logs/stream", get(stream_logs))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            require_api_token,
        ));
    Router::new()
        .route("/healthz", get(healthz))
        .route("/api/v1/agent/connect", get(agent_connect))
        .merge(callers)
        .with_state(state)
}

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

async fn require_api_token(
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

/// The one error type of the API.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{what} `{id}` not found")]
    NotFound { what: &'static str, id: String },
    #[error("{field}: {message}")]
    InvalidField { field: String, message: String },
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unprocessable(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{message}")]
    Busy {
        message: String,
        retry_after_secs: u64,
    },
    /// `429`: this caller (its address or token) is over its share; `Retry-After` says when
    /// to come back.
    #[error("{message}")]
    TooManyRequests {
        message: String,
        retry_after_secs: u64,
    },
    /// `403`: the token is valid but its role does not allow this.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    Timeout(String),
    /// The command is illegal in the current state (e.g. cancelling a finished run).
    #[error("{0}")]
    Conflict(String),
    #[error("internal error")]
    Internal(#[from] anyhow::Error),
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: ErrorDetail<'a>,
}

#[derive(Serialize)]
struct ErrorDetail<'a> {
    code: &'a str,
    message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    field: Option<&'a str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, field) = match &self {
            ApiError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found", None),
            ApiError::InvalidField { field, .. } => (
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_field",
                Some(field.as_str()),
            ),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request", None),
            ApiError::Unprocessable(_) => (StatusCode::UNPROCESSABLE_ENTITY, "unprocessable", None),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable", None),
            ApiError::Busy { .. } => (StatusCode::SERVICE_UNAVAILABLE, "busy", None),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", None),
            ApiError::TooManyRequests { .. } => {
                (StatusCode::TOO_MANY_REQUESTS, "too_many_requests", None)
            }
            ApiError::PayloadTooLarge(_) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", None)
            }
            ApiError::Timeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout", None),
            ApiError::Conflict(_) => (StatusCode::CONFLICT, "conflict", None),
            ApiError::UnsupportedMediaType(_) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                None,
            ),
            ApiError::Internal(error) => {
                tracing::error!("internal error: {error:#}");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal", None)
            }
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code,
                message: self.to_string(),
                field,
            },
        };
        let mut response = (status, Json(body)).into_response();
        // The request body was not read to its end: the connection cannot carry another
        // request, and the client must not try (it would find it closed).
        if matches!(self, ApiError::PayloadTooLarge(_) | ApiError::Timeout(_)) {
            response.headers_mut().insert(
                header::CONNECTION,
                header::HeaderValue::from_static("close"),
            );
        }
        if let ApiError::Busy {
            retry_after_secs, ..
        }
        | ApiError::TooManyRequests {
            retry_after_secs, ..
        } = &self
            && let Ok(value) = header::HeaderValue::from_str(&retry_after_secs.to_string())
        {
            response.headers_mut().insert(header::RETRY_AFTER, value);
        }
        response
    }
}

impl From<crate::db::DbError> for ApiError {
    fn from(error: crate::db::DbError) -> Self {
        ApiError::Internal(error.into())
    }
}

fn invalid(field: &str, message: impl Into<String>) -> ApiError {
    ApiError::InvalidField {
        field: field.to_string(),
        message: message.into(),
    }
}

async fn healthz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    state.runner.db().last_log_seq("healthz").await?;
    if !state.runner.is_alive() {
        return Err(ApiError::Unavailable(
            "the scheduler of this core stopped; restart it".into(),
        ));
    }
    Ok(Json(serde_json::json!({ "status": "ok" })))
}

/// `POST /api/v1/workflows`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubmitRequest {
    /// A git URL, or a path on the core's machine (local provider).
    pub repo_url: String,
    /// Full commit id (40 or 64 hex digits).
    pub commit_hash: String,
    pub branch: String,
    /// Lowercase identifier; images go to `<registry>/<namespace>/<environment_id>:<job>`.
    pub environment_id: String,
    /// `pr_opened`, `pr_synchronized` or `manual` (default).
    #[serde(default)]
    pub trigger: Option<String>,
    /// The `stagely.yaml` text; when absent it is read from the repository at the commit.
    #[serde(default)]
    pub stagely_yaml: Option<String>,
    /// Directory of `stagely.yaml` inside the repository (default: the root); build
    /// contexts are relative to it.
    #[serde(default)]
    pub config_dir: Option<String>,
    /// Token for a private HTTPS repository. Used for this run only: never stored, never
    /// logged, never shown by the API.
    #[serde(default)]
    pub clone_token: Option<String>,
    /// Values of secret build arguments (`secret_build_args`), name → value. Like
    /// `clone_token`: kept in memory for this run only, never stored or shown.
    #[serde(default)]
    pub secrets: Option<std::collections::BTreeMap<String, String>>,
}

impl std::fmt::Debug for SubmitRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubmitRequest")
            .field("repo_url", &self.repo_url)
            .field("commit_hash", &self.commit_hash)
            .field("branch", &self.branch)
            .field("environment_id", &self.environment_id)
            .field("trigger", &self.trigger)
            .field("config_dir", &self.config_dir)
            .field(
                "clone_token",
                &self.clone_token.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "secrets",
                &self
                    .secrets
                    .as_ref()
                    .map(|all| all.keys().collect::<Vec<_>>()),
            )
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct RunView {
    pub id: String,
    pub environment_id: String,
    pub trigger: String,
    pub status: String,
    pub repo_url: String,
    pub commit_hash: String,
    pub branch: String,
    pub config_dir: String,
    pub error_message: Option<String>,
    /// Unix milliseconds.
    pub created_at: i64,
    pub updated_at: i64,
    pub fail_fast: bool,
    /// Why the run is being (or was) cancelled: `user`, `superseded:<run>`, `fail_fast:<job>`.
    pub cancel_reason: Option<String>,
    /// The name of the API token that submitted or rebuilt the run (`None` for runs stored
    /// before it was recorded).
    #[serde(default)]
    pub submitted_by: Option<String>,
    /// Estimated USD of every priced job; `None` when none is priced.
    pub cost_usd: Option<f64>,
    pub jobs: Vec<JobView>,
}

/// One attempt of a job.
#[derive(Debug, Serialize, Deserialize)]
pub struct AttemptView {
    pub number: i32,
    /// The core that ran it.
    pub owner: String,
    pub instance_id: Option<String>,
    /// For merges: `last_builder` or `fresh_instance`.
    pub merge_path: Option<String>,
    /// Unix milliseconds.
    pub started_at: i64,
    pub connected_at: Option<i64>,
    pub ended_at: Option<i64>,
    /// `completed`, `failed`, `cancelled` or `infrastructure` once ended.
    pub outcome: Option<String>,
    pub message: Option<String>,
    /// The provider's machine type (`c5.xlarge`, `local`).
    pub instance_type: Option<String>,
    /// `on-demand` or `spot` where the cloud bills it.
    pub market: Option<String>,
    /// How the instance was placed when not as asked (spot fell back to on-demand, emulated).
    pub placement: Option<String>,
    /// Seconds this attempt is billed for (until now while its instance lives).
    pub billed_seconds: Option<u64>,
    /// Estimated USD from the price table; `None` for an unpriced type.
    pub cost_usd: Option<f64>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct JobView {
    pub id: String,
    pub name: String,
    pub status: String,
    pub architecture: String,
    pub platform: String,
    pub machine: String,
    pub vm_id: Option<String>,
    pub artifact_url: Option<String>,
    pub digest: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub exit_code: Option<i32>,
    pub error_message: Option<String>,
    /// Why it failed: `build`, `timeout`, `infrastructure` or `protocol`.
    pub failure_kind: Option<String>,
    /// For merges: where it ran (`last_builder` or `fresh_instance`).
    pub merge_path: Option<String>,
    /// Estimated USD of every priced attempt; `None` when none is priced.
    pub cost_usd: Option<f64>,
    pub attempts: Vec<AttemptView>,
}

/// Sums priced amounts; `None` when there are none.
fn sum_known(amounts: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let known: Vec<f64> = amounts.flatten().collect();
    (!known.is_empty()).then(|| (known.iter().sum::<f64>() * 10_000.0).round() / 10_000.0)
}

impl RunView {
    /// Fills the job and run cost estimates from the attempts'.
    fn add_up_costs(&mut self) {
        for job in &mut self.jobs {
            job.cost_usd = sum_known(job.attempts.iter().map(|a| a.cost_usd));
        }
        self.cost_usd = sum_known(self.jobs.iter().map(|j| j.cost_usd));
    }

    fn from_rows(
        run: RunRow,
        jobs: Vec<JobRow>,
        attempts: Vec<AttemptRow>,
        prices: &crate::cost::PriceTable,
        now: i64,
    ) -> RunView {
        let mut by_job: std::collections::HashMap<String, Vec<AttemptView>> = Default::default();
        for attempt in attempts {
            let launched = attempt.merge_path.as_deref() != Some("last_builder");
            let billed_seconds = attempt
                .billed_from
                .map(|from| crate::cost::billed_seconds(from, attempt.billed_until, now, launched));
            let cost_usd = match (&attempt.instance_type, billed_seconds) {
                (Some(instance_type), Some(seconds)) => {
                    prices.cost(instance_type, attempt.market.as_deref(), seconds)
                }
                _ => None,
            };
            by_job
                .entry(attempt.build_job_id.clone())
                .or_default()
                .push(AttemptView {
                    instance_type: attempt.instance_type,
                    market: attempt.market,
                    placement: attempt.placement,
                    billed_seconds,
                    cost_usd,
                    number: attempt.number,
                    owner: attempt.owner,
                    instance_id: attempt.instance_id,
                    merge_path: attempt.merge_path,
                    started_at: attempt.started_at,
                    connected_at: attempt.connected_at,
                    ended_at: attempt.ended_at,
                    outcome: attempt.result,
                    message: attempt.message,
                });
        }
        RunView {
            id: run.id,
            environment_id: run.environment_id,
            trigger: run.trigger,
            status: run.status.as_str().to_string(),
            repo_url: run.repo_url,
            commit_hash: run.commit_hash,
            branch: run.branch,
            config_dir: run.config_path,
            error_message: run.error_message,
            created_at: run.created_at,
            updated_at: run.updated_at,
            fail_fast: run.fail_fast,
            cancel_reason: run.cancel_reason,
            submitted_by: run.submitted_by,
            cost_usd: None,
            jobs: jobs
                .into_iter()
                .map(|job| JobView {
                    cost_usd: None,
                    attempts: by_job.remove(&job.id).unwrap_or_default(),
                    failure_kind: job.failure_kind,
                    merge_path: job.merge_path,
                    id: job.id,
                    name: job.name,
                    status: job.status.as_str().to_string(),
                    architecture: job.architecture,
                    platform: job.platform,
                    machine: job.machine,
                    vm_id: job.vm_id,
                    artifact_url: job.artifact_url,
                    digest: job.digest,
                    created_at: job.created_at,
                    started_at: job.started_at,
                    completed_at: job.completed_at,
                    exit_code: job.exit_code,
                    error_message: job.error_message,
                })
                .collect(),
        }
    }
}

/// Characters that change how text around them is shown without being visible: bidi
/// embeddings, overrides, isolates and marks (`feat/\u{202e}txt.exe` shows as `feat/exe.txt`),
/// zero-width spaces and joiners, the byte-order mark.
fn is_invisible_formatting(c: char) -> bool {
    matches!(c,
        '\u{061c}' | '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2060}'..='\u{2064}'
        | '\u{2066}'..='\u{2069}' | '\u{feff}')
}

/// A branch name git's `check-ref-format --branch` would take, without invisible formatting
/// characters (which neither git nor GitHub need, and which would reach log lines).
fn check_branch(branch: &str) -> Result<(), String> {
    if branch.is_empty() || branch.len() > 255 {
        return Err("must be a git branch name of 1-255 bytes".into());
    }
    if let Some(c) = branch.chars().find(|c| is_invisible_formatting(*c)) {
        return Err(format!(
            "contains the invisible formatting character U+{:04X} (bidi or zero-width)",
            c as u32
        ));
    }
    if let Some(c) = branch
        .chars()
        .find(|c| c.is_control() || matches!(c, ' ' | '~' | '^' | ':' | '?' | '*' | '[' | '\\'))
    {
        return Err(format!(
            "must be a git branch name: `{}` is not allowed",
            c.escape_debug()
        ));
    }
    let bad_shape = branch.starts_with('-')
        || branch.starts_with('/')
        || branch.ends_with('/')
        || branch.ends_with('.')
        || branch.ends_with(".lock")
        || branch.contains("..")
        || branch.contains("//")
        || branch.contains("@{")
        || branch == "@"
        || branch.split('/').any(|part| part.starts_with('.'));
    if bad_shape {
        return Err("must be a git branch name (see git check-ref-format)".into());
    }
    Ok(())
}

fn validate_submit(
    request: &SubmitRequest,
    allow_local_repos: bool,
) -> Result<(String, String), ApiError> {
    crate::repo_url::check(&request.repo_url, allow_local_repos)
        .map_err(|error| invalid("repo_url", error.to_string()))?;
    let hash = &request.commit_hash;
    if !(hash.len() == 40 || hash.len() == 64) || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(invalid(
            "commit_hash",
            format!("`{hash}` is not a full commit id (40 or 64 hexadecimal digits)"),
        ));
    }
    check_branch(&request.branch).map_err(|problem| invalid("branch", problem))?;
    if !crate::config::valid_repo_component(&request.environment_id) {
        return Err(invalid(
            "environment_id",
            format!(
                "`{}` {}",
                request.environment_id.escape_debug(),
                crate::config::REPO_COMPONENT_RULE
            ),
        ));
    }
    let trigger = request.trigger.clone().unwrap_or_else(|| "manual".into());
    if !matches!(trigger.as_str(), "pr_opened" | "pr_synchronized" | "manual") {
        return Err(invalid(
            "trigger",
            format!("`{trigger}` is not one of pr_opened, pr_synchronized, manual"),
        ));
    }
    let config_dir = match &request.config_dir {
        None => String::new(),
        Some(dir) => stagely_yaml::clean_prefix(dir).ok_or_else(|| {
            invalid(
                "config_dir",
                "must be a relative directory inside the repository",
            )
        })?,
    };
    if let Some(token) = &request.clone_token
        && (token.is_empty() || token.len() > 4096 || token.contains(|c: char| c.is_control()))
    {
        return Err(invalid(
            "clone_token",
            "must be 1-4096 printable characters",
        ));
    }
    if let Some(text) = &request.stagely_yaml
        && text.len() > MAX_CONFIG_BYTES
    {
        return Err(invalid(
            "stagely_yaml",
            format!(
                "is {} bytes; at most {MAX_CONFIG_BYTES} are accepted",
                text.len()
            ),
        ));
    }
    Ok((trigger, config_dir))
}

/// Reads a JSON body of at most `limit` bytes within `timeout` and parses it into `T`:
/// `413` over the limit, `408` too slow, `415` not declared JSON, `400` not JSON syntax, `422` naming
/// the field that is missing, unknown or of the wrong type.
async fn json_body<T: serde::de::DeserializeOwned>(
    request: axum::extract::Request,
    limit: usize,
    timeout: std::time::Duration,
) -> Result<T, ApiError> {
    let is_json = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| {
            let mime = value.split(';').next().unwrap_or("").trim();
            mime.eq_ignore_ascii_case("application/json")
        });
    if !is_json {
        return Err(ApiError::UnsupportedMediaType(
            "expected a JSON body (Content-Type: application/json)".into(),
        ));
    }
    let body = request.into_body();
    let bytes = match tokio::time::timeout(timeout, axum::body::to_bytes(body, limit)).await {
        Err(_) => {
            return Err(ApiError::Timeout(format!(
                "the request body did not arrive within {}s",
                timeout.as_secs()
            )));
        }
        Ok(Err(_)) => {
            return Err(ApiError::PayloadTooLarge(format!(
                "the request body is larger than {limit} bytes"
            )));
        }
        Ok(Ok(bytes)) => bytes,
    };
    let mut deserializer = serde_json::Deserializer::from_slice(&bytes);
    let parsed: Result<T, _> = serde_path_to_error::deserialize(&mut deserializer);
    match parsed {
        Ok(value) => {
            deserializer
                .end()
                .map_err(|error| ApiError::BadRequest(format!("invalid JSON: {error}")))?;
            Ok(value)
        }
        Err(error) => {
            let path = error.path().to_string();
            let inner = error.into_inner();
            if inner.is_syntax() || inner.is_eof() {
                return Err(ApiError::BadRequest(format!("invalid JSON: {inner}")));
            }
            let message = inner.to_string();
            // Errors about the object itself name their field in the message.
            let named = ["missing field `", "unknown field `"]
                .iter()
                .find_map(|prefix| message.split_once(prefix))
                .and_then(|(_, rest)| rest.split_once('`'))
                .map(|(field, _)| field.to_string());
            let field = match (path.as_str(), named) {
                (".", Some(field)) => field,
                (".", None) => "body".to_string(),
                (path, Some(field)) if message.starts_with("missing") => format!("{path}.{field}"),
                (path, _) => path.to_string(),
            };
            let message = message
                .split(" at line ")
                .next()
                .unwrap_or(&message)
                .to_string();
            Err(invalid(&field, message))
        }
    }
}

async fn submit_workflow(
    State(state): State<AppState>,
    request: axum::extract::Request,
) -> Result<(StatusCode, Json<RunView>), ApiError> {
    let submitted_by = request
        .extensions()
        .get::<Caller>()
        .map(|caller| caller.name.to_string());
    let request: SubmitRequest = json_body(
        request,
        MAX_SUBMIT_BODY_BYTES,
        state.limits.body_read_timeout,
    )
    .await?;
    let (trigger, config_dir) =
        validate_submit(&request, state.runner.settings().allow_local_repos)?;
    if state.runner.is_shutting_down() {
        return Err(ApiError::Unavailable("the core is shutting down".into()));
    }
    let text = match &request.stagely_yaml {
        Some(text) => text.clone(),
        None => {
            // Each read runs git: only a few at once, the rest are told to come back.
            let Ok(_permit) = state.git_reads.clone().try_acquire_owned() else {
                return Err(ApiError::Busy {
                    message: format!(
                        "{} submissions are already reading stagely.yaml from git; retry shortly or send stagely_yaml in the request",
                        state.limits.max_concurrent_git_reads
                    ),
                    retry_after_secs: 5,
                });
            };
            let read = source::read_config(
                &request.repo_url,
                &request.commit_hash,
                &config_dir,
                request.clone_token.as_deref(),
                state.runner.settings().allow_local_repos,
            );
            match tokio::time::timeout(state.limits.git_read_timeout, read).await {
                Ok(result) => result.map_err(|error| ApiError::Unprocessable(error.to_string()))?,
                Err(_) => {
                    return Err(ApiError::Unprocessable(format!(
                        "reading stagely.yaml from the repository took longer than {}s",
                        state.limits.git_read_timeout.as_secs()
                    )));
                }
            }
        }
    };
    let pipeline = stagely_yaml::parse_pipeline(&text, &config_dir)
        .map_err(|error| invalid("stagely_yaml", error.to_string()))?;
    let plans = pipeline.jobs;

    let build_secrets = resolve_build_secrets(
        &plans,
        request.secrets.as_ref(),
        &state.runner.settings().build_secrets,
    )?;

    let run_id = uuid::Uuid::new_v4().to_string();
    let jobs: Vec<NewJob> = plans
        .iter()
        .map(|plan| {
            Ok(NewJob {
                id: uuid::Uuid::new_v4().to_string(),
                name: plan.name.clone(),
                architecture: plan.architecture.clone(),
                platform: plan.platform.clone(),
                machine: plan.machine.as_str().to_string(),
                spec: plan.spec.clone(),
            })
        })
        .collect::<Result<_, ApiError>>()?;
    let run = NewRun {
        id: run_id.clone(),
        environment_id: request.environment_id.clone(),
        trigger,
        repo_url: request.repo_url.clone(),
        commit_hash: request.commit_hash.clone(),
        branch: request.branch.clone(),
        config_path: config_dir,
        fail_fast: pipeline.fail_fast,
        submitted_by,
    };
    let secrets = RunSecrets {
        clone_token: request.clone_token.clone(),
        build_secrets,
    };
    check_work_frames(&state, &run, &plans, &jobs, &secrets)?;
    start_run(&state, &run, &jobs, secrets).await?;
    let view = load_run(&state, &run_id).await?;
    Ok((StatusCode::CREATED, Json(view)))
}

/// Every work frame must fit the agent connection: refused at submission, not discovered
/// when it is sent.
fn check_work_frames(
    state: &AppState,
    run: &NewRun,
    plans: &[stagely_yaml::JobPlan],
    jobs: &[NewJob],
    secrets: &RunSecrets,
) -> Result<(), ApiError> {
    let draft_run = run.draft_row();
    for (plan, job) in plans.iter().zip(jobs) {
        let bytes = crate::runner::work_frame_bytes(
            state.runner.settings(),
            &draft_run,
            &job.draft_row(&run.id),
            &plan.spec,
            secrets,
        );
        if bytes > MAX_FRAME_BYTES {
            return Err(invalid(
                "stagely_yaml",
                format!(
                    "builds.{}: the job's work frame would be {bytes} bytes; the agent connection carries at most {MAX_FRAME_BYTES} (shorten build_args or secrets)",
                    plan.spec.service
                ),
            ));
        }
    }
    Ok(())
}

/// Stores a run, supersedes the environment's older unfinished runs, and hands it to the
/// runner.
async fn start_run(
    state: &AppState,
    run: &NewRun,
    jobs: &[NewJob],
    secrets: RunSecrets,
) -> Result<(), ApiError> {
    let db = state.runner.db();
    let stored = db.create_run(run, jobs, crate::clock::now()).await?;
    tracing::info!(run_id = %run.id, jobs = jobs.len(), "run submitted");
    // Handed to the runner first: its jobs are eligible now, and cancelling the older runs
    // need not delay them.
    let rows = (
        run.draft_row(),
        jobs.iter().map(|job| job.draft_row(&run.id)).collect(),
    );
    if state.runner.submitted(stored, rows, secrets).await.is_err() {
        return Err(ApiError::Unavailable("the core is shutting down".into()));
    }
    // The run is accepted whatever happens here: a failure to supersede is logged, not
    // answered as an error for a run that will build.
    let older_runs = match db
        .unfinished_runs_of_environment(&run.environment_id, &run.id)
        .await
    {
        Ok(runs) => runs,
        Err(error) => {
            tracing::error!(run_id = %run.id, "finding the runs it supersedes failed: {error}");
            Vec::new()
        }
    };
    for older in older_runs {
        let reason = CancelReason::Superseded { by: run.id.clone() };
        match state.runner.cancel(&older, reason).await {
            Ok(()) => tracing::info!(run_id = %older, by = %run.id, "run superseded"),
            // It finished meanwhile: nothing to supersede.
            Err(RunnerError::Command(_)) => {}
            Err(error) => tracing::warn!(run_id = %older, "superseding failed: {error}"),
        }
    }
    Ok(())
}

/// `POST /api/v1/workflows/{id}/cancel`.
async fn cancel_workflow(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<RunView>), ApiError> {
    let reason = CancelReason::User {
        by: Some(caller.name.to_string()),
    };
    match state.runner.cancel(&id, reason).await {
        Ok(()) => {}
        Err(RunnerError::Command(CommandError::UnknownRun(_))) => {
            return Err(ApiError::NotFound {
                what: "workflow run",
                id,
            });
        }
        Err(RunnerError::Command(error)) => return Err(ApiError::Conflict(error.to_string())),
        Err(RunnerError::ShuttingDown) => {
            return Err(ApiError::Unavailable("the core is shutting down".into()));
        }
        Err(RunnerError::Db(error)) => return Err(error.into()),
    }
    tracing::info!(run_id = %id, "run cancelled by a user");
    Ok((StatusCode::ACCEPTED, Json(load_run(&state, &id).await?)))
}

/// `POST /api/v1/environments/{environment_id}/rebuild` body (optional): the secrets the
/// latest run was submitted with are not stored, so they are sent again.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RebuildRequest {
    #[serde(default)]
    pub clone_token: Option<String>,
    #[serde(default)]
    pub secrets: Option<std::collections::BTreeMap<String, String>>,
}

/// `POST /api/v1/environments/{environment_id}/rebuild`: a new run from the environment's
/// latest run — same repository, commit, branch and jobs — executed from scratch.
async fn rebuild_environment(
    State(state): State<AppState>,
    Path(environment_id): Path<String>,
    request: axum::extract::Request,
) -> Result<(StatusCode, Json<RunView>), ApiError> {
    let submitted_by = request
        .extensions()
        .get::<Caller>()
        .map(|caller| caller.name.to_string());
    let has_body = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .is_some_and(|length| length != "0")
        || request.headers().contains_key(header::TRANSFER_ENCODING);
    let body: RebuildRequest = if has_body {
        json_body(
            request,
            MAX_SUBMIT_BODY_BYTES,
            state.limits.body_read_timeout,
        )
        .await?
    } else {
        RebuildRequest::default()
    };
    if state.runner.is_shutting_down() {
        return Err(ApiError::Unavailable("the core is shutting down".into()));
    }
    let db = state.runner.db();
    let latest = db
        .latest_run_of_environment(&environment_id)
        .await?
        .ok_or_else(|| ApiError::NotFound {
            what: "environment",
            id: environment_id.clone(),
        })?;
    let old_jobs = db.jobs_of_run(&latest.id).await?;
    let mut plans = Vec::new();
    for job in &old_jobs {
        let spec = job.spec.clone();
        plans.push(stagely_yaml::JobPlan {
            name: job.name.clone(),
            architecture: job.architecture.clone(),
            platform: job.platform.clone(),
            machine: stagely_provisioning::MachineSize::parse(&job.machine)
                .unwrap_or(stagely_provisioning::MachineSize::Medium),
            spec,
        });
    }
    let build_secrets = resolve_build_secrets(
        &plans,
        body.secrets.as_ref(),
        &state.runner.settings().build_secrets,
    )?;
    let run_id = uuid::Uuid::new_v4().to_string();
    let jobs: Vec<NewJob> = old_jobs
        .iter()
        .map(|job| NewJob {
            id: uuid::Uuid::new_v4().to_string(),
            name: job.name.clone(),
            architecture: job.architecture.clone(),
            platform: job.platform.clone(),
            machine: job.machine.clone(),
            spec: job.spec.clone(),
        })
        .collect();
    let run = NewRun {
        id: run_id.clone(),
        environment_id,
        trigger: "manual".into(),
        repo_url: latest.repo_url,
        commit_hash: latest.commit_hash,
        branch: latest.branch,
        config_path: latest.config_path,
        fail_fast: latest.fail_fast,
        submitted_by,
    };
    let secrets = RunSecrets {
        clone_token: body.clone_token,
        build_secrets,
    };
    check_work_frames(&state, &run, &plans, &jobs, &secrets)?;
    start_run(&state, &run, &jobs, secrets).await?;
    Ok((StatusCode::CREATED, Json(load_run(&state, &run_id).await?)))
}

/// `GET /api/v1/queue`.
#[derive(Debug, Serialize, Deserialize)]
pub struct QueueView {
    pub jobs: Vec<QueueEntryView>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct QueueEntryView {
    pub position: usize,
    pub run_id: String,
    pub job_id: String,
    pub job_name: String,
    pub environment_id: String,
    pub attempts: u32,
    pub not_before: Option<i64>,
}

async fn get_queue(State(state): State<AppState>) -> Result<Json<QueueView>, ApiError> {
    let entries = state
        .runner
        .queue()
        .await
        .map_err(|_| ApiError::Unavailable("the core is shutting down".into()))?;
    Ok(Json(QueueView {
        jobs: entries
            .into_iter()
            .map(|entry| QueueEntryView {
                position: entry.position,
                run_id: entry.run_id,
                job_id: entry.job_id,
                job_name: entry.job_name,
                environment_id: entry.environment_id,
                attempts: entry.attempts,
                not_before: entry.not_before,
            })
            .collect(),
    }))
}

/// The values of every secret build argument the plans declare: from the submission, else
/// from the core's `[secrets]`. Every declared name needs a value, and every submitted value
/// a declaring build (a typo would otherwise build without the secret).
fn resolve_build_secrets(
    plans: &[stagely_yaml::JobPlan],
    submitted: Option<&std::collections::BTreeMap<String, String>>,
    configured: &std::collections::BTreeMap<String, stagely_protocol::Secret>,
) -> Result<std::collections::BTreeMap<String, stagely_protocol::Secret>, ApiError> {
    let empty = std::collections::BTreeMap::new();
    let submitted = submitted.unwrap_or(&empty);
    for (name, value) in submitted {
        let field = format!("secrets.{name}");
        if !stagely_yaml::valid_arg_name(name) {
            return Err(invalid("secrets", "names must be letters, digits and `_`"));
        }
        if value.is_empty() {
            return Err(invalid(&field, "must not be empty"));
        }
        stagely_yaml::check_arg_value(value).map_err(|problem| invalid(&field, problem))?;
        if !plans
            .iter()
            .any(|plan| plan.spec.secret_build_args.contains(name))
        {
            return Err(invalid(&field, "no build lists it in secret_build_args"));
        }
    }
    let mut resolved = std::collections::BTreeMap::new();
    for plan in plans {
        for name in &plan.spec.secret_build_args {
            let value = match submitted.get(name) {
                Some(value) => stagely_protocol::Secret(value.clone()),
                None => configured.get(name).cloned().ok_or_else(|| {
                    invalid(
                        "secrets",
                        format!(
                            "`{name}` is listed in builds.{}.secret_build_args but has no value: send it in `secrets` or set it in the core's [secrets]",
                            plan.spec.service
                        ),
                    )
                })?,
            };
            resolved.insert(name.clone(), value);
        }
    }
    Ok(resolved)
}

pub(crate) async fn load_run(state: &AppState, run_id: &str) -> Result<RunView, ApiError> {
    let db = state.runner.db();
    let run = db.run(run_id).await?.ok_or_else(|| ApiError::NotFound {
        what: "workflow run",
        id: run_id.to_string(),
    })?;
    let jobs = db.jobs_of_run(run_id).await?;
    let attempts = db.attempts_of_run(run_id).await?;
    let mut view = RunView::from_rows(run, jobs, attempts, &state.prices, crate::clock::now_ms());
    view.add_up_costs();
    Ok(view)
}

async fn get_workflow(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RunView>, ApiError> {
    Ok(Json(load_run(&state, &id).await?))
}

/// The Server-Sent Events streams open at once: at most `total`, and `per_token` for one API
/// token, so neither one caller nor all of them can hold the core's tasks and connections.
#[derive(Debug)]
pub struct SseStreams {
    total: usize,
    per_token: usize,
    open: std::sync::Mutex<(usize, std::collections::HashMap<Arc<str>, usize>)>,
}

/// One open stream's place; released when the stream's body is dropped.
#[derive(Debug)]
pub struct StreamPermit {
    streams: Arc<SseStreams>,
    token: Arc<str>,
}

impl SseStreams {
    pub fn new(total: usize, per_token: usize) -> Arc<SseStreams> {
        Arc::new(SseStreams {
            total,
            per_token,
            open: std::sync::Mutex::new((0, std::collections::HashMap::new())),
        })
    }

    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, (usize, std::collections::HashMap<Arc<str>, usize>)> {
        self.open
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Streams open now (in total).
    pub fn open_now(&self) -> usize {
        self.lock().0
    }

    /// A place for one more stream of `caller`, or `429` naming the cap it would pass.
    pub fn open(self: &Arc<Self>, caller: &Caller) -> Result<StreamPermit, ApiError> {
        let mut open = self.lock();
        let of_token = open.1.get(&caller.name).copied().unwrap_or(0);
        if of_token >= self.per_token {
            return Err(ApiError::TooManyRequests {
                message: format!(
                    "this token has {of_token} event streams open, its limit (api.max_sse_streams_per_token)"
                ),
                retry_after_secs: 5,
            });
        }
        if open.0 >= self.total {
            return Err(ApiError::TooManyRequests {
                message: format!(
                    "the core has {} event streams open, its limit (api.max_sse_streams)",
                    open.0
                ),
                retry_after_secs: 5,
            });
        }
        open.0 += 1;
        *open.1.entry(caller.name.clone()).or_insert(0) += 1;
        Ok(StreamPermit {
            streams: self.clone(),
            token: caller.name.clone(),
        })
    }
}

impl Drop for StreamPermit {
    fn drop(&mut self) {
        let mut open = self.streams.lock();
        open.0 -= 1;
        if let Some(count) = open.1.get_mut(&self.token) {
            *count -= 1;
            if *count == 0 {
                open.1.remove(&self.token);
            }
        }
    }
}

/// A Server-Sent Events response of what `rx` receives, with keep-alive comments while quiet;
/// `permit` is held for as long as the response body lives.
fn sse_response(
    rx: tokio::sync::mpsc::Receiver<axum::response::sse::Event>,
    permit: StreamPermit,
) -> Response {
    use axum::response::sse::{KeepAlive, Sse};
    let stream = futures_util::stream::unfold((rx, permit), |(mut rx, permit)| async move {
        rx.recv()
            .await
            .map(|event| (Ok::<_, std::convert::Infallible>(event), (rx, permit)))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// The `end` event of a run's event stream.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunEnd {
    pub run_id: String,
    pub status: String,
    pub error_message: Option<String>,
}

/// `GET /api/v1/workflows/{id}/events`: Server-Sent Events of the run's view (`event: run`,
/// the JSON of `GET /api/v1/workflows/{id}`) at once and whenever its state changes, then
/// `event: end` once it is final. Views are whole snapshots: a client that reconnects gets the
/// current one first and has missed nothing but intermediate states.
async fn stream_run_events(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    use axum::response::sse::Event;
    load_run(&state, &id).await?;
    let permit = state.streams.open(&caller)?;
    let shutdown = state.runner.shutdown_token();
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(4);
    tokio::spawn(async move {
        let events = state.run_events.clone();
        let mut views = events.subscribe(&state, &id);
        loop {
            let current = views.borrow_and_update().clone();
            if let Some(view) = current {
                let Ok(event) = Event::default().event("run").json_data(&*view) else {
                    return;
                };
                if tx.send(event).await.is_err() {
                    return;
                }
                if is_final(&view.status) {
                    let end = RunEnd {
                        run_id: view.id.clone(),
                        status: view.status.clone(),
                        error_message: view.error_message.clone(),
                    };
                    if let Ok(event) = Event::default().event("end").json_data(end) {
                        let _ = tx.send(event).await;
                    }
                    return;
                }
            }
            tokio::select! {
                changed = views.changed() => {
                    if changed.is_ok() {
                        continue;
                    }
                    // The publisher stopped: the run is gone, or it stopped an instant before
                    // this viewer came (a new one starts), or the core is stopping.
                    if shutdown.is_cancelled() || load_run(&state, &id).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(crate::run_events::MIN_READ_GAP).await;
                    views = events.subscribe(&state, &id);
                }
                () = tx.closed() => return,
                () = shutdown.cancelled() => return,
            }
        }
    });
    Ok(sse_response(rx, permit))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogQuery {
    #[serde(default)]
    pub after: Option<i64>,
    #[serde(default)]
    pub limit: Option<i64>,
    #[serde(default)]
    pub format: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct LogPage {
    pub job_id: String,
    pub job_status: String,
    pub lines: Vec<LogLineView>,
    /// Pass as `after` to get the next page.
    pub next_after: i64,
}

/// One stored output line.
#[derive(Debug, Serialize, Deserialize)]
pub struct LogLineView {
    pub seq: i64,
    /// Unix milliseconds when the core stored it.
    pub timestamp: i64,
    /// `stdout`, `stderr` or `system` (the agent's own lines).
    pub stream: String,
    pub line: String,
    /// A piece of a line the agent cut (longer than 64 KiB): the line goes on in the next
    /// piece of the same stream. Joining the pieces gives the line back, byte for byte.
    #[serde(default)]
    pub continued: bool,
}

impl From<LogRow> for LogLineView {
    fn from(row: LogRow) -> Self {
        LogLineView {
            seq: row.seq,
            timestamp: row.timestamp,
            stream: row.stream,
            line: row.line,
            continued: row.continued,
        }
    }
}

const PAGE_DEFAULT: i64 = 1000;
const PAGE_MAX: i64 = 10_000;

async fn get_logs(
    State(state): State<AppState>,
    Path(id): Path<String>,
    query: Result<Query<LogQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let db = state.runner.db().clone();
    let job = db.job(&id).await?.ok_or_else(|| ApiError::NotFound {
        what: "job",
        id: id.clone(),
    })?;
    let after = query.after.unwrap_or(0);
    if after < 0 {
        return Err(invalid("after", "must not be negative"));
    }
    match query.format.as_deref() {
        None | Some("json") => {
            let limit = query.limit.unwrap_or(PAGE_DEFAULT);
            if !(1..=PAGE_MAX).contains(&limit) {
                return Err(invalid(
                    "limit",
                    format!("must be between 1 and {PAGE_MAX}"),
                ));
            }
            let lines = db.logs_page(&id, after, limit).await?;
            let next_after = lines.last().map_or(after, |line| line.seq);
            Ok(Json(LogPage {
                job_id: id,
                job_status: job.status.as_str().to_string(),
                lines: lines.into_iter().map(LogLineView::from).collect(),
                next_after,
            })
            .into_response())
        }
        Some("text") => {
            // Stream page by page: memory stays bounded whatever the log's size.
            let stream = futures_util::stream::unfold(Some(after), move |cursor| {
                let db = db.clone();
                let id = id.clone();
                async move {
                    let after = cursor?;
                    match db.logs_page(&id, after, PAGE_DEFAULT).await {
                        Ok(lines) if lines.is_empty() => None,
                        Ok(lines) => {
                            let next = lines.last().map(|l| l.seq);
                            let mut chunk = String::new();
                            for line in lines {
                                chunk.push_str(&line.line);
                                // A cut line's pieces join into the line it was.
                                if !line.line.ends_with('\n') && !line.continued {
                                    chunk.push('\n');
                                }
                            }
                            Some((Ok::<_, std::io::Error>(chunk), next))
                        }
                        Err(error) => Some((Err(std::io::Error::other(error.to_string())), None)),
                    }
                }
            });
            Ok((
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                Body::from_stream(stream),
            )
                .into_response())
        }
        Some(other) => Err(invalid("format", format!("`{other}` is not json or text"))),
    }
}

/// `?after=SEQ` for a log stream (`Last-Event-ID` wins when both are given).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamQuery {
    #[serde(default)]
    pub after: Option<i64>,
}

/// The `end` event's data.
#[derive(Debug, Serialize, Deserialize)]
pub struct StreamEnd {
    pub job_id: String,
    pub status: String,
    pub exit_code: Option<i32>,
    pub error_message: Option<String>,
}

/// Events a stream buffers for a slow client before the producer waits.
const STREAM_BUFFER: usize = 256;
/// How often a stream with nothing live checks the store for its job's end (another replica
/// may have finished it).
const STREAM_STATUS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether a run or job status is final.
pub(crate) fn is_final(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "cancelled")
}

fn line_event(row: &LogRow) -> axum::response::sse::Event {
    let view = LogLineView {
        seq: row.seq,
        timestamp: row.timestamp,
        stream: row.stream.clone(),
        line: row.line.clone(),
        continued: row.continued,
    };
    axum::response::sse::Event::default()
        .id(row.seq.to_string())
        .event("line")
        .json_data(&view)
        .unwrap_or_else(|_| axum::response::sse::Event::default().comment("unencodable line"))
}

/// Sends every stored line after the cursor to a log stream; false when its client is gone.
async fn catch_up(
    db: &crate::db::Db,
    id: &str,
    cursor: &mut i64,
    tx: &tokio::sync::mpsc::Sender<axum::response::sse::Event>,
) -> Result<bool, crate::db::DbError> {
    loop {
        let page = db.logs_page(id, *cursor, PAGE_DEFAULT).await?;
        if page.is_empty() {
            return Ok(true);
        }
        for row in &page {
            if tx.send(line_event(row)).await.is_err() {
                return Ok(false);
            }
            *cursor = row.seq;
        }
    }
}

async fn stream_logs(
    State(state): State<AppState>,
    axum::Extension(caller): axum::Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    query: Result<Query<StreamQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    use axum::response::sse::Event;
    let Query(query) = query.map_err(|rejection| ApiError::BadRequest(rejection.body_text()))?;
    let db = state.runner.db().clone();
    if db.job(&id).await?.is_none() {
        return Err(ApiError::NotFound {
            what: "job",
            id: id.clone(),
        });
    }
    let resume = match headers.get("last-event-id") {
        Some(value) => Some(
            value
                .to_str()
                .ok()
                .and_then(|text| text.trim().parse::<i64>().ok())
                .filter(|seq| *seq >= 0)
                .ok_or_else(|| invalid("Last-Event-ID", "must be a log sequence number"))?,
        ),
        None => None,
    };
    let after = resume.or(query.after).unwrap_or(0);
    if after < 0 {
        return Err(invalid("after", "must not be negative"));
    }
    let permit = state.streams.open(&caller)?;
    // Subscribed before the backlog is read: a line stored meanwhile is in one or the other,
    // and the cursor drops what both carry.
    let mut live = state.runner.log_hub().viewer(&id);
    let shutdown = state.runner.shutdown_token();
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(STREAM_BUFFER);
    tokio::spawn(async move {
        let mut cursor = after;
        let end = |job: JobRow| {
            Event::default().event("end").json_data(StreamEnd {
                job_id: job.id,
                status: job.status.as_str().to_string(),
                exit_code: job.exit_code,
                error_message: job.error_message,
            })
        };
        let mut check = tokio::time::interval(STREAM_STATUS_EVERY);
        let mut backlog_pending = true;
        loop {
            let final_job = tokio::select! {
                event = live.recv() => match event {
                    Ok(crate::log_hub::HubEvent::Lines(rows)) => {
                        for row in rows.iter() {
                            if row.seq <= cursor {
                                continue; // already sent from the backlog
                            }
                            if row.seq != cursor + 1 {
                                break; // a gap (lines stored before we subscribed): read them
                            }
                            if tx.send(line_event(row)).await.is_err() {
                                return;
                            }
                            cursor = row.seq;
                        }
                        if rows.last().is_some_and(|row| row.seq > cursor)
                            && !matches!(catch_up(&db, &id, &mut cursor, &tx).await, Ok(true))
                        {
                            return;
                        }
                        continue;
                    }
                    Ok(crate::log_hub::HubEvent::Finished)
                    | Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        match db.job(&id).await {
                            Ok(Some(job)) if job.status.is_final() => job,
                            // Requeued meanwhile, or unreadable: keep going on the timer.
                            _ => {
                                live.resubscribe();
                                continue;
                            }
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                        if !matches!(catch_up(&db, &id, &mut cursor, &tx).await, Ok(true)) {
                            return;
                        }
                        continue;
                    }
                },
                _ = check.tick() => {
                    // The backlog once (the first tick is at once); after that only the
                    // job's status, a one-row read, in case another replica finished it.
                    if backlog_pending {
                        backlog_pending = false;
                        if !matches!(catch_up(&db, &id, &mut cursor, &tx).await, Ok(true)) {
                            return;
                        }
                    }
                    match db.job(&id).await {
                        Ok(Some(job)) if job.status.is_final() => job,
                        Ok(Some(_)) => continue,
                        _ => return,
                    }
                }
                () = tx.closed() => return,
                () = shutdown.cancelled() => return,
            };
            // Every line stored before the end, then the end.
            if !matches!(catch_up(&db, &id, &mut cursor, &tx).await, Ok(true)) {
                return;
            }
            if let Ok(event) = end(final_job) {
                let _ = tx.send(event).await;
            }
            return;
        }
    });
    Ok(sse_response(rx, permit))
}

fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ")?.trim();
    (!token.is_empty()).then_some(token)
}

async fn agent_connect(
    State(state): State<AppState>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Response {
    // The token is checked before anything else: no frame is read from a refused peer.
    let Some(token) = bearer_token(&headers) else {
        return unauthorized("missing bearer token");
    };
    let upgrade = match upgrade {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection.into_response(),
    };
    let (job_id, attempt) = match state.runner.authenticate_agent(token).await {
        Ok(found) => found,
        Err(crate::runner::ClaimError::Unauthorized) => {
            return unauthorized("unknown or spent agent token");
        }
        Err(crate::runner::ClaimError::Unavailable) => {
            return ApiError::Unavailable("the agent token cannot be checked right now".into())
                .into_response();
        }
    };
    tracing::info!(%job_id, attempt, "agent authenticated");
    let runner = state.runner.clone();
    upgrade
        // Binary (protobuf) frames when the agent offers them; JSON text frames otherwise.
        .protocols([
            stagely_protocol::SUBPROTOCOL_PROTO,
            stagely_protocol::SUBPROTOCOL_JSON,
        ])
        .max_message_size(MAX_FRAME_BYTES)
        .max_frame_size(MAX_FRAME_BYTES)
        .on_upgrade(
            move |socket| async move { runner.agent_connected(job_id, attempt, socket).await },
        )
}

fn unauthorized(reason: &str) -> Response {
    tracing::warn!("agent connection refused: {reason}");
    unauthorized_response(reason)
}

fn unauthorized_response(reason: &str) -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        Json(ErrorBody {
            error: ErrorDetail {
                code: "unauthorized",
                message: reason.to_string(),
                field: None,
            },
        }),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branches_with_invisible_formatting_or_bad_ref_syntax_are_refused() {
        for good in ["main", "feature/x", "release-1.2", "user/fix_42", "ünïcode"] {
            assert_eq!(check_branch(good), Ok(()), "{good}");
        }
        let bidi = check_branch("feat/\u{202e}txt.exe").unwrap_err();
        assert!(bidi.contains("U+202E"), "{bidi}");
        for bad in [
            "a\u{200b}b",
            "a\u{2066}b",
            "\u{feff}main",
            "a\u{200f}",
            "",
            "-x",
            "a..b",
            "a b",
            "a~1",
            "a:b",
            "a/",
            "/a",
            "a//b",
            "a.lock",
            "a/.hidden",
            "a@{1}",
            "a\x1bb",
        ] {
            assert!(check_branch(bad).is_err(), "{bad:?}");
        }
    }
}
