# SYSCALL/SYSRET from ring 3 and single-step (TF) traps around them, in 64-bit mode and in
# compatibility mode (the case of a public KVM test suite: SYSRETL to 32-bit user code that
# sets TF and calls SYSCALL twice). SDM: a single-step trap follows an instruction that began
# with TF set (not the POPF that sets it); SYSCALL and SYSRET trap when TF is set at their end
# (SYSCALL's SFMASK clears it, SYSRET loads it from R11).
        .include "harness.S"

        .set TF, 0x100

test_main:
        # SYSCALL MSRs: kernel CS 0x08 (SS 0x10); SYSRET base 0x18: 32-bit CS 0x1B, SS 0x23,
        # 64-bit CS 0x2B. SFMASK clears TF, IF, DF, AC.
        mov $0xC0000081, %ecx
        xor %eax, %eax
        mov $0x00180008, %edx
        wrmsr
        mov $0xC0000082, %ecx
        lea syscall64_target(%rip), %rax
        xor %edx, %edx
        wrmsr
        mov $0xC0000083, %ecx
        lea syscall32_target(%rip), %rax
        xor %edx, %edx
        wrmsr
        mov $0xC0000084, %ecx
        mov $0x40700, %eax
        xor %edx, %edx
        wrmsr

        # Checks 1-4: single step in ring 0: POPF sets TF, the next instruction traps (RIP after
        # it, DR6.BS set), the handler clears TF.
        xor %eax, %eax
        mov %rax, %dr6
        movq $0, exception_count(%rip)
        pushf
        orq $TF, (%rsp)
        popf
        nop
after_first_nop:
        nop
        nop
        CHECK_EQ exception_count(%rip), 1, 1
        CHECK_EQ last_vector(%rip), 1, 2
        lea after_first_nop(%rip), %rax
        CHECK_SAME last_rip(%rip), %rax, 3
        mov %dr6, %rax
        test $0x4000, %eax
        FAIL_IF z, 4

        # Checks 5-10: 64-bit ring 3. SYSCALL (TF masked: no trap), SYSRETQ with TF in R11 traps
        # at the user return address in CS 0x2B; then INT 0x81 back here.
        movq $0, exception_count(%rip)
        movq $0, syscall_count(%rip)
        lea user64(%rip), %rdi
        mov $1, %esi
        call enter_user
        CHECK_EQ syscall_count(%rip), 1, 5
        CHECK_EQ exceptions_in_syscall(%rip), 0, 6
        CHECK_EQ exception_count(%rip), 1, 7
        CHECK_EQ last_vector(%rip), 1, 8
        CHECK_EQ last_cs(%rip), USER_CS64, 9
        lea user64_after_syscall(%rip), %rax
        CHECK_SAME last_rip(%rip), %rax, 10

        # Checks 11-14: the same in compatibility mode through CSTAR and SYSRETL: the trap after
        # SYSRETL comes in CS 0x1B; the second SYSCALL then returns to ring 0 (syscall32_target
        # sees the recorded #DB and jumps to back_from_compat).
        movq $0, exception_count(%rip)
        movq $0, syscall_count(%rip)
        mov %rsp, kernel_rsp(%rip)
        mov $user32, %ecx
        pushf
        pop %r11
        or $0x3000, %r11                # IOPL 3 in the user code
        mov $user_stack_top, %rsp
        sysretl
back_from_compat:
        mov kernel_rsp(%rip), %rsp
        mov $KERNEL_DS, %ax
        mov %ax, %ss
        CHECK_EQ syscall_count(%rip), 2, 11
        CHECK_EQ exception_count(%rip), 1, 12
        CHECK_EQ last_vector(%rip), 1, 13
        CHECK_EQ last_cs(%rip), USER_CS32, 14

        # Check 15: SYSCALL from ring 0 with STAR[63:48] = 0 (CS/SS from STAR[47:32]) returns
        # through a plain jump (as the suite's lazy-load test does).
        mov $0xC0000081, %ecx
        xor %eax, %eax
        mov $0x00000008, %edx
        wrmsr
        mov $0xC0000082, %ecx
        lea ring0_syscall_target(%rip), %rax
        xor %edx, %edx
        wrmsr
        pushf
        syscall
ring0_syscall_target:
        popf
        mov %cs, %ax
        movzx %ax, %rax
        CHECK_EQ %rax, KERNEL_CS, 15
        mov $KERNEL_DS, %ax
        mov %ax, %ss
        ret

syscall64_target:
        incq syscall_count(%rip)
        mov exception_count(%rip), %rax
        mov %rax, exceptions_in_syscall(%rip)
        or $TF, %r11
        sysretq

user64:
        pushf
        orq $TF, (%rsp)
        popf
        syscall
user64_after_syscall:
        int $0x81

syscall32_target:
        incq syscall_count(%rip)
        cmpq $0, exception_count(%rip)
        jne back_from_compat
        mov %eax, %r11d
        sysretl

        .code32
user32:
        pushf
        pop %eax
        or $TF, %eax
        push %eax
        popf
        syscall                         # no trap: SFMASK clears TF
        syscall                         # the trap after SYSRETL came first: back to ring 0
        mov $0x20, %al                  # not reached when SYSCALL and SYSRET trap correctly
        out %al, $0xF4
1:      jmp 1b
        .code64

        .data
syscall_count:  .quad 0
exceptions_in_syscall: .quad 0
