# spin: runs until stopped. Every vCPU i loops forever: read the VM id from VM_ID_ADDR (the VMM
# writes a new one into a clone); if it changed, fill this vCPU's pattern page
# (PATTERN_ADDR + i * PATTERN_SIZE) with it; increment the u64 at COUNTERS_ADDR + 8*i; store the
# id into the slot (counter mod 512) of the pattern page. No exits while spinning: it runs
# natively at CPL3.
    .code64
    .text
    .globl _start
_start:
    mov %rsi, %rbx                  # vCPU index
    lea COUNTERS_ADDR(,%rbx,8), %r8
    mov %rbx, %r9
    shl $12, %r9
    add $PATTERN_ADDR, %r9          # this vCPU's pattern page
    mov $-1, %r10                   # the id the page holds: none yet
1:  mov VM_ID_ADDR, %rax
    cmp %rax, %r10
    je 2f
    mov %r9, %rdi
    mov $(PATTERN_SIZE / 8), %ecx
    rep stosq
    mov %rax, %r10
2:  incq (%r8)
    mov (%r8), %rdx
    and $(PATTERN_SIZE / 8 - 1), %edx
    mov %rax, (%r9,%rdx,8)
    jmp 1b
