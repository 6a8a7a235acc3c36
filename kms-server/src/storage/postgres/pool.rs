//! The PostgreSQL store's connections: a pool of threads, each owning one connection
//! (the synchronous driver runs its own runtime, which must not be entered from inside
//! tokio's), the LISTEN thread of the change feed, and TLS to the database.

use std::sync::mpsc;
use std::sync::{Arc, Mutex, PoisonError};

use super::{engine_err, msg_err, PgSettings, StoreError, CHANGES_CHANNEL};

type Job = Box<dyn FnOnce(&mut Option<Pooled>, &Connector) + Send>;

/// A pool thread's connection, and what says whether it may have died unnoticed.
struct Pooled {
    client: postgres::Client,
    /// [`Connector::breaks`] when this connection was last known good.
    breaks: u64,
    last_used: std::time::Instant,
}

/// A connection idle longer than this is checked (one round trip) before its next use:
/// a server restart, a failover or an idle timeout on the way may have closed it, and
/// the client library only finds out when it next writes to it.
const IDLE_CHECK: std::time::Duration = std::time::Duration::from_secs(10);

/// How long that check may take before the connection is given up for a new one.
const CHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

impl Pooled {
    /// Whether this connection may be used as it is. It is checked first when another
    /// connection of the pool broke (or could not be opened) since it was last known good
    /// (what one broke, say a database restart or outage, usually broke all), or when it
    /// sat idle for [`IDLE_CHECK`]. Otherwise, under load, no request pays a round trip.
    fn usable(&mut self, breaks: u64) -> bool {
        if self.client.is_closed() {
            return false;
        }
        // Reads, without waiting and without a round trip, what the server sent while
        // the connection sat in the pool: a server that ended the session (a restart, a
        // failover, `pg_terminate_backend`) said so before closing, and the connection is
        // found dead here rather than by a request's first statement.
        {
            use postgres::fallible_iterator::FallibleIterator as _;
            if self.client.notifications().iter().next().is_err() || self.client.is_closed() {
                return false;
            }
        }
        if self.breaks == breaks && self.last_used.elapsed() < IDLE_CHECK {
            return true;
        }
        let ok = self.client.is_valid(CHECK_TIMEOUT).is_ok();
        if ok {
            self.breaks = breaks;
        }
        ok
    }
}

/// Opens connections.
struct Connector {
    settings: PgSettings,
    tls: Option<tokio_postgres_rustls::MakeRustlsConnect>,
    /// How many times a connection of this pool broke or could not be opened.
    breaks: std::sync::atomic::AtomicU64,
}

impl Connector {
    fn breaks(&self) -> u64 {
        self.breaks.load(std::sync::atomic::Ordering::Acquire)
    }

    fn broke(&self) {
        self.breaks
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }

    /// Opens a connection for a pool thread.
    fn open_pooled(&self) -> Result<Pooled, StoreError> {
        // Read first: a break counted while this one opens makes it suspect, not trusted.
        let breaks = self.breaks();
        match self.connect() {
            Ok(client) => Ok(Pooled {
                client,
                breaks,
                last_used: std::time::Instant::now(),
            }),
            Err(e) => {
                self.broke();
                Err(e)
            }
        }
    }
}

impl Connector {
    fn connect(&self) -> Result<postgres::Client, StoreError> {
        let mut config: postgres::Config = self.settings.url.parse().map_err(engine_err)?;
        if let Some(p) = &self.settings.password_file {
            let pw =
                zeroize::Zeroizing::new(std::fs::read_to_string(p).map_err(|e| {
                    msg_err(format!("reading the password file {}: {e}", p.display()))
                })?);
            config.password(pw.trim_end_matches(['\n', '\r']));
        }
        config.application_name("keyhold");
        match &self.tls {
            Some(tls) => config.connect(tls.clone()).map_err(engine_err),
            None => config.connect(postgres::NoTls).map_err(engine_err),
        }
    }
}

/// A handle to the connection pool of a [`PgStore`], for the code that keeps tables of
/// its own beside the store's (the cluster's audit chain, the erasure keys).
#[derive(Clone)]
pub struct PgPool {
    inner: Arc<PoolThreads>,
}

