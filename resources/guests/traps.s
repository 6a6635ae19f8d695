# Exception stubs, one per vector 0..31, each TRAP_STUB_SIZE bytes, loaded at TRAPS_ADDR.
# The IDT sends every exception here at CPL0 on the IST1 stack. Each stub normalises the frame
# (pushes 0 where the CPU pushed no error code), saves RAX and RDX, reports the vector on
# TRAP_PORT and halts. The VMM stops the VM on that write and reads the frame at RSP:
#   [rsp] rdx, [rsp+8] rax, [rsp+16] error code, [rsp+24] rip, cs, rflags, rsp, ss.
    .code64
    .text
    .globl _start
_start:
.macro stub vec, errcode
    .balign TRAP_STUB_SIZE
    .if \errcode == 0
    pushq $0
    .endif
    push %rax
    push %rdx
    mov $\vec, %eax
    mov $TRAP_PORT, %dx
    out %eax, %dx
1:  hlt
    jmp 1b
.endm
    stub 0, 0
    stub 1, 0
    stub 2, 0
    stub 3, 0
    stub 4, 0
    stub 5, 0
    stub 6, 0
    stub 7, 0
    stub 8, 1
    stub 9, 0
    stub 10, 1
    stub 11, 1
    stub 12, 1
    stub 13, 1
    stub 14, 1
    stub 15, 0
    stub 16, 0
    stub 17, 1
    stub 18, 0
    stub 19, 0
    stub 20, 0
    stub 21, 1
    stub 22, 0
    stub 23, 0
    stub 24, 0
    stub 25, 0
    stub 26, 0
    stub 27, 0
    stub 28, 0
    stub 29, 1
    stub 30, 1
    stub 31, 0
