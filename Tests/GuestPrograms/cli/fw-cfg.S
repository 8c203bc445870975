# A Multiboot v1 kernel that reads QEMU's fw_cfg interface (selector 0x510, data 0x511, DMA
# address 0x514/0x518) and checks it against the rest of the machine: the signature "QEMU",
# the DMA feature bit and DMA signature "QEMU CFG"; the CPU count equals the number of enabled
# processors in the ACPI MADT; the file "etc/e820" (found in the file directory, read by DMA)
# equals the Multiboot memory map. Prints "fw_cfg cpus=N ram=0xR cmdline=TEXT" on COM1 and
# exits through isa-debug-exit with 0x21, or with the number of the failed check.
        .set SELECTOR, 0x510
        .set DATA, 0x511
        .set DMA, 0x514

        .include "multiboot.inc"
_start:
        mov $stack_top, %esp
        mov %ebx, mbi
        mov $1, %edi                    # check 1: signature
        xor %eax, %eax
        call select
        call read32
        cmp $0x554D4551, %eax           # "QEMU"
        jne fail
        inc %edi                        # check 2: ID has DMA (bit 1)
        mov $1, %eax
        call select
        call read32
        test $2, %eax
        jz fail
        inc %edi                        # check 3: DMA register reads "QEMU CFG"
        mov $DMA, %dx
        in %dx, %eax
        cmp $0x554D4551, %eax
        jne fail
        add $4, %dx
        in %dx, %eax
        cmp $0x47464320, %eax
        jne fail
        inc %edi                        # check 4: CPU count = enabled MADT processors
        mov $5, %eax
        call select
        call read32
        movzwl %ax, %eax
        mov %eax, cpus
        call madt_processors
        cmp cpus, %eax
        jne fail
        mov $3, %eax                    # RAM size (64-bit)
        call select
        call read32
        mov %eax, ram
        call read32
        mov %eax, ram+4
        inc %edi                        # check 5: "etc/e820" is in the file directory
        mov $0x19, %eax
        call select
        call read32
        bswap %eax
        mov %eax, %ecx
        test %ecx, %ecx
        jz fail
1:      mov $entry, %ebx                # read one 64-byte entry
        mov $64, %esi
2:      mov $DATA, %dx
        inb %dx, %al
        mov %al, (%ebx)
        inc %ebx
        dec %esi
        jnz 2b
        mov $entry+8, %esi
        mov $e820_name, %ebx
3:      mov (%esi), %al
        cmp (%ebx), %al
        jne 4f
        test %al, %al
        jz found
        inc %esi
        inc %ebx
        jmp 3b
4:      dec %ecx
        jnz 1b
        jmp fail
found:  mov entry, %eax                 # size (big-endian)
        bswap %eax
        mov %eax, e820_size
        movzwl entry+4, %eax            # select (big-endian)
        xchg %al, %ah
        inc %edi                        # check 6: DMA read of the file completes without error
        shl $16, %eax
        or $0x0A, %eax                  # SELECT | READ
        bswap %eax
        mov %eax, descriptor
        mov e820_size, %eax
        bswap %eax
        mov %eax, descriptor+4
        movl $0, descriptor+8
        mov $e820_buffer, %eax
        bswap %eax
        mov %eax, descriptor+12
        mov $DMA, %dx
        xor %eax, %eax
        out %eax, %dx
        mov $descriptor, %eax
        bswap %eax
        add $4, %dx
        out %eax, %dx
        cmpl $0, descriptor
        jne fail
        inc %edi                        # check 7: etc/e820 = the Multiboot memory map
        mov mbi, %ebx
        testl $0x40, (%ebx)
        jz fail
        mov 44(%ebx), %eax              # mmap_length / 24 entries
        xor %edx, %edx
        mov $24, %ecx
        div %ecx
        mov %eax, %ebp
        mov e820_size, %eax
        xor %edx, %edx
        mov $20, %ecx
        div %ecx
        test %edx, %edx
        jnz fail
        cmp %eax, %ebp
        jne fail
        mov 48(%ebx), %esi              # mmap entries: size, base, length, type
        mov $e820_buffer, %ebx
