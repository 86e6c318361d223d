//! keel-image: builds reproducible minimal guest images for keel — a kernel, an
//! initramfs holding the static `keel-init`, kernel modules and the application, and
//! an optional ext4 or EROFS root file system — from one TOML spec.

pub mod cpio;
pub mod image;
pub mod kernel;
pub mod modules;
pub mod rootfs;
pub mod spec;

/// `SOURCE_DATE_EPOCH` from the environment (default 0): the timestamp written for
/// every file, so identical inputs give identical outputs.
pub fn source_date_epoch() -> u64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}
