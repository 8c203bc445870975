# Multiboot test kernel for the software CPU's system architecture (also runs on KVM).
# Entered by a Multiboot loader in flat 32-bit protected mode; builds page tables, enters long
# mode, installs a GDT/TSS/IDT, then checks exceptions (#UD, #PF error codes and CR2, #GP
# selector error codes, NX), ring 3 via IRETQ, SYSCALL/SYSRET, INT 0x80 through a DPL-3 gate,
# and the local APIC timer with STI;HLT. Prints to port 0xE9; exits through isa-debug-exit
# (port 0xF4): 0 when every check passed, else the number of the failed check.

        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0x00000003
        .set LAPIC, 0xFEE00000

        # Compares a quadword with an immediate; prints 'A' + check - 1 on success (progress).
        .macro EXPECT mem, value, check
        cmpq $\value, \mem
        je 9f
        mov $\check, %eax
        jmp fail
9:      push %rax
        mov $(0x40 + \check), %al
        out %al, $0xE9
        pop %rax
        .endm

        .text
        .code32
        .globl _start
multiboot_header:
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)

_start:
        cli
        mov $stack_top, %esp
        # Identity-map the first GiB with 2 MiB pages (present, writable, user).
        mov $pd, %edi
        mov $0x87, %eax
        xor %ecx, %ecx
1:      mov %eax, (%edi,%ecx,8)
        movl $0, 4(%edi,%ecx,8)
        add $0x200000, %eax
        inc %ecx
        cmp $512, %ecx
        jne 1b
        movl $0x200085, pd+8            # 2-4 MiB: read-only
        movl $0x400083, pd+16           # 4-6 MiB: supervisor only
        movl $0x80000000, pd+28         # 6-8 MiB: no-execute
        mov $pd, %eax
        or $7, %eax
        mov %eax, pdpt
        mov $pd_high, %eax
        or $3, %eax
        mov %eax, pdpt+24               # 3-4 GiB
        movl $0xFEE0009B, pd_high+503*8 # local APIC page, uncached
        mov $pdpt, %eax
        or $7, %eax
        mov %eax, pml4
        mov %cr4, %eax
        or $0x20, %eax                  # PAE
        mov %eax, %cr4
        mov $pml4, %eax
        mov %eax, %cr3
        mov $0xC0000080, %ecx
        rdmsr
        or $0x901, %eax                 # SCE, LME, NXE
        wrmsr
        mov %cr0, %eax
        or $0x80010001, %eax            # PG, WP, PE
        mov %eax, %cr0
        lgdt gdt_descriptor
        ljmp $0x08, $long_entry

        .code64
long_entry:
        mov $0x10, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        xor %eax, %eax
        mov %ax, %fs
        mov %ax, %gs
        mov $stack_top, %rsp

        # 64-bit TSS descriptor at 0x30.
        movabs $0x0000890000000067, %rax
        mov $tss, %edx
        mov %rdx, %rcx
        and $0xFFFFFF, %ecx
        shl $16, %rcx
        or %rcx, %rax
        mov %rdx, %rcx
        shr $24, %rcx
        shl $56, %rcx
        or %rcx, %rax
        mov %rax, gdt+0x30
        movq $0, gdt+0x38
        mov $kernel_stack2_top, %rax
        mov %rax, tss+4
        mov $double_fault_stack_top, %rax
        mov %rax, tss+0x24
        mov $0x30, %ax
        ltr %ax

        # IDT.
        mov $0, %edi
        mov $isr_de, %esi
        mov $0x8E00, %edx
        call set_gate
        mov $6, %edi
        mov $isr_ud, %esi
        mov $0x8E00, %edx
        call set_gate
        mov $8, %edi
        mov $isr_df, %esi
        mov $0x8E01, %edx
        call set_gate
        mov $13, %edi
        mov $isr_gp, %esi
        mov $0x8E00, %edx
        call set_gate
        mov $14, %edi
        mov $isr_pf, %esi
        mov $0x8E00, %edx
        call set_gate
        mov $0x40, %edi
        mov $isr_timer, %esi
        mov $0x8E00, %edx
        call set_gate
        mov $0x80, %edi
        mov $isr_int80, %esi
        mov $0xEE00, %edx
        call set_gate
        lidt idt_descriptor

        # SYSCALL: STAR (kernel CS 0x08, user base 0x18), LSTAR, SFMASK = IF.
        mov $0xC0000081, %ecx
        xor %eax, %eax
        mov $0x00180008, %edx
        wrmsr
        mov $0xC0000082, %ecx
        mov $syscall_entry, %eax
        xor %edx, %edx
        wrmsr
        mov $0xC0000084, %ecx
        mov $0x200, %eax
        xor %edx, %edx
        wrmsr

        # Check 1: #UD.
        movq $2, skip_length(%rip)
        ud2
        EXPECT last_vector(%rip), 6, 1

        # Checks 2-4: not-present #PF on read and write (error code, CR2).
        movq $3, skip_length(%rip)
        mov $0x40000000, %rbx
        mov (%rbx), %rax
        EXPECT last_vector(%rip), 14, 2
        EXPECT last_error(%rip), 0, 3
        EXPECT last_cr2(%rip), 0x40000000, 4
        mov %rax, (%rbx)
        EXPECT last_error(%rip), 2, 5

        # Checks 6-8: a supervisor write to a read-only page (CR0.WP) faults; a read does not.
        movq $0xFF, last_vector(%rip)
        mov $0x200010, %rbx
        mov (%rbx), %rax
        EXPECT last_vector(%rip), 0xFF, 6
        mov %rax, (%rbx)
        EXPECT last_error(%rip), 3, 7
        EXPECT last_cr2(%rip), 0x200010, 8

        # Checks 9-10: MOV DS with a selector beyond the GDT limit: #GP(selector).
        movq $2, skip_length(%rip)
        mov $0x1230, %ax
        mov %ax, %ds
        EXPECT last_vector(%rip), 13, 9
        EXPECT last_error(%rip), 0x1230, 10

        # Checks 11-12: executing a no-execute page: #PF with I/D set.
        lea after_nx(%rip), %rax
        mov %rax, resume_rip(%rip)
        mov $0x600000, %rbx
        jmp *%rbx
after_nx:
        EXPECT last_error(%rip), 0x11, 11
        EXPECT last_cr2(%rip), 0x600000, 12

        # Ring 3 through IRETQ (IOPL 3 so the user code may report failures).
        movq $3, skip_length(%rip)
        pushq $0x23
        pushq $user_stack_top
        pushq $0x3202
        pushq $0x2B
        pushq $user_entry
        iretq

user_entry:
        # Checks 13-14: a user read of a supervisor page: #PF(P|U), taken from CS 0x2B.
        mov $0x400000, %rbx
        mov (%rbx), %rax
        EXPECT last_error(%rip), 5, 13
        EXPECT last_cs(%rip), 0x2B, 14
.ifdef STOP_AFTER_RING3_CHECKS
        # Built with --defsym STOP_AFTER_RING3_CHECKS=1: exit here (IOPL 3 allows the port
        # write from ring 3), for hosts whose KVM runs checks 1-14 but not the rest.
        xor %eax, %eax
        out %al, $0xF4
        hlt
.endif
        # SYSCALL to ring 0 and SYSRET back, then INT 0x80 through the DPL-3 gate, whose
        # handler resumes in ring 0 at back_in_kernel. (No port I/O in ring 3 from here on: the
        # checks run in ring 0.)
        mov $0x1234, %rax
        syscall
        int $0x80
int80_return:
        hlt

back_in_kernel:
        # Checks 15-17: SYSCALL ran in CS 0x08 and saw RAX; SYSRET returned to CS 0x2B.
        EXPECT syscall_cs(%rip), 0x08, 15
        EXPECT syscall_result(%rip), 0x1235, 16
        EXPECT int80_cs(%rip), 0x2B, 17
        EXPECT int80_rip(%rip), int80_return, 19
        mov %cs, %rax
        cmp $0x08, %rax
        je 1f
        mov $20, %eax
        jmp fail
1:
        # Check 21: the local APIC timer (one-shot, vector 0x40) wakes STI;HLT.
        mov $LAPIC, %ebx
        movl $0x1FF, 0xF0(%rbx)         # spurious vector register: enable
        movl $0xB, 0x3E0(%rbx)          # divide by 1
        movl $0x40, 0x320(%rbx)         # LVT timer: one-shot, vector 0x40
        movl $200000, 0x380(%rbx)       # initial count
2:      sti
        hlt
        cli
        cmpq $0, timer_ticks(%rip)
        je 2b
        EXPECT timer_ticks(%rip), 1, 21

        lea pass_message(%rip), %rsi
        call print
        xor %eax, %eax
        out %al, $0xF4
3:      hlt
        jmp 3b

fail:
        mov %eax, %ebx
        lea fail_message(%rip), %rsi
        call print
        mov %ebx, %eax
        out %al, $0xF4
4:      hlt
        jmp 4b

# Prints the NUL-terminated string at RSI to port 0xE9.
print:
        lodsb
        test %al, %al
        jz 1f
        out %al, $0xE9
        jmp print
1:      ret

# set_gate(vector = EDI, handler = ESI, EDX = type << 8 | IST): a 64-bit gate, selector 0x08.
set_gate:
        shl $4, %rdi
        add $idt, %rdi
        mov %esi, %eax
        and $0xFFFF, %eax
        or $0x00080000, %eax
        mov %eax, (%rdi)
        mov %dx, 4(%rdi)
        mov %rsi, %rax
        shr $16, %rax
        mov %ax, 6(%rdi)
        shr $16, %rax
        mov %eax, 8(%rdi)
        movl $0, 12(%rdi)
        ret

isr_de: pushq $0
        pushq $0
        jmp isr_common
isr_ud: pushq $0
        pushq $6
        jmp isr_common
isr_gp: pushq $13
        jmp isr_common
isr_pf: pushq $14
        jmp isr_common
# Records vector, error code, CR2 and the interrupted CS, then resumes at resume_rip (if set)
# or skip_length bytes after the faulting instruction.
isr_common:
        push %rax
        mov 8(%rsp), %rax
        mov %rax, last_vector(%rip)
        mov 16(%rsp), %rax
        mov %rax, last_error(%rip)
        mov %cr2, %rax
        mov %rax, last_cr2(%rip)
        mov 32(%rsp), %rax
        mov %rax, last_cs(%rip)
        mov resume_rip(%rip), %rax
        test %rax, %rax
        jz 1f
        mov %rax, 24(%rsp)
        movq $0, resume_rip(%rip)
        jmp 2f
1:      mov skip_length(%rip), %rax
        add %rax, 24(%rsp)
2:      pop %rax
        add $16, %rsp
        iretq

isr_df:
        mov $0x7D, %eax
        jmp fail

isr_timer:
        push %rax
        incq timer_ticks(%rip)
        mov $LAPIC, %eax
        movl $0, 0xB0(%rax)             # EOI
        pop %rax
        iretq

isr_int80:
        mov 8(%rsp), %rax
        mov %rax, int80_cs(%rip)
        mov (%rsp), %rax
        mov %rax, int80_rip(%rip)
        mov $0x10, %ax
        mov %ax, %ss
        mov $stack_top, %rsp
        jmp back_in_kernel

syscall_entry:
        mov %cs, %rdx
        mov %rdx, syscall_cs(%rip)
        inc %rax
        mov %rax, syscall_result(%rip)
        sysretq

        .data
        .align 16
gdt:
        .quad 0
        .quad 0x00AF9A000000FFFF        # 0x08 kernel code, 64-bit
        .quad 0x00CF92000000FFFF        # 0x10 kernel data
        .quad 0x00CFFA000000FFFF        # 0x18 user code, 32-bit
        .quad 0x00CFF2000000FFFF        # 0x20 user data
        .quad 0x00AFFA000000FFFF        # 0x28 user code, 64-bit
        .quad 0, 0                      # 0x30 TSS (filled in)
gdt_end:
gdt_descriptor:
        .word gdt_end - gdt - 1
        .quad gdt
idt_descriptor:
        .word 4095
        .quad idt
skip_length:    .quad 0
resume_rip:     .quad 0
last_vector:    .quad 0
last_error:     .quad 0
last_cr2:       .quad 0
last_cs:        .quad 0
syscall_cs:     .quad 0
syscall_result: .quad 0
int80_cs:       .quad 0
int80_rip:      .quad 0
timer_ticks:    .quad 0
pass_message:   .asciz "system checks passed\n"
fail_message:   .asciz "system check failed\n"

        .bss
        .align 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pd:     .skip 4096
pd_high: .skip 4096
idt:    .skip 4096
tss:    .skip 4096
        .skip 8192
stack_top:
        .skip 8192
kernel_stack2_top:
        .skip 8192
double_fault_stack_top:
        .skip 8192
user_stack_top:
