//! The facade's one error type: the operation in `ip` words, the object, and
//! the kernel's errno, with helpers for the errnos callers treat as success.

/// A failed netlink operation: what was attempted, on what, and why.
#[derive(Debug, thiserror::Error)]
#[error("{op}: {detail}")]
pub struct NlError {
    /// The operation and its object, in `ip` words.
    pub op: String,
    /// The kernel's errno, when the kernel answered with one.
    pub errno: Option<i32>,
    /// Why, in words: the errno's text or rtnetlink's message.
    detail: String,
}

impl NlError {
    /// Wraps an rtnetlink error; a kernel answer keeps its errno (rtnetlink
    /// reports it negated, as the kernel sends it) and reads as the OS's text
    /// for it, so messages look like `ip`'s.
    pub(crate) fn new(op: impl Into<String>, err: rtnetlink::Error) -> NlError {
        let (errno, detail) = match &err {
            rtnetlink::Error::NetlinkError(msg) if msg.raw_code() != 0 => {
                let code = -msg.raw_code();
                (Some(code), std::io::Error::from_raw_os_error(code).to_string())
            }
            other => (None, other.to_string()),
        };
        NlError { op: op.into(), errno, detail }
    }

    /// The kernel refused the request with `errno` (positive): the same
    /// error [`NlError::new`] makes of rtnetlink's report of it.
    pub(crate) fn kernel(op: impl Into<String>, errno: i32) -> NlError {
        NlError { op: op.into(), errno: Some(errno), detail: std::io::Error::from_raw_os_error(errno).to_string() }
    }

    /// Wraps an I/O error (opening a socket, a request we could not build).
    pub(crate) fn io(op: impl Into<String>, err: std::io::Error) -> NlError {
        NlError { op: op.into(), errno: err.raw_os_error(), detail: err.to_string() }
    }

    /// The object already exists (`EEXIST`).
    pub fn is_exists(&self) -> bool {
        self.errno == Some(libc::EEXIST)
    }

    /// The object (or the device it hangs off) does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(self.errno, Some(libc::ENODEV) | Some(libc::ENOENT) | Some(libc::ESRCH) | Some(libc::EADDRNOTAVAIL))
    }
}

/// Result of a netlink operation.
pub type NlResult<T> = Result<T, NlError>;
