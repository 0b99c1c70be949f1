//! A TCP forwarder that sits between agents and a core and cuts every connection through it
//! on demand (with a reset, mid-frame if a frame is in flight): the dropped connections of
//! a flaky network, made repeatable. It can also hold what agents send (stop reading it), so
//! a frame is surely written by the agent and surely lost by a cut that follows.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A forwarder on loopback to an upstream set later (the core's port is known only once it
/// runs, and its `public_url` must name the proxy before that).
pub struct CuttingProxy {
    pub addr: SocketAddr,
    upstream: Arc<Mutex<Option<SocketAddr>>>,
    generation: watch::Sender<u64>,
    held: watch::Sender<bool>,
    accepted: Arc<AtomicU64>,
    cut: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CuttingProxy {
    pub async fn start() -> anyhow::Result<CuttingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let upstream: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
        let (generation, _) = watch::channel(0u64);
        let (held, _) = watch::channel(false);
        let accepted = Arc::new(AtomicU64::new(0));
        let cut = Arc::new(AtomicU64::new(0));
        let task = {
            let upstream = upstream.clone();
            let generation = generation.clone();
            let held = held.clone();
            let accepted = accepted.clone();
            let cut = cut.clone();
            tokio::spawn(async move {
                while let Ok((client, _)) = listener.accept().await {
                    let target = *upstream.lock().unwrap_or_else(|e| e.into_inner());
                    let Some(target) = target else {
                        continue;
                    };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let mut cuts = generation.subscribe();
                    let holds = held.subscribe();
                    let cut = cut.clone();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(target).await else {
                            return;
                        };
                        let (mut client, mut server) = (client, server);
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let (client_read, client_write) = client.split();
                        let (server_read, server_write) = server.split();
                        let upstream = forward(client_read, server_write, Some(holds));
                        let downstream = forward(server_read, client_write, None);
                        tokio::select! {
                            _ = async { tokio::join!(upstream, downstream) } => {}
                            _ = cuts.changed() => {
                                cut.fetch_add(1, Ordering::SeqCst);
                                // A reset, as a dead link or a crashed peer gives.
                                let _ = client.set_zero_linger();
                                let _ = server.set_zero_linger();
                            }
                        }
                    });
                }
            })
        };
        Ok(CuttingProxy {
            addr,
            upstream,
            generation,
            held,
            accepted,
            cut,
            task,
        })
    }

    /// `http://ADDR`, for a core's `public_url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set_upstream(&self, target: SocketAddr) {
        *self.upstream.lock().unwrap_or_else(|e| e.into_inner()) = Some(target);
    }

    /// Resets every connection open through the proxy now.
    pub fn cut_all(&self) {
        self.generation.send_modify(|generation| *generation += 1);
    }

    /// While `true`, what clients send is not read (it waits in the socket buffers, lost
    /// by a cut); what the upstream sends still flows.
    pub fn hold(&self, on: bool) {
        self.held.send_replace(on);
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections cut so far.
    pub fn cut(&self) -> u64 {
        self.cut.load(Ordering::SeqCst)
    }
}

impl Drop for CuttingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` into `to` until either side ends; with `holds`, reads nothing while it says
/// `true`.
async fn forward<R, W>(mut from: R, mut to: W, mut holds: Option<watch::Receiver<bool>>)
where
    R: tokio::io::AsyncRead + Unpin,
    W: tokio::io::AsyncWrite + Unpin,
{
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        if let Some(holds) = holds.as_mut() {
            while *holds.borrow_and_update() {
                if holds.changed().await.is_err() {
                    return;
                }
            }
        }
        let read = match holds.as_mut() {
            Some(holds) => tokio::select! {
                read = from.read(&mut buffer) => read,
                // Held meanwhile: stop reading before anything more arrives. The proxy gone:
                // nothing to forward to any more.
                changed = holds.changed() => match changed {
                    Ok(()) => continue,
                    Err(_) => return,
                },
            },
            None => from.read(&mut buffer).await,
        };
        let count = match read {
            Ok(0) | Err(_) => break,
            Ok(count) => count,
        };
        if to.write_all(&buffer[..count]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
