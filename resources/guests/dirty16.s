# dirty16: vCPU 0 writes TSC-derived values (different every run) into the first u64 of each of
# DIRTY_PAGES pages from DIRTY_ADDR, increments the u64 at COUNTERS_ADDR, and exits 0; other
# vCPUs park. A reset loop restores it to a snapshot after each run.
    .code64
    .text
    .globl _start
_start:
    test %rsi, %rsi
    jnz park
    rdtsc
    shl $32, %rdx
    or %rdx, %rax
    or $1, %rax                     # never 0: every page really changes
    mov $DIRTY_ADDR, %rdi
    mov $DIRTY_PAGES, %ecx
1:  mov %rax, (%rdi)
    add $0x1000, %rdi
    inc %rax
    loop 1b
    incq COUNTERS_ADDR
    xor %eax, %eax
    mov $EXIT_PORT, %dx
    out %al, %dx
park:
    mov $PARK_PORT, %dx
    out %al, %dx
    jmp park
