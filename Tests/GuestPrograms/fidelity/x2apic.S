        .text
        .code64
# x2APIC mode on one CPU (SDM vol. 3 11.12): CPUID.1:ECX.x2APIC; IA32_APIC_BASE.EXTD and its
# legal and illegal transitions (#GP for EXTD without EN, x2APIC to xAPIC, disabled to x2APIC);
# the registers as MSRs 0x800-0x8FF (#GP outside x2APIC mode, for reserved, read-only and
# write-only registers, for a non-zero EOI and for bits 63:32 outside the ICR); the xAPIC page
# no longer decoded; the x2APIC ID (= the initial APIC ID of CPUID.1:EBX) and the logical ID
# derived from it; the timer run through MSRs; SELF IPI; ICR IPIs to this CPU by physical ID,
# by logical cluster and by the 0xFFFFFFFF broadcast.
        .include "harness.S"

        .set LAPIC, 0xFEE00000
        .set APIC_BASE_MSR, 0x1B
        .set X2_ID, 0x802
        .set X2_VERSION, 0x803
        .set X2_TPR, 0x808
        .set X2_EOI, 0x80B
        .set X2_LDR, 0x80D
        .set X2_DFR, 0x80E
        .set X2_SVR, 0x80F
        .set X2_ICR, 0x830
        .set X2_LVT_TIMER, 0x832
        .set X2_INITIAL, 0x838
        .set X2_CURRENT, 0x839
        .set X2_DIVIDE, 0x83E
        .set X2_SELF_IPI, 0x83F
        .set TIMER_VECTOR, 0x40
        .set IPI_VECTOR, 0x41

        # RAX = IA32_APIC_BASE.
        .macro READ_BASE
        mov $APIC_BASE_MSR, %ecx
        rdmsr
        shl $32, %rdx
        or %rdx, %rax
        .endm

        # IA32_APIC_BASE = RAX.
        .macro WRITE_BASE
        mov %rax, %rdx
        shr $32, %rdx
        mov $APIC_BASE_MSR, %ecx
        wrmsr
        .endm

        # x2APIC register `msr` = EDX:EAX.
        .macro WRITE_X2 msr
        mov $\msr, %ecx
        wrmsr
        .endm

        # RAX = x2APIC register `msr` (EDX:EAX combined).
        .macro READ_X2 msr
        mov $\msr, %ecx
        rdmsr
        shl $32, %rdx
        or %rdx, %rax
        .endm

test_main:
        mov $1, %eax
        cpuid
        bt $21, %ecx                    # CPUID.1:ECX.x2APIC
        FAIL_IF nc, 1
        shr $24, %ebx
        mov %ebx, %r14d                 # the initial APIC ID
        READ_BASE
        mov %rax, %r12                  # xAPIC mode: EN, base 0xFEE00000, BSP
        movabs LAPIC+0x30, %eax
        mov %eax, %r13d                 # the version register through the page

        # xAPIC mode: the x2APIC MSRs raise #GP; EXTD without EN raises #GP.
        mov $X2_ID, %ecx
        EXPECT_FAULT 13, 2, rdmsr
        xor %eax, %eax
        xor %edx, %edx
        mov $X2_TPR, %ecx
        EXPECT_FAULT 13, 3, wrmsr
        mov %r12, %rax
        btr $11, %rax
        bts $10, %rax
        EXPECT_FAULT 13, 4, WRITE_BASE

        # xAPIC -> x2APIC.
        mov %r12, %rax
        bts $10, %rax
        EXPECT_NO_FAULT 5, WRITE_BASE
        READ_BASE
        bt $10, %rax
        FAIL_IF nc, 6
        movabs LAPIC+0x30, %eax         # the page is no longer decoded
        cmp $-1, %eax
        FAIL_IF ne, 7

        # Identification: the x2APIC ID, the version, the logical ID (cluster, member bit).
        READ_X2 X2_ID
        CHECK_SAME %eax, %r14d, 8
        READ_X2 X2_VERSION
        CHECK_SAME %eax, %r13d, 9
        READ_X2 X2_LDR
        mov %r14d, %ecx
        and $15, %ecx
        mov $1, %edx
        shl %cl, %edx
        mov %r14d, %ecx
        shr $4, %ecx
        shl $16, %ecx
        or %ecx, %edx
        mov %edx, %r15d                 # the expected logical ID
        CHECK_SAME %eax, %r15d, 10

        # #GP: read-only ID and LDR, write-only EOI and SELF IPI, no DFR, reserved 0x831,
        # a non-zero EOI, bits 63:32 of the TPR, x2APIC -> xAPIC, disabled -> x2APIC below.
        xor %eax, %eax
        xor %edx, %edx
        mov $X2_ID, %ecx
        EXPECT_FAULT 13, 11, wrmsr
        mov $X2_LDR, %ecx
        EXPECT_FAULT 13, 12, wrmsr
        mov $X2_EOI, %ecx
        EXPECT_FAULT 13, 13, rdmsr
        mov $X2_SELF_IPI, %ecx
        EXPECT_FAULT 13, 14, rdmsr
        mov $X2_DFR, %ecx
        EXPECT_FAULT 13, 15, rdmsr
        mov $0x831, %ecx
        EXPECT_FAULT 13, 16, rdmsr
        mov $1, %eax
        xor %edx, %edx
        mov $X2_EOI, %ecx
        EXPECT_FAULT 13, 17, wrmsr
        xor %eax, %eax
        mov $1, %edx
        mov $X2_TPR, %ecx
        EXPECT_FAULT 13, 18, wrmsr
        mov $0x20, %eax
        xor %edx, %edx
        EXPECT_NO_FAULT 19, WRITE_X2 X2_TPR
        READ_X2 X2_TPR
        CHECK_EQ %rax, 0x20, 20
        xor %eax, %eax
        xor %edx, %edx
        WRITE_X2 X2_TPR
        mov %r12, %rax
        EXPECT_FAULT 13, 21, WRITE_BASE

        # Interrupt handlers for the timer and IPI vectors.
        mov $TIMER_VECTOR, %edi
        lea timer_handler(%rip), %rsi
        mov $0x8E00, %edx
        call set_gate
        mov $IPI_VECTOR, %edi
        lea ipi_handler(%rip), %rsi
        mov $0x8E00, %edx
        call set_gate

        # The timer through MSRs: software-enable, divide by 1, one-shot, 20 million counts
        # (20 ms at the 1 GHz timer clock: long enough that a host which deschedules the vCPU
        # thread between the write and the read does not see the timer expire in between).
        mov $0x1FF, %eax
        xor %edx, %edx
        WRITE_X2 X2_SVR
        mov $0xB, %eax
        WRITE_X2 X2_DIVIDE
        mov $TIMER_VECTOR, %eax
        WRITE_X2 X2_LVT_TIMER
        READ_X2 X2_LVT_TIMER
        CHECK_EQ %rax, TIMER_VECTOR, 22
        mov $20000000, %eax
        xor %edx, %edx
        WRITE_X2 X2_INITIAL
        READ_X2 X2_CURRENT
        test %rax, %rax
        FAIL_IF z, 23
        cmp $20000000, %rax
        FAIL_IF a, 24
        sti
        mov $200000000, %r8
