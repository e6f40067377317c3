//! Events out, label sets in, over the network: MQTT ([`mqtt`], with Home Assistant discovery:
//! [`homeassistant`]), HTTP ([`http`]) and label-set updates that arrive as one message
//! ([`remote`]).
//!
//! Both servers read the running device through one seam, [`DeviceView`]: its status, the
//! label set in use, its metrics, where a signed label-set update goes, a person's per-label
//! settings and the last frame. The runtime
//! implements it; the servers know nothing else about the pipeline.

pub mod homeassistant;
pub mod http;
pub mod metrics;
pub mod mqtt;
pub mod page;
pub mod remote;
pub mod topics;
mod wiring;

pub use metrics::{LabelInfo, LabelMetrics, LabelsDoc, MetricsSnapshot, Status};
pub use remote::{apply_update, encode_challenge_request, encode_transfer, UpdateReply};
pub use wiring::{start, EventsError};

use crate::snapshot::Snapshot;
use crate::tuning::{Tuning, TuningEdit, TuningError};

/// What the MQTT and HTTP servers read from the running device. Called from async tasks and
/// worker threads: every method must be quick.
pub trait DeviceView: Send + Sync + 'static {
    /// The device at a glance (`GET /status`, MQTT `stats`).
    fn status(&self) -> Status;
    /// The label set in use with thresholds and scores (`GET /labels`).
    fn labels(&self) -> LabelsDoc;
    /// Counters and gauges for `GET /metrics`.
    fn metrics(&self) -> MetricsSnapshot;
    /// The device's update gate: label sets arriving by MQTT or HTTP go through it
    /// ([`remote::apply_update`]), like those of every other transport.
    fn update_gate(&self) -> &std::sync::Arc<crate::update::UpdateGate>;
    /// A person's per-label settings (`GET /tuning`); `None` when this device keeps none.
    fn tuning(&self) -> Option<Tuning> {
        None
    }
    /// Changes them (`POST /tuning`), or drops them all with `None` (`DELETE /tuning`):
    /// checked, saved, then applied between two frames. May write a file: call it off the
    /// async threads.
    fn edit_tuning(&self, _edit: Option<&TuningEdit>) -> Result<Tuning, TuningError> {
        Err(TuningError::NotAllowed("this device keeps no per-label settings".into()))
    }
    /// A copy of the next frame (`GET /snapshot`); `None` when none comes in time. Blocks up
    /// to a few seconds: call it off the async threads.
    fn snapshot(&self) -> Option<Snapshot> {
        None
    }
}
