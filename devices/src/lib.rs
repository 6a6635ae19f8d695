//! Zygote devices. Depend on `memory`, never on `vmm`.
