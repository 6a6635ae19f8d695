//! Input bytes decode into a clone-vs-DMA schedule for the memory-mode interpreter; any
//! violation of the memory rules is a crash with the offending step.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tools::fuzz::{execute, memory_mode::PAGES, schedule::from_bytes, MemoryWorld};

fuzz_target!(|data: &[u8]| {
    let steps = from_bytes(data, PAGES);
    if let Err((step, violation)) = execute::<MemoryWorld>(&steps) {
        panic!("step {step} ({:?}) broke a rule: {}", steps[step], violation.0);
    }
});
