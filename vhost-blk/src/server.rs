//! Serving one disk on its vhost-user socket, one frontend after another.

use std::sync::Arc;

use log::{info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::BlkBackend;
use crate::config::DiskConfig;
use crate::disk::{Disk, DiskError};
use crate::engine::EngineError;

/// Why a disk could not be served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The image could not be opened.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The socket could not be created.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The socket path.
        path: String,
        /// The underlying error.
        #[source]
        source: vhost::vhost_user::Error,
    },
    /// The io_uring engines could not be created.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// The vhost-user daemon failed to start or to register its events.
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
}

/// Opens the disk, listens on its socket and serves frontends until the process ends.
/// A frontend that disconnects (or breaks the protocol) is logged; the next one is
/// accepted on the same socket with fresh queue state.
pub fn serve(cfg: &DiskConfig) -> Result<(), ServeError> {
    let disk = Arc::new(Disk::open(cfg)?);
    let path = cfg.socket.display().to_string();
    let mut listener = Listener::new(&cfg.socket, true).map_err(|source| ServeError::Listen {
        path: path.clone(),
        source,
    })?;
    info!(
        "serving {} ({} sectors{}) on {path}",
        cfg.image.display(),
        disk.sectors(),
        if disk.read_only { ", read-only" } else { "" }
    );
    loop {
        serve_one(cfg, &disk, &mut listener, &path)?;
    }
}

/// Accepts one frontend and serves it until it goes away.
fn serve_one(
    cfg: &DiskConfig,
    disk: &Arc<Disk>,
    listener: &mut Listener,
    path: &str,
) -> Result<(), ServeError> {
    let backend = Arc::new(BlkBackend::new(disk.clone(), cfg)?);
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut daemon = VhostUserDaemon::new(format!("keel-blk:{path}"), backend.clone(), mem)
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
    for (i, handler) in daemon.get_epoll_handlers().iter().enumerate() {
        if let Some((fd, id)) = backend.completion_event(i) {
            handler
                .register_listener(fd, EventSet::IN, id)
                .map_err(|e| ServeError::Daemon(format!("register completion eventfd: {e}")))?;
        }
    }
    daemon
        .start(listener)
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
    info!("{path}: frontend connected");
    match daemon.wait() {
        Ok(()) => info!("{path}: frontend disconnected"),
        Err(e) => warn!("{path}: frontend connection ended: {e}"),
    }
    for handler in daemon.get_epoll_handlers() {
        handler.send_exit_event();
    }
    // Dropping the daemon joins the queue threads; dropping the backend drains the rings.
    drop(daemon);
    Ok(())
}
