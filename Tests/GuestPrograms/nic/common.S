# The shared half of the emulated-NIC test guests (Tests/CLITests/EmulatedNICGuestTests.swift).
# The test appends a driver (e1000.S or rtl8139.S) to this file and assembles the two as one
# 32-bit Multiboot v1 kernel linked at 1 MiB. It runs in the loader's flat protected mode with
# paging off, so guest-physical addresses (RAM, BARs, the local APIC and IOAPIC) are used as is.
#
# The driver provides:
#   nic_probe    find the function on PCI (pci_find), enable it, read BAR and MAC into my_mac
#   nic_setup    program the receive and transmit rings/buffers and the interrupt mask
#   nic_send     send the frame at txbuf, %ecx bytes, and wait (bounded) for its completion
#   nic_poll     hand every received frame to parse_frame, give its buffer back
#   nic_irq      the interrupt handler's body: acknowledge the device, count receive causes
#   nic_hostile  point rings/buffers outside RAM, with huge lengths, and kick the device
#   nic_reset    reset the device
#   nic_name     the NUL-terminated name printed first
#
# Serial output (COM1), one fact per line, for the test to compare with what it knows:
#   pci <id> slot <n> irq <line>
#   mac <the MAC the device reports>
#   arp reply 10.0.2.1 is-at <sender MAC of the ARP reply>
#   echo reply from 10.0.2.1 ttl <n> checksums ok
#   receive interrupts <n>
#   hostile ... (driver lines)
#   resets <n>, reset loop stopped after <n>  (instead, when assembled with RESET_LOOP)
#   alive: arp reply 10.0.2.1 is-at <MAC>     (after a reset, the device works again)
#   nic guest done
# and exits through isa-debug-exit with 0x31 (status 99); on any failure it prints
# "FAIL: <what>" and exits with 0x01 (status 3).
#
# Nested KVM emulates ring-0 code instruction by instruction, so only plain instructions are
# used (MOV to and from MMIO, IN/OUT, no string instructions), and waits are bounded by the
# CMOS clock's seconds (real time on both accelerators), not by loop counts.

        .set COM1, 0x3F8
        .set DEBUG_EXIT, 0xF4
        .set LAPIC, 0xFEE00000
        .set IOAPIC, 0xFEC00000
        .set VECTOR, 0x50
        .set EXIT_OK, 0x31
        .set EXIT_FAIL, 0x01
        .set ECHO_ID, 0x5648            # "HV" in network order
        .set IP_HOST, 0x0102000A        # 10.0.2.1 as it lies in memory
        .set IP_GUEST, 0x0F02000A       # 10.0.2.15

        .include "multiboot.inc"
_start:
        cli
        movl $stack_top, %esp
        movb $0xFF, %al                 # both 8259s masked: the NIC comes through the IOAPIC
        outb %al, $0x21
        outb %al, $0xA1
        movl $irq_entry, %eax           # interrupt gate for VECTOR
        movw %ax, idt + VECTOR * 8
        movw %cs, %bx
        movw %bx, idt + VECTOR * 8 + 2
        movw $0x8E00, idt + VECTOR * 8 + 4
        shrl $16, %eax
        movw %ax, idt + VECTOR * 8 + 6
        lidt idtr
        movl $0, LAPIC + 0x80           # TPR 0
        movl $0x1FF, LAPIC + 0xF0       # software-enable the local APIC

        call nic_probe
        movl $s_mac, %esi
        call puts
        movl $my_mac, %esi
        call put_mac
        call newline

        call ioapic_route
        call nic_setup
        sti

        call arp_exchange
        movl $s_arp, %esi
        call puts
        movl $peer_mac, %esi
        call put_mac
        call newline

        call echo_exchange
        movl $s_echo, %esi
        call puts
        movzbl echo_ttl, %eax
        call putdec
        movl $s_echo_ok, %esi
        call puts

        movl $s_interrupts, %esi
        call puts
        movl rx_interrupts, %eax
        call putdec
        call newline