/// The pool's connection threads and the channel that feeds them. Dropped with the last
/// [`PgPool`]: the channel closes and every thread is joined, so none outlives the pool.
/// Jobs run code beside the SQL (the erasure keys' PKCS#11 calls): a thread still
/// exiting while the process finalizes the token or exits would race the module's own
/// teardown (SoftHSM's exit-time destructors crashed with "double free" that way).
/// Every job has a caller waiting for its answer, so once the last handle is gone the
/// threads are idle and the joins return at once.
struct PoolThreads {
    jobs: Option<mpsc::Sender<Job>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Drop for PoolThreads {
    fn drop(&mut self) {
        self.jobs = None;
        let me = std::thread::current().id();
        for t in self.threads.drain(..) {
            // A job that held the last handle would be dropped on a pool thread; that
            // thread cannot join itself, and exits on its own once the job returns.
            if t.thread().id() != me {
                let _ = t.join();
            }
        }
    }
}

/// Tells the listener thread to stop (it checks every [`LISTEN_POLL`]) when its store is
/// dropped, closing its connection.
pub(super) struct StopListener(Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopListener {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

/// How often the listener thread checks for a stop between notifications.
const LISTEN_POLL: std::time::Duration = std::time::Duration::from_secs(1);

impl std::fmt::Debug for PgPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PgPool")
    }
}

/// LISTENs on the change channel on a connection of its own and counts notifications,
/// reconnecting after a failure; the change feed itself stays the truth (a notification
/// only says "read it now").
fn listen(
    connector: Arc<Connector>,
    notified: Arc<(Mutex<u64>, std::sync::Condvar)>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    let stopped = || stop.load(std::sync::atomic::Ordering::Relaxed);
    while !stopped() {
        let mut client = match connector.connect() {
            Ok(c) => c,
            Err(_) => {
                std::thread::sleep(std::time::Duration::from_millis(500));
                continue;
            }
        };
        if client
            .batch_execute(&format!("LISTEN {CHANGES_CHANNEL}"))
            .is_err()
        {
            std::thread::sleep(std::time::Duration::from_millis(500));
            continue;
        }
        while !stopped() {
            let got = {
                use postgres::fallible_iterator::FallibleIterator as _;
                let mut n = client.notifications();
                let mut it = n.timeout_iter(LISTEN_POLL);
                it.next()
            };
            match got {
                Ok(Some(_)) => {
                    let (count, cv) = &*notified;
                    *count.lock().unwrap_or_else(PoisonError::into_inner) += 1;
                    cv.notify_all();
                }
                // Idle: go on unless the connection died (the feed poll covers a gap).
                Ok(None) if !client.is_closed() => {}
                Ok(None) | Err(_) => break,
            }
        }
    }
}

fn is_loopback(config: &postgres::Config) -> bool {
    config.get_hosts().iter().all(|h| match h {
        postgres::config::Host::Tcp(name) => {
            name == "localhost"
                || name
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        }
        postgres::config::Host::Unix(_) => true,
    })
}

fn rustls_connector(
    ca: &std::path::Path,
) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in crate::base::pem::load_certs(ca).map_err(|e| msg_err(e.to_string()))? {
        roots
            .add(cert)
            .map_err(|e| msg_err(format!("{}: {e}", ca.display())))?;
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(engine_err)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

impl PgPool {
    /// Runs `f` on a pooled connection (opened if needed) and waits for its answer. A
    /// connection that broke is dropped, so the next call opens a new one.
    pub fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut postgres::Client) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let (reply, answer) = mpsc::sync_channel(1);
        let job: Job = Box::new(move |conn, connector| {
            if conn.as_mut().is_some_and(|c| !c.usable(connector.breaks())) {
                *conn = None;
                connector.broke();
            }
            let result = match conn {
                Some(c) => f(&mut c.client),
                None => match connector.open_pooled() {
                    Ok(c) => f(&mut conn.insert(c).client),
                    Err(e) => Err(e),
                },
            };
            match conn {
                Some(c) if c.client.is_closed() => {
                    *conn = None;
                    connector.broke();
                }
                Some(c) => c.last_used = std::time::Instant::now(),
                None => {}
            }
            let _ = reply.send(result);
        });
        self.inner
            .jobs
            .as_ref()
            .ok_or_else(|| msg_err("the connection pool has stopped"))?
            .send(job)
            .map_err(|_| msg_err("the connection pool has stopped"))?;
        answer
            .recv()
            .map_err(|_| msg_err("a connection thread stopped"))?
    }
}

/// What [`start`] starts for a store: the pool, and the LISTEN thread with the count of
/// notifications it signals.
pub(super) struct Started {
    pub(super) pool: PgPool,
    pub(super) threads: usize,
    pub(super) notified: Arc<(Mutex<u64>, std::sync::Condvar)>,
    pub(super) listener: Option<StopListener>,
}

/// Checks the connection settings (no password in the url; TLS unless on loopback) and
/// starts the pool's threads and, when `listen` is on, the LISTEN thread. Connections open
/// on first use.
pub(super) fn start(settings: &PgSettings) -> Result<Started, StoreError> {
    let parsed: postgres::Config = settings.url.parse().map_err(engine_err)?;
    if parsed.get_password().is_some() {
        return Err(msg_err(
            "the store url must not hold the password: use [store] password_file",
        ));
    }
    let tls = match &settings.tls_ca {
        Some(ca) => Some(rustls_connector(ca)?),
        None if is_loopback(&parsed) => None,
        None => {
            return Err(msg_err(
                "a database that is not on loopback needs TLS: set [store] tls_ca",
            ))
        }
    };
    let connector = Arc::new(Connector {
        settings: settings.clone(),
        tls,
        breaks: std::sync::atomic::AtomicU64::new(0),
    });
    let (tx, rx) = mpsc::channel::<Job>();
    let rx = Arc::new(Mutex::new(rx));
    let threads = settings.pool_size.max(1);
    // Made before the threads, so a failed spawn below still closes and joins the
    // ones already started.
    let mut pool = PoolThreads {
        jobs: Some(tx),
        threads: Vec::with_capacity(threads),
    };
    for i in 0..threads {
        let rx = rx.clone();
        let connector = connector.clone();
        let mut conn: Option<Pooled> = None;
        let thread = std::thread::Builder::new()
            .name(format!("keyhold-pg-{i}"))
            .spawn(move || loop {
                let job = match rx.lock().unwrap_or_else(PoisonError::into_inner).recv() {
                    Ok(job) => job,
                    Err(_) => return,
                };
                job(&mut conn, &connector);
            })
            .map_err(engine_err)?;
        pool.threads.push(thread);
    }
    let notified = Arc::new((Mutex::new(0u64), std::sync::Condvar::new()));
    let listener = if settings.listen {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (connector, notified, flag) = (connector.clone(), notified.clone(), stop.clone());
        std::thread::Builder::new()
            .name("keyhold-pg-listen".into())
            .spawn(move || listen(connector, notified, flag))
            .map_err(engine_err)?;
        Some(StopListener(stop))
    } else {
        None
    };
    Ok(Started {
        pool: PgPool {
            inner: Arc::new(pool),
        },
        threads,
        notified,
        listener,
    })
}
