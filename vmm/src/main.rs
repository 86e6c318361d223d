//! `keel-vmm`: run a sandbox from its TOML file, or check the file.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keel_devices::legacy::debug_port::monotonic_ns;
use keel_vmm::{builder, config};

#[derive(Debug, Parser)]
#[command(name = "keel-vmm", version, about = "keel: a minimal appliance VMM")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Boot the sandbox described by a TOML file and run it until it stops.
    Run {
        /// The sandbox configuration file.
        #[arg(long, short = 'c', value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate sandbox configuration files without starting anything.
    Check {
        /// Configuration files to check.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
    },
    /// Send one request to a running VMM's control socket and print the reply.
    Ctl {
        /// The control socket (`[control] socket` in the sandbox file).
        #[arg(long, short = 's', value_name = "PATH")]
        socket: PathBuf,
        /// The request.
        #[arg(value_enum)]
        command: CtlCommand,
    },
    /// Print the systemd drop-in for keel-vmm@NAME.service derived from a sandbox
    /// file: backend and hugepage dependencies, AllowedCPUs=, AllowedMemoryNodes=,
    /// MemoryMax=, TasksMax=.
    SystemdDropin {
        /// The sandbox configuration file.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
}

/// Control requests.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum CtlCommand {
    /// Report the VM's state.
    Status,
    /// Report the VM's state with per-device details.
    Stats,
    /// Stop running guest code.
    Pause,
    /// Continue after a pause.
    Resume,
    /// Stop the VM; the VMM exits 0.
    Shutdown,
}

impl CtlCommand {
    fn name(self) -> &'static str {
        match self {
            CtlCommand::Status => "status",
            CtlCommand::Stats => "stats",
            CtlCommand::Pause => "pause",
            CtlCommand::Resume => "resume",
            CtlCommand::Shutdown => "shutdown",
        }
    }
}

/// Sends `command` on `socket`; prints the reply line; exit status from its "ok".
fn control_request(socket: &std::path::Path, command: CtlCommand) -> ExitCode {
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixStream;
    use std::time::Duration;

    let result = (|| -> std::io::Result<String> {
        let mut stream = UnixStream::connect(socket)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        writeln!(stream, "{{\"cmd\":\"{}\"}}", command.name())?;
        let mut reply = String::new();
        BufReader::new(stream).read_line(&mut reply)?;
        Ok(reply)
    })();
    match result {
        Ok(reply) => {
            print!("{reply}");
            let ok = serde_json::from_str::<serde_json::Value>(&reply)
                .ok()
                .and_then(|v| v.get("ok").and_then(serde_json::Value::as_bool))
                .unwrap_or(false);
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: control socket {}: {e}", socket.display());
            ExitCode::FAILURE
        }
    }
}

/// Checks what the sandbox needs from the host at start beyond the config itself:
/// the free hugepage pool and, for passthrough devices, VFIO.
fn check_host_resources(c: &config::SandboxConfig) -> Result<(), String> {
    if c.memory.hugepages != config::HugePages::None {
        config::host::check_hugepage_pool(
            std::path::Path::new("/sys"),
            c.memory.hugepages.page_size(),
            c.memory.size_bytes,
        )
        .map_err(|e| e.to_string())?;
    }
    keel_vmm::vfio::preflight(c)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn init_logging() {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_micros()
        .init();
}

fn main() -> ExitCode {
    let started_ns = monotonic_ns();
    let cli = Cli::parse();
    match cli.command {
        Command::Check { files } => {
            let mut failed = false;
            for file in files {
                match config::load(&file)
                    .map_err(|e| e.to_string())
                    .and_then(|c| {
                        check_host_resources(&c).map_err(|e| format!("{}: {e}", file.display()))
                    }) {
                    Ok(()) => println!("{}: ok", file.display()),
                    Err(e) => {
                        eprintln!("error: {e}");
                        failed = true;
                    }
                }
            }
            if failed {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Command::Ctl { socket, command } => control_request(&socket, command),
        Command::SystemdDropin { file } => match config::load(&file) {
            Ok(c) => {
                print!("{}", keel_vmm::systemd_dropin::render(&c, &file));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run { config: path } => {
            init_logging();
            let sandbox = match config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("error: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match builder::run(&sandbox, started_ns) {
                Ok(outcome) => {
                    let _ = std::io::stdout().flush();
                    if let keel_vmm::event_loop::ExitReason::Fatal(reason) = &outcome.reason {
                        eprintln!("error: {reason}");
                    }
                    ExitCode::from(outcome.reason.exit_code() as u8)
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
