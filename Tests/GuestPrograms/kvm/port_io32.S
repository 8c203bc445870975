# 32-bit flat protected mode, linked and loaded at 0x8000, ESP set by the test.
# IN of each size from the value source (0x510), each result reported on 0x514;
# OUT of each size to the recorder (0x516); REP INSW of 4 words from the counter (0x518)
# into memory, then REP OUTSW of those words to the recorder; debug exit 0.
        .code32
        .globl _start
_start:
        cld
        mov     $0x510, %dx
        xor     %eax, %eax
        inb     %dx, %al
        call    report
        xor     %eax, %eax
        inw     %dx, %ax
        call    report
        inl     %dx, %eax
        call    report

        mov     $0x516, %dx
        mov     $0x5a, %al
        outb    %al, %dx
        mov     $0xbeef, %ax
        outw    %ax, %dx
        mov     $0x01234567, %eax
        outl    %eax, %dx

        mov     $0x518, %dx
        mov     $buffer, %edi
        mov     $4, %ecx
        rep insw
        mov     $0x516, %dx
        mov     $buffer, %esi
        mov     $4, %ecx
        rep outsw

        mov     $0xf4, %dx
        xor     %eax, %eax
        outb    %al, %dx
halt:
        hlt
        jmp     halt

report:
        push    %edx
        mov     $0x514, %dx
        outl    %eax, %dx
        pop     %edx
        ret

        .balign 4
buffer:
        .fill   8, 1, 0xcc
