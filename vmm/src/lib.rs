//! Zygote VMM library.

pub mod fuzz;
