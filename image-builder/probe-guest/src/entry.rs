//! Entry points, in assembly: nothing may run before the debug-port write, and
//! Rust code needs a stack and a zeroed BSS.
//!
//! `_start` (first byte of `.text.entry`, so `e_entry` = 0x100000) is the Linux
//! 64-bit boot protocol entry: long mode, identity-mapped low 4 GiB, RSI = zero
//! page. In the `pvh` build, `keel_probe_pvh_start` is the PVH entry named by
//! the Xen ELF note: 32-bit protected mode without paging, EBX = start info.
//! Both end up in `keel_probe_start64_common` with RSI = zero page (0 for PVH)
//! and RBX = PVH start info (0 for Linux), which calls
//! [`crate::keel_probe_main`]`(rsi, rbx)`.

use core::arch::global_asm;

/// Size of the boot stack (in `.noinit`).
const STACK_SIZE: usize = 16 * 1024;

global_asm!(
    r#"
    .section .text.entry, "ax", @progbits
    .global _start
    .type _start, @function
    .code64
_start:
    // First instructions: tell the VMM we are running (entry code 1).
    mov al, 1
    out 0xe9, al
    cli
    // Linux boot: there is no PVH start info.
    xor ebx, ebx

    .global keel_probe_start64_common
keel_probe_start64_common:
    lea rsp, [rip + keel_probe_stack_top]
    xor ebp, ebp
    cld
    // Keep the boot registers across the BSS clearing.
    mov r12, rsi
    mov r13, rbx
    lea rdi, [rip + __bss_start]
    lea rcx, [rip + __bss_end]
    sub rcx, rdi
    xor eax, eax
    rep stosb
    mov rdi, r12
    mov rsi, r13
    call {main}
2:
    cli
    hlt
    jmp 2b
    .size _start, . - _start

    .section .noinit.stack, "aw", @nobits
    .balign 16
keel_probe_stack_bottom:
    .skip {stack_size}
keel_probe_stack_top:
    "#,
    main = sym crate::keel_probe_main,
    stack_size = const STACK_SIZE,
);

// PVH entry: build identity page tables for 4 GiB (2 MiB pages), enable PAE,
// long mode and paging, load our GDT and far-jump to 64-bit code.
#[cfg(feature = "pvh")]
global_asm!(
    r#"
    .section .text.pvh, "ax", @progbits
    .global keel_probe_pvh_start
    .type keel_probe_pvh_start, @function
    .code32
keel_probe_pvh_start:
    movb $1, %al
    outb %al, $0xe9
    cli
    cld
    // EBX (start info) is left alone from here on.

    // Zero the PML4 and the PDPT (two adjacent pages; .noinit is not cleared).
    movl $keel_probe_pvh_pml4, %edi
    movl $2048, %ecx
    xorl %eax, %eax
    rep stosl
    movl $(keel_probe_pvh_pdpt + 3), keel_probe_pvh_pml4

    // PDPT[0..4] -> the four page directories (present, writable).
    movl $keel_probe_pvh_pdpt, %edi
    movl $(keel_probe_pvh_pd + 3), %eax
    movl $4, %ecx
1:
    movl %eax, (%edi)
    addl $4096, %eax
    addl $8, %edi
    loop 1b

    // 2048 PDEs: 2 MiB pages (present, writable, PS) covering 0..4 GiB.
    movl $keel_probe_pvh_pd, %edi
    movl $0x83, %eax
    movl $2048, %ecx
1:
    movl %eax, (%edi)
    movl $0, 4(%edi)
    addl $0x200000, %eax
    addl $8, %edi
    loop 1b

    // CR4.PAE, CR3, EFER.LME, GDT, then CR0.PG.
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $keel_probe_pvh_pml4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    lgdt keel_probe_pvh_gdt_ptr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    ljmp $0x10, $keel_probe_pvh_start64

    .code64
keel_probe_pvh_start64:
    movl $0x18, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    // Upper register halves are undefined after the switch: zero-extend.
    movl %ebx, %ebx
    xorl %esi, %esi
    jmp keel_probe_start64_common
    .size keel_probe_pvh_start, . - keel_probe_pvh_start

    .section .data.pvh_gdt, "aw", @progbits
    .balign 16
keel_probe_pvh_gdt:
    .quad 0
    .quad 0
    .quad 0x00af9a000000ffff // 0x10: 64-bit code
    .quad 0x00cf92000000ffff // 0x18: data
keel_probe_pvh_gdt_end:
    .balign 4
    .word 0
keel_probe_pvh_gdt_ptr:
    .word keel_probe_pvh_gdt_end - keel_probe_pvh_gdt - 1
    .long keel_probe_pvh_gdt

    .section .noinit.pvh, "aw", @nobits
    .balign 4096
keel_probe_pvh_pml4:
    .skip 4096
keel_probe_pvh_pdpt:
    .skip 4096
keel_probe_pvh_pd:
    .skip 4 * 4096

    // XEN_ELFNOTE_PHYS32_ENTRY: name "Xen", type 18, 4-byte entry address.
    .section .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .balign 4
    .long keel_probe_pvh_start
    .balign 4
    "#,
    options(att_syntax)
);
