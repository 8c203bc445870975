# A Multiboot v1 kernel that prints a line on COM1 and exits through isa-debug-exit.
# Runs in the 32-bit protected mode that a Multiboot loader provides.
        .include "multiboot.inc"
_start:
        cmpl $0x2BADB002, %eax          # the loader's magic
        jne fail
        movl $message, %esi
next:   lodsb
        testb %al, %al
        jz done
        movw $0x3F8, %dx
        outb %al, %dx
        jmp next
done:   movw $0xF4, %dx
        movl $0x21, %eax                # exit status (0x21 << 1) | 1 = 67
        outl %eax, %dx
        hlt
fail:   movw $0xF4, %dx
        movl $0x1, %eax
        outl %eax, %dx
        hlt

        .data
message: .asciz "hello from the guest\n"
