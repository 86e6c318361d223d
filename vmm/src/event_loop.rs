//! The VMM's main-thread event loop (event-manager over epoll): guest reset, vCPU
//! events, stop signals, serial input from stdin with back-pressure, and the
//! control socket.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use keel_devices::legacy::serial::SerialDevice;
use keel_devices::virtio::pci::VirtioPci;
use log::{debug, error, info, warn};
use serde_json::json;
use vmm_sys_util::eventfd::EventFd;

use crate::backends::{BackendWatch, TOKEN_BACKEND_BACK};
use crate::control::{Connection, Input, Reply, Request};
use crate::signals::{signal_name, StopSignals};
use crate::vcpu::{VcpuEvent, VcpuThreads};

/// How long a pause waits for every vCPU to leave the guest.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most control connections served at once.
const MAX_CONTROL_CONNECTIONS: usize = 16;

const TOKEN_RESET: u32 = 1;
const TOKEN_VCPU_EVENT: u32 = 2;
const TOKEN_SIGNAL: u32 = 3;
const TOKEN_STDIN: u32 = 4;
const TOKEN_INPUT_SPACE: u32 = 5;
const TOKEN_CONTROL_LISTENER: u32 = 6;
const TOKEN_WATCHDOG: u32 = 7;
const FIRST_CONNECTION_TOKEN: u32 = 100;

/// Why the VMM stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest shut itself down (i8042 reset, or a KVM system event).
    GuestShutdown,
    /// A stop signal arrived.
    Signal(&'static str),
    /// The control socket asked for a shutdown.
    ControlShutdown,
    /// A vCPU could not continue.
    Fatal(String),
}

impl ExitReason {
    /// The process exit status for this reason.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::Fatal(_) => 1,
            _ => 0,
        }
    }
}

/// Serial input wiring: stdin into the UART, paused while the FIFO is full.
pub struct SerialInput {
    /// The UART.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// Signalled when the guest drained the receive FIFO.
    pub space: EventFd,
}

/// Static facts reported by `status`.
#[derive(Debug, Clone)]
pub struct VmFacts {
    /// Sandbox name.
    pub name: String,
    /// vCPU count.
    pub vcpus: u8,
    /// Guest RAM in bytes.
    pub memory_bytes: u64,
}

/// Everything the event loop reacts to.
pub struct EventLoop {
    facts: VmFacts,
    started: Instant,
    vcpus: VcpuThreads,
    paused: bool,
    reset: EventFd,
    vcpu_wake: Arc<EventFd>,
    vcpu_events: Receiver<VcpuEvent>,
    signals: StopSignals,
    serial_input: Option<SerialInput>,
    stdin_watched: bool,
    stdin_paused: bool,
    listener: Option<UnixListener>,
    connections: HashMap<u32, Connection>,
    next_token: u32,
    exit: Option<ExitReason>,
    watchdog: Option<crate::notify::Watchdog>,
    backends: BackendWatch,
}

/// Parts the event loop is built from.
pub struct EventLoopParts {
    /// Reported by `status`.
    pub facts: VmFacts,
    /// Running vCPUs.
    pub vcpus: VcpuThreads,
    /// The i8042 reset eventfd.
    pub reset: EventFd,
    /// Woken by vCPU threads when they send an event.
    pub vcpu_wake: Arc<EventFd>,
    /// vCPU events.
    pub vcpu_events: Receiver<VcpuEvent>,
    /// Stop signals.
    pub signals: StopSignals,
    /// Serial input from stdin, when configured.
    pub serial_input: Option<SerialInput>,
    /// The bound control socket, when configured.
    pub listener: Option<UnixListener>,
    /// Devices served by vhost-user backends (watched for disconnects).
    pub backends: Vec<Arc<Mutex<VirtioPci>>>,
}

