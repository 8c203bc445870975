# Two vCPUs. Linked and loaded at 0x8000.
# The bootstrap processor (32-bit flat protected mode) wakes APIC ID 1 with INIT + SIPI
# (vector 0x09: the application processor starts in real mode at 0x9000), waits until the AP
# has stored its APIC ID and set a flag, then reports on port 0x514: its own APIC ID
# (CPUID.1:EBX[31:24]), its hypervisor bit (CPUID.1:ECX[31]), its logical processor count
# (CPUID.1:EBX[23:16]) and the AP's APIC ID; then debug exit 0.
# The AP also reports its APIC ID itself (from its own vCPU thread), then halts.
        .code32
        .globl _start
_start:
        movl    $0x000001ff, 0xfee000f0         # LAPIC SVR: software-enable
        movl    $0x01000000, 0xfee00310         # ICR high: destination APIC ID 1
        movl    $0x00004500, 0xfee00300         # ICR low: INIT, assert
        movl    $0x01000000, 0xfee00310
        movl    $0x00004609, 0xfee00300         # ICR low: STARTUP, vector 0x09
wait_for_ap:
        pause
        cmpl    $0x600d, ap_flag
        jne     wait_for_ap

        mov     $1, %eax
        cpuid
        mov     $0x514, %dx
        mov     %ebx, %eax
        shr     $24, %eax
        outl    %eax, %dx
        mov     %ecx, %eax
        shr     $31, %eax
        outl    %eax, %dx
        mov     %ebx, %eax
        shr     $16, %eax
        and     $0xff, %eax
        outl    %eax, %dx
        mov     ap_apic_id, %eax
        outl    %eax, %dx
        mov     $0xf4, %dx
        xor     %eax, %eax
        outb    %al, %dx
halt:
        hlt
        jmp     halt

        .balign 4
ap_flag:
        .long   0
ap_apic_id:
        .long   0xffffffff

        .org    0x1000                          # linear 0x9000: the SIPI vector 0x09 page
        .code16
ap_start:
        xor     %ax, %ax
        mov     %ax, %ds
        mov     $1, %eax
        cpuid
        shr     $24, %ebx
        mov     %ebx, %eax
        mov     $0x514, %dx
        outl    %eax, %dx
        addr32 mov %ebx, ap_apic_id
        addr32 movl $0x600d, ap_flag
ap_halt:
        cli
        hlt
        jmp     ap_halt
