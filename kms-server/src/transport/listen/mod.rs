//! How every listener (the mTLS API, the public and XKS listeners, the plain-HTTP ops
//! listener) accepts connections, and what a hostile network can hold of it.
//!
//! ```text
//! accept ─► per-source share ─► handshake budget ─► TLS handshake ─► connection slot ─► HTTP
//!           (refused past it)    (refused past it)   (timed out)       (waits ≤ handshake
//!                                                                       timeout, else closed)
//! ```
//!
//! - **Accepting never waits.** A connection past its source's share
//!   ([`Limits::per_source`], counted per IPv4 address or IPv6 /64, over connections in
//!   handshake and established) is closed at once. When the handshake budget
//!   ([`Limits::max_handshakes`]) is spent, the oldest handshake still in progress (older
//!   than [`EVICT_AFTER`]: a real client's handshake takes milliseconds) is dropped to
//!   make room (it hands its permit straight to the newcomer), so connections that never
//!   finish their handshake, from however many sources, cannot keep a new client out.
//!   With none that old yet, the newcomer waits, within its handshake deadline, in a
//!   waiting room as large as the budget; past that room it is closed. A source holding thousands of idle TCP connections thus holds its
//!   share, not the listener: before, a permit was taken before the handshake, so 4 096
//!   idle connections held every slot until their handshakes timed out.
//! - **A connection slot is taken after the handshake** ([`Limits::max_connections`]).
//!   When none is free, the established connection that has held its slot for nothing the
//!   longest — no request in flight, or every request in flight waiting on a body that
//!   sends nothing — for at least [`EVICT_SLOT_AFTER`] is closed and hands its slot
//!   straight to the newcomer; with none such, the newcomer waits for a slot within its
//!   handshake deadline. So connections that hold slots without using them, from however
//!   many sources, cannot keep a new client out; only connections doing work can.
//! - **Every phase has a deadline**: the handshake ([`Limits::handshake_timeout`]), the
//!   request headers ([`Limits::header_timeout`], HTTP/1.1), the request body
//!   ([`crate::transport::request_body`], on every listener), and idleness: a connection with no
//!   request in flight for [`Limits::idle_timeout`] is shut down gracefully (HTTP/2 gets a
//!   GOAWAY; HTTP/2 pings alone no longer keep a connection), and a connection still open
//!   [`CLOSE_GRACE`] after that is dropped.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use crate::transport::request_body::BodyProgress;

mod http;
mod slots;
pub use http::Http;
pub use slots::InFlight;
use slots::{Activity, Budget, Established, Handshaking, Sources};

/// Longest a connection may take to close after it was asked to (idle, or the server
/// stopping) before it is dropped.
pub const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// A handshake in progress for longer than this is dropped when a new connection needs
/// its place in the handshake budget.
pub const EVICT_AFTER: Duration = Duration::from_millis(500);

/// How long a connection that evicted an old handshake waits for the place it freed (the
/// evicted one hands it over directly).
const EVICT_WAIT: Duration = Duration::from_secs(5);

/// A handshake budget permit.
type Permit = tokio::sync::OwnedSemaphorePermit;
/// Where an evicted handshake hands its permit over.
type Handover = tokio::sync::oneshot::Sender<Permit>;

/// When every connection slot is taken, an established connection that has held its slot
/// for nothing this long (no request in flight, or every request in flight waiting on a
/// body that sends nothing) is closed to make room.
pub const EVICT_SLOT_AFTER: Duration = Duration::from_secs(1);

/// How long a stopping listener waits for its connections to finish.
pub const DRAIN: Duration = Duration::from_secs(10);

/// What one listener lets a network hold.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Established connections served at once.
    pub max_connections: usize,
    /// TLS handshakes in progress at once.
    pub max_handshakes: usize,
    /// Connections (in handshake or established) from one source address (IPv4) or /64
    /// (IPv6); 0: no per-source bound.
    pub per_source: usize,
    /// Deadline of the TLS handshake.
    pub handshake_timeout: Duration,
    /// Deadline for an HTTP/1.1 request's headers.
    pub header_timeout: Duration,
    /// Deadline for a request's body, from its headers.
    pub body_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
}

