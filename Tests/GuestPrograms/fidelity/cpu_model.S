# The CPU model's features (run on the software CPU and on KVM): CPUID bits and the
# instructions and MSRs behind them: CLFLUSH (line size), CLFLUSHOPT, CLWB, RDTSCP with
# IA32_TSC_AUX, RDPID, the TSC-deadline timer.
        .include "harness.S"

        .set LAPIC, 0xFEE00000

        # Fails with `check` unless bit `bit` of register `reg` is set.
        .macro EXPECT_BIT reg, bit, check
        bt $\bit, \reg
        FAIL_IF nc, \check
        .endm

test_main:
        mov $1, %eax
        cpuid
        EXPECT_BIT %edx, 19, 1          # CLFSH
        shr $8, %ebx
        and $0xFF, %ebx
        CHECK_EQ %rbx, 8, 2             # CLFLUSH line size: 8 * 8 = 64 bytes
        EXPECT_BIT %ecx, 24, 3          # TSC-deadline
        mov $7, %eax
        xor %ecx, %ecx
        cpuid
        EXPECT_BIT %ebx, 23, 4          # CLFLUSHOPT
        EXPECT_BIT %ebx, 24, 5          # CLWB
        EXPECT_BIT %ecx, 22, 6          # RDPID
        mov $0x80000001, %eax
        cpuid
        EXPECT_BIT %edx, 27, 7          # RDTSCP

        lea scratch(%rip), %rbx
        EXPECT_NO_FAULT 8, clflush (%rbx)
        EXPECT_NO_FAULT 9, clflushopt (%rbx)
        EXPECT_NO_FAULT 10, clwb (%rbx)

        # IA32_TSC_AUX read back, by RDTSCP (ECX) and RDPID.
        mov $0xC0000103, %ecx
        mov $0x5A5A, %eax
        xor %edx, %edx
        wrmsr
        rdtscp
        CHECK_EQ %rcx, 0x5A5A, 11
        movabs $0xFFFFFFFFFFFFFFFF, %rax
        rdpid %rax
        CHECK_EQ %rax, 0x5A5A, 12

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
        ret

timer_isr:
        incq timer_ticks(%rip)
        push %rax
        mov $LAPIC, %eax
        movl $0, 0xB0(%rax)             # EOI
        pop %rax
        iretq

        .data
timer_ticks:    .quad 0
        .align 64
scratch:        .skip 64
