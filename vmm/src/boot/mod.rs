//! Loading the guest: kernel (ELF vmlinux with or without a PVH note, or bzImage),
//! initramfs and command line, plus the tables the kernel reads at entry (zero page
//! with e820 or PVH start info, MP table, GDT, identity page tables).

pub mod gdt;
pub mod linux;
pub mod mptable;
pub mod paging;
pub mod pvh;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, KernelLoader};
use log::info;
use thiserror::Error;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    CMDLINE_ADDR, CMDLINE_MAX_SIZE, EBDA_START, GDT_ADDR, HIMEM_START, IDT_ADDR, MMIO_HOLE_START,
};
use crate::memory::GuestRam;

/// Errors while loading the guest.
#[derive(Debug, Error)]
pub enum BootError {
    /// The kernel file could not be opened or read.
    #[error("kernel {path}: {source}")]
    KernelFile {
        /// Kernel path.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// The kernel is neither ELF nor bzImage.
    #[error("kernel {0}: not an ELF vmlinux or bzImage")]
    NotAKernel(PathBuf),
    /// linux-loader rejected the kernel.
    #[error("kernel {path}: cannot load: {source}")]
    Load {
        /// Kernel path.
        path: PathBuf,
        /// Loader error.
        source: linux_loader::loader::Error,
    },
    /// The initramfs could not be read.
    #[error("initramfs {path}: {source}")]
    InitramfsFile {
        /// Initramfs path.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// The initramfs does not fit between the kernel and the top of low memory.
    #[error("initramfs {path} ({size} bytes) does not fit in guest memory below {limit:#x} above the kernel end {kernel_end:#x}")]
    InitramfsTooBig {
        /// Initramfs path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Highest usable address.
        limit: u64,
        /// End of the kernel image.
        kernel_end: u64,
    },
    /// The command line is invalid or too long.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot tables failed.
    #[error("cannot write boot structures into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// The MP table could not be written.
    #[error(transparent)]
    MpTable(#[from] mptable::MpTableError),
    /// Writing the zero page or PVH info failed.
    #[error("cannot write boot parameters: {0}")]
    Configurator(#[from] linux_loader::configurator::Error),
}

/// How the vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootProtocol {
    /// Linux 64-bit boot protocol: long mode, paging on, RSI = zero page.
    Linux64,
    /// PVH: 32-bit protected mode, paging off, EBX = start info.
    Pvh,
}

/// Where and how the boot vCPU starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootEntry {
    /// Protocol the kernel is entered with.
    pub protocol: BootProtocol,
    /// Guest-physical entry address.
    pub entry: u64,
}

/// What to boot.
pub struct BootSpec<'a> {
    /// Kernel image path.
    pub kernel: &'a Path,
    /// Optional initramfs path.
    pub initramfs: Option<&'a Path>,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// Number of vCPUs (for the MP table).
    pub vcpus: u8,
    /// Legacy interrupts of PCI functions (MP table routing entries).
    pub pci_intx: &'a [mptable::PciIntx],
}

/// A loaded initramfs.
#[derive(Debug, Clone, Copy)]
pub struct Initramfs {
    /// Guest address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

enum KernelKind {
    Elf,
    BzImage,
}

fn sniff(file: &mut File) -> std::io::Result<Option<KernelKind>> {
    let mut head = [0u8; 0x206];
    file.seek(SeekFrom::Start(0))?;
    let n = read_up_to(file, &mut head)?;
    if n >= 4 && &head[..4] == b"\x7fELF" {
        return Ok(Some(KernelKind::Elf));
    }
    if n >= 0x206 && &head[0x202..0x206] == b"HdrS" {
        return Ok(Some(KernelKind::BzImage));
    }
    Ok(None)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut total = 0;
    while total < buf.len() {
        match file.read(&mut buf[total..])? {
            0 => break,
            n => total += n,
        }
    }
    Ok(total)
}

/// Loads everything the guest needs and returns its entry point.
pub fn load(ram: &GuestRam, spec: &BootSpec<'_>) -> Result<BootEntry, BootError> {
    let mem = ram.memory();
    let kernel_err = |source| BootError::KernelFile {
        path: spec.kernel.to_path_buf(),
        source,
    };
    let mut file = File::open(spec.kernel).map_err(kernel_err)?;
    let kind = sniff(&mut file)
        .map_err(kernel_err)?
        .ok_or_else(|| BootError::NotAKernel(spec.kernel.to_path_buf()))?;
    let load_err = |source| BootError::Load {
        path: spec.kernel.to_path_buf(),
        source,
    };
    let himem = Some(GuestAddress(HIMEM_START));
    let (result, entry) = match kind {
        KernelKind::Elf => {
            let r = Elf::load(mem, None, &mut file, himem).map_err(load_err)?;
            let entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => BootEntry {
                    protocol: BootProtocol::Pvh,
                    entry: addr.0,
                },
                _ => BootEntry {
                    protocol: BootProtocol::Linux64,
                    entry: r.kernel_load.0,
                },
            };
            (r, entry)
        }
        KernelKind::BzImage => {
            let r = BzImage::load(mem, None, &mut file, himem).map_err(load_err)?;
            // The 64-bit entry (startup_64) is 0x200 bytes into the protected-mode code.
            let entry = BootEntry {
                protocol: BootProtocol::Linux64,
                entry: r.kernel_load.0 + 0x200,
            };
            (r, entry)
        }
    };
    // linux-loader reports the end as an absolute guest address.
    let kernel_end = result.kernel_end;

    let initramfs = match spec.initramfs {
        Some(path) => Some(load_initramfs(
            mem,
            path,
            kernel_end,
            ram.size().min(MMIO_HOLE_START),
            result.setup_header.as_ref(),
        )?),
        None => None,
    };

    let mut cmdline =
        Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(spec.cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_size = spec.cmdline.len() as u32 + 1;

    write_gdt(mem)?;
    paging::write_identity_map(mem)?;
    mptable::write(mem, spec.vcpus, spec.pci_intx)?;
    let e820 = e820_map(ram);
    match entry.protocol {
        BootProtocol::Linux64 => {
            linux::write_zero_page(mem, result.setup_header, cmdline_size, initramfs, &e820)?
        }
        BootProtocol::Pvh => pvh::write_start_info(mem, initramfs, &e820)?,
    }
    info!(
        "kernel {} loaded: {:?} entry {:#x}, end {:#x}{}",
        spec.kernel.display(),
        entry.protocol,
        entry.entry,
        kernel_end,
        initramfs
            .map(|i| format!(", initramfs at {:#x} ({} bytes)", i.addr, i.size))
            .unwrap_or_default()
    );
    Ok(entry)
}

fn load_initramfs(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    low_ram_end: u64,
    header: Option<&setup_header>,
) -> Result<Initramfs, BootError> {
    let file_err = |source| BootError::InitramfsFile {
        path: path.to_path_buf(),
        source,
    };
    let mut file = File::open(path).map_err(file_err)?;
    let size = file.metadata().map_err(file_err)?.len();
    // bzImage kernels say how high the initramfs may go; ELF kernels get the
    // traditional limit of the boot protocol.
    let addr_max = header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(0x37ff_ffff);
    let limit = low_ram_end.min(addr_max + 1);
    let too_big = || BootError::InitramfsTooBig {
        path: path.to_path_buf(),
        size,
        limit,
        kernel_end,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_big)? & !0xfff;
    if addr < kernel_end || size == 0 {
        return Err(too_big());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|e| file_err(std::io::Error::other(e.to_string())))?;
    Ok(Initramfs { addr, size })
}

fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), BootError> {
    for (i, d) in gdt::GDT.iter().enumerate() {
        mem.write_obj(*d, GuestAddress(GDT_ADDR + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;
    Ok(())
}

/// E820 memory type: usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 memory type: reserved.
pub const E820_RESERVED: u32 = 2;

/// One memory-map entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Length.
    pub size: u64,
    /// Type (1 = RAM).
    pub kind: u32,
}

/// The memory map the guest is told about: low RAM up to the EBDA, RAM from 1 MiB up
/// to the hole, RAM above 4 GiB.
pub fn e820_map(ram: &GuestRam) -> Vec<E820Entry> {
    let mut map = vec![E820Entry {
        addr: 0,
        size: EBDA_START,
        kind: E820_RAM,
    }];
    for r in ram.regions() {
        let start = r.guest_addr.max(HIMEM_START);
        let end = r.guest_addr + r.size;
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820_RAM,
            });
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{HugePages, MemoryConfig};
    use linux_loader::loader::bootparam::boot_params;
    use std::io::Write;

    fn ram() -> GuestRam {
        match crate::memory::create(&MemoryConfig {
            size_bytes: 32 << 20,
            hugepages: HugePages::None,
            numa_node: None,
            prefault: false,
        }) {
            Ok(r) => r,
            Err(e) => panic!("guest RAM: {e}"),
        }
    }

    /// A minimal bzImage: one setup sector after the boot sector, then `payload`
    /// as the protected-mode kernel.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut img = vec![0u8; 1024];
        img[0x1f1] = 1; // setup_sects
        img[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[0x202..0x206].copy_from_slice(b"HdrS");
        img[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        img[0x211] = 0x01; // loadflags: LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x0010_0000u32.to_le_bytes()); // code32_start
        img[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        img[0x230..0x234].copy_from_slice(&0x0020_0000u32.to_le_bytes()); // kernel_alignment
        img.extend_from_slice(payload);
        img
    }

    fn temp_file(dir: &tempfile::TempDir, name: &str, bytes: &[u8]) -> PathBuf {
        let path = dir.path().join(name);
        let mut f = File::create(&path).unwrap();
        f.write_all(bytes).unwrap();
        path
    }

    #[test]
    fn bzimage_loads_at_1mib_with_64bit_entry_zero_page_and_initramfs() {
        let dir = tempfile::tempdir().unwrap();
        let payload: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let kernel = temp_file(&dir, "bzImage", &bzimage(&payload));
        let initrd = temp_file(&dir, "initrd", &[0x5a; 5000]);
        let ram = ram();
        let entry = load(
            &ram,
            &BootSpec {
                kernel: &kernel,
                initramfs: Some(&initrd),
                cmdline: "console=ttyS0 quiet",
                vcpus: 2,
                pci_intx: &[],
            },
        )
        .unwrap();
        assert_eq!(
            entry,
            BootEntry {
                protocol: BootProtocol::Linux64,
                entry: 0x10_0200
            }
        );
        let mem = ram.memory();
        let mut loaded = vec![0u8; payload.len()];
        mem.read_slice(&mut loaded, GuestAddress(0x10_0000))
            .unwrap();
        assert_eq!(loaded, payload);

        let params: boot_params = mem
            .read_obj(GuestAddress(crate::layout::ZERO_PAGE_ADDR))
            .unwrap();
        let hdr = params.hdr;
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        let mut cmdline = vec![0u8; 20];
        mem.read_slice(&mut cmdline, GuestAddress(CMDLINE_ADDR))
            .unwrap();
        assert_eq!(&cmdline[..19], b"console=ttyS0 quiet");
        assert_eq!(cmdline[19], 0);
        assert_eq!({ hdr.ramdisk_size }, 5000);
        let rd = u64::from(hdr.ramdisk_image);
        assert_eq!(rd % 4096, 0);
        assert!(rd + 5000 <= 32 << 20);
        let mut byte = [0u8; 1];
        mem.read_slice(&mut byte, GuestAddress(rd + 4999)).unwrap();
        assert_eq!(byte[0], 0x5a);
        let entries = params.e820_entries;
        assert_eq!(entries, 2);
        let e1 = params.e820_table[1];
        assert_eq!(
            ({ e1.addr }, { e1.size }, { e1.r#type }),
            (0x10_0000, (32 << 20) - 0x10_0000, 1)
        );
    }

    #[test]
    fn garbage_and_truncated_kernels_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let ram = ram();
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("empty", vec![]),
            ("text", b"hello, not a kernel".to_vec()),
            ("elf-truncated", b"\x7fELF\x02\x01\x01".to_vec()),
            ("bz-header-only", bzimage(&[])[..0x300].to_vec()),
        ];
        for (name, bytes) in cases {
            let kernel = temp_file(&dir, name, &bytes);
            let r = load(
                &ram,
                &BootSpec {
                    kernel: &kernel,
                    initramfs: None,
                    cmdline: "",
                    vcpus: 1,
                    pci_intx: &[],
                },
            );
            assert!(r.is_err(), "{name} loaded");
        }
    }

    #[test]
    fn an_initramfs_too_big_for_low_memory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let kernel = temp_file(&dir, "bzImage", &bzimage(&[0x90; 512]));
        let initrd = temp_file(&dir, "initrd", &vec![0u8; 33 << 20]);
        let r = load(
            &ram(),
            &BootSpec {
                kernel: &kernel,
                initramfs: Some(&initrd),
                cmdline: "",
                vcpus: 1,
                pci_intx: &[],
            },
        );
        assert!(matches!(r, Err(BootError::InitramfsTooBig { .. })), "{r:?}");
    }
}
