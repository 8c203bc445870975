# 32-bit flat protected mode, linked and loaded at 0x8000.
# Loads an empty IDT, then raises a breakpoint exception: #BP cannot be delivered (#GP),
# neither can #GP (#DF), nor #DF: a triple fault, which KVM reports as a shutdown.
# (The nested PVM-based KVM of the development host cannot emulate a ring-0 INT3 and reports
# an emulation failure instead; see triple_fault_ud2_32.S for a fault it does deliver.)
        .code32
        .globl _start
_start:
        lidt    empty_idt
        int3
        mov     $0xf4, %dx
        mov     $0x99, %al
        outb    %al, %dx
halt:
        hlt
        jmp     halt

        .balign 8
empty_idt:
        .word   0
        .long   0
