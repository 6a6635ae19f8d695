# dma: vCPU 0 drives both MMIO devices the way a driver would, polling (tiny guests have no
# interrupt controller); other vCPUs park. Every address comes from vmm/src/layout.rs.
#   1. Brings up virtio-blk as a virtio 1.x driver: reset, ACKNOWLEDGE, DRIVER, features
#      (accepts VERSION_1 only), FEATURES_OK, queue 0 at fixed addresses, DRIVER_OK.
#   2. Programs the DMA engine to write DMA_GUEST_DMA_LEN bytes of DMA_GUEST_PATTERN to
#      DMA_GUEST_DMA_BUF, DMA_GUEST_DMA_CHUNK bytes per step, DMA_GUEST_DMA_PACING_US apart
#      (the argument, RDX, overrides the pacing if non-zero), and starts it.
#   3. Offers one read of the disk's first min(capacity, DMA_GUEST_BLK_LEN) bytes into
#      DMA_GUEST_BLK_BUF and notifies, so both devices write guest RAM at once.
#   4. Polls both completions: the DMA STATUS register and the used ring's index. Between
#      register reads it spins natively on memory, so a long transfer costs few MMIO exits.
#   5. Stores FNV-1a 64 of each buffer at DMA_GUEST_RESULTS_ADDR (+0 DMA, +8 disk; +16 bytes
#      read, +24 exit code), prints "DMA done <hex>" and "BLK done <hex>" ("BLK none" without
#      a disk; "DMA fail <code>" / "BLK fail <status>" on failure).
#   6. Only with DMA_GUEST_WRITE_ID set in the argument and the read done: writes one sector,
#      the VM id from VM_ID_ADDR (read now, so a clone writes its own) 64 times, at the disk's
#      last sector (stored at +32), and waits for it; silent, so the output stays the same.
#   It exits with bit 0 set if the DMA failed, bit 1 if the disk read failed, bit 2 if the
#   write failed.
# MMIO is accessed only with plain 32-bit mov loads and stores (what KVM emulates best).
    .include "common.inc"

    .include "dma_regs.inc"

    .include "virtio.inc"
    .set R_VIO_CONFIG,       0x100          # virtio-blk config: capacity (u64 sectors) first
    .set VIRTIO_BLK_T_IN, 0
    .set VIRTIO_BLK_T_OUT, 1

# Results (DMA_GUEST_RESULTS_ADDR + ...).
    .set RES_DMA_SUM, 0
    .set RES_BLK_SUM, 8
    .set RES_BLK_BYTES, 16
    .set RES_EXIT, 24
    .set RES_WRITE_SECTOR, 32

# The last u64 of the DMA buffer: the guest plants ~pattern there and watches it turn into the
# pattern, which happens only with the transfer's last chunk.
    .set DMA_SENTINEL, DMA_GUEST_DMA_BUF + DMA_GUEST_DMA_LEN - 8
# Native spins between two DMA STATUS reads (each read is a VM exit).
    .set SPIN_LIMIT, 0x10000

# Register use: r12 DMA registers, r13 virtio-blk registers, r14 exit code, rbx devices
# finished (bit 0 DMA, bit 1 BLK), rbp the DMA pattern, r9 the disk read's error value,
# r15 the argument's pacing (then the results address), r10 the whole argument.
    vcpu0_program
    mov %edx, %r15d                             # the argument: DMA pacing override (low 32 bits)
    mov %rdx, %r10                              # and flags (DMA_GUEST_WRITE_ID)
    xor %r14d, %r14d
    xor %ebx, %ebx
    movabs $DMA_ENGINE_MMIO_ADDR, %r12
    movabs $VIRTIO_BLK_MMIO_ADDR, %r13
    movabs $DMA_GUEST_PATTERN, %rbp

# --- 1. Bring up virtio-blk, without I/O yet. Its reset comes before the first DMA register
# access, and the read is offered after the DMA starts (tests/tests/devices_guest.rs relies on
# this order to hold the read back from the kernel). ---
blk_init:
    mov R_VIO_MAGIC(%r13), %eax                 # all ones without a device
    cmp $VIRTIO_MAGIC, %eax
    jne blk_absent
    mov R_VIO_VERSION(%r13), %eax
    cmp $2, %eax
    jne blk_failed
    mov R_VIO_DEVICE_ID(%r13), %eax
    cmp $2, %eax                                # block
    jne blk_failed
    # Queue memory starts zeroed: descriptors, both rings, the request.
    mov $DMA_GUEST_DESC_ADDR, %edi
    mov $((DMA_GUEST_REQ_ADDR + 0x1000 - DMA_GUEST_DESC_ADDR) / 8), %ecx
    xor %eax, %eax
    rep stosq
    mov %eax, R_VIO_STATUS(%r13)                # reset
    mov $S_ACKNOWLEDGE, %eax
    mov %eax, R_VIO_STATUS(%r13)
    mov $(S_ACKNOWLEDGE | S_DRIVER), %eax
    mov %eax, R_VIO_STATUS(%r13)
    mov $1, %eax
    mov %eax, R_VIO_DEV_FEAT_SEL(%r13)          # features 32..63
    mov R_VIO_DEV_FEAT(%r13), %eax
    test $1, %eax                               # VIRTIO_F_VERSION_1 (bit 32)
    jz blk_failed
    xor %eax, %eax
    mov %eax, R_VIO_DEV_FEAT_SEL(%r13)
    mov R_VIO_DEV_FEAT(%r13), %eax              # features 0..31: none needed
    mov $1, %eax
    mov %eax, R_VIO_DRV_FEAT_SEL(%r13)
    mov %eax, R_VIO_DRV_FEAT(%r13)              # accept VERSION_1
    xor %eax, %eax
    mov %eax, R_VIO_DRV_FEAT_SEL(%r13)
    mov %eax, R_VIO_DRV_FEAT(%r13)              # and nothing else
    mov $(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK), %eax
    mov %eax, R_VIO_STATUS(%r13)
    mov R_VIO_STATUS(%r13), %eax
    test $S_FEATURES_OK, %eax                   # the device keeps it only if it agrees
    jz blk_failed
    xor %eax, %eax
    mov %eax, R_VIO_QUEUE_SEL(%r13)
    mov R_VIO_QUEUE_MAX(%r13), %eax
    cmp $DMA_GUEST_QUEUE_SIZE, %eax
    jb blk_failed
    mov $DMA_GUEST_QUEUE_SIZE, %eax
    mov %eax, R_VIO_QUEUE_NUM(%r13)
    mov $DMA_GUEST_DESC_ADDR, %eax
    mov %eax, R_VIO_DESC_LOW(%r13)
    mov $DMA_GUEST_AVAIL_ADDR, %eax
    mov %eax, R_VIO_AVAIL_LOW(%r13)
    mov $DMA_GUEST_USED_ADDR, %eax
    mov %eax, R_VIO_USED_LOW(%r13)
    xor %eax, %eax
    mov %eax, R_VIO_DESC_HIGH(%r13)
    mov %eax, R_VIO_AVAIL_HIGH(%r13)
    mov %eax, R_VIO_USED_HIGH(%r13)
    mov $1, %eax
    mov %eax, R_VIO_QUEUE_READY(%r13)
    mov $(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK), %eax
    mov %eax, R_VIO_STATUS(%r13)
    mov R_VIO_STATUS(%r13), %eax
    and $(S_DRIVER_OK | S_NEEDS_RESET | S_FAILED), %eax
    cmp $S_DRIVER_OK, %eax
    jne blk_failed

    # Bytes to read: min(capacity * 512, DMA_GUEST_BLK_LEN).
    mov R_VIO_CONFIG(%r13), %eax
    mov R_VIO_CONFIG+4(%r13), %ecx
    shl $32, %rcx
    or %rcx, %rax
    shl $9, %rax
    mov $DMA_GUEST_BLK_LEN, %ecx
    cmp %rcx, %rax
    cmova %rcx, %rax
    mov $DMA_GUEST_RESULTS_ADDR, %edi
    mov %rax, RES_BLK_BYTES(%rdi)

    jmp dma_start

blk_absent:
    or $2, %ebx
    jmp dma_start
blk_failed:
    mov R_VIO_STATUS(%r13), %r9d                # report the device status
    or $0x1000, %r9d                            # (marked: not a request status byte)
    mov $S_FAILED, %eax
    mov %eax, R_VIO_STATUS(%r13)
    or $2, %ebx
    or $2, %r14d

    jmp dma_start

