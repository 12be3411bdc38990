//! VXLAN FDB programming inside a throwaway network namespace (needs root).

use std::net::Ipv4Addr;
use std::process::Command;

use ferry_net::sdn::{in_netns, Fdb, FdbEntry, Mac, SdnError};

fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "this test needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN to create network namespaces); \
         run `cargo test -p ferry-net` as root"
    );
}

fn run(args: &[&str]) -> String {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {args:?}: {e}"));
    assert!(
        out.status.success(),
        "{args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Deletes the network namespace when dropped, also on test failure.
struct Netns(String);

impl Netns {
    fn new(name: String) -> Self {
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(&["ip", "netns", "add", &name]);
        Netns(name)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).output();
    }
}

/// `(mac, dst)` pairs that `bridge fdb show dev vx0` reports with a dst.
fn bridge_fdb(ns: &str) -> Vec<(String, String)> {
    let json = run(&["bridge", "-n", ns, "-j", "fdb", "show", "dev", "vx0"]);
    let v: serde_json::Value = serde_json::from_str(&json).expect("bridge -j output is JSON");
    let mut out: Vec<(String, String)> = v
        .as_array()
        .expect("JSON array")
        .iter()
        .filter_map(|e| {
            Some((
                e.get("mac")?.as_str()?.to_owned(),
                e.get("dst")?.as_str()?.to_owned(),
            ))
        })
        .collect();
    out.sort();
    out
}

fn sorted(mut v: Vec<FdbEntry>) -> Vec<(String, String)> {
    v.sort();
    let mut out: Vec<(String, String)> = v
        .into_iter()
        .map(|e| (e.mac.to_string(), e.dst.to_string()))
        .collect();
    out.sort();
    out
}

#[test]
fn fdb_set_replace_remove_flood() {
    require_root();
    let ns = Netns::new(format!("ferrytest-sdn-{}", std::process::id()));
    let n = ns.0.as_str();
    run(&["ip", "-n", n, "link", "add", "br0", "type", "bridge"]);
    run(&[
        "ip",
        "-n",
        n,
        "link",
        "add",
        "vx0",
        "type",
        "vxlan",
        "id",
        "42",
        "dstport",
        "4789",
        "nolearning",
    ]);
    run(&["ip", "-n", n, "link", "set", "vx0", "master", "br0"]);
    run(&["ip", "-n", n, "link", "set", "br0", "up"]);
    run(&["ip", "-n", n, "link", "set", "vx0", "up"]);

    let mac1: Mac = "02:fe:0a:e8:00:0a".parse().unwrap();
    let mac2: Mac = "02:fe:0a:e8:00:0b".parse().unwrap();
    let h1 = Ipv4Addr::new(192, 0, 2, 1);
    let h2 = Ipv4Addr::new(192, 0, 2, 2);
    let h3 = Ipv4Addr::new(192, 0, 2, 3);

    let outcome = in_netns(n, || -> Result<(), SdnError> {
        assert!(matches!(
            Fdb::open("nosuchdev"),
            Err(SdnError::DeviceNotFound { .. })
        ));
        let fdb = Fdb::open("vx0")?;
        assert_eq!(fdb.device(), "vx0");
        assert_eq!(
            fdb.entries()?,
            vec![],
            "fresh vxlan device has no dst entries"
        );

        fdb.set(mac1, h1)?;
        fdb.set(mac2, h2)?;
        let expect = vec![
            ("02:fe:0a:e8:00:0a".to_owned(), "192.0.2.1".to_owned()),
            ("02:fe:0a:e8:00:0b".to_owned(), "192.0.2.2".to_owned()),
        ];
        assert_eq!(sorted(fdb.entries()?), expect);
        assert_eq!(bridge_fdb(n), expect);

        // Replace: mac1 moves to host 3 (a migration), still exactly one entry for it.
        fdb.set(mac1, h3)?;
        fdb.set(mac1, h3)?; // idempotent
        let expect = vec![
            ("02:fe:0a:e8:00:0a".to_owned(), "192.0.2.3".to_owned()),
            ("02:fe:0a:e8:00:0b".to_owned(), "192.0.2.2".to_owned()),
        ];
        assert_eq!(sorted(fdb.entries()?), expect);
        assert_eq!(bridge_fdb(n), expect);

        // Flood entries append, and adding an existing one is fine.
        fdb.add_flood(h1)?;
        fdb.add_flood(h2)?;
        fdb.add_flood(h2)?;
        let mut expect = vec![
            ("00:00:00:00:00:00".to_owned(), "192.0.2.1".to_owned()),
            ("00:00:00:00:00:00".to_owned(), "192.0.2.2".to_owned()),
            ("02:fe:0a:e8:00:0a".to_owned(), "192.0.2.3".to_owned()),
            ("02:fe:0a:e8:00:0b".to_owned(), "192.0.2.2".to_owned()),
        ];
        assert_eq!(sorted(fdb.entries()?), expect);
        assert_eq!(bridge_fdb(n), expect);

        // Remove one flood destination only.
        fdb.remove_flood(h1)?;
        fdb.remove_flood(h1)?; // absent is fine
        expect.remove(0);
        assert_eq!(sorted(fdb.entries()?), expect);
        assert_eq!(bridge_fdb(n), expect);

        // Remove a MAC; removing it again is fine.
        fdb.remove(mac2)?;
        fdb.remove(mac2)?;
        expect.retain(|(m, _)| m != "02:fe:0a:e8:00:0b");
        assert_eq!(sorted(fdb.entries()?), expect);
        assert_eq!(bridge_fdb(n), expect);

        // A kernel rejection carries the errno: multicast MACs cannot be VXLAN FDB entries.
        let mcast: Mac = "01:00:5e:00:00:01".parse().unwrap();
        match fdb.set(mcast, h1) {
            Err(SdnError::Kernel { errno, ref dev, .. }) => {
                assert!(errno > 0);
                assert_eq!(dev, "vx0");
            }
            other => panic!("expected a kernel error for a multicast MAC, got {other:?}"),
        }
        Ok(())
    })
    .expect("thread in netns");
    outcome.expect("FDB operations");

    // The test thread itself never left the host namespace: vx0 does not exist here.
    assert!(matches!(
        Fdb::open("vx0"),
        Err(SdnError::DeviceNotFound { .. })
    ));
    assert!(matches!(
        in_netns("ferrytest-does-not-exist", || ()),
        Err(SdnError::NetnsOpen { .. })
    ));
}

#[test]
fn a_link_goes_down_and_up_in_process() {
    require_root();
    let ns = Netns::new(format!("ferrytest-link-{}", std::process::id()));
    run(&[
        "ip", "-n", &ns.0, "link", "add", "d0", "type", "veth", "peer", "name", "d1",
    ]);
    let flags = |ns: &str| {
        let v: serde_json::Value =
            serde_json::from_str(&run(&["ip", "-n", ns, "-j", "link", "show", "d0"])).unwrap();
        v[0]["flags"].to_string()
    };
    assert!(!flags(&ns.0).contains("\"UP\""), "{}", flags(&ns.0));
    in_netns(&ns.0, || ferry_net::sdn::set_link_up("d0", true))
        .unwrap()
        .unwrap();
    assert!(flags(&ns.0).contains("\"UP\""), "{}", flags(&ns.0));
    in_netns(&ns.0, || ferry_net::sdn::set_link_up("d0", false))
        .unwrap()
        .unwrap();
    assert!(!flags(&ns.0).contains("\"UP\""), "{}", flags(&ns.0));
    let missing = in_netns(&ns.0, || ferry_net::sdn::set_link_up("nope0", true)).unwrap();
    assert!(
        matches!(missing, Err(SdnError::DeviceNotFound { ref dev }) if dev == "nope0"),
        "{missing:?}"
    );
}
