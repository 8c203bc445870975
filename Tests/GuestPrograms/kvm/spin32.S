# 32-bit flat protected mode, linked and loaded at 0x8000. Spins at ring 0 forever;
# only a stop request from the host ends it.
        .code32
        .globl _start
_start:
        jmp     _start
