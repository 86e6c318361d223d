//! keel-vhost-blk: parse the arguments, then serve every configured disk.

use std::process::ExitCode;

use clap::Parser;
use keel_vhost_blk::config::{disks_from_args, Args};
use keel_vhost_blk::server;
use log::error;

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
    let threads: Vec<_> = disks
        .into_iter()
        .map(|disk| {
            std::thread::spawn(move || {
                let r = server::serve(&disk);
                if let Err(e) = &r {
                    error!("{}: {e}", disk.socket.display());
                }
                r
            })
        })
        .collect();
    let mut failed = false;
    for t in threads {
        failed |= !matches!(t.join(), Ok(Ok(())));
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
