use super::*;

#[test]
fn deal_splits_into_chunks_round_robin() {
    let p = PAGE as u64;
    let todo = vec![(
        7,
        vec![
            Region {
                start: 0,
                end: 600 * p,
            },
            Region {
                start: 1000 * p,
                end: 1001 * p,
            },
        ],
    )];
    let d = deal(&todo, 2);
    assert_eq!(
        d[0],
        vec![(7, 0, 256), (7, 512 * p, 88)],
        "chunks of at most 256 pages, alternating"
    );
    assert_eq!(d[1], vec![(7, 256 * p, 256), (7, 1000 * p, 1)]);
    let total: u64 = d.iter().flatten().map(|c| c.2).sum();
    assert_eq!(total, 601);
}
