//! keel-vhost-net: parse the arguments, open every port's socket and the control
//! socket, tell systemd we are ready, then age MAC entries and log counters.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use keel_vhost_net::config::{switch_from_args, Args};
use keel_vhost_net::poller::PollGroups;
use keel_vhost_net::server::{ServeOptions, Server};
use keel_vhost_net::switch::Switch;
use keel_vhost_net::{control, notify};
use log::{error, info};

/// SIGTERM and SIGINT, blocked and taken with `sigtimedwait`.
struct StopSignals(libc::sigset_t);

impl StopSignals {
    fn block() -> std::io::Result<Self> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it below.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t owned by this frame.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
        }
        // SAFETY: `set` is initialised; the old mask is not wanted.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        Ok(Self(set))
    }

    /// Waits up to `timeout` for a stop signal; returns its number.
    fn wait(&self, timeout: Duration) -> Option<i32> {
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
        };
        // SAFETY: the set and timespec are valid for the call; no siginfo wanted.
        let sig = unsafe { libc::sigtimedwait(&self.0, std::ptr::null_mut(), &ts) };
        (sig > 0).then_some(sig)
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let cfg = match switch_from_args(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("keel-vhost-net: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        return ExitCode::SUCCESS;
    }
    // Stop signals are taken synchronously by the main loop below; block them
    // before any thread exists so every thread inherits the mask.
    let stop_signals = match StopSignals::block() {
        Ok(s) => s,
        Err(e) => {
            error!("cannot block stop signals: {e}");
            return ExitCode::FAILURE;
        }
    };
    let switch = Arc::new(Switch::with_offloads(cfg.mac_ageing, cfg.offloads));
    let groups = if cfg.poll_cpus.is_empty() {
        None
    } else {
        match PollGroups::start(&cfg.poll_cpus, cfg.poll) {
            Ok(g) => Some(g),
            Err(e) => {
                error!("cannot start the poll threads: {e}");
                return ExitCode::FAILURE;
            }
        }
    };
    let server = Server::new(
        switch.clone(),
        ServeOptions {
            queue_size: cfg.queue_size,
            poll: cfg.poll,
            groups,
        },
    );
    for port in &cfg.ports {
        if let Err(e) = server.add_port(port.clone()) {
            error!("port {}: {e}", port.name);
            return ExitCode::FAILURE;
        }
    }
    for tap in &cfg.taps {
        if let Err(e) = server.add_tap(&tap.name, &tap.dev, tap.offloads) {
            error!("uplink {}: {e}", tap.name);
            return ExitCode::FAILURE;
        }
    }
    if let Some(path) = &cfg.control {
        if let Err(e) = control::start(path, server.clone()) {
            error!("{e}");
            return ExitCode::FAILURE;
        }
        info!("control socket {}", path.display());
    }
    notify::notify(&format!(
        "READY=1\nSTATUS=serving {} ports",
        cfg.ports.len()
    ));
    if let Some(every) = notify::spawn_watchdog(|| true) {
        info!("systemd watchdog: pinging every {every:?}");
    }
    let mut last_stats = Instant::now();
    loop {
        if let Some(sig) = stop_signals.wait(Duration::from_secs(1)) {
            info!("signal {sig}: stopping");
            notify::notify("STOPPING=1\nSTATUS=stopping");
            return ExitCode::SUCCESS;
        }
        switch.macs.expire(switch.now_ms());
        if !cfg.stats_interval.is_zero() && last_stats.elapsed() >= cfg.stats_interval {
            last_stats = Instant::now();
            for p in switch.ports().iter() {
                if let Ok(line) = serde_json::to_string(&p.stats()) {
                    info!("stats {line}");
                }
            }
        }
    }
}
