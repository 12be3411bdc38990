//! Sets of address ranges kept as sorted, disjoint, non-adjacent `Region` vectors.

use crate::Region;

/// Sorts, drops empty regions and merges overlapping or adjacent ones.
pub(crate) fn normalize(mut v: Vec<Region>) -> Vec<Region> {
    v.retain(|r| r.end > r.start);
    v.sort_unstable_by_key(|r| (r.start, r.end));
    let mut out: Vec<Region> = Vec::with_capacity(v.len());
    for r in v {
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Parts of `r` covered by the normalized set `set`.
pub(crate) fn intersect_one(r: Region, set: &[Region]) -> Vec<Region> {
    let first = set.partition_point(|s| s.end <= r.start);
    set[first..]
        .iter()
        .take_while(|s| s.start < r.end)
        .map(|s| Region {
            start: s.start.max(r.start),
            end: s.end.min(r.end),
        })
        .filter(|x| x.end > x.start)
        .collect()
}

/// Parts of `r` not covered by the normalized set `set`.
pub(crate) fn subtract_one(r: Region, set: &[Region]) -> Vec<Region> {
    let mut out = Vec::new();
    let mut cur = r.start;
    for s in intersect_one(r, set) {
        if s.start > cur {
            out.push(Region {
                start: cur,
                end: s.start,
            });
        }
        cur = s.end;
    }
    if cur < r.end {
        out.push(Region {
            start: cur,
            end: r.end,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(start: u64, end: u64) -> Region {
        Region { start, end }
    }

    #[test]
    fn normalize_merges() {
        assert_eq!(
            normalize(vec![r(5, 6), r(0, 2), r(2, 3), r(1, 2), r(7, 7), r(4, 5)]),
            vec![r(0, 3), r(4, 6)]
        );
    }

    #[test]
    fn intersect_and_subtract() {
        let set = vec![r(0, 10), r(20, 30), r(40, 50)];
        assert_eq!(
            intersect_one(r(5, 45), &set),
            vec![r(5, 10), r(20, 30), r(40, 45)]
        );
        assert_eq!(subtract_one(r(5, 45), &set), vec![r(10, 20), r(30, 40)]);
        assert_eq!(subtract_one(r(60, 70), &set), vec![r(60, 70)]);
        assert_eq!(subtract_one(r(20, 30), &set), vec![]);
    }
}
