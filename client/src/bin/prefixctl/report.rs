//! The results of `prefixctl doctor`: one line per check with its fix, or the same as JSON, and
//! an exit code that is the worst result.

use serde::Serialize;
use std::io::IsTerminal;
use std::process::ExitCode;

/// How a check came out, from best to worst (the order is the exit code's).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Ok,
    /// Did not apply here (no GPU, server unreachable, ...); says why.
    Skip,
    Warn,
    Fail,
}

impl Status {
    fn label(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::Skip => "SKIP",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        }
    }

    fn color(self) -> &'static str {
        match self {
            Status::Ok => "\x1b[32m",
            Status::Skip => "\x1b[2m",
            Status::Warn => "\x1b[33m",
            Status::Fail => "\x1b[31m",
        }
    }
}

/// One check: what it found, in one line, and what to do about it when it is not OK.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub id: &'static str,
    pub status: Status,
    pub summary: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    /// Lines of detail (tables), printed under the summary.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub detail: Vec<String>,
    /// The same facts as data, for --json.
    #[serde(skip_serializing_if = "serde_json::Value::is_null")]
    pub data: serde_json::Value,
}

impl Check {
    pub fn new(id: &'static str, status: Status, summary: impl Into<String>) -> Check {
        Check { id, status, summary: summary.into(), fix: None, detail: Vec::new(), data: serde_json::Value::Null }
    }
    pub fn ok(id: &'static str, summary: impl Into<String>) -> Check {
        Check::new(id, Status::Ok, summary)
    }
    pub fn warn(id: &'static str, summary: impl Into<String>, fix: impl Into<String>) -> Check {
        Check::new(id, Status::Warn, summary).fix(fix)
    }
    pub fn fail(id: &'static str, summary: impl Into<String>, fix: impl Into<String>) -> Check {
        Check::new(id, Status::Fail, summary).fix(fix)
    }
    pub fn skip(id: &'static str, why: impl Into<String>) -> Check {
        Check::new(id, Status::Skip, why)
    }
    pub fn fix(mut self, fix: impl Into<String>) -> Check {
        self.fix = Some(fix.into());
        self
    }
    pub fn detail(mut self, lines: Vec<String>) -> Check {
        self.detail = lines;
        self
    }
    pub fn data(mut self, data: serde_json::Value) -> Check {
        self.data = data;
        self
    }
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub endpoint: String,
    pub checks: Vec<Check>,
    pub worst: Status,
}

impl Report {
    pub fn new(endpoint: &str, checks: Vec<Check>) -> Report {
        let worst = checks.iter().map(|c| c.status).filter(|s| *s != Status::Skip).max().unwrap_or(Status::Ok);
        Report { endpoint: endpoint.to_owned(), checks, worst }
    }

    /// 0: all OK (skips included); 1: a warning; 2: a failure.
    pub fn exit_code(&self) -> ExitCode {
        ExitCode::from(match self.worst {
            Status::Ok | Status::Skip => 0,
            Status::Warn => 1,
            Status::Fail => 2,
        })
    }

    pub fn print(&self, json: bool) {
        if json {
            println!("{}", serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}")));
            return;
        }
        let color = std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none();
        println!("prefixd doctor: {}", self.endpoint);
        for c in &self.checks {
            let label = if color {
                format!("{}{:<4}\x1b[0m", c.status.color(), c.status.label())
            } else {
                format!("{:<4}", c.status.label())
            };
            println!("  {label}  {:<22} {}", c.id, c.summary);
            for d in &c.detail {
                println!("        {:<22} {d}", "");
            }
            if let Some(f) = &c.fix {
                println!("        {:<22} fix: {f}", "");
            }
        }
        let count = |s: Status| self.checks.iter().filter(|c| c.status == s).count();
        println!(
            "{} OK, {} WARN, {} FAIL, {} skipped",
            count(Status::Ok),
            count(Status::Warn),
            count(Status::Fail),
            count(Status::Skip)
        );
    }
}
