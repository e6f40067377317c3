pub mod alloc;
pub mod browser;
pub mod device;
pub mod random;

/// The `clipact` binary, started in the repository root through `CLIPACT_TEST_RUNNER` when that
/// is set: a cross-built binary cannot be exec'd directly (tools/test.sh sets it to qemu for the
/// aarch64 leg).
#[allow(dead_code)]
pub fn clipact_command() -> std::process::Command {
    let binary = env!("CARGO_BIN_EXE_clipact");
    let runner = std::env::var("CLIPACT_TEST_RUNNER").unwrap_or_default();
    let mut runner = runner.split_whitespace();
    let mut command = match runner.next() {
        Some(program) => {
            let mut command = std::process::Command::new(program);
            command.args(runner).arg(binary);
            command
        }
        None => std::process::Command::new(binary),
    };
    command.current_dir(env!("CARGO_MANIFEST_DIR"));
    command
}
