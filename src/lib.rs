//! clipact: action recognition for edge cameras.
//!
//! The library shared by the device runtime (`clipact`) and the host tool (`clipact-host`).
//! Everything that must agree bit for bit between training and deployment lives here once;
//! the modules follow the data flow of `DESIGN.md`:
//!
//! frame → [`preprocess`] → [`encoder`] → window → [`wti`] scores against a [`labels`] set
//! (optionally with [`temporal`] difference columns)
//! → [`pipeline`] decisions → [`gpio`] triggers and events.
//!
//! Around it: [`bundle`] (what a device loads), [`config`] (the device's TOML), [`update`]
//! (label sets pushed to a running device), [`tuning`] (a person's per-label thresholds and
//! switches), [`onnx`] (the ONNX writer exports build on) and
//! [`pattern`] (the colour test pattern the demo bundle runs on).

pub mod bundle;
pub mod config;
pub mod decision;
pub mod encoder;
pub mod eval;
pub mod events;
pub mod gpio;
pub mod labels;
pub mod onnx;
pub mod pattern;
pub mod pipeline;
pub mod precision;
pub mod preprocess;
pub mod quantize;
pub mod runtime;
pub mod snapshot;
pub mod source;
pub mod stream_eval;
pub mod temporal;
pub mod tuning;
pub mod update;
pub mod world;
pub mod wti;
