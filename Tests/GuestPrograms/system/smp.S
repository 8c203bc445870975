# Multiboot test kernel for SMP start-up: the bootstrap processor starts every other CPU
# (APIC IDs 1 .. CPUS-1, given with --defsym CPUS=N) with INIT, SIPI, SIPI. Each application
# processor runs the real-mode trampoline copied to 0x8000: it atomically increments the
# counter at 0x7000 and halts. The BSP waits until the counter reaches CPUS - 1 and exits
# through isa-debug-exit (port 0xF4) with 0, or with 1 when it gives up.
        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0x00000003
        .set COUNT, 0x7000
        .set TRAMPOLINE, 0x8000
        .set LAPIC, 0xFEE00000

        .text
        .code32
        .globl _start
multiboot_header:
        .long MB_MAGIC
        .long MB_FLAGS
        .long -(MB_MAGIC + MB_FLAGS)

_start:
        cli
        mov $stack_top, %esp
        mov $trampoline, %esi
        mov $TRAMPOLINE, %edi
        mov $(trampoline_end - trampoline), %ecx
        cld
        rep movsb
        movl $0, COUNT
        movl $0x1FF, LAPIC + 0xF0               # spurious vector register: APIC enabled
        mov $1, %ebx
start_next:
        cmp $CPUS, %ebx
        jae wait_all
        mov %ebx, %eax
        shl $24, %eax
        mov %eax, LAPIC + 0x310                 # ICR high: destination APIC ID
        movl $0x00004500, LAPIC + 0x300         # INIT, assert
        mov %eax, LAPIC + 0x310
        movl $0x00004600 + (TRAMPOLINE >> 12), LAPIC + 0x300    # SIPI
        mov %eax, LAPIC + 0x310
        movl $0x00004600 + (TRAMPOLINE >> 12), LAPIC + 0x300    # second SIPI (ignored when running)
        inc %ebx
        jmp start_next

wait_all:
        mov $400000000, %ecx
1:      cmpl $(CPUS - 1), COUNT
        je all_up
        pause
        dec %ecx
        jnz 1b
        mov $1, %al
        out %al, $0xF4
        hlt
all_up:
        xor %eax, %eax
        out %al, $0xF4
2:      hlt
        jmp 2b

        .code16
trampoline:
        cli
        xorw %ax, %ax
        movw %ax, %ds
        lock incl COUNT
3:      hlt
        jmp 3b
trampoline_end:
        .code32

        .data
        .fill 4096, 1, 0
stack_top:
