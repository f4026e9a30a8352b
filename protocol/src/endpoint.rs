//! [`Endpoint`]: a ZeroMQ endpoint as a config names it, checked when the config is read.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A ZeroMQ endpoint: `tcp://host:port` (port 0 lets a binding process pick one) or
/// `ipc://path`. The empty endpoint is *unassigned*: `rho run` assigns the endpoints its
/// processes connect to, and a process started on its own refuses to start without them
/// ([`Endpoint::check`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Endpoint(String);

impl Endpoint {
    /// An endpoint from its text; `tcp://` or `ipc://`, or empty (unassigned).
    pub fn new(text: impl Into<String>) -> Result<Self, String> {
        let text = text.into();
        if !text.is_empty() && !text.starts_with("tcp://") && !text.starts_with("ipc://") {
            return Err(format!("`{text}` is not a tcp:// or ipc:// endpoint"));
        }
        Ok(Endpoint(text))
    }

    /// Whether the endpoint is named (not left to `rho run`).
    pub fn is_assigned(&self) -> bool {
        !self.0.is_empty()
    }

    /// The endpoint, or why a process cannot use it: an unassigned one is missing.
    pub fn check(&self) -> Result<&str, String> {
        match self.is_assigned() {
            true => Ok(&self.0),
            false => Err(
                "missing: the endpoint (`rho run` assigns it; a process started on its own needs it)"
                    .into(),
            ),
        }
    }

    /// The endpoint's text (empty when unassigned).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Endpoint {
    type Error = String;

    fn try_from(text: String) -> Result<Self, String> {
        Endpoint::new(text)
    }
}

impl From<Endpoint> for String {
    fn from(e: Endpoint) -> String {
        e.0
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for Endpoint {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Endpoint::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tcp_and_ipc_endpoints_are_taken() {
        assert!(Endpoint::new("tcp://127.0.0.1:0").is_ok());
        assert!(Endpoint::new("ipc:///tmp/x").is_ok());
        assert!(Endpoint::new("http://x")
            .unwrap_err()
            .contains("not a tcp:// or ipc://"));
        let e: Result<Endpoint, _> = serde_json::from_str("\"udp://x\"");
        assert!(e.is_err());
    }

    #[test]
    fn an_unassigned_endpoint_is_missing_when_used() {
        let e = Endpoint::default();
        assert!(!e.is_assigned());
        assert!(e.check().unwrap_err().contains("rho run"));
        let e: Endpoint = serde_json::from_str("\"tcp://h:1\"").unwrap();
        assert_eq!(e.check().unwrap(), "tcp://h:1");
        assert_eq!(serde_json::to_string(&e).unwrap(), "\"tcp://h:1\"");
    }
}
