//! Command line and TOML configuration, turned into validated [`DiskConfig`]s.
//!
//! A backend process serves one or more disks, each on its own vhost-user socket.
//! Disks come either from one `--socket`/`--image` pair on the command line or from
//! `[[disk]]` tables in a TOML file (`--config`). Every TOML error names the file,
//! `line:column` and what was expected.

use std::path::{Path, PathBuf};

use clap::Parser;
use serde::Deserialize;

/// Largest queue size virtio allows for split rings.
const MAX_QUEUE_SIZE: u16 = 32768;
/// Most queues one disk may have (the vhost-user-backend crate uses a 64-bit mask).
const MAX_QUEUES: u16 = 64;
/// Longest serial number virtio-blk can report (`VIRTIO_BLK_ID_BYTES`).
pub const MAX_SERIAL_LEN: usize = 20;

pub use keel_config_error::ConfigError;

/// How a queue worker waits for work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Sleep in epoll until the frontend kicks or I/O completes.
    #[default]
    Event,
    /// After each burst of work keep polling the rings for `poll_us` before sleeping.
    Poll,
}

/// Command-line arguments.
#[derive(Debug, Parser)]
#[command(
    name = "keel-vhost-blk",
    version,
    about = "vhost-user block backend on io_uring"
)]
pub struct Args {
    /// TOML file with one or more `[[disk]]` tables (excludes the per-disk options).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["socket", "image"])]
    pub config: Option<PathBuf>,
    /// Only validate the configuration, then exit.
    #[arg(long)]
    pub check: bool,
    /// vhost-user socket path to listen on.
    #[arg(long, value_name = "PATH", requires = "image")]
    pub socket: Option<PathBuf>,
    /// Disk image: a raw file or a block device.
    #[arg(long, value_name = "PATH", requires = "socket")]
    pub image: Option<PathBuf>,
    /// Export the disk read-only.
    #[arg(long)]
    pub read_only: bool,
    /// Open the image with O_DIRECT (bypass the host page cache).
    #[arg(long)]
    pub direct: bool,
    /// Start with the volatile write cache off: every write is durable before it completes.
    #[arg(long)]
    pub no_write_cache: bool,
    /// Serial number reported by GET_ID (at most 20 bytes).
    #[arg(long, default_value = "")]
    pub serial: String,
    /// Number of virtqueues (one io_uring and one worker thread each).
    #[arg(long, default_value_t = 1)]
    pub queues: u16,
    /// Maximum size of each virtqueue.
    #[arg(long, default_value_t = 256)]
    pub queue_size: u16,
    /// Event or busy-poll mode.
    #[arg(long, value_enum, default_value_t = Mode::Event)]
    pub mode: Mode,
    /// In poll mode, how long to keep polling after the last work (microseconds).
    #[arg(long, default_value_t = 100)]
    pub poll_us: u32,
    /// Host CPUs for the queue workers (comma-separated, worker i uses entry i mod len).
    #[arg(long, value_delimiter = ',')]
    pub affinity: Vec<usize>,
}

/// One disk, as written in a `[[disk]]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDisk {
    socket: PathBuf,
    image: PathBuf,
    #[serde(default)]
    read_only: bool,
    #[serde(default)]
    direct: bool,
    #[serde(default = "default_true")]
    write_cache: bool,
    #[serde(default)]
    serial: String,
    #[serde(default = "default_queues")]
    queues: u16,
    #[serde(default = "default_queue_size")]
    queue_size: u16,
    #[serde(default)]
    mode: Mode,
    #[serde(default = "default_poll_us")]
    poll_us: u32,
    #[serde(default)]
    affinity: Vec<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    disk: Vec<toml::Spanned<RawDisk>>,
}

fn default_true() -> bool {
    true
}
fn default_queues() -> u16 {
    1
}
fn default_queue_size() -> u16 {
    256
}
fn default_poll_us() -> u32 {
    100
}

/// A validated disk export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    /// vhost-user socket path.
    pub socket: PathBuf,
    /// Image file or block device.
    pub image: PathBuf,
    /// Refuse writes, discards and write-zeroes; advertise VIRTIO_BLK_F_RO.
    pub read_only: bool,
    /// Open with O_DIRECT.
    pub direct: bool,
    /// Initial state of the volatile write cache (writeback when true).
    pub write_cache: bool,
    /// GET_ID serial, at most 20 bytes.
    pub serial: String,
    /// Number of virtqueues.
    pub queues: u16,
    /// Maximum queue size (power of two).
    pub queue_size: u16,
    /// Event or poll mode.
    pub mode: Mode,
    /// Poll window in microseconds (poll mode only).
    pub poll_us: u32,
    /// CPUs for the queue workers; empty means no pinning.
    pub affinity: Vec<usize>,
}

impl DiskConfig {
    /// Checks the values that serde cannot: ranges, lengths, powers of two.
    fn validate(&self) -> Result<(), String> {
        if self.queues == 0 || self.queues > MAX_QUEUES {
            return Err(format!(
                "queues: expected 1 to {MAX_QUEUES}, found {}",
                self.queues
            ));
        }
        if !self.queue_size.is_power_of_two() || self.queue_size > MAX_QUEUE_SIZE {
            return Err(format!(
                "queue_size: expected a power of two from 1 to {MAX_QUEUE_SIZE}, found {}",
                self.queue_size
            ));
        }
        if self.serial.len() > MAX_SERIAL_LEN {
            return Err(format!(
                "serial: expected at most {MAX_SERIAL_LEN} bytes, found {}",
                self.serial.len()
            ));
        }
        if self.socket.as_os_str().is_empty() || self.image.as_os_str().is_empty() {
            return Err("socket and image must not be empty".into());
        }
        Ok(())
    }
}

impl From<RawDisk> for DiskConfig {
    fn from(r: RawDisk) -> Self {
        DiskConfig {
            socket: r.socket,
            image: r.image,
            read_only: r.read_only,
            direct: r.direct,
            write_cache: r.write_cache,
            serial: r.serial,
            queues: r.queues,
            queue_size: r.queue_size,
            mode: r.mode,
            poll_us: r.poll_us,
            affinity: r.affinity,
        }
    }
}

/// Turns command-line arguments (and the TOML file they name) into disk configs.
pub fn disks_from_args(args: &Args) -> Result<Vec<DiskConfig>, ConfigError> {
    if let Some(path) = &args.config {
        let text = keel_config_error::read(path)?;
        return parse_toml(&text, path);
    }
    let (Some(socket), Some(image)) = (&args.socket, &args.image) else {
        return Err(ConfigError::Args(
            "give --config FILE, or --socket PATH and --image PATH".into(),
        ));
    };
    let disk = DiskConfig {
        socket: socket.clone(),
        image: image.clone(),
        read_only: args.read_only,
        direct: args.direct,
        write_cache: !args.no_write_cache,
        serial: args.serial.clone(),
        queues: args.queues,
        queue_size: args.queue_size,
        mode: args.mode,
        poll_us: args.poll_us,
        affinity: args.affinity.clone(),
    };
    disk.validate().map_err(ConfigError::Args)?;
    Ok(vec![disk])
}

