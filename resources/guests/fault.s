# fault: vCPU 0 faults; other vCPUs park.
#   argument (RDX) 0: executes ud2 (#UD, vector 6)
#   argument 1:       reads UNMAPPED_ADDR, beyond the identity map (#PF, vector 14)
    .code64
    .text
    .globl _start
_start:
    test %rsi, %rsi
    jnz park
    mov $0xfa017, %rax       # a recognisable value for the register dump
    test %rdx, %rdx
    jnz 1f
    ud2
1:  movabs $UNMAPPED_ADDR, %rbx
    mov (%rbx), %rcx
park:
    mov $PARK_PORT, %dx
    out %al, %dx
    jmp park
