# spin: runs until stopped. vCPU 0 first fills the pattern page with the VM id (RDI); then every
# vCPU i loops forever incrementing the u64 at COUNTERS_ADDR + 8*i and storing the VM id at
# PATTERN_ADDR + 8*i. No exits while spinning: it runs natively at CPL3.
    .code64
    .text
    .globl _start
_start:
    mov %rsi, %rbx                  # vCPU index
    test %rsi, %rsi
    jnz 2f
    mov $PATTERN_ADDR, %r8
    mov $(PATTERN_SIZE / 8), %ecx
1:  mov %rdi, (%r8)
    add $8, %r8
    loop 1b
2:  lea COUNTERS_ADDR(,%rbx,8), %r8
    lea PATTERN_ADDR(,%rbx,8), %r9
3:  incq (%r8)
    mov %rdi, (%r9)
    jmp 3b