/// Parses and validates a TOML file's text. Relative paths are relative to the file.
pub fn parse_toml(text: &str, file: &Path) -> Result<Vec<DiskConfig>, ConfigError> {
    let invalid = |offset: usize, message: String| ConfigError::at(file, text, offset, &message);
    let raw: RawFile = toml::from_str(text).map_err(|e| ConfigError::toml(file, text, &e))?;
    if raw.disk.is_empty() {
        return Err(invalid(0, "expected at least one [[disk]] table".into()));
    }
    let base = file.parent().unwrap_or(Path::new(""));
    let mut disks: Vec<DiskConfig> = Vec::new();
    for (i, spanned) in raw.disk.into_iter().enumerate() {
        let start = spanned.span().start;
        let mut disk = DiskConfig::from(spanned.into_inner());
        disk.socket = base.join(&disk.socket);
        disk.image = base.join(&disk.image);
        disk.validate()
            .map_err(|m| invalid(start, format!("disk[{i}].{m}")))?;
        if disks.iter().any(|d| d.socket == disk.socket) {
            return Err(invalid(
                start,
                format!(
                    "disk[{i}].socket: {} is already used by another disk",
                    disk.socket.display()
                ),
            ));
        }
        disks.push(disk);
    }
    Ok(disks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<DiskConfig>, ConfigError> {
        parse_toml(text, Path::new("/etc/keel/d.toml"))
    }

    #[test]
    fn minimal_disk_with_defaults() {
        let d = parse("[[disk]]\nsocket = \"a.sock\"\nimage = \"/img\"\n").unwrap();
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].socket, PathBuf::from("/etc/keel/a.sock"));
        assert_eq!(d[0].image, PathBuf::from("/img"));
        assert!(d[0].write_cache);
        assert_eq!((d[0].queues, d[0].queue_size), (1, 256));
        assert_eq!(d[0].mode, Mode::Event);
    }

    #[test]
    fn unknown_field_has_line_and_column() {
        let e = parse("[[disk]]\nsocket = \"a\"\nimage = \"b\"\nsize = 3\n").unwrap_err();
        let s = e.to_string();
        assert!(
            s.starts_with("/etc/keel/d.toml:4:1: unknown field `size`"),
            "{s}"
        );
    }

    #[test]
    fn wrong_type_is_located() {
        let e = parse("[[disk]]\nsocket = \"a\"\nimage = \"b\"\nqueues = \"two\"\n").unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with("/etc/keel/d.toml:4:10: invalid type"), "{s}");
    }

    #[test]
    fn bad_mode_and_values() {
        let e = parse("[[disk]]\nsocket = \"a\"\nimage = \"b\"\nmode = \"spin\"\n").unwrap_err();
        assert!(
            e.to_string().contains(":4:8: unknown variant `spin`"),
            "{e}"
        );
        let e = parse("[[disk]]\nsocket = \"a\"\nimage = \"b\"\nqueue_size = 100\n").unwrap_err();
        assert!(
            e.to_string()
                .contains("disk[0].queue_size: expected a power of two"),
            "{e}"
        );
        let e =
            parse("[[disk]]\nsocket = \"a\"\nimage = \"b\"\nserial = \"123456789012345678901\"\n")
                .unwrap_err();
        assert!(e.to_string().contains("disk[0].serial"), "{e}");
        let e = parse("[[disk]]\nsocket = \"a\"\nimage = \"b\"\nqueues = 0\n").unwrap_err();
        assert!(e.to_string().contains("disk[0].queues"), "{e}");
    }

    #[test]
    fn missing_fields_and_duplicates() {
        let e = parse("[[disk]]\nsocket = \"a\"\n").unwrap_err();
        assert!(e.to_string().contains("missing field `image`"), "{e}");
        let e = parse("").unwrap_err();
        assert!(e.to_string().contains("missing field `disk`"), "{e}");
        let two =
            "[[disk]]\nsocket = \"a\"\nimage = \"b\"\n[[disk]]\nsocket = \"a\"\nimage = \"c\"\n";
        let e = parse(two).unwrap_err();
        assert!(
            e.to_string()
                .contains("/etc/keel/d.toml:4:1: disk[1].socket"),
            "{e}"
        );
    }

    #[test]
    fn command_line_disk() {
        let args = Args::try_parse_from([
            "keel-vhost-blk",
            "--socket",
            "/s",
            "--image",
            "/i",
            "--read-only",
            "--queues",
            "2",
            "--affinity",
            "0,1",
        ])
        .unwrap();
        let d = disks_from_args(&args).unwrap();
        assert!(d[0].read_only);
        assert_eq!(d[0].queues, 2);
        assert_eq!(d[0].affinity, vec![0, 1]);
        let args = Args::try_parse_from(["keel-vhost-blk"]).unwrap();
        assert!(disks_from_args(&args).is_err());
        assert!(Args::try_parse_from(["keel-vhost-blk", "--socket", "/s"]).is_err());
    }
}
