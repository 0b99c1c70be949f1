//! The HTTP and Server-Sent Events client of the `stagely` commands: an API client with the
//! caller's token, event streams cut into events (bounded), a job's lines followed live.

use anyhow::{Context, bail};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// A new random API token.
pub fn new_api_token() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("stga_{}", hex::encode(bytes))
}

/// An HTTP client for the API that presents `STAGELY_API_TOKEN` (from the environment only:
/// a flag would show it in the process list) on every request.
pub fn api_client() -> anyhow::Result<reqwest::Client> {
    client_with_token(
        std::env::var("STAGELY_API_TOKEN")
            .ok()
            .filter(|t| !t.is_empty())
            .as_deref(),
    )
}

pub(crate) fn client_with_token(token: Option<&str>) -> anyhow::Result<reqwest::Client> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(token) = token {
        let mut value = reqwest::header::HeaderValue::from_str(&format!("Bearer {token}"))
            .context("STAGELY_API_TOKEN holds characters that cannot go in an HTTP header")?;
        value.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    Ok(reqwest::Client::builder()
        .default_headers(headers)
        .build()?)
}

pub(crate) async fn shutdown_signal(token: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    token.cancel();
}

/// Server-Sent Events cut from a response body as its chunks arrive: `(event, data)` pairs
/// (`message` when an event names no type). Bounded: an event over 4 MiB is an error.
#[derive(Default)]
pub(crate) struct SseEvents {
    buffer: Vec<u8>,
}

impl SseEvents {
    pub(crate) const MAX_EVENT_BYTES: usize = 4 * 1024 * 1024;

    pub(crate) fn feed(&mut self, chunk: &[u8]) {
        self.buffer.extend_from_slice(chunk);
    }

    /// The next whole event fed, if any.
    pub(crate) fn next_event(&mut self) -> anyhow::Result<Option<(String, String)>> {
        let Some(at) = self.buffer.windows(2).position(|w| w == b"\n\n") else {
            // A single event is bounded by the server's frame limits; refuse a runaway one.
            if self.buffer.len() > Self::MAX_EVENT_BYTES {
                bail!("the event stream sent an event over 4 MiB");
            }
            return Ok(None);
        };
        let block: Vec<u8> = self.buffer.drain(..at + 2).collect();
        let block = String::from_utf8_lossy(&block);
        let mut event = "message".to_string();
        let mut data = String::new();
        for field in block.lines() {
            if let Some(value) = field.strip_prefix("event:") {
                event = value.trim().to_string();
            } else if let Some(value) = field.strip_prefix("data:") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(value.strip_prefix(' ').unwrap_or(value));
            }
        }
        Ok(Some((event, data)))
    }
}

/// Hands every line of a job's log to `on_line` as it is stored, from its first to its
/// `end` event, resuming with `Last-Event-ID` when the connection drops (no line is lost or
/// repeated).
pub(crate) async fn stream_job_lines(
    client: &reqwest::Client,
    core_url: &str,
    job_id: &str,
    mut on_line: impl FnMut(&stagely_api::LogLineView),
) -> anyhow::Result<()> {
    let url = format!("{core_url}/api/v1/jobs/{job_id}/logs/stream");
    let mut last: Option<i64> = None;
    let mut failures = 0u32;
    loop {
        let mut request = client.get(&url);
        if let Some(seq) = last {
            request = request.header("Last-Event-ID", seq.to_string());
        }
        let Some(response) = open_stream(request, &mut failures).await? else {
            continue;
        };
        match read_events(response, &mut last, &mut on_line).await {
            Ok(true) => return Ok(()),
            // The stream dropped before the end: resume after the last line handed over.
            Ok(false) | Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Opens an event stream: its response, or `None` after a failed attempt (waited out with a
/// growing pause; the eleventh failure in a row is the error). A refusal is an error at once.
pub(crate) async fn open_stream(
    request: reqwest::RequestBuilder,
    failures: &mut u32,
) -> anyhow::Result<Option<reqwest::Response>> {
    match request.send().await {
        Ok(response) if response.status().is_success() => {
            *failures = 0;
            Ok(Some(response))
        }
        Ok(response) => bail!("{}", response.text().await?),
        Err(error) => {
            *failures += 1;
            if *failures > 10 {
                return Err(error.into());
            }
            tokio::time::sleep(Duration::from_millis(500 * u64::from(*failures))).await;
            Ok(None)
        }
    }
}

/// Hands over `line` events, tracking the last sequence; true at the `end` event.
pub(crate) async fn read_events(
    mut response: reqwest::Response,
    last: &mut Option<i64>,
    on_line: &mut impl FnMut(&stagely_api::LogLineView),
) -> anyhow::Result<bool> {
    let mut events = SseEvents::default();
    while let Some(chunk) = response.chunk().await? {
        events.feed(&chunk);
        while let Some((event, data)) = events.next_event()? {
            match event.as_str() {
                "line" => {
                    let line: stagely_api::LogLineView = serde_json::from_str(&data)?;
                    if last.is_none_or(|seen| line.seq > seen) {
                        on_line(&line);
                        *last = Some(line.seq);
                    }
                }
                "end" => return Ok(true),
                _ => {}
            }
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(crate) fn events_are_cut_from_chunks_whatever_their_boundaries() {
        let stream = b": keep-alive\n\nevent: run\ndata: {\"id\":\"r\"}\n\nid: 7\nevent: line\ndata: a\ndata: b\n\nevent:end\ndata:{}\n\n";
        for cut in 1..stream.len() {
            let mut events = SseEvents::default();
            let mut seen = Vec::new();
            for part in [&stream[..cut], &stream[cut..]] {
                events.feed(part);
                while let Some(event) = events.next_event().unwrap() {
                    seen.push(event);
                }
            }
            let expected = [
                ("message", ""),
                ("run", "{\"id\":\"r\"}"),
                ("line", "a\nb"),
                ("end", "{}"),
            ];
            let seen: Vec<(&str, &str)> =
                seen.iter().map(|(e, d)| (e.as_str(), d.as_str())).collect();
            assert_eq!(seen, expected, "cut at {cut}");
        }
    }

    #[test]
    pub(crate) fn a_runaway_event_is_refused() {
        let mut events = SseEvents::default();
        events.feed(b"event: run\ndata: ");
        events.feed(&vec![b'x'; SseEvents::MAX_EVENT_BYTES]);
        let error = events.next_event().unwrap_err();
        assert!(error.to_string().contains("over 4 MiB"), "{error}");
    }
}
