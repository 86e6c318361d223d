//! Interrupt handling for the device modes: our own GDT and IDT (64-bit
//! interrupt gates for all 256 vectors), the local APIC (xAPIC or x2APIC),
//! per-vector counters, and a bounded wait (`sti; hlt` with a LAPIC timer tick
//! as a wake-up, so a missing device interrupt ends in a poll, not a hang).
//!
//! Nothing here runs in the original modes (hello, echo, ...): [`init`] is
//! called by the PCI/virtio modes only.

use core::arch::{asm, global_asm};
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use crate::cpu;
use crate::mmio;
use crate::port::outb;
use crate::serial::Serial;

/// Vector of the LAPIC timer tick that bounds every `hlt`.
pub const VECTOR_TIMER: u8 = 0x20;
/// First vector handed out to devices (MSI-X); see [`VECTOR_DEVICE_LAST`].
pub const VECTOR_DEVICE_FIRST: u8 = 0x30;
/// Last vector handed out to devices.
pub const VECTOR_DEVICE_LAST: u8 = 0x3f;
// The device vectors are counted like any other, but must stay clear of the
// timer and the spurious vector.
const _: () = assert!(VECTOR_TIMER < VECTOR_DEVICE_FIRST && VECTOR_DEVICE_LAST < VECTOR_SPURIOUS);
/// Spurious-interrupt vector of the LAPIC (never acknowledged with an EOI).
pub const VECTOR_SPURIOUS: u8 = 0xff;

/// Code segment selector in [`GDT`].
const SEL_CODE: u16 = 0x08;
/// Data segment selector in [`GDT`].
const SEL_DATA: u16 = 0x10;

/// Our GDT: null, 64-bit ring-0 code, ring-0 data. The accessed bits are
/// preset so the CPU never writes the table.
static GDT: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

/// IA32_APIC_BASE MSR.
const MSR_APIC_BASE: u32 = 0x1b;
/// IA32_APIC_BASE: global enable.
const APIC_BASE_ENABLE: u64 = 1 << 11;
/// IA32_APIC_BASE: x2APIC mode.
const APIC_BASE_X2APIC: u64 = 1 << 10;
/// First x2APIC MSR; register at xAPIC offset `off` is MSR `X2APIC_MSR + off / 16`.
const X2APIC_MSR: u32 = 0x800;

/// LAPIC register offsets (xAPIC MMIO layout).
const LAPIC_ID: u64 = 0x20;
const LAPIC_EOI: u64 = 0xb0;
const LAPIC_SVR: u64 = 0xf0;
const LAPIC_LVT_TIMER: u64 = 0x320;
const LAPIC_TIMER_INIT: u64 = 0x380;
const LAPIC_TIMER_DIVIDE: u64 = 0x3e0;
/// SVR: APIC software enable.
const SVR_ENABLE: u32 = 1 << 8;
/// LVT: masked.
const LVT_MASKED: u32 = 1 << 16;
/// LVT timer: periodic mode.
const LVT_TIMER_PERIODIC: u32 = 1 << 17;
/// Timer divide configuration: divide by 16.
const TIMER_DIVIDE_16: u32 = 0x3;
/// Initial count of the wake-up tick: 10 ms with the usual 1 GHz APIC bus
/// (KVM, QEMU) and divide by 16. Only a wake-up: nothing depends on its rate.
const TIMER_TICK_COUNT: u32 = 625_000;

/// Master and slave 8259 data (mask) ports.
const PIC1_DATA: u16 = 0x21;
const PIC2_DATA: u16 = 0xa1;

/// Number of exception vectors (not device interrupts).
const EXCEPTIONS: u64 = 32;
/// Exceptions that push an error code: #DF, #TS, #NP, #SS, #GP, #PF, #AC, #CP, #VC, #SX.
const ERROR_CODE_VECTORS: u32 = (1 << 8)
    | (1 << 10)
    | (1 << 11)
    | (1 << 12)
    | (1 << 13)
    | (1 << 14)
    | (1 << 17)
    | (1 << 21)
    | (1 << 29)
    | (1 << 30);

/// Interrupts taken, per vector.
static COUNTS: [AtomicU32; 256] = [const { AtomicU32::new(0) }; 256];
/// Whether [`init`] ran.
static READY: AtomicBool = AtomicBool::new(false);
/// The LAPIC is in x2APIC mode (MSR access) rather than xAPIC (MMIO).
static X2APIC: AtomicBool = AtomicBool::new(false);
/// xAPIC MMIO base.
static LAPIC_BASE: AtomicU64 = AtomicU64::new(0xfee0_0000);
/// TSC frequency used for timeouts, in kHz.
static TSC_KHZ: AtomicU64 = AtomicU64::new(1);

/// One 64-bit IDT gate descriptor.
#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_low: u16,
    selector: u16,
    ist: u8,
    type_attr: u8,
    offset_mid: u16,
    offset_high: u32,
    reserved: u32,
}

/// Present, DPL 0, 64-bit interrupt gate (IF cleared on entry).
const GATE_INTERRUPT: u8 = 0x8e;

/// The IDT, filled by [`init`].
#[repr(C, align(16))]
struct Idt(UnsafeCell<[Gate; 256]>);

// SAFETY: written once by `init` on the only CPU, with interrupts disabled,
// before it is loaded; only the CPU reads it afterwards.
unsafe impl Sync for Idt {}

static IDT: Idt = Idt(UnsafeCell::new(
    [Gate {
        offset_low: 0,
        selector: 0,
        ist: 0,
        type_attr: 0,
        offset_mid: 0,
        offset_high: 0,
        reserved: 0,
    }; 256],
));

/// Limit and base, as `lgdt` / `lidt` read them.
#[repr(C, packed)]
struct TablePointer {
    limit: u16,
    base: u64,
}

// One 16-byte stub per vector: push the vector number, jump to the common
// path. Exceptions (vectors 0..32) print and panic; everything else is counted
// by `keel_probe_interrupt`, which also sends the EOI.
global_asm!(
    r#"
    .section .text.isr, "ax", @progbits
    .balign 16
    .global keel_probe_isr_table
keel_probe_isr_table:
    .set keel_probe_isr_vec, 0
    .rept 256
    .balign 16
    pushq $keel_probe_isr_vec
    jmp keel_probe_isr_common
    .set keel_probe_isr_vec, keel_probe_isr_vec + 1
    .endr
    .balign 16
    .global keel_probe_isr_table_end
keel_probe_isr_table_end:

keel_probe_isr_common:
    cmpq $32, (%rsp)
    jb 3f
    pushq %rax
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %rbp
    movq 80(%rsp), %rdi
    movq %rsp, %rbp
    andq $-16, %rsp
    cld
    call {interrupt}
    movq %rbp, %rsp
    popq %rbp
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rax
    addq $8, %rsp
    iretq
3:
    movq (%rsp), %rdi
    leaq 8(%rsp), %rsi
    andq $-16, %rsp
    cld
    call {exception}
    ud2
    "#,
    interrupt = sym keel_probe_interrupt,
    exception = sym keel_probe_exception,
    options(att_syntax)
);

extern "C" {
    static keel_probe_isr_table: u8;
    static keel_probe_isr_table_end: u8;
}

/// Called by the stubs for vectors 32..256 with interrupts disabled.
extern "C" fn keel_probe_interrupt(vector: u64) {
    let index = (vector & 0xff) as usize;
    COUNTS[index].fetch_add(1, Ordering::Relaxed);
    if index != usize::from(VECTOR_SPURIOUS) {
        eoi();
    }
}

/// Called by the stubs for exceptions; `frame` points at the error code (for
/// the vectors that push one) or at the saved RIP.
extern "C" fn keel_probe_exception(vector: u64, frame: u64) -> ! {
    let out = &mut Serial::new();
    let has_error = vector < EXCEPTIONS && ERROR_CODE_VECTORS & (1 << vector) != 0;
    // SAFETY: `frame` points into the interrupt frame the CPU just pushed on
    // our stack: (error code,) RIP, CS, RFLAGS, RSP, SS.
    let (error, rip) = unsafe {
        if has_error {
            (mmio::read::<u64>(frame), mmio::read::<u64>(frame + 8))
        } else {
            (0, mmio::read::<u64>(frame))
        }
    };
    say!(
        out,
        "exception vector={vector} error={error:#x} rip={rip:#x}"
    );
    panic!("unexpected exception {vector}");
}

