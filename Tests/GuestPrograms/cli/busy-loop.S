# A Multiboot v1 kernel that prints "busy loop running" on COM1 and then spins forever,
# printing "tick" after every 2^16 iterations of a countdown loop: the host measures the guest's
# CPU speed by counting ticks per second.
        .include "multiboot.inc"
_start:
        movl $stack_top, %esp
        movl $running, %esi
        call print
spin:   movl $0x10000, %ecx
count:  decl %ecx
        jnz count
        movl $tick, %esi
        call print
        jmp spin

# Prints the NUL-terminated string at %esi on COM1.
print:  movw $0x3F8, %dx
1:      lodsb
        testb %al, %al
        jz 2f
        outb %al, %dx
        jmp 1b
2:      ret

        .data
running: .asciz "busy loop running\n"
tick:    .asciz "tick\n"

        .bss
        .align 16
        .space 4096
stack_top:
