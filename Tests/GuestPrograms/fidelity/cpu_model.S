# The CPU model's features (run on the software CPU and on KVM): for each of CLFLUSH (with its
# line size), CLFLUSHOPT, CLWB, RDTSCP with IA32_TSC_AUX, RDPID and the TSC-deadline timer
# that CPUID offers, runs the instructions and MSRs behind it and prints its name after
# "features:"; fails when an offered feature does not work.
        .include "harness.S"

        .set LAPIC, 0xFEE00000

        # Fails with `check` unless bit `bit` of register `reg` is set.
        .macro EXPECT_BIT reg, bit, check
        bt $\bit, \reg
        FAIL_IF nc, \check
        .endm

test_main:
        lea features_message(%rip), %rsi
        call print
        # CLFLUSH and its line size.
        mov $1, %eax
        cpuid
        bt $19, %edx
        jnc 1f
        shr $8, %ebx
        and $0xFF, %ebx
        CHECK_EQ %rbx, 8, 2             # CLFLUSH line size: 8 * 8 = 64 bytes
        lea scratch(%rip), %rbx
        EXPECT_NO_FAULT 8, clflush (%rbx)
        lea name_clflush(%rip), %rsi
        call print
1:      # CLFLUSHOPT, CLWB, RDPID (leaf 7).
        mov $7, %eax
        xor %ecx, %ecx
        cpuid
        mov %ecx, %r14d
        mov %ebx, %r15d
        bt $23, %r15d
        jnc 1f
        lea scratch(%rip), %rbx
        EXPECT_NO_FAULT 9, clflushopt (%rbx)
        lea name_clflushopt(%rip), %rsi
        call print
1:      bt $24, %r15d
        jnc 1f
        lea scratch(%rip), %rbx
        EXPECT_NO_FAULT 10, clwb (%rbx)
        lea name_clwb(%rip), %rsi
        call print
1:      # IA32_TSC_AUX, read back by RDTSCP (ECX) and RDPID.
        mov $0x80000001, %eax
        cpuid
        bt $27, %edx
        jnc 1f
        mov $0xC0000103, %ecx
        mov $0x5A5A, %eax
        xor %edx, %edx
        wrmsr
        rdtscp
        CHECK_EQ %rcx, 0x5A5A, 11
        lea name_rdtscp(%rip), %rsi
        call print
        bt $22, %r14d
        jnc 1f
        movabs $0xFFFFFFFFFFFFFFFF, %rax
        rdpid %rax
        CHECK_EQ %rax, 0x5A5A, 12
        lea name_rdpid(%rip), %rsi
        call print
1:      mov $1, %eax
        cpuid
        bt $24, %ecx
        jc 1f
        jmp end_of_line
1:
        # TSC-deadline timer: LVT timer mode 10b, vector 0x40; the interrupt arrives once the
        # TSC passes the deadline, and IA32_TSC_DEADLINE then reads 0.
        mov $0x40, %edi
        lea timer_isr(%rip), %rsi
        mov $0x8E00, %edx
        call set_gate
        mov $LAPIC, %ebx
        movl $0x1FF, 0xF0(%rbx)         # software-enable, spurious vector 0xFF
        movl $0x40040, 0x320(%rbx)      # LVT timer: TSC-deadline, vector 0x40
        rdtsc
        shl $32, %rdx
        or %rdx, %rax
        add $200000, %rax
        mov %rax, %rdx
        shr $32, %rdx
        mov $0x6E0, %ecx
        wrmsr
        mov $0x6E0, %ecx                # armed: reads back the deadline
        rdmsr
        test %eax, %eax
        FAIL_IF z, 13
        mov $100000000, %r8
1:      sti
        nop
        cli
        cmpq $0, timer_ticks(%rip)
        jne 2f
        dec %r8
        jnz 1b
2:      CHECK_EQ timer_ticks(%rip), 1, 14
        mov $0x6E0, %ecx
        rdmsr
        shl $32, %rdx
        or %rdx, %rax
        CHECK_EQ %rax, 0, 15
        movl $0x10000, 0x320(%rbx)      # mask the timer again
        lea name_tsc_deadline(%rip), %rsi
        call print
end_of_line:
        lea newline(%rip), %rsi
        call print
        ret

timer_isr:
        incq timer_ticks(%rip)
        push %rax
        mov $LAPIC, %eax
        movl $0, 0xB0(%rax)             # EOI
        pop %rax
        iretq

        .data
features_message: .asciz "features:"
name_clflush:   .asciz " clflush"
name_clflushopt: .asciz " clflushopt"
name_clwb:      .asciz " clwb"
name_rdtscp:    .asciz " rdtscp"
name_rdpid:     .asciz " rdpid"
name_tsc_deadline: .asciz " tsc-deadline"
newline:        .asciz "\n"
timer_ticks:    .quad 0
        .align 64
scratch:        .skip 64
