# exitcode: vCPU 0 exits with the low byte of its argument (RDX); other vCPUs park.
    .include "common.inc"
    vcpu0_program
    mov %edx, %eax
    exit_with_al
    park_forever
