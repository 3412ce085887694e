//! CNI errors: the spec's codes and its error JSON.

use serde_json::json;

/// Error codes from the CNI specification (and libcni's generic one).
pub mod code {
    /// Incompatible CNI version.
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    /// Container unknown or does not exist.
    pub const UNKNOWN_CONTAINER: u32 = 3;
    /// Invalid necessary environment variables.
    pub const INVALID_ENV: u32 = 4;
    /// I/O failure.
    pub const IO: u32 = 5;
    /// Failed to decode content.
    pub const DECODE: u32 = 6;
    /// Invalid network config.
    pub const INVALID_CONFIG: u32 = 7;
    /// Try again later.
    pub const TRY_AGAIN: u32 = 11;
    /// STATUS: the plugin is not available (cannot service ADD).
    pub const NOT_AVAILABLE: u32 = 50;
    /// Anything the spec has no code for (libcni's `ErrInternal`): a netlink
    /// failure, or CHECK finding that the pod's network differs.
    pub const INTERNAL: u32 = 999;
}

/// An error the plugin reports to the runtime.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    /// One of [`code`].
    pub code: u32,
    /// One line saying what failed, naming the object and the value.
    pub msg: String,
    /// Longer detail, possibly empty.
    pub details: String,
}

impl CniError {
    /// An error with `code` and `msg`.
    pub fn new(code: u32, msg: impl Into<String>) -> CniError {
        CniError { code, msg: msg.into(), details: String::new() }
    }

    /// Adds details.
    pub fn with_details(mut self, details: impl Into<String>) -> CniError {
        self.details = details.into();
        self
    }

    /// The spec's error object, in `version`.
    pub fn to_json(&self, version: &str) -> serde_json::Value {
        let mut v = json!({ "cniVersion": version, "code": self.code, "msg": self.msg });
        if !self.details.is_empty() {
            v["details"] = json!(self.details);
        }
        v
    }
}

impl std::fmt::Display for CniError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {})", self.msg, self.code)
    }
}

impl From<flannel_net::netlink::NlError> for CniError {
    fn from(e: flannel_net::netlink::NlError) -> CniError {
        CniError::new(code::INTERNAL, e.to_string())
    }
}
