//! Code shared by the flannel-rs CNI plugin and daemon.
//!
//! - [`subnet_env`]: the `subnet.env` file the daemon writes and the plugin reads
//!   (flannel's exact format).
//! - [`mac`]: the [`MacAddr`] newtype.
//! - [`netns`]: opening network namespaces and netlink sockets inside them.
//! - [`netlink`]: the one typed netlink facade; nothing else talks rtnetlink.

pub mod entry;
pub mod host;
pub mod mac;
pub mod netlink;
pub mod netns;
pub mod subnet_env;

pub use mac::MacAddr;
pub use subnet_env::SubnetEnv;