.ifdef RESET_LOOP
        call reset_loop
.else
        call nic_hostile
        movl $s_hostile_done, %esi
        call puts
.endif

        call nic_reset
        call nic_setup
        movb $0, got_arp
        movl $0, peer_mac
        movw $0, peer_mac + 4
        call arp_exchange
        movl $s_alive, %esi
        call puts
        movl $peer_mac, %esi
        call put_mac
        call newline

        movl $s_interrupts, %esi
        call puts
        movl rx_interrupts, %eax
        call putdec
        call newline
        movl $s_done, %esi
        call puts
        movl $EXIT_OK, %eax
        jmp exit

# reset_loop (assembled with RESET_LOOP defined): resets the device, sets its rings up again
# and sends an ARP request (whose reply arrives while the next resets run), over and over,
# printing "resets <n>" after every 256, until a byte arrives on COM1; then resets it once more
# and expects it to work: "alive: arp reply ...", as after nic_hostile.
reset_loop:
1:      call nic_reset
        call nic_setup
        call build_arp
        call nic_send
        incl resets
        testl $0xFF, resets
        jnz 2f
        movl $s_resets, %esi
        call puts
        movl resets, %eax
        call putdec
        call newline
2:      movw $COM1 + 5, %dx             # LSR: data ready?
        inb %dx, %al
        testb $1, %al
        jz 1b
        movw $COM1, %dx
        inb %dx, %al
        movl $s_resets_stopped, %esi
        call puts
        movl resets, %eax
        call putdec
        call newline
        ret

# fail: prints "FAIL: " and the string at %esi, then exits with EXIT_FAIL.
fail:
        cli
        pushl %esi
        movl $s_fail, %esi
        call puts
        popl %esi
        call puts
        call newline
        movl $EXIT_FAIL, %eax
exit:
        movw $DEBUG_EXIT, %dx
        outl %eax, %dx
        cli
1:      hlt
        jmp 1b

# The interrupt handler. It returns without IRET, which nested KVM's instruction emulator
# refuses in protected mode ("emulation failure"): the frame (EIP, CS, EFLAGS) becomes
# (EFLAGS, EIP), then POPF and RET. An interrupt taken between the two returns to the RET.
irq_entry:
        pushal
        call nic_irq
        movl $0, LAPIC + 0xB0           # EOI (level-triggered: the IOAPIC's remote IRR too)
        popal
        pushl %eax                      # 0 EAX, 4 EIP, 8 CS, 12 EFLAGS
        pushl %ebx                      # 0 EBX, 4 EAX, 8 EIP, 12 CS, 16 EFLAGS
        movl 8(%esp), %eax
        movl 16(%esp), %ebx
        movl %eax, 16(%esp)             # 16 EIP
        movl %ebx, 12(%esp)             # 12 EFLAGS
        popl %ebx
        popl %eax
        addl $4, %esp
        popfl
        ret

# ---- PCI configuration mechanism #1, the CMOS clock's seconds, serial output ----

        .include "pc-io.inc"

# pci_find: %ebx = device << 16 | vendor. Finds it on bus 0 (or fails), enables I/O and
# memory decoding and bus mastering, and sets pci_base, bar0 (the raw BAR) and irq_line;
# prints "pci <id> slot <n> irq <line>".
pci_find:
        movl $0x80000000, %ecx
1:      call pci_read
        cmpl %ebx, %eax
        je 2f
        addl $0x800, %ecx
        cmpl $0x80010000, %ecx
        jb 1b
        movl $s_no_device, %esi
        jmp fail
2:      movl %ecx, pci_base
        addl $0x04, %ecx                # command: I/O, memory, bus master
        call pci_read
        orl $0x7, %eax
        andl $0xFFFF, %eax
        call pci_write
        movl pci_base, %ecx
        addl $0x10, %ecx
        call pci_read
        movl %eax, bar0
        movl pci_base, %ecx
        addl $0x3C, %ecx
        call pci_read
        movzbl %al, %eax
        movl %eax, irq_line
        movl $s_pci, %esi
        call puts
        movl %ebx, %eax
        call puthex32
        movl $s_slot, %esi
        call puts
        movl pci_base, %eax
        shrl $11, %eax
        andl $31, %eax
        call putdec
        movl $s_irq, %esi
        call puts
        movl irq_line, %eax
        call putdec
        call newline
        ret

