//! Process exit codes of `ferry`, in one place (documented in README.md and `ferry --help`).

/// Everything asked for was done.
pub const SUCCESS: u8 = 0;
/// The deployment failed (halted or rolled back).
pub const FAILED: u8 = 1;
/// Usage or configuration error: nothing was attempted.
pub const USAGE: u8 = 2;
/// At least one host could not be reached or authenticated.
pub const UNREACHABLE: u8 = 3;
