# The CPU model as a guest sees it (run on the software CPU and on KVM under a named model):
# prints "NAME=XXXXXXXX" for each CPUID feature register a model defines (leaf 1 ECX/EDX,
# leaf 7 EBX/ECX/EDX, leaf 0DH subleaf 0 and 1 EAX, leaf 8000_0001H ECX/EDX), one per line,
# then whether CR4.OSXSAVE can be set ("osxsave=ok", or "osxsave=gp" when the model has no
# XSAVE and the write raises #GP) and, with OSXSAVE set, whether XSETBV accepts the AVX state
# ("xsetbv-avx=ok" or "xsetbv-avx=gp").
        .include "harness.S"

        # Prints `name`, then EAX as eight hexadecimal digits and a newline.
        .macro PRINT_REGISTER name
        mov %eax, %ebx
        lea 1f(%rip), %rsi
        call print
        mov %ebx, %eax
        call print_hex32
        jmp 2f
1:      .asciz "\name="
2:
        .endm

        # CPUID leaf `leaf`, subleaf `subleaf`; prints register `register` as `name`.
        .macro SHOW leaf, subleaf, register, name
        mov $\leaf, %eax
        mov $\subleaf, %ecx
        cpuid
        mov \register, %eax
        PRINT_REGISTER \name
        .endm

test_main:
        SHOW 1, 0, %ecx, leaf1ecx
        SHOW 1, 0, %edx, leaf1edx
        SHOW 7, 0, %ebx, leaf7ebx
        SHOW 7, 0, %ecx, leaf7ecx
        SHOW 7, 0, %edx, leaf7edx
        SHOW 0xD, 0, %eax, xsave0eax
        SHOW 0xD, 1, %eax, xsave1eax
        SHOW 0x80000001, 0, %ecx, ext1ecx
        SHOW 0x80000001, 0, %edx, ext1edx
        # CR4.OSXSAVE (bit 18).
        movq $0xFF, last_vector(%rip)
        lea 3f(%rip), %rax
        mov %rax, resume_rip(%rip)
        mov %cr4, %rax
        bts $18, %rax
        mov %rax, %cr4
3:      movq $0, resume_rip(%rip)
        lea osxsave_ok(%rip), %rsi
        cmpq $13, last_vector(%rip)
        jne 4f
        lea osxsave_gp(%rip), %rsi
        call print
        ret
4:      call print
        # XSETBV with x87, SSE and AVX.
        movq $0xFF, last_vector(%rip)
        lea 5f(%rip), %rax
        mov %rax, resume_rip(%rip)
        xor %ecx, %ecx
        xor %edx, %edx
        mov $7, %eax
        xsetbv
5:      movq $0, resume_rip(%rip)
        lea xsetbv_ok(%rip), %rsi
        cmpq $13, last_vector(%rip)
        jne 6f
        lea xsetbv_gp(%rip), %rsi
6:      call print
        ret

# Prints EAX as eight hexadecimal digits and a newline to port 0xE9.
print_hex32:
        mov $8, %ecx
1:      rol $4, %eax
        mov %eax, %edx
        and $0xF, %edx
        movzbl hex_digits(%rdx), %edx
        xchg %eax, %edx
        out %al, $0xE9
        xchg %eax, %edx
        dec %ecx
        jnz 1b
        mov $10, %al
        out %al, $0xE9
        ret

hex_digits:     .ascii "0123456789abcdef"
osxsave_ok:     .asciz "osxsave=ok\n"
osxsave_gp:     .asciz "osxsave=gp\n"
xsetbv_ok:      .asciz "xsetbv-avx=ok\n"
xsetbv_gp:      .asciz "xsetbv-avx=gp\n"
