# The e1000 (Intel 82540EM) driver of the emulated-NIC test guest: appended to common.S.
# Register offsets and descriptor layouts from Intel's 8254x Software Developer's Manual.
# Legacy descriptors, 8 of 16 bytes per ring, 2 KiB receive buffers.

        .set CTRL, 0x0000
        .set STATUS, 0x0008
        .set EERD, 0x0014
        .set ICR, 0x00C0
        .set IMS, 0x00D0
        .set IMC, 0x00D8
        .set RCTL, 0x0100
        .set TCTL, 0x0400
        .set RDBAL, 0x2800
        .set RDBAH, 0x2804
        .set RDLEN, 0x2808
        .set RDH, 0x2810
        .set RDT, 0x2818
        .set TDBAL, 0x3800
        .set TDBAH, 0x3804
        .set TDLEN, 0x3808
        .set TDH, 0x3810
        .set TDT, 0x3818
        .set RING, 8
        .set ICR_RXT0, 0x80

        .text
nic_probe:
        movl $0x100E8086, %ebx
        call pci_find
        andl $0xFFFFFFF0, bar0          # BAR 0: the register file (memory)
        movl bar0, %edx
        xorl %edi, %edi                 # the MAC: EEPROM words 0-2 through EERD
1:      movl %edi, %eax
        shll $8, %eax
        orl $1, %eax                    # START
        movl %eax, EERD(%edx)
        movl $1000, %ecx
2:      movl EERD(%edx), %eax
        testl $0x10, %eax               # DONE
        jnz 3f
        decl %ecx
        jnz 2b
        movl $s_eerd, %esi
        jmp fail
3:      shrl $16, %eax
        movw %ax, my_mac(,%edi,2)
        incl %edi
        cmpl $3, %edi
        jb 1b
        ret

nic_setup:
        movl bar0, %edx
        movl CTRL(%edx), %eax           # set link up
        orl $0x40, %eax
        movl %eax, CTRL(%edx)
        xorl %ecx, %ecx                 # receive descriptors: buffer i at rx_buffers + 2 KiB * i
1:      movl %ecx, %eax
        shll $11, %eax
        addl $rx_buffers, %eax
        movl %ecx, %ebx
        shll $4, %ebx
        movl %eax, rx_ring(%ebx)
        movl $0, rx_ring + 4(%ebx)
        movl $0, rx_ring + 8(%ebx)
        movl $0, rx_ring + 12(%ebx)
        movl $0, tx_ring(%ebx)
        movl $0, tx_ring + 4(%ebx)
        movl $0, tx_ring + 8(%ebx)
        movl $0, tx_ring + 12(%ebx)
        incl %ecx
        cmpl $RING, %ecx
        jb 1b
        movl $rx_ring, RDBAL(%edx)
        movl $0, RDBAH(%edx)
        movl $RING * 16, RDLEN(%edx)
        movl $0, RDH(%edx)
        movl $RING - 1, RDT(%edx)       # all but one descriptor to the device
        movl $0, rx_next
        movl $tx_ring, TDBAL(%edx)
        movl $0, TDBAH(%edx)
        movl $RING * 16, TDLEN(%edx)
        movl $0, TDH(%edx)
        movl $0, TDT(%edx)
        movl $0, tx_next
        movl $0x0000000A, TCTL(%edx)    # EN, PSP
        movl $0x04008002, RCTL(%edx)    # EN, BAM, SECRC; 2 KiB buffers
        movl ICR(%edx), %eax            # clear what is pending
        movl $ICR_RXT0, IMS(%edx)       # interrupt on received frames
        ret

# tx_descriptor: the next transmit descriptor's address in %ebx.
tx_descriptor:
        movl tx_next, %ebx
        shll $4, %ebx
        addl $tx_ring, %ebx
        ret

# tx_kick: hands the descriptor at %ebx to the device (TDT past it) and waits up to 3 s for
# its DD; ZF clear when it completed.
tx_kick:
        movl tx_next, %eax
        incl %eax
        andl $RING - 1, %eax
        movl %eax, tx_next
        movl bar0, %edx
        movl %eax, TDT(%edx)
        movl $3, %eax
        call timer_start
1:      testb $1, 12(%ebx)              # DD
        jnz 2f
        call timer_running
        jnz 1b
2:      ret

