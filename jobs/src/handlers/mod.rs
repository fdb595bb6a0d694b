//! Job handlers: the application logic each queue runs. Every handler is a reconciler.

mod probe;

pub use probe::run_probe;
