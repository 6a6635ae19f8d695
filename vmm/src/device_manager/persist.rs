//! The loops over every registered device: the `registry!` macro turns the one list of device
//! kinds (in `device_manager/mod.rs`) into `Devices` (a VM's devices, one field per kind),
//! `DevicesState` (their saved states, one field per kind) and the build, check, restore,
//! capture and reset loops over them.
//!
//! Capture and reset nest: each device runs the next one inside its own lock, and the last
//! runs the RAM freeze (or reset). So every device is locked, in registry order, across the
//! whole capture and the freeze, and no completion lands in between.

use super::device::{CaptureMode, CapturedDisk, ResetArgs, VmDevice};
use super::DeviceError;

/// What an inner capture hands out: its result and the disk taken there, if any.
pub(super) type Inner<R> = (R, Option<CapturedDisk>);

/// Captures `device` (if the VM has it) into `slot` around `inner`.
pub(super) fn capture_one<D: VmDevice, R>(
    device: Option<&D>,
    mode: CaptureMode,
    slot: &mut Option<D::State>,
    inner: impl FnOnce() -> Result<Inner<R>, DeviceError>,
) -> Result<Inner<R>, DeviceError> {
    let Some(device) = device else { return inner() };
    let captured = device.capture(mode, inner)?;
    *slot = Some(captured.state);
    let (result, deeper) = captured.inner;
    Ok((result, captured.disk.or(deeper)))
}

/// Resets `device` (if the VM has it) to `state` around `inner`. The caller checked first that
/// the VM and the state have the same devices.
pub(super) fn reset_one<D: VmDevice>(
    device: Option<&D>,
    state: Option<&D::State>,
    args: &ResetArgs,
    inner: impl FnOnce() -> Result<(), DeviceError>,
) -> Result<(), DeviceError> {
    match (device, state) {
        (Some(device), Some(state)) => device.reset(state, args, inner),
        (None, None) => inner(),
        (device, _) => Err(presence_mismatch(D::KIND, device.is_some())),
    }
}

/// The VM has a device kind the saved state has not, or the other way round.
pub(super) fn presence_mismatch(kind: &str, in_vm: bool) -> DeviceError {
    let (vm, state) = if in_vm { ("has", "has no") } else { ("has no", "has") };
    DeviceError::Mismatch(format!("the VM {vm} {kind}, the saved state {state}"))
}

/// Nests `capture_one` over the listed fields, innermost `$inner`.
macro_rules! capture_nested {
    ($devices:ident, $mode:ident, $state:ident, $inner:expr;) => { $inner() };
    ($devices:ident, $mode:ident, $state:ident, $inner:expr; $field:ident $($rest:ident)*) => {
        $crate::device_manager::persist::capture_one($devices.$field.as_ref(), $mode, &mut $state.$field, || {
            capture_nested!($devices, $mode, $state, $inner; $($rest)*)
        })
    };
}

/// Nests `reset_one` over the listed fields, innermost `$inner`.
macro_rules! reset_nested {
    ($devices:ident, $state:ident, $args:ident, $inner:expr;) => { $inner() };
    ($devices:ident, $state:ident, $args:ident, $inner:expr; $field:ident $($rest:ident)*) => {
        $crate::device_manager::persist::reset_one($devices.$field.as_ref(), $state.$field.as_ref(), $args, || {
            reset_nested!($devices, $state, $args, $inner; $($rest)*)
        })
    };
}

/// Generates `Devices`, `DevicesState` and their loops from `field: Type` lines, in the
/// order devices are built, locked and described.
macro_rules! registry {
    ($($field:ident: $ty:ty),+ $(,)?) => {
        /// A VM's devices, one field per registered kind (`None`: the VM does not have it).
        #[derive(Default)]
        pub struct Devices {
            $(pub $field: Option<$ty>,)+
        }

        /// Every device's saved state, one field per registered kind (`None`: the VM did not
        /// have it). Guest values only.
        #[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
        pub struct DevicesState {
            $(#[serde(default)] pub $field: Option<<$ty as VmDevice>::State>,)+
        }

        impl DevicesState {
            /// Requests in flight at the capture instant, which a restore re-executes.
            pub fn in_flight(&self) -> u64 {
                0 $(+ self.$field.as_ref().map_or(0, <$ty as VmDevice>::in_flight))+
            }
        }

        impl Devices {
            fn attach(space: &mut DeviceSpace, host: &DeviceHost, config: &AttachConfig) -> Result<Devices, DeviceError> {
                Ok(Devices { $($field: <$ty as VmDevice>::attach(space, host, config)?,)+ })
            }

            fn check_saved(state: &DevicesState, args: &RestoreArgs) -> Result<(), DeviceError> {
                $(if let Some(saved) = &state.$field {
                    <$ty as VmDevice>::check_saved(saved, args)?;
                })+
                Ok(())
            }

            fn restore(space: &mut DeviceSpace, state: &DevicesState, args: &mut RestoreArgs) -> Result<Devices, DeviceError> {
                Ok(Devices {
                    $($field: match &state.$field {
                        Some(saved) => Some(<$ty as VmDevice>::restore(space, saved, args)?),
                        None => None,
                    },)+
                })
            }

            fn capture<R>(
                &self,
                mode: CaptureMode,
                inner: impl FnOnce() -> R,
            ) -> Result<(DevicesState, Option<CapturedDisk>, R), DeviceError> {
                let devices = self;
                let mut state = DevicesState::default();
                let (result, disk) = capture_nested!(devices, mode, state, || Ok((inner(), None)); $($field)+)?;
                Ok((state, disk, result))
            }

            fn check_same_kinds(&self, state: &DevicesState) -> Result<(), DeviceError> {
                $(if self.$field.is_some() != state.$field.is_some() {
                    return Err($crate::device_manager::persist::presence_mismatch(
                        <$ty as VmDevice>::KIND,
                        self.$field.is_some(),
                    ));
                })+
                Ok(())
            }

            fn reset(
                &self,
                state: &DevicesState,
                args: &ResetArgs,
                inner: impl FnOnce() -> Result<(), DeviceError>,
            ) -> Result<(), DeviceError> {
                self.check_same_kinds(state)?;
                let devices = self;
                reset_nested!(devices, state, args, inner; $($field)+)
            }

            fn resend_interrupts(&self) {
                $(if let Some(device) = &self.$field {
                    device.resend_interrupt();
                })+
            }

            fn metrics(&self) -> Vec<DeviceMetrics> {
                let mut all = Vec::new();
                $(if let Some(metrics) = self.$field.as_ref().and_then(VmDevice::metrics) {
                    all.push(metrics);
                })+
                all
            }

            fn descriptions(&self) -> Vec<DeviceDescription> {
                let mut all = Vec::new();
                $(if let Some(device) = &self.$field {
                    all.extend(device.descriptions());
                })+
                all
            }
        }
    };
}
