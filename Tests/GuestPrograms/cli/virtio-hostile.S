# A Multiboot v1 kernel that attacks every virtio-pci device on PCI bus 0 with rings and buffers
# pointing everywhere: outside RAM, at MMIO (the IOAPIC, the local APIC, the device's own BAR),
# across the end of the RAM below the PCI hole and of the RAM above 4 GiB, into the hole, at
# addresses that wrap when a base is added, with lengths that wrap, descriptor loops, indirect
# tables outside RAM or looping, an available index far ahead and a head index outside the
# table; each scenario notifies 16 times. The host runs it with 3328 MiB of RAM (0-3 GiB and
# 4 GiB-4.25 GiB) and checks that the VMM stays bounded and alive (HostileGuestResourceTests).
#
# For each device and scenario the guest resets the device, negotiates VERSION_1 and
# INDIRECT_DESC, sets up the device's queue (its driver-to-device queue: transmit for
# virtio-net and virtio-console, the request queue of virtio-blk and virtio-rng, inflate for
# the balloon) and expects DEVICE_NEEDS_RESET (status bit 0x40) within 3 s, its used index
# still 0, and the last 256 bytes of low RAM (a canary right below the hole, next to buffers
# that cross into it) unchanged. After the scenarios, a good request must work again: 16
# random bytes from virtio-rng, sector 0 of virtio-blk (which must start with "HVDISK00");
# then the device is reset, so that no device uses the rings (shared by all) meanwhile.
# virtio-blk's hostile buffers are read requests (the device would write them) and write
# requests to sector 1 (the device would read them into the disk), so host memory reached
# through a mistranslated address would show in the disk's sector 1, which the host checks.
#
# Serial output (COM1):
#   virtio <device id> slot <n>               for each device found, once
#   round <n> scenarios <s> refused <r> good <g>  after each pass over every device
#   FAIL: <what> <device id> <scenario>       on any unexpected result (the guest goes on)
# The guest never stops: the host ends it.
        .include "multiboot.inc"

        .set COM1, 0x3F8
        .set CANARY, 0xBFFFFF00          # the last 256 bytes below the PCI hole
        .set NOTIFY, 0x3000
        .set STATUS_RESET, 0x40
        .set QSIZE, 8
        .set K_DESC, 1                   # descriptor table at the address
        .set K_AVAIL, 2                  # available ring at the address
        .set K_USED, 3                   # used ring at the address
        .set K_BUFFER, 4                 # one buffer at the address, with the length
        .set K_LOOP, 5                   # descriptors 0 and 1 chained to each other
        .set K_INDIRECT, 6               # an indirect table at the address, with the length
        .set K_INDIRECT_LOOP, 7          # an indirect table in RAM whose two entries loop
        .set K_AVAIL_AHEAD, 8            # available index 0x8000 ahead
        .set K_BAD_HEAD, 9               # head index 0xFFFF
        .set K_BUFFER_OUT, 10            # as K_BUFFER; virtio-blk: a write request

_start:
        cli
        movl $stack_top, %esp
        movl $CANARY, %edi               # the canary, once
        movl $0x5A5A5A5A, %eax
1:      movl %eax, (%edi)
        addl $4, %edi
        cmpl $CANARY + 256, %edi
        jne 1b
        call find_devices
        cmpl $0, device_count
        jne 2f
        movl $s_no_devices, %esi
        call puts
        call newline
3:      hlt
        jmp 3b
2:      incl round
        movl $0, scenarios
        movl $0, refused
        movl $0, good
        movl $0, device_index
4:      movl device_index, %ecx
        movl devices_bar(,%ecx,4), %eax
        movl %eax, bar
        movl devices_id(,%ecx,4), %eax
        movl %eax, device_id
        call attack_device
        incl device_index
        movl device_index, %ecx
        cmpl device_count, %ecx
        jb 4b
        movl $s_round, %esi
        call puts
        movl round, %eax
        call putdec
        movl $s_scenarios, %esi
        call puts
        movl scenarios, %eax
        call putdec
        movl $s_refused, %esi
        call puts
        movl refused, %eax
        call putdec
        movl $s_good, %esi
        call puts
        movl good, %eax
        call putdec
        call newline
        jmp 2b

