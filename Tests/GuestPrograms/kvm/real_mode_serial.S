# Real mode (16-bit). Linked at 0, loaded at 0x8000, started with CS=0x0800 IP=0.
# Writes a greeting to port 0x3F8 one byte per OUT, then a second line with one REP OUTSB,
# then writes 7 to the debug-exit port.
        .code16
        .globl _start
_start:
        mov     %cs, %ax
        mov     %ax, %ds
        mov     %ax, %es
        cld
        mov     $0x3f8, %dx
        mov     $greeting, %si
next_byte:
        lodsb
        test    %al, %al
        jz      string_output
        out     %al, %dx
        jmp     next_byte
string_output:
        mov     $line, %si
        mov     $(line_end - line), %cx
        rep outsb
        mov     $0xf4, %dx
        mov     $7, %al
        out     %al, %dx
halt:
        hlt
        jmp     halt

greeting:
        .asciz  "Hello from a real-mode KVM guest\n"
line:
        .ascii  "rep outsb moves a whole string per exit\n"
line_end:
