# A 64-bit ELF guest for the gdb stub tests, linked with its symbols. The ELF loader enters it
# in long mode with the first 4 GiB identity-mapped. It fills registers and memory with known
# values in fill_registers (ring 0), switches to ring 3, increments `counter` three times in
# count_up (a watchpoint target), then exits through isa-debug-exit with status (0x21 << 1) | 1 = 67. It uses only instructions
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
        # Own page tables (first 2 MiB, user-accessible), GDT with ring-3 segments, then IRETQ
        # to ring 3 with IOPL 3 (so the exit port is reachable): count_up runs in ring 3, where
        # nested KVM runs guest code natively (and so checks data breakpoints).
        lea pdpt(%rip), %rax
        or $7, %rax
        mov %rax, pml4(%rip)
        lea pd(%rip), %rax
        or $7, %rax
        mov %rax, pdpt(%rip)
        movq $0x87, pd(%rip)
        lea pml4(%rip), %rax
        mov %rax, %cr3
        lgdt gdt_pointer(%rip)
        pushq $0x08
        lea 2f(%rip), %rax
        push %rax
        lretq
2:      mov $0x10, %eax
        mov %eax, %ds
        mov %eax, %es
        mov %eax, %ss
        pushq $0x1B                     # SS: user data
        lea user_stack_top(%rip), %rax
        push %rax
        pushq $0x3002                   # RFLAGS: IOPL 3, interrupts off
        pushq $0x23                     # CS: user code
        lea user_entry(%rip), %rax
        push %rax
        iretq

        .globl user_entry
user_entry:
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
gdt:    .quad 0
        .quad 0x00AF9A000000FFFF        # 0x08: ring-0 64-bit code
        .quad 0x00CF92000000FFFF        # 0x10: ring-0 data
        .quad 0x00CFF2000000FFFF        # 0x18: ring-3 data
        .quad 0x00AFFA000000FFFF        # 0x20: ring-3 64-bit code
gdt_end:
gdt_pointer:
        .word gdt_end - gdt - 1
        .quad gdt
        .align 16
        .globl pattern
pattern: .quad 0, 0
        .globl counter
counter: .quad 0

        .bss
        .align 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pd:     .skip 4096
        .skip 4096
stack_top:
        .skip 4096
user_stack_top:
