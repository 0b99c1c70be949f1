//! The loop's tasks: agent links, work sent over them, provisioning, liveness checks and
//! terminations, each spawned on the runner's task tracker and reporting back to the loop.

use super::*;

impl LoopState {
    pub(super) fn spawn_link(
        &self,
        job_id: String,
        attempt: u32,
        socket: WebSocket,
        mut commands: mpsc::Receiver<LinkCommand>,
    ) {
        let shared = self.shared.clone();
        let tx = self.tx.clone();
        let span = tracing::info_span!("agent", job_id = %job_id, attempt);
        self.shared.tasks.spawn(
            async move {
                let mut socket = socket;
                let deadline = tokio::time::Instant::now() + WORK_WAIT;
                let order = loop {
                    tokio::select! {
                        command = commands.recv() => match command {
                            Some(LinkCommand::Work(order)) => break *order,
                            // The agent dialled again before its work went out: the newer
                            // connection is the one to serve.
                            Some(LinkCommand::Reconnected(newer)) => socket = *newer,
                            _ => {
                                agent_link::close(&mut socket, None).await;
                                return;
                            }
                        },
                        () = tokio::time::sleep_until(deadline) => {
                            tracing::error!("no work arrived for a connected agent");
                            agent_link::close(&mut socket, None).await;
                            return;
                        }
                    }
                };
                // While the agent is away the engine asks the provider whether its instance
                // still runs; the forwarder ends when the link does (its sender dropped).
                let (away, mut seen) = tokio::sync::watch::channel(false);
                let forward = {
                    let (tx, job_id) = (tx.clone(), job_id.clone());
                    async move {
                        while seen.changed().await.is_ok() {
                            let event = if *seen.borrow_and_update() {
                                Event::AgentAway {
                                    job_id: job_id.clone(),
                                    attempt,
                                }
                            } else {
                                Event::AgentBack {
                                    job_id: job_id.clone(),
                                    attempt,
                                }
                            };
                            if tx.send(Msg::Event(event)).await.is_err() {
                                break;
                            }
                        }
                    }
                };
                shared.tasks.spawn(forward.in_current_span());
                let (outcome, socket) =
                    agent_link::serve_attempt(&shared.link, socket, order, &mut commands, &away)
                        .await;
                drop(away);
                if let Some(socket) = socket {
                    let _ = tx
                        .send(Msg::Idle {
                            job_id: job_id.clone(),
                            attempt,
                            socket,
                        })
                        .await;
                }
                if let Some(outcome) = outcome {
                    let _ = tx
                        .send(Msg::Event(Event::Finished {
                            job_id,
                            attempt,
                            outcome,
                        }))
                        .await;
                }
            }
            .instrument(span),
        );
    }

    /// Builds the attempt's BUILD or MERGE and hands it to the agent link.
    pub(super) async fn send_work(
        &mut self,
        job_id: String,
        run_id: String,
        attempt: u32,
        via: Via,
    ) {
        let key = match &via {
            Via::OwnAgent | Via::Adopted => (job_id.clone(), attempt),
            Via::AgentOf { job_id, attempt } => (job_id.clone(), *attempt),
        };
        let prepared = match &via {
            Via::OwnAgent => self
                .shared
                .prepared
                .lock()
                .ok()
                .and_then(|mut prepared| prepared.remove(&(job_id.clone(), attempt))),
            Via::AgentOf { .. } | Via::Adopted => None,
        };
        let adopted = via == Via::Adopted;
        let read = match prepared {
            Some(order) => Ok(*order),
            None => work_order(&self.shared, &job_id, &run_id, attempt, adopted).await,
        };
        let mut order = match read {
            Ok(order) => order,
            Err(message) => {
                self.engine.handle(
                    Event::Finished {
                        job_id,
                        attempt,
                        outcome: AttemptOutcome::BuildFailed {
                            exit_code: None,
                            message,
                        },
                    },
                    now(),
                );
                return;
            }
        };
        order.adopted = adopted;
        match via {
            Via::OwnAgent | Via::Adopted => match self.links.get(&key) {
                Some(link) if link.try_send(LinkCommand::Work(Box::new(order))).is_ok() => {}
                _ => {
                    self.engine.handle(
                        Event::Finished {
                            job_id,
                            attempt,
                            outcome: AttemptOutcome::Infrastructure {
                                kind: InfraKind::AgentLost,
                                message: "the agent connection closed before its work was sent"
                                    .into(),
                            },
                        },
                        now(),
                    );
                }
            },
            Via::AgentOf { .. } => match self.idle.remove(&key) {
                // The last builder's agent takes the merge on its open connection.
                Some(socket) => {
                    order.handed_over = true;
                    let (commands, receiver) = mpsc::channel(LINK_QUEUE);
                    let _ = commands.try_send(LinkCommand::Work(Box::new(order)));
                    self.links.insert((job_id.clone(), attempt), commands);
                    // The finished job's link entry is done with.
                    self.links.remove(&key);
                    tracing::info!(job_id, from = %key.0, "merge handed to the last builder's agent");
                    self.spawn_link(job_id, attempt, socket, receiver);
                }
                // Gone (or it does not take more work): a fresh instance.
                None => {
                    self.engine
                        .handle(Event::HandoverFailed { job_id, attempt }, now());
                }
            },
        }
    }

    pub(super) fn spawn_provision(
        &self,
        job_id: String,
        run_id: String,
        attempt: u32,
        token: Option<String>,
    ) -> tokio::task::JoinHandle<()> {
        let shared = self.shared.clone();
        let tx = self.tx.clone();
        let span = tracing::info_span!("job", run_id = %run_id, job_id = %job_id, attempt);
        self.shared.tasks.spawn(
            async move {
                let message = match provision(&shared, &job_id, &run_id, attempt, token).await {
                    Ok(instance_id) => Msg::Provisioned {
                        job_id,
                        attempt,
                        instance_id,
                    },
                    Err(ProvisionFailure { message, retryable }) => {
                        tracing::warn!(retryable, "provisioning failed: {message}");
                        Msg::Event(Event::InstanceFailed {
                            job_id,
                            attempt,
                            message,
                            retryable,
                        })
                    }
                };
                if let Err(mpsc::error::SendError(Msg::Provisioned { instance_id, .. })) =
                    tx.send(message).await
                {
                    // The loop is gone (shutdown): the instance must not outlive it.
                    terminate(&shared, &instance_id).await;
                }
            }
            .instrument(span),
        )
    }

    /// Asks the provider whether an adopted attempt's instance still runs (in a task: a cloud
    /// call must not hold up the loop) and tells the engine when it does not. A failed call
    /// says nothing: the engine asks again.
    pub(super) fn spawn_check_instance(&self, job_id: String, attempt: u32, instance_id: String) {
        let shared = self.shared.clone();
        let tx = self.tx.clone();
        let span =
            tracing::info_span!("job", job_id = %job_id, attempt, instance_id = %instance_id);
        self.shared.tasks.spawn(
            async move {
                match shared.provider.instance_state(&instance_id).await {
                    Ok(InstanceState::Running) => {}
                    Ok(InstanceState::Gone { detail }) => {
                        tracing::warn!("the attempt's instance is gone ({detail}): ending it");
                        let _ = tx
                            .send(Msg::Event(Event::InstanceGone {
                                job_id,
                                attempt,
                                detail,
                            }))
                            .await;
                    }
                    Err(error) => {
                        tracing::warn!("cannot tell whether the instance still runs: {error}");
                    }
                }
            }
            .instrument(span),
        );
    }

    /// Closes a socket without holding up the loop (a peer that stopped reading).
    pub(super) fn spawn_close(&self, mut socket: WebSocket) {
        self.shared.tasks.spawn(async move {
            agent_link::close(&mut socket, None).await;
        });
    }

    pub(super) fn spawn_terminate_attempt(
        &self,
        job_id: String,
        attempt: u32,
        instance_id: Option<String>,
    ) -> tokio::task::JoinHandle<()> {
        let shared = self.shared.clone();
        self.shared.tasks.spawn(async move {
            terminate_attempt(&shared, &job_id, attempt, instance_id).await;
        })
    }

    pub(super) fn spawn_terminate(&self, instance_id: String) -> tokio::task::JoinHandle<()> {
        let shared = self.shared.clone();
        self.shared.tasks.spawn(async move {
            terminate(&shared, &instance_id).await;
        })
    }

    /// Terminates instances whose attempt ended, whose owner's lease expired or that
    /// outlived their maximum lifetime, and instances the provider lists for this core's id
    /// that the store does not know (a crash between create and record) once their attempt
    /// no longer holds. Every termination is logged with its reason and counted.
    pub(super) fn spawn_log_retention(&self) {
        Runner::spawn_log_retention_task(&self.shared);
    }
}
