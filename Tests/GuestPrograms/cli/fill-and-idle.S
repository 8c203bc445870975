# A Multiboot v1 kernel that writes to every 4 KiB page from 2 MiB up to 48 MiB (so the host
# must back all of it), prints "filled" on COM1, then waits in HLT with interrupts enabled
# (nothing is programmed to interrupt it) for as long as the host lets it run; the test reads
# the VMM's memory mappings meanwhile. (HLT with interrupts off would power the machine off.)
        .include "multiboot.inc"
_start:
        cli
        movl $0x200000, %edi
touch:  movl $0x5A5A5A5A, (%edi)
        addl $4096, %edi
        cmpl $0x3000000, %edi
        jb touch
        movl $filled, %esi
        movw $0x3F8, %dx
next:   lodsb
        testb %al, %al
        jz idle
        outb %al, %dx
        jmp next
idle:   sti
        hlt
        jmp idle

        .data
filled: .asciz "filled\n"
