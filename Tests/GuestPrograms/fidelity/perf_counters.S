# AMD's legacy performance counters (AMD64 APM vol. 2 13.2): PerfEvtSel0-3 at C001_0000-3,
# PerfCtr0-3 at C001_0004-7. Event 0xC0 counts retired instructions, 0x76 cycles; reserved
# PerfEvtSel bits raise #GP; RDPMC reads the counters at CPL 0.
        .include "harness.S"

        .set EVTSEL0, 0xC0010000
        .set PERFCTR0, 0xC0010004

        .macro WRMSR_IMM msr, value
        mov $\msr, %ecx
        mov $(\value & 0xFFFFFFFF), %eax
        mov $(\value >> 32), %edx
        wrmsr
        .endm

        # RAX = MSR `msr`.
        .macro RDMSR64 msr
        mov $\msr, %ecx
        rdmsr
        shl $32, %rdx
        or %rdx, %rax
        .endm

test_main:
        # Checks 1-2: every register reads and writes without #GP.
        EXPECT_NO_FAULT 1, call touch_all
        # Retired instructions (event 0xC0, USR|OS|EN) over a 1000-iteration loop (3000
        # instructions): at least 3000, and not wildly more.
        WRMSR_IMM PERFCTR0, 0
        WRMSR_IMM EVTSEL0, 0x4300C0
        mov $1000, %ecx
1:      nop
        dec %ecx
        jnz 1b
        RDMSR64 PERFCTR0
        cmp $3000, %rax
        FAIL_IF b, 3
        cmp $10000, %rax
        FAIL_IF a, 4
        # Disabled (EN clear): the counter holds its value.
        WRMSR_IMM EVTSEL0, 0x0300C0
        RDMSR64 PERFCTR0
        mov %rax, %rbx
        mov $1000, %ecx
1:      dec %ecx
        jnz 1b
        RDMSR64 PERFCTR0
        CHECK_SAME %rax, %rbx, 5
        # Cycles (event 0x76) on counter 1 advance.
        WRMSR_IMM PERFCTR0+1, 0
        WRMSR_IMM EVTSEL0+1, 0x430076
        mov $1000, %ecx
1:      dec %ecx
        jnz 1b
        RDMSR64 PERFCTR0+1
        test %rax, %rax
        FAIL_IF z, 6
        # A written value is kept (48 bits) and counting goes on from it.
        WRMSR_IMM PERFCTR0+2, 0x123456789ABC
        RDMSR64 PERFCTR0+2
        movabs $0x123456789ABC, %rbx
        CHECK_SAME %rax, %rbx, 7
        # RDPMC 1 (CPL 0) sees the cycle counter; RDPMC 4 does not exist here.
        mov $1, %ecx
        rdpmc
        shl $32, %rdx
        or %rdx, %rax
        test %rax, %rax
        FAIL_IF z, 8
        mov $4, %ecx
        EXPECT_FAULT 13, 9, rdpmc
        # Reserved PerfEvtSel bits (42 and up) raise #GP.
        mov $EVTSEL0+3, %ecx
        xor %eax, %eax
        mov $0x400, %edx
        EXPECT_FAULT 13, 10, wrmsr
        ret

touch_all:
        mov $EVTSEL0, %esi
1:      mov %esi, %ecx
        rdmsr
        mov %esi, %ecx
        xor %eax, %eax
        xor %edx, %edx
        wrmsr
        inc %esi
        cmp $EVTSEL0+8, %esi
        jne 1b
        ret
