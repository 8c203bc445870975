# Guest for scripts/bench-kvm-exit.sh, shared by the C baseline (kvm_exit.c) and
# `hostvisor-bench kvm-exit`. Linked and loaded at 0x8000; both hosts start it in flat 32-bit
# protected mode at CPL 3 with IOPL 3 and ECX = iteration count, so the loop itself runs
# natively in the guest and each iteration costs one port-I/O exit round trip.
# After the loop, writes 0 to the debug-exit port 0xF4.
        .code32
        .globl _start
_start:
        mov     $0x80, %dx
loop:
        outb    %al, %dx
        dec     %ecx
        jnz     loop
        mov     $0xf4, %dx
        xor     %eax, %eax
        outb    %al, %dx
halt:
        jmp     halt