nic_send:
        call tx_descriptor
        movl $txbuf, (%ebx)
        movl $0, 4(%ebx)
        movw %cx, 8(%ebx)               # length
        movb $0, 10(%ebx)               # CSO
        movb $0x0B, 11(%ebx)            # EOP, IFCS, RS
        movl $0, 12(%ebx)               # status, CSS, special
        call tx_kick
        jnz 1f
        movl $s_tx_timeout, %esi
        jmp fail
1:      ret

nic_poll:
        pushal
1:      movl rx_next, %ebx
        shll $4, %ebx
        addl $rx_ring, %ebx
        testb $1, 12(%ebx)              # DD
        jz 2f
        movzwl 8(%ebx), %ecx
        movl rx_next, %esi
        shll $11, %esi
        addl $rx_buffers, %esi
        testb $2, 12(%ebx)              # EOP: one buffer per frame here
        jz 3f
        call parse_frame
3:      movb $0, 12(%ebx)
        movl rx_next, %eax
        movl bar0, %edx
        movl %eax, RDT(%edx)            # the descriptor goes back to the device
        incl %eax
        andl $RING - 1, %eax
        movl %eax, rx_next
        jmp 1b
2:      popal
        ret

nic_irq:
        movl bar0, %edx
        movl ICR(%edx), %eax            # read-to-clear: the line goes down
        testl $ICR_RXT0, %eax
        jz 1f
        incl rx_interrupts
1:      ret

nic_reset:
        movl bar0, %edx
        movl $0x04000000, CTRL(%edx)    # CTRL.RST
        movl $2, %eax
        call timer_start
1:      movl CTRL(%edx), %eax
        testl $0x04000000, %eax
        jz 2f
        call timer_running
        jnz 1b
2:      ret

nic_hostile:
        # A transmit buffer far above RAM (1 TiB): the packet is dropped, the descriptor
        # still completes.
        call tx_descriptor
        movl $0, (%ebx)
        movl $0x100, 4(%ebx)
        movl $0x0B000000 | 1514, 8(%ebx) # length, CSO 0, CMD EOP IFCS RS
        movl $0, 12(%ebx)
        call tx_kick
        jnz 1f
        movl $s_tx_outside, %esi
        jmp fail
1:      movl $s_hostile_tx_buffer, %esi
        call puts
        # The receive ring above RAM with the largest length and a tail inside it; then an
        # ARP request, whose reply has nowhere to go.
        movl bar0, %edx
        movl $0, RDBAL(%edx)
        movl $0x1000, RDBAH(%edx)       # 16 TiB
        movl $0xFFF80, RDLEN(%edx)
        movl $0, RDH(%edx)
        movl $0x7FFF, RDT(%edx)
        call build_arp
        call nic_send
        movl $2, %eax
        call wait_seconds
        movl bar0, %edx
        # The ring as seen from below: starting under 4 GiB, running past RAM's end.
        movl $0xFFFFF000, RDBAL(%edx)
        movl $0, RDBAH(%edx)
        movl $0xFFF80, RDLEN(%edx)
        movl $0x10, RDT(%edx)
        call build_arp
        call nic_send
        movl $2, %eax
        call wait_seconds
        movl bar0, %edx
        # The transmit ring outside RAM, huge, with the tail far ahead of the head.
        movl $0xFFFFF000, TDBAL(%edx)
        movl $0xFFFFFFFF, TDBAH(%edx)
        movl $0xFFF80, TDLEN(%edx)
        movl $0, TDH(%edx)
        movl $0xFFFF, TDT(%edx)
        movl $0xFFFF, RDT(%edx)
        movl $1, %eax
        call wait_seconds
        movl bar0, %edx
        # The device still answers.
        movl STATUS(%edx), %eax
        movl $s_hostile_status, %esi
        call puts
        call puthex32
        call newline
        ret

        .data
s_eerd:                 .asciz "EERD never reported DONE"
s_tx_timeout:           .asciz "transmit descriptor not done within 3 s"
s_tx_outside:           .asciz "transmit descriptor with a buffer outside RAM never completed"
s_hostile_tx_buffer:    .asciz "hostile: transmit buffer outside RAM completed\n"
s_hostile_status:       .asciz "hostile: rings outside RAM kicked, status "

        .bss
        .align 4096
rx_ring:        .skip RING * 16
        .align 4096
tx_ring:        .skip RING * 16
        .align 4096
rx_buffers:     .skip RING * 2048
rx_next:        .long 0
tx_next:        .long 0
