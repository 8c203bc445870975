# 32-bit flat protected mode, linked and loaded at 0x8000, ESP set by the test.
# Loads its own GDT and IDT, software-enables the LAPIC and routes the 8259 PIC through its
# LINT0 (ExtINT, as firmware does), remaps the master PIC to vectors 0x20-0x27 and unmasks only IRQ 5, tells the host it
# is ready (port 0x520), then halts with interrupts enabled. The host raises ISA IRQ 5 from
# another thread; the handler reports the vector on port 0x514 and writes debug exit 0.
        .code32
        .globl _start
_start:
        lgdt    gdt_descriptor
        ljmp    $0x08, $reload_segments
reload_segments:
        mov     $0x10, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss

        mov     $irq5_handler, %eax             # interrupt gate for vector 0x25
        mov     %ax, idt + 0x25 * 8
        movw    $0x08, idt + 0x25 * 8 + 2
        movw    $0x8e00, idt + 0x25 * 8 + 4
        shr     $16, %eax
        mov     %ax, idt + 0x25 * 8 + 6
        lidt    idt_descriptor

        movl    $0x000001ff, 0xfee000f0         # LAPIC SVR: software-enable (LVTs stay masked until then)
        movl    $0x00000700, 0xfee00350         # LAPIC LVT LINT0: ExtINT, unmasked

        mov     $0x11, %al                      # ICW1: edge, cascade, ICW4 needed
        outb    %al, $0x20
        mov     $0x20, %al                      # ICW2: vectors 0x20-0x27
        outb    %al, $0x21
        mov     $0x04, %al                      # ICW3: slave on IRQ 2
        outb    %al, $0x21
        mov     $0x01, %al                      # ICW4: 8086 mode
        outb    %al, $0x21
        mov     $0xdf, %al                      # mask all but IRQ 5
        outb    %al, $0x21
        mov     $0xff, %al
        outb    %al, $0xa1

        mov     $0x520, %dx                     # tell the host we are ready
        mov     $1, %al
        outb    %al, %dx
        sti
wait:
        hlt
        jmp     wait

irq5_handler:
        mov     $0x514, %dx
        mov     $0x25, %eax
        outl    %eax, %dx
        mov     $0x20, %al                      # EOI
        outb    %al, $0x20
        mov     $0xf4, %dx
        xor     %eax, %eax
        outb    %al, %dx
        iret

        .balign 8
gdt:
        .quad   0
        .quad   0x00cf9a000000ffff              # 0x08: flat 32-bit code
        .quad   0x00cf92000000ffff              # 0x10: flat data
gdt_end:
gdt_descriptor:
        .word   gdt_end - gdt - 1
        .long   gdt

        .balign 8
idt:
        .fill   0x30 * 8, 1, 0
idt_end:
idt_descriptor:
        .word   idt_end - idt - 1
        .long   idt
