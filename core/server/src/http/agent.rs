//! `GET /api/v1/agent/connect`: the agents' WebSocket. The bearer token (one per attempt) is
//! checked before the upgrade; the link itself is [`crate::agent_link`]'s.

use axum::extract::State;
use axum::extract::ws::{WebSocketUpgrade, rejection::WebSocketUpgradeRejection};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};

use stagely_protocol::MAX_FRAME_BYTES;

use super::auth::{bearer_token, unauthorized};
use super::{ApiError, AppState};

pub(super) async fn agent_connect(
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
