# spin: runs until stopped. Every vCPU i loops forever: read the VM id from VM_ID_ADDR (the VMM
# writes a new one into a clone); if it changed, fill this vCPU's pattern page
# (PATTERN_ADDR + i * PATTERN_SIZE) with it; increment the u64 at COUNTERS_ADDR + 8*i; store the
# id into the slot (counter mod 512) of the pattern page. With RDX = N > 0 it also writes the
# counter into one of N pages from TOUCH_ADDR per iteration, round robin (a dirty working set).
# No exits while spinning: it runs natively at CPL3.
    .code64
    .text
    .globl _start
_start:
    mov %rsi, %rbx                  # vCPU index
    mov %rdx, %r11                  # pages to touch (0: none)
    xor %r12, %r12                  # next page to touch
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
    test %r11, %r11
    jz 1b
    mov %r12, %r13
    shl $12, %r13
    mov (%r8), %rdx
    mov %rdx, TOUCH_ADDR(%r13)
    inc %r12
    cmp %r11, %r12
    jb 1b
    xor %r12, %r12
    jmp 1b