/// Reads a model-specific register.
fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: only architectural MSRs that exist on every x86_64 CPU with an
    // APIC are read (IA32_APIC_BASE, x2APIC registers in x2APIC mode).
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags));
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes a model-specific register.
///
/// # Safety
///
/// `msr` must exist and `value` must be valid for it; the effect (APIC
/// programming) is the caller's business.
unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: forwarded from the caller.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32, options(nomem, nostack, preserves_flags));
    }
}

/// Reads LAPIC register `off` (xAPIC offset).
fn lapic_read(off: u64) -> u32 {
    if X2APIC.load(Ordering::Relaxed) {
        rdmsr(X2APIC_MSR + (off / 16) as u32) as u32
    } else {
        // SAFETY: `off` is one of the LAPIC register offsets above; the LAPIC
        // page is in the identity map and these reads have no side effects.
        unsafe { mmio::read32(LAPIC_BASE.load(Ordering::Relaxed) + off) }
    }
}

/// Writes LAPIC register `off` (xAPIC offset).
fn lapic_write(off: u64, value: u32) {
    if X2APIC.load(Ordering::Relaxed) {
        // SAFETY: the x2APIC MSR of a register this module programs (EOI,
        // SVR, timer); they only affect interrupt delivery to this CPU.
        unsafe { wrmsr(X2APIC_MSR + (off / 16) as u32, u64::from(value)) }
    } else {
        // SAFETY: as above, through the xAPIC MMIO page.
        unsafe { mmio::write32(LAPIC_BASE.load(Ordering::Relaxed) + off, value) }
    }
}

/// Signals end of interrupt to the LAPIC.
fn eoi() {
    lapic_write(LAPIC_EOI, 0);
}

/// What [`init`] found.
#[derive(Clone, Copy)]
pub struct ApicInfo {
    /// APIC ID of this CPU (MSI destination).
    pub id: u32,
    /// x2APIC mode.
    pub x2apic: bool,
    /// xAPIC MMIO base.
    pub base: u64,
}

/// Loads our GDT and IDT, masks the 8259s, and enables the LAPIC. Idempotent.
/// Interrupts stay disabled (they are enabled only inside [`wait_until`]).
/// `tsc_khz` is the TSC frequency used for the timeouts.
pub fn init(tsc_khz: u64) -> ApicInfo {
    TSC_KHZ.store(tsc_khz.max(1), Ordering::Relaxed);
    if !READY.swap(true, Ordering::Relaxed) {
        load_tables();
        // SAFETY: masking every 8259 input only stops legacy interrupts
        // (which we do not use) from reaching the CPU.
        unsafe {
            outb(PIC1_DATA, 0xff);
            outb(PIC2_DATA, 0xff);
        }
        let mut base = rdmsr(MSR_APIC_BASE);
        if base & APIC_BASE_ENABLE == 0 {
            base |= APIC_BASE_ENABLE;
            // SAFETY: setting the global enable of IA32_APIC_BASE keeps the
            // base address; it turns on the LAPIC of this CPU.
            unsafe { wrmsr(MSR_APIC_BASE, base) };
        }
        X2APIC.store(base & APIC_BASE_X2APIC != 0, Ordering::Relaxed);
        LAPIC_BASE.store(base & 0x000f_ffff_ffff_f000, Ordering::Relaxed);
        lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | u32::from(VECTOR_TIMER));
        lapic_write(LAPIC_SVR, SVR_ENABLE | u32::from(VECTOR_SPURIOUS));
    }
    let x2apic = X2APIC.load(Ordering::Relaxed);
    let raw = lapic_read(LAPIC_ID);
    ApicInfo {
        id: if x2apic { raw } else { raw >> 24 },
        x2apic,
        base: LAPIC_BASE.load(Ordering::Relaxed),
    }
}