/// Why an accepted connection was not established.
#[derive(Debug, thiserror::Error)]
enum EstablishError {
    #[error("handshake refused: {0}")]
    Handshake(#[source] std::io::Error),
    #[error("the listener stopped")]
    Stopped,
}

/// What turns an accepted TCP connection into the stream HTTP is served on.
pub trait Handshake: Send + Sync + 'static {
    /// The stream after the handshake.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Runs the handshake (the caller bounds it in time).
    fn handshake(
        &self,
        tcp: TcpStream,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Self::Io>> + Send + 'static>>;

    /// Whether a handshake is needed at all (plain HTTP takes no handshake budget).
    fn needs_budget(&self) -> bool {
        true
    }

    /// For an established connection, what says whether its peer's certificate has been
    /// revoked since the handshake; `None`: nothing to watch.
    fn revocation(&self, _io: &Self::Io) -> Option<Revocation> {
        None
    }
}

/// Whether a connection's peer certificate is revoked now, and when to ask again.
pub struct Revocation {
    /// Revoked now (or the revocation lists in force are out of date).
    pub revoked: Box<dyn Fn() -> bool + Send + Sync>,
    /// Changes when the revocation lists are reloaded.
    pub reloads: tokio::sync::watch::Receiver<u64>,
}

/// What tells which client certificates are revoked (the listener's CRLs).
pub trait Revoker: Send + Sync + 'static {
    /// The connection's leaf certificate is revoked, or its CRLs are out of date.
    fn revoked(&self, leaf: &[u8]) -> Box<dyn Fn() -> bool + Send + Sync>;
    /// Changes on every reload of the CRLs.
    fn reloads(&self) -> tokio::sync::watch::Receiver<u64>;
}

/// TLS, with the server configuration in force when each connection arrives (the XKS
/// listener's is reloaded on SIGHUP), and the CRLs that revoke client certificates of
/// established connections, if any.
pub struct Tls<F>(pub F, pub Option<Arc<dyn Revoker>>);

impl<F> Handshake for Tls<F>
where
    F: Fn() -> Arc<rustls::ServerConfig> + Send + Sync + 'static,
{
    type Io = tokio_rustls::server::TlsStream<TcpStream>;

    fn handshake(
        &self,
        tcp: TcpStream,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<Self::Io>> + Send + 'static>> {
        let accept = tokio_rustls::TlsAcceptor::from((self.0)())
            .accept(tcp)
            .into_fallible();
        Box::pin(async move {
            match accept.await {
                Ok(tls) => Ok(tls),
                Err((e, tcp)) => {
                    close_after_refusal(tcp).await;
                    Err(e)
                }
            }
        })
    }

    fn revocation(&self, io: &Self::Io) -> Option<Revocation> {
        let revoker = self.1.as_ref()?;
        let leaf = io.get_ref().1.peer_certificates()?.first()?;
        Some(Revocation {
            revoked: revoker.revoked(leaf),
            reloads: revoker.reloads(),
        })
    }
}

/// How long a refused handshake's socket stays open to read what the client still sends.
const REFUSAL_LINGER: Duration = Duration::from_millis(250);

