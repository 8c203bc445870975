# 32-bit flat protected mode, linked and loaded at 0x8000. For the dirty-log test: writes one
# value into each of the pages at 0x20000 and 0x35000 (not 0x40000), then exits through the
# debug-exit port with 0.
        .code32
        .globl _start
_start:
        movl    $0x11223344, 0x20010
        movl    $0x55667788, 0x35008
        movl    0x40000, %eax
        xorl    %eax, %eax
        movw    $0xF4, %dx
        outl    %eax, %dx
        hlt
