# A Multiboot v1 kernel that writes to every 4 KiB page from 2 MiB up to 192 MiB (so the host
# must back all of it), prints "filled" on COM1 and exits through isa-debug-exit (status 0x21).
        .include "multiboot.inc"
_start:
        movl $0x200000, %edi
touch:  movl %edi, (%edi)
        addl $4096, %edi
        cmpl $0xC000000, %edi
        jb touch
        movl $filled, %esi
        movw $0x3F8, %dx
next:   lodsb
        testb %al, %al
        jz done
        outb %al, %dx
        jmp next
done:   movw $0xF4, %dx
        movl $0x21, %eax
        outl %eax, %dx
        hlt

        .data
filled: .asciz "filled\n"
