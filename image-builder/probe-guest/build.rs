//! Link settings for the probe guest.
//!
//! `.cargo/config.toml` next to this crate is not read when cargo is started
//! elsewhere with `--manifest-path`, so everything the link needs comes from
//! here: the linker script and a non-PIE static link, which turns the target's
//! default static-PIE output into a plain `ET_EXEC` at fixed addresses.

use std::env;
use std::path::PathBuf;
use std::process::exit;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=link.ld");

    let target = env::var("TARGET").unwrap_or_default();
    if target != "x86_64-unknown-none" {
        eprintln!(
            "keel-probe is a bare-metal guest: build it with --target x86_64-unknown-none \
             (got target {target:?})"
        );
        exit(1);
    }

    let Some(dir) = env::var_os("CARGO_MANIFEST_DIR") else {
        eprintln!("CARGO_MANIFEST_DIR is not set");
        exit(1);
    };
    let script = PathBuf::from(dir).join("link.ld");

    // rust-lld is called directly (ld.lld flavour), so these are plain linker flags.
    for arg in [
        format!("-T{}", script.display()),
        // Last of -pie/--no-pie wins: rustc passes -pie for the target's default.
        "--no-pie".to_owned(),
        "-static".to_owned(),
        "--no-dynamic-linker".to_owned(),
        // Pack sections in the file without page padding (the loaders read
        // each PT_LOAD by offset and place it at p_paddr).
        "--nmagic".to_owned(),
        "--build-id=none".to_owned(),
        "--gc-sections".to_owned(),
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
}
