//! Errors raised while *building* adapters (bad URL, unreadable file...).
//! Errors raised while *using* them are `retrain_core::ports::PortError`.

/// An adapter could not be constructed from its configuration.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// The configuration value `key` is unusable; `message` says why.
    #[error("{key}: {message}")]
    Config { key: String, message: String },
    /// The backing service could not be reached or initialised.
    #[error("{0}")]
    Unavailable(String),
    /// A store opened read-only was never initialised (no schema yet).
    #[error("{0}")]
    NotInitialised(String),
}

impl AdapterError {
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config {
            key: key.into(),
            message: message.into(),
        }
    }
}