# --- 2. Start the DMA transfer. ---
dma_start:
    mov R_DMA_MAGIC(%r12), %eax
    cmp $DMA_MAGIC, %eax
    jne dma_failed_at_start
    mov %rbp, %rax
    not %rax
    mov $DMA_SENTINEL, %edi
    mov %rax, (%rdi)
    mov %ebp, %eax
    mov %eax, R_DMA_PATTERN_LOW(%r12)
    mov %rbp, %rax
    shr $32, %rax
    mov %eax, R_DMA_PATTERN_HIGH(%r12)
    mov $DMA_GUEST_DMA_BUF, %eax
    mov %eax, R_DMA_DST_LOW(%r12)
    xor %eax, %eax
    mov %eax, R_DMA_DST_HIGH(%r12)
    mov %eax, R_DMA_MODE(%r12)                  # source: the pattern
    mov $DMA_GUEST_DMA_LEN, %eax
    mov %eax, R_DMA_LEN(%r12)
    mov $DMA_GUEST_DMA_CHUNK, %eax
    mov %eax, R_DMA_CHUNK(%r12)
    mov $DMA_GUEST_DMA_PACING_US, %eax
    test %r15d, %r15d
    cmovnz %r15d, %eax
    mov %eax, R_DMA_PACING_US(%r12)
    mov $1, %eax
    mov %eax, R_DMA_CONTROL(%r12)               # go (a failed start sets STATUS.ERROR)
    jmp blk_submit
dma_failed_at_start:
    or $1, %ebx
    or $1, %r14d

# --- 3. Offer the disk read and notify: both devices now work at once. ---
blk_submit:
    test $2, %ebx                               # no device, or it failed to come up
    jnz wait
    mov $DMA_GUEST_RESULTS_ADDR, %edi
    mov RES_BLK_BYTES(%rdi), %rax
    # The request: header (IN, sector 0), data buffer, status byte; descriptors 0 -> 1 -> 2.
    mov $DMA_GUEST_REQ_ADDR, %edi               # header: type, reserved, sector all 0
    movb $0xff, 16(%rdi)                        # status: the device overwrites it
    mov $DMA_GUEST_DESC_ADDR, %esi              # descriptor: addr u64, len u32, flags u16, next u16
    mov %rdi, (%rsi)
    movl $16, 8(%rsi)
    movw $VIRTQ_DESC_F_NEXT, 12(%rsi)
    movw $1, 14(%rsi)
    movq $DMA_GUEST_BLK_BUF, 16(%rsi)
    mov %eax, 24(%rsi)
    movw $(VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE), 28(%rsi)
    movw $2, 30(%rsi)
    lea 16(%rdi), %rax
    mov %rax, 32(%rsi)
    movl $1, 40(%rsi)
    movw $VIRTQ_DESC_F_WRITE, 44(%rsi)
    mov $DMA_GUEST_AVAIL_ADDR, %esi             # avail: flags, idx, ring[]
    movw $0, 4(%rsi)                            # ring[0] = head 0
    movw $1, 2(%rsi)                            # idx = 1 (after the entry: x86 keeps store order)
    xor %eax, %eax
    mov %eax, R_VIO_QUEUE_NOTIFY(%r13)          # queue 0


# --- 4. Poll both completions. ---
wait:
    test $1, %ebx
    jnz 1f
    mov R_DMA_STATUS(%r12), %eax
    test $DMA_BUSY, %eax
    jnz 1f
    or $1, %ebx                                 # finished: DONE, or ERROR
    test $DMA_ERROR, %eax
    jnz 2f
    test $DMA_DONE, %eax
    jnz 1f
2:  or $1, %r14d
1:  test $2, %ebx
    jnz 1f
    mov $DMA_GUEST_USED_ADDR, %esi
    movzwl 2(%rsi), %eax                        # used idx
    test %eax, %eax
    jz 1f
    or $2, %ebx
    mov $DMA_GUEST_REQ_ADDR, %edi
    movzbl 16(%rdi), %r9d                       # VIRTIO_BLK_S_OK is 0
    mov 4(%rsi), %eax                           # used ring[0].id: our head, 0
    or %eax, %r9d
    test %r9d, %r9d
    jz 1f
    or $2, %r14d
1:  cmp $3, %ebx
    je report
    # Spin natively until the sentinel turns into the pattern or the used index moves, at most
    # SPIN_LIMIT times, then look at the registers again.
    mov $SPIN_LIMIT, %ecx
    mov $DMA_SENTINEL, %edi
    mov $DMA_GUEST_USED_ADDR, %esi
3:  pause
    cmp (%rdi), %rbp
    je wait
    cmpw $0, 2(%rsi)
    jne wait
    dec %ecx
    jnz 3b
    jmp wait

# --- 5. Checksums, report, exit. ---
report:
    mov $DMA_GUEST_RESULTS_ADDR, %r15d
    test $1, %r14d
    jnz dma_error
    mov R_DMA_INT_STATUS(%r12), %eax            # acknowledge the completion interrupt
    mov %eax, R_DMA_INT_ACK(%r12)
    mov $DMA_GUEST_DMA_BUF, %esi
    mov $DMA_GUEST_DMA_LEN, %ecx
    call fnv1a64
    mov %rax, RES_DMA_SUM(%r15)
    lea dma_done_msg(%rip), %rsi
    call print_line
    jmp blk_report
