//! The DMA engine's register offsets (32-bit registers; 64-bit values as LOW/HIGH pairs).

/// Bytes of MMIO space the engine occupies.
pub const DMA_REGION_SIZE: u64 = 0x1000;
/// Reads as "DMAE".
pub const DMA_MAGIC: u32 = 0x4541_4d44;

pub const DMA_REG_MAGIC: u64 = 0x00;
pub const DMA_REG_SRC_LOW: u64 = 0x08;
pub const DMA_REG_SRC_HIGH: u64 = 0x0c;
pub const DMA_REG_PATTERN_LOW: u64 = 0x10;
pub const DMA_REG_PATTERN_HIGH: u64 = 0x14;
pub const DMA_REG_DST_LOW: u64 = 0x18;
pub const DMA_REG_DST_HIGH: u64 = 0x1c;
pub const DMA_REG_LEN: u64 = 0x20;
pub const DMA_REG_CHUNK: u64 = 0x24;
/// Microseconds between chunks; saturates at `MAX_PACING_US` (reads back the cap).
pub const DMA_REG_PACING_US: u64 = 0x28;
/// 0: source is the pattern; 1: source is guest memory at SRC.
pub const DMA_REG_MODE: u64 = 0x2c;
/// Write 1 to start the programmed transfer.
pub const DMA_REG_CONTROL: u64 = 0x30;
/// Bit 0 busy, bit 1 done, bit 2 error.
pub const DMA_REG_STATUS: u64 = 0x34;
/// Bytes of the current (or last) transfer done.
pub const DMA_REG_PROGRESS: u64 = 0x38;
pub const DMA_REG_INT_STATUS: u64 = 0x3c;
pub const DMA_REG_INT_ACK: u64 = 0x40;
/// Why the last start failed (`DmaError::code`), 0 if it did not.
pub const DMA_REG_ERROR: u64 = 0x44;

pub const DMA_STATUS_BUSY: u32 = 1;
pub const DMA_STATUS_DONE: u32 = 2;
pub const DMA_STATUS_ERROR: u32 = 4;
pub const DMA_MODE_PATTERN: u32 = 0;
pub const DMA_MODE_COPY: u32 = 1;
