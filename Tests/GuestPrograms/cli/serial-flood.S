# A Multiboot v1 kernel that prints "flood running" on COM1 and then writes 'x' to the UART's
# transmit register forever, without ever looking at the line status: the host checks that a
# consumer that stops reading cannot stall the VMM.
        .include "multiboot.inc"
_start:
        movl $running, %esi
        movw $0x3F8, %dx
1:      lodsb
        testb %al, %al
        jz 2f
        outb %al, %dx
        jmp 1b
2:      movb $'x', %al
3:      outb %al, %dx
        jmp 3b

        .data
running: .asciz "flood running\n"
