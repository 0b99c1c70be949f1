//! Live log fan-out: the agent link publishes each batch of lines the moment it is stored;
//! every live viewer of that job (`GET /api/v1/jobs/{id}/logs/stream`) receives the same
//! batch from one bounded broadcast channel, so a hundred viewers cost one fan-out, not a
//! hundred database polls. A viewer that falls behind the channel's bound reads what it missed
//! from the store (its cursor is a sequence number), so nothing is lost and nothing is sent
//! twice. A job with no viewer costs nothing: nothing is published without a subscriber.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::broadcast;

use crate::db::LogRow;

/// Batches a slow viewer may fall behind by before it reads the store instead.
const CHANNEL_BATCHES: usize = 256;

/// What a viewer hears about its job.
#[derive(Debug, Clone)]
pub enum HubEvent {
    /// Lines just stored, in sequence order.
    Lines(Arc<Vec<LogRow>>),
    /// The job reached a final status (this core stored it).
    Finished,
}

#[derive(Debug, Default)]
pub struct LogHub {
    jobs: Mutex<HashMap<String, broadcast::Sender<HubEvent>>>,
}

impl LogHub {
    /// Starts hearing `job_id`'s lines from now on.
    pub fn subscribe(&self, job_id: &str) -> broadcast::Receiver<HubEvent> {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        jobs.entry(job_id.to_string())
            .or_insert_with(|| broadcast::channel(CHANNEL_BATCHES).0)
            .subscribe()
    }

    /// Whether anyone listens to `job_id` (drops the job's entry when nobody does).
    pub fn has_viewers(&self, job_id: &str) -> bool {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        match jobs.get(job_id) {
            Some(sender) if sender.receiver_count() > 0 => true,
            Some(_) => {
                jobs.remove(job_id);
                false
            }
            None => false,
        }
    }

    /// A viewer of `job_id`: its channel, released (and the job's entry dropped when it was
    /// the last) when the viewer goes.
    pub fn viewer(self: &Arc<Self>, job_id: &str) -> Viewer {
        Viewer {
            events: Some(self.subscribe(job_id)),
            hub: self.clone(),
            job_id: job_id.to_string(),
        }
    }

    /// Lines of `job_id` were stored: `rows` builds them, called only when someone watches
    /// (one lock; a job whose last viewer left loses its entry here).
    pub fn publish(&self, job_id: &str, rows: impl FnOnce() -> Vec<LogRow>) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        let Some(sender) = jobs.get(job_id) else {
            return;
        };
        if sender.receiver_count() == 0 {
            jobs.remove(job_id);
            return;
        }
        let lines = rows();
        if !lines.is_empty() {
            let _ = sender.send(HubEvent::Lines(Arc::new(lines)));
        }
    }

    /// `job_id` reached a final status: its viewers end their streams.
    pub fn finished(&self, job_id: &str) {
        let mut jobs = self.jobs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sender) = jobs.remove(job_id) {
            let _ = sender.send(HubEvent::Finished);
        }
    }

    /// Jobs with a channel (tests: a finished job leaves none behind).
    pub fn channels(&self) -> usize {
        self.jobs.lock().map(|jobs| jobs.len()).unwrap_or(0)
    }
}

/// One live viewer's subscription (see [`LogHub::viewer`]).
pub struct Viewer {
    events: Option<broadcast::Receiver<HubEvent>>,
    hub: Arc<LogHub>,
    job_id: String,
}

impl Viewer {
    pub async fn recv(&mut self) -> Result<HubEvent, broadcast::error::RecvError> {
        match self.events.as_mut() {
            Some(events) => events.recv().await,
            None => Err(broadcast::error::RecvError::Closed),
        }
    }

    /// Listens again (after the job's channel was closed by a requeue race).
    pub fn resubscribe(&mut self) {
        self.events = Some(self.hub.subscribe(&self.job_id));
    }
}

impl Drop for Viewer {
    fn drop(&mut self) {
        drop(self.events.take());
        // Drops the job's entry when this was its last viewer.
        let _ = self.hub.has_viewers(&self.job_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: i64) -> LogRow {
        LogRow {
            seq,
            timestamp: 0,
            stream: "stdout".into(),
            line: format!("{seq}\n"),
            continued: false,
        }
    }

    #[tokio::test]
    async fn every_viewer_gets_each_batch_once_and_the_end() {
        let hub = LogHub::default();
        assert!(!hub.has_viewers("j"));
        hub.publish("j", || vec![row(1)]); // nobody listens: dropped, nothing kept
        assert_eq!(hub.channels(), 0);
        let mut a = hub.subscribe("j");
        let mut b = hub.subscribe("j");
        assert!(hub.has_viewers("j"));
        hub.publish("j", || vec![row(2), row(3)]);
        hub.finished("j");
        for viewer in [&mut a, &mut b] {
            match viewer.recv().await.unwrap() {
                HubEvent::Lines(lines) => {
                    assert_eq!(lines.iter().map(|l| l.seq).collect::<Vec<_>>(), [2, 3]);
                }
                other => panic!("{other:?}"),
            }
            assert!(matches!(viewer.recv().await.unwrap(), HubEvent::Finished));
        }
        assert_eq!(hub.channels(), 0);
    }

    #[tokio::test]
    async fn a_viewer_that_goes_leaves_nothing_behind() {
        let hub = Arc::new(LogHub::default());
        let viewer = hub.viewer("done");
        assert_eq!(hub.channels(), 1);
        drop(viewer);
        assert_eq!(hub.channels(), 0);
    }

    #[tokio::test]
    async fn a_viewer_that_falls_behind_is_told_so() {
        let hub = LogHub::default();
        let mut slow = hub.subscribe("j");
        for seq in 0..(CHANNEL_BATCHES as i64 + 10) {
            hub.publish("j", || vec![row(seq)]);
        }
        assert!(matches!(
            slow.recv().await,
            Err(broadcast::error::RecvError::Lagged(_))
        ));
        drop(slow);
        assert!(!hub.has_viewers("j"));
        assert_eq!(hub.channels(), 0);
    }
}
