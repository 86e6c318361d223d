//! Facts about the host that a config is checked against, read from sysfs.
//!
//! Every function takes the sysfs root (normally `/sys`) so that tests can point it at a
//! fake tree.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// 2 MiB huge page size in bytes.
const PAGE_2M: u64 = 2 << 20;
/// 1 GiB huge page size in bytes.
const PAGE_1G: u64 = 1 << 30;

/// An error reading host facts from sysfs. Display is a single line.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// A sysfs file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// A sysfs file did not have the expected format.
    #[error("cannot parse {}: expected {expected}, found {found:?}", path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// What the file should contain.
        expected: &'static str,
        /// What it contained.
        found: String,
    },
    /// The page size is not a huge page size this VMM supports.
    #[error("unsupported huge page size {0} bytes: expected 2MiB or 1GiB")]
    UnsupportedPageSize(u64),
    /// The kernel has no pool for this huge page size (CPU or kernel lacks support).
    #[error(
        "{label} hugepages are not available on this host ({} does not exist); \
         use hugepages = \"none\" or a supported size",
        dir.display()
    )]
    HugepagesUnavailable {
        /// `"2M"` or `"1G"`.
        label: &'static str,
        /// The sysfs directory that is missing.
        dir: PathBuf,
    },
    /// The free pool is smaller than the guest memory.
    #[error("not enough free {label} hugepages: need {needed}, free {free} (raise with: {fix})")]
    NotEnoughHugepages {
        /// `"2M"` or `"1G"`.
        label: &'static str,
        /// Pages needed for guest memory.
        needed: u64,
        /// Pages currently free.
        free: u64,
        /// Pages in the pool (free or used).
        total: u64,
        /// Commands that raise the pool enough.
        fix: String,
    },
}

/// The host CPUs and NUMA nodes a sandbox may use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostInfo {
    /// Online CPUs, ascending.
    pub online_cpus: Vec<u32>,
    /// Online NUMA nodes, ascending (`[0]` on hosts without NUMA information).
    pub numa_nodes: Vec<u32>,
}

impl HostInfo {
    /// Reads `devices/system/cpu/online` and `devices/system/node/online` under
    /// `sysfs_root`. A missing node file means a non-NUMA host: nodes are `[0]`.
    pub fn read(sysfs_root: &Path) -> Result<HostInfo, HostError> {
        let cpu_path = sysfs_root.join("devices/system/cpu/online");
        let online_cpus = read_list(&cpu_path)?;
        let node_path = sysfs_root.join("devices/system/node/online");
        let numa_nodes = match fs::read_to_string(&node_path) {
            Ok(text) => parse_list_file(&node_path, &text)?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => vec![0],
            Err(source) => {
                return Err(HostError::Read {
                    path: node_path,
                    source,
                })
            }
        };
        Ok(HostInfo {
            online_cpus,
            numa_nodes,
        })
    }

    /// True if `cpu` is online.
    pub fn has_cpu(&self, cpu: u32) -> bool {
        self.online_cpus.contains(&cpu)
    }

    /// True if NUMA node `node` is online.
    pub fn has_numa_node(&self, node: u32) -> bool {
        self.numa_nodes.contains(&node)
    }
}

/// Parses a kernel CPU/node list such as `"0-3,5,8-9"` into ascending, de-duplicated
/// numbers. An empty (or whitespace-only) list is valid and empty.
pub fn parse_cpu_list(text: &str) -> Option<Vec<u32>> {
    let mut out = Vec::new();
    let text = text.trim();
    if text.is_empty() {
        return Some(out);
    }
    for part in text.split(',') {
        let part = part.trim();
        match part.split_once('-') {
            Some((first, last)) => {
                let first: u32 = first.trim().parse().ok()?;
                let last: u32 = last.trim().parse().ok()?;
                if first > last {
                    return None;
                }
                out.extend(first..=last);
            }
            None => out.push(part.parse().ok()?),
        }
    }
    out.sort_unstable();
    out.dedup();
    Some(out)
}

/// Renders ascending numbers back into the kernel's range form (`0-3,5`).
pub fn format_cpu_list(cpus: &[u32]) -> String {
    let mut parts = Vec::new();
    let mut iter = cpus.iter().copied().peekable();
    while let Some(first) = iter.next() {
        let mut last = first;
        while iter.peek() == Some(&(last.wrapping_add(1))) && last != u32::MAX {
            last += 1;
            iter.next();
        }
        if first == last {
            parts.push(first.to_string());
        } else {
            parts.push(format!("{first}-{last}"));
        }
    }
    parts.join(",")
}

