//! `kmsctl approvals`: dual control (`docs/approvals.md`). Lists, shows, approves and
//! denies requests for approval, and shows or sets the approval policies.

use clap::Subcommand;
use kms_client::api::{ApprovalInfo, ApprovalPolicies, ApprovalPolicy, ApprovalScope, Gate};
use kms_client::Client;

use crate::output::{json, table, Printer};
use crate::Output;

#[derive(Subcommand, Debug)]
pub(crate) enum ApprovalsCmd {
    /// List the requests for approval you may read, newest first.
    List {
        /// The service's requests (backup export, master-key rotation): as sys.
        #[arg(long)]
        service: bool,
    },
    /// Show one request: what it runs, who asked, who approved, where it stands.
    Show {
        /// The request's id.
        id: String,
        /// A service request: as sys.
        #[arg(long)]
        service: bool,
    },
    /// Approve another operator's request (you cannot approve your own).
    Approve {
        /// The request's id.
        id: String,
        /// Why (kept with the approval).
        #[arg(long)]
        reason: Option<String>,
        /// A service request: as sys.
        #[arg(long)]
        service: bool,
    },
    /// Deny a request: it never runs.
    Deny {
        /// The request's id.
        id: String,
        /// Why (kept with the denial, shown to the requester).
        #[arg(long)]
        reason: String,
        /// A service request: as sys.
        #[arg(long)]
        service: bool,
    },
    /// Show the approval policies; with --operations and --approvers, set one (itself
    /// held for approval when the policy in force holds `policy`); with --remove, remove it.
    Policy {
        /// The service's policy (as sys), not your tenant's.
        #[arg(long)]
        service: bool,
        /// The operations held (comma-separated): destroy, min-decrypt-version, grant,
        /// identity, policy (a tenant's); backup-export, rotate-master, policy (the
        /// service's).
        #[arg(long, value_delimiter = ',', value_parser = parse_gate, requires = "approvers")]
        operations: Vec<Gate>,
        /// Approvers needed besides the requester (1 to 9).
        #[arg(long, requires = "operations")]
        approvers: Option<u32>,
        /// How long a request may wait and then be run ("1d", "4h"; 1 minute to 30 days).
        #[arg(long, default_value = "1d")]
        window: String,
        /// Remove the policy: no operation waits for approvals.
        #[arg(long, conflicts_with_all = ["operations", "approvers"])]
        remove: bool,
    },
}

impl ApprovalsCmd {
    /// Whether the command acts on the service's requests or policy (the sys identity).
    pub(crate) fn service(&self) -> bool {
        match self {
            ApprovalsCmd::List { service }
            | ApprovalsCmd::Show { service, .. }
            | ApprovalsCmd::Approve { service, .. }
            | ApprovalsCmd::Deny { service, .. }
            | ApprovalsCmd::Policy { service, .. } => *service,
        }
    }
}

fn parse_gate(s: &str) -> Result<Gate, String> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).map_err(|_| {
        format!(
            "{s:?} is not an operation: destroy, min-decrypt-version, grant, identity, policy, backup-export, rotate-master"
        )
    })
}

/// Runs `cmd` with `client`.
pub(crate) async fn run(cmd: &ApprovalsCmd, client: &Client, out: &Printer) -> anyhow::Result<()> {
    match cmd {
        ApprovalsCmd::List { .. } => {
            let list = client.approvals().await?;
            match out.format() {
                Output::Json => json(&list),
                Output::Table => {
                    print!("{}", list_table(&list.approvals));
                    Ok(())
                }
            }
        }
        ApprovalsCmd::Show { id, .. } => show(out, &client.approval(id).await?),
        ApprovalsCmd::Approve { id, reason, .. } => show(
            out,
            &client.decide_approval(id, true, reason.as_deref()).await?,
        ),
        ApprovalsCmd::Deny { id, reason, .. } => {
            show(out, &client.decide_approval(id, false, Some(reason)).await?)
        }
        ApprovalsCmd::Policy {
            service,
            operations,
            approvers,
            window,
            remove,
        } => {
            let scope = if *service {
                ApprovalScope::Service
            } else {
                ApprovalScope::Tenant
            };
            let policies = match (approvers, remove) {
                (Some(approvers), _) => {
                    let window = humantime_secs(window)?;
                    let policy = ApprovalPolicy {
                        operations: operations.clone(),
                        approvers: *approvers,
                        window_secs: window,
                    };
                    client.set_approval_policy(scope, Some(policy)).await?
                }
                (None, true) => client.set_approval_policy(scope, None).await?,
                (None, false) => client.approval_policies().await?,
            };
            show_policies(out, &policies)
        }
    }
}

/// "1d", "4h", "90m", "3600s" or a bare number of seconds (`--window`).
fn humantime_secs(text: &str) -> anyhow::Result<u64> {
    duration_secs("--window", text)
}

