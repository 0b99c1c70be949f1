//! A connection flood from one address, as an attacker on loopback would send it: keep-alive
//! connections that each ask `GET /healthz` every two seconds, and connections that trickle a
//! request's headers in (a header line every two seconds), each dialled again a second after the
//! core closes it. It runs on its own runtime thread, so the core under test is not slowed
//! by the flood's own scheduling more than by its sockets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Default)]
struct Counters {
    stop: AtomicBool,
    /// Sockets connected now (as the flood sees them).
    open: AtomicI64,
    connects: AtomicU64,
    answered: AtomicU64,
}

/// A running flood; stopped when dropped.
pub struct Flood {
    counters: Arc<Counters>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// What a flood did.
#[derive(Debug, Clone, Copy)]
pub struct FloodStats {
    pub open: i64,
    pub connects: u64,
    pub answered: u64,
}

impl Flood {
    /// `repeaters` keep-alive `/healthz` askers and `tricklers` slow-header senders at `addr`.
    pub fn start(addr: SocketAddr, repeaters: usize, tricklers: usize) -> Flood {
        let counters = Arc::new(Counters::default());
        let shared = counters.clone();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("the flood's runtime");
            runtime.block_on(async move {
                let mut tasks = tokio::task::JoinSet::new();
                for i in 0..repeaters + tricklers {
                    let counters = shared.clone();
                    let trickle = i >= repeaters;
                    tasks.spawn(async move {
                        // Spread the first dials over a second.
                        tokio::time::sleep(Duration::from_millis((i % 1000) as u64)).await;
                        while !counters.stop.load(Ordering::Relaxed) {
                            let Ok(Ok(socket)) = tokio::time::timeout(
                                Duration::from_secs(5),
                                tokio::net::TcpStream::connect(addr),
                            )
                            .await
                            else {
                                tokio::time::sleep(Duration::from_millis(100)).await;
                                continue;
                            };
                            counters.connects.fetch_add(1, Ordering::Relaxed);
                            counters.open.fetch_add(1, Ordering::Relaxed);
                            if trickle {
                                trickle_on(socket, &counters).await;
                            } else {
                                repeat_on(socket, &counters).await;
                            }
                            counters.open.fetch_sub(1, Ordering::Relaxed);
                            // Dialled again a second after the core closed it.
                            tokio::time::sleep(Duration::from_secs(1)).await;
                        }
                    });
                }
                while tasks.join_next().await.is_some() {}
            });
        });
        Flood {
            counters,
            thread: Some(thread),
        }
    }

    pub fn stats(&self) -> FloodStats {
        FloodStats {
            open: self.counters.open.load(Ordering::Relaxed),
            connects: self.counters.connects.load(Ordering::Relaxed),
            answered: self.counters.answered.load(Ordering::Relaxed),
        }
    }

    /// Stops every connection and waits for the flood's thread.
    pub fn stop(mut self) -> FloodStats {
        let stats = self.stats();
        self.halt();
        stats
    }

    fn halt(&mut self) {
        self.counters.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        self.halt();
    }
}

/// `GET /healthz` on a kept-alive connection every two seconds until it is closed.
async fn repeat_on(mut socket: tokio::net::TcpStream, counters: &Counters) {
    let mut buffer = [0u8; 4096];
    while !counters.stop.load(Ordering::Relaxed) {
        if socket
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: flood\r\nConnection: keep-alive\r\n\r\n")
            .await
            .is_err()
        {
            return;
        }
        match tokio::time::timeout(Duration::from_secs(10), socket.read(&mut buffer)).await {
            Ok(Ok(n)) if n > 0 => {
                if buffer[..n].starts_with(b"HTTP/1.1 ") {
                    counters.answered.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => return,
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

/// A request's headers, one line every two seconds, never ended, until the socket is cut.
async fn trickle_on(mut socket: tokio::net::TcpStream, counters: &Counters) {
    if socket
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: flood\r\n")
        .await
        .is_err()
    {
        return;
    }
    let mut buffer = [0u8; 1024];
    while !counters.stop.load(Ordering::Relaxed) {
        // A cut shows as end of file (or a reset) while waiting.
        match tokio::time::timeout(Duration::from_secs(2), socket.read(&mut buffer)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return,
            Ok(Ok(_)) => {}
            Err(_) => {}
        }
        if socket.write_all(b"X-Trickle: 1\r\n").await.is_err() {
            return;
        }
    }
}