/// Checks that the huge page pool for `page_size` has enough free pages for
/// `needed_bytes` of guest memory. A `page_size` of 4096 (no huge pages) always passes.
pub fn check_hugepage_pool(
    sysfs_root: &Path,
    page_size: u64,
    needed_bytes: u64,
) -> Result<(), HostError> {
    let (label, kib) = match page_size {
        4096 => return Ok(()),
        PAGE_2M => ("2M", 2048u64),
        PAGE_1G => ("1G", 1_048_576u64),
        other => return Err(HostError::UnsupportedPageSize(other)),
    };
    let dir = sysfs_root.join(format!("kernel/mm/hugepages/hugepages-{kib}kB"));
    if !dir.is_dir() {
        return Err(HostError::HugepagesUnavailable { label, dir });
    }
    let free = read_number(&dir.join("free_hugepages"))?;
    let total = read_number(&dir.join("nr_hugepages"))?;
    let needed = needed_bytes.div_ceil(page_size);
    if free >= needed {
        return Ok(());
    }
    let target = total.saturating_add(needed - free);
    let nr_path = Path::new("/sys/kernel/mm/hugepages")
        .join(format!("hugepages-{kib}kB"))
        .join("nr_hugepages");
    let echo = format!("echo {target} > {}", nr_path.display());
    // `vm.nr_hugepages` only sizes the default huge page size, which is 2M on x86-64.
    let fix = if page_size == PAGE_2M {
        format!("sysctl vm.nr_hugepages={target} or {echo}")
    } else {
        format!("{echo}, or boot with hugepagesz=1G hugepages={target}")
    };
    Err(HostError::NotEnoughHugepages {
        label,
        needed,
        free,
        total,
        fix,
    })
}

fn read_file(path: &Path) -> Result<String, HostError> {
    fs::read_to_string(path).map_err(|source| HostError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn read_list(path: &Path) -> Result<Vec<u32>, HostError> {
    let text = read_file(path)?;
    parse_list_file(path, &text)
}

fn parse_list_file(path: &Path, text: &str) -> Result<Vec<u32>, HostError> {
    parse_cpu_list(text).ok_or_else(|| HostError::Parse {
        path: path.to_path_buf(),
        expected: "a list like \"0-3,5\"",
        found: text.trim().to_string(),
    })
}

fn read_number(path: &Path) -> Result<u64, HostError> {
    let text = read_file(path)?;
    text.trim().parse().map_err(|_| HostError::Parse {
        path: path.to_path_buf(),
        expected: "a number",
        found: text.trim().to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::test_util::TempDir;

    #[test]
    fn cpu_lists() {
        assert_eq!(parse_cpu_list("0-3,5\n"), Some(vec![0, 1, 2, 3, 5]));
        assert_eq!(parse_cpu_list("0"), Some(vec![0]));
        assert_eq!(parse_cpu_list(""), Some(vec![]));
        assert_eq!(parse_cpu_list("5,1-2,2"), Some(vec![1, 2, 5]));
        assert_eq!(parse_cpu_list("3-1"), None);
        assert_eq!(parse_cpu_list("a"), None);
        assert_eq!(parse_cpu_list("1,,2"), None);
        assert_eq!(format_cpu_list(&[0, 1, 2, 3, 5, 7, 8]), "0-3,5,7-8");
        assert_eq!(format_cpu_list(&[]), "");
    }

    #[test]
    fn reads_fake_sysfs() {
        let dir = TempDir::new("host-read");
        dir.write("devices/system/cpu/online", "0-3,6\n");
        let host = HostInfo::read(dir.path());
        assert_eq!(
            host.ok(),
            Some(HostInfo {
                online_cpus: vec![0, 1, 2, 3, 6],
                numa_nodes: vec![0],
            })
        );
        dir.write("devices/system/node/online", "0-1\n");
        let host = HostInfo::read(dir.path()).ok();
        assert_eq!(host.map(|h| h.numa_nodes), Some(vec![0, 1]));
        dir.write("devices/system/node/online", "zero\n");
        let err = HostInfo::read(dir.path()).err().map(|e| e.to_string());
        assert!(err.is_some_and(|e| e.contains("found \"zero\"")));
    }

    #[test]
    fn missing_cpu_file_is_an_error() {
        let dir = TempDir::new("host-missing");
        let err = HostInfo::read(dir.path()).err().map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.starts_with("cannot read ") && e.contains("cpu/online")),
            "{err:?}"
        );
    }

    #[test]
    fn hugepage_pool() {
        let dir = TempDir::new("host-hugepages");
        let pool = "kernel/mm/hugepages/hugepages-2048kB";
        dir.write(&format!("{pool}/free_hugepages"), "12\n");
        dir.write(&format!("{pool}/nr_hugepages"), "20\n");
        assert!(check_hugepage_pool(dir.path(), 4096, 1 << 40).is_ok());
        assert!(check_hugepage_pool(dir.path(), PAGE_2M, 24 << 20).is_ok());
        let err = check_hugepage_pool(dir.path(), PAGE_2M, 512 << 20)
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(
                "not enough free 2M hugepages: need 256, free 12 (raise with: \
                 sysctl vm.nr_hugepages=264 or echo 264 > \
                 /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages)"
            )
        );
        let err = check_hugepage_pool(dir.path(), PAGE_1G, 1 << 30)
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.starts_with("1G hugepages are not available")),
            "{err:?}"
        );
        let err = check_hugepage_pool(dir.path(), 65536, 1 << 30);
        assert!(matches!(err, Err(HostError::UnsupportedPageSize(65536))));
    }
}
