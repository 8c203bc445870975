# The RTL8139 (Realtek RTL8139C) driver of the emulated-NIC test guest: appended to common.S.
# Registers from Realtek's RTL8139C(L) datasheet, reached through BAR 0 (I/O ports): the
# 8 KiB receive ring (RCR.WRAP, so a frame never wraps) and the four transmit descriptors.

        .set IDR0, 0x00
        .set TSD0, 0x10
        .set TSAD0, 0x20
        .set RBSTART, 0x30
        .set CR, 0x37
        .set CAPR, 0x38
        .set IMR, 0x3C
        .set ISR, 0x3E
        .set RCR, 0x44
        .set CR_RST, 0x10
        .set CR_RE_TE, 0x0C
        .set CR_BUFE, 0x01
        .set ISR_ROK, 0x0001
        .set TSD_OWN, 0x2000
        .set TSD_TOK, 0x8000
        .set TSD_TABT, 0x40000000
        .set RX_RING, 8192

        .text
nic_probe:
        movl $0x813910EC, %ebx
        call pci_find
        andl $0xFFFFFFFC, bar0          # BAR 0: I/O ports
        xorl %ecx, %ecx                 # the MAC: IDR0-5
1:      movl bar0, %edx
        addl %ecx, %edx
        inb %dx, %al
        movb %al, my_mac(%ecx)
        incl %ecx
        cmpl $6, %ecx
        jb 1b
        ret

# out8/out16/out32: writes %al/%ax/%eax to register %ebx of the device.
out8:
        pushl %edx
        movl bar0, %edx
        addl %ebx, %edx
        outb %al, %dx
        popl %edx
        ret
out16:
        pushl %edx
        movl bar0, %edx
        addl %ebx, %edx
        outw %ax, %dx
        popl %edx
        ret
out32:
        pushl %edx
        movl bar0, %edx
        addl %ebx, %edx
        outl %eax, %dx
        popl %edx
        ret
# in8/in16/in32: reads register %ebx into %al/%ax/%eax.
in8:
        pushl %edx
        movl bar0, %edx
        addl %ebx, %edx
        inb %dx, %al
        popl %edx
        ret
in16:
        pushl %edx
        movl bar0, %edx
        addl %ebx, %edx
        inw %dx, %ax
        popl %edx
        ret
in32:
        pushl %edx
        movl bar0, %edx
        addl %ebx, %edx
        inl %dx, %eax
        popl %edx
        ret

nic_reset:
        movl $CR, %ebx
        movb $CR_RST, %al
        call out8
        movl $2, %eax
        call timer_start
1:      call in8                        # RST clears itself when the reset is done
        testb $CR_RST, %al
        jz 2f
        call timer_running
        jnz 1b
        movl $s_reset, %esi
        jmp fail
2:      ret

nic_setup:
        call nic_reset
        movl $RBSTART, %ebx
        movl $rx_ring, %eax
        call out32
        movl $CR, %ebx
        movb $CR_RE_TE, %al
        call out8
        movl $RCR, %ebx
        movl $0x0000008A, %eax          # WRAP, AB, APM; 8 KiB + 16 ring
        call out32
        movl $CAPR, %ebx
        movw $0xFFF0, %ax               # read offset 0
        call out16
        movl $0, rx_offset
        movl $0, tx_next
        movl $ISR, %ebx
        movw $0xFFFF, %ax
        call out16
        movl $IMR, %ebx
        movw $ISR_ROK, %ax              # interrupt on received frames
        call out16
        ret

# tx_start: descriptor tx_next sends %ecx bytes at %eax (OWN clear starts it); waits up to
# 3 s for TOK or TABT and returns the status in %eax, moving tx_next on.
tx_start:
        movl tx_next, %ebx
        shll $2, %ebx
        addl $TSAD0, %ebx
        call out32
        movl tx_next, %ebx
        shll $2, %ebx
        addl $TSD0, %ebx
        movl %ecx, %eax                 # size, OWN clear, early threshold 0
        call out32
        movl tx_next, %eax
        incl %eax
        andl $3, %eax
        movl %eax, tx_next
        movl $3, %eax
        call timer_start
1:      call in32
        testl $(TSD_TOK | TSD_TABT), %eax
        jnz 2f
        call timer_running
        jnz 1b
