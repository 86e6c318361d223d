//! Kernel modules: an index of a `lib/modules/VERSION` tree, dependencies read from
//! each module's `.modinfo` ELF section (`depends=`), and a load order in which
//! every module comes after its dependencies.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

/// Errors resolving modules.
#[derive(Debug, Error)]
pub enum ModuleError {
    /// No such module and not built in.
    #[error("kernel module {name} not found in {dir}{hint}")]
    NotFound {
        /// Module name.
        name: String,
        /// Where we looked.
        dir: String,
        /// Who needed it, if it is a dependency.
        hint: String,
    },
    /// Modules were asked for but the kernel has no modules directory.
    #[error("kernel modules {0:?} requested, but the kernel has no modules directory (set kernel.modules_dir)")]
    NoModulesDir(Vec<String>),
    /// Reading or decompressing a module failed.
    #[error("module {path}: {detail}")]
    Read {
        /// Module file.
        path: String,
        /// What went wrong.
        detail: String,
    },
    /// The file is not a usable ELF module.
    #[error("module {path}: not an ELF64 kernel module ({detail})")]
    BadElf {
        /// Module file.
        path: String,
        /// What is wrong.
        detail: &'static str,
    },
    /// Dependency cycle.
    #[error("kernel module dependency cycle through {0}")]
    Cycle(String),
}

/// One module to put in the initramfs, decompressed.
#[derive(Debug, Clone)]
pub struct Module {
    /// Canonical name (dashes turned into underscores).
    pub name: String,
    /// ELF contents.
    pub data: Vec<u8>,
}

fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

/// Name of a module file (`virtio_blk.ko.xz` → `virtio_blk`), if it is one.
fn module_name(file: &str) -> Option<String> {
    [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))
        .map(canonical)
}

/// All modules under a modules directory, and the built-in ones.
#[derive(Debug, Default)]
pub struct Index {
    dir: PathBuf,
    files: BTreeMap<String, PathBuf>,
    builtin: BTreeSet<String>,
}

impl Index {
    /// Walks `dir` (a `lib/modules/VERSION` tree).
    pub fn scan(dir: &Path) -> Result<Self, ModuleError> {
        let mut idx = Index {
            dir: dir.to_path_buf(),
            ..Index::default()
        };
        let mut stack = vec![dir.to_path_buf()];
        while let Some(d) = stack.pop() {
            let rd = std::fs::read_dir(&d).map_err(|e| ModuleError::Read {
                path: d.display().to_string(),
                detail: e.to_string(),
            })?;
            for entry in rd.filter_map(|e| e.ok()) {
                let p = entry.path();
                let ft = match entry.file_type() {
                    Ok(ft) => ft,
                    Err(_) => continue,
                };
                if ft.is_dir() {
                    stack.push(p);
                } else if let Some(name) = entry.file_name().to_str().and_then(module_name) {
                    // Keep the first in path order for determinism.
                    match idx.files.get(&name) {
                        Some(existing) if existing <= &p => {}
                        _ => {
                            idx.files.insert(name, p);
                        }
                    }
                }
            }
        }
        if let Ok(text) = std::fs::read_to_string(dir.join("modules.builtin")) {
            idx.builtin = text
                .lines()
                .filter_map(|l| l.rsplit('/').next())
                .filter_map(module_name)
                .collect();
        }
        Ok(idx)
    }

    fn load(&self, name: &str, needed_by: Option<&str>) -> Result<Option<Module>, ModuleError> {
        let Some(path) = self.files.get(name) else {
            if self.builtin.contains(name) {
                return Ok(None);
            }
            return Err(ModuleError::NotFound {
                name: name.to_string(),
                dir: self.dir.display().to_string(),
                hint: needed_by
                    .map(|n| format!(" (needed by {n})"))
                    .unwrap_or_default(),
            });
        };
        let data = read_module(path)?;
        Ok(Some(Module {
            name: name.to_string(),
            data,
        }))
    }

