# Common start-up for the fidelity guest programs (included first by each of them; the
# including file defines `test_main`, a 64-bit ring-0 function that returns when every check
# passed). Entered by a Multiboot loader in flat 32-bit protected mode; enters long mode with
# the first GiB identity-mapped (2 MiB pages, user-accessible) and 3-4 GiB mapped uncached
# (device windows: local APIC, IOAPIC), a GDT with kernel and user segments, a TSS, and an IDT
# whose 32 exception gates record the exception (vector, error code, RIP, CS, RFLAGS, CR2)
# and return to `resume_rip` when set (else to the saved RIP, with TF cleared for #DB).
# Output goes to port 0xE9; the result to isa-debug-exit (port 0xF4): 0 when every check
# passed, else the number of the failed check.

        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0x00000003
        .set KERNEL_CS, 0x08
        .set KERNEL_DS, 0x10
        .set USER_CS32, 0x1B
        .set USER_DS, 0x23
        .set USER_CS64, 0x2B

        # Fails with check number `check` unless the quadword `mem` equals the immediate.
        .macro CHECK_EQ mem, value, check
        cmpq $\value, \mem
        je 9f
        mov $\check, %eax
        jmp fail
9:
        .endm

        # Fails with check number `check` unless register/memory `a` equals register `b`.
        .macro CHECK_SAME a, b, check
        cmp \b, \a
        je 9f
        mov $\check, %eax
        jmp fail
9:
        .endm

        # Fails with check number `check` when the condition code `cc` holds (after a test/cmp).
        .macro FAIL_IF cc, check
        j\cc 8f
        jmp 9f
8:      mov $\check, %eax
        jmp fail
9:
        .endm

        # Runs `instruction` expecting exception `vector`, resuming after it (clobbers R11, so
        # the instruction sees every other register as the caller set it).
        .macro EXPECT_FAULT vector, check, instruction:vararg
        movq $0xFF, last_vector(%rip)
        lea 7f(%rip), %r11
        mov %r11, resume_rip(%rip)
        \instruction
7:      CHECK_EQ last_vector(%rip), \vector, \check
        .endm

        # Runs `instruction` expecting no exception (clobbers R11).
        .macro EXPECT_NO_FAULT check, instruction:vararg
        movq $0xFF, last_vector(%rip)
        lea 7f(%rip), %r11
        mov %r11, resume_rip(%rip)
        \instruction
7:      movq $0, resume_rip(%rip)
        CHECK_EQ last_vector(%rip), 0xFF, \check
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
        mov %ebx, multiboot_info
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
        # 3-4 GiB: 2 MiB pages, writable, cache-disabled, supervisor.
        mov $pd_high, %edi
        mov $0xC000009B, %eax
        xor %ecx, %ecx
1:      mov %eax, (%edi,%ecx,8)
        movl $0, 4(%edi,%ecx,8)
        add $0x200000, %eax
        inc %ecx
        cmp $512, %ecx
        jne 1b
        mov $pd, %eax
        or $7, %eax
        mov %eax, pdpt
        mov $pd_high, %eax
        or $3, %eax
        mov %eax, pdpt+24
        mov $pdpt, %eax
        or $7, %eax
        mov %eax, pml4
        mov %cr4, %eax
        or $0x620, %eax                 # PAE, OSFXSR, OSXMMEXCPT
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
        ljmp $KERNEL_CS, $long_entry

        .code64
long_entry:
        mov $KERNEL_DS, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        xor %eax, %eax
        mov %ax, %fs
        mov %ax, %gs
        mov $stack_top, %rsp

        # 64-bit TSS descriptor at 0x30; RSP0 = kernel_stack2_top, IST1 = double-fault stack.
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

        # Exception gates 0-31 (#DF on IST 1), the DPL-3 return gate 0x81.
        xor %ebx, %ebx
1:      mov %ebx, %edi
        mov exception_stubs(,%rbx,8), %rsi
        mov $0x8E00, %edx
        cmp $8, %ebx
        jne 2f
        mov $0x8E01, %edx
2:      call set_gate
        inc %ebx
        cmp $32, %ebx
        jne 1b
        mov $0x81, %edi
        mov $return_gate, %esi
        mov $0xEE00, %edx
        call set_gate
        lidt idt_descriptor

        call test_main
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

