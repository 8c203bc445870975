# 32-bit flat protected mode, linked and loaded at 0x8000. For the snapshot tests: 30000
# rounds, each reading the counter device (port 0x518, every read returns the next value)
# twice, mixing the values into EBX and reporting EBX (port 0x514); then exits through the
# debug-exit port with the low bits of EBX. A read repeated or lost across a snapshot changes
# every later report.
        .code32
        .globl _start
_start:
        movl    $30000, %ecx
        movl    $0x13579BDF, %ebx
round:
        movw    $0x518, %dx
        inl     %dx, %eax
        addl    %eax, %ebx
        roll    $3, %ebx
        inl     %dx, %eax
        xorl    %eax, %ebx
        movl    %ebx, %eax
        movw    $0x514, %dx
        outl    %eax, %dx
        decl    %ecx
        jnz     round
        movl    %ebx, %eax
        andl    $0x7F, %eax
        movw    $0xF4, %dx
        outl    %eax, %dx
        hlt
