//! The log routes: one page of a job's lines (JSON, or all of them as text), and the live
//! stream (Server-Sent Events: backlog, live lines, `end`).

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use stagely_api::{LogLineView, LogPage, LogQuery, StreamEnd, StreamQuery};

use super::streams::sse_response;
use super::{ApiError, AppState, Caller, invalid};
use crate::db::{JobRow, LogRow};

/// The view of one stored line.
fn line_view(row: LogRow) -> LogLineView {
    {
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

pub(super) async fn get_logs(
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
                lines: lines.into_iter().map(line_view).collect(),
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

/// Events a stream buffers for a slow client before the producer waits.
const STREAM_BUFFER: usize = 256;
/// How often a stream with nothing live checks the store for its job's end (another replica
/// may have finished it).
const STREAM_STATUS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

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

pub(super) async fn stream_logs(
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
