# exitcode: vCPU 0 exits with the low byte of its argument (RDX); other vCPUs park.
    .include "common.inc"
    .code64
    .text
    .globl _start
_start:
    only_vcpu0
    mov %edx, %eax
    exit_with_al
    park_forever