1:      cmpq $0, timer_count(%rip)
        jne 2f
        dec %r8
        jnz 1b
        mov $25, %eax
        jmp fail
2:      cli
        CHECK_EQ timer_count(%rip), 1, 26
        READ_X2 X2_CURRENT
        CHECK_EQ %rax, 0, 27

        # SELF IPI.
        mov $IPI_VECTOR, %eax
        xor %edx, %edx
        WRITE_X2 X2_SELF_IPI
        sti
        nop
        cli
        CHECK_EQ ipi_count(%rip), 1, 28

        # ICR: physical destination = own x2APIC ID, fixed, vector IPI_VECTOR.
        mov $IPI_VECTOR, %eax
        mov %r14d, %edx
        WRITE_X2 X2_ICR
        sti
        nop
        cli
        CHECK_EQ ipi_count(%rip), 2, 29
        READ_X2 X2_ICR                  # the 32-bit destination reads back
        shr $32, %rax
        CHECK_SAME %eax, %r14d, 30
        # Logical destination: own cluster and member bit.
        mov $(IPI_VECTOR | 0x800), %eax
        mov %r15d, %edx
        WRITE_X2 X2_ICR
        sti
        nop
        cli
        CHECK_EQ ipi_count(%rip), 3, 31
        # Logical destination in another cluster: not for this CPU.
        mov $(IPI_VECTOR | 0x800), %eax
        mov %r15d, %edx
        add $0x10000, %edx
        WRITE_X2 X2_ICR
        sti
        nop
        cli
        CHECK_EQ ipi_count(%rip), 3, 32
        # Broadcast.
        mov $IPI_VECTOR, %eax
        mov $0xFFFFFFFF, %edx
        WRITE_X2 X2_ICR
        sti
        nop
        cli
        CHECK_EQ ipi_count(%rip), 4, 33

        # x2APIC -> disabled -> (not x2APIC) -> xAPIC: the page answers again.
        mov %r12, %rax
        btr $11, %rax
        EXPECT_NO_FAULT 34, WRITE_BASE
        mov $X2_ID, %ecx
        EXPECT_FAULT 13, 35, rdmsr
        mov %r12, %rax
        bts $10, %rax
        EXPECT_FAULT 13, 36, WRITE_BASE
        mov %r12, %rax
        EXPECT_NO_FAULT 37, WRITE_BASE
        movabs LAPIC+0x30, %eax
        CHECK_SAME %eax, %r13d, 38
        ret

timer_handler:
        push %rax
        push %rcx
        push %rdx
        incq timer_count(%rip)
        xor %eax, %eax
        xor %edx, %edx
        mov $X2_EOI, %ecx
        wrmsr
        pop %rdx
        pop %rcx
        pop %rax
        iretq

ipi_handler:
        push %rax
        push %rcx
        push %rdx
        incq ipi_count(%rip)
        xor %eax, %eax
        xor %edx, %edx
        mov $X2_EOI, %ecx
        wrmsr
        pop %rdx
        pop %rcx
        pop %rax
        iretq

        .data
timer_count:    .quad 0
ipi_count:      .quad 0