# ioapic_route: the IOAPIC input irq_line (the GSI in the Interrupt Line register) to VECTOR,
# fixed delivery, level-triggered, physical destination APIC 0, unmasked.
ioapic_route:
        movl irq_line, %eax
        cmpl $24, %eax
        jb 1f
        movl $s_bad_irq, %esi
        jmp fail
1:      shll $1, %eax
        addl $0x11, %eax
        movl %eax, IOAPIC               # high dword: destination 0
        movl $0, IOAPIC + 0x10
        decl %eax
        movl %eax, IOAPIC               # low dword: vector, level, unmasked
        movl $(VECTOR | 0x8000), IOAPIC + 0x10
        ret

# ---- serial output (putc, newline and puts are in pc-io.inc) ----

# puthex8: %al as two lowercase hex digits.
puthex8:
        pushl %eax
        pushl %eax
        shrb $4, %al
        call hexdigit
        popl %eax
        andb $0xF, %al
        call hexdigit
        popl %eax
        ret

puthex32:
        pushl %eax
        pushl %ecx
        movl %eax, %ecx
        shrl $24, %eax
        call puthex8
        movl %ecx, %eax
        shrl $16, %eax
        call puthex8
        movl %ecx, %eax
        shrl $8, %eax
        call puthex8
        movl %ecx, %eax
        call puthex8
        popl %ecx
        popl %eax
        ret

# put_mac: the six bytes at %esi as xx:xx:xx:xx:xx:xx.
put_mac:
        pushl %eax
        pushl %ecx
        xorl %ecx, %ecx
1:      movb (%esi,%ecx), %al
        call puthex8
        incl %ecx
        cmpl $6, %ecx
        je 2f
        movb $':', %al
        call putc
        jmp 1b
2:      popl %ecx
        popl %eax
        ret

# ---- frames ----

# copy: %ecx bytes from %esi to %edi (byte by byte, no string instructions).
copy:
        pushal
1:      testl %ecx, %ecx
        jz 2f
        movb (%esi), %al
        movb %al, (%edi)
        incl %esi
        incl %edi
        decl %ecx
        jmp 1b
2:      popal
        ret

# checksum: the Internet checksum of %ecx bytes at %esi, in %eax (low 16 bits), to be stored
# as a little-endian word in the field (the one's complement sum does not depend on byte order).
checksum:
        pushl %esi
        pushl %ecx
        pushl %edx
        xorl %eax, %eax
1:      cmpl $2, %ecx
        jb 2f
        movzwl (%esi), %edx
        addl %edx, %eax
        addl $2, %esi
        subl $2, %ecx
        jmp 1b
2:      testl %ecx, %ecx
        jz 3f
        movzbl (%esi), %edx
        addl %edx, %eax
3:      movl %eax, %edx
        shrl $16, %edx
        andl $0xFFFF, %eax
        addl %edx, %eax
        movl %eax, %edx
        shrl $16, %edx
        addl %edx, %eax
        notl %eax
        andl $0xFFFF, %eax
        popl %edx
        popl %ecx
        popl %esi
        ret

# build_arp: "who has 10.0.2.1, tell 10.0.2.15" at txbuf; %ecx = its length (60).
build_arp:
        movl $arp_template, %esi
        movl $txbuf, %edi
        movl $60, %ecx
        call copy
        movl $my_mac, %esi
        movl $txbuf + 6, %edi
        movl $6, %ecx
        call copy
        movl $txbuf + 22, %edi
        call copy
        movl $60, %ecx
        ret