# find_devices: every 0x1AF4 device of ID 0x1041-0x1045 on bus 0, with I/O, memory and bus
# mastering on, into devices_bar / devices_id; prints "virtio <id> slot <n>".
find_devices:
        movl $0x80000000, %ecx
1:      call pci_read
        cmpw $0x1AF4, %ax
        jne 2f
        shrl $16, %eax
        cmpl $0x1041, %eax
        jb 2f
        cmpl $0x1045, %eax
        ja 2f
        movl device_count, %ebx
        cmpl $8, %ebx
        jae 2f
        movl %eax, devices_id(,%ebx,4)
        pushl %ecx
        addl $0x10, %ecx
        call pci_read
        andl $0xFFFFFFF0, %eax
        movl %eax, devices_bar(,%ebx,4)
        movl (%esp), %ecx
        addl $0x04, %ecx
        call pci_read
        orl $0x7, %eax
        andl $0xFFFF, %eax
        call pci_write
        popl %ecx
        incl device_count
        movl $s_virtio, %esi
        call puts
        movl devices_id(,%ebx,4), %eax
        call puthex16
        movl $s_slot, %esi
        call puts
        movl %ecx, %eax
        shrl $11, %eax
        andl $31, %eax
        call putdec
        call newline
2:      addl $0x800, %ecx
        cmpl $0x80010000, %ecx
        jb 1b
        ret

# attack_device: every scenario on the device at `bar` (`device_id`), then a good request.
attack_device:
        movl device_id, %eax             # the queue the device serves on a notification
        movl $0, queue
        cmpl $0x1041, %eax               # virtio-net: transmitq
        je 1f
        cmpl $0x1043, %eax               # virtio-console: port 0's transmitq
        jne 2f
1:      movl $1, queue
2:      movl $scenario_table, %ebx
3:      cmpl $0, (%ebx)
        je 4f
        movl %ebx, scenario
        call run_scenario
        addl $16, %ebx
        jmp 3b
4:      call good_request
        call reset_device                # no device keeps using the shared rings
        ret

# reset_device: status 0, then waits until the device reads back 0 (reset done).
reset_device:
        pushl %eax
        pushl %ecx
        pushl %edx
        movl bar, %edx
        movb $0, 0x14(%edx)
        movl $1000, %ecx
1:      movb 0x14(%edx), %al
        testb %al, %al
        jz 2f
        decl %ecx
        jnz 1b
2:      popl %edx
        popl %ecx
        popl %eax
        ret

# run_scenario: the scenario at `scenario` (kind, address low, address high, length).
run_scenario:
        pushal
        incl scenarios
        call clear_queue_memory
        movl $desc, ring_desc
        movl $avail, ring_avail
        movl $used, ring_used
        movl scenario, %ebx
        movl (%ebx), %eax
        cmpl $K_DESC, %eax
        jne 1f
        movl $-1, ring_desc              # taken from the scenario
1:      cmpl $K_AVAIL, %eax
        jne 1f
        movl $-1, ring_avail
1:      cmpl $K_USED, %eax
        jne 1f
        movl $-1, ring_used
1:      call build_chain
        call start_device
        call notify_many
        call wait_needs_reset
        jz 8f
        incl refused
        jmp 7f
8:      movl $s_no_reset, %esi
        call report_failure
7:      movl scenario, %ebx
        cmpl $K_USED, (%ebx)
        je 6f
        cmpw $0, used + 2
        je 6f
        movl $s_used, %esi
        call report_failure
6:      call check_canary
        popal
        ret

# report_failure: "FAIL: <string at esi> <device id> <scenario index>".
report_failure:
        pushl %esi
        movl $s_fail, %esi
        call puts
        popl %esi
        call puts
        movb $' ', %al
        call putc
        movl device_id, %eax
        call puthex16
        movb $' ', %al
        call putc
        movl scenario, %eax
        subl $scenario_table, %eax
        shrl $4, %eax
        call putdec
        call newline
        ret

# check_canary: the 256 bytes below the hole still hold 0x5A.
check_canary:
        movl $CANARY, %edi
1:      cmpl $0x5A5A5A5A, (%edi)
        jne 2f
        addl $4, %edi
        cmpl $CANARY + 256, %edi
        jne 1b
        ret
2:      movl $s_canary, %esi
        call report_failure
        movl $CANARY, %edi               # put it back for the next scenario
        movl $0x5A5A5A5A, %eax
3:      movl %eax, (%edi)
        addl $4, %edi
        cmpl $CANARY + 256, %edi
        jne 3b
        ret

# clear_queue_memory: descriptor table, rings, indirect table and block header zeroed.
clear_queue_memory:
        movl $desc, %edi
1:      movl $0, (%edi)
        addl $4, %edi
        cmpl $queue_memory_end, %edi
        jb 1b
        ret

# set_desc: descriptor %ecx of the table at %edi = (address %eax:%edx, length %esi,
# flags:next %ebp).
set_desc:
        pushl %ecx
        shll $4, %ecx
        movl %eax, (%edi,%ecx)
        movl %edx, 4(%edi,%ecx)
        movl %esi, 8(%edi,%ecx)
        movl %ebp, 12(%edi,%ecx)
        popl %ecx
        ret

# build_chain: the descriptors and the available ring for the scenario (in RAM: the rings
# the scenario moves elsewhere are still written here, harmlessly).
build_chain:
        pushal
        movl scenario, %ebx
        movl (%ebx), %eax
        movw $1, avail                   # VIRTQ_AVAIL_F_NO_INTERRUPT
        movw $0, avail + 4               # ring[0] = head 0
        movw $1, avail + 2               # idx 1
        movl $desc, %edi
        cmpl $K_LOOP, %eax
        je 20f
        cmpl $K_INDIRECT, %eax
        je 30f
        cmpl $K_INDIRECT_LOOP, %eax
        je 40f
        cmpl $K_AVAIL_AHEAD, %eax
        je 50f
        cmpl $K_BAD_HEAD, %eax
        je 60f
        cmpl $K_BUFFER, %eax
        je 10f
        cmpl $K_BUFFER_OUT, %eax
        je 10f
        # Ring placement scenarios: one good buffer (the device never gets to it).
        movl $data, %eax
        xorl %edx, %edx
        movl $16, %esi
        call buffer_flags
        call add_buffer
        jmp 90f
10:     movl 4(%ebx), %eax               # the hostile buffer
        movl 8(%ebx), %edx
        movl 12(%ebx), %esi
        call buffer_flags
        call add_buffer
        jmp 90f
20:     xorl %eax, %eax                  # 0 -> 1 -> 0 ...
        movl $data, %eax
        xorl %edx, %edx
        movl $16, %esi
        movl $0x00010001, %ebp           # NEXT, next 1
        xorl %ecx, %ecx
        call set_desc
        movl $0x00000001, %ebp           # NEXT, next 0
        incl %ecx
        call set_desc
        jmp 90f
30:     movl 4(%ebx), %eax               # INDIRECT to the hostile table
        movl 8(%ebx), %edx
        movl 12(%ebx), %esi
        movl $0x4, %ebp
        xorl %ecx, %ecx
        call set_desc
        jmp 90f
40:     movl $indirect, %eax             # INDIRECT to a table in RAM that loops
        xorl %edx, %edx
        movl $32, %esi
        movl $0x4, %ebp
        xorl %ecx, %ecx
        call set_desc
        movl $indirect, %edi
        movl $data, %eax
        movl $16, %esi
        movl $0x00010001, %ebp
        call set_desc
        incl %ecx
        movl $0x00000001, %ebp
        call set_desc
        jmp 90f
50:     movw $0x8000, avail + 2
        jmp 90f
60:     movw $0xFFFF, avail + 4
90:     popal
        ret

