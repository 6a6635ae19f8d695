# sequence: vCPU 0 prints RDX lines (16 if RDX = 0), each the 16 hex digits of an LCG state
# advanced 2^24 steps since the previous line, then exits 0; other vCPUs park. Deterministic:
# a run snapshotted and restored anywhere must print exactly what an uninterrupted run prints.
    .include "common.inc"
    vcpu0_program
    mov %rdx, %r12                  # lines left
    test %r12, %r12
    jnz 0f
    mov $16, %r12
0:  mov $1, %rax                    # LCG state
    mov $6364136223846793005, %r13  # multiplier (Knuth MMIX)
    mov $1442695040888963407, %r14  # increment
    mov $SERIAL_PORT, %dx
line:
    mov $(1 << 24), %ecx
1:  imul %r13, %rax
    add %r14, %rax
    dec %ecx
    jnz 1b
    mov %rax, %rbx                  # print rbx as 16 hex digits
    mov $16, %ecx
2:  rol $4, %rbx
    mov %ebx, %eax
    and $0xf, %eax
    lea hex(%rip), %rsi
    movb (%rsi,%rax), %al
    out %al, %dx
    dec %ecx
    jnz 2b
    mov $'\n', %al
    out %al, %dx
    mov %rbx, %rax                  # rol 16 times by 4: rbx is the state again
    dec %r12
    jnz line
    xor %eax, %eax
    exit_with_al
    park_forever
hex:
    .ascii "0123456789abcdef"
