# A 64-bit ELF guest that counts in `ticks` forever (entered in long mode by the ELF loader);
# only the host ends it. For interrupting a running guest from gdb (Ctrl-C).
        .text
        .code64
        .globl _start
_start:
        .globl spin
spin:   incq ticks(%rip)
        jmp spin

        .data
        .align 8
        .globl ticks
ticks:  .quad 0
