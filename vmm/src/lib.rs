//! Zygote VMM library.
