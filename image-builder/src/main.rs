//! keel-image command line: `keel-image build SPEC.toml --out DIR`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "keel-image",
    version,
    about = "Build reproducible minimal guest images for keel"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build an image from a spec into DIR (replaced atomically).
    Build {
        /// The image spec (TOML).
        spec: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Download cache for Debian kernels (default: $KEEL_IMAGE_CACHE or ~/.cache/keel-image).
        #[arg(long)]
        cache: Option<PathBuf>,
        /// The static keel-init binary (default: [init] path, $KEEL_INIT, or next to keel-image).
        #[arg(long)]
        init: Option<PathBuf>,
    },
}

fn default_cache() -> PathBuf {
    if let Some(p) = std::env::var_os("KEEL_IMAGE_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("keel-image");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache/keel-image"),
        None => PathBuf::from(".keel-image-cache"),
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Build {
            spec,
            out,
            cache,
            init,
        } => {
            let opts = keel_image::image::Options {
                spec,
                out: out.clone(),
                cache: cache.unwrap_or_else(default_cache),
                init,
            };
            match keel_image::image::build(&opts) {
                Ok(m) => {
                    for f in &m.files {
                        println!("{:<20} {:>10}  {}", f.name, f.size, f.sha256);
                    }
                    println!("image written to {}", out.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("keel-image: error: {e}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
