//! `ferry-test-peer`: a raw agent-to-agent client for end-to-end tests of what an agent does
//! with hostile or misdirected peer requests. It speaks the real protocol (QUIC, mutual TLS,
//! framed JSON) with a host's certificate from the lab, sends one request as given, optionally
//! followed by empty file trees, and prints the answer as JSON. Run it inside a lab host's
//! network namespace (`ip netns exec ferry-h1 ...`).
//!
//! ```text
//! ferry-test-peer CA CERT KEY ADDR PEER_HOST REQUEST_JSON [EMPTY_TREES | hex:PAYLOAD]
//! ```
//!
//! `hex:PAYLOAD` writes those bytes after the request instead of empty trees (a base tree,
//! chunks).

use std::net::SocketAddr;
use std::path::PathBuf;

use transfer::frame::{read_msg, write_msg};
use transfer::{Endpoint, TlsFiles};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 6 {
        eprintln!("usage: ferry-test-peer CA CERT KEY ADDR PEER_HOST REQUEST_JSON [EMPTY_TREES]");
        std::process::exit(2);
    }
    let tls = TlsFiles {
        ca: PathBuf::from(&args[0]),
        cert: PathBuf::from(&args[1]),
        key: PathBuf::from(&args[2]),
    };
    let addr: SocketAddr = args[3].parse().expect("ADDR is ip:port");
    let req: serde_json::Value = serde_json::from_str(&args[5]).expect("REQUEST_JSON is JSON");
    let (trees, payload) = match args.get(6) {
        Some(a) if a.starts_with("hex:") => (0, unhex(&a[4..])),
        Some(n) => (n.parse().expect("EMPTY_TREES"), vec![]),
        None => (0, vec![]),
    };
    match run(&tls, addr, &args[4], &req, trees, &payload).await {
        Ok(v) => println!("{v}"),
        Err(e) => {
            println!("{}", serde_json::json!({"transport_error": e}));
        }
    }
}

async fn run(
    tls: &TlsFiles,
    addr: SocketAddr,
    host: &str,
    req: &serde_json::Value,
    trees: usize,
    payload: &[u8],
) -> Result<serde_json::Value, String> {
    let ep =
        Endpoint::bind("0.0.0.0:0".parse().expect("address"), tls).map_err(|e| e.to_string())?;
    let conn = ep.connect(addr, host).await.map_err(|e| e.to_string())?;
    // A refusal closes the connection with a reason: report it with the error.
    let why = |e: String| match conn.conn.close_reason() {
        Some(r) => format!("{e} (connection closed: {r})"),
        None => e,
    };
    let (mut send, mut recv) = conn.open().await.map_err(|e| why(e.to_string()))?;
    write_msg(&mut send, req)
        .await
        .map_err(|e| why(e.to_string()))?;
    for _ in 0..trees {
        write_msg(&mut send, &serde_json::json!({"End": {"entries": 0}}))
            .await
            .map_err(|e| why(e.to_string()))?;
    }
    tokio::io::AsyncWriteExt::write_all(&mut send, payload)
        .await
        .map_err(|e| why(e.to_string()))?;
    send.finish().map_err(|e| why(e.to_string()))?;
    let resp: serde_json::Value =
        tokio::time::timeout(std::time::Duration::from_secs(20), read_msg(&mut recv))
            .await
            .map_err(|_| "no answer within 20 s".to_string())?
            .map_err(|e| why(e.to_string()))?;
    conn.close("done");
    Ok(resp)
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex payload"))
        .collect()
}
