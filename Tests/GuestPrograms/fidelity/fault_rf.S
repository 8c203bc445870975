# RF in the RFLAGS image of exception frames (SDM vol. 3 17.3.1.1): set for every fault
# (#UD, #GP, #PF, #DE), clear for traps (#BP, single-step #DB); after IRET restores RF=1 it lasts
# one instruction.
        .include "harness.S"

        .set RF, 0x10000

        .macro EXPECT_RF set, check
        mov last_rflags(%rip), %rax
        test $RF, %eax
        .if \set
        FAIL_IF z, \check
        .else
        FAIL_IF nz, \check
        .endif
        .endm

        .macro wrmsr_unknown
        mov $0x12345678, %ecx
        wrmsr
        .endm

test_main:
        EXPECT_FAULT 6, 1, ud2
        EXPECT_RF 1, 2
        EXPECT_FAULT 13, 3, wrmsr_unknown
        EXPECT_RF 1, 4
        EXPECT_FAULT 14, 5, movq 0x50000000, %rax
        EXPECT_RF 1, 6
        xor %ecx, %ecx
        EXPECT_FAULT 0, 7, div %ecx
        EXPECT_RF 1, 8
        EXPECT_FAULT 3, 9, int3
        EXPECT_RF 0, 10
        # Single-step trap: RF clear.
        pushf
        orq $0x100, (%rsp)
        popf
        EXPECT_FAULT 1, 11, nop
        EXPECT_RF 0, 12
        # IRET back with RF=1 (the #UD frame, resumed at a NOP): the INT3 right after that NOP
        # pushes RF=0, as RF is cleared when the NOP completes.
        movq $0xFF, last_vector(%rip)
        lea 1f(%rip), %rax
        mov %rax, resume_rip(%rip)
        ud2
1:      nop
        EXPECT_FAULT 3, 13, int3
        EXPECT_RF 0, 14
        ret
