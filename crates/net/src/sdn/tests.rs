use super::*;

#[test]
fn mac_roundtrip() {
    let mac: Mac = "02:FE:0a:e8:00:0a".parse().unwrap();
    assert_eq!(mac, Mac([0x02, 0xfe, 0x0a, 0xe8, 0x00, 0x0a]));
    assert_eq!(mac.to_string(), "02:fe:0a:e8:00:0a");
    assert!(Mac::ZERO.is_zero());
    let json = serde_json::to_string(&mac).unwrap();
    assert_eq!(json, "\"02:fe:0a:e8:00:0a\"");
    assert_eq!(serde_json::from_str::<Mac>(&json).unwrap(), mac);
}

#[test]
fn mac_parse_errors_name_the_input() {
    for bad in [
        "",
        "02:fe:0a:e8:00",
        "02:fe:0a:e8:00:0a:01",
        "2:fe:0a:e8:00:0a",
        "02:fe:0a:e8:00:zz",
        "02-fe-0a-e8-00-0a",
    ] {
        let err = bad.parse::<Mac>().unwrap_err();
        assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
    }
}

#[test]
fn netns_names_are_validated() {
    for bad in ["", ".", "..", "a/b", "a\0b"] {
        assert!(matches!(
            netns_path(bad),
            Err(SdnError::InvalidNetnsName { .. })
        ));
    }
    assert_eq!(netns_path("x").unwrap(), PathBuf::from("/run/netns/x"));
}

#[test]
fn missing_device_is_typed() {
    let err = Fdb::open("ferrynodev0").unwrap_err();
    assert!(matches!(err, SdnError::DeviceNotFound { ref dev } if dev == "ferrynodev0"));
    assert!(matches!(
        Fdb::open("a-very-long-device-name"),
        Err(SdnError::InvalidDeviceName { .. })
    ));
}

#[test]
fn error_ack_parsing() {
    // NLMSG_ERROR payload: error -17, capped original header with seq 7, ext-ack msg TLV.
    let mut p = Vec::new();
    p.extend_from_slice(&(-17i32).to_ne_bytes());
    p.extend_from_slice(&16u32.to_ne_bytes());
    p.extend_from_slice(&[0; 4]);
    p.extend_from_slice(&7u32.to_ne_bytes());
    p.extend_from_slice(&[0; 4]);
    p.extend_from_slice(&8u16.to_ne_bytes());
    p.extend_from_slice(&1u16.to_ne_bytes());
    p.extend_from_slice(b"bad\0");
    let e = nl::parse_error(nl::NLM_F_CAPPED | nl::NLM_F_ACK_TLVS, &p).unwrap();
    assert_eq!(e.errno, 17);
    assert_eq!(e.ext_msg.as_deref(), Some("bad"));
    assert!(e.reason().contains("bad"));
}
