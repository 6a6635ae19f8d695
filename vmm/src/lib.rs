//! Zygote VMM library.

pub mod linux;
