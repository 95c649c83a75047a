//! One module per verb. Each returns a value; [`crate::ui`] renders it as text or JSON.
pub mod ca;
pub mod cert;
pub mod deploy;
pub mod rollout;
pub mod status;