impl EventLoop {
    /// Builds the loop from its parts.
    pub fn new(parts: EventLoopParts) -> Self {
        Self {
            facts: parts.facts,
            started: Instant::now(),
            vcpus: parts.vcpus,
            paused: false,
            reset: parts.reset,
            vcpu_wake: parts.vcpu_wake,
            vcpu_events: parts.vcpu_events,
            signals: parts.signals,
            serial_input: parts.serial_input,
            stdin_watched: false,
            stdin_paused: false,
            listener: parts.listener,
            connections: HashMap::new(),
            next_token: FIRST_CONNECTION_TOKEN,
            exit: None,
            watchdog: crate::notify::Watchdog::from_env(),
            backends: BackendWatch::new(parts.backends),
        }
    }

    /// Why the loop wants to stop, once it does.
    pub fn exit_reason(&self) -> Option<&ExitReason> {
        self.exit.as_ref()
    }

    /// Takes the vCPU threads out to stop them.
    pub fn into_vcpus(self) -> VcpuThreads {
        self.vcpus
    }

    fn stop(&mut self, reason: ExitReason) {
        if self.exit.is_none() {
            self.exit = Some(reason);
        }
    }

    fn handle_reset(&mut self) {
        let _ = self.reset.read();
        info!("guest requested a reset through the i8042 controller: shutting down");
        self.stop(ExitReason::GuestShutdown);
    }

    fn handle_vcpu_events(&mut self) {
        let _ = self.vcpu_wake.read();
        while let Ok(event) = self.vcpu_events.try_recv() {
            match event {
                VcpuEvent::GuestStop { vcpu, reason } => {
                    info!("vCPU {vcpu}: guest stop ({reason}): shutting down");
                    self.stop(ExitReason::GuestShutdown);
                }
                VcpuEvent::Fatal { vcpu, reason } => {
                    error!("vCPU {vcpu}: {reason}");
                    self.stop(ExitReason::Fatal(format!("vCPU {vcpu}: {reason}")));
                }
            }
        }
    }

    fn handle_signal(&mut self) {
        loop {
            match self.signals.read() {
                Ok(Some(sig)) => {
                    let name = signal_name(sig);
                    info!("{name} received: stopping the VM");
                    self.stop(ExitReason::Signal(name));
                }
                Ok(None) => break,
                Err(e) => {
                    warn!("cannot read the signalfd: {e}");
                    break;
                }
            }
        }
    }

    fn stdin_events() -> Events {
        Events::with_data_raw(libc::STDIN_FILENO, TOKEN_STDIN, EventSet::IN)
    }

