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

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};

use crate::transport::request_body::{BodyProgress, RequestBody};

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
        Box::pin(tokio_rustls::TlsAcceptor::from((self.0)()).accept(tcp))
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

/// The connections open per source.
struct Sources {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place in its source's share; given back on drop.
struct SourceGuard {
    sources: Arc<Sources>,
    key: IpAddr,
}

impl Sources {
    /// The key a source is counted under: the IPv4 address (an IPv4-mapped IPv6 address
    /// counts as its IPv4 address), or the IPv6 /64 (one host usually holds a whole /64).
    fn key(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => {
                    let bits = u128::from(v6) & !((1u128 << 64) - 1);
                    IpAddr::V6(bits.into())
                }
            },
        }
    }

    fn admit(self: &Arc<Self>, ip: IpAddr) -> Option<SourceGuard> {
        let key = Self::key(ip);
        if self.max > 0 {
            let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
            let n = open.entry(key).or_insert(0);
            if *n >= self.max {
                return None;
            }
            *n += 1;
        }
        Some(SourceGuard {
            sources: self.clone(),
            key,
        })
    }
}

impl Drop for SourceGuard {
    fn drop(&mut self) {
        if self.sources.max == 0 {
            return;
        }
        let mut open = self
            .sources
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

/// The handshakes in progress, oldest first, each with the means to stop it.
#[derive(Default)]
struct Handshaking {
    queue: Mutex<std::collections::VecDeque<(Instant, tokio::sync::oneshot::Sender<Handover>)>>,
}

impl Handshaking {
    /// Registers a handshake starting now; when it is evicted, the receiver yields where
    /// to hand its permit over.
    fn register(&self, limit: usize) -> tokio::sync::oneshot::Receiver<Handover> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        // Finished handshakes (receiver gone) leave from the front; if an old one still
        // in progress holds the front, the rest are swept once the queue grows.
        while q.front().is_some_and(|(_, t)| t.is_closed()) {
            q.pop_front();
        }
        if q.len() > 4 * limit.max(16) {
            q.retain(|(_, t)| !t.is_closed());
        }
        q.push_back((Instant::now(), tx));
        rx
    }

    /// Stops the oldest handshake in progress for at least `age`; its permit comes
    /// through the returned receiver (directly: no other connection can take it first).
    fn evict_oldest(&self, age: Duration) -> Option<tokio::sync::oneshot::Receiver<Permit>> {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        while let Some((since, _)) = q.front() {
            if since.elapsed() < age {
                return None;
            }
            if let Some((_, stop)) = q.pop_front() {
                let (handover, freed) = tokio::sync::oneshot::channel();
                if stop.send(handover).is_ok() {
                    return Some(freed);
                }
            }
        }
        None
    }
}

/// A connection's place in the handshake budget.
enum Budget {
    /// Plain TCP: no handshake.
    None,
    /// Held.
    Held(Permit),
    /// Being handed over by an evicted handshake (within [`EVICT_WAIT`]).
    Freed(tokio::sync::oneshot::Receiver<Permit>),
    /// None free and none old enough to evict: waits (holding a place in the bounded
    /// waiting room) for a permit or for the oldest handshake to become evictable, until
    /// its handshake deadline.
    Waiting(Permit),
}

/// When a connection last had a request in flight.
struct Activity {
    started: Instant,
    in_flight: AtomicUsize,
    /// Milliseconds from `started` to the end of the last request.
    last_ms: AtomicU64,
}

/// One request in flight; its end is the connection's last activity.
struct InFlight(Arc<Activity>);

impl Activity {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            started: Instant::now(),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        })
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// How long the connection has had no request in flight (zero while one is).
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        let last = Duration::from_millis(self.last_ms.load(Ordering::Acquire));
        self.started.elapsed().saturating_sub(last)
    }
}

impl Activity {
    /// How long the connection has held its slot for nothing: idle, or with every request
    /// in flight waiting on a stalled body (zero otherwise).
    fn unused_for(&self, bodies: &BodyProgress) -> Duration {
        let n = self.in_flight.load(Ordering::Acquire);
        if n == 0 {
            self.idle_for()
        } else if bodies.waiting() >= n {
            bodies.stalled_for()
        } else {
            Duration::ZERO
        }
    }
}

/// The established connections, each with the means to close it when a slot is needed.
#[derive(Default)]
struct Established {
    open: Mutex<HashMap<u64, Holder>>,
    next: AtomicU64,
}

/// One established connection, as [`Established`] sees it.
struct Holder {
    activity: Arc<Activity>,
    bodies: Arc<BodyProgress>,
    evict: tokio::sync::oneshot::Sender<Handover>,
}

/// A connection's entry in [`Established`], removed when it ends.
struct Registration(Arc<Established>, u64);

impl Drop for Registration {
    fn drop(&mut self) {
        self.0
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.1);
    }
}

