//! The DMA engine programmed through its registers, stepped deterministically, and in the
//! background.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use memory::Bytes;

use super::*;
use crate::dma::{DmaRunner, MAX_PACING_US};

fn ram() -> Arc<GuestRam> {
    Arc::new(GuestRam::new(&[(GuestAddress(0), 1 << 20)]).unwrap())
}

fn reg(engine: &mut DmaEngine, offset: u64, value: u32) {
    engine.write(offset, &value.to_le_bytes());
}

fn read(engine: &mut DmaEngine, offset: u64) -> u32 {
    let mut data = [0u8; 4];
    engine.read(offset, &mut data);
    u32::from_le_bytes(data)
}

fn program(engine: &mut DmaEngine, dst: u64, len: u32, chunk: u32) {
    reg(engine, DMA_REG_DST_LOW, dst as u32);
    reg(engine, DMA_REG_DST_HIGH, (dst >> 32) as u32);
    reg(engine, DMA_REG_LEN, len);
    reg(engine, DMA_REG_CHUNK, chunk);
}

#[test]
fn a_pattern_transfer_steps_chunk_by_chunk_then_interrupts() {
    let ram = ram();
    let mut engine = DmaEngine::new(Arc::clone(&ram), DeviceInterrupt::polled());
    assert_eq!(read(&mut engine, DMA_REG_MAGIC), DMA_MAGIC);
    reg(&mut engine, DMA_REG_PATTERN_LOW, 0x0403_0201);
    reg(&mut engine, DMA_REG_PATTERN_HIGH, 0x0807_0605);
    program(&mut engine, 0x8000, 10_000, 4096);
    reg(&mut engine, DMA_REG_CONTROL, 1);
    assert_eq!(read(&mut engine, DMA_REG_STATUS), DMA_STATUS_BUSY);
    assert!(engine.step());
    assert_eq!(read(&mut engine, DMA_REG_PROGRESS), 4096);
    assert_eq!(ram.read_obj::<u8>(GuestAddress(0x8000 + 4096)).unwrap(), 0, "second chunk not yet written");
    assert_eq!(read(&mut engine, DMA_REG_INT_STATUS), 0);
    engine.run_to_completion();
    assert_eq!(read(&mut engine, DMA_REG_STATUS), DMA_STATUS_DONE);
    assert_eq!(read(&mut engine, DMA_REG_INT_STATUS), INT_USED_RING);
    let mut out = vec![0u8; 10_001];
    ram.read_slice(&mut out, GuestAddress(0x8000)).unwrap();
    assert!(out[..10_000].iter().enumerate().all(|(i, &b)| b == (i % 8) as u8 + 1));
    assert_eq!(out[10_000], 0, "not a byte past the end");
    reg(&mut engine, DMA_REG_INT_ACK, INT_USED_RING);
    assert_eq!(read(&mut engine, DMA_REG_INT_STATUS), 0);
}

#[test]
fn a_copy_transfer_moves_guest_bytes() {
    let ram = ram();
    ram.write_slice(b"hello, dma", GuestAddress(0x1000)).unwrap();
    let mut engine = DmaEngine::new(Arc::clone(&ram), DeviceInterrupt::polled());
    reg(&mut engine, DMA_REG_SRC_LOW, 0x1000);
    reg(&mut engine, DMA_REG_MODE, DMA_MODE_COPY);
    program(&mut engine, 0x5000, 10, 3);
    reg(&mut engine, DMA_REG_CONTROL, 1);
    engine.run_to_completion();
    let mut out = [0u8; 10];
    ram.read_slice(&mut out, GuestAddress(0x5000)).unwrap();
    assert_eq!(&out, b"hello, dma");
}

#[test]
fn bad_programs_set_the_error_register() {
    let ram = ram();
    let mut engine = DmaEngine::new(Arc::clone(&ram), DeviceInterrupt::polled());
    for (dst, len, chunk, code) in
        [(0x8000, 0, 16, 2), (0x8000, 16, 0, 2), ((1 << 20) - 8, 16, 16, 4), (u64::MAX - 4, 16, 16, 4)]
    {
        program(&mut engine, dst, len, chunk);
        reg(&mut engine, DMA_REG_CONTROL, 1);
        assert_eq!(
            (read(&mut engine, DMA_REG_ERROR), read(&mut engine, DMA_REG_STATUS)),
            (code, DMA_STATUS_ERROR),
            "{dst:#x}"
        );
    }
    reg(&mut engine, DMA_REG_SRC_LOW, 0x8008);
    program(&mut engine, 0x8000, 64, 16);
    reg(&mut engine, DMA_REG_CONTROL, 1);
    assert_eq!(read(&mut engine, DMA_REG_ERROR), 3, "overlapping copy");
    reg(&mut engine, DMA_REG_MODE, DMA_MODE_PATTERN);
    reg(&mut engine, DMA_REG_CONTROL, 1);
    reg(&mut engine, DMA_REG_CONTROL, 1);
    assert_eq!(read(&mut engine, DMA_REG_ERROR), 1, "busy");
    assert!(engine.busy(), "the first transfer goes on");
    assert!(!ram.has_pinned() || engine.busy());
}

