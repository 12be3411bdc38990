//! CRIU logs kept for troubleshooting.

use std::path::{Path, PathBuf};

/// How many CRIU logs an agent keeps in its `logs` directory.
pub const KEPT_LOGS: usize = 40;

/// Moves a CRIU log into `logs/NAME` for later troubleshooting, keeping the newest
/// [`KEPT_LOGS`]. Best effort: logs never fail a migration.
pub fn keep_log(log: &Path, logs: &Path, name: &str) {
    if std::fs::create_dir_all(logs).is_err() {
        return;
    }
    let to = logs.join(name);
    // The work directory is usually a tmpfs and the logs on disk: then a rename cannot move it.
    let moved = std::fs::rename(log, &to).is_ok()
        || (std::fs::copy(log, &to).is_ok() && std::fs::remove_file(log).is_ok());
    if !moved {
        return;
    }
    let Ok(rd) = std::fs::read_dir(logs) else {
        return;
    };
    let mut files: Vec<(std::time::SystemTime, PathBuf)> = rd
        .flatten()
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    if files.len() > KEPT_LOGS {
        files.sort();
        for (_, p) in &files[..files.len() - KEPT_LOGS] {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// [`keep_log`] after a CRIU run that went `ok`: then on a thread of its own, so that the
/// caller, in a frozen window, does not wait for the copy to disk (the work directory is
/// usually a tmpfs), the directory listing and the pruning (about 1 ms); after a failure at
/// once, before any cleanup can remove the log.
pub fn keep_log_soon(ok: bool, log: PathBuf, logs: PathBuf, name: String) {
    if !ok {
        keep_log(&log, &logs, &name);
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("keep-log".into())
        .spawn(move || keep_log(&log, &logs, &name));
    if let Err(e) = spawned {
        tracing::debug!(error = %e, "CRIU log not kept");
    }
}