/// Closes a connection whose handshake was refused, so that the client reads the alert
/// rustls wrote (which says why: an unknown CA, a subject not allowed, no certificate).
/// A TLS 1.3 client sends its first request right after its certificate, before it can
/// read the verdict; closing the socket with those bytes unread makes the kernel answer
/// with a reset, and the client reports "connection reset" instead of the alert. So: end
/// the write side after the alert, and read (and drop) what arrives for a moment first.
async fn close_after_refusal(mut tcp: TcpStream) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let _ = tcp.shutdown().await;
    let mut buf = [0u8; 4096];
    let _ = tokio::time::timeout(REFUSAL_LINGER, async {
        let mut total = 0usize;
        while total < 64 * 1024 {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

/// Plain TCP (the ops listener: loopback or a private network, no key material).
pub struct Plain;

impl Handshake for Plain {
    type Io = TcpStream;

    fn handshake(
        &self,
        tcp: TcpStream,
    ) -> Pin<Box<dyn Future<Output = std::io::Result<TcpStream>> + Send + 'static>> {
        Box::pin(std::future::ready(Ok(tcp)))
    }

    fn needs_budget(&self) -> bool {
        false
    }
}

/// What an established connection speaks: HTTP ([`Http`]) or another protocol (KMIP).
pub trait Protocol<Io>: Send + Sync + 'static {
    /// Serves `io` until the peer closes it or the listener asks it to close
    /// ([`Served::closing`]: finish the request in flight, take no more). Each request is
    /// [`Served::begin`]'s guard for as long as it is worked on: a connection with none
    /// is idle (closed at the idle deadline, evicted first when slots run out).
    fn serve(&self, io: Io, conn: Served) -> Pin<Box<dyn Future<Output = ()> + Send + 'static>>;
}

/// What the listener and a protocol serving one connection tell each other.
pub struct Served {
    peer: SocketAddr,
    activity: Arc<Activity>,
    bodies: Arc<BodyProgress>,
    signal: Arc<CloseSignal>,
}

impl Served {
    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// A request in flight until the guard is dropped.
    pub fn begin(&self) -> InFlight {
        self.activity.begin()
    }

    /// Completes when the listener asks the connection to close (the server stopping, the
    /// peer's certificate revoked, idle). Only the serving task waits on it; it is cheap to
    /// poll (one atomic load), unlike the channels every connection shares, which the
    /// connection's watch waits on instead.
    pub fn closing(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(|cx| {
            self.signal.register(cx.waker());
            if self.signal.asked.load(Ordering::Acquire) {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
    }
}

/// Accepts connections on `listener` until `stop` completes, serving each with `protocol`
/// once its handshake is done, within `limits` (see the module documentation); then stops
/// accepting (the listener is dropped, so new connections are refused at once and clients
/// move to another node) and drains the open connections for up to [`DRAIN`].
pub async fn serve<H, P>(
    listener: TcpListener,
    handshake: H,
    limits: Limits,
    stop: impl Future<Output = ()>,
    protocol: P,
) where
    H: Handshake,
    P: Protocol<H::Io>,
{
    let handshake = Arc::new(handshake);
    let protocol = Arc::new(protocol);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(limits.max_handshakes));
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let sources = Arc::new(Sources::new(limits.per_source));
    let handshaking = Arc::new(Handshaking::default());
    let established = Arc::new(Established::default());
    // Connections waiting for a place in the handshake budget, at most.
    let waiting = Arc::new(tokio::sync::Semaphore::new(limits.max_handshakes));
    // Every connection task holds a receiver: `closed()` tells when the last one ended.
    let (stopping, stop_rx) = tokio::sync::watch::channel(false);
    tokio::pin!(stop);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // Out of file descriptors and the like: back off briefly, keep serving.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut stop => break,
        };
        let Some(source) = sources.admit(peer.ip()) else {
            tracing::debug!(%peer, "connection refused: its source holds its share");
            continue;
        };
        let budget = if !handshake.needs_budget() {
            Budget::None
        } else if let Ok(p) = handshakes.clone().try_acquire_owned() {
            Budget::Held(p)
        } else if let Some(freed) = handshaking.evict_oldest(EVICT_AFTER) {
            tracing::debug!(%peer, "handshake budget spent: the oldest handshake was dropped");
            Budget::Freed(freed)
        } else if let Ok(place) = waiting.clone().try_acquire_owned() {
            Budget::Waiting(place)
        } else {
            tracing::debug!(%peer, "connection refused: the handshake budget and its waiting room are full");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = Connection {
            peer,
            limits,
            slots: slots.clone(),
            stop: stop_rx.clone(),
            handshakes: handshakes.clone(),
            handshaking: handshaking.clone(),
            established: established.clone(),
        };
        let (handshake, protocol) = (handshake.clone(), protocol.clone());
        tokio::spawn(async move {
            let _source = source;
            conn.run(stream, budget, &*handshake, &*protocol).await;
        });
    }
    drop(listener);
    drop(stop_rx);
    let _ = stopping.send(true);
    if tokio::time::timeout(DRAIN, stopping.closed())
        .await
        .is_err()
    {
        tracing::warn!(
            "connections still open after {} s; closing",
            DRAIN.as_secs()
        );
    }
}

/// A request to the task serving a connection to close it gracefully (requests in flight
/// finish; HTTP/2: GOAWAY); closing at once is aborting that task.
#[derive(Default)]
struct CloseSignal {
    asked: std::sync::atomic::AtomicBool,
    waker: Mutex<Option<std::task::Waker>>,
}

impl CloseSignal {
    /// Registers the serving task's waker (it checks `asked` after).
    fn register(&self, waker: &std::task::Waker) {
        *self.waker.lock().unwrap_or_else(PoisonError::into_inner) = Some(waker.clone());
    }

    /// Asks for the close and wakes the serving task.
    fn ask(&self) {
        self.asked.store(true, Ordering::Release);
        if let Some(w) = self
            .waker
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            w.wake();
        }
    }
}

/// One accepted connection.
struct Connection {
    peer: SocketAddr,
    limits: Limits,
    slots: Arc<tokio::sync::Semaphore>,
    stop: tokio::sync::watch::Receiver<bool>,
    handshakes: Arc<tokio::sync::Semaphore>,
    handshaking: Arc<Handshaking>,
    established: Arc<Established>,
}

impl Connection {
    /// A permit of the handshake budget for a connection that found it spent: a permit
    /// given back, or one handed over by the oldest handshake once it may be evicted;
    /// `None` at `deadline`.
    async fn wait_for_budget(&self, deadline: tokio::time::Instant) -> Option<Permit> {
        loop {
            tokio::select! {
                p = self.handshakes.clone().acquire_owned() => return p.ok(),
                () = tokio::time::sleep(EVICT_AFTER / 5) => {
                    if let Some(freed) = self.handshaking.evict_oldest(EVICT_AFTER) {
                        return tokio::time::timeout(EVICT_WAIT, freed).await.ok()?.ok();
                    }
                }
                () = tokio::time::sleep_until(deadline) => return None,
            }
        }
    }

    /// The handshake (within the budget, evicted when the oldest and the budget is
    /// spent), then a connection slot, both before the handshake deadline; `None` when
    /// either fails or the listener stops.
    async fn establish<H: Handshake>(
        &mut self,
        tcp: TcpStream,
        budget: Budget,
        handshake: &H,
    ) -> Option<(H::Io, Permit)> {
        let peer = self.peer;
        let deadline = tokio::time::Instant::now() + self.limits.handshake_timeout;
        let mut budget = match budget {
            Budget::Freed(freed) => match tokio::time::timeout(EVICT_WAIT, freed).await {
                Ok(Ok(p)) => Some(p),
                _ => return None,
            },
            Budget::Waiting(place) => {
                let Some(p) = self.wait_for_budget(deadline).await else {
                    tracing::debug!(%peer, "connection closed: no place in the handshake budget in time");
                    return None;
                };
                drop(place);
                Some(p)
            }
            Budget::Held(p) => Some(p),
            Budget::None => None,
        };
        // In the queue of handshakes in progress from the moment it holds a permit.
        let evicted = budget
            .as_ref()
            .map(|_| self.handshaking.register(self.limits.max_handshakes));
        let evicted = async move {
            match evicted {
                // Evicted: where to hand the permit over. A sender dropped without a word
                // (the listener stopping) stops nothing.
                Some(rx) => match rx.await {
                    Ok(handover) => handover,
                    Err(_) => std::future::pending().await,
                },
                None => std::future::pending().await,
            }
        };
        // The handshake, then a slot, both before the handshake deadline; the budget is
        // held until a slot is found.
        let (slots, open) = (self.slots.clone(), self.established.clone());
        let established = async move {
            let io = handshake
                .handshake(tcp)
                .await
                .map_err(EstablishError::Handshake)?;
            let slot = open
                .take_slot(&slots)
                .await
                .map_err(|_| EstablishError::Stopped)?;
            Ok::<_, EstablishError>((io, slot))
        };
        let established = tokio::select! {
            r = tokio::time::timeout_at(deadline, established) => match r {
                Ok(Ok(done)) => done,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "connection not established");
                    return None;
                }
                Err(_) => {
                    tracing::info!(%peer, "handshake (or a free connection slot) timed out");
                    return None;
                }
            },
            _ = self.stop.wait_for(|s| *s) => return None,
            handover = evicted => {
                tracing::debug!(%peer, "handshake dropped: the budget was spent and it was the oldest");
                if let Some(permit) = budget.take() {
                    let _ = handover.send(permit);
                }
                return None;
            }
        };
        drop(budget);
        Some(established)
    }

    async fn run<H, P>(mut self, tcp: TcpStream, budget: Budget, handshake: &H, protocol: &P)
    where
        H: Handshake,
        P: Protocol<H::Io>,
    {
        let peer = self.peer;
        let Some((io, slot)) = self.establish(tcp, budget, handshake).await else {
            return;
        };
        let revocation = handshake.revocation(&io);
        let (revoked, reloads) = match revocation {
            Some(r) => (Some(r.revoked), Some(r.reloads)),
            None => (None, None),
        };
        let activity = Activity::new();
        let bodies = Arc::new(BodyProgress::default());
        let (_registration, evicted) = self.established.register(activity.clone(), bodies.clone());
        // Evicted: where to hand the slot over (the sender only goes with a word).
        let evicted = async move {
            match evicted.await {
                Ok(handover) => handover,
                Err(_) => std::future::pending().await,
            }
        };
        tokio::pin!(evicted);
        let signal = Arc::new(CloseSignal::default());
        // The connection is served in a task of its own, which polls nothing else (see
        // `Served::closing`).
        let served = tokio::spawn(protocol.serve(
            io,
            Served {
                peer,
                activity: activity.clone(),
                bodies,
                signal: signal.clone(),
            },
        ));
        let watch = Watch {
            served,
            signal,
            slot,
            revoked,
            reloads,
            activity,
        };
        watch.run(&mut self, peer, evicted).await;
    }
}

