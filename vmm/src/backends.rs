//! Watching vhost-user backends from the event loop: a backend that hangs up
//! (exits, crashes, restarts) leaves its device waiting while every other device
//! and the vCPUs keep running; a timer retries the connection until the backend is
//! back, then the device's memory table and rings are replayed.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, EventSet, Events};
use keel_devices::virtio::pci::VirtioPci;
use log::{debug, info, warn};
use vmm_sys_util::timerfd::TimerFd;

/// Event-loop token of the reconnect timer.
pub const TOKEN_RECONNECT_TIMER: u32 = 8;
/// First event-loop token of backend sockets (one per device).
pub const FIRST_BACKEND_TOKEN: u32 = 0x4000_0000;

/// How often a missing backend is retried.
const RETRY_PERIOD: Duration = Duration::from_millis(200);

/// The vhost-user devices and their connection state.
pub struct BackendWatch {
    devices: Vec<Arc<Mutex<VirtioPci>>>,
    disconnected: Vec<bool>,
    reconnects: Vec<u64>,
    timer: Option<TimerFd>,
    timer_armed: bool,
}

impl BackendWatch {
    /// Watches `devices` (those with a backend socket).
    pub fn new(devices: Vec<Arc<Mutex<VirtioPci>>>) -> Self {
        let timer = if devices.is_empty() {
            None
        } else {
            match TimerFd::new() {
                Ok(t) => Some(t),
                Err(e) => {
                    warn!("cannot create the backend reconnect timer ({e}): backends will not be reconnected");
                    None
                }
            }
        };
        Self {
            disconnected: vec![false; devices.len()],
            reconnects: vec![0; devices.len()],
            devices,
            timer,
            timer_armed: false,
        }
    }

    fn events(&self, index: usize) -> Option<Events> {
        let fd = crate::lock(self.devices.get(index)?).backend_fd()?;
        Some(Events::with_data_raw(
            fd,
            FIRST_BACKEND_TOKEN + index as u32,
            EventSet::READ_HANG_UP,
        ))
    }

    /// Registers the backend sockets and the timer.
    pub fn init(&mut self, ops: &mut EventOps) {
        for i in 0..self.devices.len() {
            if let Some(ev) = self.events(i) {
                if let Err(e) = ops.add(ev) {
                    warn!("cannot watch backend socket of device {i}: {e:?}");
                }
            }
        }
        if let Some(t) = &self.timer {
            if let Err(e) = ops.add(Events::with_data(t, TOKEN_RECONNECT_TIMER, EventSet::IN)) {
                warn!("cannot watch the reconnect timer: {e:?}");
            }
        }
    }

    /// Per-device state for the control socket's `stats`.
    pub fn stats(&self) -> Vec<serde_json::Value> {
        self.devices
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let d = crate::lock(d);
                serde_json::json!({
                    "id": d.name(),
                    "driver_status": d.status(),
                    "backend": if self.disconnected[i] { "disconnected" } else { "connected" },
                    "reconnects": self.reconnects[i],
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
        if index >= self.devices.len() || self.disconnected[index] {
            return;
        }
        if let Some(ev) = self.events(index) {
            if let Err(e) = ops.remove(ev) {
                debug!("cannot unwatch backend {index}: {e:?}");
            }
        }
        self.disconnected[index] = true;
        let name = crate::lock(&self.devices[index]).name().to_owned();
        warn!(
            "device {name}: backend disconnected ({set:?}); the device waits for it to come back"
        );
        self.arm();
    }

    fn arm(&mut self) {
        if self.timer_armed {
            return;
        }
        if let Some(t) = &mut self.timer {
            match t.reset(RETRY_PERIOD, Some(RETRY_PERIOD)) {
                Ok(()) => self.timer_armed = true,
                Err(e) => warn!("cannot arm the reconnect timer: {e}"),
            }
        }
    }

    /// Retries every disconnected backend once.
    pub fn handle_timer(&mut self, ops: &mut EventOps) {
        if let Some(t) = &mut self.timer {
            let _ = t.wait();
        }
        for i in 0..self.devices.len() {
            if !self.disconnected[i] {
                continue;
            }
            let result = crate::lock(&self.devices[i]).reconnect_backend();
            match result {
                Ok(()) => {
                    self.disconnected[i] = false;
                    self.reconnects[i] += 1;
                    if let Some(ev) = self.events(i) {
                        if let Err(e) = ops.add(ev) {
                            warn!("cannot watch the new backend socket of device {i}: {e:?}");
                        }
                    }
                    let name = crate::lock(&self.devices[i]).name().to_owned();
                    info!("device {name}: backend is back; rings restored");
                }
                Err(e) => debug!("reconnect attempt: {e}"),
            }
        }
        if !self.disconnected.contains(&true) {
            if let Some(t) = &mut self.timer {
                if let Err(e) = t.clear() {
                    debug!("cannot disarm the reconnect timer: {e}");
                }
            }
            self.timer_armed = false;
        }
    }
}
