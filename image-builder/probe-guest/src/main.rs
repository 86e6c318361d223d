//! keel-probe: a tiny `#![no_std]` x86_64 guest for keel's integration tests.
//!
//! keel-vmm loads it as an ELF (`ET_EXEC` linked at 1 MiB) with the Linux 64-bit
//! boot protocol, or, in the `pvh` build, through its PVH entry. It reports what
//! the VMM gave it (command line, memory map, CPUID, MP table) on the first
//! serial port, each line starting with `keel-probe: `, then runs the mode named
//! by `probe.mode=` on the command line and powers off through the i8042.
//!
//! Module layout: `entry` (assembly entry points), `boot` (zero page / PVH
//! start info), `serial`, `cmdline`, `cpu`, `mptable`, `modes`, `power`, plus the
//! low-level `port`, `phys` and `mmio` helpers. The device modes (`pci`,
//! `virtio`, `blk`, `net`) use `interrupts` (GDT, IDT, LAPIC), `pci` (conf1
//! enumeration, BARs, MSI-X) and `virtio` (modern virtio-pci transport, split
//! virtqueues, virtio-blk and virtio-net test drivers).

#![no_std]
#![no_main]

// First, so that its `say!`/`sayf!` macros are visible in every later module.
#[macro_use]
mod serial;

mod boot;
mod cmdline;
mod cpu;
mod entry;
mod interrupts;
mod mmio;
mod modes;
mod mptable;
mod pci;
mod phys;
mod port;
mod power;
mod virtio;

use core::panic::PanicInfo;

use crate::boot::{BootInfo, E820_RAM};
use crate::modes::Mode;
use crate::port::{debug_code, CODE_PANIC};
use crate::serial::Serial;

/// Bytes in one MiB.
const MIB: u64 = 1 << 20;

/// Rust entry, called by the assembly in [`entry`] with a stack and zeroed BSS.
///
/// `boot_params` is the physical address of the Linux zero page (Linux 64-bit
/// boot protocol); it is 0 when the PVH stub started us, and `pvh_start_info`
/// then holds the physical address of the `hvm_start_info` structure.
pub extern "C" fn keel_probe_main(boot_params: u64, pvh_start_info: u64) -> ! {
    let out = &mut Serial::init();
    say!(out, "hello");

    // SAFETY: the entry code passes exactly what the loader handed over: a zero
    // page address, or 0 and a PVH start info address. Both structures and what
    // they point to are identity-mapped memory the VMM does not change later.
    let info = unsafe { BootInfo::from_entry(boot_params, pvh_start_info) };
    let Some(info) = info else {
        say!(
            out,
            "boot=unknown rsi={boot_params:#x} rbx={pvh_start_info:#x}"
        );
        panic!("no boot information");
    };
    say!(out, "boot={}", info.kind.name());

    report(out, &info);

    let mode = Mode::from_cmdline(info.cmdline);
    modes::run(out, mode)
}

/// Prints the fixed report: command line, memory map, CPU and MP table.
fn report(out: &mut Serial, info: &BootInfo) {
    // The command line is printed byte for byte (it need not be UTF-8).
    out.write_bytes(serial::PREFIX);
    out.write_bytes(b"cmdline=");
    out.write_bytes(info.cmdline);
    out.write_bytes(b"\n");

    let mut ram = 0u64;
    for entry in info.e820.iter() {
        say!(
            out,
            "e820 addr={:#x} size={:#x} type={}",
            entry.addr,
            entry.size,
            entry.kind
        );
        if entry.kind == E820_RAM {
            ram = ram.saturating_add(entry.size);
        }
    }
    say!(out, "ram_mib={}", ram / MIB);

    let cpu = cpu::CpuInfo::read();
    out.write_bytes(serial::PREFIX);
    out.write_bytes(b"cpu vendor=");
    out.write_bytes(&cpu.vendor);
    match cpu.x2apic_id {
        Some(id) => sayf!(out, " apic_id={} x2apic_id={id}", cpu.apic_id),
        None => sayf!(out, " apic_id={} x2apic_id=none", cpu.apic_id),
    }
    sayf!(
        out,
        " hypervisor={} logical={}\n",
        u8::from(cpu.hypervisor),
        cpu.logical
    );

    match mptable::find() {
        Ok(counts) => say!(
            out,
            "mptable cpus={} ioapics={}",
            counts.cpus,
            counts.ioapics
        ),
        Err(err) => say!(out, "mptable {}", err.as_str()),
    }
}

#[panic_handler]
fn panic(info: &PanicInfo<'_>) -> ! {
    // The serial port keeps no state, so the panic path can always use it.
    let out = &mut Serial::new();
    say!(out, "panic: {}", info.message());
    debug_code(CODE_PANIC);
    power::reset()
}
