# 32-bit flat protected mode, linked and loaded at 0x8000.
# Leaves a marker in EBX, then writes 42 to the debug-exit port with a 32-bit OUT.
        .code32
        .globl _start
_start:
        mov     $0xcafebabe, %ebx
        mov     $42, %eax
        mov     $0xf4, %dx
        out     %eax, %dx
halt:
        hlt
        jmp     halt
