//! The DMA test engine in a VM: `devices::dma::DmaEngine` on its fixed MMIO slot, with the
//! runner thread that moves its transfers in the background.

use std::sync::{Arc, Mutex};

use devices::dma::{DmaArgs, DmaEngine, DmaRunner, DmaState, DMA_REGION_SIZE};
use devices::Persist;

use super::device::{
    AttachConfig, CaptureMode, Captured, DeviceDescription, DeviceHost, DeviceMetrics, ResetArgs, RestoreArgs, VmDevice,
};
use super::mmio::{device_interrupt, DeviceSpace, MmioSlot};
use super::DeviceError;
use crate::layout::{DMA_ENGINE_IRQ, DMA_ENGINE_MMIO_ADDR};

/// The engine on the bus, and its runner.
pub struct DmaSlot {
    pub engine: Arc<Mutex<DmaEngine>>,
    metrics: Arc<devices::metrics::DmaMetrics>,
    _runner: DmaRunner,
}

const SLOT: MmioSlot = MmioSlot { base: DMA_ENGINE_MMIO_ADDR, size: DMA_REGION_SIZE, gsi: DMA_ENGINE_IRQ };

impl DmaSlot {
    fn plug(space: &mut DeviceSpace, engine: DmaEngine) -> Result<DmaSlot, DeviceError> {
        let metrics = Arc::clone(engine.metrics());
        let engine = Arc::new(Mutex::new(engine));
        space.insert_mmio(SLOT, engine.clone())?;
        let _runner = DmaRunner::spawn_with(Arc::clone(&engine), crate::seccomp::dma_thread_start)
            .map_err(DeviceError::Thread)?;
        Ok(DmaSlot { engine, metrics, _runner })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DmaEngine> {
        self.engine.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl VmDevice for DmaSlot {
    const KIND: &'static str = "dma-engine";
    const FIXED_SLOT: Option<MmioSlot> = Some(SLOT);
    type State = DmaState;

    /// Every VM has one: the tiny guests drive it, and it costs a Linux guest nothing.
    fn attach(space: &mut DeviceSpace, host: &DeviceHost, _config: &AttachConfig) -> Result<Option<Self>, DeviceError> {
        let slot = space.slot(Self::KIND, Self::FIXED_SLOT)?;
        let engine = DmaEngine::new(Arc::clone(host.ram), device_interrupt(host.wiring, slot.gsi)?);
        DmaSlot::plug(space, engine).map(Some)
    }

    fn capture<R>(
        &self,
        _mode: CaptureMode,
        inner: impl FnOnce() -> Result<R, DeviceError>,
    ) -> Result<Captured<DmaState, R>, DeviceError> {
        let engine = self.lock();
        let state = engine.save().map_err(DeviceError::Dma)?;
        Ok(Captured { state, disk: None, inner: inner()? })
    }

    fn check_saved(state: &DmaState, _args: &RestoreArgs) -> Result<(), DeviceError> {
        state.check().map_err(DeviceError::Dma)
    }

    /// The transfer that was in flight at the capture instant starts again from byte 0
    /// against the VM's own pages.
    fn restore(space: &mut DeviceSpace, state: &DmaState, args: &mut RestoreArgs) -> Result<Self, DeviceError> {
        let slot = space.slot(Self::KIND, Self::FIXED_SLOT)?;
        let interrupt = device_interrupt(args.host.wiring, slot.gsi)?;
        let engine =
            DmaEngine::restore(DmaArgs { ram: Arc::clone(args.host.ram), interrupt: Arc::clone(&interrupt) }, state)
                .map_err(DeviceError::Dma)?;
        interrupt.resend_if_pending();
        DmaSlot::plug(space, engine)
    }

    fn reset(
        &self,
        state: &DmaState,
        _args: &ResetArgs,
        inner: impl FnOnce() -> Result<(), DeviceError>,
    ) -> Result<(), DeviceError> {
        let mut engine = self.lock();
        inner()?;
        engine.reset_to(state).map_err(DeviceError::Dma)
    }

    fn in_flight(state: &DmaState) -> u64 {
        u64::from(state.in_flight.is_some())
    }

    fn description(&self) -> DeviceDescription {
        DeviceDescription { kind: Self::KIND, mmio: Some(SLOT), virtio: false }
    }

    fn metrics(&self) -> Option<DeviceMetrics> {
        Some(DeviceMetrics::of("dma_engine", &*self.metrics))
    }
}
