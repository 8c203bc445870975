# 64-bit long mode, linked and loaded at 0x100000. Started directly in long mode as the
# Linux 64-bit boot protocol specifies: CS=0x10 (64-bit), DS=ES=SS=0x18, paging on with an
# identity map, interrupts off, RSI = address of boot_params.
# Reports on port 0x514 (one 32-bit OUT each):
#   RSI low, RSI high, the word at [RSI+0x1FE], CS, DS, SS, EFER low (RDMSR), CR0 low, CR4 low,
#   the 8-byte MMIO read back (low, high), a value pushed then popped; then debug exit 0x64.
        .code64
        .globl _start
_start:
        mov     $0x514, %dx
        mov     %rsi, %rax
        outl    %eax, %dx
        shr     $32, %rax
        outl    %eax, %dx
        movzwl  0x1fe(%rsi), %eax
        outl    %eax, %dx
        mov     %cs, %eax
        outl    %eax, %dx
        mov     %ds, %eax
        outl    %eax, %dx
        mov     %ss, %eax
        outl    %eax, %dx
        mov     $0xc0000080, %ecx
        rdmsr
        mov     $0x514, %dx
        outl    %eax, %dx
        mov     %cr0, %rax
        outl    %eax, %dx
        mov     %cr4, %rax
        outl    %eax, %dx

        # 8-byte MMIO write, then read back byte-swapped through the test device.
        mov     $0xd0000000, %ebx
        movabs  $0x1122334455667788, %rax
        mov     %rax, 0x10(%rbx)
        mov     0x18(%rbx), %rax
        outl    %eax, %dx
        shr     $32, %rax
        outl    %eax, %dx

        push    $0x77
        pop     %rax
        outl    %eax, %dx

        mov     $0xf4, %dx
        mov     $0x64, %al
        outb    %al, %dx
halt:
        hlt
        jmp     halt
