# Software-CPU benchmark guest programs (GNU as, AT&T syntax).
#
# One flat image per program (assemble with --defsym PROGRAM=n):
#   1 checksum   add/adc/rol/xor over a 1 MiB buffer, 100 passes
#   2 memcpy-rep rep movsb of 1 MiB, 200 times
#   3 memcpy-sse movdqu loads/stores, 64 bytes per iteration, 1 MiB, 200 times
#   4 sieve      sieve of Eratosthenes up to 4M (byte array), 3 rounds (branchy integer code)
#   5 sse-float  saxpy + dot product over 4096 floats (mulps/addps/sqrtps), 3000 rounds
#   0 empty      boot and exit only (start-up overhead)
#
# Two entries, identical measured code:
#   - offset 0 (load address 0x100000): 64-bit flat entry for hostvisor-softbench (flat long
#     mode, paging off), ends with HLT.
#   - Multiboot (a.out kludge header) 32-bit entry `_start`: builds identity page tables,
#     enters long mode, runs the same program, prints the result on COM1 and exits through
#     isa-debug-exit (port 0xF4) - runs unchanged on QEMU and on `hostvisor run`.
# The program's result (RAX) is printed as "result=<hex>" so both runs can be checked.

        .ifndef REPEAT
        .set REPEAT, 1
        .endif
        .set LOAD_ADDRESS, 0x100000
        .set BUFFER_A, 0x1000000
        .set BUFFER_B, 0x1200000
        .set BUFFER_C, 0x1400000
        .set PAGE_TABLES, 0x70000
        .set STACK_TOP, 0x90000

        .text
        .code64
flat_entry:
        call bench_main
        hlt
        jmp flat_entry

        .code32
        .balign 16
multiboot_header:
        .long 0x1BADB002
        .long 0x00010000
        .long -(0x1BADB002 + 0x00010000)
        .long multiboot_header
        .long LOAD_ADDRESS
        .long 0
        .long 0
        .long _start

_start:
        cli
        mov $STACK_TOP, %esp
        # Page tables: PML4 -> PDPT -> PD with 2 MiB pages covering the first 1 GiB.
        mov $PAGE_TABLES, %edi
        mov $(3 * 4096 / 4), %ecx
        xor %eax, %eax
        rep stosl
        movl $(PAGE_TABLES + 0x1000 + 3), PAGE_TABLES
        movl $(PAGE_TABLES + 0x2000 + 3), PAGE_TABLES + 0x1000
        mov $(PAGE_TABLES + 0x2000), %edi
        mov $0x83, %eax
        mov $512, %ecx
1:      mov %eax, (%edi)
        movl $0, 4(%edi)
        add $0x200000, %eax
        add $8, %edi
        loop 1b
        mov %cr4, %eax
        or $(0x20 | 0x200 | 0x400), %eax        # PAE, OSFXSR, OSXMMEXCPT
        mov %eax, %cr4
        mov $PAGE_TABLES, %eax
        mov %eax, %cr3
        mov $0xC0000080, %ecx
        rdmsr
        or $0x100, %eax                         # EFER.LME
        wrmsr
        mov %cr0, %eax
        and $~0x4, %eax                         # no EM
        or $0x80000003, %eax                    # PG, MP, PE
        mov %eax, %cr0
        lgdt gdt_pointer
        ljmp $0x08, $long_mode

        .code64
long_mode:
        mov $0x10, %eax
        mov %eax, %ds
        mov %eax, %es
        mov %eax, %ss
        mov $STACK_TOP, %rsp
        call bench_main
        mov %rax, %rbx
        lea result_text(%rip), %rsi
        call print_string
        mov $16, %ecx
2:      rol $4, %rbx
        mov %ebx, %eax
        and $15, %eax
        lea hex_digits(%rip), %rdx
        movzbl (%rdx,%rax), %eax
        call print_char
        dec %ecx
        jnz 2b
        mov $10, %eax
        call print_char
        xor %eax, %eax
        out %al, $0xF4                          # isa-debug-exit: status (0 << 1) | 1
3:      hlt
        jmp 3b

print_string:
        movzbl (%rsi), %eax
        test %eax, %eax
        jz 1f
        call print_char
        inc %rsi
        jmp print_string
1:      ret

print_char:
        mov $0x3F8, %dx
        out %al, %dx
        ret

# ---------------------------------------------------------------------------------------
# The measured programs. Result in RAX.

# Runs the selected program REPEAT times (assemble with --defsym REPEAT=n; default 1) so
# that fast runs are long enough to time; the result is that of the last repetition.
bench_main:
        mov $REPEAT, %r15d
1:      call bench_one
        dec %r15d
        jnz 1b
        ret

bench_one:
        mov $PROGRAM, %eax
        cmp $1, %eax
        je checksum
        cmp $2, %eax
        je memcpy_rep
        cmp $3, %eax
        je memcpy_sse
        cmp $4, %eax
        je sieve
        cmp $5, %eax
        je sse_float
        xor %eax, %eax
        ret

# Fills BUFFER_A (1 MiB) with a linear congruential sequence.
fill_buffer:
        mov $BUFFER_A, %rdi
        mov $(1 << 17), %ecx
        mov $0x123456789ABCDEF, %rax
        mov $6364136223846793005, %r8
        mov $1442695040888963407, %r9
1:      imul %r8, %rax
        add %r9, %rax
        mov %rax, (%rdi)
        add $8, %rdi
        dec %ecx
        jnz 1b
        ret

checksum:
        call fill_buffer
        xor %eax, %eax
        xor %edx, %edx
        mov $100, %r9d
1:      mov $BUFFER_A, %rsi
        mov $(1 << 17), %ecx
2:      mov (%rsi), %r8
        add %r8, %rax
        adc $0, %rdx
        rol $5, %rax
        xor %r8, %rdx
        add $8, %rsi
        dec %ecx
        jnz 2b
        dec %r9d
        jnz 1b
        xor %rdx, %rax
        ret

memcpy_rep:
        call fill_buffer
        mov $200, %r9d
1:      mov $BUFFER_A, %rsi
        mov $BUFFER_B, %rdi
        mov $(1 << 20), %ecx
        rep movsb
        dec %r9d
        jnz 1b
        mov BUFFER_B + 4096, %rax
        add BUFFER_B + (1 << 20) - 8, %rax
        ret

memcpy_sse:
        call fill_buffer
        mov $200, %r9d
1:      mov $BUFFER_A, %rsi
        mov $BUFFER_B, %rdi
        mov $(1 << 14), %ecx
2:      movdqu (%rsi), %xmm0
        movdqu 16(%rsi), %xmm1
        movdqu 32(%rsi), %xmm2
        movdqu 48(%rsi), %xmm3
        movdqu %xmm0, (%rdi)
        movdqu %xmm1, 16(%rdi)
        movdqu %xmm2, 32(%rdi)
        movdqu %xmm3, 48(%rdi)
        add $64, %rsi
        add $64, %rdi
        dec %ecx
        jnz 2b
        dec %r9d
        jnz 1b
        mov BUFFER_B + 4096, %rax
        add BUFFER_B + (1 << 20) - 8, %rax
        ret

        .set SIEVE_LIMIT, 4000000
sieve:
        mov $3, %r9d
        xor %r10d, %r10d
1:      mov $BUFFER_C, %rdi                     # flags[i] = 1
        mov $SIEVE_LIMIT, %ecx
        mov $1, %al
        rep stosb
        mov $2, %ebx                            # for i = 2; i * i < N
2:      mov %rbx, %rax
        imul %rbx, %rax
        cmp $SIEVE_LIMIT, %rax
        jae 5f
        cmpb $0, BUFFER_C(%rbx)
        je 4f
3:      movb $0, BUFFER_C(%rax)                 # for j = i * i; j < N; j += i
        add %rbx, %rax
        cmp $SIEVE_LIMIT, %rax
        jb 3b
4:      inc %rbx
        jmp 2b
5:      xor %eax, %eax                          # count primes
        mov $2, %ebx
6:      movzbl BUFFER_C(%rbx), %ecx
        add %rcx, %rax
        inc %rbx
        cmp $SIEVE_LIMIT, %rbx
        jb 6b
        add %rax, %r10
        dec %r9d
        jnz 1b
        mov %r10, %rax
        ret

        .set FLOATS, 4096
sse_float:
        mov $BUFFER_A, %rdi                     # a[i] = i, y[i] = 1 / (i + 1)
        mov $BUFFER_B, %rsi
        xor %ecx, %ecx
        mov $1, %eax
        cvtsi2ss %eax, %xmm7
1:      cvtsi2ss %ecx, %xmm0
        movss %xmm0, (%rdi,%rcx,4)
        addss %xmm7, %xmm0
        movaps %xmm7, %xmm1
        divss %xmm0, %xmm1
        movss %xmm1, (%rsi,%rcx,4)
        inc %ecx
        cmp $FLOATS, %ecx
        jb 1b
        mov $0x3F000000, %eax                   # x = 0.5, scale = 1/65536
        movd %eax, %xmm6
        shufps $0, %xmm6, %xmm6
        mov $0x37800000, %eax
        movd %eax, %xmm5
        shufps $0, %xmm5, %xmm5
        xorps %xmm4, %xmm4                      # dot accumulator
        mov $3000, %r9d
2:      xor %ecx, %ecx
3:      movaps (%rdi,%rcx,4), %xmm0             # y = y * scale + a * x; dot += sqrt(y) * a
        movaps (%rsi,%rcx,4), %xmm1
        mulps %xmm5, %xmm1
        movaps %xmm0, %xmm2
        mulps %xmm6, %xmm2
        addps %xmm2, %xmm1
        movaps %xmm1, (%rsi,%rcx,4)
        sqrtps %xmm1, %xmm3
        mulps %xmm0, %xmm3
        addps %xmm3, %xmm4
        add $4, %ecx
        cmp $FLOATS, %ecx
        jb 3b
        dec %r9d
        jnz 2b
        movq %xmm4, %rax                        # the float bits of two lanes
        ret

        .section .rodata
        .balign 8
gdt:
        .quad 0
        .quad 0x00AF9A000000FFFF                # 64-bit code
        .quad 0x00CF92000000FFFF                # data
gdt_pointer:
        .word gdt_pointer - gdt - 1
        .long gdt
result_text:
        .asciz "result="
hex_digits:
        .ascii "0123456789abcdef"
