#![no_main]
//! `cargo xtask fuzz` target `consul`: see fuzz/src/lib.rs for the input format and invariants.

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| lb_fuzz::consul(data));
