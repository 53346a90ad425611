//! Memory tiers.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Tier {
    /// Host memory (pinned where CUDA is present).
    Host,
    /// GPU memory on the sidecar's device.
    Gpu,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Host => "host",
            Tier::Gpu => "gpu",
        }
    }
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