impl Established {
    /// Registers a connection; when it is evicted, the receiver yields where to hand its
    /// slot over.
    fn register(
        self: &Arc<Self>,
        activity: Arc<Activity>,
        bodies: Arc<BodyProgress>,
    ) -> (Registration, tokio::sync::oneshot::Receiver<Handover>) {
        let (evict, rx) = tokio::sync::oneshot::channel();
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        self.open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(
                id,
                Holder {
                    activity,
                    bodies,
                    evict,
                },
            );
        (Registration(self.clone(), id), rx)
    }

    /// Closes the connection that has held its slot for nothing the longest, at least
    /// `age`; its slot comes through the returned receiver (directly: no other connection
    /// can take it first).
    fn evict(&self, age: Duration) -> Option<tokio::sync::oneshot::Receiver<Permit>> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let (id, _) = open
            .iter()
            .map(|(id, h)| (*id, h.activity.unused_for(&h.bodies)))
            .filter(|(_, unused)| *unused >= age)
            .max_by_key(|(_, unused)| *unused)?;
        let holder = open.remove(&id)?;
        let (handover, freed) = tokio::sync::oneshot::channel();
        holder.evict.send(handover).ok()?;
        Some(freed)
    }

    /// A connection slot: a free one, else one handed over by the connection that has held
    /// its slot for nothing the longest (once it has for [`EVICT_SLOT_AFTER`]), else the
    /// first given back.
    async fn take_slot(&self, slots: &Arc<tokio::sync::Semaphore>) -> Result<Permit, String> {
        loop {
            if let Ok(p) = slots.clone().try_acquire_owned() {
                return Ok(p);
            }
            if let Some(freed) = self.evict(EVICT_SLOT_AFTER) {
                if let Ok(Ok(p)) = tokio::time::timeout(EVICT_WAIT, freed).await {
                    return Ok(p);
                }
                continue;
            }
            tokio::select! {
                p = slots.clone().acquire_owned() => {
                    return p.map_err(|_| "the listener stopped".to_string());
                }
                () = tokio::time::sleep(EVICT_SLOT_AFTER / 4) => {}
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = u64::try_from(self.0.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last_ms.fetch_max(now, Ordering::AcqRel);
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The HTTP settings every listener shares, with `limits`' header timeout.
pub fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut http = auto::Builder::new(TokioExecutor::new());
    http.http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .max_buf_size(64 * 1024);
    http.http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .max_concurrent_streams(256)
        .max_header_list_size(64 * 1024)
        .keep_alive_interval(Duration::from_secs(30))
        .keep_alive_timeout(Duration::from_secs(20));
    http
}

/// Accepts connections on `listener` until `stop` completes, serving each with the
/// service `make` builds from the finished handshake, within `limits` (see the module
/// documentation); then stops accepting (the listener is dropped, so new connections are
/// refused at once and clients move to another node) and drains the open connections for
/// up to [`DRAIN`].
pub async fn serve<H, M, S, B>(
    listener: TcpListener,
    handshake: H,
    limits: Limits,
    stop: impl Future<Output = ()>,
    make: M,
) where
    H: Handshake,
    M: Fn(&H::Io) -> S + Send + Sync + 'static,
    S: hyper::service::Service<hyper::Request<RequestBody>, Response = hyper::Response<B>>
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let http = Arc::new(http_builder(&limits));
    let handshake = Arc::new(handshake);
    let make = Arc::new(make);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(limits.max_handshakes));
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let sources = Arc::new(Sources {
        max: limits.per_source,
        open: Mutex::new(HashMap::new()),
    });
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
            http: http.clone(),
            slots: slots.clone(),
            stop: stop_rx.clone(),
            handshakes: handshakes.clone(),
            handshaking: handshaking.clone(),
            established: established.clone(),
        };
        let (handshake, make) = (handshake.clone(), make.clone());
        tokio::spawn(async move {
            let _source = source;
            conn.run(stream, budget, &*handshake, &*make).await;
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
    http: Arc<auto::Builder<TokioExecutor>>,
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
            let io = handshake.handshake(tcp).await.map_err(|e| e.to_string())?;
            let slot = open.take_slot(&slots).await?;
            Ok::<_, String>((io, slot))
        };
        let established = tokio::select! {
            r = tokio::time::timeout_at(deadline, established) => match r {
                Ok(Ok(done)) => done,
                Ok(Err(e)) => {
                    tracing::info!(%peer, error = %e, "TLS handshake refused");
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

    async fn run<H, M, S, B>(mut self, tcp: TcpStream, budget: Budget, handshake: &H, make: &M)
    where
        H: Handshake,
        M: Fn(&H::Io) -> S,
        S: hyper::service::Service<hyper::Request<RequestBody>, Response = hyper::Response<B>>
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
        S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
        B: hyper::body::Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let peer = self.peer;
        let Some((io, slot)) = self.establish(tcp, budget, handshake).await else {
            return;
        };
        let revocation = handshake.revocation(&io);
        let (revoked, mut reloads) = match revocation {
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
        let svc = Arc::new(make(&io));
        let body_timeout = self.limits.body_timeout;
        let tracked = activity.clone();
        let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
            let in_flight = tracked.begin();
            let watched = bodies.clone();
            let answer = hyper::service::Service::call(
                &*svc,
                req.map(|body| RequestBody::new(body, body_timeout).watched(watched)),
            );
            async move {
                let answer = answer.await;
                drop(in_flight);
                answer
            }
        });
        let conn = self
            .http
            .serve_connection_with_upgrades(TokioIo::new(io), svc)
            .into_owned();
        // The connection runs in a task of its own that polls nothing else: a task is
        // polled whole on every wake-up, and what the watching task below waits on (the
        // stop signal, CRL reloads: channels every connection shares, whose waiting
        // futures take a shared lock when polled) would otherwise be polled on every read
        // and write. It hears a request to close gracefully through `signal`, which costs
        // it one atomic load per poll.
        let signal = Arc::new(CloseSignal::default());
        let heard = signal.clone();
        let mut served = tokio::spawn(async move {
            let mut conn = std::pin::pin!(conn);
            let mut registered: Option<std::task::Waker> = None;
            let mut shutting = false;
            let r = std::future::poll_fn(|cx| {
                if !shutting {
                    if registered.as_ref().is_none_or(|w| !w.will_wake(cx.waker())) {
                        heard.register(cx.waker());
                        registered = Some(cx.waker().clone());
                    }
                    if heard.asked.load(Ordering::Acquire) {
                        shutting = true;
                        conn.as_mut().graceful_shutdown();
                    }
                }
                conn.as_mut().poll(cx)
            })
            .await;
            if let Err(e) = r {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
        let idle = self.limits.idle_timeout;
        let mut tick = tokio::time::interval((idle / 4).max(Duration::from_millis(100)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut closing: Option<tokio::time::Instant> = None;
        // Asks for a graceful close; the connection is dropped if still open at the
        // returned deadline.
        let close = |why: &str| {
            tracing::debug!(%peer, "{why}");
            signal.ask();
            Some(tokio::time::Instant::now() + CLOSE_GRACE)
        };
        loop {
            tokio::select! {
                _ = &mut served => return,
                handover = &mut evicted => {
                    tracing::debug!(%peer, "connection closed: every slot was taken and it held its slot for nothing the longest");
                    served.abort();
                    let _ = (&mut served).await;
                    let _ = handover.send(slot);
                    return;
                }
                () = async { let _ = self.stop.wait_for(|s| *s).await; }, if closing.is_none() => closing = close("closing: the server stops"),
                // A certificate revoked since the handshake: the connection is shut down
                // (its requests meanwhile are refused by the service).
                Ok(()) = async { match reloads.as_mut() { Some(r) => r.changed().await, None => std::future::pending().await } }, if closing.is_none() => {
                    if revoked.as_ref().is_some_and(|r| r()) {
                        tracing::info!(%peer, "connection closed: its client certificate was revoked");
                        closing = close("closing: revoked");
                    }
                }
                _ = tick.tick() => match closing {
                    Some(at) if tokio::time::Instant::now() >= at => {
                        tracing::debug!(%peer, "connection dropped: it did not close in time");
                        served.abort();
                        return;
                    }
                    Some(_) => {}
                    // The CRLs in force went out of date since the last reload.
                    None if revoked.as_ref().is_some_and(|r| r()) => {
                        tracing::info!(%peer, "connection closed: its client certificate can no longer be checked against a current CRL");
                        closing = close("closing: no current CRL");
                    }
                    None if activity.idle_for() >= idle => closing = close("idle connection closed"),
                    None => {}
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_counted_per_ipv4_address_and_ipv6_64() {
        let s = Arc::new(Sources {
            max: 2,
            open: Mutex::new(HashMap::new()),
        });
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let g1 = s.admit(a).unwrap();
        let g2 = s.admit("::ffff:192.0.2.1".parse().unwrap()).unwrap();
        assert!(s.admit(a).is_none(), "a third from one address");
        assert!(s.admit("192.0.2.2".parse().unwrap()).is_some());
        drop(g1);
        assert!(s.admit(a).is_some(), "a place given back is free again");
        drop(g2);
        let v6 = |t: &str| -> IpAddr { t.parse().unwrap() };
        let _h1 = s.admit(v6("2001:db8::1")).unwrap();
        let _h2 = s.admit(v6("2001:db8::ffff:2")).unwrap();
        assert!(
            s.admit(v6("2001:db8::3")).is_none(),
            "one /64 is one source"
        );
        assert!(s.admit(v6("2001:db8:0:1::1")).is_some());
    }

    #[test]
    fn the_source_table_forgets_sources_with_nothing_open() {
        let s = Arc::new(Sources {
            max: 8,
            open: Mutex::new(HashMap::new()),
        });
        for i in 0..=255u8 {
            drop(s.admit(IpAddr::from([10, 0, 0, i])).unwrap());
        }
        assert!(s.open.lock().unwrap().is_empty());
    }
}
