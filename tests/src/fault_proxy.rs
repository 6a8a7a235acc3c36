//! A small TCP fault proxy on loopback, for the network-fault tests: it forwards bytes
//! between a client and one upstream server and injects faults on the way, whatever the
//! protocol inside (TLS stays end to end; the proxy sees only ciphertext).
//!
//! Faults apply to every connection, new and already open, from the moment they are set:
//! - [`Fault::Blackhole`]: connections are accepted and read, nothing is forwarded or
//!   answered (a hung peer or a dropped route);
//! - [`Fault::Delay`]: every chunk waits this long before it is forwarded, both ways;
//! - [`Fault::Truncate`]: the server's bytes are forwarded up to this many per connection,
//!   then the connection is closed;
//! - [`FaultProxy::cut_next_responses`]: the next `n` chunks the server sends are dropped
//!   and their connections closed — on a kept-alive connection that is the answer to a
//!   request the server has already executed, the case a client must not blindly repeat.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// What the proxy does to the traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Forward untouched.
    None,
    /// Accept and read; forward and answer nothing.
    Blackhole,
    /// Delay every chunk, both ways.
    Delay(Duration),
    /// Forward at most this many of the server's bytes per connection, then close it.
    Truncate(usize),
}

#[derive(Default)]
struct Shared {
    fault: Mutex<Option<Fault>>,
    cut: AtomicU32,
    connections: AtomicU64,
}

impl Shared {
    fn fault(&self) -> Fault {
        self.fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .unwrap_or(Fault::None)
    }
}

/// A running proxy; stops when dropped.
pub struct FaultProxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shared = Arc::new(Shared::default());
        let task = tokio::spawn({
            let shared = shared.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    shared.connections.fetch_add(1, Ordering::Relaxed);
                    let shared = shared.clone();
                    tokio::spawn(async move {
                        let Ok(server) = TcpStream::connect(upstream).await else {
                            return;
                        };
                        let _ = client.set_nodelay(true);
                        let _ = server.set_nodelay(true);
                        let (cr, cw) = client.into_split();
                        let (sr, sw) = server.into_split();
                        // Either direction ending closes both.
                        tokio::select! {
                            () = pump(cr, sw, shared.clone(), false) => {}
                            () = pump(sr, cw, shared, true) => {}
                        }
                    });
                }
            }
        });
        Self { addr, shared, task }
    }

    /// `https://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.addr.port())
    }

    /// Sets the fault for all traffic from now on.
    pub fn set(&self, fault: Fault) {
        *self
            .shared
            .fault
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(fault);
    }

    /// Drops the next `n` chunks the server sends and closes their connections.
    pub fn cut_next_responses(&self, n: u32) {
        self.shared.cut.store(n, Ordering::SeqCst);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.shared.connections.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` → `to` applying the current fault; returns when either side closes or
/// the fault closes the connection. `from_server`: the server-to-client direction.
async fn pump(
    mut from: OwnedReadHalf,
    mut to: OwnedWriteHalf,
    shared: Arc<Shared>,
    from_server: bool,
) {
    let mut buf = vec![0u8; 16 * 1024];
    let mut forwarded = 0usize;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut chunk = &buf[..n];
        match shared.fault() {
            Fault::None => {}
            Fault::Blackhole => continue,
            Fault::Delay(d) => tokio::time::sleep(d).await,
            Fault::Truncate(limit) if from_server => {
                let room = limit.saturating_sub(forwarded);
                if room == 0 {
                    return;
                }
                chunk = &chunk[..chunk.len().min(room)];
            }
            Fault::Truncate(_) => {}
        }
        if from_server
            && shared
                .cut
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| c.checked_sub(1))
                .is_ok()
        {
            return;
        }
        if to.write_all(chunk).await.is_err() {
            return;
        }
        forwarded += chunk.len();
        if from_server && matches!(shared.fault(), Fault::Truncate(limit) if forwarded >= limit) {
            return;
        }
    }
}