# buffer_flags: %ebp = the descriptor flags of the device's natural buffer direction
# (writable for virtio-rng, readable for the others; virtio-blk's data is set by add_buffer).
buffer_flags:
        xorl %ebp, %ebp
        cmpl $0x1044, device_id
        jne 1f
        movl $2, %ebp                    # WRITE
1:      ret

# add_buffer: the chain at descriptor 0 of `desc` with the buffer (%eax:%edx, %esi bytes,
# flags %ebp): the buffer alone, or for virtio-blk header, buffer and status byte, the
# header a read of sector 0 (the buffer writable) or, for K_BUFFER_OUT, a write of sector 1.
add_buffer:
        pushal
        movl $desc, %edi
        cmpl $0x1042, device_id
        je 1f
        xorl %ecx, %ecx
        call set_desc
        popal
        ret
1:      movl scenario, %ebx
        movl $0, blk_header              # type IN
        movl $0, blk_header + 8          # sector 0
        movl $0x00000002, %ebp           # the data buffer: WRITE
        cmpl $K_BUFFER_OUT, (%ebx)
        jne 2f
        movl $1, blk_header              # type OUT
        movl $1, blk_header + 8          # sector 1
        xorl %ebp, %ebp                  # the data buffer: readable
2:      orl $0x00020001, %ebp            # NEXT, next 2
        movl $1, %ecx
        call set_desc
        pushl %eax
        pushl %edx
        pushl %esi
        movl $blk_header, %eax
        xorl %edx, %edx
        movl $16, %esi
        movl $0x00010001, %ebp           # NEXT, next 1
        xorl %ecx, %ecx
        call set_desc
        movl $blk_status, %eax
        movl $1, %esi
        movl $0x2, %ebp                  # WRITE
        movl $2, %ecx
        call set_desc
        popl %esi
        popl %edx
        popl %eax
        popal
        ret

# start_device: reset, ACKNOWLEDGE | DRIVER, VERSION_1 and INDIRECT_DESC, FEATURES_OK, the
# queue `queue` of QSIZE entries at ring_desc / ring_avail / ring_used (-1: the scenario's
# address), enabled, DRIVER_OK.
start_device:
        pushal
        call reset_device
        movl bar, %edx
        movb $1, 0x14(%edx)
        movb $3, 0x14(%edx)
        movl $0, 0x08(%edx)              # driver features word 0: INDIRECT_DESC (bit 28)
        movl $0x10000000, 0x0C(%edx)
        movl $1, 0x08(%edx)              # word 1: VERSION_1 (bit 32)
        movl $1, 0x0C(%edx)
        movb $0xB, 0x14(%edx)            # FEATURES_OK
        movb 0x14(%edx), %al
        testb $0x8, %al
        jnz 3f
        movl $s_features, %esi
        call report_failure
3:      movl queue, %eax
        movw %ax, 0x16(%edx)             # queue_select
        movw $QSIZE, 0x18(%edx)          # queue_size
        movl ring_desc, %eax
        movl $0x20, %ecx
        call set_ring_address
        movl ring_avail, %eax
        movl $0x28, %ecx
        call set_ring_address
        movl ring_used, %eax
        movl $0x30, %ecx
        call set_ring_address
        movw $1, 0x1C(%edx)              # queue_enable
        movb $0xF, 0x14(%edx)            # DRIVER_OK
        popal
        ret

# set_ring_address: the 64-bit ring address register at BAR + %ecx = %eax, or, when %eax is
# -1, the scenario's address.
set_ring_address:
        pushl %ebx
        cmpl $-1, %eax
        jne 1f
        movl scenario, %ebx
        movl 4(%ebx), %eax
        movl %eax, (%edx,%ecx)
        movl 8(%ebx), %eax
        movl %eax, 4(%edx,%ecx)
        popl %ebx
        ret
1:      movl %eax, (%edx,%ecx)
        movl $0, 4(%edx,%ecx)
        popl %ebx
        ret

# notify_many: 16 notifications of `queue`.
notify_many:
        pushal
        movl queue, %eax
        movl bar, %edx
        leal NOTIFY(%edx,%eax,4), %edx
        movl $16, %ecx
1:      movw %ax, (%edx)
        decl %ecx
        jnz 1b
        popal
        ret

# wait_needs_reset: ZF clear once the device reports DEVICE_NEEDS_RESET, set if it did not
# within 3 s.
wait_needs_reset:
        pushal
        movl $3, %eax
        call timer_start
        movl bar, %edx
1:      movb 0x14(%edx), %al
        testb $STATUS_RESET, %al
        jnz 2f
        call timer_running
        jnz 1b
        xorl %eax, %eax                  # ZF set: no
        popal
        ret
2:      popal
        ret

# good_request: after the scenarios, a well-formed request on virtio-rng or virtio-blk must be
# served; the other devices must accept their queue and run (no DEVICE_NEEDS_RESET).
good_request:
        pushal
        call clear_queue_memory
        movl $desc, ring_desc
        movl $avail, ring_avail
        movl $used, ring_used
        movl $good_rng, scenario
        cmpl $0x1042, device_id
        jne 1f
        movl $good_blk, scenario
1:
        movl $0xFFFFFFFF, data
        movl $0xFFFFFFFF, data + 4
        movl $0xFF, blk_status
        call build_chain
        call start_device
        movl device_id, %eax
        cmpl $0x1044, %eax
        je 1f
        cmpl $0x1042, %eax
        je 1f
        movl bar, %edx                   # the others: running, not broken
        movb 0x14(%edx), %al
        cmpb $0xF, %al
        jne 8f
        incl good
        jmp 9f
1:      call notify_many
        movl $3, %eax
        call timer_start
2:      cmpw $1, used + 2
        je 3f
        call timer_running
        jnz 2b
        jmp 8f
3:      cmpl $0x1044, device_id
        jne 4f
        cmpl $16, used + 8               # virtio-rng: 16 bytes written
        jne 8f
        incl good
        jmp 9f
4:      cmpb $0, blk_status              # virtio-blk: status OK, sector 0's signature
        jne 8f
        cmpl $0x49445648, data           # "HVDI"
        jne 8f
        cmpl $0x30304B53, data + 4       # "SK00"
        jne 8f
        incl good
        jmp 9f
8:      movl $s_good_failed, %esi
        call report_failure
9:      popal
        ret

# ---- PCI, time and serial ----

        .include "pc-io.inc"

# puthex16: %ax as four lowercase hex digits.
puthex16:
        pushl %eax
        pushl %ecx
        pushl %edx
        movl %eax, %ecx
        movl $4, %edx
1:      rolw $4, %cx
        movb %cl, %al
        call hexdigit
        decl %edx
        jnz 1b
        popl %edx
        popl %ecx
        popl %eax
        ret

        .data
s_no_devices:   .asciz "FAIL: no virtio device on bus 0"
s_virtio:       .asciz "virtio "
s_slot:         .asciz " slot "
s_round:        .asciz "round "
s_scenarios:    .asciz " scenarios "
s_refused:      .asciz " refused "
s_good:         .asciz " good "
s_fail:         .asciz "FAIL: "
s_no_reset:     .asciz "no DEVICE_NEEDS_RESET"
s_used:         .asciz "used index moved"
s_canary:       .asciz "canary below the PCI hole changed"
s_features:     .asciz "FEATURES_OK refused"
s_good_failed:  .asciz "good request failed"

        .align 4
# kind, address low, address high, length
scenario_table:
        # Rings outside RAM, at MMIO, across the ends of RAM, in the hole, wrapping.
        .long K_DESC, 0x00000000, 0x00000010, 0      # 64 GiB
        .long K_DESC, 0xFEC00000, 0, 0               # the IOAPIC
        .long K_DESC, 0xBFFFFFC0, 0, 0               # across the end of low RAM
        .long K_DESC, 0xD0000000, 0, 0               # in the hole
        .long K_DESC, 0x0FFFFFC0, 0x00000001, 0      # across the end of high RAM
        .long K_DESC, 0xFFFFFF00, 0xFFFFFFFF, 0      # wraps
        .long K_AVAIL, 0xFEE00000, 0, 0              # the local APIC
        .long K_AVAIL, 0xBFFFFFF8, 0, 0
        .long K_AVAIL, 0xFFFFFFF0, 0xFFFFFFFF, 0
        .long K_USED, 0x00000000, 0x00000010, 0
        .long K_USED, 0xBFFFFFC0, 0, 0
        .long K_USED, 0x10000000, 0x00000001, 0      # the first byte past high RAM
        .long K_USED, 0xFFFFFF00, 0x7FFFFFFF, 0      # huge
        .long K_USED, 0xFFFFFFC0, 0, 0               # the top of the 32-bit space
        # Buffers: the device would write (read requests) or read them.
        .long K_BUFFER, 0x00000000, 0x00000010, 512
        .long K_BUFFER, 0xBFFFFF00, 0, 512           # half in RAM (the canary), half in the hole
        .long K_BUFFER, 0xC0000000, 0, 512           # the first byte of the hole
        .long K_BUFFER, 0xFFFFFF00, 0, 512           # across 4 GiB into high RAM
        .long K_BUFFER, 0x0FFFFE00, 0x00000001, 1024 # across the end of high RAM
        .long K_BUFFER, 0x10000000, 0x00000001, 512  # right past the end of RAM
        .long K_BUFFER, 0xFFFFF000, 0xFFFFFFFF, 0x2000 # wraps around 2^64
        .long K_BUFFER, 0x00000000, 0x80000000, 512  # 2^63
        .long K_BUFFER, 0x00001000, 0, 0xFFFFFFFF    # a length that runs past every RAM
        .long K_BUFFER, 0xFEE00000, 0, 512           # the local APIC
        .long K_BUFFER_OUT, 0xBFFFFF00, 0, 512
        .long K_BUFFER_OUT, 0xC0000000, 0, 512
        .long K_BUFFER_OUT, 0x10000000, 0x00000001, 512
        .long K_BUFFER_OUT, 0xFFFFF000, 0xFFFFFFFF, 0x2000
        .long K_BUFFER_OUT, 0xFFFFFE00, 0, 0x400
        # Chains.
        .long K_LOOP, 0, 0, 0
        .long K_INDIRECT, 0x00000000, 0x00000010, 64
        .long K_INDIRECT, 0xBFFFFFE0, 0, 64
        .long K_INDIRECT, 0xFFFFFFF0, 0xFFFFFFFF, 32
        .long K_INDIRECT_LOOP, 0, 0, 0
        .long K_AVAIL_AHEAD, 0, 0, 0
        .long K_BAD_HEAD, 0, 0, 0
        .long 0, 0, 0, 0
# The good requests: 16 bytes into `data` (virtio-rng), a read of sector 0 into it (virtio-blk).
good_rng:
        .long K_BUFFER, data, 0, 16
good_blk:
        .long K_BUFFER, data, 0, 512
round:          .long 0
scenarios:      .long 0
refused:        .long 0
good:           .long 0
device_count:   .long 0
device_index:   .long 0
devices_bar:    .fill 8, 4, 0
devices_id:     .fill 8, 4, 0
bar:            .long 0
device_id:      .long 0
queue:          .long 0
scenario:       .long 0
ring_desc:      .long 0
ring_avail:     .long 0
ring_used:      .long 0
timer_left:     .long 0
timer_last:     .byte 0

        .bss
        .align 4096
desc:           .skip QSIZE * 16
        .align 64
avail:          .skip 6 + 2 * QSIZE
        .align 64
used:           .skip 6 + 8 * QSIZE
        .align 64
indirect:       .skip 32
        .align 16
blk_header:     .skip 16
blk_status:     .skip 4
queue_memory_end:
        .align 16
data:           .skip 512
        .align 16
stack:          .skip 4096
stack_top:
