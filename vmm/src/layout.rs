//! The tiny guests' memory layout and I/O ports: the one place these numbers live.
//!
//! Guest RAM is identity-mapped (virtual = physical), so these are both guest-physical and
//! guest-virtual addresses. `build.rs` includes this file too and hands the values to the
//! assembler, so the guests in `resources/guests/` can never disagree with the VMM.
//! Everything here is plain `u64`/`u16` constants: no imports (build.rs compiles it standalone).

/// Global descriptor table (see `longmode::write_gdt` for its entries).
pub const GDT_ADDR: u64 = 0x1000;
/// Interrupt descriptor table: one gate per exception vector.
pub const IDT_ADDR: u64 = 0x2000;
/// Task-state segment, followed by its all-zero I/O permission bitmap and the 0xff terminator.
pub const TSS_ADDR: u64 = 0x3000;
/// Exception stubs (`resources/guests/traps.S`), `TRAP_STUB_SIZE` bytes per vector.
pub const TRAPS_ADDR: u64 = 0x6000;
/// Stride of the exception stubs; `traps.S` aligns each stub to it.
pub const TRAP_STUB_SIZE: u64 = 32;
/// Top of the CPL0 stack the CPU switches to on an exception (TSS.RSP0 and IST1).
pub const TRAP_STACK_TOP: u64 = 0x8000;
/// Page-map level 4 table.
pub const PML4_ADDR: u64 = 0x9000;
/// Page-directory-pointer table (covers 512 GiB).
pub const PDPT_ADDR: u64 = 0xA000;
/// First page directory; one 4 KiB directory per GiB of mapped guest-physical space.
pub const PD_ADDR: u64 = 0xB000;
/// Upper bound of the page directories (room for 68 GiB of identity map).
pub const PD_END: u64 = 0x5_0000;

/// Where a guest's flat binary is loaded; also its entry point.
pub const GUEST_CODE_ADDR: u64 = 0x10_0000;
/// Largest guest binary.
pub const GUEST_CODE_MAX: u64 = 0x1_0000;
/// Per-vCPU u64 counters that `spin` increments: vCPU i's is at `COUNTERS_ADDR + 8 * i`.
pub const COUNTERS_ADDR: u64 = 0x11_0000;
/// The VM id mailbox: the VMM writes the VM's id here at build and a new id into a clone, and
/// `spin` reads it on every iteration (RDI holds the id only at entry).
pub const VM_ID_ADDR: u64 = 0x11_1000;
/// vCPU i of `spin` keeps the 4 KiB page at `PATTERN_ADDR + i * PATTERN_SIZE` filled with the VM
/// id (u64 per slot), so clones can be told apart and no VM may see another's id there.
pub const PATTERN_ADDR: u64 = 0x12_0000;
/// Size of one vCPU's pattern page.
pub const PATTERN_SIZE: u64 = 0x1000;
/// `dirty16` writes one u64 into each of `DIRTY_PAGES` pages from here, then exits.
pub const DIRTY_ADDR: u64 = 0x14_0000;
/// Pages `dirty16` writes per run.
pub const DIRTY_PAGES: u64 = 16;
/// `spin --arg N` also writes one page of N from here per iteration, round robin (the clone
/// bench's dirty working set). The RAM must extend past `TOUCH_ADDR + N * 4096`.
pub const TOUCH_ADDR: u64 = 0x100_0000;
/// vCPU i starts with RSP = `STACKS_TOP - i * STACK_SIZE`.
pub const STACKS_TOP: u64 = 0x20_0000;
/// Size of each vCPU's user stack.
pub const STACK_SIZE: u64 = 0x4000;
/// An address no identity map covers (the map ends at 68 GiB): `fault --arg 1` reads it.
pub const UNMAPPED_ADDR: u64 = 0x40_0000_0000;
/// Smallest RAM a tiny guest runs in: everything above must fit.
pub const MIN_RAM: u64 = 0x20_0000;

/// RAM above this guest-physical address is placed above 4 GiB, leaving a hole for MMIO.
pub const MMIO_GAP_START: u64 = 0xC000_0000;
/// Start of the RAM that did not fit below `MMIO_GAP_START`.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;

/// virtio-blk's virtio-mmio registers (one 4 KiB page, in the MMIO gap below 4 GiB).
pub const VIRTIO_BLK_MMIO_ADDR: u64 = 0xD000_0000;
/// virtio-blk's interrupt line (for the kernel command line; tiny guests poll).
pub const VIRTIO_BLK_IRQ: u32 = 5;
/// The DMA test engine's registers (one 4 KiB page).
pub const DMA_ENGINE_MMIO_ADDR: u64 = 0xD000_1000;
/// The DMA test engine's interrupt line (tiny guests poll).
pub const DMA_ENGINE_IRQ: u32 = 6;
/// End of the MMIO device pages: the tiny guests' identity map also covers the 2 MiB page(s)
/// holding `VIRTIO_BLK_MMIO_ADDR..MMIO_DEVICES_END`, so CPL3 code can reach the registers.
pub const MMIO_DEVICES_END: u64 = DMA_ENGINE_MMIO_ADDR + 0x1000;

// The `dma` guest (resources/guests/dma.s): where it puts its virtio queue, its buffers and
// its results. All below `DMA_GUEST_MIN_RAM`, clear of everything above.
/// Its virtio-blk queue size (a power of two; the device allows up to 256).
pub const DMA_GUEST_QUEUE_SIZE: u64 = 8;
/// Its virtio-blk descriptor table (16-byte aligned).
pub const DMA_GUEST_DESC_ADDR: u64 = 0x15_0000;
/// Its virtio-blk available ring.
pub const DMA_GUEST_AVAIL_ADDR: u64 = 0x15_1000;
/// Its virtio-blk used ring.
pub const DMA_GUEST_USED_ADDR: u64 = 0x15_2000;
/// Its virtio-blk request header (16 bytes); the status byte follows at +16.
pub const DMA_GUEST_REQ_ADDR: u64 = 0x15_3000;
/// Its results: u64 FNV-1a 64 of the DMA buffer at +0, of the bytes read from disk at +8, the
/// number of bytes read at +16, the exit code at +24, and (with `DMA_GUEST_WRITE_ID`) the
/// sector it wrote its id to at +32.
pub const DMA_GUEST_RESULTS_ADDR: u64 = 0x15_4000;
/// Where the DMA engine writes its pattern transfer.
pub const DMA_GUEST_DMA_BUF: u64 = 0x40_0000;
/// Length of the DMA transfer (1 MiB).
pub const DMA_GUEST_DMA_LEN: u64 = 0x10_0000;
/// Bytes the engine writes per step.
pub const DMA_GUEST_DMA_CHUNK: u64 = 0x1000;
/// Pause between steps in microseconds (unless `--arg` gives another): 256 chunks take >= 256 ms.
pub const DMA_GUEST_DMA_PACING_US: u64 = 1000;
/// The engine's source: these 8 little-endian bytes, repeated.
pub const DMA_GUEST_PATTERN: u64 = 0x5a17_c0de_d00d_f00d;
/// Where virtio-blk reads the disk's first sectors.
pub const DMA_GUEST_BLK_BUF: u64 = 0x50_0000;
/// Most bytes read from the disk (one 64 KiB segment, the device's `size_max`); less if the
/// disk is smaller.
pub const DMA_GUEST_BLK_LEN: u64 = 0x1_0000;
/// Set in the `dma` guest's argument: after both devices finish, it also writes one sector, its
/// VM id (read from `VM_ID_ADDR` then) repeated, at the disk's last sector, so every VM's disk
/// diverges from its clones'. The argument's low 32 bits stay the pacing override.
pub const DMA_GUEST_WRITE_ID: u64 = 1 << 32;
/// Where the `dma` guest builds that write: header at +0, status byte at +16, the sector's data
/// at +0x100 (one page, clear of the read request at `DMA_GUEST_REQ_ADDR`).
pub const DMA_GUEST_WRITE_REQ_ADDR: u64 = 0x15_5000;
/// RAM the `dma` guest needs.
pub const DMA_GUEST_MIN_RAM: u64 = DMA_GUEST_BLK_BUF + DMA_GUEST_BLK_LEN;

/// The `mailbox` guest's command mailbox (one page; see resources/guests/mailbox.s).
pub const MAILBOX_ADDR: u64 = 0x15_8000;

/// 16550 UART (COM1).
pub const SERIAL_PORT: u16 = 0x3f8;
/// The guest writes one byte here: its exit code; the VM stops with it.
pub const EXIT_PORT: u16 = 0x501;
/// A vCPU with nothing to do writes here and is parked (never run again) until the VM ends.
pub const PARK_PORT: u16 = 0x502;
/// The exception stubs write the vector number here (32 bits); the VM stops with a fault report.
pub const TRAP_PORT: u16 = 0x503;
/// i8042 keyboard controller data and command ports.
pub const I8042_DATA_PORT: u16 = 0x60;
/// Writing 0xfe here is the guest asking for a reset.
pub const I8042_COMMAND_PORT: u16 = 0x64;

// The `rng` tiny guest (resources/guests/rng.s): its virtio-rng queue and buffers, clear of
// the `net` and `dma` guests' pages. Its argument (RDX): the number of requests, one after the
// other (0 means 1, at most `RNG_GUEST_QUEUE_SIZE`).
/// Its queue size.
pub const RNG_GUEST_QUEUE_SIZE: u64 = 8;
/// Its queue: descriptors here, available ring at +0x400, used ring at +0x800.
pub const RNG_GUEST_QUEUE: u64 = 0x16_3000;
/// Request i's buffer: `RNG_GUEST_BUF_LEN` bytes at `RNG_GUEST_BUFS + i * RNG_GUEST_BUF_LEN`.
pub const RNG_GUEST_BUFS: u64 = 0x16_4000;
pub const RNG_GUEST_BUF_LEN: u64 = 0x100;

// The `net` tiny guest (resources/guests/net.s): its virtio-net queues and buffers, below
// `DMA_GUEST_MIN_RAM` and clear of the `dma` guest's pages. Its argument (RDX): the number of
// frames to receive (at most `NET_GUEST_QUEUE_SIZE`).
/// Queue size of both queues.
pub const NET_GUEST_QUEUE_SIZE: u64 = 8;
/// Receive queue: descriptors here, available ring at +0x400, used ring at +0x800.
pub const NET_GUEST_RX_QUEUE: u64 = 0x16_0000;
/// Transmit queue, laid out the same way.
pub const NET_GUEST_TX_QUEUE: u64 = 0x16_1000;
/// The one frame the guest sends: a 12-byte virtio-net header, then 60 bytes of frame.
pub const NET_GUEST_TX_BUF: u64 = 0x16_2000;
/// Receive buffers: `NET_GUEST_QUEUE_SIZE` of `NET_GUEST_RX_BUF_LEN` bytes, one per descriptor.
pub const NET_GUEST_RX_BUFS: u64 = 0x17_0000;
pub const NET_GUEST_RX_BUF_LEN: u64 = 0x800;