2:      ret

nic_send:
        movl $txbuf, %eax
        call tx_start
        testl $TSD_TOK, %eax
        jnz 1f
        movl $s_tx_failed, %esi
        jmp fail
1:      ret

nic_poll:
        pushal
1:      movl $CR, %ebx
        call in8
        testb $CR_BUFE, %al
        jnz 2f
        movl rx_offset, %esi            # header: status, length (with the CRC)
        addl $rx_ring, %esi
        movzwl 2(%esi), %ecx
        testw $1, (%esi)                # ROK
        jz 3f
        cmpl $64, %ecx
        jb 3f
        cmpl $1792, %ecx
        ja 3f
        pushl %ecx
        subl $4, %ecx
        addl $4, %esi
        call parse_frame
        popl %ecx
        movl rx_offset, %eax            # next frame: dword-aligned after header and frame
        leal 4 + 3(%eax,%ecx), %eax
        andl $~3, %eax
        andl $RX_RING - 1, %eax
        movl %eax, rx_offset
        subl $16, %eax
        movl $CAPR, %ebx
        call out16
        jmp 1b
2:      cmpb $0, imr_masked             # the ring is empty: interrupts back on
        je 4f
        movb $0, imr_masked
        movl $ISR, %ebx
        movw $ISR_ROK, %ax
        call out16
        movl $IMR, %ebx
        movw $ISR_ROK, %ax
        call out16
4:      popal
        ret
3:      movl $s_bad_header, %esi
        jmp fail

# The handler acknowledges every cause (write 1 to clear) and, since ROK stays set while the
# ring holds frames, masks the device until nic_poll has emptied the ring.
nic_irq:
        movl $ISR, %ebx
        call in16
        call out16
        testw $ISR_ROK, %ax
        jz 1f
        incl rx_interrupts
1:      movl $IMR, %ebx
        xorl %eax, %eax
        call out16
        movb $1, imr_masked
        ret

nic_hostile:
        # A transmit buffer outside RAM, then byte counts of zero and past the largest frame:
        # each descriptor is aborted.
        movl $0xFFFFF000, %eax
        movl $1000, %ecx
        call tx_start
        testl $TSD_TABT, %eax
        jz 8f
        movl $txbuf, %eax
        movl $0, %ecx
        call tx_start
        testl $TSD_TABT, %eax
        jz 8f
        movl $txbuf, %eax
        movl $0x1FFF, %ecx
        call tx_start
        testl $TSD_TABT, %eax
        jz 8f
        movl $s_hostile_tx, %esi
        call puts
        # The receive ring outside RAM, the largest ring size, wrap mode and a read offset
        # inside it; then an ARP request, whose reply has nowhere to go.
        movl $RBSTART, %ebx
        movl $0xFFFFF000, %eax
        call out32
        movl $RCR, %ebx
        movl $0x0000188A, %eax          # 64 KiB ring
        call out32
        movl $CAPR, %ebx
        movw $0x7FF0, %ax
        call out16
        call build_arp
        call nic_send
        movl $2, %eax
        call timer_start
1:      call timer_running
        jnz 1b
        movl $ISR, %ebx                 # the device reported a system error
        call in16
        movw %ax, hostile_isr
        movl $s_hostile_rx, %esi
        call puts
        movzwl hostile_isr, %eax
        call puthex32
        call newline
        ret
8:      movl $s_no_abort, %esi
        jmp fail

        .data
s_reset:        .asciz "CR.RST did not clear"
s_tx_failed:    .asciz "transmit descriptor without TOK within 3 s"
s_bad_header:   .asciz "receive ring header without ROK or with a bad length"
s_no_abort:     .asciz "a transmit descriptor outside RAM or with a bad size was not aborted"
s_hostile_tx:   .asciz "hostile: transmit descriptors outside RAM and of bad sizes aborted\n"
s_hostile_rx:   .asciz "hostile: receive ring outside RAM, ISR "
        .align 4
rx_offset:      .long 0
tx_next:        .long 0
hostile_isr:    .word 0
imr_masked:     .byte 0

        .bss
        .align 4096
rx_ring:        .skip RX_RING + 16 + 2048
