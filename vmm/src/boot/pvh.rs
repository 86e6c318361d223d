//! The PVH start info (`hvm_start_info`) with its memory map and module list.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{BootError, E820Entry, Initramfs};
use crate::layout::{CMDLINE_ADDR, PVH_INFO_ADDR, PVH_MEMMAP_ADDR, PVH_MEMMAP_MAX};

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// Writes the start info, memory map and (optional) initramfs module entry.
pub fn write_start_info(
    mem: &GuestMemoryMmap,
    initramfs: Option<Initramfs>,
    e820: &[E820Entry],
) -> Result<(), BootError> {
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .take(PVH_MEMMAP_MAX)
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind,
            reserved: 0,
        })
        .collect();
    let modlist_addr =
        PVH_MEMMAP_ADDR + (PVH_MEMMAP_MAX * std::mem::size_of::<hvm_memmap_table_entry>()) as u64;
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let modules: Vec<hvm_modlist_entry> = initramfs
        .map(|i| hvm_modlist_entry {
            paddr: i.addr,
            size: i.size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    if !modules.is_empty() {
        info.nr_modules = modules.len() as u32;
        info.modlist_paddr = modlist_addr;
    }
    let mut params = BootParams::new(&info, GuestAddress(PVH_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_ADDR));
    if !modules.is_empty() {
        params.set_modules(&modules, GuestAddress(modlist_addr));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem)?;
    Ok(())
}
