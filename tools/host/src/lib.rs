//! clipact-host: the workstation side of clipact (`DESIGN.md`): the CLIP teacher, label sets,
//! and (later) distillation, training, export and pushing to devices.
//!
//! The binary `clipact-host` is a thin command-line layer over these modules.

pub mod adapt;
pub mod calibrate;
pub mod clip;
pub mod dataset;
pub mod dev;
pub mod distill;
pub mod embed;
pub mod eval;
pub mod export;
pub mod export_temporal;
pub mod labelset;
pub mod pretrain;
pub mod push;
pub mod quantize;
pub mod student;
pub mod tokenizer;
pub mod train;
pub mod wti_train;

use candle_core::Device;

/// Where the teacher runs (`--device`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum DeviceChoice {
    /// CUDA when built with the `cuda` feature and a GPU is present, else the CPU.
    #[default]
    Auto,
    /// The CPU (all cores).
    Cpu,
    /// The first CUDA GPU (needs a build with `--features cuda`).
    Cuda,
}

/// Opens the requested compute device.
pub fn select_device(choice: DeviceChoice) -> anyhow::Result<Device> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Cuda => {
            if !cfg!(feature = "cuda") {
                anyhow::bail!(
                    "--device cuda: this clipact-host was built without CUDA; rebuild with \
                     `cargo build --release -p clipact-host --features cuda`"
                );
            }
            Device::new_cuda(0).map_err(|e| anyhow::anyhow!("opening CUDA device 0: {e}"))
        }
        DeviceChoice::Auto => {
            if cfg!(feature = "cuda") {
                match Device::new_cuda(0) {
                    Ok(d) => return Ok(d),
                    Err(e) => tracing::info!("no usable CUDA device ({e}); running on the CPU"),
                }
            }
            Ok(Device::Cpu)
        }
    }
}
