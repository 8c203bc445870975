# 32-bit flat protected mode, linked and loaded at 0x8000.
# The test MMIO device lives at 0xD0000000: offset 0 stores a value, offset 4 reads it back
# byte-swapped, offset 8 is a byte register, offset 0xA reads 0xBEEF.
# Results are reported on port 0x514; then debug exit 0.
        .code32
        .globl _start
_start:
        mov     $0xd0000000, %ebx
        movl    $0x12345678, (%ebx)
        mov     4(%ebx), %eax
        call    report
        movb    $0xab, 8(%ebx)
        movzbl  8(%ebx), %eax
        call    report
        movzwl  0xa(%ebx), %eax
        call    report
        mov     $0xf4, %dx
        xor     %eax, %eax
        outb    %al, %dx
halt:
        hlt
        jmp     halt

report:
        mov     $0x514, %dx
        outl    %eax, %dx
        ret
