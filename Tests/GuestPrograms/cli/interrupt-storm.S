# A Multiboot v1 kernel that asks for as many interrupts as the platform can raise, from three
# sources at once: the PIT at its fastest rate (divisor 2, about 600 kHz) through the 8259, the
# local APIC timer in periodic mode with a count of 1, and a self-IPI sent from its main loop.
# Each handler counts and acknowledges. It prints "storm running", then "storm P A I" with the
# three counts (32-bit hex) from the PIT's handler after every 2^14 PIT interrupts and from the
# main loop after every 2^14 of its iterations (a guest whose handlers cannot keep up with the
# PIT never gets back to its main loop). The host checks that the VMM stays responsive and
# bounded under the storm.
        .include "multiboot.inc"
        .set LAPIC, 0xFEE00000
        .set PIC_VECTOR, 0x20
        .set TIMER_VECTOR, 0x40
        .set IPI_VECTOR, 0x41
_start:
        cli
        movl $stack_top, %esp
        movl $pit_handler, %eax
        movl $PIC_VECTOR, %ebx
        call set_gate
        movl $timer_handler, %eax
        movl $TIMER_VECTOR, %ebx
        call set_gate
        movl $ipi_handler, %eax
        movl $IPI_VECTOR, %ebx
        call set_gate
        lidt idtr
        # 8259s: master at vector 0x20 with only IRQ 0 unmasked, slave at 0x28, all masked.
        movb $0x11, %al
        outb %al, $0x20
        outb %al, $0xA0
        movb $PIC_VECTOR, %al
        outb %al, $0x21
        movb $PIC_VECTOR + 8, %al
        outb %al, $0xA1
        movb $4, %al
        outb %al, $0x21
        movb $2, %al
        outb %al, $0xA1
        movb $1, %al
        outb %al, $0x21
        outb %al, $0xA1
        movb $0xFE, %al
        outb %al, $0x21
        movb $0xFF, %al
        outb %al, $0xA1
        # PIT channel 0: mode 2 (rate generator), divisor 2.
        movb $0x34, %al
        outb %al, $0x43
        movb $2, %al
        outb %al, $0x40
        movb $0, %al
        outb %al, $0x40
        # Local APIC: enabled, timer periodic with divide-by-1 and an initial count of 1.
        movl $0x1FF, LAPIC + 0xF0
        movl $0x0B, LAPIC + 0x3E0
        movl $0x20000 | TIMER_VECTOR, LAPIC + 0x320
        movl $1, LAPIC + 0x380
        movl $running, %esi
        call print
        sti
loop:   movl $0x4000, %ecx
spin:   movl $0x40000 | IPI_VECTOR, LAPIC + 0x300   # fixed, to self
        decl %ecx
        jnz spin
        call report
        jmp loop

# Prints "storm P A I" (the PIT, APIC timer and IPI counts) with interrupts off.
report: pushfl
        cli
        pushl %eax
        pushl %esi
        movl $storm, %esi
        call print
        movl pit_count, %eax
        call print_hex
        movl $space, %esi
        call print
        movl timer_count, %eax
        call print_hex
        movl $space, %esi
        call print
        movl ipi_count, %eax
        call print_hex
        movl $newline, %esi
        call print
        popl %esi
        popl %eax
        popfl
        ret

# Interrupt gate %ebx -> handler %eax.
set_gate:
        movw %ax, idt(,%ebx,8)
        movw %cs, %dx
        movw %dx, idt + 2(,%ebx,8)
        movw $0x8E00, idt + 4(,%ebx,8)
        shrl $16, %eax
        movw %ax, idt + 6(,%ebx,8)
        ret

pit_handler:
        pushl %eax
        incl pit_count
        testl $0x3FFF, pit_count
        jnz 1f
        call report
1:      movb $0x20, %al
        outb %al, $0x20
        popl %eax
        iret
timer_handler:
        incl timer_count
        movl $0, LAPIC + 0xB0
        iret
ipi_handler:
        incl ipi_count
        movl $0, LAPIC + 0xB0
        iret

# Prints the NUL-terminated string at %esi on COM1 (interrupts may come in between bytes).
print:  pushl %eax
        pushl %edx
        movw $0x3F8, %dx
1:      lodsb
        testb %al, %al
        jz 2f
        outb %al, %dx
        jmp 1b
2:      popl %edx
        popl %eax
        ret

# Prints %eax as 8 hex digits on COM1.
print_hex:
        pushl %ecx
        pushl %edx
        pushl %ebx
        movl %eax, %ebx
        movl $8, %ecx
        movw $0x3F8, %dx
1:      roll $4, %ebx
        movl %ebx, %eax
        andl $0xF, %eax
        movb digits(%eax), %al
        outb %al, %dx
        decl %ecx
        jnz 1b
        popl %ebx
        popl %edx
        popl %ecx
        ret

        .data
running: .asciz "storm running\n"
storm:   .asciz "storm "
space:   .asciz " "
newline: .asciz "\n"
digits:  .ascii "0123456789abcdef"
pit_count:   .long 0
timer_count: .long 0
ipi_count:   .long 0
        .include "interrupt-tables.inc"
