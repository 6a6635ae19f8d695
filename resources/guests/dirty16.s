# dirty16: vCPU 0 writes TSC-derived values (different every run) into the first u64 of each of
# DIRTY_PAGES pages from DIRTY_ADDR, increments the u64 at COUNTERS_ADDR, and exits 0; other
# vCPUs park. A reset loop restores it to a snapshot after each run.
    .include "common.inc"
    vcpu0_program
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
    exit_with_al
    park_forever
