//! The caps on open Server-Sent Events streams, and the SSE response both stream routes use.

use std::sync::Arc;

use axum::response::{IntoResponse, Response};

use super::{ApiError, Caller};

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
pub(super) fn sse_response(
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
