# 32-bit flat protected mode, linked and loaded at 0x8000.
# Loads an empty IDT, then executes UD2: #UD cannot be delivered (#GP), neither can #GP
# (#DF), nor #DF: a triple fault, which KVM reports as a shutdown.
        .code32
        .globl _start
_start:
        lidt    empty_idt
        ud2
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
