//! keel-vhost-net: parse the arguments, open every port's socket and the control
//! socket, tell systemd we are ready, then age MAC entries and log counters.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use keel_vhost_net::config::{switch_from_args, Args};
use keel_vhost_net::server::Server;
use keel_vhost_net::switch::Switch;
use keel_vhost_net::{control, notify};
use log::{error, info};

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
    let switch = Arc::new(Switch::with_offloads(cfg.mac_ageing, cfg.offloads));
    let server = Server::new(switch.clone(), cfg.queue_size, cfg.poll);
    for port in &cfg.ports {
        if let Err(e) = server.add_port(port.clone()) {
            error!("port {}: {e}", port.name);
            return ExitCode::FAILURE;
        }
    }
    for tap in &cfg.taps {
        if let Err(e) = server.add_tap(&tap.name, &tap.dev) {
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
    let mut last_stats = Instant::now();
    loop {
        std::thread::sleep(Duration::from_secs(1));
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