#[test]
fn the_runner_finishes_transfers_in_the_background() {
    let ram = ram();
    let engine = Arc::new(Mutex::new(DmaEngine::new(Arc::clone(&ram), DeviceInterrupt::polled())));
    let _runner = DmaRunner::spawn(Arc::clone(&engine)).unwrap();
    let spec =
        TransferSpec { source: DmaSource::Pattern(u64::MAX), dst: 0x4000, len: 8192, chunk: 1024, pacing_us: 100 };
    engine.lock().unwrap().start(spec).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while engine.lock().unwrap().busy() {
        assert!(Instant::now() < deadline, "transfer did not finish");
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(ram.read_obj::<u64>(GuestAddress(0x4000 + 8184)).unwrap(), u64::MAX);
}

#[test]
fn a_host_stepped_engine_moves_only_when_stepped_and_its_clone_inherits_that() {
    let ram = ram();
    let engine = Arc::new(Mutex::new(DmaEngine::new(Arc::clone(&ram), DeviceInterrupt::polled())));
    let _runner = DmaRunner::spawn(Arc::clone(&engine)).unwrap();
    let spec = TransferSpec { source: DmaSource::Pattern(u64::MAX), dst: 0x4000, len: 8192, chunk: 1024, pacing_us: 0 };
    {
        let mut e = engine.lock().unwrap();
        e.set_host_stepped(true);
        e.start(spec).unwrap();
    }
    // The start rang the runner's doorbell: give it time to (wrongly) step. A negative check:
    // a loaded host can only make it pass for the wrong reason, never fail.
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(engine.lock().unwrap().progress(), 0, "the runner stepped a host-stepped transfer");
    assert!(engine.lock().unwrap().step());
    assert_eq!(engine.lock().unwrap().progress(), 1024);
    let state = engine.lock().unwrap().state();
    assert!(state.host_stepped);
    let clone_ram = Arc::new(ram.clone_cow().unwrap());
    let clone = Arc::new(Mutex::new(
        DmaEngine::restore(DmaArgs { ram: clone_ram, interrupt: DeviceInterrupt::polled() }, &state).unwrap(),
    ));
    let _clone_runner = DmaRunner::spawn(Arc::clone(&clone)).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    assert_eq!(clone.lock().unwrap().progress(), 0, "the clone's runner stepped its restarted transfer");
    assert!(clone.lock().unwrap().busy());
}

#[test]
fn pacing_is_capped_in_the_register_at_start_and_at_restore() {
    let ram = ram();
    let mut engine = DmaEngine::new(Arc::clone(&ram), DeviceInterrupt::polled());
    reg(&mut engine, DMA_REG_PACING_US, u32::MAX);
    assert_eq!(u64::from(read(&mut engine, DMA_REG_PACING_US)), MAX_PACING_US, "the register saturates");
    program(&mut engine, 0x8000, 64, 16);
    reg(&mut engine, DMA_REG_CONTROL, 1);
    assert_eq!((read(&mut engine, DMA_REG_ERROR), engine.pacing_us()), (0, MAX_PACING_US));
    engine.run_to_completion();

    let too_slow =
        TransferSpec { source: DmaSource::Pattern(1), dst: 0x8000, len: 64, chunk: 16, pacing_us: MAX_PACING_US + 1 };
    let err = engine.start(too_slow).unwrap_err();
    assert_eq!(err.code(), 5);
    assert!(err.to_string().contains(&(MAX_PACING_US + 1).to_string()), "{err}");
    assert!(!engine.busy() && ram.stats().pinned_pages == 0);

    // A snapshot is input: a saved pacing above the cap, programmed or in flight, is refused
    // before anything is restored (nothing pinned).
    let good = engine.state();
    for state in [
        DmaState { programmed: TransferSpec { pacing_us: 1 << 40, ..good.programmed }, ..good.clone() },
        DmaState { in_flight: Some(TransferSpec { pacing_us: u64::MAX, ..too_slow }), ..good.clone() },
    ] {
        let err = DmaEngine::restore(DmaArgs { ram: Arc::clone(&ram), interrupt: DeviceInterrupt::polled() }, &state)
            .unwrap_err();
        assert!(matches!(err, DmaError::Pacing { .. }), "{err}");
        assert_eq!(ram.stats().pinned_pages, 0);
    }
    assert!(DmaEngine::restore(DmaArgs { ram, interrupt: DeviceInterrupt::polled() }, &good).is_ok());
}

#[test]
fn a_runner_dropped_mid_transfer_at_the_longest_pacing_leaves_the_rest_undone() {
    let ram = ram();
    let engine = Arc::new(Mutex::new(DmaEngine::new(Arc::clone(&ram), DeviceInterrupt::polled())));
    let runner = DmaRunner::spawn(Arc::clone(&engine)).unwrap();
    let spec =
        TransferSpec { source: DmaSource::Pattern(7), dst: 0x4000, len: 1 << 16, chunk: 1, pacing_us: MAX_PACING_US };
    engine.lock().unwrap().start(spec).unwrap();
    // Stopping wakes the runner's pause (doorbell tests prove it with an hour-long sleep); the
    // transfer, 65536 chunks 100 ms apart, is still in flight and still pinned.
    drop(runner);
    let engine = engine.lock().unwrap();
    assert!(engine.busy() && engine.progress() < spec.len && ram.stats().pinned_pages > 0);
}