/// "1d", "4h", "90m", "3600s" or a bare number of seconds, given to option `flag`.
pub(crate) fn duration_secs(flag: &str, text: &str) -> anyhow::Result<u64> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| anyhow::anyhow!("{flag} {text:?}: a duration such as 1d, 4h, 90m"))?;
    let unit = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => anyhow::bail!("{flag} {text:?}: a duration such as 1d, 4h, 90m"),
    };
    Ok(n.saturating_mul(unit))
}

fn list_table(approvals: &[ApprovalInfo]) -> String {
    if approvals.is_empty() {
        return "no requests for approval\n".into();
    }
    let rows: Vec<Vec<String>> = approvals
        .iter()
        .map(|a| {
            vec![
                a.id.clone(),
                a.operation.as_str().to_owned(),
                format!("{} {}", a.action.method, a.action.path),
                a.requested_by.clone(),
                format!("{:?}", a.status).to_lowercase(),
                format!("{}/{}", a.approvals.len(), a.required),
                a.expires_at.clone(),
            ]
        })
        .collect();
    table(
        &[
            "ID",
            "OPERATION",
            "ACTION",
            "REQUESTED BY",
            "STATUS",
            "APPROVALS",
            "EXPIRES",
        ],
        &rows,
    )
}

fn show(out: &Printer, a: &ApprovalInfo) -> anyhow::Result<()> {
    if out.format() == Output::Json {
        return json(a);
    }
    let mut rows = vec![
        vec!["id".into(), a.id.clone()],
        vec!["operation".into(), a.operation.as_str().to_owned()],
        vec![
            "action".into(),
            format!("{} {} {}", a.action.method, a.action.path, a.action.body),
        ],
        vec!["requested by".into(), a.requested_by.clone()],
        vec!["requested at".into(), a.requested_at.clone()],
        vec!["expires at".into(), a.expires_at.clone()],
        vec!["status".into(), format!("{:?}", a.status).to_lowercase()],
        vec![
            "approvals".into(),
            format!("{} of {}", a.approvals.len(), a.required),
        ],
    ];
    for v in &a.approvals {
        rows.push(vec![
            "  approved by".into(),
            format!("{} at {}", v.identity, v.at),
        ]);
    }
    if let Some(d) = &a.denial {
        rows.push(vec![
            "denied by".into(),
            format!(
                "{} at {}: {}",
                d.identity,
                d.at,
                d.reason.as_deref().unwrap_or("")
            ),
        ]);
    }
    if let Some(at) = &a.executed_at {
        rows.push(vec![
            "ran".into(),
            format!(
                "{at}: {}",
                a.outcome.as_deref().unwrap_or("(no outcome recorded)")
            ),
        ]);
    }
    print!("{}", table(&["FIELD", "VALUE"], &rows));
    Ok(())
}

fn show_policies(out: &Printer, p: &ApprovalPolicies) -> anyhow::Result<()> {
    if out.format() == Output::Json {
        return json(p);
    }
    let line = |p: &Option<ApprovalPolicy>| match p {
        None => "none: no operation waits for approvals".to_owned(),
        Some(p) => format!(
            "{} wait for {} other approvers, within {} s",
            p.operations
                .iter()
                .map(|g| g.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            p.approvers,
            p.window_secs
        ),
    };
    print!(
        "{}",
        table(
            &["SCOPE", "POLICY"],
            &[
                vec!["tenant".into(), line(&p.tenant)],
                vec!["service".into(), line(&p.service)],
            ],
        )
    );
    Ok(())
}

/// What `kmsctl` prints when an operation waits for approvals (exit status
/// [`PENDING_EXIT`]).
pub(crate) fn pending_text(p: &kms_client::api::ApprovalPending) -> String {
    format!(
        "waiting for approvals: {}\nrequest {} ({} {}), {} approvals needed, expires {}",
        p.message,
        p.approval.id,
        p.approval.action.method,
        p.approval.action.path,
        p.approval.required,
        p.approval.expires_at
    )
}

/// The exit status of an operation that now waits for approvals (EX_TEMPFAIL: nothing
/// ran; run it again with --approval ID once approved).
pub(crate) const PENDING_EXIT: u8 = 75;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows() {
        assert_eq!(humantime_secs("1d").unwrap(), 86_400);
        assert_eq!(humantime_secs("90m").unwrap(), 5_400);
        assert_eq!(humantime_secs("120").unwrap(), 120);
        assert!(humantime_secs("soon").is_err());
        assert!(humantime_secs("1w").is_err());
        assert_eq!(parse_gate("destroy").unwrap(), Gate::Destroy);
        assert!(parse_gate("shred").is_err());
    }
}