# set_gate(vector = EDI, handler = RSI, EDX = type << 8 | IST): a 64-bit gate, selector 0x08.
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

# enter_user(rip = RDI, 64-bit = ESI != 0): runs RDI in ring 3 (IOPL 3, so it may report
# through ports) on user_stack_top; returns here when the user code executes `int $0x81`.
enter_user:
        mov %rsp, kernel_rsp(%rip)
        pushq $USER_DS
        pushq $user_stack_top
        pushq $0x3002
        test %esi, %esi
        jz 1f
        pushq $USER_CS64
        jmp 2f
1:      pushq $USER_CS32
2:      pushq %rdi
        iretq

return_gate:
        mov $KERNEL_DS, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        mov kernel_rsp(%rip), %rsp
        ret

        .macro STUB vector, has_error
stub_\vector:
        .if \has_error == 0
        pushq $0
        .endif
        pushq $\vector
        jmp exception_common
        .endm
        STUB 0, 0
        STUB 1, 0
        STUB 2, 0
        STUB 3, 0
        STUB 4, 0
        STUB 5, 0
        STUB 6, 0
        STUB 7, 0
        STUB 8, 1
        STUB 9, 0
        STUB 10, 1
        STUB 11, 1
        STUB 12, 1
        STUB 13, 1
        STUB 14, 1
        STUB 15, 0
        STUB 16, 0
        STUB 17, 1
        STUB 18, 0
        STUB 19, 0
        STUB 20, 0
        STUB 21, 1
        STUB 22, 0
        STUB 23, 0
        STUB 24, 0
        STUB 25, 0
        STUB 26, 0
        STUB 27, 0
        STUB 28, 0
        STUB 29, 1
        STUB 30, 1
        STUB 31, 0

# Frame: vector, error code, RIP, CS, RFLAGS, RSP, SS (after the saved RAX: +8 each).
exception_common:
        push %rax
        mov 8(%rsp), %rax
        cmp $8, %rax
        jne 1f
        mov $0x7D, %eax                 # a double fault ends the run
        jmp fail
1:      mov %rax, last_vector(%rip)
        incq exception_count(%rip)
        mov 16(%rsp), %rax
        mov %rax, last_error(%rip)
        mov 24(%rsp), %rax
        mov %rax, last_rip(%rip)
        mov 32(%rsp), %rax
        mov %rax, last_cs(%rip)
        mov 40(%rsp), %rax
        mov %rax, last_rflags(%rip)
        mov %cr2, %rax
        mov %rax, last_cr2(%rip)
        andq $~0x100, 40(%rsp)          # clear TF: one single-step trap per check
        mov resume_rip(%rip), %rax
        test %rax, %rax
        jz 2f
        mov %rax, 24(%rsp)
        movq $0, resume_rip(%rip)
2:      pop %rax
        add $16, %rsp
        iretq

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
exception_stubs:
        .quad stub_0, stub_1, stub_2, stub_3, stub_4, stub_5, stub_6, stub_7
        .quad stub_8, stub_9, stub_10, stub_11, stub_12, stub_13, stub_14, stub_15
        .quad stub_16, stub_17, stub_18, stub_19, stub_20, stub_21, stub_22, stub_23
        .quad stub_24, stub_25, stub_26, stub_27, stub_28, stub_29, stub_30, stub_31
multiboot_info: .quad 0
kernel_rsp:     .quad 0
resume_rip:     .quad 0
exception_count: .quad 0
last_vector:    .quad 0
last_error:     .quad 0
last_rip:       .quad 0
last_cs:        .quad 0
last_rflags:    .quad 0
last_cr2:       .quad 0
pass_message:   .asciz "fidelity checks passed\n"
fail_message:   .asciz "fidelity check failed\n"

        .bss
        .align 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pd:     .skip 4096
pd_high: .skip 4096
idt:    .skip 4096
tss:    .skip 4096
        .skip 16384
stack_top:
        .skip 8192
kernel_stack2_top:
        .skip 8192
double_fault_stack_top:
        .skip 8192
user_stack_top:
        .skip 64

        .text
        .code64
