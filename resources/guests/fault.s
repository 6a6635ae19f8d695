# fault: vCPU 0 executes an undefined instruction (#UD, vector 6); other vCPUs park.
    .code64
    .text
    .globl _start
_start:
    test %rsi, %rsi
    jnz park
    mov $0xfa017, %rax       # a recognisable value for the register dump
    ud2
park:
    mov $PARK_PORT, %dx
    out %al, %dx
    jmp park
