//! Training infrastructure shared by `pretrain`, `distill`, `train` and `adapt`: their settings
//! and loop ([`schedule`]), AdamW with parameter groups and a warmup + cosine schedule
//! ([`optim`]), checkpoints that resume
//! ([`checkpoint`]), seeded randomness ([`rng`]), histories and charts ([`plot`]), the
//! differentiable WTI head ([`head`]) and the synthetic world's data ([`data`]).

pub mod checkpoint;
pub mod cli;
pub mod data;
pub mod head;
pub mod optim;
pub mod plot;
pub mod rng;
pub mod schedule;

/// A progress bar for `len` steps of `what` (hidden when stderr is not a terminal).
pub fn progress_bar(len: u64, what: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(&format!(
            "{{spinner}} {what} [{{elapsed_precise}}] {{wide_bar}} {{pos}}/{{len}} (eta {{eta}}) {{msg}}"
        ))
        .expect("valid progress template"),
    );
    bar
}
