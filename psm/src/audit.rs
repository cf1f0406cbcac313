//! `psm audit`: fetch a keyshare's audit log and verify its hash chain.

use anyhow::{bail, Context};
use psm_core::audit::{verify_chain, GENESIS};
use psm_core::wire::audit_from_proto;
use psm_proto::v1::keyshare_client::KeyshareClient;
use psm_proto::v1::{AuditRecord, GetAuditLogRequest};

use crate::client_args::ClientArgs;

#[derive(clap::Subcommand)]
pub enum AuditCommand {
    /// Print the log as a table and verify the chain.
    Show(ClientArgs),
    /// Verify the chain; exits non-zero naming the first bad record.
    Verify(ClientArgs),
}

const PAGE: u32 = 10_000;

async fn fetch(args: &ClientArgs) -> anyhow::Result<Vec<AuditRecord>> {
    fetch_from(args.channel("auditor/regulator")?, &args.endpoint).await
}

/// Every record of a keyshare's audit log, page by page (role auditor).
pub(crate) async fn fetch_from(
    channel: tonic::transport::Channel,
    endpoint: &str,
) -> anyhow::Result<Vec<AuditRecord>> {
    let mut client = KeyshareClient::new(channel);
    let mut out: Vec<AuditRecord> = Vec::new();
    loop {
        let from_seq = out.last().map_or(0, |r| r.seq + 1);
        let mut stream = client
            .get_audit_log(GetAuditLogRequest {
                from_seq,
                limit: PAGE,
            })
            .await
            .with_context(|| format!("fetching the audit log from {endpoint}"))?
            .into_inner();
        let mut n = 0;
        while let Some(r) = stream.message().await? {
            out.push(r);
            n += 1;
        }
        if n < PAGE {
            return Ok(out);
        }
    }
}

pub(crate) fn verify(records: &[AuditRecord]) -> anyhow::Result<[u8; 32]> {
    let parsed = records
        .iter()
        .map(audit_from_proto)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(verify_chain(&parsed, GENESIS)?)
}

/// Prints the verification result; an error names the first bad record.
fn report(records: &[AuditRecord]) -> anyhow::Result<()> {
    match verify(records) {
        Ok(head) => {
            println!(
                "chain of {} records verified; head {}",
                records.len(),
                hex::encode(head)
            );
            Ok(())
        }
        Err(e) => bail!("AUDIT CHAIN BROKEN: {e}"),
    }
}

pub fn run(cmd: AuditCommand) -> anyhow::Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    let _guard = rt.enter();
    match cmd {
        AuditCommand::Show(args) => {
            let records = rt.block_on(fetch(&args))?;
            println!(
                "{:>6}  {:<20}  {:<8}  {:<18}  {:<40}  reason",
                "seq", "time (UTC)", "decision", "rule", "caller"
            );
            for r in &records {
                let t = time::OffsetDateTime::from_unix_timestamp(r.unix_time)
                    .map(|t| {
                        format!(
                            "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
                            t.year(),
                            t.month() as u8,
                            t.day(),
                            t.hour(),
                            t.minute(),
                            t.second()
                        )
                    })
                    .unwrap_or_else(|_| r.unix_time.to_string());
                println!(
                    "{:>6}  {:<20}  {:<8}  {:<18}  {:<40}  {}",
                    r.seq, t, r.decision, r.rule, r.caller, r.reason
                );
            }
            report(&records)?;
        }
        AuditCommand::Verify(args) => {
            report(&rt.block_on(fetch(&args))?)?;
        }
    }
    Ok(())
}