# build_echo: an ICMP echo request to 10.0.2.1 (at peer_mac) at txbuf, sequence echo_seq,
# with both checksums; %ecx = its length.
build_echo:
        movl $echo_template, %esi
        movl $txbuf, %edi
        movl $echo_end - echo_template, %ecx
        call copy
        movl $peer_mac, %esi
        movl $txbuf, %edi
        movl $6, %ecx
        call copy
        movl $my_mac, %esi
        movl $txbuf + 6, %edi
        call copy
        movw echo_seq, %ax
        movw %ax, txbuf + 40
        movl $txbuf + 14, %esi          # IP header checksum
        movl $20, %ecx
        call checksum
        movw %ax, txbuf + 24
        movl $txbuf + 34, %esi          # ICMP checksum
        movl $echo_end - echo_template - 34, %ecx
        call checksum
        movw %ax, txbuf + 36
        movl $echo_end - echo_template, %ecx
        ret

# parse_frame: a received frame at %esi, %ecx bytes (without CRC). An ARP reply from
# 10.0.2.1 to us sets peer_mac and got_arp; an ICMP echo reply from 10.0.2.1 with our
# identifier, sequence, payload and valid checksums sets echo_ttl and got_echo.
parse_frame:
        pushal
        cmpl $42, %ecx
        jb 9f
        movw 12(%esi), %ax
        cmpw $0x0608, %ax               # ARP
        je 1f
        cmpw $0x0008, %ax               # IPv4
        je 2f
        jmp 9f
1:      cmpl $0x00080100, 14(%esi)      # Ethernet, IPv4
        jne 9f
        cmpl $0x02000406, 18(%esi)      # 6, 4, reply
        jne 9f
        cmpl $IP_HOST, 28(%esi)
        jne 9f
        cmpl $IP_GUEST, 38(%esi)
        jne 9f
        movl 32(%esi), %eax             # target MAC: ours
        cmpl my_mac, %eax
        jne 9f
        movw 36(%esi), %ax
        cmpw my_mac + 4, %ax
        jne 9f
        leal 22(%esi), %esi
        movl $peer_mac, %edi
        movl $6, %ecx
        call copy
        movb $1, got_arp
        jmp 9f
2:      cmpl $echo_end - echo_template, %ecx
        jb 9f
        cmpb $0x45, 14(%esi)            # IPv4, no options
        jne 9f
        cmpw $0x3C00, 16(%esi)          # total length 60
        jne 9f
        cmpb $1, 23(%esi)               # ICMP
        jne 9f
        cmpl $IP_HOST, 26(%esi)
        jne 9f
        cmpl $IP_GUEST, 30(%esi)
        jne 9f
        cmpw $0x0000, 34(%esi)          # echo reply, code 0
        jne 9f
        cmpw $ECHO_ID, 38(%esi)
        jne 9f
        movw echo_seq, %ax
        cmpw %ax, 40(%esi)
        jne 9f
        movl %esi, %ebx
        leal 14(%ebx), %esi             # the IP header sums to zero
        movl $20, %ecx
        call checksum
        testl %eax, %eax
        jnz 8f
        leal 34(%ebx), %esi             # so does the ICMP message
        movl $echo_end - echo_template - 34, %ecx
        call checksum
        testl %eax, %eax
        jnz 8f
        xorl %ecx, %ecx                 # the payload came back
3:      movb 42(%ebx,%ecx), %al
        cmpb echo_template + 42(%ecx), %al
        jne 9f
        incl %ecx
        cmpl $echo_end - echo_template - 42, %ecx
        jb 3b
        movb 22(%ebx), %al
        movb %al, echo_ttl
        movb $1, got_echo
        jmp 9f
8:      movl $s_bad_checksum, %esi
        call puts
9:      popal
        ret

# arp_exchange: sends the ARP request (up to 5 times, each followed by a 3-second window of
# polling) until parse_frame has seen the reply; fails without one.
arp_exchange:
        movl $5, tries
1:      call build_arp
        call nic_send
        movl $3, %eax
        call timer_start
2:      call nic_poll
        cmpb $0, got_arp
        jne 3f
        call timer_running
        jnz 2b
        decl tries
        jnz 1b
        movl $s_no_arp, %esi
        jmp fail
3:      ret

# echo_exchange: sends echo requests (sequence 1, 2, ...) until a reply arrives, at most 5.
echo_exchange:
        movl $5, tries
1:      addw $0x0100, echo_seq          # sequence number + 1, in network order
        call build_echo
        call nic_send
        movl $3, %eax
        call timer_start
2:      call nic_poll
        cmpb $0, got_echo
        jne 3f
        call timer_running
        jnz 2b
        decl tries
        jnz 1b
        movl $s_no_echo, %esi
        jmp fail
3:      ret

# wait_seconds: polls the device for %eax changes of the clock's seconds.
wait_seconds:
        call timer_start
1:      call nic_poll
        call timer_running
        jnz 1b
        ret

        .data
s_mac:          .asciz "mac "
s_pci:          .asciz "pci "
s_slot:         .asciz " slot "
s_irq:          .asciz " irq "
s_arp:          .asciz "arp reply 10.0.2.1 is-at "
s_echo:         .asciz "echo reply from 10.0.2.1 ttl "
s_echo_ok:      .asciz " checksums ok\n"
s_interrupts:   .asciz "receive interrupts "
s_hostile_done: .asciz "hostile done\n"
s_resets:       .asciz "resets "
s_resets_stopped: .asciz "reset loop stopped after "
s_alive:        .asciz "alive: arp reply 10.0.2.1 is-at "
s_done:         .asciz "nic guest done\n"
s_fail:         .asciz "FAIL: "
s_no_device:    .asciz "the NIC is not on PCI bus 0"
s_bad_irq:      .asciz "interrupt line is not an IOAPIC input"
s_no_arp:       .asciz "no ARP reply from 10.0.2.1"
s_no_echo:      .asciz "no echo reply from 10.0.2.1"
s_bad_checksum: .asciz "echo reply with a bad checksum\n"

arp_template:
        .byte 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF    # broadcast
        .byte 0, 0, 0, 0, 0, 0                      # source: my_mac
        .byte 0x08, 0x06                            # ARP
        .byte 0x00, 0x01, 0x08, 0x00, 6, 4          # Ethernet, IPv4
        .byte 0x00, 0x01                            # request
        .byte 0, 0, 0, 0, 0, 0                      # sender MAC: my_mac
        .byte 10, 0, 2, 15                          # sender IP
        .byte 0, 0, 0, 0, 0, 0                      # target MAC
        .byte 10, 0, 2, 1                           # target IP
        .fill 18, 1, 0                              # padding to 60 bytes

echo_template:
        .byte 0, 0, 0, 0, 0, 0                      # destination: peer_mac
        .byte 0, 0, 0, 0, 0, 0                      # source: my_mac
        .byte 0x08, 0x00                            # IPv4
        .byte 0x45, 0x00, 0x00, 60                  # version 4, 20-byte header; total 60
        .byte 0x00, 0x01, 0x40, 0x00                # identification 1, don't fragment
        .byte 64, 1, 0, 0                           # TTL 64, ICMP, checksum
        .byte 10, 0, 2, 15                          # source
        .byte 10, 0, 2, 1                           # destination
        .byte 8, 0, 0, 0                            # echo request, code 0, checksum
        .byte 0x48, 0x56, 0, 0                      # identifier "HV", sequence
        .ascii "hostvisor emulated NIC on KVM!!!"       # 32 bytes of payload
echo_end:

        .align 4
echo_seq:       .word 0
got_arp:        .byte 0
got_echo:       .byte 0
echo_ttl:       .byte 0
        .align 4
my_mac:         .fill 8, 1, 0
peer_mac:       .fill 8, 1, 0
pci_base:       .long 0
bar0:           .long 0
irq_line:       .long 0
rx_interrupts:  .long 0
tries:          .long 0
resets:         .long 0
timer_left:     .long 0
timer_last:     .byte 0
        .include "interrupt-tables.inc"
        .align 16
txbuf:  .fill 2048, 1, 0