/// Loads [`GDT`] (reloading every segment register) and the IDT.
fn load_tables() {
    let table = core::ptr::addr_of!(keel_probe_isr_table) as u64;
    let end = core::ptr::addr_of!(keel_probe_isr_table_end) as u64;
    assert!(end - table == 256 * 16, "interrupt stubs are not 16 bytes");
    let idt = IDT.0.get();
    for vector in 0..256u64 {
        let stub = table + vector * 16;
        let gate = Gate {
            offset_low: stub as u16,
            selector: SEL_CODE,
            ist: 0,
            type_attr: GATE_INTERRUPT,
            offset_mid: (stub >> 16) as u16,
            offset_high: (stub >> 32) as u32,
            reserved: 0,
        };
        // SAFETY: interrupts are disabled and the IDT is not loaded yet (or
        // is being rewritten with identical values), so nothing else reads
        // it; `vector` is in bounds.
        unsafe { (*idt)[vector as usize] = gate };
    }
    let gdtr = TablePointer {
        limit: (core::mem::size_of_val(&GDT) - 1) as u16,
        base: GDT.as_ptr() as u64,
    };
    let idtr = TablePointer {
        limit: (256 * 16 - 1) as u16,
        base: idt as u64,
    };
    // SAFETY: the GDT holds a valid 64-bit code segment at SEL_CODE and a data
    // segment at SEL_DATA, the same flat layout the boot code used; the far
    // return reloads CS, then the data registers are reloaded. The IDT holds
    // valid gates to the stubs above, in SEL_CODE. Interrupts are disabled.
    unsafe {
        asm!(
            "lgdt ({gdtr})",
            "pushq ${code}",
            "leaq 2f(%rip), %rax",
            "pushq %rax",
            "lretq",
            "2:",
            "movl ${data}, %eax",
            "movl %eax, %ds",
            "movl %eax, %es",
            "movl %eax, %ss",
            "movl %eax, %fs",
            "movl %eax, %gs",
            "lidt ({idtr})",
            gdtr = in(reg) &gdtr,
            idtr = in(reg) &idtr,
            code = const SEL_CODE,
            data = const SEL_DATA,
            out("rax") _,
            options(att_syntax, preserves_flags),
        );
    }
}

/// Interrupts taken on `vector` so far.
pub fn count(vector: u8) -> u32 {
    COUNTS[usize::from(vector)].load(Ordering::Relaxed)
}

/// MSI address for delivering to APIC `id` (physical destination, fixed mode).
pub fn msi_address(id: u32) -> u64 {
    0xfee0_0000 | (u64::from(id & 0xff) << 12)
}

/// TSC ticks in `ms` milliseconds.
pub fn ms_to_tsc(ms: u64) -> u64 {
    TSC_KHZ.load(Ordering::Relaxed).saturating_mul(ms)
}

/// Waits until `done()` is true or `timeout_ms` pass; returns whether it
/// became true. Interrupts are enabled only while halted (`sti; hlt`), so
/// `done` always runs with interrupts disabled. A LAPIC timer tick wakes the
/// CPU regularly, so a device interrupt that never comes only delays the
/// poll of `done`. [`init`] must have run.
pub fn wait_until(timeout_ms: u64, mut done: impl FnMut() -> bool) -> bool {
    let deadline = cpu::rdtsc().wrapping_add(ms_to_tsc(timeout_ms));
    lapic_write(LAPIC_TIMER_DIVIDE, TIMER_DIVIDE_16);
    lapic_write(
        LAPIC_LVT_TIMER,
        LVT_TIMER_PERIODIC | u32::from(VECTOR_TIMER),
    );
    lapic_write(LAPIC_TIMER_INIT, TIMER_TICK_COUNT);
    let ok = loop {
        if done() {
            break true;
        }
        if (cpu::rdtsc().wrapping_sub(deadline) as i64) >= 0 {
            break done();
        }
        // SAFETY: `sti; hlt` enables interrupts and halts atomically (an
        // interrupt right after `sti` still ends the `hlt`); the handlers
        // only count and send EOI. `cli` disables them again before `done`.
        unsafe { asm!("sti", "hlt", "cli", options(nostack)) };
    };
    lapic_write(LAPIC_TIMER_INIT, 0);
    lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | u32::from(VECTOR_TIMER));
    ok
}
