//! Serving the switch's ports: one thread per port accepts frontends on the port's
//! vhost-user socket, one after another, for as long as the port exists.

use std::collections::HashMap;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::Mutex;
use std::thread::JoinHandle;
use std::time::Duration;

use keel_vhost_relay::{private_connection, Relay};
use log::{info, warn};
use vhost::vhost_user::Listener;
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

use crate::backend::{PortBackend, ATTACH_EVENT, TX_BATCH};
use crate::config::PortConfig;
use crate::net::{TxBatch, HDR_LEN, MAX_CHAIN_LEN};
use crate::poller::PollGroups;
use crate::relay::Order;
use crate::switch::ForwardScratch;
use crate::switch::{lock, Port, Switch};
use crate::tap::Tap;

/// Why a port could not be added, removed or served.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The port configuration is invalid or clashes with another port.
    #[error("{0}")]
    Invalid(String),
    /// No port has that name.
    #[error("no port named {0:?}")]
    NotFound(String),
    /// The socket could not be created.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The socket path.
        path: String,
        /// The underlying error.
        #[source]
        source: vhost::vhost_user::Error,
    },
    /// The vhost-user daemon failed to start or to register its events.
    #[error("vhost-user daemon: {0}")]
    Daemon(String),
    /// A thread could not be started.
    #[error("cannot start a thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// How every port's frontends are served.
#[derive(Clone, Default)]
pub struct ServeOptions {
    /// Maximum virtqueue size.
    pub queue_size: u16,
    /// Busy-poll idle window; zero selects event mode.
    pub poll: Duration,
    /// Shared polling threads (busy-poll mode only); `None`: each queue pair's worker
    /// polls its own TX ring.
    pub groups: Option<Arc<PollGroups>>,
}

/// The running switch: its ports and their serving threads.
pub struct Server {
    switch: Arc<Switch>,
    options: ServeOptions,
    threads: Mutex<HashMap<u64, JoinHandle<()>>>,
}

impl Server {
    /// A server with no ports yet.
    pub fn new(switch: Arc<Switch>, options: ServeOptions) -> Arc<Server> {
        Arc::new(Server {
            switch,
            options,
            threads: Mutex::new(HashMap::new()),
        })
    }

    /// The switch.
    pub fn switch(&self) -> &Arc<Switch> {
        &self.switch
    }

    /// Adds a port: its socket is listening when this returns.
    pub fn add_port(&self, cfg: PortConfig) -> Result<Arc<Port>, ServeError> {
        cfg.validate().map_err(ServeError::Invalid)?;
        let port = self.switch.add_port(cfg).map_err(ServeError::Invalid)?;
        let path = port.cfg.socket.display().to_string();
        let listener = match Listener::new(&port.cfg.socket, true) {
            Ok(l) => l,
            Err(source) => {
                self.switch.remove_port(port.name());
                return Err(ServeError::Listen { path, source });
            }
        };
        let (switch, p, options) = (self.switch.clone(), port.clone(), self.options.clone());
        let handle = std::thread::Builder::new()
            .name(format!("port-{}", port.name()))
            .spawn(move || serve_port(&switch, &p, listener, &options));
        let handle = match handle {
            Ok(h) => h,
            Err(e) => {
                self.switch.remove_port(port.name());
                return Err(e.into());
            }
        };
        lock(&self.threads).insert(port.id, handle);
        info!(
            "port {} listening on {path}{}",
            port.name(),
            port.cfg
                .mac
                .map(|m| format!(" (mac {m})"))
                .unwrap_or_default()
        );
        Ok(port)
    }

    /// Adds a TAP uplink called `name` on interface `dev` (created if missing), with
    /// checksum/segmentation offloads if `offloads` says so (default: the switch's).
    pub fn add_tap(
        &self,
        name: &str,
        dev: &str,
        offloads: Option<bool>,
    ) -> Result<Arc<Port>, ServeError> {
        let cfg = PortConfig {
            name: name.to_string(),
            socket: format!("tap:{dev}").into(),
            ..PortConfig::default()
        };
        cfg.validate().map_err(ServeError::Invalid)?;
        let tap = Arc::new(
            Tap::open(dev, offloads.unwrap_or(self.switch.offloads))
                .map_err(|e| ServeError::Invalid(e.to_string()))?,
        );
        let tap_offloads = tap.offloads();
        let port = self
            .switch
            .add_port_with(cfg, Some(tap.clone()))
            .map_err(ServeError::Invalid)?;
        let (switch, p) = (self.switch.clone(), port.clone());
        let handle = std::thread::Builder::new()
            .name(format!("tap-{name}"))
            .spawn(move || serve_tap(&switch, &p, &tap));
        let handle = match handle {
            Ok(h) => h,
            Err(e) => {
                self.switch.remove_port(name);
                return Err(e.into());
            }
        };
        lock(&self.threads).insert(port.id, handle);
        info!(
            "uplink {name} on TAP {dev}{}",
            if tap_offloads { " (offloads)" } else { "" }
        );
        Ok(port)
    }

