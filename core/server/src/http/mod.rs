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

mod agent;
mod auth;
mod error;
mod logs;
mod runs;
mod streams;

use std::sync::Arc;

use axum::extract::State;
use axum::http::header;
use axum::routing::{get, post};
use axum::{Json, Router};
use stagely_api::RunView;

pub use auth::{ApiAuth, Caller, role_needed};
pub use error::ApiError;
pub use streams::{SseStreams, StreamPermit};

use crate::runner::Runner;
use crate::submit::Submissions;
use crate::views::RunViews;
use agent::agent_connect;
use auth::require_api_token;
use error::invalid;
use logs::{get_logs, stream_logs};
use runs::{
    cancel_workflow, get_queue, get_workflow, rebuild_environment, stream_run_events,
    submit_workflow,
};

#[derive(Clone)]
pub struct AppState {
    pub runner: Runner,
    pub auth: Arc<ApiAuth>,
    pub limits: crate::config::ApiLimits,
    /// Run views from the store, with their cost estimates.
    pub views: RunViews,
    /// The submission path (`POST /api/v1/workflows` and `.../rebuild`).
    pub submissions: Submissions,
    /// Publishers of the runs watched through `GET /api/v1/workflows/{id}/events`.
    pub run_events: Arc<crate::run_events::RunEvents>,
    /// The event streams open (both SSE routes), capped in total and per token.
    pub streams: Arc<SseStreams>,
}

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

async fn healthz(State(state): State<AppState>) -> Result<Json<serde_json::Value>, ApiError> {
    state.runner.db().last_log_seq("healthz").await?;
    if !state.runner.is_alive() {
        return Err(ApiError::Unavailable(
            "the scheduler of this core stopped; restart it".into(),
        ));
    }
    Ok(Json(serde_json::json!({ "status": "ok" })))
}

/// Reads a JSON body of at most `limit` bytes within `timeout` and parses it into `T`:
/// `413` over the limit, `408` too slow, `415` not declared JSON, `400` not JSON syntax, `422` naming
/// the field that is missing, unknown or of the wrong type.
pub(crate) async fn json_body<T: serde::de::DeserializeOwned>(
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

/// The view of `run_id`, or `404`.
pub(crate) async fn load_run(state: &AppState, run_id: &str) -> Result<RunView, ApiError> {
    state
        .views
        .load(run_id)
        .await?
        .ok_or_else(|| ApiError::NotFound {
            what: "workflow run",
            id: run_id.to_string(),
        })
}
