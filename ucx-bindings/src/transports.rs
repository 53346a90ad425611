//! Transport lists in the form of `UCX_TLS`: names separated by commas, optionally led by `^`
//! to exclude. UCX itself only warns about a name it does not know and carries on, which hides
//! typos such as `cuda-ipc`; we reject unknown names before UCX sees them.

use crate::error::{Error, Result};

/// Every transport and alias name UCX 1.22 accepts in `UCX_TLS`, whether or not this machine's
/// build has it (a system UCX may bring IB transports the wheel lacks).
pub const KNOWN_TRANSPORTS: &[&str] = &[
    // aliases
    "all",
    "sm",
    "shm",
    "mm",
    "ib",
    "rc",
    "ud",
    "dc",
    "cuda",
    "rocm",
    "ze",
    "gga",
    // shared memory and loopback
    "self",
    "posix",
    "sysv",
    "xpmem",
    "cma",
    "knem",
    // network
    "tcp",
    "rc_v",
    "rc_verbs",
    "rc_x",
    "rc_mlx5",
    "rc_mlx5_gda",
    "ud_v",
    "ud_verbs",
    "ud_x",
    "ud_mlx5",
    "dc_x",
    "dc_mlx5",
    "srd",
    "gga_mlx5",
    // accelerators
    "cuda_copy",
    "cuda_ipc",
    "gdr_copy",
    "rocm_copy",
    "rocm_ipc",
    "rocm_gdr",
    "ze_copy",
    "ze_ipc",
    "ze_gdr",
];

/// A parsed transport list: names in order, and whether the list excludes them (`^tcp`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportList {
    pub exclude: bool,
    pub names: Vec<String>,
}

impl TransportList {
    /// Parses and validates `tcp,sm` / `^cuda_ipc` / `all`. Whitespace around names is ignored;
    /// empty lists, empty names and unknown names are errors that name the culprit.
    pub fn parse(list: &str) -> Result<Self> {
        let trimmed = list.trim();
        let (exclude, body) = match trimmed.strip_prefix('^') {
            Some(rest) => (true, rest),
            None => (false, trimmed),
        };
        if body.trim().is_empty() {
            return Err(Error::invalid(format!("transport list {list:?} is empty")));
        }
        let mut names = Vec::new();
        for raw in body.split(',') {
            let name = raw.trim();
            if name.is_empty() {
                return Err(Error::invalid(format!("transport list {list:?} has an empty name")));
            }
            // UCX accepts `name:aux`-style suffixes only for `ib`; keep the check strict.
            if !KNOWN_TRANSPORTS.contains(&name) {
                return Err(Error::invalid(format!(
                    "unknown transport {name:?} in {list:?}; known: {}",
                    KNOWN_TRANSPORTS.join(", ")
                )));
            }
            if !names.iter().any(|n: &String| n == name) {
                names.push(name.to_owned());
            }
        }
        Ok(TransportList { exclude, names })
    }

    /// The list with tcp allowed, when it was not: UCX's client-server connection setup (a
    /// listener's sockaddr, as prefixd's data endpoints use) cannot wire up an endpoint whose
    /// context has shared-memory transports only ("Destination is unreachable"). Data still
    /// takes the fastest lane; tcp carries the wire-up. None when tcp was allowed already.
    pub fn with_tcp(&self) -> Option<TransportList> {
        let named = self.names.iter().any(|n| n == "tcp" || n == "all");
        match (self.exclude, named) {
            (false, false) => {
                let mut names = self.names.clone();
                names.push("tcp".into());
                Some(TransportList { exclude: false, names })
            }
            (true, true) => {
                let names: Vec<String> = self.names.iter().filter(|n| *n != "tcp").cloned().collect();
                if names.is_empty() {
                    return Some(TransportList { exclude: false, names: vec!["all".into()] });
                }
                Some(TransportList { exclude: true, names })
            }
            _ => None,
        }
    }

    /// The value to hand UCX as its `TLS` setting.
    pub fn to_ucx(&self) -> String {
        let joined = self.names.join(",");
        if self.exclude {
            format!("^{joined}")
        } else {
            joined
        }
    }
}

/// A transport and device pair that a context can use, as `ucx_info -d` would list it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TransportDevice {
    pub transport: String,
    pub device: String,
}

impl std::fmt::Display for TransportDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.transport, self.device)
    }
}

/// Reads the `resource` lines of `ucp_context_print_info`, e.g.
/// `#      resource 3  :  md 2  dev 3  flags -- posix/memory`.
pub(crate) fn parse_context_info(text: &str) -> Vec<TransportDevice> {
    let mut out: Vec<TransportDevice> = text
        .lines()
        .filter(|l| l.contains("resource") && l.contains("flags"))
        .filter_map(|l| l.split_whitespace().last())
        .filter_map(|td| td.split_once('/'))
        .map(|(t, d)| TransportDevice { transport: t.to_owned(), device: d.to_owned() })
        .collect();
    out.sort();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tcp_is_added_for_wire_up_only_where_missing() {
        let with = |l: &str| TransportList::parse(l).unwrap().with_tcp().map(|t| t.to_ucx());
        assert_eq!(with("sm").as_deref(), Some("sm,tcp"));
        assert_eq!(with("cuda_ipc,cuda_copy,posix").as_deref(), Some("cuda_ipc,cuda_copy,posix,tcp"));
        assert_eq!(with("sm,tcp"), None);
        assert_eq!(with("all"), None);
        assert_eq!(with("^cuda_ipc"), None);
        assert_eq!(with("^tcp,cma").as_deref(), Some("^cma"));
        assert_eq!(with("^tcp").as_deref(), Some("all"));
    }

    #[test]
    fn parses_lists_and_exclusions() {
        let l = TransportList::parse(" tcp, sm ,tcp").unwrap();
        assert_eq!(l, TransportList { exclude: false, names: vec!["tcp".into(), "sm".into()] });
        assert_eq!(l.to_ucx(), "tcp,sm");
        let l = TransportList::parse("^cuda_ipc").unwrap();
        assert!(l.exclude);
        assert_eq!(l.to_ucx(), "^cuda_ipc");
    }

    #[test]
    fn rejects_unknown_and_empty() {
        for bad in ["", "   ", "^", "tcp,,sm", "cuda-ipc", "tcp,foo", "TCP"] {
            let err = TransportList::parse(bad).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument(_)), "{bad:?} gave {err:?}");
        }
        let msg = TransportList::parse("tcp,foo").unwrap_err().to_string();
        assert!(msg.contains("\"foo\""), "{msg}");
    }

    #[test]
    fn reads_print_info_resources() {
        let text = "#\n# UCP context\n#\n#      md 0  :  self\n\
            #      resource 0  :  md 0  dev 0  flags -- self/memory\n\
            #      resource 1  :  md 1  dev 1  flags -- tcp/lo\n\
            #      resource 2  :  md 2  dev 2  flags -- posix/memory\n";
        let got = parse_context_info(text);
        assert_eq!(got.len(), 3);
        assert!(got.contains(&TransportDevice { transport: "tcp".into(), device: "lo".into() }));
    }
}