    fn handle_stdin(&mut self, set: EventSet, ops: &mut EventOps) {
        let Some(input) = &self.serial_input else {
            return;
        };
        let capacity = crate::lock(&input.serial).input_capacity();
        if capacity == 0 {
            // The guest has not drained its FIFO: stop watching stdin until it has.
            self.stdin_paused = true;
            self.unwatch_stdin(ops);
            return;
        }
        let mut buf = [0u8; 64];
        let want = capacity.min(buf.len());
        // One read per readiness event: stdin stays in blocking mode (it may be
        // shared with a terminal), and epoll said there is data or EOF. Read the
        // fd directly: std's Stdin buffers, which would hide data from epoll.
        match read_stdin(&mut buf[..want]) {
            Ok(0) => {
                debug!("stdin closed: no more serial input");
                self.unwatch_stdin(ops);
            }
            Ok(n) => {
                let taken = crate::lock(&input.serial).enqueue_input(&buf[..n]);
                if taken < n {
                    warn!("serial: {} input bytes dropped", n - taken);
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                warn!("cannot read stdin: {e}: serial input disabled");
                self.unwatch_stdin(ops);
            }
        }
        if set.contains(EventSet::HANG_UP) && !set.contains(EventSet::IN) {
            self.unwatch_stdin(ops);
        }
    }

    fn unwatch_stdin(&mut self, ops: &mut EventOps) {
        if self.stdin_watched {
            if let Err(e) = ops.remove(Self::stdin_events()) {
                debug!("cannot stop watching stdin: {e:?}");
            }
            self.stdin_watched = false;
        }
    }

    fn handle_input_space(&mut self, ops: &mut EventOps) {
        if let Some(input) = &self.serial_input {
            let _ = input.space.read();
        }
        if self.stdin_paused {
            self.stdin_paused = false;
            self.watch_stdin(ops);
        }
    }

    fn watch_stdin(&mut self, ops: &mut EventOps) {
        if self.stdin_watched || self.serial_input.is_none() {
            return;
        }
        match ops.add(Self::stdin_events()) {
            Ok(()) => self.stdin_watched = true,
            Err(e) => warn!("serial input: cannot watch stdin ({e:?}); input disabled"),
        }
    }

    fn handle_accept(&mut self, ops: &mut EventOps) {
        let Some(listener) = &self.listener else {
            return;
        };
        loop {
            match listener.accept() {
                Ok((stream, _)) => {
                    if self.connections.len() >= MAX_CONTROL_CONNECTIONS {
                        warn!("control: too many connections, refusing one");
                        continue;
                    }
                    let conn = match Connection::new(stream) {
                        Ok(c) => c,
                        Err(e) => {
                            warn!("control: cannot set up a connection: {e}");
                            continue;
                        }
                    };
                    let token = self.next_token;
                    // Connection tokens stay below the backend-socket tokens.
                    self.next_token = if self.next_token + 1 >= crate::backends::FIRST_BACKEND_TOKEN
                    {
                        FIRST_CONNECTION_TOKEN
                    } else {
                        self.next_token + 1
                    };
                    let events = Events::with_data(conn.stream(), token, EventSet::IN);
                    if let Err(e) = ops.add(events) {
                        warn!("control: cannot watch a connection: {e:?}");
                        continue;
                    }
                    self.connections.insert(token, conn);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("control: accept failed: {e}");
                    break;
                }
            }
        }
    }

    fn handle_connection(&mut self, token: u32, set: EventSet, ops: &mut EventOps) {
        let Some(mut conn) = self.connections.remove(&token) else {
            return;
        };
        let mut keep = true;
        if set.contains(EventSet::OUT) {
            keep = conn.flush();
        }
        if keep && set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
            match conn.read_requests() {
                Input::Closed => keep = false,
                Input::Lines(lines) => {
                    for line in lines {
                        let reply = match line {
                            Ok(request) => self.execute(request),
                            Err(message) => {
                                debug!("control: bad request: {message}");
                                Reply::error(message)
                            }
                        };
                        keep = conn.send(&reply);
                        if !keep {
                            break;
                        }
                    }
                }
            }
        }
        let interest = if conn.has_pending_output() {
            EventSet::IN | EventSet::OUT
        } else {
            EventSet::IN
        };
        if keep {
            if let Err(e) = ops.modify(Events::with_data(conn.stream(), token, interest)) {
                debug!("control: cannot update a connection's events: {e:?}");
            }
            self.connections.insert(token, conn);
        } else if let Err(e) = ops.remove(Events::with_data(conn.stream(), token, EventSet::IN)) {
            debug!("control: cannot unwatch a connection: {e:?}");
        }
    }

    fn state_name(&self) -> &'static str {
        match (&self.exit, self.paused) {
            (Some(_), _) => "stopping",
            (None, true) => "paused",
            (None, false) => "running",
        }
    }

    /// Carries out a control request.
    fn execute(&mut self, request: Request) -> Reply {
        match request {
            Request::Status => Reply::ok(json!({
                "name": self.facts.name,
                "state": self.state_name(),
                "vcpus": self.facts.vcpus,
                "memory_bytes": self.facts.memory_bytes,
                "uptime_ms": self.started.elapsed().as_millis() as u64,
            })),
            Request::Stats => Reply::ok(json!({
                "name": self.facts.name,
                "state": self.state_name(),
                "vcpus": self.facts.vcpus,
                "memory_bytes": self.facts.memory_bytes,
                "uptime_ms": self.started.elapsed().as_millis() as u64,
                "devices": self.backends.stats(),
            })),
            Request::Pause => {
                if self.paused {
                    return Reply::error("already paused");
                }
                if self.vcpus.pause(PAUSE_TIMEOUT) {
                    self.paused = true;
                    info!("VM paused");
                    crate::notify::status("paused");
                    Reply::ok(json!({"state": "paused"}))
                } else {
                    self.vcpus.resume();
                    Reply::error(format!(
                        "vCPUs did not stop within {} s; left running",
                        PAUSE_TIMEOUT.as_secs()
                    ))
                }
            }
            Request::Resume => {
                if !self.paused {
                    return Reply::error("not paused");
                }
                self.vcpus.resume();
                self.paused = false;
                info!("VM resumed");
                crate::notify::status("running");
                Reply::ok(json!({"state": "running"}))
            }
            Request::Shutdown => {
                info!("shutdown requested on the control socket");
                self.stop(ExitReason::ControlShutdown);
                Reply::ok(json!({"state": "stopping"}))
            }
        }
    }
}

/// One unbuffered read(2) from stdin.
fn read_stdin(buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call.
    let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}

impl MutEventSubscriber for EventLoop {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let set = events.event_set();
        match events.data() {
            TOKEN_RESET => self.handle_reset(),
            TOKEN_VCPU_EVENT => self.handle_vcpu_events(),
            TOKEN_SIGNAL => self.handle_signal(),
            TOKEN_STDIN => self.handle_stdin(set, ops),
            TOKEN_INPUT_SPACE => self.handle_input_space(ops),
            TOKEN_CONTROL_LISTENER => self.handle_accept(ops),
            TOKEN_BACKEND_BACK => self.backends.handle_back(ops),
            token if BackendWatch::owns(token) => self.backends.handle_hangup(token, set, ops),
            TOKEN_WATCHDOG => {
                if let Some(w) = &mut self.watchdog {
                    w.fire();
                }
            }
            token if token >= FIRST_CONNECTION_TOKEN => self.handle_connection(token, set, ops),
            other => debug!("event for unknown token {other}"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        self.backends.init(ops);
        let fixed = [
            Events::with_data(&self.reset, TOKEN_RESET, EventSet::IN),
            Events::with_data(self.vcpu_wake.as_ref(), TOKEN_VCPU_EVENT, EventSet::IN),
            Events::with_data(&self.signals, TOKEN_SIGNAL, EventSet::IN),
        ];
        for events in fixed {
            if let Err(e) = ops.add(events) {
                error!("cannot watch fd {}: {e:?}", events.fd());
                self.stop(ExitReason::Fatal(format!("event loop setup failed: {e:?}")));
            }
        }
        if let Some(input) = &self.serial_input {
            let space = Events::with_data(&input.space, TOKEN_INPUT_SPACE, EventSet::IN);
            if let Err(e) = ops.add(space) {
                warn!("serial input: cannot watch the FIFO space eventfd ({e:?})");
            }
            self.watch_stdin(ops);
        }
        if let Some(listener) = &self.listener {
            let fd = listener.as_raw_fd();
            if let Err(e) = ops.add(Events::with_data_raw(
                fd,
                TOKEN_CONTROL_LISTENER,
                EventSet::IN,
            )) {
                warn!("control socket: cannot watch it ({e:?}); control disabled");
            }
        }
        if let Some(w) = &self.watchdog {
            match ops.add(Events::with_data(w, TOKEN_WATCHDOG, EventSet::IN)) {
                Ok(()) => info!("systemd watchdog: pinging every {:?}", w.period()),
                Err(e) => warn!("systemd watchdog: cannot watch its timer ({e:?})"),
            }
        }
    }
}
