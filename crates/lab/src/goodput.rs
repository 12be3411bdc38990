//! What one bare QUIC stream carries between two lab hosts: the yardstick `ferry bench` holds
//! stop-and-copy's transfer against. Both ends are Ferry's own QUIC endpoints (the agents' TLS
//! material and transport settings), bound in the two hosts' network namespaces on their
//! underlay addresses, so the bytes cross the same veths and the same `tc` shaping as a
//! migration's. Nothing but the stream's bytes is measured: no file is read, no hash computed.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::lab::Lab;

/// Write size of the sending side.
const CHUNK: usize = 1 << 20;

/// One measurement.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Goodput {
    /// Bytes the receiver read.
    pub bytes: u64,
    /// From the first write to the receiver's acknowledgement of the last byte, ms.
    pub ms: f64,
}

impl Goodput {
    /// Bytes per second, in MB/s (10^6).
    pub fn mb_s(&self) -> f64 {
        if self.ms > 0.0 {
            self.bytes as f64 / self.ms / 1000.0
        } else {
            0.0
        }
    }
}

/// Binds one of Ferry's QUIC endpoints in network namespace `ns` (its socket stays there).
fn bind_in(ns: &str, addr: SocketAddr, tls: transfer::TlsFiles) -> Result<transfer::Endpoint> {
    let handle = tokio::runtime::Handle::current();
    let ns = ns.to_string();
    std::thread::spawn(move || {
        // This thread only: it ends right after the bind.
        ferry_runtime::netns::enter(&ns)?;
        let _rt = handle.enter();
        transfer::Endpoint::bind(addr, &tls).with_context(|| format!("QUIC endpoint in {ns}"))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the thread binding in a namespace panicked"))?
}

/// Sends `bytes` over one QUIC stream from lab host `from` to `to`, within `limit`.
pub async fn measure(
    lab: &Lab,
    from: &str,
    to: &str,
    bytes: u64,
    limit: Duration,
) -> Result<Goodput> {
    let host = |name: &str| {
        lab.hosts
            .iter()
            .find(|h| h.name == name)
            .with_context(|| format!("no lab host {name}"))
    };
    let (src, dst) = (host(from)?, host(to)?);
    let tls = |name: &str| {
        let pki = lab.dir.join("pki");
        transfer::TlsFiles {
            ca: pki.join("ca.pem"),
            cert: pki.join(format!("{name}.pem")),
            key: pki.join(format!("{name}.key")),
        }
    };
    let server = bind_in(
        &dst.netns,
        SocketAddr::from((dst.underlay_ip, 0)),
        tls(&dst.name),
    )?;
    let client = bind_in(
        &src.netns,
        SocketAddr::from((src.underlay_ip, 0)),
        tls(&src.name),
    )?;
    let addr = server.local_addr()?;
    let receiver = async {
        let conn = server
            .accept()
            .await
            .context("the receiving endpoint closed")??;
        let (mut send, mut recv) = conn.accept_stream().await?;
        let mut got = 0u64;
        while let Some(chunk) = recv
            .read_chunk(CHUNK, true)
            .await
            .context("reading the stream")?
        {
            got += chunk.bytes.len() as u64;
        }
        send.write_all(&got.to_le_bytes()).await?;
        send.finish()?;
        // Keep the connection until the sender has read the count.
        let _ = tokio::time::timeout(Duration::from_secs(5), send.stopped()).await;
        Ok::<_, anyhow::Error>(())
    };
    let sender = async {
        let conn = client.connect(addr, &dst.name).await?;
        let (mut send, mut recv) = conn.open().await?;
        let buf = vec![0x5au8; CHUNK];
        let t = Instant::now();
        let mut left = bytes;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            send.write_all(&buf[..n])
                .await
                .context("writing the stream")?;
            left -= n as u64;
        }
        send.finish()?;
        let mut count = [0u8; 8];
        recv.read_exact(&mut count)
            .await
            .context("reading the receiver's count")?;
        let ms = ferry_runtime::util::ms(t.elapsed());
        let got = u64::from_le_bytes(count);
        if got != bytes {
            bail!("sent {bytes} bytes, the receiver read {got}");
        }
        Ok::<_, anyhow::Error>(Goodput { bytes, ms })
    };
    let r = tokio::time::timeout(limit, async {
        let (rx, tx) = tokio::join!(receiver, sender);
        rx?;
        tx
    })
    .await
    .with_context(|| {
        format!(
            "{} over one QUIC stream from {from} to {to} took over {} s",
            crate::ops::human_bytes(bytes),
            limit.as_secs()
        )
    })?;
    client.close();
    server.close();
    r
}
