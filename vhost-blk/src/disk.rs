//! The exported disk: an open image file or block device and what the guest may see of it.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::config::{DiskConfig, MAX_SERIAL_LEN};

/// Bytes per virtio-blk sector (the unit of request offsets and capacity).
pub const SECTOR_SIZE: u64 = 512;

/// Why a disk could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// open(2) failed.
    #[error("cannot open disk image {}: {source}", path.display())]
    Open {
        /// The image path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The size could not be determined.
    #[error("cannot determine the size of {}: {source}", path.display())]
    Size {
        /// The image path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The image is neither a regular file nor a block device.
    #[error("{} is neither a regular file nor a block device", path.display())]
    Kind {
        /// The image path.
        path: PathBuf,
    },
}

/// An open disk shared by all queues of one export.
#[derive(Debug)]
pub struct Disk {
    /// The open image.
    pub file: File,
    /// Size in bytes, rounded down to whole sectors.
    pub size: u64,
    /// Writes, discards and write-zeroes are refused.
    pub read_only: bool,
    /// Whether the image is a block device (fallocate modes differ).
    pub is_block_device: bool,
    /// Opened with O_DIRECT (no page cache, so no synchronous fast path).
    pub direct: bool,
    /// Serial reported by GET_ID, zero-padded.
    pub serial: [u8; MAX_SERIAL_LEN],
    /// Volatile write cache on (writeback). When off, writes use RWF_DSYNC.
    write_cache: AtomicBool,
}

impl Disk {
    /// Opens the image described by `cfg`.
    pub fn open(cfg: &DiskConfig) -> Result<Disk, DiskError> {
        let mut flags = libc::O_CLOEXEC;
        if cfg.direct {
            flags |= libc::O_DIRECT;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(!cfg.read_only)
            .custom_flags(flags)
            .open(&cfg.image)
            .map_err(|source| DiskError::Open {
                path: cfg.image.clone(),
                source,
            })?;
        let size_err = |source| DiskError::Size {
            path: cfg.image.clone(),
            source,
        };
        let kind = file.metadata().map_err(size_err)?.file_type();
        if !kind.is_file() && !kind.is_block_device() {
            return Err(DiskError::Kind {
                path: cfg.image.clone(),
            });
        }
        // Works for regular files and block devices alike.
        let bytes = file.seek(SeekFrom::End(0)).map_err(size_err)?;
        let mut serial = [0u8; MAX_SERIAL_LEN];
        let id = cfg.serial.as_bytes();
        let n = id.len().min(MAX_SERIAL_LEN);
        serial[..n].copy_from_slice(&id[..n]);
        Ok(Disk {
            file,
            size: bytes / SECTOR_SIZE * SECTOR_SIZE,
            read_only: cfg.read_only,
            is_block_device: kind.is_block_device(),
            direct: cfg.direct,
            serial,
            write_cache: AtomicBool::new(cfg.write_cache),
        })
    }

    /// A disk over an already open file (tests: pipes and the like that `open`
    /// refuses), write cache on.
    #[cfg(test)]
    pub(crate) fn from_file(file: File, size: u64) -> Disk {
        Disk {
            file,
            size,
            read_only: false,
            is_block_device: false,
            direct: false,
            serial: [0; MAX_SERIAL_LEN],
            write_cache: AtomicBool::new(true),
        }
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    /// Whether the volatile write cache is on.
    pub fn write_cache(&self) -> bool {
        self.write_cache.load(Ordering::Relaxed)
    }

    /// Turns the write cache on or off (the guest writes the `wce` config field).
    pub fn set_write_cache(&self, on: bool) {
        self.write_cache.store(on, Ordering::Relaxed);
    }
}
