//! A reproducible initramfs: an in-memory tree written as a sorted newc cpio archive
//! (fixed mtime, uid/gid 0, normalized modes, sequential inode numbers), gzipped with
//! a fixed header.

use std::collections::BTreeMap;
use std::io::Write;

use flate2::{Compression, GzBuilder};
use thiserror::Error;

/// Errors building the archive.
#[derive(Debug, Error)]
pub enum CpioError {
    /// Two entries want the same path, or a file sits where a directory is needed.
    #[error("initramfs path {path}: {message}")]
    Conflict {
        /// Guest path.
        path: String,
        /// What collided.
        message: String,
    },
    /// A field does not fit the newc format.
    #[error("initramfs path {0}: too large for a newc archive")]
    TooLarge(String),
    /// Compression failed.
    #[error("gzip: {0}")]
    Gzip(std::io::Error),
}

/// One archive entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    /// Directory (mode 0755).
    Dir,
    /// Regular file with permission bits.
    File {
        /// Contents.
        data: Vec<u8>,
        /// Permission bits.
        mode: u32,
    },
    /// Symbolic link.
    Symlink(String),
    /// Character device.
    CharDev {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
        /// Permission bits.
        mode: u32,
    },
}

/// The archive tree, keyed by path without the leading `/`.
#[derive(Debug, Default)]
pub struct Archive {
    entries: BTreeMap<String, Node>,
}

fn normalize(path: &str) -> String {
    path.split('/')
        .filter(|c| !c.is_empty())
        .collect::<Vec<_>>()
        .join("/")
}

impl Archive {
    /// Adds a directory and its parents (adding an existing directory is fine).
    pub fn add_dir(&mut self, path: &str) -> Result<(), CpioError> {
        let path = normalize(path);
        let mut cur = String::new();
        for comp in path.split('/').filter(|c| !c.is_empty()) {
            if !cur.is_empty() {
                cur.push('/');
            }
            cur.push_str(comp);
            match self.entries.get(&cur) {
                None => {
                    self.entries.insert(cur.clone(), Node::Dir);
                }
                Some(Node::Dir) => {}
                Some(_) => {
                    return Err(CpioError::Conflict {
                        path: format!("/{cur}"),
                        message: "is a file or link, but a directory is needed here".into(),
                    })
                }
            }
        }
        Ok(())
    }

    /// Adds a non-directory node (its parent directories are created).
    pub fn add(&mut self, path: &str, node: Node) -> Result<(), CpioError> {
        let path = normalize(path);
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.add_dir(parent)?;
        }
        if node == Node::Dir {
            return self.add_dir(&path);
        }
        if self.entries.contains_key(&path) {
            return Err(CpioError::Conflict {
                path: format!("/{path}"),
                message: "added twice".into(),
            });
        }
        self.entries.insert(path, node);
        Ok(())
    }

    /// Whether a path is present.
    pub fn contains(&self, path: &str) -> bool {
        self.entries.contains_key(&normalize(path))
    }

    /// Writes the uncompressed newc archive, entries sorted by path.
    pub fn to_newc(&self, mtime: u32) -> Result<Vec<u8>, CpioError> {
        let mut out = Vec::new();
        for (ino, (path, node)) in self.entries.iter().enumerate() {
            let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match node {
                Node::Dir => (0o040_755, 2, &[], (0, 0)),
                Node::File { data, mode } => (0o100_000 | (mode & 0o7777), 1, data, (0, 0)),
                Node::Symlink(t) => (0o120_777, 1, t.as_bytes(), (0, 0)),
                Node::CharDev { major, minor, mode } => {
                    (0o020_000 | (mode & 0o7777), 1, &[], (*major, *minor))
                }
            };
            let size = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge(path.clone()))?;
            let ino = u32::try_from(ino + 1).map_err(|_| CpioError::TooLarge(path.clone()))?;
            write_entry(&mut out, path, ino, mode, nlink, mtime, data, size, rdev);
        }
        write_entry(&mut out, "TRAILER!!!", 0, 0, 1, 0, &[], 0, (0, 0));
        Ok(out)
    }

    /// The gzip-compressed archive (header without name and with mtime 0).
    pub fn to_gzip(&self, mtime: u32) -> Result<Vec<u8>, CpioError> {
        let raw = self.to_newc(mtime)?;
        let mut enc = GzBuilder::new()
            .mtime(0)
            .write(Vec::new(), Compression::best());
        enc.write_all(&raw).map_err(CpioError::Gzip)?;
        enc.finish().map_err(CpioError::Gzip)
    }
}

#[allow(clippy::too_many_arguments)]
fn write_entry(
    out: &mut Vec<u8>,
    name: &str,
    ino: u32,
    mode: u32,
    nlink: u32,
    mtime: u32,
    data: &[u8],
    size: u32,
    rdev: (u32, u32),
) {
    let namesize = name.len() + 1;
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        mtime,
        size,
        0,
        0,
        rdev.0,
        rdev.1,
        namesize as u32,
        0,
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

fn pad4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorted_with_parents_and_trailer() {
        let mut a = Archive::default();
        a.add(
            "/lib/modules/x.ko",
            Node::File {
                data: b"abc".to_vec(),
                mode: 0o644,
            },
        )
        .unwrap();
        a.add("/bin/sh", Node::Symlink("busybox".into())).unwrap();
        let raw = a.to_newc(7).unwrap();
        let text = String::from_utf8_lossy(&raw);
        let order: Vec<usize> = [
            "bin\0",
            "bin/sh\0",
            "lib\0",
            "lib/modules\0",
            "lib/modules/x.ko\0",
            "TRAILER!!!\0",
        ]
        .iter()
        .map(|n| text.find(n).unwrap())
        .collect();
        assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
        assert_eq!(raw.len() % 4, 0);
        assert!(text.starts_with("070701"));
        // mtime field of the first entry
        assert_eq!(&raw[6 + 5 * 8..6 + 6 * 8], b"00000007");
        assert_eq!(a.to_gzip(7).unwrap(), a.to_gzip(7).unwrap());
    }

    #[test]
    fn conflicts() {
        let mut a = Archive::default();
        a.add("/x", Node::Symlink("y".into())).unwrap();
        assert!(a.add("/x/z", Node::Dir).is_err());
        assert!(a.add("/x", Node::Symlink("y".into())).is_err());
    }
}
