# exitcode: vCPU 0 exits with the low byte of its argument (RDX); other vCPUs park.
    .code64
    .text
    .globl _start
_start:
    test %rsi, %rsi
    jnz park
    mov %edx, %eax
    mov $EXIT_PORT, %dx
    out %al, %dx
park:
    mov $PARK_PORT, %dx
    out %al, %dx
    jmp park