dma_error:
    mov R_DMA_ERROR(%r12), %eax
    lea dma_error_msg(%rip), %rsi
    call print_line

blk_report:
    test $2, %r14d
    jnz blk_error
    mov R_VIO_MAGIC(%r13), %eax
    cmp $VIRTIO_MAGIC, %eax
    je 1f
    lea blk_none_msg(%rip), %rsi
    mov $blk_none_len, %ecx
    call puts
    jmp finish
1:  mov R_VIO_INT_STATUS(%r13), %eax            # acknowledge the used-ring interrupt
    mov %eax, R_VIO_INT_ACK(%r13)
    mov $DMA_GUEST_BLK_BUF, %esi
    mov RES_BLK_BYTES(%r15), %rcx
    call fnv1a64
    mov %rax, RES_BLK_SUM(%r15)
    lea blk_done_msg(%rip), %rsi
    call print_line
    jmp blk_write
blk_error:
    mov %r9, %rax
    lea blk_error_msg(%rip), %rsi
    call print_line

# --- 6. With DMA_GUEST_WRITE_ID: the VM id to the disk's last sector (descriptors 3 -> 4 -> 5,
# the second entry of the available ring). ---
blk_write:
    movabs $DMA_GUEST_WRITE_ID, %rax
    test %rax, %r10
    jz finish
    mov R_VIO_CONFIG(%r13), %eax                # capacity in sectors
    mov R_VIO_CONFIG+4(%r13), %ecx
    shl $32, %rcx
    or %rcx, %rax
    test %rax, %rax
    jz finish
    dec %rax
    mov %rax, RES_WRITE_SECTOR(%r15)
    mov $DMA_GUEST_WRITE_REQ_ADDR, %edi         # header: OUT, reserved, sector
    movl $VIRTIO_BLK_T_OUT, (%rdi)
    movl $0, 4(%rdi)
    mov %rax, 8(%rdi)
    movb $0xff, 16(%rdi)                        # status: the device overwrites it
    mov $VM_ID_ADDR, %esi
    mov (%rsi), %rax
    add $0x100, %edi                            # the sector: the id, 64 times
    mov $64, %ecx
    rep stosq
    mov $(DMA_GUEST_DESC_ADDR + 3 * 16), %esi
    movq $DMA_GUEST_WRITE_REQ_ADDR, (%rsi)
    movl $16, 8(%rsi)
    movw $VIRTQ_DESC_F_NEXT, 12(%rsi)
    movw $4, 14(%rsi)
    movq $(DMA_GUEST_WRITE_REQ_ADDR + 0x100), 16(%rsi)
    movl $512, 24(%rsi)
    movw $VIRTQ_DESC_F_NEXT, 28(%rsi)           # the device reads it
    movw $5, 30(%rsi)
    movq $(DMA_GUEST_WRITE_REQ_ADDR + 16), 32(%rsi)
    movl $1, 40(%rsi)
    movw $VIRTQ_DESC_F_WRITE, 44(%rsi)
    mov $DMA_GUEST_AVAIL_ADDR, %esi
    movw $3, 6(%rsi)                            # ring[1] = head 3
    movw $2, 2(%rsi)                            # idx = 2, after the entry
    xor %eax, %eax
    mov %eax, R_VIO_QUEUE_NOTIFY(%r13)
    mov $DMA_GUEST_USED_ADDR, %esi
1:  mov $SPIN_LIMIT, %ecx
2:  pause
    cmpw $2, 2(%rsi)
    je 3f
    dec %ecx
    jnz 2b
    mov R_VIO_STATUS(%r13), %eax                # a broken device never completes it
    test $(S_NEEDS_RESET | S_FAILED), %eax
    jz 1b
    or $4, %r14d
    jmp finish
3:  mov $DMA_GUEST_WRITE_REQ_ADDR, %edi
    cmpb $0, 16(%rdi)                           # VIRTIO_BLK_S_OK
    je 4f
    or $4, %r14d
4:  mov R_VIO_INT_STATUS(%r13), %eax            # acknowledge the used-ring interrupt
    mov %eax, R_VIO_INT_ACK(%r13)

finish:
    mov %r14, RES_EXIT(%r15)
    mov %r14d, %eax
    exit_with_al
    park_forever

    .include "print.inc"

dma_done_msg:   .ascii "DMA done "
dma_error_msg:  .ascii "DMA fail "
blk_done_msg:   .ascii "BLK done "
blk_error_msg:  .ascii "BLK fail "
blk_none_msg:   .ascii "BLK none\n"
    blk_none_len = . - blk_none_msg
