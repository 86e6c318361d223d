//! Watching vhost-user backends from the event loop: a backend that hangs up
//! (exits, crashes, restarts) leaves its device waiting while every other device
//! and the vCPUs keep running; a helper thread retries the connection until the
//! backend is back, then the device's memory table and rings are replayed.
//!
//! Retries run off the event loop: an attempt can wait for a backend that accepts
//! the connection but never answers (up to the vhost-user reply deadline), and the
//! event loop (serial console, control socket, other devices) must not wait with
//! it. When an attempt succeeds the thread queues the device and writes an eventfd;
//! the event loop then watches the new socket again.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events};
use keel_devices::virtio::pci::VirtioPci;
use log::{debug, info, warn};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Event-loop token of the "a backend is back" eventfd.
pub const TOKEN_BACKEND_BACK: u32 = 8;
/// First event-loop token of backend sockets (one per device).
pub const FIRST_BACKEND_TOKEN: u32 = 0x4000_0000;

/// How often a missing backend is retried.
const RETRY_PERIOD: Duration = Duration::from_millis(200);

/// What the event loop and a device's reconnect thread share.
struct Shared {
    /// Indexes of devices whose backend came back, for the event loop to re-watch.
    back: Mutex<Vec<usize>>,
    /// Written after an index is queued in `back`.
    back_event: EventFd,
    /// Set when the VMM stops: threads give up before their next attempt.
    stop: AtomicBool,
}

/// One watched device.
struct Watched {
    device: Arc<Mutex<VirtioPci>>,
    name: String,
    disconnected: bool,
    reconnects: u64,
    /// The thread retrying this device's backend while it is disconnected.
    retry: Option<JoinHandle<()>>,
    /// The driver status last read without waiting for the device lock.
    last_status: u8,
}

/// The vhost-user devices and their connection state.
pub struct BackendWatch {
    devices: Vec<Watched>,
    shared: Option<Arc<Shared>>,
}

impl BackendWatch {
    /// Watches `devices` (those with a backend socket).
    pub fn new(devices: Vec<Arc<Mutex<VirtioPci>>>) -> Self {
        let shared = if devices.is_empty() {
            None
        } else {
            match EventFd::new(EFD_NONBLOCK) {
                Ok(back_event) => Some(Arc::new(Shared {
                    back: Mutex::new(Vec::new()),
                    back_event,
                    stop: AtomicBool::new(false),
                })),
                Err(e) => {
                    warn!("cannot create the backend reconnect eventfd ({e}): backends will not be reconnected");
                    None
                }
            }
        };
        let devices = devices
            .into_iter()
            .map(|device| {
                let (name, last_status) = {
                    let d = crate::lock(&device);
                    (d.name().to_owned(), d.status())
                };
                Watched {
                    device,
                    name,
                    disconnected: false,
                    reconnects: 0,
                    retry: None,
                    last_status,
                }
            })
            .collect();
        Self { devices, shared }
    }

    fn events(&self, index: usize) -> Option<Events> {
        let fd = crate::lock(&self.devices.get(index)?.device).backend_fd()?;
        Some(Events::with_data_raw(
            fd,
            FIRST_BACKEND_TOKEN + index as u32,
            EventSet::READ_HANG_UP,
        ))
    }

    /// Registers the backend sockets and the eventfd.
    pub fn init(&mut self, ops: &mut EventOps) {
        for i in 0..self.devices.len() {
            if let Some(ev) = self.events(i) {
                if let Err(e) = ops.add(ev) {
                    warn!("cannot watch backend socket of device {i}: {e:?}");
                }
            }
        }
        if let Some(s) = &self.shared {
            if let Err(e) = ops.add(Events::with_data(
                &s.back_event,
                TOKEN_BACKEND_BACK,
                EventSet::IN,
            )) {
                warn!("cannot watch the backend reconnect eventfd: {e:?}");
            }
        }
    }

    /// Per-device state for the control socket's `stats`. Never waits for a device
    /// whose reconnect attempt holds its lock: the last known status is reported.
    pub fn stats(&mut self) -> Vec<serde_json::Value> {
        self.devices
            .iter_mut()
            .map(|w| {
                if let Ok(d) = w.device.try_lock() {
                    w.last_status = d.status();
                }
                serde_json::json!({
                    "id": w.name,
                    "driver_status": w.last_status,
                    "backend": if w.disconnected { "disconnected" } else { "connected" },
                    "reconnects": w.reconnects,
                })
            })
            .collect()
    }

    /// Whether `token` belongs to a backend socket.
    pub fn owns(token: u32) -> bool {
        token >= FIRST_BACKEND_TOKEN
    }

    /// A backend socket reported a hang-up or error.
    pub fn handle_hangup(&mut self, token: u32, set: EventSet, ops: &mut EventOps) {
        let index = (token - FIRST_BACKEND_TOKEN) as usize;
        if self.devices.get(index).is_none_or(|w| w.disconnected) {
            return;
        }
        if let Some(ev) = self.events(index) {
            if let Err(e) = ops.remove(ev) {
                debug!("cannot unwatch backend {index}: {e:?}");
            }
        }
        let w = &mut self.devices[index];
        w.disconnected = true;
        warn!(
            "device {}: backend disconnected ({set:?}); the device waits for it to come back",
            w.name
        );
        let Some(shared) = &self.shared else {
            return;
        };
        // A previous thread ended when its backend came back; reap it.
        if let Some(old) = w.retry.take() {
            let _ = old.join();
        }
        let (device, shared) = (w.device.clone(), shared.clone());
        match std::thread::Builder::new()
            .name(format!("reconnect-{index}"))
            .spawn(move || retry_until_back(index, &device, &shared))
        {
            Ok(h) => w.retry = Some(h),
            Err(e) => warn!(
                "device {}: cannot start the reconnect thread ({e}); the backend will not be reconnected",
                w.name
            ),
        }
    }

    /// Re-watches the devices whose backend came back.
    pub fn handle_back(&mut self, ops: &mut EventOps) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let _ = shared.back_event.read();
        let back = std::mem::take(&mut *crate::lock(&shared.back));
        for i in back {
            let Some(w) = self.devices.get_mut(i) else {
                continue;
            };
            w.disconnected = false;
            w.reconnects += 1;
            if let Some(h) = w.retry.take() {
                let _ = h.join();
            }
            info!("device {}: backend is back; rings restored", w.name);
            if let Some(ev) = self.events(i) {
                if let Err(e) = ops.add(ev) {
                    warn!("cannot watch the new backend socket of device {i}: {e:?}");
                }
            }
        }
    }
}

impl Drop for BackendWatch {
    fn drop(&mut self) {
        // Threads check the flag under the device lock before every attempt; one in
        // the middle of an attempt finishes it (bounded by the reply deadline) and is
        // not waited for.
        if let Some(s) = &self.shared {
            s.stop.store(true, Ordering::Release);
        }
    }
}

/// A device's reconnect thread: retries every [`RETRY_PERIOD`] until the backend is
/// back (then tells the event loop) or the VMM stops.
fn retry_until_back(index: usize, device: &Mutex<VirtioPci>, shared: &Shared) {
    loop {
        std::thread::sleep(RETRY_PERIOD);
        let result = {
            let mut d = crate::lock(device);
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            d.reconnect_backend()
        };
        match result {
            Ok(()) => {
                crate::lock(&shared.back).push(index);
                if let Err(e) = shared.back_event.write(1) {
                    warn!("cannot tell the event loop that backend {index} is back: {e}");
                }
                return;
            }
            Err(e) => debug!("reconnect attempt: {e}"),
        }
    }
}
