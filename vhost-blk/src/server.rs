//! Serving one disk on its vhost-user socket, one frontend after another.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use keel_vhost_relay::{private_connection, Relay};
use log::{info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::VhostUserDaemon;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::BlkBackend;
use crate::config::DiskConfig;
use crate::disk::{Disk, DiskError};
use crate::engine::EngineError;
use crate::relay::Inflight;

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
    /// A frontend connection could not be accepted or relayed.
    #[error("{path}: {source}")]
    Connection {
        /// The socket path.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// Frontends connected across all disks of this process (for `STATUS=`).
static CONNECTED: AtomicUsize = AtomicUsize::new(0);

/// A disk whose image is open and whose socket is listening.
pub struct Export {
    cfg: DiskConfig,
    disk: Arc<Disk>,
    listener: Listener,
    path: String,
}

impl Export {
    /// Opens the image and listens on the socket, so frontends can connect as soon as
    /// this returns (before [`Export::serve`] runs).
    pub fn listen(cfg: &DiskConfig) -> Result<Export, ServeError> {
        let disk = Arc::new(Disk::open(cfg)?);
        let path = cfg.socket.display().to_string();
        let listener = Listener::new(&cfg.socket, true).map_err(|source| ServeError::Listen {
            path: path.clone(),
            source,
        })?;
        info!(
            "serving {} ({} sectors{}) on {path}",
            cfg.image.display(),
            disk.sectors(),
            if disk.read_only { ", read-only" } else { "" }
        );
        Ok(Export {
            cfg: cfg.clone(),
            disk,
            listener,
            path,
        })
    }

    /// The open disk (for a final flush at shutdown).
    pub fn disk(&self) -> Arc<Disk> {
        self.disk.clone()
    }

    /// Serves frontends until the process ends. A frontend that disconnects (or breaks
    /// the protocol) is logged; the next one is accepted with fresh queue state.
    pub fn serve(mut self) -> Result<(), ServeError> {
        let mut n = 0u64;
        loop {
            n += 1;
            self.serve_one(n)?;
        }
    }

    /// Accepts one frontend and serves it until it goes away.
    fn serve_one(&mut self, n: u64) -> Result<(), ServeError> {
        let conn_err = |source| ServeError::Connection {
            path: self.path.clone(),
            source,
        };
        let backend = Arc::new(BlkBackend::new(self.disk.clone(), &self.cfg)?);
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon =
            VhostUserDaemon::new(format!("keel-blk:{}", self.path), backend.clone(), mem)
                .map_err(|e| ServeError::Daemon(e.to_string()))?;
        for (i, handler) in daemon.get_epoll_handlers().iter().enumerate() {
            if let Some((fd, id)) = backend.completion_event(i) {
                handler
                    .register_listener(fd, EventSet::IN, id)
                    .map_err(|e| ServeError::Daemon(format!("register completion eventfd: {e}")))?;
            }
        }
        let frontend = loop {
            match self.listener.accept() {
                Ok(Some(s)) => break s,
                Ok(None) => continue,
                Err(e) => return Err(conn_err(std::io::Error::other(e.to_string()))),
            }
        };
        // The daemon gets its end of the connection through a private socket, and the
        // relay sits between it and the frontend (see `relay`).
        let (mut private, inner) = private_connection(&self.cfg.socket, n).map_err(conn_err)?;
        let started = daemon
            .start(&mut private)
            .map_err(|e| ServeError::Daemon(e.to_string()));
        drop(private);
        started?;
        let relay = Relay::start(frontend, inner, "blk", Inflight::new(backend.clone()))
            .map_err(conn_err)?;
        info!("{}: frontend connected", self.path);
        let now = CONNECTED.fetch_add(1, Ordering::Relaxed) + 1;
        crate::notify::status(&format!("{now} frontend(s) connected"));
        match daemon.wait() {
            // The frontend closing its socket (a VM that stopped) is the normal end.
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected,
            )) => info!("{}: frontend disconnected", self.path),
            Err(e) => warn!("{}: frontend connection ended: {e}", self.path),
        }
        for handler in daemon.get_epoll_handlers() {
            handler.send_exit_event();
        }
        // Dropping the daemon joins the queue threads; dropping the backend drains the
        // rings.
        drop(daemon);
        relay.join();
        let now = CONNECTED.fetch_sub(1, Ordering::Relaxed).saturating_sub(1);
        crate::notify::status(&format!("{now} frontend(s) connected"));
        Ok(())
    }
}

/// Opens, listens and serves one disk (for callers that need no readiness step).
pub fn serve(cfg: &DiskConfig) -> Result<(), ServeError> {
    Export::listen(cfg)?.serve()
}
