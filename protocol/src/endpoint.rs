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

/// Where an endpoint is reachable from, by its address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reach {
    /// This host only: a loopback address (`127.0.0.0/8`, `::1`, `localhost`) or `ipc://`.
    Local,
    /// Every interface of this host (`0.0.0.0`, `*`, `::`): other hosts reach it at the address
    /// the binding process advertises.
    Wildcard,
    /// A named interface or another host.
    Network,
}

impl Endpoint {
    /// The host of a `tcp://host:port` endpoint (an IPv6 host without its brackets); `None` for
    /// `ipc://` and unassigned endpoints.
    pub fn host(&self) -> Option<&str> {
        let rest = self.0.strip_prefix("tcp://")?;
        let host = match rest.rfind(':') {
            Some(i) => &rest[..i],
            None => rest,
        };
        Some(host.trim_start_matches('[').trim_end_matches(']'))
    }

    /// Where the endpoint can be reached from.
    pub fn reach(&self) -> Reach {
        let Some(host) = self.host() else {
            return Reach::Local;
        };
        if matches!(host, "0.0.0.0" | "*" | "::") {
            return Reach::Wildcard;
        }
        let loopback = host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        match loopback {
            true => Reach::Local,
            false => Reach::Network,
        }
    }

    /// The rule for every endpoint of a run: one beyond loopback (bound on a network interface
    /// or all of them, or connected to another host) needs the run's secret, since anyone who
    /// reaches its port could otherwise feed batches into the stream or read it. `Err` gives
    /// the reason.
    pub fn check_secret(&self, key: Option<&crate::Key>) -> Result<(), String> {
        if key.is_some() || self.reach() == Reach::Local {
            return Ok(());
        }
        Err(format!(
            "`{}` is reachable beyond this host, and this process has no secret: a run bound or connected beyond loopback must be signed (give `secret_file`, or set RHO_SECRET, the same for every process of the run; `rho run` makes one in the run directory)",
            self.0
        ))
    }

    /// The endpoint other processes connect to, of one bound at `self` (with its port picked):
    /// the host replaced by `advertise` when given, else a wildcard host by [`advertised_host`];
    /// other endpoints as they are.
    pub fn advertised(&self, advertise: Option<&str>) -> Endpoint {
        let host = match (advertise, self.reach()) {
            (Some(a), _) if !a.is_empty() => a.to_string(),
            (_, Reach::Wildcard) => advertised_host(),
            _ => return self.clone(),
        };
        let port = self.0.rsplit(':').next().unwrap_or("0");
        let host = match host.contains(':') {
            true => format!("[{host}]"),
            false => host,
        };
        Endpoint(format!("tcp://{host}:{port}"))
    }
}

/// The name other hosts reach this one by, for an endpoint bound on every interface without
/// `advertise`: `RHO_ADVERTISE`, else the node name Slurm gives a task (`SLURMD_NODENAME`), else
/// the host name (`/proc/sys/kernel/hostname`, `HOSTNAME`), else `localhost`.
pub fn advertised_host() -> String {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    env("RHO_ADVERTISE")
        .or_else(|| env("SLURMD_NODENAME"))
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .filter(|h| !h.trim().is_empty())
        })
        .or_else(|| env("HOSTNAME"))
        .map_or_else(|| "localhost".into(), |h| h.trim().to_string())
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

    #[test]
    fn an_endpoint_knows_how_far_it_reaches() {
        let reach = |e: &str| Endpoint::new(e).unwrap().reach();
        assert_eq!(reach("tcp://127.0.0.1:5555"), Reach::Local);
        assert_eq!(reach("tcp://127.3.0.1:0"), Reach::Local);
        assert_eq!(reach("tcp://localhost:1"), Reach::Local);
        assert_eq!(reach("tcp://[::1]:1"), Reach::Local);
        assert_eq!(reach("ipc:///tmp/x"), Reach::Local);
        assert_eq!(reach("tcp://0.0.0.0:0"), Reach::Wildcard);
        assert_eq!(reach("tcp://*:0"), Reach::Wildcard);
        assert_eq!(reach("tcp://[::]:0"), Reach::Wildcard);
        assert_eq!(reach("tcp://10.1.2.3:5555"), Reach::Network);
        assert_eq!(reach("tcp://node-7:5555"), Reach::Network);
        assert_eq!(reach("tcp://[fe80::1]:5"), Reach::Network);
    }

    #[test]
    fn an_endpoint_beyond_loopback_needs_the_secret() {
        let key = crate::Key::new(b"0123456789abcdef").unwrap();
        for e in ["tcp://127.0.0.1:0", "ipc:///tmp/x"] {
            Endpoint::new(e).unwrap().check_secret(None).unwrap();
        }
        for e in ["tcp://0.0.0.0:0", "tcp://10.0.0.2:7", "tcp://node-1:7"] {
            let e = Endpoint::new(e).unwrap();
            let why = e.check_secret(None).unwrap_err();
            assert!(
                why.contains(e.as_str()) && why.contains("secret_file"),
                "{why}"
            );
            e.check_secret(Some(&key)).unwrap();
        }
    }

    #[test]
    fn a_wildcard_bind_advertises_a_routable_host_with_its_port() {
        let bound = Endpoint::new("tcp://0.0.0.0:4321").unwrap();
        assert_eq!(
            bound.advertised(Some("10.7.0.1")).as_str(),
            "tcp://10.7.0.1:4321"
        );
        assert_eq!(
            bound.advertised(Some("fd00::1")).as_str(),
            "tcp://[fd00::1]:4321"
        );
        let named = bound.advertised(None);
        assert_eq!(named.reach(), Reach::Network, "{named}");
        assert!(named.as_str().ends_with(":4321"), "{named}");
        let specific = Endpoint::new("tcp://10.7.0.1:4321").unwrap();
        assert_eq!(specific.advertised(None), specific);
        let local = Endpoint::new("ipc:///tmp/x").unwrap();
        assert_eq!(local.advertised(None), local);
    }
}
