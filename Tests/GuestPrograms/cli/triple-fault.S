# A Multiboot v1 kernel that triple-faults: with an empty IDT, UD2 raises #UD, whose delivery
# faults (#GP), then the double fault's delivery faults too: the CPU shuts down.
        .include "multiboot.inc"
_start:
        lidt empty_idt
        .globl fault_here
fault_here:
        ud2
        movw $0xF4, %dx                 # not reached
        movl $0x7F, %eax
        outl %eax, %dx
        hlt

        .align 8
empty_idt:
        .word 0
        .long 0
