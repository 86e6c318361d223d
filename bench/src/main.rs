//! `keel-bench`: measurements of keel against reference peers, in the same run on
//! the same machine. Results are medians over repeated runs.

mod blk;
mod boot;
mod error;
mod net;
mod stats;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "keel-bench", about = "Measure keel against reference peers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Time from exec to the guest's first instruction, and the VMM's memory
    /// overhead, for keel-vmm and (when installed) QEMU microvm on the same guest.
    Boot {
        /// Runs per VMM.
        #[arg(long, default_value_t = 20)]
        runs: usize,
        /// keel-vmm binary.
        #[arg(long, default_value = "target/release/keel-vmm")]
        keel: PathBuf,
        /// Probe guest built with the `pvh` feature (bootable by both VMMs).
        #[arg(long, default_value = "target/guest/keel-probe-pvh.elf")]
        guest: PathBuf,
        /// QEMU binary for the reference; "none" to skip it.
        #[arg(long, default_value = "qemu-system-x86_64")]
        qemu: String,
    },
    /// 4 KiB random read/write IOPS of keel-vhost-blk against qemu-storage-daemon on
    /// the same image, with the same blkio client; data verified after each backend.
    Blk {
        /// keel-vhost-blk binary.
        #[arg(long, default_value = "target/release/keel-vhost-blk")]
        keel: PathBuf,
        /// qemu-storage-daemon binary for the reference; "none" to skip it.
        #[arg(long, default_value = "qemu-storage-daemon")]
        qsd: String,
        /// Image size in MiB.
        #[arg(long, default_value_t = 64)]
        size_mib: usize,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        /// Queue depths.
        #[arg(long, value_delimiter = ',', default_value = "1,32,128")]
        depths: Vec<usize>,
        /// The backend runs on this CPU (under taskset), every variant alike.
        #[arg(long, default_value_t = 1)]
        backend_cpu: usize,
        /// The client (this process) runs on this CPU.
        #[arg(long, default_value_t = 0)]
        client_cpu: usize,
        /// Let the backend and the client float over all CPUs instead.
        #[arg(long)]
        no_pin: bool,
    },
    /// Packet rates of keel-vhost-net against testpmd's net_vhost PMD, both driven by
    /// testpmd virtio-user frontends: receive only, a port-to-port loop, and port to
    /// port with a separate receiver.
    Net {
        /// keel-vhost-net binary.
        #[arg(long, default_value = "target/release/keel-vhost-net")]
        keel: PathBuf,
        /// testpmd binary.
        #[arg(long, default_value = "dpdk-testpmd")]
        testpmd: String,
        /// Seconds per measurement.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Frame sizes in bytes.
        #[arg(long, value_delimiter = ',', default_value = "64,1500")]
        sizes: Vec<usize>,
        /// keel's busy-poll window in microseconds (0: event mode).
        #[arg(long, default_value_t = 100)]
        poll_us: u64,
        /// Tests to run: rx, loop, fwd (fwd is meaningful with 3+ free cores).
        #[arg(long, value_delimiter = ',', default_value = "rx,loop")]
        tests: Vec<net::NetTest>,
        /// keel polls all its ports with one shared thread on CPU 1 (--poll-cpus 1)
        /// instead of one worker per port (busy-poll mode only).
        #[arg(long)]
        shared_poll: bool,
        /// Frames each port of the loop frontend starts with (1..=512).
        #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..=512))]
        loop_burst: u16,
        /// Measurements of each side per point, alternating keel and the reference
        /// (1..=20); the ratio printed is the median of the rounds' ratios.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=20))]
        rounds: u8,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Boot {
            runs,
            keel,
            guest,
            qemu,
        } => boot::run(&boot::BootBench {
            runs,
            keel,
            guest,
            qemu: (qemu != "none").then_some(qemu),
        })
        .map_err(|e| e.to_string()),
        Command::Blk {
            keel,
            qsd,
            size_mib,
            seconds,
            depths,
            backend_cpu,
            client_cpu,
            no_pin,
        } => blk::run(&blk::BlkBench {
            keel,
            qsd: (qsd != "none").then_some(qsd),
            size_mib,
            seconds,
            depths,
            cpus: (!no_pin).then_some((backend_cpu, client_cpu)),
        })
        .map_err(|e| e.to_string()),
        Command::Net {
            keel,
            testpmd,
            seconds,
            sizes,
            poll_us,
            tests,
            shared_poll,
            loop_burst,
            rounds,
        } => net::run(&net::NetBench {
            keel,
            testpmd,
            seconds,
            sizes,
            poll_us,
            tests,
            shared_poll,
            loop_burst: usize::from(loop_burst),
            rounds: usize::from(rounds),
        })
        .map_err(|e| e.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
