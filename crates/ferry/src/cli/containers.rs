//! `ferry stop`, `ferry start`, `ferry exec`: a container's life where it runs.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Result;
use ferry_api::ExecRequest;
use ferry_lab::lab::Lab;
use ferry_lab::ops::find;

/// `ferry stop NAME [--timeout-s N]`.
pub async fn stop(lab: &Lab, name: &str, timeout_s: u64) -> Result<ExitCode> {
    let c = find(lab, name).await?;
    let info = lab.client(&c.host)?.stop(name, timeout_s).await?;
    println!(
        "{name} stopped on {} (`ferry start {name}` runs it again)",
        info.host
    );
    Ok(ExitCode::SUCCESS)
}

/// `ferry start NAME`.
pub async fn start(lab: &Lab, name: &str) -> Result<ExitCode> {
    let c = find(lab, name).await?;
    let info = lab.client(&c.host)?.start(name).await?;
    println!(
        "{name} running on {} with IP {} (pid {})",
        info.host,
        info.spec.ip,
        info.pid.map_or("-".into(), |p| p.to_string())
    );
    Ok(ExitCode::SUCCESS)
}

/// `ferry exec NAME [-e K=V] [-w DIR] [--timeout-s N] -- CMD ARGS`: the command's output on
/// this command's stdout and stderr, its exit code as this command's (124 when it was killed
/// at its timeout, as `timeout(1)` says).
pub async fn exec(lab: &Lab, name: &str, req: ExecRequest) -> Result<ExitCode> {
    let c = find(lab, name).await?;
    let r = lab.client(&c.host)?.exec(name, &req).await?;
    std::io::stdout().write_all(r.stdout.as_bytes())?;
    std::io::stderr().write_all(r.stderr.as_bytes())?;
    if r.truncated {
        eprintln!("ferry exec: output cut at 1 MiB per stream");
    }
    let code = match r.exit_code {
        Some(c) => u8::try_from(c.clamp(0, 255)).unwrap_or(1),
        None if r.output_held_open => {
            eprintln!(
                "ferry exec: the command ended, but a process it left in the background kept its output open for {} s (--timeout-s); redirect that process's output (`cmd > /dev/null 2>&1 &`)",
                req.timeout_s.unwrap_or(60)
            );
            124
        }
        None => {
            eprintln!(
                "ferry exec: killed after {} s (--timeout-s)",
                req.timeout_s.unwrap_or(60)
            );
            124
        }
    };
    Ok(ExitCode::from(code))
}

/// `ferry logs`: the container's output from the host it runs on, each line to the stream it
/// was written to.
pub async fn logs(
    lab: &Lab,
    name: &str,
    tail: Option<usize>,
    follow: bool,
    timestamps: bool,
) -> Result<ExitCode> {
    let c = find(lab, name).await?;
    let (mut out, mut err) = (std::io::stdout(), std::io::stderr());
    let mut failed = None;
    lab.client(&c.host)?
        .logs(name, tail, follow, |r| {
            let w: &mut dyn Write = match r.stream {
                ferry_api::LogStream::Stdout => &mut out,
                ferry_api::LogStream::Stderr => &mut err,
            };
            let res = if timestamps {
                write!(w, "{} {}", r.time, r.log)
            } else {
                w.write_all(r.log.as_bytes())
            }
            .and_then(|()| w.flush());
            if let Err(e) = res {
                failed.get_or_insert(e);
            }
        })
        .await?;
    match failed {
        // A closed pipe (`ferry logs x | head`) is not an error.
        Some(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(ExitCode::SUCCESS),
    }
}
