        .text
        .code64
# x2APIC IPIs between two CPUs (SDM vol. 3 11.12.9-11.12.10): the BSP enters x2APIC mode and
# starts the AP with INIT and SIPI through the 64-bit ICR (MSR 0x830, 32-bit destination in
# bits 63:32); the AP, in real mode, enters x2APIC mode itself, reports its x2APIC ID and
# counts vector 0x50 through its real-mode IVT. The BSP then sends vector 0x50 to the AP by
# physical x2APIC ID, by logical cluster destination (cluster 0, member bit 1), and to every
# CPU by the 0xFFFFFFFF broadcast (which reaches the BSP too); a logical destination in
# another cluster reaches nobody. Run with two vCPUs.
        .include "harness.S"

        .set APIC_BASE_MSR, 0x1B
        .set X2_ID, 0x802
        .set X2_EOI, 0x80B
        .set X2_SVR, 0x80F
        .set X2_ICR, 0x830
        .set VECTOR, 0x50
        .set TRAMPOLINE, 0x70000        # SIPI vector 0x70
        .set AP_READY, 0x6000           # the AP's data (real-mode DS = 0)
        .set AP_ID, 0x6004
        .set AP_COUNT, 0x6008

        .macro WRITE_ICR low, destination
        mov $\low, %eax
        mov $\destination, %edx
        mov $X2_ICR, %ecx
        wrmsr
        .endm

        # Fails with `check` unless the AP counted `count` interrupts within a while.
        .macro WAIT_AP_COUNT count, check
        mov $100000000, %r8
1:      cmpl $\count, AP_COUNT
        je 2f
        pause
        dec %r8
        jnz 1b
        mov $\check, %eax
        jmp fail
2:
        .endm

test_main:
        mov $APIC_BASE_MSR, %ecx
        rdmsr
        or $0xC00, %eax                 # EN | EXTD
        wrmsr
        mov $0x1FF, %eax
        xor %edx, %edx
        mov $X2_SVR, %ecx
        wrmsr
        mov $VECTOR, %edi
        lea bsp_handler(%rip), %rsi
        mov $0x8E00, %edx
        call set_gate

        # The AP's trampoline and data.
        lea ap_start(%rip), %rsi
        mov $TRAMPOLINE, %edi
        mov $(ap_end - ap_start), %ecx
        cld
        rep movsb
        movl $0, AP_READY
        movl $0xFFFFFFFF, AP_ID
        movl $0, AP_COUNT

        WRITE_ICR 0x4500, 1             # INIT to x2APIC ID 1
        WRITE_ICR 0x4600 | (TRAMPOLINE >> 12), 1
        mov $100000000, %r8
1:      cmpl $1, AP_READY
        je 2f
        pause
        dec %r8
        jnz 1b
        mov $1, %eax
        jmp fail
2:      CHECK_EQ AP_ID, 1, 2            # (a 32-bit read compared with 1: ID and COUNT = 0)

        WRITE_ICR VECTOR, 1             # physical destination: x2APIC ID 1
        WAIT_AP_COUNT 1, 3
        WRITE_ICR VECTOR | 0x800, 2     # logical: cluster 0, member 1
        WAIT_AP_COUNT 2, 4
        WRITE_ICR VECTOR | 0x800, 0x10002   # cluster 1: nobody
        WRITE_ICR VECTOR, 0xFFFFFFFF    # broadcast: the AP and this CPU
        WAIT_AP_COUNT 3, 5
        sti
        nop
        cli
        CHECK_EQ bsp_count(%rip), 1, 6
        ret

bsp_handler:
        push %rax
        push %rcx
        push %rdx
        incq bsp_count(%rip)
        xor %eax, %eax
        xor %edx, %edx
        mov $X2_EOI, %ecx
        wrmsr
        pop %rdx
        pop %rcx
        pop %rax
        iretq

# The AP: real mode, CS = 0x7000, IP = 0.
        .code16
ap_start:
        cli
        xor %ax, %ax
        mov %ax, %ds
        mov %ax, %ss
        mov $0x7000, %sp
        mov $APIC_BASE_MSR, %ecx
        rdmsr
        or $0xC00, %eax                 # EN | EXTD
        wrmsr
        mov $X2_SVR, %ecx
        mov $0x1FF, %eax
        xor %edx, %edx
        wrmsr
        mov $X2_ID, %ecx
        rdmsr
        mov %eax, AP_ID
        movw $(ap_handler - ap_start), VECTOR * 4
        movw $(TRAMPOLINE >> 4), VECTOR * 4 + 2
        movl $1, AP_READY
        sti
1:      hlt
        jmp 1b
ap_handler:
        push %eax
        push %ecx
        push %edx
        lock incl AP_COUNT
        xor %eax, %eax
        xor %edx, %edx
        mov $X2_EOI, %ecx
        wrmsr
        pop %edx
        pop %ecx
        pop %eax
        iret
ap_end:
        .code64

        .data
bsp_count:      .quad 0