5:      mov $20, %ecx
        push %esi
        add $4, %esi
6:      mov (%esi), %al
        cmp (%ebx), %al
        jne fail
        inc %esi
        inc %ebx
        dec %ecx
        jnz 6b
        pop %esi
        add $24, %esi
        dec %ebp
        jnz 5b

        # Report.
        mov $report_cpus, %esi
        call print
        mov cpus, %eax
        call print_decimal
        mov $report_ram, %esi
        call print
        mov ram+4, %eax
        call print_hex
        mov ram, %eax
        call print_hex
        mov $report_cmdline, %esi
        call print
        mov $0x15, %eax
        call select
7:      mov $DATA, %dx
        inb %dx, %al
        test %al, %al
        jz 8f
        call putc
        jmp 7b
8:      mov $10, %al
        call putc
        mov $0xF4, %dx
        mov $0x21, %eax
        out %eax, %dx
        hlt

# select(key = AX)
select: mov $SELECTOR, %dx
        out %ax, %dx
        ret

# EAX = the next four data bytes (little-endian).
read32: mov $DATA, %dx
        xor %eax, %eax
        mov $4, %ecx
1:      ror $8, %eax
        inb %dx, %al
        dec %ecx
        jnz 1b
        ror $8, %eax
        ret

# EAX = the number of enabled processor entries in the MADT (0 when there is no ACPI).
madt_processors:
        mov $0xE0000, %esi
1:      cmpl $0x20445352, (%esi)        # "RSD "
        jne 2f
        cmpl $0x20525450, 4(%esi)       # "PTR "
        je 3f
2:      add $16, %esi
        cmp $0x100000, %esi
        jb 1b
        xor %eax, %eax
        ret
3:      mov 16(%esi), %esi              # RSDT
        mov 4(%esi), %ecx
        sub $36, %ecx
        shr $2, %ecx
        lea 36(%esi), %ebx
4:      mov (%ebx), %esi
        cmpl $0x43495041, (%esi)        # "APIC"
        je 5f
        add $4, %ebx
        dec %ecx
        jnz 4b
        xor %eax, %eax
        ret
5:      mov 4(%esi), %ecx
        add %esi, %ecx                  # end of the MADT
        add $44, %esi
        xor %eax, %eax
6:      cmp %ecx, %esi
        jae 8f
        cmpb $0, (%esi)                 # processor local APIC
        jne 7f
        testl $1, 4(%esi)               # enabled
        jz 7f
        inc %eax
7:      movzbl 1(%esi), %edx
        test %edx, %edx
        jz 8f
        add %edx, %esi
        jmp 6b
8:      ret

putc:   push %edx
        mov $0x3F8, %dx
        out %al, %dx
        pop %edx
        ret

print:  lodsb
        test %al, %al
        jz 1f
        call putc
        jmp print
1:      ret

# Prints EAX as 8 hex digits.
print_hex:
        mov $8, %ecx
1:      rol $4, %eax
        push %eax
        and $0xF, %eax
        mov hex_digits(%eax), %al
        call putc
        pop %eax
        dec %ecx
        jnz 1b
        ret

# Prints EAX (below 100) in decimal.
print_decimal:
        xor %edx, %edx
        mov $10, %ecx
        div %ecx
        test %eax, %eax
        jz 1f
        add $'0', %al
        call putc
1:      mov %dl, %al
        add $'0', %al
        call putc
        ret

fail:   mov $0xF4, %dx
        mov %edi, %eax
        out %eax, %dx
        hlt

        .data
e820_name:      .asciz "etc/e820"
report_cpus:    .asciz "fw_cfg cpus="
report_ram:     .asciz " ram=0x"
report_cmdline: .asciz " cmdline="
hex_digits:     .ascii "0123456789abcdef"
        .align 8
descriptor:     .skip 16
mbi:            .long 0
cpus:           .long 0
ram:            .quad 0
e820_size:      .long 0
entry:          .skip 64
        .bss
e820_buffer:    .skip 4096
        .skip 4096
stack_top:
