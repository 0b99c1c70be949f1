//! The run routes: submit, get, cancel, rebuild, the queue, and a run's event stream.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::Response;
use stagely_api::{
    MAX_SUBMIT_BODY_BYTES, QueueEntryView, QueueView, RebuildRequest, RunEnd, RunView,
    SubmitRequest, is_final,
};

use super::streams::sse_response;
use super::{ApiError, AppState, Caller, json_body, load_run};
use crate::engine::{CancelReason, CommandError};
use crate::runner::RunnerError;

/// The name of the token that made `request` (set by the token check).
fn caller_name(request: &axum::extract::Request) -> Option<String> {
    request
        .extensions()
        .get::<Caller>()
        .map(|caller| caller.name.to_string())
}

/// `POST /api/v1/workflows`: `201` with the new run.
pub(super) async fn submit_workflow(
    State(state): State<AppState>,
    request: axum::extract::Request,
) -> Result<(StatusCode, Json<RunView>), ApiError> {
    let submitted_by = caller_name(&request);
    let body: SubmitRequest = json_body(
        request,
        MAX_SUBMIT_BODY_BYTES,
        state.limits.body_read_timeout,
    )
    .await?;
    let run_id = state.submissions.submit(body, submitted_by).await?;
    Ok((StatusCode::CREATED, Json(load_run(&state, &run_id).await?)))
}

/// `POST /api/v1/environments/{environment_id}/rebuild`: a new run from the environment's
/// latest run — same repository, commit, branch and jobs — executed from scratch; `201`.
pub(super) async fn rebuild_environment(
    State(state): State<AppState>,
    Path(environment_id): Path<String>,
    request: axum::extract::Request,
) -> Result<(StatusCode, Json<RunView>), ApiError> {
    let submitted_by = caller_name(&request);
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
    let run_id = state
        .submissions
        .rebuild(&environment_id, body, submitted_by)
        .await?;
    Ok((StatusCode::CREATED, Json(load_run(&state, &run_id).await?)))
}

/// `POST /api/v1/workflows/{id}/cancel`.
pub(super) async fn cancel_workflow(
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

pub(super) async fn get_queue(State(state): State<AppState>) -> Result<Json<QueueView>, ApiError> {
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

/// `GET /api/v1/workflows/{id}/events`: Server-Sent Events of the run's view (`event: run`,
/// the JSON of `GET /api/v1/workflows/{id}`) at once and whenever its state changes, then
/// `event: end` once it is final. Views are whole snapshots: a client that reconnects gets the
/// current one first and has missed nothing but intermediate states.
pub(super) async fn stream_run_events(
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
        let mut views = events.subscribe(&id);
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
                    views = events.subscribe(&id);
                }
                () = tx.closed() => return,
                () = shutdown.cancelled() => return,
            }
        }
    });
    Ok(sse_response(rx, permit))
}

pub(super) async fn get_workflow(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RunView>, ApiError> {
    Ok(Json(load_run(&state, &id).await?))
}
