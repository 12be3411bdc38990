use super::*;

#[test]
fn reads_become_locations_and_placed_addresses() {
    let p = Placement::default();
    let me = std::process::id() as i32;
    p.note_pid(me).expect("own NSpid");
    let (a, b) = (p.next_seq(), p.next_seq());
    assert!(b > a, "sequence numbers grow");
    p.record(me, 0x10000, a, vec![[1; 32], [2; 32]]);
    p.record(me, 0x20000, b, vec![]);
    let (locs, regions) = p.take().expect("known pid");
    assert_eq!(locs.len(), 1, "an empty read is not recorded");
    assert_eq!(locs[0].vaddr, 0x10000);
    assert_eq!(locs[0].seq, a);
    assert_eq!(locs[0].pid, vpid_of(me as i32).unwrap());
    p.placed(regions);
    let r = Region {
        start: 0xf000,
        end: 0x13000,
    };
    assert_eq!(
        p.unplaced(me, r),
        vec![
            Region {
                start: 0xf000,
                end: 0x10000
            },
            Region {
                start: 0x12000,
                end: 0x13000
            }
        ]
    );
    assert_eq!(p.host_pid(locs[0].pid), Some(me));
    // A read of a process whose container pid is unknown cannot be placed.
    p.record(1 << 30, 0, p.next_seq(), vec![[0; 32]]);
    assert!(p.take().is_err());
}
