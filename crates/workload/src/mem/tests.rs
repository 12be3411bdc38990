use super::*;

fn page(index: u32, gen: u32) -> Vec<u64> {
    let mut p = vec![0; PAGE_WORDS];
    fill_page(&mut p, index, gen);
    p
}

#[test]
fn magic_spells_ferrymem() {
    assert_eq!(MAGIC.to_be_bytes(), *b"FERRYMEM");
}

#[test]
fn correct_page_passes() {
    for (index, gen) in [(0, 0), (1, 0), (0, 1), (12345, 7), (u32::MAX, u32::MAX)] {
        let p = page(index, gen);
        assert_eq!(check_page(&p, index, gen), Ok(()));
        assert_eq!(p[0], MAGIC);
        assert_eq!(p[1], header(index, gen));
        for (w, &x) in p.iter().enumerate() {
            assert_eq!(x, page_word(index, gen, w));
        }
    }
}

#[test]
fn content_differs_between_pages_and_generations() {
    let a = page(3, 0);
    let b = page(4, 0);
    let c = page(3, 1);
    let same = |x: &[u64], y: &[u64]| x[2..].iter().zip(&y[2..]).filter(|(a, b)| a == b).count();
    assert_eq!(same(&a, &b), 0);
    assert_eq!(same(&a, &c), 0);
    // Roughly half the bits set: no low-entropy pattern.
    let ones: u32 = a[2..].iter().map(|x| x.count_ones()).sum();
    let bits = (PAGE_WORDS - 2) as u32 * 64;
    assert!(
        ones > bits * 45 / 100 && ones < bits * 55 / 100,
        "{ones} of {bits}"
    );
}

#[test]
fn flipped_bit_is_found_with_its_offset() {
    for (word, bit) in [(2, 0), (100, 17), (511, 63)] {
        let mut p = page(42, 3);
        let expected = p[word];
        p[word] ^= 1 << bit;
        let fault = check_page(&p, 42, 3).unwrap_err();
        assert_eq!(
            fault,
            PageFault::WrongWord {
                word,
                expected,
                found: expected ^ (1 << bit),
                bad_words: 1
            }
        );
        let text = fault.to_string();
        assert!(
            text.contains(&format!("word={word},byte={}", word * 8)),
            "{text}"
        );
        assert!(!text.contains(' '), "{text}");
    }
}

#[test]
fn flipped_byte_in_the_header_is_found() {
    let mut p = page(42, 3);
    p[0] ^= 0xff;
    assert_eq!(
        check_page(&p, 42, 3),
        Err(PageFault::WrongMagic {
            found: MAGIC ^ 0xff
        })
    );
    let mut p = page(42, 3);
    p[1] ^= 1 << 40;
    assert!(matches!(
        check_page(&p, 42, 3),
        Err(PageFault::WrongHeader {
            found_index: 298, // 42 ^ 1 << 8
            found_gen: 3,
            ..
        })
    ));
}

#[test]
fn many_wrong_words_are_counted() {
    let mut p = page(1, 1);
    for x in &mut p[10..20] {
        *x = 0;
    }
    match check_page(&p, 1, 1) {
        Err(PageFault::WrongWord {
            word: 10,
            found: 0,
            bad_words: 10,
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
}

#[test]
fn zeroed_page_is_lost() {
    let p = vec![0; PAGE_WORDS];
    let fault = check_page(&p, 7, 0).unwrap_err();
    assert_eq!(fault, PageFault::Lost);
    assert_eq!(fault.to_string(), "lost_page:all_zero");
}

#[test]
fn wrong_generation_or_index_is_found() {
    let p = page(9, 4);
    let fault = check_page(&p, 9, 5).unwrap_err();
    assert_eq!(
        fault,
        PageFault::WrongHeader {
            expected_index: 9,
            expected_gen: 5,
            found_index: 9,
            found_gen: 4
        }
    );
    assert_eq!(
        fault.to_string(),
        "wrong_header:expected=page9/gen5,found=page9/gen4"
    );
    assert!(matches!(
        check_page(&p, 10, 4),
        Err(PageFault::WrongHeader { found_index: 9, .. })
    ));
    // A stale page with a correct-looking header is still caught by its data.
    let mut forged = page(9, 4);
    forged[1] = header(9, 5);
    assert!(matches!(
        check_page(&forged, 9, 5),
        Err(PageFault::WrongWord {
            word: 2,
            bad_words: 510,
            ..
        })
    ));
}

#[test]
fn stride_visits_every_page_once_per_cycle() {
    for pages in [
        1,
        2,
        3,
        4,
        5,
        7,
        10,
        12,
        256,
        2048,
        2049,
        6000,
        12345,
        65536,
        65536 * 3,
    ] {
        let mut s = Stride::new(pages);
        assert_eq!(gcd(s.step, pages), 1, "{pages}");
        if pages > 4 {
            assert!(s.step > pages / 4, "step {} for {pages} pages", s.step);
        }
        for cycle in 0..2 {
            let mut seen = vec![false; pages];
            for _ in 0..pages {
                let p = s.next_page();
                assert!(!seen[p], "page {p} twice in cycle {cycle} of {pages}");
                seen[p] = true;
            }
            assert!(seen.iter().all(|&x| x));
        }
    }
}

#[test]
fn memory_pages_are_os_pages() {
    let mut m = Memory::new(300).unwrap();
    for i in 0..m.pages() {
        assert_eq!(m.page(i).as_ptr() as usize % PAGE_SIZE, 0);
        assert_eq!(m.check(i), Ok(()));
    }
    m.dirty(5);
    m.dirty(5);
    assert_eq!(m.gens[5], 2);
    assert_eq!(m.check(5), Ok(()));
    assert_eq!(m.page(5)[1], header(5, 2));
    let r = m.range(6);
    m.buf[r].fill(0);
    assert_eq!(m.check(6), Err(PageFault::Lost));
}

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

#[test]
fn arguments() {
    assert_eq!(Config::parse(&[]).unwrap(), Config::default());
    let c = Config::parse(&args(
        "--port 7100 --size-mib 8 --dirty-mib-s 20.5 --verify-mib-s=0",
    ))
    .unwrap();
    assert_eq!(
        c,
        Config {
            port: 7100,
            size_mib: 8,
            dirty_mib_s: 20.5,
            verify_mib_s: 0.0
        }
    );
    assert_eq!(c.pages(), 2048);
    for (bad, msg) in [
        ("--size-mib 0", "--size-mib must be"),
        ("--size-mib 65537", "--size-mib must be"),
        ("--size-mib x", "--size-mib must be"),
        ("--dirty-mib-s -1", "--dirty-mib-s must be"),
        ("--dirty-mib-s NaN", "--dirty-mib-s must be"),
        ("--verify-mib-s inf", "--verify-mib-s must be"),
        ("--port 70000", "--port must be"),
        ("--port", "--port needs a value"),
        ("--bogus 1", "unknown argument"),
    ] {
        let e = Config::parse(&args(bad)).unwrap_err();
        assert!(e.contains(msg), "{bad}: {e}");
    }
    assert_eq!(
        Config::parse(&args("--size-mib 65536")).unwrap().size_mib,
        65536
    );
}
