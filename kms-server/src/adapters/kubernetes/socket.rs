//! The plugin's unix socket: bound under a temporary name, given mode 0600 and its owner,
//! then renamed into place (the final path never exists with looser rights); every
//! connection's peer credentials checked (root, the socket's owner, or the server's own
//! user); HTTP/2 only (gRPC), a bounded number of connections and streams.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::UnixListener;

use super::Plugin;
use crate::base::event::AlertKind;
use crate::security::alert::AlertEvent;

/// Connections served at once on one socket (the API servers of a control plane node).
pub const MAX_CONNECTIONS: usize = 64;
/// Streams (calls) at once on one connection.
pub const MAX_STREAMS: u32 = 128;
/// How long stopping waits for calls in flight.
const DRAIN: Duration = Duration::from_secs(5);

/// Binds `plugin`'s socket: a stale socket at the path is replaced, anything else there
/// is an error.
pub fn bind(plugin: &Plugin) -> std::io::Result<UnixListener> {
    let s = plugin.settings();
    let path = &s.socket;
    match std::fs::symlink_metadata(path) {
        Ok(m) if std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()) => {
            std::fs::remove_file(path)?
        }
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let temporary = dir.join(format!(".keyhold-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&temporary);
    let listener = UnixListener::bind(&temporary)?;
    let placed = (|| {
        std::fs::set_permissions(&temporary, std::fs::Permissions::from_mode(0o600))?;
        if s.owner.is_some() || s.group.is_some() {
            std::os::unix::fs::chown(&temporary, s.owner, s.group)?;
        }
        std::fs::rename(&temporary, path)
    })();
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&temporary);
        return Err(e);
    }
    Ok(listener)
}

/// Serves `listener` until `stop` is set; then removes the socket file.
pub async fn serve(
    listener: UnixListener,
    plugin: Arc<Plugin>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let own = rustix::process::geteuid().as_raw();
    let owner = plugin.settings().owner.unwrap_or(own);
    let (closing, closing_rx) = tokio::sync::watch::channel(false);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "kubernetes plugin: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = async { let _ = stop.wait_for(|s| *s).await; } => break,
        };
        let uid = stream.peer_cred().map(|c| c.uid()).ok();
        if !uid.is_some_and(|u| u == 0 || u == owner || u == own) {
            let who = uid.map_or_else(|| "unknown uid".to_owned(), |u| format!("uid {u}"));
            tracing::warn!(peer = %who, socket = %plugin.settings().socket.display(), "kubernetes plugin: connection refused");
            plugin.alert(AlertEvent::new(
                AlertKind::Denied,
                Some(&who),
                format!(
                    "Kubernetes KMS socket {}: a process of {who} connected",
                    plugin.settings().socket.display()
                ),
            ));
            continue;
        }
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            tracing::warn!("kubernetes plugin: connection refused: {MAX_CONNECTIONS} are open");
            continue;
        };
        let plugin = plugin.clone();
        let mut closing = closing_rx.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let mut http = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            http.timer(TokioTimer::new())
                .max_concurrent_streams(MAX_STREAMS)
                .max_header_list_size(16 * 1024)
                .keep_alive_interval(Some(Duration::from_secs(30)))
                .keep_alive_timeout(Duration::from_secs(10));
            let service =
                hyper::service::service_fn(move |req| super::pb::route(plugin.clone(), req));
            let conn = http.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r {
                    tracing::debug!(error = %e, "kubernetes plugin: connection ended");
                },
                () = async { let _ = closing.wait_for(|c| *c).await; } => {
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(DRAIN, conn).await;
                }
            }
        });
    }
    let path = plugin.settings().socket.clone();
    drop(listener);
    let _ = std::fs::remove_file(&path);
    let _ = closing.send(true);
    drop(closing_rx);
    let _ = tokio::time::timeout(DRAIN, closing.closed()).await;
}
