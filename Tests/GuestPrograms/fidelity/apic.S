# The local APIC's IA32_APIC_BASE (SDM vol. 3 10.4.3-10.4.5) and one-shot timer (10.5.4):
# reserved bits raise #GP (including base bits at or above MAXPHYADDR); a disabled APIC clears
# CPUID.1:EDX.APIC and stops decoding its page; the base can move; a one-shot timer's current
# count is 0 after expiry and stays 0 when the mode then changes to periodic.
        .include "harness.S"

        .set LAPIC, 0xFEE00000
        .set MOVED, 0xFEB00000
        .set APIC_BASE_MSR, 0x1B

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

        # Fails with `check` unless EAX is all ones (nothing decoded the access).
        .macro CHECK_ALL_ONES check
        cmp $-1, %eax
        FAIL_IF ne, \check
        .endm

test_main:
        READ_BASE
        mov %rax, %r12                  # the reset value: 0xFEE00000 | EN | BSP
        movabs $0xFFFFFFFFFF000, %rbx
        and %rax, %rbx
        mov $LAPIC, %edx
        CHECK_SAME %rbx, %rdx, 1
        bt $11, %rax
        FAIL_IF nc, 2
        movabs LAPIC+0x30, %eax         # the version register
        mov %eax, %r13d

        # Reserved bits: bit 0, x2APIC enable (bit 10) without EN, base bit MAXPHYADDR.
        mov %r12, %rax
        or $1, %rax
        EXPECT_FAULT 13, 3, WRITE_BASE
        mov %r12, %rax
        btr $11, %rax
        or $0x400, %rax
        EXPECT_FAULT 13, 4, WRITE_BASE
        mov $0x80000008, %eax
        cpuid
        movzx %al, %ecx
        mov $1, %eax
        shl %cl, %rax
        or %r12, %rax
        EXPECT_FAULT 13, 5, WRITE_BASE

        # Disabled: CPUID.1:EDX.APIC reads 0, the page reads all ones.
        mov %r12, %rax
        btr $11, %rax
        WRITE_BASE
        mov $1, %eax
        cpuid
        bt $9, %edx
        FAIL_IF c, 6
        movabs LAPIC+0x30, %eax
        CHECK_ALL_ONES 7
        # Enabled again.
        mov %r12, %rax
        WRITE_BASE
        mov $1, %eax
        cpuid
        bt $9, %edx
        FAIL_IF nc, 8
        movabs LAPIC+0x30, %eax
        CHECK_SAME %eax, %r13d, 9

        # Relocated: the registers answer at the new base, not at the old one.
        mov %r12, %rax
        and $0xFFF, %eax
        mov $MOVED, %edx
        or %rdx, %rax
        WRITE_BASE
        movabs MOVED+0x30, %eax
        CHECK_SAME %eax, %r13d, 10
        movabs LAPIC+0x30, %eax
        CHECK_ALL_ONES 11
        mov %r12, %rax
        WRITE_BASE
        movabs LAPIC+0x30, %eax
        CHECK_SAME %eax, %r13d, 12

        # One-shot timer, masked, divide by 1, 20 million counts (20 ms at the 1 GHz timer
        # clock, so a descheduled vCPU thread does not see it expire before the first read):
        # wait for the current count to reach 0, check it stays 0, and stays 0 after a switch
        # to periodic mode.
        mov $LAPIC, %ebx
        movl $0x1FF, 0xF0(%rbx)
        movl $0xB, 0x3E0(%rbx)
        movl $0x10040, 0x320(%rbx)      # masked, one-shot, vector 0x40
        movl $20000000, 0x380(%rbx)
        mov 0x390(%rbx), %eax
        test %eax, %eax
        FAIL_IF z, 13                   # running: nonzero
        mov $200000000, %r8
1:      mov 0x390(%rbx), %eax
        test %eax, %eax
        jz 2f
        dec %r8
        jnz 1b
        mov $14, %eax
        jmp fail
2:      mov $1000, %ecx                 # a while later, still 0
3:      dec %ecx
        jnz 3b
        mov 0x390(%rbx), %eax
        CHECK_EQ %rax, 0, 15
        movl $0x30040, 0x320(%rbx)      # periodic now: the expired timer stays stopped
        mov 0x390(%rbx), %eax
        CHECK_EQ %rax, 0, 16
        mov 0x380(%rbx), %eax
        CHECK_EQ %rax, 20000000, 17        # the initial count is kept
        movl $0, 0x380(%rbx)
        ret
