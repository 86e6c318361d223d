//! keel-vhost-blk: parse the arguments, listen on every disk's socket, tell systemd it
//! is ready, serve until SIGTERM/SIGINT.

use std::process::ExitCode;

use clap::Parser;
use keel_vhost_blk::config::{disks_from_args, Args};
use keel_vhost_blk::notify;
use keel_vhost_blk::server::Export;
use log::{error, info, warn};

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let disks = match disks_from_args(&args) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("keel-vhost-blk: {e}");
            return ExitCode::from(2);
        }
    };
    if args.check {
        return ExitCode::SUCCESS;
    }
    // Block the stop signals before any thread starts, so every thread inherits the
    // mask and only `wait_for_stop` receives them.
    let signals = match StopSignals::block() {
        Ok(s) => s,
        Err(e) => {
            error!("cannot block SIGTERM/SIGINT: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut exports = Vec::with_capacity(disks.len());
    for disk in &disks {
        match Export::listen(disk) {
            Ok(e) => exports.push(e),
            Err(e) => {
                error!("{}: {e}", disk.socket.display());
                notify::status(&format!("failed: {}: {e}", disk.socket.display()));
                return ExitCode::FAILURE;
            }
        }
    }
    let images: Vec<_> = exports.iter().map(Export::disk).collect();
    let (failed_tx, failed_rx) = std::sync::mpsc::channel::<()>();
    for (export, disk) in exports.into_iter().zip(&disks) {
        let socket = disk.socket.display().to_string();
        let failed_tx = failed_tx.clone();
        let spawned = std::thread::Builder::new()
            .name("blk-serve".into())
            .spawn(move || {
                if let Err(e) = export.serve() {
                    error!("{socket}: {e}");
                    let _ = failed_tx.send(());
                }
            });
        if let Err(e) = spawned {
            error!("cannot start the server thread: {e}");
            return ExitCode::FAILURE;
        }
    }
    drop(failed_tx);
    notify::notify(&format!(
        "READY=1\nSTATUS=serving {} disk(s), 0 frontend(s) connected",
        disks.len()
    ));
    if let Some(every) = notify::spawn_watchdog(|| true) {
        info!("systemd watchdog: pinging every {every:?}");
    }
    // A failed export ends the process like a stop signal does, but with an error.
    let (stop_tx, stop_rx) = std::sync::mpsc::channel::<bool>();
    let on_failure = stop_tx.clone();
    let _ = std::thread::Builder::new()
        .name("blk-failures".into())
        .spawn(move || {
            if failed_rx.recv().is_ok() {
                let _ = on_failure.send(false);
            }
        });
    let _ = std::thread::Builder::new()
        .name("blk-signals".into())
        .spawn(move || {
            let sig = signals.wait();
            info!("signal {sig}: stopping");
            let _ = stop_tx.send(true);
        });
    let clean = stop_rx.recv().unwrap_or(false);
    notify::notify("STOPPING=1\nSTATUS=stopping: flushing disks");
    for image in &images {
        if let Err(e) = image.file.sync_data() {
            warn!("final flush: {e}");
        }
    }
    if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// SIGTERM and SIGINT, blocked in every thread and received synchronously.
struct StopSignals(libc::sigset_t);

impl StopSignals {
    fn block() -> std::io::Result<StopSignals> {
        // SAFETY: sigset_t is plain data initialised by sigemptyset; pthread_sigmask
        // only reads it and changes the calling thread's mask.
        let (set, rc) = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            (set, rc)
        };
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        Ok(StopSignals(set))
    }

    /// Blocks until one of the signals arrives; returns its number.
    fn wait(&self) -> i32 {
        loop {
            let mut sig: libc::c_int = 0;
            // SAFETY: the set is initialised and blocked in this thread; sigwait writes
            // the signal number into `sig`.
            let rc = unsafe { libc::sigwait(&self.0, &mut sig) };
            if rc == 0 {
                return sig;
            }
        }
    }
}