    /// The requested modules plus their dependencies, each after its dependencies.
    /// Built-in modules are skipped (logged).
    pub fn resolve(&self, requested: &[String]) -> Result<Vec<Module>, ModuleError> {
        let mut order = Vec::new();
        let mut done = BTreeSet::new();
        let mut visiting = BTreeSet::new();
        for r in requested {
            self.visit(&canonical(r), None, &mut order, &mut done, &mut visiting)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        needed_by: Option<&str>,
        order: &mut Vec<Module>,
        done: &mut BTreeSet<String>,
        visiting: &mut BTreeSet<String>,
    ) -> Result<(), ModuleError> {
        if done.contains(name) {
            return Ok(());
        }
        if !visiting.insert(name.to_string()) {
            return Err(ModuleError::Cycle(name.to_string()));
        }
        match self.load(name, needed_by)? {
            None => log::info!("module {name} is built into the kernel"),
            Some(m) => {
                let path = self.files.get(name).cloned().unwrap_or_default();
                let mut deps = depends(&m.data, &path)?;
                deps.sort();
                for d in deps {
                    self.visit(&d, Some(name), order, done, visiting)?;
                }
                order.push(m);
            }
        }
        visiting.remove(name);
        done.insert(name.to_string());
        Ok(())
    }
}

fn read_module(path: &Path) -> Result<Vec<u8>, ModuleError> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    let err = |detail: String| ModuleError::Read {
        path: name.to_string(),
        detail,
    };
    match tool {
        None => std::fs::read(path).map_err(|e| err(e.to_string())),
        Some(tool) => {
            let out = Command::new(tool)
                .arg("-dc")
                .arg(path)
                .output()
                .map_err(|e| err(format!("cannot run {tool} to decompress it: {e}")))?;
            if !out.status.success() {
                return Err(err(format!(
                    "{tool} -dc failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            Ok(out.stdout)
        }
    }
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn u64_at(b: &[u8], off: usize) -> Option<usize> {
    usize::try_from(u64::from_le_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
    .ok()
}

/// The `.modinfo` section of an ELF64 little-endian module.
fn modinfo<'a>(elf: &'a [u8], path: &Path) -> Result<&'a [u8], ModuleError> {
    let bad = |detail| ModuleError::BadElf {
        path: path.display().to_string(),
        detail,
    };
    if elf.get(..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Err(bad("not a 64-bit little-endian ELF file"));
    }
    let shoff = u64_at(elf, 0x28).ok_or(bad("truncated header"))?;
    let shentsize = usize::from(u16_at(elf, 0x3a).ok_or(bad("truncated header"))?);
    let shnum = usize::from(u16_at(elf, 0x3c).ok_or(bad("truncated header"))?);
    let shstrndx = usize::from(u16_at(elf, 0x3e).ok_or(bad("truncated header"))?);
    if shentsize < 0x40 {
        return Err(bad("bad section header size"));
    }
    let section = |i: usize| -> Option<(u32, usize, usize)> {
        let base = shoff.checked_add(i.checked_mul(shentsize)?)?;
        Some((
            u32_at(elf, base)?,
            u64_at(elf, base.checked_add(0x18)?)?,
            u64_at(elf, base.checked_add(0x20)?)?,
        ))
    };
    let (_, str_off, str_size) = section(shstrndx).ok_or(bad("bad section string table"))?;
    let strtab = elf
        .get(str_off..str_off.saturating_add(str_size))
        .ok_or(bad("bad section string table"))?;
    for i in 0..shnum {
        let (name_off, off, size) = section(i).ok_or(bad("truncated section headers"))?;
        let name = strtab
            .get(name_off as usize..)
            .and_then(|s| s.split(|&c| c == 0).next())
            .unwrap_or_default();
        if name == b".modinfo" {
            return elf
                .get(off..off.saturating_add(size))
                .ok_or(bad("truncated .modinfo"));
        }
    }
    Err(bad("no .modinfo section"))
}

/// The `depends=` list of a module.
pub fn depends(elf: &[u8], path: &Path) -> Result<Vec<String>, ModuleError> {
    let info = modinfo(elf, path)?;
    Ok(info
        .split(|&c| c == 0)
        .filter_map(|kv| kv.strip_prefix(b"depends="))
        .flat_map(|v| {
            String::from_utf8_lossy(v)
                .split(',')
                .map(canonical)
                .collect::<Vec<_>>()
        })
        .filter(|d| !d.is_empty())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(module_name("virtio_blk.ko").as_deref(), Some("virtio_blk"));
        assert_eq!(
            module_name("virtio-rng.ko.xz").as_deref(),
            Some("virtio_rng")
        );
        assert_eq!(module_name("modules.dep"), None);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let p = Path::new("x.ko");
        assert!(depends(b"", p).is_err());
        assert!(depends(b"\x7fELF\x02\x01\x01", p).is_err());
        let mut hdr = vec![0u8; 64];
        hdr[..6].copy_from_slice(b"\x7fELF\x02\x01");
        hdr[0x28..0x30].copy_from_slice(&u64::MAX.to_le_bytes());
        hdr[0x3a] = 0x40;
        hdr[0x3c] = 5;
        assert!(depends(&hdr, p).is_err());
    }
}
