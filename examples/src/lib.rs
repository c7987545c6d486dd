//! Runnable choreographies built with choreo. See the `examples/` folder:
//! `cargo run --release -p choreo-examples --example bench` compares choreo
//! with hand-written async-nats code in one run.
