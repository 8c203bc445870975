# A 64-bit ELF guest for the gdb stub tests, linked with its symbols. The ELF loader enters it
# in long mode with the first 4 GiB identity-mapped. It fills registers and memory with known
# values in fill_registers, increments `counter` three times in count_up (a watchpoint target),
# then exits through isa-debug-exit with status (0x21 << 1) | 1 = 67. It uses only instructions
# that KVM's instruction emulator handles too (nested KVM may emulate all ring-0 code).
        .text
        .code64
        .globl _start
_start:
        lea stack_top(%rip), %rsp
        mov %cr4, %rax
        or $0x600, %rax                 # OSFXSR | OSXMMEXCPT: SSE usable
        mov %rax, %cr4
        call fill_registers
        .globl after_fill
after_fill:
        call count_up
        .globl before_exit
before_exit:
        mov $0xF4, %dx
        mov $0x21, %eax
        out %eax, %dx
        hlt
        jmp before_exit

        .globl fill_registers
fill_registers:
        movabs $0x1122334455667788, %rbx
        movabs $0xA5A5A5A5DEADBEEF, %r12
        mov $0x1234, %ecx
        movabs $0x0123456789ABCDEF, %rax
        mov %rax, pattern(%rip)
        movabs $0xFEDCBA9876543210, %rax
        mov %rax, pattern+8(%rip)
        movdqu pattern(%rip), %xmm3
        .globl fill_done
fill_done:
        ret

        .globl count_up
count_up:
        mov $3, %ecx
1:      incq counter(%rip)
        dec %ecx
        jnz 1b
        ret

        .data
        .align 16
        .globl pattern
pattern: .quad 0, 0
        .globl counter
counter: .quad 0

        .bss
        .align 16
        .skip 4096
stack_top:
