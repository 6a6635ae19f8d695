# mailbox: vCPU 0 executes commands the VMM leaves in the mailbox at MAILBOX_ADDR, one at a
# time, and acknowledges each; other vCPUs park. The fuzzer's guest: between two commands it
# writes nothing at all, so what a paused VM holds never depends on when its vCPU ran.
# Mailbox (u64 fields): +0 sequence number (the VMM writes it last, with the VM paused),
# +8 op, +16 address, +24 length, +32 value, +40 chunk; +64 the last sequence number done.
#   op 1 fill:  writes `length` bytes of the low byte of `value` at `address` (vCPU writes).
#   op 2 dma:   programs the DMA engine for a pattern transfer of `length` bytes of `value`
#               to `address`, `chunk` bytes per step, and starts it (plain 32-bit MMIO).
#   op 3 copy:  the same, copying from guest memory at `value` instead of a pattern.
# Unknown ops are acknowledged and do nothing. No stack, no calls: only the command's bytes
# and the acknowledgement change.
    .include "common.inc"

    .set MB_SEQ, 0
    .set MB_OP, 8
    .set MB_ADDR, 16
    .set MB_LEN, 24
    .set MB_VALUE, 32
    .set MB_CHUNK, 40
    .set MB_ACK, 64
    .set OP_FILL, 1
    .set OP_DMA, 2
    .set OP_COPY, 3

    .include "dma_regs.inc"

# r15: the last sequence number done; rbx: the mailbox; r12: the DMA engine's registers.
    vcpu0_program
    mov $MAILBOX_ADDR, %ebx
    movabs $DMA_ENGINE_MMIO_ADDR, %r12
    mov MB_ACK(%rbx), %r15
poll:
    pause
    mov MB_SEQ(%rbx), %rax
    cmp %rax, %r15
    je poll
    mov MB_OP(%rbx), %rax
    cmp $OP_FILL, %rax
    je fill
    cmp $OP_DMA, %rax
    je dma
    cmp $OP_COPY, %rax
    je copy
    jmp done

fill:
    mov MB_ADDR(%rbx), %rdi
    mov MB_LEN(%rbx), %rcx
    mov MB_VALUE(%rbx), %rax
    rep stosb
    jmp done

copy:
    mov MB_VALUE(%rbx), %rax                    # writing SRC selects a guest-memory source
    mov %eax, R_DMA_SRC_LOW(%r12)
    shr $32, %rax
    mov %eax, R_DMA_SRC_HIGH(%r12)
    mov $1, %eax
    mov %eax, R_DMA_MODE(%r12)
    jmp program

dma:
    xor %eax, %eax
    mov %eax, R_DMA_MODE(%r12)                  # source: the pattern
    mov MB_VALUE(%rbx), %rax
    mov %eax, R_DMA_PATTERN_LOW(%r12)
    shr $32, %rax
    mov %eax, R_DMA_PATTERN_HIGH(%r12)

program:
    xor %eax, %eax
    mov %eax, R_DMA_PACING_US(%r12)
    mov MB_ADDR(%rbx), %rax
    mov %eax, R_DMA_DST_LOW(%r12)
    shr $32, %rax
    mov %eax, R_DMA_DST_HIGH(%r12)
    mov MB_LEN(%rbx), %rax
    mov %eax, R_DMA_LEN(%r12)
    mov MB_CHUNK(%rbx), %rax
    mov %eax, R_DMA_CHUNK(%r12)
    mov $1, %eax
    mov %eax, R_DMA_CONTROL(%r12)               # go

done:
    mov MB_SEQ(%rbx), %r15
    mov %r15, MB_ACK(%rbx)                      # after the command's stores (x86 keeps order)
    jmp poll
    park_forever
