# A Multiboot v1 kernel linked low (the test links it at 0x8000, where Hostvisor's default
# boot stack is), with a bss up to past 0x30000 (over the default command-line area). It checks
# that the loader's data stayed out of it: the information structure, the command line and the
# memory map lie outside [image start, bss end); the stack it was given works and lies
# outside too; its data survived. Prints on COM1, exits through isa-debug-exit with 0x21 when
# every check passed, else with the failed check's number.
image_start:
        .include "multiboot.inc"
_start:
        mov $1, %edi
        cmpl $0x2BADB002, %eax          # check 1: the loader's magic
        jne fail
        inc %edi                        # check 2: the information structure is outside the image
        mov %ebx, %eax
        call outside_image
        inc %edi                        # check 3: the stack is outside the image
        mov %esp, %eax
        sub $4, %eax
        call outside_image
        inc %edi                        # check 4: the command line (flag 2) is outside the image
        testl $4, (%ebx)
        jz fail
        mov 16(%ebx), %eax
        call outside_image
        inc %edi                        # check 5: the memory map (flag 6) is outside the image
        testl $0x40, (%ebx)
        jz fail
        mov 48(%ebx), %eax
        call outside_image
        inc %edi                        # check 6: the data is intact
        cmpl $0x12345678, pattern
        jne fail
        inc %edi                        # check 7: the bss was zeroed (its last word too)
        cmpl $0, bss_last
        jne fail
        movl $message, %esi
next:   lodsb
        testb %al, %al
        jz done
        movw $0x3F8, %dx
        outb %al, %dx
        jmp next
done:   movw $0xF4, %dx
        movl $0x21, %eax                # exit status (0x21 << 1) | 1 = 67
        outl %eax, %dx
        hlt

# Fails with check EDI unless EAX lies outside [image_start, bss_end).
outside_image:
        cmp $image_start, %eax
        jb 1f
        cmp $bss_end, %eax
        jb fail
1:      ret

fail:   movw $0xF4, %dx
        mov %edi, %eax
        outl %eax, %dx
        hlt

        .data
pattern:
        .long 0x12345678
message:
        .asciz "low multiboot kernel ran\n"

        .bss
        .skip 0x30000
bss_last:
        .long 0
bss_end:
