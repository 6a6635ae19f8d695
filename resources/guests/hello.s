# hello: vCPU 0 prints a greeting on the serial port and exits 0; other vCPUs park.
# Entry (set by the VMM): RDI = VM id, RSI = vCPU index, RDX = argument, at CPL3 with IOPL 3.
    .include "common.inc"
    vcpu0_program
    lea msg(%rip), %rsi
    mov $msg_len, %ecx
    mov $SERIAL_PORT, %dx
1:  lodsb
    out %al, %dx
    loop 1b
    xor %eax, %eax
    exit_with_al
    park_forever
msg:
    .ascii "Hello from a Zygote guest\n"
    msg_len = . - msg
