//! Live run views: `GET /api/v1/workflows/{id}/events` sends a run's view at once, again
//! whenever its state changes, and an `end` event once it is final (`stagely run` waits on it
//! instead of polling). One publisher task per watched run reads the view when this core
//! writes to that run or one of its jobs ([`crate::runner::Runner::changes`]), and now and
//! then besides (another replica's writes), and hands it to every viewer of that run through
//! one `watch` channel: a hundred viewers cost one read per change, not a hundred. A viewer
//! that falls behind skips to the newest view (each is a whole snapshot, so nothing is lost
//! but intermediate states). A run nobody watches costs nothing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tracing::Instrument;

use stagely_api::{RunView, is_final};

use crate::runner::Runner;
use crate::views::RunViews;

/// How often a publisher re-reads its run without being told of a change (another
/// replica's writes reach this core only through the store).
pub const REREAD_EVERY: Duration = Duration::from_secs(2);
/// The least time between two reads of one run (a burst of writes is read once).
pub const MIN_READ_GAP: Duration = Duration::from_millis(20);

/// What a viewer sees: the newest view of the run (`None` until the first read).
pub type Views = watch::Receiver<Option<Arc<RunView>>>;

/// The publishers of watched runs, by run id.
pub struct RunEvents {
    /// Whose writes tell a publisher to read again, and whose shutdown stops it.
    runner: Runner,
    views: RunViews,
    runs: Mutex<HashMap<String, watch::Sender<Option<Arc<RunView>>>>>,
    /// Publisher tasks alive.
    publishers: std::sync::atomic::AtomicUsize,
}

impl RunEvents {
    pub fn new(runner: Runner, views: RunViews) -> Arc<RunEvents> {
        Arc::new(RunEvents {
            runner,
            views,
            runs: Mutex::default(),
            publishers: Default::default(),
        })
    }

    /// A viewer of `run_id`; starts the run's publisher when it is the first.
    pub fn subscribe(self: &Arc<Self>, run_id: &str) -> Views {
        let mut runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sender) = runs.get(run_id) {
            return sender.subscribe();
        }
        let (sender, views) = watch::channel(None);
        runs.insert(run_id.to_string(), sender.clone());
        drop(runs);
        let span = tracing::info_span!("run_events", run_id);
        tokio::spawn(publish(self.clone(), run_id.to_string(), sender).instrument(span));
        views
    }

    /// Publisher tasks alive now (one per watched run, whatever its number of viewers).
    pub fn publishers(&self) -> usize {
        self.publishers.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Whether the publisher may stop: the run is final, or nobody watches (checked and
    /// removed under the lock, so a viewer arriving meanwhile gets a new publisher).
    fn release(
        &self,
        run_id: &str,
        sender: &watch::Sender<Option<Arc<RunView>>>,
        done: bool,
    ) -> bool {
        let mut runs = self.runs.lock().unwrap_or_else(|e| e.into_inner());
        if !done && sender.receiver_count() > 0 {
            return false;
        }
        if runs
            .get(run_id)
            .is_some_and(|current| current.same_channel(sender))
        {
            runs.remove(run_id);
        }
        true
    }
}

/// The part of a view that says what changed: everything but the running cost estimates
/// (they grow with the clock, not with the run's state).
fn state_of(view: &RunView) -> serde_json::Value {
    fn strip(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                map.remove("cost_usd");
                map.remove("billed_seconds");
                map.values_mut().for_each(strip);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut value = serde_json::to_value(view).unwrap_or_default();
    strip(&mut value);
    value
}

/// Waits until a write of this core changed `run_id` (or may have: an unknown run, or
/// changes missed while behind); false once the runner is gone.
async fn touched(
    changes: &mut tokio::sync::broadcast::Receiver<crate::runner::Changed>,
    run_id: &str,
) -> bool {
    use tokio::sync::broadcast::error::RecvError;
    loop {
        match changes.recv().await {
            Ok(crate::runner::Changed::Run(id)) if &*id == run_id => return true,
            Ok(crate::runner::Changed::Any) | Err(RecvError::Lagged(_)) => return true,
            Ok(crate::runner::Changed::Run(_)) => {}
            Err(RecvError::Closed) => return false,
        }
    }
}

/// One run's publisher: reads the view after each change this core makes (at most every
/// [`MIN_READ_GAP`]) and every [`REREAD_EVERY`], publishes it when its state changed, and
/// stops once the final view is out, when nobody watches, or at shutdown.
async fn publish(
    events: Arc<RunEvents>,
    run_id: String,
    sender: watch::Sender<Option<Arc<RunView>>>,
) {
    /// Counts the task alive however it ends.
    struct Alive(Arc<RunEvents>);
    impl Drop for Alive {
        fn drop(&mut self) {
            self.0
                .publishers
                .fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    events
        .publishers
        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let _alive = Alive(events.clone());
    let mut changes = events.runner.changes();
    let shutdown = events.runner.shutdown_token();
    let mut last: Option<serde_json::Value> = None;
    loop {
        let mut done = false;
        match events.views.load(&run_id).await {
            Ok(Some(view)) => {
                let now = state_of(&view);
                done = is_final(&view.status);
                if last.as_ref() != Some(&now) {
                    last = Some(now);
                    sender.send_replace(Some(Arc::new(view)));
                }
            }
            // Deleted (or never there): viewers see the channel close.
            Ok(None) => done = true,
            Err(error) => tracing::warn!(%run_id, "reading a watched run failed: {error}"),
        }
        if done && events.release(&run_id, &sender, true) {
            return;
        }
        tokio::select! {
            heard = touched(&mut changes, &run_id) => {
                if !heard {
                    events.release(&run_id, &sender, true);
                    return;
                }
            }
            () = tokio::time::sleep(REREAD_EVERY) => {}
            () = sender.closed() => {
                if events.release(&run_id, &sender, false) {
                    return;
                }
            }
            () = shutdown.cancelled() => {
                events.release(&run_id, &sender, true);
                return;
            }
        }
        tokio::time::sleep(MIN_READ_GAP).await;
    }
}
