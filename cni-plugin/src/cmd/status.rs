//! STATUS: can this node service ADD? Yes when subnet.env is present and valid
//! and the lease has a free address.

use flannel_net::subnet_env::SubnetEnv;

use super::ranges;
use crate::config::NetConf;
use crate::error::{code, CniError};
use crate::ipam::Store;

/// Runs STATUS.
pub fn run(conf: &NetConf) -> Result<(), CniError> {
    let unavailable = |msg: String| CniError::new(code::NOT_AVAILABLE, msg);
    let lease = SubnetEnv::load(&conf.subnet_file()).map_err(|e| unavailable(e.to_string()))?;
    let Some(store) = Store::open_existing(&conf.data_dir(), &conf.name).map_err(|e| unavailable(e.to_string()))?
    else {
        return Ok(());
    };
    let store = store.with_host_local(conf.host_local_dir(), false).map_err(|e| unavailable(e.to_string()))?;
    for r in ranges(&lease) {
        if !store.has_free(&r).map_err(|e| unavailable(e.to_string()))? {
            return Err(unavailable(format!(
                "no free pod address in {}: all {} are allocated (see {})",
                r.subnet,
                r.capacity(),
                store.dir().display()
            )));
        }
    }
    Ok(())
}