    /// Removes a port: disconnects its frontend, stops its thread, removes its socket.
    pub fn remove_port(&self, name: &str) -> Result<(), ServeError> {
        let port = self
            .switch
            .remove_port(name)
            .ok_or_else(|| ServeError::NotFound(name.to_string()))?;
        port.remove();
        if port.tap().is_none() {
            // Wake the thread if it waits in accept(); it sees the removal and ends.
            let _ = UnixStream::connect(&port.cfg.socket);
        }
        if let Some(h) = lock(&self.threads).remove(&port.id) {
            let _ = h.join();
        }
        info!("port {name} removed");
        Ok(())
    }
}

/// Moves frames the kernel sends on the TAP into the switch, in batches, until the
/// port is removed.
fn serve_tap(switch: &Arc<Switch>, port: &Arc<Port>, tap: &Tap) {
    let mut buf = vec![0u8; MAX_CHAIN_LEN];
    let mut batch = TxBatch::default();
    let mut scratch = ForwardScratch::default();
    while !port.is_removed() {
        match tap.wait_readable(200) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                warn!("uplink {}: poll: {e}", port.name());
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        }
        batch.clear();
        while batch.frames.len() < TX_BATCH {
            match tap.recv(&mut buf) {
                Ok(n) => batch.push_frame(&buf[..n], HDR_LEN),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    warn!("uplink {}: read: {e}", port.name());
                    break;
                }
            }
        }
        if !batch.frames.is_empty() {
            switch.forward(port, 0, &batch, &mut scratch);
        }
    }
}

/// Serves frontends on `port` until the port is removed.
fn serve_port(
    switch: &Arc<Switch>,
    port: &Arc<Port>,
    mut listener: Listener,
    options: &ServeOptions,
) {
    while !port.is_removed() {
        if let Err(e) = serve_one(switch, port, &mut listener, options) {
            warn!("port {}: {e}", port.name());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    port.detach();
}

/// Accepts one frontend on `port` and serves it until it goes away.
fn serve_one(
    switch: &Arc<Switch>,
    port: &Arc<Port>,
    listener: &mut Listener,
    options: &ServeOptions,
) -> Result<(), ServeError> {
    let name = port.name();
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let backend = PortBackend::new(
        switch.clone(),
        port.clone(),
        mem.clone(),
        options.queue_size,
        options.poll,
        options.groups.clone(),
    )?;
    let mut daemon = VhostUserDaemon::new(format!("net-{name}"), backend.clone(), mem)
        .map_err(|e| ServeError::Daemon(e.to_string()))?;
    let exit = |daemon: &VhostUserDaemon<Arc<PortBackend>>| {
        for h in daemon.get_epoll_handlers() {
            h.send_exit_event();
        }
    };
    let handlers = daemon.get_epoll_handlers();
    let attach = if handlers.len() == backend.pairs() {
        handlers
            .iter()
            .enumerate()
            .try_for_each(|(i, h)| match backend.attach_fd(i) {
                Some(fd) => h.register_listener(fd, EventSet::IN, u64::from(ATTACH_EVENT)),
                None => Err(std::io::Error::other("no attach event")),
            })
    } else {
        Err(std::io::Error::other("worker count mismatch"))
    };
    if let Err(e) = attach.and_then(|()| backend.request_attach()) {
        exit(&daemon);
        return Err(ServeError::Daemon(format!("attach event: {e}")));
    }
    let frontend = loop {
        match listener.accept() {
            Ok(Some(s)) => break s,
            Ok(None) => continue,
            Err(e) => {
                exit(&daemon);
                return Err(ServeError::Daemon(format!("accept: {e}")));
            }
        }
    };
    if port.is_removed() {
        exit(&daemon);
        return Ok(());
    }
    // The daemon gets its end of the connection through a private socket, and the
    // relay sits between it and the frontend (see `relay`).
    let (mut private, inner) = match private_connection(&port.cfg.socket, port.id) {
        Ok(p) => p,
        Err(e) => {
            exit(&daemon);
            return Err(ServeError::Daemon(format!("private socket: {e}")));
        }
    };
    let started = daemon.start(&mut private);
    drop(private);
    if let Err(e) = started {
        exit(&daemon);
        return Err(ServeError::Daemon(e.to_string()));
    }
    let queues = backend.num_queues() as u32;
    let relay = match Relay::start(frontend, inner, name, Order::new(queues)) {
        Ok(r) => r,
        Err(e) => {
            daemon.request_shutdown();
            let _ = daemon.wait();
            exit(&daemon);
            return Err(e.into());
        }
    };
    port.set_connected(daemon.shutdown_handle());
    if port.is_removed() {
        daemon.request_shutdown();
    } else {
        info!("port {name}: frontend connected");
    }
    let r = daemon.wait();
    port.set_connected(None);
    port.detach();
    backend.leave_poll_groups();
    exit(&daemon);
    // Dropping the daemon joins its worker thread.
    drop(daemon);
    relay.join();
    match r {
        // The frontend closing its socket (a VM that stopped) is the normal end.
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(vhost::vhost_user::Error::Disconnected)) => {
            info!("port {name}: frontend disconnected")
        }
        Err(e) => warn!("port {name}: frontend connection ended: {e}"),
    }
    Ok(())
}
