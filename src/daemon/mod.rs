//! The daemon of one device and its administration: the ublk device and its queues, the control
//! socket, the metrics exporter, and the commands that start, list and stop daemons.
//!
//! - [`device`]: the ublk device: its queues run [`crate::engine::queue`] on libublk's rings,
//!   and a supervisor thread runs the mirror loop;
//! - [`control`]: the control socket (status, settings, pause, switchover, verify);
//! - [`start`]: `add` and `recover`: forking the daemon, its report to the caller, serving;
//! - [`admin`]: `status`, `del`, `list`, `up`, `down`: finding, waiting for and stopping daemons;
//! - [`saved`]: the configuration a daemon saves with the driver, and the entries `list` prints;
//! - [`udev`]: names for udev rules;
//! - [`metrics`]: the Prometheus exposition of every device.

pub mod admin;
pub mod control;
pub mod device;
pub mod metrics;
pub mod saved;
pub mod start;
pub mod udev;

/// Where daemons keep their control sockets, event logs and logs.
pub const RUN_DIR: &str = "/run/ublk-mirror";
