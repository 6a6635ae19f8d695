# net: vCPU 0 finds the first virtio-net device among the allocated MMIO slots (from
# MMIO_DEVICES_END, one page each) and drives it as a polling virtio 1.x driver (tiny guests
# have no interrupt controller); other vCPUs park. Queues and buffers are at the NET_GUEST_*
# addresses of vmm/src/layout.rs.
#   1. Brings the device up: reset, ACKNOWLEDGE, DRIVER, VERSION_1 only (no MAC, no offloads,
#      no mergeable buffers: a 12-byte header in front of every frame), FEATURES_OK, queue 0
#      (receive) and 1 (transmit) of NET_GUEST_QUEUE_SIZE entries, DRIVER_OK.
#   2. Posts every receive buffer (NET_GUEST_RX_BUF_LEN bytes each) and notifies queue 0.
#   3. Sends one 60-byte broadcast frame (ethertype 0x88b5, the VM id from VM_ID_ADDR as its
#      first payload bytes), waits for its used entry, prints "TX sent  <FNV-1a 64 of it>".
#   4. Waits for as many frames as the argument (RDX) says, at most NET_GUEST_QUEUE_SIZE, each
#      in the order the used ring gives them, and prints "RX frame <FNV-1a 64 of the frame
#      without the header>".
#   Exits 0, or 1 without a virtio-net device, 2 if negotiation failed, 3 if the device used
#   a receive buffer it was not given or for fewer than the header's bytes.
# Waits spin natively on the used rings (no VM exit), so a host-stepped device is in control.
    .include "common.inc"

    .include "virtio.inc"
    .set AVAIL, 0x400
    .set USED, 0x800
    .set HDR_LEN, 12
    .set FRAME_LEN, 60

# Register use: r13 the device's registers, r12 frames still to receive, r15 the next
# receive used-ring entry to read.

    vcpu0_program
    mov %rdx, %r12                              # frames to receive
    cmp $NET_GUEST_QUEUE_SIZE, %r12
    jbe 1f
    mov $NET_GUEST_QUEUE_SIZE, %r12d
1:  find_virtio_device 1                     # network card

# --- 1. Bring up the device. ---
    mov $NET_GUEST_RX_QUEUE, %edi               # both queues and the TX buffer start zeroed
    mov $((NET_GUEST_TX_BUF + 0x1000 - NET_GUEST_RX_QUEUE) / 8), %ecx
    xor %eax, %eax
    rep stosq
    virtio_negotiate_version1
    xor %ecx, %ecx                              # queue 0 (receive), then 1 (transmit)
    mov $NET_GUEST_RX_QUEUE, %esi
1:  mov %ecx, R_VIO_QUEUE_SEL(%r13)
    mov R_VIO_QUEUE_MAX(%r13), %eax
    cmp $NET_GUEST_QUEUE_SIZE, %eax
    jb bad_features
    mov $NET_GUEST_QUEUE_SIZE, %eax
    mov %eax, R_VIO_QUEUE_NUM(%r13)
    mov %esi, R_VIO_DESC_LOW(%r13)
    lea AVAIL(%rsi), %eax
    mov %eax, R_VIO_AVAIL_LOW(%r13)
    lea USED(%rsi), %eax
    mov %eax, R_VIO_USED_LOW(%r13)
    mov $1, %eax
    mov %eax, R_VIO_QUEUE_READY(%r13)
    add $(NET_GUEST_TX_QUEUE - NET_GUEST_RX_QUEUE), %esi
    inc %ecx
    cmp $2, %ecx
    jb 1b
    mov $(S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK), %eax
    mov %eax, R_VIO_STATUS(%r13)

# --- 2. Post every receive buffer: descriptor i = buffer i, avail ring[i] = i. ---
    xor %ecx, %ecx
    mov $NET_GUEST_RX_QUEUE, %esi
1:  mov %ecx, %eax
    imul $NET_GUEST_RX_BUF_LEN, %eax
    add $NET_GUEST_RX_BUFS, %eax
    mov %rax, (%rsi)                            # addr
    movl $NET_GUEST_RX_BUF_LEN, 8(%rsi)         # len
    movw $VIRTQ_DESC_F_WRITE, 12(%rsi)          # flags
    mov $(NET_GUEST_RX_QUEUE + AVAIL + 4), %edi
    mov %cx, (%rdi,%rcx,2)
    add $16, %esi
    inc %ecx
    cmp $NET_GUEST_QUEUE_SIZE, %ecx
    jb 1b
    mov $(NET_GUEST_RX_QUEUE + AVAIL), %edi
    movw $NET_GUEST_QUEUE_SIZE, 2(%rdi)         # idx, after the entries
    xor %eax, %eax
    mov %eax, R_VIO_QUEUE_NOTIFY(%r13)

# --- 3. Send one frame. ---
    mov $(NET_GUEST_TX_BUF + HDR_LEN), %edi
    movl $0xffffffff, (%rdi)                    # destination: broadcast
    movw $0xffff, 4(%rdi)
    movl $0x67795a02, 6(%rdi)                   # source 02:5a:79:67:00:01
    movw $0x0100, 10(%rdi)
    movw $0xb588, 12(%rdi)                      # ethertype 0x88b5 (local experimental)
    mov $VM_ID_ADDR, %esi
    mov (%rsi), %rax
    mov %rax, 14(%rdi)                          # payload: the VM id, then zeros
    mov $NET_GUEST_TX_QUEUE, %esi
    movq $NET_GUEST_TX_BUF, (%rsi)
    movl $(HDR_LEN + FRAME_LEN), 8(%rsi)
    mov $(NET_GUEST_TX_QUEUE + AVAIL), %edi
    movw $1, 2(%rdi)                            # ring[0] = head 0 (zeroed); idx = 1
    mov $1, %eax
    mov %eax, R_VIO_QUEUE_NOTIFY(%r13)
    mov $(NET_GUEST_TX_QUEUE + USED), %esi
1:  pause
    cmpw $1, 2(%rsi)
    jne 1b
    mov $(NET_GUEST_TX_BUF + HDR_LEN), %esi
    mov $FRAME_LEN, %ecx
    call fnv1a64
    lea tx_msg(%rip), %rsi
    call print_line

# --- 4. Receive. ---
    xor %r15d, %r15d
rx_next:
    test %r12, %r12
    jz done
    mov $(NET_GUEST_RX_QUEUE + USED), %esi
1:  pause
    movzwl 2(%rsi), %eax
    cmp %r15d, %eax
    je 1b
    mov %r15d, %eax                             # used ring[r15 % size]: id, len
    and $(NET_GUEST_QUEUE_SIZE - 1), %eax
    mov 4(%rsi,%rax,8), %edx                    # id: the descriptor, so the buffer
    mov 8(%rsi,%rax,8), %ecx                    # bytes written, header included
    cmp $NET_GUEST_QUEUE_SIZE, %edx
    jae broken
    cmp $HDR_LEN, %ecx
    jb broken
    sub $HDR_LEN, %ecx
    imul $NET_GUEST_RX_BUF_LEN, %edx
    lea (NET_GUEST_RX_BUFS + HDR_LEN)(%rdx), %rsi
    call fnv1a64
    lea rx_msg(%rip), %rsi
    call print_line
    inc %r15d
    dec %r12
    jmp rx_next

    driver_exits
    park_forever

    .include "print.inc"

tx_msg:         .ascii "TX sent  "
rx_msg:         .ascii "RX frame "
