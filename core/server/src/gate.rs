//! The HTTP server's gate: every request passes here before the router, and every
//! connection is counted here from accept to close. The decisions are [`Admission`]'s; this
//! holds them behind a lock, cuts evicted connections, and shapes answers:
//! - an agent's request (`/api/v1/agent/connect`) is admitted in the agents' share;
//! - a request without a valid API token (a `401`, `/healthz`, an unknown path) is answered
//!   with `Connection: close`, so it cannot hold a connection, and such requests are rate
//!   limited per source address (`/healthz` excepted);
//! - a refused request is answered `429` (its address is over its cap) or `503` (the core is)
//!   and its connection closed.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio_util::sync::CancellationToken;

use crate::admission::{Admission, AdmissionLimits, Class, ConnId, Refusal};
use crate::http::{ApiAuth, ApiError};

/// The agents' endpoint: the one route in the agents' share.
pub const AGENT_PATH: &str = "/api/v1/agent/connect";
/// Open, cheap, and never rate limited (load balancers probe it).
pub const HEALTH_PATH: &str = "/healthz";

struct State {
    admission: Admission,
    /// Cancelled to cut a connection (eviction); one per open connection.
    cuts: HashMap<ConnId, CancellationToken>,
}

/// Connections and requests in; see the module doc.
pub struct Gate {
    state: Mutex<State>,
    auth: Arc<ApiAuth>,
    unauthenticated: governor::DefaultKeyedRateLimiter<IpAddr>,
    /// Connections cut to make room, since start.
    evicted: std::sync::atomic::AtomicU64,
}

/// One open connection's place at the gate; leaving it closes the connection's account.
pub struct Ticket {
    gate: Arc<Gate>,
    pub id: ConnId,
    pub ip: IpAddr,
    /// Cancelled when the gate evicts this connection.
    pub cut: CancellationToken,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut state = self.gate.lock();
        state.admission.close(self.id);
        state.cuts.remove(&self.id);
    }
}

impl Gate {
    pub fn new(limits: AdmissionLimits, auth: Arc<ApiAuth>, per_ip_per_sec: u32) -> Arc<Gate> {
        let rate = NonZeroU32::new(per_ip_per_sec).unwrap_or(NonZeroU32::MIN);
        let burst = rate.saturating_mul(NonZeroU32::new(5).unwrap_or(NonZeroU32::MIN));
        let quota = governor::Quota::per_second(rate).allow_burst(burst);
        Arc::new(Gate {
            state: Mutex::new(State {
                admission: Admission::new(limits),
                cuts: HashMap::new(),
            }),
            auth,
            unauthenticated: governor::RateLimiter::keyed(quota),
            evicted: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent under a panic elsewhere: every update is a few plain
        // assignments, so a poisoned lock is taken over.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn limits(&self) -> AdmissionLimits {
        self.lock().admission.limits()
    }

    pub fn counts(&self) -> crate::admission::Counts {
        self.lock().admission.counts()
    }

    /// Connections cut to make room since start.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A connection from `ip` was accepted; the connections it displaces are cut.
    pub fn accept(self: &Arc<Self>, ip: IpAddr) -> Ticket {
        let cut = CancellationToken::new();
        let id = {
            let mut state = self.lock();
            let accepted = state.admission.accept(ip);
            for evicted in &accepted.evict {
                if let Some(token) = state.cuts.remove(evicted) {
                    token.cancel();
                }
            }
            self.evicted.fetch_add(
                accepted.evict.len() as u64,
                std::sync::atomic::Ordering::Relaxed,
            );
            state.cuts.insert(accepted.id, cut.clone());
            accepted.id
        };
        Ticket {
            gate: self.clone(),
            id,
            ip,
            cut,
        }
    }

    /// Cuts the oldest waiting connection (accept ran out of descriptors); false if none.
    pub fn evict_oldest(&self) -> bool {
        let mut state = self.lock();
        let Some(id) = state.admission.oldest_waiting() else {
            return false;
        };
        state.admission.close(id);
        if let Some(token) = state.cuts.remove(&id) {
            token.cancel();
        }
        self.evicted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        true
    }

    pub fn is_agent(&self, id: ConnId) -> bool {
        self.lock().admission.is_agent(id)
    }

    /// Forgets rate-limit state of addresses not seen lately (call now and then).
    pub fn forget_quiet_addresses(&self) {
        self.unauthenticated.retain_recent();
        self.unauthenticated.shrink_to_fit();
    }

    /// Serves one request of connection `id` from `ip` through `router`, or refuses it.
    pub async fn serve(
        self: Arc<Self>,
        id: ConnId,
        ip: IpAddr,
        router: axum::Router,
        request: Request<hyper::body::Incoming>,
    ) -> Result<Response, Infallible> {
        use tower::ServiceExt;
        let path = request.uri().path();
        let class = if path == AGENT_PATH {
            Class::Agent
        } else {
            Class::Api
        };
        let is_health = path == HEALTH_PATH;
        // Only a valid API token earns a kept-alive connection (an agent's is checked by
        // its handler, and its connection is kept when upgraded).
        let authenticated =
            class == Class::Api && !is_health && self.auth.accepts(request.headers());
        if class == Class::Api
            && !authenticated
            && !is_health
            && self.unauthenticated.check_key(&ip).is_err()
        {
            tracing::debug!(%ip, "unauthenticated request refused: over its address's rate");
            return Ok(closing(
                ApiError::TooManyRequests {
                    message: "too many requests without a valid token from this address (api.unauthenticated_requests_per_ip_per_sec)".into(),
                    retry_after_secs: 1,
                }
                .into_response(),
            ));
        }
        let admitted = self.lock().admission.begin(id, class);
        if let Err(refusal) = admitted {
            tracing::debug!(%ip, "request refused: {refusal}");
            return Ok(closing(refusal_response(&refusal)));
        }
        let mut finished = Finished {
            gate: self.clone(),
            id,
            upgraded: false,
            trusted: authenticated,
        };
        let response = match router.oneshot(request.map(Body::new)).await {
            Ok(response) => response,
            Err(never) => match never {},
        };
        let upgraded = response.status() == StatusCode::SWITCHING_PROTOCOLS;
        finished.upgraded = upgraded;
        let (mut parts, body) = response.into_parts();
        if !upgraded && !authenticated {
            parts
                .headers
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        Ok(Response::from_parts(
            parts,
            Body::new(Guarded {
                body,
                _finished: finished,
            }),
        ))
    }
}

fn refusal_response(refusal: &Refusal) -> Response {
    let message = refusal.to_string();
    match refusal {
        Refusal::AddressFull(_) => ApiError::TooManyRequests {
            message,
            retry_after_secs: 1,
        },
        Refusal::ApiFull(_) | Refusal::AgentsFull(_) => ApiError::Busy {
            message,
            retry_after_secs: 1,
        },
    }
    .into_response()
}

fn closing(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Tells the gate a request is over when its response body is released (sent, or dropped
/// with the connection): an SSE stream counts for as long as it is open.
struct Finished {
    gate: Arc<Gate>,
    id: ConnId,
    upgraded: bool,
    /// The request carried a valid API token: its kept-alive connection is evicted last.
    trusted: bool,
}

impl Drop for Finished {
    fn drop(&mut self) {
        self.gate
            .lock()
            .admission
            .finish(self.id, self.upgraded, self.trusted);
    }
}

/// A response body carrying its request's [`Finished`].
struct Guarded {
    body: Body,
    _finished: Finished,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