/// An established connection's watch: closes it gracefully when the server stops, its
/// certificate is revoked or no longer checkable, or it is idle; drops it when it does not
/// close in time; hands its slot over when it is evicted.
struct Watch {
    served: tokio::task::JoinHandle<()>,
    signal: Arc<CloseSignal>,
    slot: Permit,
    revoked: Option<Box<dyn Fn() -> bool + Send + Sync>>,
    reloads: Option<tokio::sync::watch::Receiver<u64>>,
    activity: Arc<Activity>,
}

impl Watch {
    async fn run(
        mut self,
        conn: &mut Connection,
        peer: SocketAddr,
        evicted: impl Future<Output = Handover>,
    ) {
        tokio::pin!(evicted);
        let idle = conn.limits.idle_timeout;
        let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut closing: Option<tokio::time::Instant> = None;
        // Asks for a graceful close; the connection is dropped if still open at the
        // returned deadline.
        let close = |why: &str| {
            tracing::debug!(%peer, "{why}");
            self.signal.ask();
            Some(tokio::time::Instant::now() + CLOSE_GRACE)
        };
        loop {
            tokio::select! {
                _ = &mut self.served => return,
                handover = &mut evicted => {
                    tracing::debug!(%peer, "connection closed: every slot was taken and it held its slot for nothing the longest");
                    self.served.abort();
                    let _ = (&mut self.served).await;
                    let _ = handover.send(self.slot);
                    return;
                }
                () = async { let _ = conn.stop.wait_for(|s| *s).await; }, if closing.is_none() => closing = close("closing: the server stops"),
                // A certificate revoked since the handshake: the connection is shut down
                // (its requests meanwhile are refused by the service).
                Ok(()) = async { match self.reloads.as_mut() { Some(r) => r.changed().await, None => std::future::pending().await } }, if closing.is_none() => {
                    if self.revoked.as_ref().is_some_and(|r| r()) {
                        tracing::info!(%peer, "connection closed: its client certificate was revoked");
                        closing = close("closing: revoked");
                    }
                }
                _ = tick.tick() => match closing {
                    Some(at) if tokio::time::Instant::now() >= at => {
                        tracing::debug!(%peer, "connection dropped: it did not close in time");
                        self.served.abort();
                        return;
                    }
                    Some(_) => {}
                    // The CRLs in force went out of date since the last reload.
                    None if self.revoked.as_ref().is_some_and(|r| r()) => {
                        tracing::info!(%peer, "connection closed: its client certificate can no longer be checked against a current CRL");
                        closing = close("closing: no current CRL");
                    }
                    None if self.activity.idle_for() >= idle => closing = close("idle connection closed"),
                    None => {}
                },
            }
        }
    }
}
