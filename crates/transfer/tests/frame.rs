//! Framing tests over in-memory streams.

use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use transfer::frame::{read_msg, read_msg_opt, write_msg, MAX_MSG};
use transfer::TransferError;

#[derive(Serialize, Deserialize, Debug, PartialEq)]
struct Msg {
    id: u32,
    name: String,
}

#[tokio::test]
async fn round_trip_and_clean_eof() {
    let mut buf: Vec<u8> = Vec::new();
    let m = Msg {
        id: 7,
        name: "x".into(),
    };
    let n = write_msg(&mut buf, &m).await.unwrap();
    assert_eq!(n as usize, buf.len());
    write_msg(&mut buf, &m).await.unwrap();
    let mut r = &buf[..];
    assert_eq!(read_msg::<_, Msg>(&mut r).await.unwrap(), m);
    assert_eq!(read_msg_opt::<_, Msg>(&mut r).await.unwrap(), Some(m));
    assert_eq!(read_msg_opt::<_, Msg>(&mut r).await.unwrap(), None);
    let mut empty: &[u8] = &[];
    assert!(matches!(
        read_msg::<_, Msg>(&mut empty).await,
        Err(TransferError::Truncated { .. })
    ));
}

#[tokio::test]
async fn rejects_oversized_length_before_allocating() {
    let (mut w, mut r) = tokio::io::duplex(64);
    // Announce 4 GiB - 1 and send nothing else: must fail without waiting for the body.
    w.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    match read_msg::<_, Msg>(&mut r).await {
        Err(TransferError::TooLarge { len, cap }) => {
            assert_eq!(len, u64::from(u32::MAX));
            assert_eq!(cap, MAX_MSG as u64);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let just_over = (MAX_MSG as u32 + 1).to_be_bytes();
    let mut r = &just_over[..];
    assert!(matches!(
        read_msg::<_, Msg>(&mut r).await,
        Err(TransferError::TooLarge { .. })
    ));
    // Sending an oversized message is refused too.
    let big = "x".repeat(MAX_MSG + 1);
    let mut sink: Vec<u8> = Vec::new();
    assert!(matches!(
        write_msg(&mut sink, &big).await,
        Err(TransferError::TooLarge { .. })
    ));
    assert!(sink.is_empty());
}

#[tokio::test]
async fn truncated_and_undecodable() {
    let mut buf: Vec<u8> = Vec::new();
    write_msg(
        &mut buf,
        &Msg {
            id: 1,
            name: "abc".into(),
        },
    )
    .await
    .unwrap();
    for cut in [2, 4, buf.len() - 1] {
        let mut r = &buf[..cut];
        assert!(
            matches!(
                read_msg_opt::<_, Msg>(&mut r).await,
                Err(TransferError::Truncated { .. })
            ),
            "cut at {cut}"
        );
    }
    let mut r = &buf[..];
    match read_msg::<_, Vec<u64>>(&mut r).await {
        Err(TransferError::Decode { reason, .. }) => assert!(!reason.is_empty()),
        other => panic!("expected Decode, got {other:?}"),
    }
}
