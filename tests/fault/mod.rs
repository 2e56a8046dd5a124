//! Parts of the fault-injection suite (`tests/fault_injection.rs`).

pub mod levers;
pub mod publisher;
pub mod workload;
