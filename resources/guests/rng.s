# rng: vCPU 0 finds the first virtio-rng device among the allocated MMIO slots (from
# MMIO_DEVICES_END, one page each) and drives it as a polling virtio 1.x driver (tiny guests
# have no interrupt controller); other vCPUs park. Its queue and buffers are at the
# RNG_GUEST_* addresses of vmm/src/layout.rs.
#   1. Brings the device up: reset, ACKNOWLEDGE, DRIVER, VERSION_1 only, FEATURES_OK, queue 0
#      of RNG_GUEST_QUEUE_SIZE entries, DRIVER_OK.
#   2. For each of the argument's requests (RDX; 0 means 1, at most RNG_GUEST_QUEUE_SIZE),
#      one after the other: posts buffer i (RNG_GUEST_BUF_LEN bytes, device-writable) as
#      descriptor i, notifies, waits for its used entry and prints
#      "RNG      <FNV-1a 64 of the buffer>".
#   Exits 0, or 1 without a virtio-rng device, 2 if negotiation failed, 3 if the device used
#   another descriptor or filled fewer bytes than the buffer holds.
# Waits spin natively on the used ring (no VM exit), so a host-stepped device is in control.
    .include "common.inc"

    .include "virtio.inc"
    .set AVAIL, 0x400
    .set USED, 0x800

# Register use: r13 the device's registers, r12 requests left, r15 the next request's index.
    vcpu0_program
    mov %rdx, %r12                              # requests
    test %r12, %r12
    jnz 1f
    mov $1, %r12d
1:  cmp $RNG_GUEST_QUEUE_SIZE, %r12
    jbe 1f
    mov $RNG_GUEST_QUEUE_SIZE, %r12d
1:  find_virtio_device 4                     # entropy source

# --- 1. Bring up the device. ---
    mov $RNG_GUEST_QUEUE, %edi                  # the queue and the buffers start zeroed
    mov $((RNG_GUEST_BUFS + RNG_GUEST_QUEUE_SIZE * RNG_GUEST_BUF_LEN - RNG_GUEST_QUEUE) / 8), %ecx
    xor %eax, %eax
    rep stosq
    virtio_negotiate_version1
    xor %eax, %eax
    mov %eax, R_VIO_QUEUE_SEL(%r13)
    mov R_VIO_QUEUE_MAX(%r13), %eax
    cmp $RNG_GUEST_QUEUE_SIZE, %eax
    jb bad_features
    mov $RNG_GUEST_QUEUE_SIZE, %eax
    mov %eax, R_VIO_QUEUE_NUM(%r13)
    mov $RNG_GUEST_QUEUE, %eax
    mov %eax, R_VIO_DESC_LOW(%r13)
    mov $(RNG_GUEST_QUEUE + AVAIL), %eax
    mov %eax, R_VIO_AVAIL_LOW(%r13)
    mov $(RNG_GUEST_QUEUE + USED), %eax
    mov %eax, R_VIO_USED_LOW(%r13)
    mov $1, %eax
    mov %eax, R_VIO_QUEUE_READY(%r13)
    mov $(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK), %eax
    mov %eax, R_VIO_STATUS(%r13)

# --- 2. One request at a time: descriptor i = buffer i, avail ring[i] = i. ---
    xor %r15d, %r15d
next:
    test %r12, %r12
    jz done
    mov %r15d, %eax
    shl $4, %eax
    lea RNG_GUEST_QUEUE(%rax), %esi             # descriptor i
    mov %r15d, %eax
    imul $RNG_GUEST_BUF_LEN, %eax
    add $RNG_GUEST_BUFS, %eax
    mov %rax, (%rsi)                            # addr
    movl $RNG_GUEST_BUF_LEN, 8(%rsi)            # len
    movw $VIRTQ_DESC_F_WRITE, 12(%rsi)          # flags
    mov $(RNG_GUEST_QUEUE + AVAIL), %edi
    mov %r15w, 4(%rdi,%r15,2)                   # ring[i] = i
    lea 1(%r15d), %eax
    mov %ax, 2(%rdi)                            # idx = i + 1, after the entry
    xor %eax, %eax
    mov %eax, R_VIO_QUEUE_NOTIFY(%r13)
    mov $(RNG_GUEST_QUEUE + USED), %esi
    lea 1(%r15d), %ecx
1:  pause
    movzwl 2(%rsi), %eax
    cmp %ecx, %eax
    jne 1b
    mov 4(%rsi,%r15,8), %edx                    # used ring[i]: id, len
    mov 8(%rsi,%r15,8), %ecx
    cmp %r15d, %edx
    jne broken
    cmp $RNG_GUEST_BUF_LEN, %ecx
    jne broken
    mov %r15d, %eax
    imul $RNG_GUEST_BUF_LEN, %eax
    lea RNG_GUEST_BUFS(%rax), %esi
    mov $RNG_GUEST_BUF_LEN, %ecx
    call fnv1a64
    lea rng_msg(%rip), %rsi
    call print_line
    inc %r15d
    dec %r12
    jmp next

    driver_exits
    park_forever

    .include "print.inc"

rng_msg:        .ascii "RNG      "
