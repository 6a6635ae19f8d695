# fault: vCPU 0 faults; other vCPUs park.
#   argument (RDX) 0: executes ud2 (#UD, vector 6)
#   argument 1:       reads UNMAPPED_ADDR, beyond the identity map (#PF, vector 14)
    .include "common.inc"
    vcpu0_program
    mov $0xfa017, %rax       # a recognisable value for the register dump
    test %rdx, %rdx
    jnz 1f
    ud2
1:  movabs $UNMAPPED_ADDR, %rbx
    mov (%rbx), %rcx
    park_forever
