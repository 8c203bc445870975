# Multiboot test kernel for 32-bit protected mode on the software CPU (also runs on KVM):
# 32-bit paging with 4 MiB pages, #PF error codes and CR2, ring 3 through IRET with the stack
# switch from a 32-bit TSS, INT 0x80 through a DPL-3 trap gate, far CALL/RET, PUSHA/POPA.
# Prints progress ('A' + check - 1) to port 0xE9; exits through port 0xF4 with 0 on success,
# else the number of the failed check.

        .set MB_MAGIC, 0x1BADB002
        .set MB_FLAGS, 0x00000003

        .macro EXPECT mem, value, check
        cmpl $\value, \mem
        je 9f
        mov $\check, %eax
        jmp fail
9:      push %eax
        mov $(0x40 + \check), %al
        out %al, $0xE9
        pop %eax
        .endm

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
        lgdt gdt_descriptor
        ljmp $0x08, $reload
reload: mov $0x10, %ax
        mov %ax, %ds
        mov %ax, %es
        mov %ax, %ss
        # Page directory: 4 MiB pages, first 16 MiB identity-mapped (user, writable), except
        # 4-8 MiB which is supervisor-only.
        mov $page_directory, %edi
        movl $0x00000087, 0(%edi)
        movl $0x00400083, 4(%edi)
        movl $0x00800087, 8(%edi)
        movl $0x00C00087, 12(%edi)
        mov %cr4, %eax
        or $0x10, %eax                  # PSE
        mov %eax, %cr4
        mov %edi, %cr3
        mov %cr0, %eax
        or $0x80010000, %eax            # PG, WP
        mov %eax, %cr0

        # TSS: ESP0/SS0 for ring 3 -> ring 0.
        movl $kernel_stack2_top, tss+4
        movl $0x10, tss+8
        mov $tss, %eax
        mov %ax, gdt+0x28+2
        shr $16, %eax
        mov %al, gdt+0x28+4
        mov %ah, gdt+0x28+7
        mov $0x28, %ax
        ltr %ax

        # IDT: #PF interrupt gate, INT 0x80 trap gate (DPL 3).
        mov $isr_pf, %eax
        mov %ax, idt+14*8
        movw $0x08, idt+14*8+2
        movw $0x8E00, idt+14*8+4
        shr $16, %eax
        mov %ax, idt+14*8+6
        mov $isr_int80, %eax
        mov %ax, idt+0x80*8
        movw $0x08, idt+0x80*8+2
        movw $0xEF00, idt+0x80*8+4
        shr $16, %eax
        mov %ax, idt+0x80*8+6
        lidt idt_descriptor

        # Checks 1-3: not-present #PF on a read (error 0, CR2) at the same privilege.
        movl $2, skip_length
        mov $0x40000000, %ebx
        mov (%ebx), %eax                # 2 bytes
        EXPECT last_error, 0, 1
        EXPECT last_cr2, 0x40000000, 2
        EXPECT last_cs, 0x08, 3

        # Checks 4-5: far CALL and RET through the GDT; PUSHA/POPA keep the registers.
        mov $0x11111111, %esi
        pusha
        xor %esi, %esi
        popa
        EXPECT %esi, 0x11111111, 4
        lcall $0x08, $far_target
        EXPECT far_called, 1, 5

        # Ring 3 through IRET (IOPL 3 for the progress output).
        pushl $0x23
        pushl $user_stack_top
        pushl $0x3202
        pushl $0x1B
        pushl $user_entry
        iret

user_entry:
        mov $0x23, %ax
        mov %ax, %ds
        mov %ax, %es
        # Checks 6-8: a user read of a supervisor page: #PF(P|U) on the TSS stack.
        mov $0x400000, %ebx
        mov (%ebx), %eax
        EXPECT last_error, 5, 6
        EXPECT last_cs, 0x1B, 7
        EXPECT last_esp0_frame, 1, 8
        int $0x80
        hlt

back_in_kernel:
        # Checks 9-10: INT 0x80 came from ring 3 and switched to the TSS stack.
        EXPECT int80_cs, 0x1B, 9
        EXPECT int80_ss, 0x23, 10
        mov $0x10, %ax
        mov %ax, %ds
        mov %ax, %es
        mov $pass_message, %esi
        call print
        xor %eax, %eax
        out %al, $0xF4
1:      hlt
        jmp 1b

fail:
        mov %eax, %ebx
        mov $fail_message, %esi
        call print
        mov %ebx, %eax
        out %al, $0xF4
1:      hlt
        jmp 1b

print:  lodsb
        test %al, %al
        jz 1f
        out %al, $0xE9
        jmp print
1:      ret

far_target:
        movl $1, far_called
        lret

# #PF: records the error code, CR2 and the interrupted CS, notes whether the frame is on the
# TSS stack, and resumes skip_length bytes later.
isr_pf:
        push %eax
        mov 4(%esp), %eax
        mov %eax, last_error
        mov %cr2, %eax
        mov %eax, last_cr2
        mov 12(%esp), %eax
        mov %eax, last_cs
        movl $0, last_esp0_frame
        cmp $kernel_stack2_top - 28, %esp
        jne 1f
        movl $1, last_esp0_frame
1:      mov skip_length, %eax
        add %eax, 8(%esp)
        pop %eax
        add $4, %esp
        iret

isr_int80:
        mov 4(%esp), %eax
        mov %eax, int80_cs
        mov 16(%esp), %eax
        mov %eax, int80_ss
        mov $0x10, %ax
        mov %ax, %ss
        mov $stack_top, %esp
        jmp back_in_kernel

        .data
        .align 16
gdt:
        .quad 0
        .quad 0x00CF9A000000FFFF        # 0x08 kernel code
        .quad 0x00CF92000000FFFF        # 0x10 kernel data
        .quad 0x00CFFA000000FFFF        # 0x18 user code
        .quad 0x00CFF2000000FFFF        # 0x20 user data
        .quad 0x0000890000000067        # 0x28 32-bit TSS (base filled in)
gdt_end:
gdt_descriptor:
        .word gdt_end - gdt - 1
        .long gdt
idt_descriptor:
        .word 2047
        .long idt
skip_length:    .long 0
last_error:     .long 0
last_cr2:       .long 0
last_cs:        .long 0
last_esp0_frame: .long 0
far_called:     .long 0
int80_cs:       .long 0
int80_ss:       .long 0
pass_message:   .asciz "protected-mode checks passed\n"
fail_message:   .asciz "protected-mode check failed\n"

        .bss
        .align 4096
page_directory: .skip 4096
idt:    .skip 2048
tss:    .skip 104
        .align 16
        .skip 8192
stack_top:
        .skip 8192
kernel_stack2_top:
        .skip 8192
user_stack_top:
