//! Heartbeats and reconnection, as the selectors and the trainer configure them.
//!
//! A consumer sends a heartbeat to each producer it is connected to every `heartbeat_secs`; a
//! producer answers each with one of its own. A consumer that has heard nothing from a producer
//! for `peer_timeout_secs` takes it for gone: it drops the connection, connects again (waiting
//! until the endpoint accepts) and introduces itself anew, so that a restarted producer, or one
//! that lost the connection, learns of it again.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The two settings, as they appear in a process config.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Liveness {
    /// Seconds between heartbeats. Default 1.
    #[serde(default = "default_heartbeat_secs")]
    pub heartbeat_secs: f64,
    /// Seconds of silence after which a peer is taken for gone and reconnected. Keep it well
    /// above the longest training step or evaluation. Default 30.
    #[serde(default = "default_peer_timeout_secs")]
    pub peer_timeout_secs: f64,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            heartbeat_secs: default_heartbeat_secs(),
            peer_timeout_secs: default_peer_timeout_secs(),
        }
    }
}

fn default_heartbeat_secs() -> f64 {
    1.0
}

fn default_peer_timeout_secs() -> f64 {
    30.0
}

impl Liveness {
    /// Checks the settings; the error names the field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(self.heartbeat_secs.is_finite() && self.heartbeat_secs > 0.0) {
            return Err((
                "liveness.heartbeat_secs",
                "must be a positive number".into(),
            ));
        }
        if !(self.peer_timeout_secs.is_finite() && self.peer_timeout_secs > self.heartbeat_secs) {
            return Err((
                "liveness.peer_timeout_secs",
                format!(
                    "must be larger than heartbeat_secs ({})",
                    self.heartbeat_secs
                ),
            ));
        }
        Ok(())
    }

    /// The heartbeat interval.
    pub fn every(&self) -> Duration {
        Duration::from_secs_f64(self.heartbeat_secs)
    }

    /// How long a silent peer is waited for before it is presumed dead.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.peer_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::Liveness;

    #[test]
    fn settings_are_checked() {
        assert!(Liveness::default().validate().is_ok());
        let bad = Liveness {
            heartbeat_secs: 2.0,
            peer_timeout_secs: 1.0,
        };
        assert_eq!(bad.validate().unwrap_err().0, "liveness.peer_timeout_secs");
        let bad = Liveness {
            heartbeat_secs: 0.0,
            peer_timeout_secs: 1.0,
        };
        assert_eq!(bad.validate().unwrap_err().0, "liveness.heartbeat_secs");
    }
}
